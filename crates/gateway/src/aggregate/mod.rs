//! The aggregation pattern: composite endpoints declared in the gateway's configuration.
//!
//! One client call fans out to several backend calls ("parts") whose JSON answers are merged
//! into one document. A part runs as soon as the parts its templates read from have answered,
//! so independent parts run concurrently and a slow part delays only those that need it.
//! Each part has its own timeout; an optional part that fails is replaced by its fallback and
//! the answer is flagged `X-Aggregate-Complete: false`; a required part that fails fails the
//! request with a problem that names it. `X-Aggregate-Parts: true` on the request adds a
//! `_parts` section: every part's outcome, backend status, time and cache use.

mod cache;
pub mod template;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use shopmesh_platform::Problem;
use smallvec::SmallVec;

use crate::cluster::Cluster;
use crate::config::{AggregateConfig, PartConfig};
use crate::wire::{Body, empty, names};
use cache::{PartCache, Via};
use template::{Context, Encoding, Template, Unresolved};

/// Request header asking for the `_parts` section.
pub const PARTS_HEADER: &str = "x-aggregate-parts";
/// Response header: whether every part answered.
pub const COMPLETE_HEADER: &str = "x-aggregate-complete";
/// Response header naming the parts replaced by their fallback.
pub const FAILED_HEADER: &str = "x-aggregate-failed";

/// Most parts in one composite.
const MAX_PARTS: usize = 32;
/// Longest part timeout accepted.
const MAX_PART_TIMEOUT_MS: u64 = 300_000;
/// Largest part answer accepted.
const MAX_PART_BODY: usize = 64 * 1024 * 1024;

/// Names a part cannot take: they are template sources.
const RESERVED: [&str; 4] = ["path", "query", "header", "claims"];

/// A composite, checked and compiled from its configuration.
#[derive(Debug)]
pub struct Plan {
    parts: Vec<PartPlan>,
}

#[derive(Debug)]
struct PartPlan {
    cfg: PartConfig,
    name: Arc<str>,
    path: Template,
    query: Vec<(String, Template)>,
    headers: Vec<(HeaderName, Template)>,
    timeout: Duration,
    extract: Option<Vec<String>>,
    place: Place,
    enrich: Option<Enrich>,
    /// Parts whose answers this one reads.
    deps: Vec<usize>,
    /// How much of the answer is parsed: into a tree when something reshapes or reads it;
    /// otherwise it is only validated and copied into the merged document as it came (or
    /// the part of it that `extract` names).
    read: Read,
    /// `cfg.fallback`, shared rather than copied per request.
    fallback: Arc<Value>,
}

/// How a part's answer is read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    /// Parsed into a [`Value`].
    Tree,
    /// Validated, kept as it came.
    Raw,
    /// Validated; only the value at this `extract` path is kept, as it came.
    RawAt(Arc<[String]>),
}

#[derive(Debug)]
enum Place {
    /// An object's fields go to the top level.
    Root,
    At(Vec<String>),
}

#[derive(Debug)]
struct Enrich {
    each: Vec<String>,
    key: String,
    by: String,
    into: String,
}

fn dotted(path: &str) -> Result<Vec<String>, String> {
    let steps: Vec<String> = path.split('.').map(str::to_owned).collect();
    if steps.iter().any(String::is_empty) {
        return Err(format!("`{path}` is not a dotted path"));
    }
    Ok(steps)
}

impl Plan {
    /// Checks a composite: names, clusters, templates (every reference known), the
    /// dependency graph (no cycle), limits. `route_template` is the route's `template`
    /// match, whose parameters `{path.NAME}` may use.
    pub fn compile(
        cfg: &AggregateConfig,
        known_cluster: &dyn Fn(&str) -> bool,
        route_template: Option<&str>,
    ) -> Result<Self, String> {
        if cfg.parts.is_empty() || cfg.parts.len() > MAX_PARTS {
            return Err(format!("aggregate: 1 to {MAX_PARTS} parts"));
        }
        let route_params: Vec<String> = match route_template {
            Some(t) => crate::router::Template::parse(t)?
                .params()
                .map(str::to_owned)
                .collect(),
            None => Vec::new(),
        };
        let params: Vec<&str> = route_params.iter().map(String::as_str).collect();
        check_names(&cfg.parts)?;
        let index = |name: &str| cfg.parts.iter().position(|p| p.name == name);
        let mut places = HashSet::new();
        let mut parts = Vec::with_capacity(cfg.parts.len());
        for p in &cfg.parts {
            let err = |reason: String| format!("part `{}`: {reason}", p.name);
            parts.push(part_plan(p, known_cluster, &index, &params, &mut places).map_err(err)?);
        }
        check_acyclic(&parts)?;
        choose_reads(&mut parts);
        Ok(Self { parts })
    }
}

/// Every part named: 1 to 64 letters, digits, `_` or `-`, not reserved, not twice.
fn check_names(parts: &[PartConfig]) -> Result<(), String> {
    let mut names = HashSet::new();
    for p in parts {
        let valid = !p.name.is_empty()
            && p.name.len() <= 64
            && p.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "part `{}`: a name is 1 to 64 letters, digits, `_` or `-`",
                p.name
            ));
        }
        if RESERVED.contains(&p.name.as_str()) {
            return Err(format!("part `{}`: the name is reserved", p.name));
        }
        if !names.insert(p.name.as_str()) {
            return Err(format!("part `{}`: duplicate name", p.name));
        }
    }
    Ok(())
}

/// One part checked and compiled (its call's templates, limits, where its answer goes);
/// `places` holds the places other parts took. The error names no part (the caller does).
fn part_plan(
    p: &PartConfig,
    known_cluster: &dyn Fn(&str) -> bool,
    index: &dyn Fn(&str) -> Option<usize>,
    params: &[&str],
    places: &mut HashSet<String>,
) -> Result<PartPlan, String> {
    if !known_cluster(&p.cluster) {
        return Err(format!("unknown cluster `{}`", p.cluster));
    }
    if !p.path.starts_with('/')
        || p.path.contains(['?', '#'])
        || p.path.contains(char::is_whitespace)
    {
        return Err(format!(
            "path `{}` must start with `/` and hold no `?`, `#` or spaces (use `query`)",
            p.path
        ));
    }
    let path = Template::parse(&p.path, index, params)?;
    let mut query = Vec::new();
    for (k, v) in &p.query {
        if k.is_empty() {
            return Err("a query parameter needs a name".into());
        }
        query.push((k.clone(), Template::parse(v, index, params)?));
    }
    let mut headers = Vec::new();
    for (k, v) in &p.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("`{k}` is not a header name"))?;
        if name
            .as_str()
            .starts_with(shopmesh_platform::TRUSTED_HEADER_PREFIX)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            return Err(format!("header `{k}` cannot be set"));
        }
        headers.push((name, Template::parse(v, index, params)?));
    }
    check_limits(p)?;
    let extract = p.extract.as_deref().map(dotted).transpose()?;
    let (place, enrich) = place_of(p, places)?;
    let mut deps: Vec<usize> = path
        .parts()
        .chain(query.iter().flat_map(|(_, t)| t.parts()))
        .chain(headers.iter().flat_map(|(_, t)| t.parts()))
        .collect();
    deps.sort_unstable();
    deps.dedup();
    Ok(PartPlan {
        read: Read::Tree,
        fallback: Arc::new(p.fallback.clone()),
        cfg: p.clone(),
        name: p.name.as_str().into(),
        path,
        query,
        headers,
        timeout: Duration::from_millis(p.timeout_ms),
        extract,
        place,
        enrich,
        deps,
    })
}

/// A part's timeout, body and cache limits, and its renames.
fn check_limits(p: &PartConfig) -> Result<(), String> {
    if p.timeout_ms == 0 || p.timeout_ms > MAX_PART_TIMEOUT_MS {
        return Err(format!("timeout_ms must be within 1–{MAX_PART_TIMEOUT_MS}"));
    }
    if p.max_body_bytes == 0 || p.max_body_bytes > MAX_PART_BODY {
        return Err(format!("max_body_bytes must be within 1–{MAX_PART_BODY}"));
    }
    if let Some(c) = &p.cache
        && (c.ttl_ms == 0 || c.max_bytes < 4096 || c.max_bytes > 1 << 40)
    {
        return Err("cache: ttl_ms must be positive, max_bytes within 4 KiB–1 TiB".into());
    }
    if p.rename
        .iter()
        .any(|(from, to)| from.is_empty() || to.is_empty())
    {
        return Err("rename: empty field name".into());
    }
    Ok(())
}

/// Where a part's answer goes (`into`: one place per part, none inside another's; or
/// `enrich`: into each element of another list).
fn place_of(
    p: &PartConfig,
    places: &mut HashSet<String>,
) -> Result<(Place, Option<Enrich>), String> {
    match (&p.into, &p.enrich) {
        (Some(_), Some(_)) => Err("`into` and `enrich` exclude each other".into()),
        (_, Some(e)) => {
            if e.key.is_empty() || e.by.is_empty() || e.into.is_empty() {
                return Err("enrich: key, by and into must be named".into());
            }
            Ok((
                Place::At(Vec::new()),
                Some(Enrich {
                    each: dotted(&e.each)?,
                    key: e.key.clone(),
                    by: e.by.clone(),
                    into: e.into.clone(),
                }),
            ))
        }
        (Some(i), None) if i == "." => Ok((Place::Root, None)),
        (into, None) => {
            let at = dotted(into.as_deref().unwrap_or(&p.name))?;
            if at.first().is_some_and(|f| f == "_parts") {
                return Err("`_parts` is reserved".into());
            }
            let joined = at.join(".");
            if let Some(other) = places.iter().find(|o: &&String| {
                **o == joined
                    || joined.starts_with(&format!("{o}."))
                    || o.starts_with(&format!("{joined}."))
            }) {
                return Err(format!(
                    "`into` `{joined}` overlaps another part's `{other}`"
                ));
            }
            places.insert(joined);
            Ok((Place::At(at), None))
        }
    }
}

/// No cycle among the parts' dependencies (Kahn's algorithm: whatever cannot be ordered is
/// on or behind a cycle).
fn check_acyclic(parts: &[PartPlan]) -> Result<(), String> {
    let mut done = vec![false; parts.len()];
    loop {
        let ready: Vec<usize> = (0..parts.len())
            .filter(|&i| !done[i] && parts[i].deps.iter().all(|&d| done[d]))
            .collect();
        if ready.is_empty() {
            break;
        }
        for i in ready {
            done[i] = true;
        }
    }
    let stuck: Vec<&str> = (0..parts.len())
        .filter(|&i| !done[i])
        .map(|i| &*parts[i].name)
        .collect();
    if stuck.is_empty() {
        return Ok(());
    }
    Err(format!(
        "aggregate: the parts {} depend on each other in a cycle",
        stuck
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// How each part's answer is read: whole into a tree where it is reshaped, enriched,
/// placed at the root or read by another part; otherwise kept raw (or the raw value at its
/// `extract` path), validated once.
fn choose_reads(parts: &mut [PartPlan]) {
    let any_enrich = parts.iter().any(|p| p.enrich.is_some());
    let read: HashSet<usize> = parts.iter().flat_map(|p| p.deps.iter().copied()).collect();
    for (i, p) in parts.iter_mut().enumerate() {
        let tree = any_enrich
            || read.contains(&i)
            || !p.cfg.fields.is_empty()
            || !p.cfg.rename.is_empty()
            || !matches!(p.place, Place::At(_));
        p.read = match (&p.extract, tree) {
            (_, true) => Read::Tree,
            (None, false) => Read::Raw,
            (Some(path), false) => Read::RawAt(path.as_slice().into()),
        };
    }
}

/// A successful backend answer.
#[derive(Clone, Debug)]
pub(crate) struct Fetched {
    status: u16,
    answer: Answer,
    /// Its size on the wire (what a cache entry is weighed by).
    size: usize,
    /// How long it may be cached: `None` when the backend forbids it (or the part keeps no
    /// answers, so it was not read), `Duration::MAX` when the backend says nothing.
    max_age: Option<Duration>,
}

/// A part's JSON answer: parsed, or as it came (validated).
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    Parsed(Arc<Value>),
    Raw(Arc<RawValue>),
}

/// Why a part has no answer.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
    Timeout,
    Unreachable,
    NoEndpoint,
    /// The backend answered with an error status (and maybe a problem `detail`).
    Status(StatusCode, Option<String>),
    /// The answer is not JSON, or too large.
    Invalid(&'static str),
    /// A template could not be filled in (a missing input); `client`: from the request.
    Unresolved {
        what: String,
        client: bool,
    },
    /// The composite's own deadline passed first.
    Deadline,
}

impl Failure {
    /// The part did not answer in time.
    fn is_timeout(&self) -> bool {
        matches!(self, Failure::Timeout | Failure::Deadline)
    }

    fn describe(&self) -> String {
        match self {
            Failure::Timeout => "timed out".into(),
            Failure::Unreachable => "unreachable".into(),
            Failure::NoEndpoint => "no healthy endpoint".into(),
            Failure::Status(s, _) => format!("answered {}", s.as_u16()),
            Failure::Invalid(why) => (*why).into(),
            Failure::Unresolved { what, .. } => format!("input {what} is missing or not valid"),
            Failure::Deadline => "the composite's deadline passed".into(),
        }
    }
}

/// The composite endpoint of one route, ready to serve.
pub struct Composite {
    route: Arc<str>,
    plan: Plan,
    clusters: Vec<Arc<Cluster>>,
    caches: Vec<Arc<PartCache>>,
    metrics: Vec<Arc<PartMetrics>>,
}

/// A part's metric handles, registered once per configuration generation.
struct PartMetrics {
    /// By [`Via`]: miss, shared, hit.
    cache: [metrics::Counter; 3],
    duration: metrics::Histogram,
    ok: metrics::Counter,
    fallback: metrics::Counter,
    skipped: metrics::Counter,
    failed: metrics::Counter,
    /// Calls that did not answer in time (the part's timeout or the composite's deadline),
    /// whether a fallback was served or the request failed.
    timeouts: metrics::Counter,
}

impl PartMetrics {
    fn new(route: &Arc<str>, part: &Arc<str>) -> Self {
        let cache = |result: &'static str| metrics::counter!("gateway_aggregate_cache_total", "route" => route.clone(), "part" => part.clone(), "result" => result);
        let outcome = |outcome: &'static str| metrics::counter!("gateway_aggregate_parts_total", "route" => route.clone(), "part" => part.clone(), "outcome" => outcome);
        Self {
            cache: [cache("miss"), cache("shared"), cache("hit")],
            duration: metrics::histogram!("gateway_aggregate_part_duration_seconds", "route" => route.clone(), "part" => part.clone()),
            ok: outcome("ok"),
            fallback: outcome("fallback"),
            skipped: outcome("skipped"),
            failed: outcome("failed"),
            timeouts: metrics::counter!("gateway_aggregate_part_timeouts_total", "route" => route.clone(), "part" => part.clone()),
        }
    }
}

impl Composite {
    /// Binds a plan to its clusters. Part caches of `previous` (the same route in the
    /// generation being replaced) are kept where the part is unchanged.
    pub fn new(
        route: Arc<str>,
        plan: Plan,
        cluster: &dyn Fn(&str) -> Option<Arc<Cluster>>,
        previous: Option<&Composite>,
    ) -> Result<Self, String> {
        let clusters = plan
            .parts
            .iter()
            .map(|p| {
                cluster(&p.cfg.cluster)
                    .ok_or_else(|| format!("unknown cluster `{}`", p.cfg.cluster))
            })
            .collect::<Result<_, _>>()?;
        let caches = plan
            .parts
            .iter()
            .map(|p| {
                previous
                    .and_then(|prev| {
                        // Only the same call, answered the same way, by the same endpoints.
                        let endpoints = |c: &Cluster| {
                            c.endpoints
                                .iter()
                                .map(|e| e.url.clone())
                                .collect::<Vec<_>>()
                        };
                        let now = cluster(&p.cfg.cluster)?;
                        prev.plan
                            .parts
                            .iter()
                            .zip(&prev.clusters)
                            .position(|(o, oc)| {
                                o.cfg == p.cfg
                                    && o.read == p.read
                                    && endpoints(oc) == endpoints(&now)
                            })
                            .map(|i| prev.caches[i].clone())
                    })
                    .filter(|c| c.is_for(p.cfg.cache.as_ref()))
                    .unwrap_or_else(|| Arc::new(PartCache::new(p.cfg.cache.as_ref())))
            })
            .collect();
        let metrics = plan
            .parts
            .iter()
            .map(|p| Arc::new(PartMetrics::new(&route, &p.name)))
            .collect();
        Ok(Self {
            route,
            plan,
            clusters,
            caches,
            metrics,
        })
    }
}

/// The caller, as the gateway authenticated it.
pub struct CallerView<'a> {
    pub id: &'a str,
    pub roles: &'a [String],
    /// The verified token's claims (`None` for an API key).
    pub claims: Option<&'a Map<String, Value>>,
}

/// What a composite is asked.
pub struct Incoming<'a> {
    /// The route template's parameters, as matched (normalised, still percent-encoded).
    pub params: BTreeMap<String, String>,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub caller: Option<CallerView<'a>>,
    /// Deadline of the whole composite.
    pub deadline: Duration,
}

/// How one part went, for `_parts`, metrics and the merge.
struct Report {
    /// Its parsed answer, or its fallback (`None`: skipped or raw, nothing to read).
    value: Option<Arc<Value>>,
    /// Its answer as it came (or the part `extract` names), when it is not parsed.
    raw: Option<Arc<RawValue>>,
    failure: Option<Failure>,
    status: Option<u16>,
    elapsed: Duration,
    via: Option<Via>,
    /// A `*` input found nothing: there was nothing to ask.
    skipped: bool,
}

/// A part's request headers: a few, set in order (a later one of the same name replaces
/// the earlier), made into a map only when the request is sent.
/// (`Accept`, the request id and trace context inline; more spill to the heap.)
type PartHeaders = SmallVec<[(HeaderName, HeaderValue); 3]>;

fn set(headers: &mut PartHeaders, name: HeaderName, value: HeaderValue) {
    match headers.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = value,
        None => headers.push((name, value)),
    }
}

/// A part's request, ready to go.
struct PartRequest {
    path_and_query: http::uri::PathAndQuery,
    headers: PartHeaders,
    key: Arc<str>,
}

/// The headers every part passes on from the client's request (looked up once per request).
type Passed = [Option<HeaderValue>; 2];
const PASSED: [&HeaderName; 2] = [&names::REQUEST_ID, &names::TRACEPARENT];

/// How the composite's wait for its parts ended.
enum Next {
    Part(usize, Report),
    AllDone,
    Deadline,
}

impl Composite {
    pub async fn serve(&self, inc: Incoming<'_>) -> Response<Body> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + inc.deadline;
        let want_parts = inc
            .headers
            .get(PARTS_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let params: BTreeMap<String, String> = inc
            .params
            .iter()
            .map(|(k, v)| {
                let decoded = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                (k.clone(), decoded.into_owned())
            })
            .collect();
        let query: Vec<(String, String)> = inc
            .query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        // An API key's caller has no token: `sub` and `roles` stand in for its claims.
        let key_claims: Option<Map<String, Value>> =
            inc.caller.as_ref().filter(|c| c.claims.is_none()).map(|c| {
                let mut m = Map::new();
                m.insert("sub".into(), c.id.into());
                m.insert("roles".into(), c.roles.to_vec().into());
                m
            });
        let claims = inc
            .caller
            .as_ref()
            .and_then(|c| c.claims)
            .or(key_claims.as_ref());

        let passed: Passed = PASSED.map(|h| inc.headers.get(h).cloned());
        let n = self.plan.parts.len();
        let mut values: Vec<Option<Arc<Value>>> = vec![None; n];
        let mut reports: Vec<Option<Report>> = (0..n).map(|_| None).collect();
        let mut started_parts = vec![false; n];
        let mut running = FuturesUnordered::new();
        // The first required part to fail decides the answer; nothing more is started.
        let mut fatal: Option<usize> = None;
        // One timer for the composite's deadline, however many parts come back before it.
        let mut deadline = std::pin::pin!(tokio::time::sleep_until(deadline));
        loop {
            // Start every part whose inputs are all in; a part that needs nothing from the
            // backends (an empty list) or cannot be asked (a missing input) is settled here,
            // which may make more parts ready.
            let mut progressed = true;
            while progressed && fatal.is_none() {
                progressed = false;
                for i in 0..n {
                    let part = &self.plan.parts[i];
                    if started_parts[i] || !part.deps.iter().all(|&d| reports[d].is_some()) {
                        continue;
                    }
                    started_parts[i] = true;
                    progressed = true;
                    // Nothing to ask of a list that came back empty: its dependents have
                    // nothing to ask either.
                    let settled = if part
                        .deps
                        .iter()
                        .any(|&d| reports[d].as_ref().is_some_and(|r| r.skipped))
                    {
                        Some(self.skipped(i))
                    } else {
                        let cx = Context {
                            params: &params,
                            query: &query,
                            headers: inc.headers,
                            claims,
                            parts: &values,
                        };
                        match self.request(i, &cx, &inc, &passed) {
                            Ok(req) => {
                                running.push(self.run(i, req));
                                None
                            }
                            Err(Unresolved::Empty) => Some(self.skipped(i)),
                            Err(Unresolved::Missing { what, client }) => Some(self.failed(
                                i,
                                Failure::Unresolved { what, client },
                                Duration::ZERO,
                            )),
                        }
                    };
                    if let Some(r) = settled {
                        if r.failure.is_some() && part.cfg.required {
                            fatal.get_or_insert(i);
                        }
                        values[i] = r.value.clone();
                        reports[i] = Some(r);
                    }
                    if fatal.is_some() {
                        break;
                    }
                }
            }
            if let Some(i) = fatal {
                return self.required_failed(i, &reports, want_parts);
            }
            if running.is_empty() {
                break;
            }
            let next = std::future::poll_fn(|cx| {
                match running.poll_next_unpin(cx) {
                    Poll::Ready(Some((i, report))) => return Poll::Ready(Next::Part(i, report)),
                    Poll::Ready(None) => return Poll::Ready(Next::AllDone),
                    Poll::Pending => {}
                }
                deadline.as_mut().poll(cx).map(|()| Next::Deadline)
            });
            match next.await {
                Next::Part(i, report) => {
                    if report.failure.is_some() && self.plan.parts[i].cfg.required {
                        fatal = Some(i);
                    }
                    values[i] = report.value.clone();
                    reports[i] = Some(report);
                }
                Next::AllDone => break,
                Next::Deadline => {
                    // The composite's deadline: whatever is still out (or never started)
                    // has missed it.
                    for (i, slot) in reports.iter_mut().enumerate() {
                        if slot.is_none() {
                            if self.plan.parts[i].cfg.required {
                                fatal.get_or_insert(i);
                            }
                            *slot = Some(self.failed(i, Failure::Deadline, started.elapsed()));
                        }
                    }
                    if let Some(i) = fatal {
                        return self.required_failed(i, &reports, want_parts);
                    }
                    break;
                }
            }
        }
        let reports: Vec<Report> = reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| self.failed(i, Failure::Deadline, started.elapsed())))
            .collect();
        self.respond(&reports, want_parts)
    }

    fn skipped(&self, i: usize) -> Report {
        let part = &self.plan.parts[i];
        Report {
            // In the document, a skipped part holds its fallback, so the shape is stable.
            value: part.enrich.is_none().then(|| part.fallback.clone()),
            raw: None,
            failure: None,
            status: None,
            elapsed: Duration::ZERO,
            via: None,
            skipped: true,
        }
    }

    /// Builds part `i`'s request from the context.
    fn request(
        &self,
        i: usize,
        cx: &Context<'_>,
        inc: &Incoming<'_>,
        passed: &Passed,
    ) -> Result<PartRequest, Unresolved> {
        let part = &self.plan.parts[i];
        let path = part.path.render(cx, Encoding::Path)?;
        let mut q = form_urlencoded::Serializer::new(String::new());
        let mut any = false;
        if part.cfg.forward_query {
            // The client's parameters, except those the configuration sets: a client must
            // not be able to put `?user=someone-else` ahead of `user: "{claims.sub}"`.
            for (k, v) in cx.query {
                if !part.query.iter().any(|(name, _)| name == k) {
                    q.append_pair(k, v);
                    any = true;
                }
            }
        }
        for (k, t) in &part.query {
            match t.render(cx, Encoding::Raw) {
                Ok(v) => {
                    q.append_pair(k, &v);
                    any = true;
                }
                // An optional client input that is absent leaves its parameter out; any
                // other missing value (a claim, a field of another part) fails the part
                // rather than widening the backend's query.
                Err(Unresolved::Missing { .. }) if t.client_only() => {}
                Err(e) => return Err(e),
            }
        }
        let pq = if any {
            format!("{path}?{}", q.finish())
        } else {
            path
        };
        // Taken as it is (no copy); checked as a path and query.
        let path_and_query =
            http::uri::PathAndQuery::from_maybe_shared(Bytes::from(pq)).map_err(|_| {
                Unresolved::Missing {
                    what: "(the path of the part)".into(),
                    client: true,
                }
            })?;
        let mut headers = PartHeaders::new();
        headers.push((header::ACCEPT, HeaderValue::from_static("application/json")));
        for (name, t) in &part.headers {
            let v = t.render(cx, Encoding::Raw)?;
            let v = HeaderValue::from_str(&v).map_err(|_| Unresolved::Missing {
                what: format!("(header `{name}` value)"),
                client: true,
            })?;
            set(&mut headers, name.clone(), v);
        }
        // The key: everything that shapes the answer, nothing per request.
        let mut key = String::with_capacity(64);
        key.push_str(path_and_query.as_str());
        for (name, value) in &headers {
            key.push('\n');
            key.push_str(name.as_str());
            key.push(':');
            key.push_str(value.to_str().unwrap_or(""));
        }
        if part.cfg.forward_identity
            && let Some(c) = &inc.caller
        {
            let id = HeaderValue::from_str(c.id).map_err(|_| Unresolved::Missing {
                what: "(caller id)".into(),
                client: false,
            })?;
            set(&mut headers, names::USER_ID.clone(), id);
            let roles = c.roles.join(",");
            if let Ok(v) = HeaderValue::from_str(&roles) {
                set(&mut headers, names::USER_ROLES.clone(), v);
            }
            // Answers are kept per caller and per roles: a demoted caller does not see
            // what it saw as an admin.
            key.push_str("\nuser:");
            key.push_str(c.id);
            key.push_str("\nroles:");
            key.push_str(&roles);
        }
        for (h, v) in PASSED.iter().zip(passed) {
            if let Some(v) = v {
                set(&mut headers, (*h).clone(), v.clone());
            }
        }
        Ok(PartRequest {
            path_and_query,
            headers,
            key: key.into(),
        })
    }

    /// Runs part `i`: through its cache and the calls in flight, within its timeout.
    fn run(
        &self,
        i: usize,
        req: PartRequest,
    ) -> impl Future<Output = (usize, Report)> + Send + 'static {
        let part = &self.plan.parts[i];
        let cache = self.caches[i].clone();
        let fallback = (!part.cfg.required).then(|| part.fallback.clone());
        let route = self.route.clone();
        let name = part.name.clone();
        let m = self.metrics[i].clone();
        let PartRequest {
            path_and_query,
            headers,
            key,
        } = req;
        let call = Call {
            cluster: self.clusters[i].clone(),
            path_and_query,
            headers,
            timeout: part.timeout,
            max: part.cfg.max_body_bytes,
            read: part.read.clone(),
            // Only a cached answer needs the backend's `Cache-Control`.
            cached: cache.stores(),
        };
        async move {
            let t0 = Instant::now();
            let (result, via) = cache.get(key, move || fetch(call)).await;
            let elapsed = t0.elapsed();
            m.cache[via as usize].increment(1);
            m.duration.record(elapsed.as_secs_f64());
            let report = match result {
                Ok(f) => {
                    let (value, raw) = match f.answer {
                        Answer::Parsed(v) => (Some(v), None),
                        Answer::Raw(b) => (None, Some(b)),
                    };
                    Report {
                        value,
                        raw,
                        failure: None,
                        status: Some(f.status),
                        elapsed,
                        via: Some(via),
                        skipped: false,
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        route = &*route,
                        part = &*name,
                        error = e.describe(),
                        "aggregate part failed"
                    );
                    Report {
                        status: match &e {
                            Failure::Status(s, _) => Some(s.as_u16()),
                            _ => None,
                        },
                        value: fallback,
                        raw: None,
                        failure: Some(e),
                        elapsed,
                        via: Some(via),
                        skipped: false,
                    }
                }
            };
            (i, report)
        }
    }

    fn failed(&self, i: usize, failure: Failure, elapsed: Duration) -> Report {
        let part = &self.plan.parts[i];
        Report {
            value: (!part.cfg.required).then(|| part.fallback.clone()),
            raw: None,
            status: None,
            failure: Some(failure),
            elapsed,
            via: None,
            skipped: false,
        }
    }

    fn parts_section<'r>(&self, reports: impl Iterator<Item = Option<&'r Report>>) -> Value {
        let mut m = Map::new();
        for (part, r) in self.plan.parts.iter().zip(reports) {
            let v = match r {
                None => serde_json::json!({ "outcome": "cancelled" }),
                Some(r) => {
                    let outcome = if r.skipped {
                        "skipped"
                    } else if r.failure.is_none() {
                        "ok"
                    } else if part.cfg.required {
                        "failed"
                    } else {
                        "fallback"
                    };
                    let mut o = Map::new();
                    o.insert("outcome".into(), outcome.into());
                    if let Some(s) = r.status {
                        o.insert("status".into(), s.into());
                    }
                    o.insert(
                        "ms".into(),
                        ((r.elapsed.as_secs_f64() * 1e4).round() / 10.0).into(),
                    );
                    if let Some(via) = r.via {
                        o.insert("cache".into(), via.as_str().into());
                    }
                    if let Some(f) = &r.failure {
                        o.insert("error".into(), f.describe().into());
                    }
                    Value::Object(o)
                }
            };
            m.insert(part.cfg.name.clone(), v);
        }
        Value::Object(m)
    }

    fn required_failed(
        &self,
        i: usize,
        reports: &[Option<Report>],
        want_parts: bool,
    ) -> Response<Body> {
        let part = &self.plan.parts[i];
        let failure = reports[i]
            .as_ref()
            .and_then(|r| r.failure.clone())
            .unwrap_or(Failure::Unreachable);
        self.metrics[i].failed.increment(1);
        if failure.is_timeout() {
            self.metrics[i].timeouts.increment(1);
        }
        let name = &part.cfg.name;
        let mut p = match &failure {
            Failure::Timeout => Problem::gateway_timeout(format!(
                "part `{name}` did not answer within {} ms",
                part.cfg.timeout_ms
            )),
            Failure::Deadline => Problem::gateway_timeout(format!(
                "part `{name}` had not answered when the request's deadline passed"
            )),
            Failure::NoEndpoint => Problem::unavailable(format!(
                "part `{name}`: no healthy upstream endpoint; retry shortly"
            )),
            Failure::Unresolved { what, client: true } => Problem::bad_request(format!(
                "part `{name}` needs {what}, which the request lacks or has in a form that cannot be used"
            )),
            // What the client can act on passes through (an unknown product stays a 404);
            // anything else (401 without its challenge, 429 without its Retry-After, …) is
            // the backend's business: 502.
            Failure::Status(s, detail) if matches!(s.as_u16(), 400 | 403 | 404 | 409 | 410 | 422) => Problem::typed(
                *s,
                "part-refused",
                s.canonical_reason().unwrap_or("Client error"),
            )
            .detail(match detail {
                Some(d) => format!("part `{name}`: {d}"),
                None => format!("part `{name}` answered {}", s.as_u16()),
            }),
            other => Problem::bad_gateway(format!("part `{name}` failed: {}", other.describe())),
        }
        .with("part", name.as_str());
        if want_parts {
            p = p.with(
                "_parts",
                self.parts_section(reports.iter().map(Option::as_ref)),
            );
        }
        crate::wire::problem(p)
    }

    /// Merges the parts into one document.
    fn respond(&self, reports: &[Report], want_parts: bool) -> Response<Body> {
        // Keys borrowed from the plan where they are its names, owned only when they come
        // from an answer's fields.
        let mut doc: BTreeMap<Cow<'_, str>, Out<'_>> = BTreeMap::new();
        let mut failed: Vec<&str> = Vec::new();
        for ((part, r), m) in self.plan.parts.iter().zip(reports).zip(&self.metrics) {
            if r.skipped {
                m.skipped.increment(1);
            } else if let Some(f) = &r.failure {
                failed.push(&part.cfg.name);
                m.fallback.increment(1);
                if f.is_timeout() {
                    m.timeouts.increment(1);
                }
            } else {
                m.ok.increment(1);
            }
            if part.enrich.is_some() {
                continue;
            }
            let out = if let Some(raw) = &r.raw {
                // Validated (and extracted) when it arrived; borrowed, not copied.
                Out::Raw(raw)
            } else if let Some(value) = &r.value {
                Out::Value(if r.failure.is_some() {
                    (**value).clone()
                } else {
                    shape(part, value)
                })
            } else {
                continue;
            };
            // A part never overwrites what an earlier part put in the document.
            match (&part.place, out) {
                (Place::Root, Out::Value(Value::Object(m))) => {
                    for (k, v) in m {
                        doc.entry(Cow::Owned(k)).or_insert(Out::Value(v));
                    }
                }
                (Place::Root, other) => {
                    doc.entry(Cow::Borrowed(part.cfg.name.as_str()))
                        .or_insert(other);
                }
                (Place::At(path), out) => put(&mut doc, path, out),
            }
        }
        for (part, r) in self.plan.parts.iter().zip(reports) {
            if let Some(e) = &part.enrich {
                enrich(&mut doc, part, e, r);
            }
        }
        let complete = failed.is_empty();
        if want_parts {
            doc.insert(
                "_parts".into(),
                Out::Value(self.parts_section(reports.iter().map(Some))),
            );
        }
        // Sized for the answers copied as they came, so the buffer is rarely grown.
        let raw: usize = reports
            .iter()
            .filter_map(|r| r.raw.as_ref())
            .map(|r| r.get().len())
            .sum();
        let mut body = Vec::with_capacity(raw + 256);
        if serde_json::to_writer(&mut body, &doc).is_err() {
            body = b"{}".to_vec();
        }
        let mut res = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            COMPLETE_HEADER,
            HeaderValue::from_static(if complete { "true" } else { "false" }),
        );
        if !complete && let Ok(v) = HeaderValue::from_str(&failed.join(",")) {
            h.insert(FAILED_HEADER, v);
        }
        res
    }
}

/// The merged document: parsed values, answers copied as they came, and the objects that
/// `into` paths create.
#[derive(Serialize)]
#[serde(untagged)]
enum Out<'a> {
    Raw(&'a RawValue),
    Value(Value),
    Object(BTreeMap<Cow<'a, str>, Out<'a>>),
}

/// One backend call of a part.
struct Call {
    cluster: Arc<Cluster>,
    path_and_query: http::uri::PathAndQuery,
    headers: PartHeaders,
    timeout: Duration,
    /// The largest answer read.
    max: usize,
    read: Read,
    /// The answer may be cached (its `Cache-Control` is read).
    cached: bool,
}

impl Call {
    /// The request, made anew for each attempt.
    fn request(&self, uri: Uri) -> Request<Body> {
        let mut req = Request::new(empty());
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        // Room for `Host` too, which a kept connection adds.
        h.reserve(self.headers.len() + 1);
        for (name, value) in &self.headers {
            h.insert(name.clone(), value.clone());
        }
        req
    }
}

/// One backend call: pick an endpoint, send, read a bounded JSON answer, all within
/// `timeout`; the endpoint's breaker learns the outcome.
async fn fetch(call: Call) -> Result<Fetched, Failure> {
    let Call {
        ref cluster,
        ref path_and_query,
        timeout,
        max,
        ref read,
        cached,
        ..
    } = call;
    let Some(lease) = cluster.pick(None, None) else {
        return Err(Failure::NoEndpoint);
    };
    // The answer whole, within `max` bytes.
    let whole = |res: Response<hyper::body::Incoming>| async move {
        let (parts, body) = res.into_parts();
        let bytes = Limited::new(body, max)
            .collect()
            .await
            .map_err(|_| Failure::Invalid("the answer is too large or broken"))?
            .to_bytes();
        Ok::<_, Failure>((parts.status, parts.headers, bytes))
    };
    let call = async {
        if cluster.version() == http::Version::HTTP_11 {
            // This worker's own connections to the endpoint (see `upstream`).
            let ep = &lease.endpoint;
            let build = || call.request(Uri::from(path_and_query.clone()));
            let (res, conn) = ep
                .kept
                .send(&cluster.connector, &cluster.upstream, build(), || {
                    Some(build())
                })
                .await
                .map_err(|_| Failure::Unreachable)?;
            let answer = whole(res).await?;
            ep.kept.keep(conn, &cluster.upstream);
            return Ok(answer);
        }
        let uri = Uri::builder()
            .scheme(lease.endpoint.scheme.clone())
            .authority(lease.endpoint.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|_| Failure::Invalid("the request is not valid"))?;
        let res = cluster
            .client()
            .request(call.request(uri))
            .await
            .map_err(|_| Failure::Unreachable)?;
        whole(res).await
    };
    let (status, headers, bytes) = match tokio::time::timeout(timeout, call).await {
        Err(_) => {
            lease.finish(false);
            return Err(Failure::Timeout);
        }
        Ok(Err(e)) => {
            lease.finish(false);
            return Err(e);
        }
        Ok(Ok(answer)) => answer,
    };
    lease.finish(!status.is_server_error());
    if !status.is_success() {
        let detail = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned));
        return Err(Failure::Status(status, detail));
    }
    let not_json = |_| Failure::Invalid("the answer is not JSON");
    // Checked (whole, UTF-8, one JSON value) without building a tree where none is needed;
    // what is kept is a right-sized copy (the body may be a slice of a much larger read
    // buffer, which a cached answer would otherwise keep alive).
    let answer = match read {
        Read::Tree => Answer::Parsed(Arc::new(serde_json::from_slice(&bytes).map_err(not_json)?)),
        Read::Raw => Answer::Raw(Arc::from(
            serde_json::from_slice::<Box<RawValue>>(&bytes).map_err(not_json)?,
        )),
        Read::RawAt(path) => {
            let whole = serde_json::from_slice::<&RawValue>(&bytes).map_err(not_json)?;
            let at = raw_at(whole, path).map_err(not_json)?;
            Answer::Raw(Arc::from(at.unwrap_or(RawValue::NULL).to_owned()))
        }
    };
    Ok(Fetched {
        status: status.as_u16(),
        size: bytes.len(),
        answer,
        max_age: if cached { max_age(&headers) } else { None },
    })
}

/// What `Cache-Control` allows: `None` for `no-store`, `no-cache` or `private`; the
/// `s-maxage` or `max-age` when given; otherwise unlimited (the configured TTL applies).
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut age = Duration::MAX;
    let mut shared_age = None;
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { return None };
        for directive in v.split(',') {
            let d = directive.trim().to_ascii_lowercase();
            if d == "no-store" || d == "no-cache" || d == "private" {
                return None;
            }
            if let Some(secs) = d.strip_prefix("max-age=") {
                age = Duration::from_secs(secs.trim_matches('"').parse().ok()?);
            } else if let Some(secs) = d.strip_prefix("s-maxage=") {
                shared_age = Some(Duration::from_secs(secs.trim_matches('"').parse().ok()?));
            }
        }
    }
    Some(shared_age.unwrap_or(age))
}

/// Applies `extract`, `fields` and `rename`, copying only what is kept.
fn shape(part: &PartPlan, value: &Value) -> Value {
    let v = match &part.extract {
        Some(path) => match get(value, path) {
            Some(v) => v,
            None => return Value::Null,
        },
        None => value,
    };
    if part.cfg.fields.is_empty() && part.cfg.rename.is_empty() {
        return v.clone();
    }
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|i| select(part, i)).collect()),
        other => select(part, other),
    }
}

fn select(part: &PartPlan, v: &Value) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    let mut out: Map<String, Value> = if part.cfg.fields.is_empty() {
        m.clone()
    } else {
        part.cfg
            .fields
            .iter()
            .filter_map(|f| Some((f.clone(), m.get(f)?.clone())))
            .collect()
    };
    for (from, to) in &part.cfg.rename {
        if let Some(x) = out.remove(from) {
            out.insert(to.clone(), x);
        }
    }
    Value::Object(out)
}

fn get<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, step| match v {
        Value::Object(m) => m.get(step),
        Value::Array(a) => a.get(step.parse::<usize>().ok()?),
        _ => None,
    })
}

/// What [`get`] finds, read from the answer's text without building a tree: the value at
/// `path` as it came (`None` where the path leads nowhere).
fn raw_at<'a>(
    mut at: &'a RawValue,
    path: &[String],
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    use serde::Deserializer as _;
    for step in path {
        let text = at.get();
        let mut de = serde_json::Deserializer::from_str(text);
        let found = match text.trim_start().as_bytes().first() {
            Some(b'{') => de.deserialize_map(Find::Key(step))?,
            Some(b'[') => match step.parse::<usize>() {
                Ok(n) => de.deserialize_seq(Find::Index(n))?,
                Err(_) => None,
            },
            _ => None,
        };
        match found {
            Some(v) => at = v,
            None => return Ok(None),
        }
    }
    Ok(Some(at))
}

/// One step of [`raw_at`]: an object's member (the last of that name, as [`Value`] keeps
/// it) or an array's element, borrowed from the text; everything else is skipped.
enum Find<'k> {
    Key(&'k str),
    Index(usize),
}

impl<'de> serde::de::Visitor<'de> for Find<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Find::Key(want) = self else {
            return Ok(None);
        };
        let mut found = None;
        while let Some(hit) = map.next_key_seed(KeyIs(want))? {
            if hit {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Find::Index(want) = self else {
            return Ok(None);
        };
        let mut found = None;
        let mut i = 0;
        loop {
            if i == want {
                match seq.next_element::<&'de RawValue>()? {
                    Some(v) => found = Some(v),
                    None => break,
                }
            } else if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }
}

/// Whether an object's key is the one wanted (escaped or not, without keeping it).
struct KeyIs<'k>(&'k str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

fn put<'a>(doc: &mut BTreeMap<Cow<'a, str>, Out<'a>>, path: &'a [String], value: Out<'a>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = doc;
    for step in parents {
        let slot = at
            .entry(Cow::Borrowed(step.as_str()))
            .or_insert_with(|| Out::Object(BTreeMap::new()));
        // Something else is already there: it stays.
        let Out::Object(m) = slot else { return };
        at = m;
    }
    at.entry(Cow::Borrowed(last.as_str())).or_insert(value);
}

/// The text of a scalar used as a join key.
fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Joins a batch answer into the elements of the `each` array of the document.
fn enrich<'a>(doc: &mut BTreeMap<Cow<'a, str>, Out<'a>>, part: &PartPlan, e: &Enrich, r: &Report) {
    // Down the objects `into` paths made, then into a parsed value (with an `enrich` part
    // in the composite, every answer is parsed).
    let mut steps = e.each.iter();
    let mut out_map = doc;
    let mut value: Option<&mut Value> = None;
    for step in steps.by_ref() {
        match out_map.get_mut(step.as_str()) {
            Some(Out::Object(m)) => out_map = m,
            Some(Out::Value(v)) => {
                value = Some(v);
                break;
            }
            _ => return,
        }
    }
    let mut target = value;
    for step in steps {
        target = match target {
            Some(Value::Object(m)) => m.get_mut(step),
            _ => None,
        };
    }
    let Some(Value::Array(items)) = target else {
        return;
    };
    let fallback = &*part.fallback;
    let by_key: HashMap<String, Value> = match (&r.failure, &r.value) {
        (None, Some(v)) => shape_each(part, &e.by, v).unwrap_or_default(),
        _ => HashMap::new(),
    };
    for item in items.iter_mut() {
        let Value::Object(m) = item else { continue };
        let found = m
            .get(&e.key)
            .and_then(key_text)
            .and_then(|k| by_key.get(&k).cloned());
        m.insert(e.into.clone(), found.unwrap_or_else(|| fallback.clone()));
    }
}

/// The part's answer as its elements, each shaped, by the text of their `by` field.
fn shape_each(part: &PartPlan, by: &str, value: &Value) -> Option<HashMap<String, Value>> {
    let list = match &part.extract {
        Some(path) => get(value, path)?,
        None => value,
    };
    Some(
        list.as_array()?
            .iter()
            .filter_map(|item| Some((key_text(item.get(by)?)?, select(part, item))))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str, template: Option<&str>) -> Result<Plan, String> {
        let cfg: AggregateConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        Plan::compile(&cfg, &|c| c == "a" || c == "b", template)
    }

    #[test]
    fn graph_is_checked() {
        let cycle = "parts:\n- {name: x, cluster: a, path: '/x/{y.id}'}\n- {name: y, cluster: a, path: '/y', query: {q: '{x.id}'}}\n- {name: z, cluster: a, path: /z}\n";
        let e = compile(cycle, None).unwrap_err();
        assert!(
            e.contains("cycle") && e.contains("`x`") && e.contains("`y`") && !e.contains("`z`"),
            "{e}"
        );
        let selfref = "parts:\n- {name: x, cluster: a, path: '/x/{x.id}'}\n";
        assert!(compile(selfref, None).unwrap_err().contains("cycle"));
        let unknown = "parts:\n- {name: x, cluster: a, path: '/x/{nope.id}'}\n";
        assert!(
            compile(unknown, None)
                .unwrap_err()
                .contains("neither a part")
        );
        let param = "parts:\n- {name: x, cluster: a, path: '/x/{path.id}'}\n";
        assert!(
            compile(param, None)
                .unwrap_err()
                .contains("no parameter `id`")
        );
        assert!(compile(param, Some("/p/{id}")).is_ok());
        let cluster = "parts:\n- {name: x, cluster: c, path: /x}\n";
        assert!(
            compile(cluster, None)
                .unwrap_err()
                .contains("unknown cluster `c`")
        );
        let dup = "parts:\n- {name: x, cluster: a, path: /x}\n- {name: x, cluster: b, path: /y}\n";
        assert!(compile(dup, None).unwrap_err().contains("duplicate"));
        let into = "parts:\n- {name: x, cluster: a, path: /x, into: d}\n- {name: y, cluster: b, path: /y, into: d}\n";
        assert!(compile(into, None).unwrap_err().contains("overlaps"));
        let nested = "parts:\n- {name: x, cluster: a, path: /x, into: d.e}\n- {name: y, cluster: b, path: /y, into: d}\n";
        assert!(
            compile(nested, None)
                .unwrap_err()
                .contains("overlaps another part's `d.e`")
        );
        let sibling = "parts:\n- {name: x, cluster: a, path: /x, into: d.e}\n- {name: y, cluster: b, path: /y, into: d.ee}\n";
        assert!(compile(sibling, None).is_ok());
        let reserved = "parts:\n- {name: query, cluster: a, path: /x}\n";
        assert!(compile(reserved, None).unwrap_err().contains("reserved"));
        let spoof =
            "parts:\n- {name: x, cluster: a, path: /x, headers: {x-shopmesh-user: admin}}\n";
        assert!(compile(spoof, None).unwrap_err().contains("cannot be set"));
        let order = "parts:\n- {name: c, cluster: a, path: '/c/{b.id}'}\n- {name: b, cluster: a, path: '/b/{a.id}'}\n- {name: a, cluster: a, path: /a}\n";
        let plan = compile(order, None).unwrap();
        assert_eq!(plan.parts[0].deps, vec![1]);
        assert_eq!(plan.parts[1].deps, vec![2]);
    }

    #[test]
    fn cache_control() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CACHE_CONTROL, v.parse().unwrap());
            m
        };
        assert_eq!(max_age(&HeaderMap::new()), Some(Duration::MAX));
        assert_eq!(
            max_age(&h("public, max-age=5")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            max_age(&h("max-age=5, s-maxage=2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(max_age(&h("no-store")), None);
        assert_eq!(max_age(&h("private, max-age=60")), None);
        assert_eq!(max_age(&h("max-age=banana")), None);
    }

    #[test]
    fn extracting_from_the_text_finds_what_the_tree_would() {
        let text = r#" {"a": {"items": [1, {"b": "x\"y"}, [3]], "n": null}, "a\u0062": 7, "dup": 1, "dup": 2} "#;
        let raw = serde_json::from_str::<&RawValue>(text).unwrap();
        let tree: Value = serde_json::from_str(text).unwrap();
        for path in [
            "a",
            "a.items",
            "a.items.1",
            "a.items.1.b",
            "a.items.2.0",
            "a.n",
            "ab",
            "dup",
            "a.items.9",
            "a.items.x",
            "a.n.deeper",
            "missing",
            "a.items.1.b.c",
        ] {
            let steps = dotted(path).unwrap();
            let from_text = raw_at(raw, &steps)
                .unwrap()
                .map(|v| serde_json::from_str::<Value>(v.get()).unwrap());
            assert_eq!(from_text.as_ref(), get(&tree, &steps), "{path}");
        }
        // Kept as it came, not re-serialised.
        let spaced = serde_json::from_str::<&RawValue>(r#"{"items": [ 1,  2 ]}"#).unwrap();
        assert_eq!(
            raw_at(spaced, &["items".into()]).unwrap().unwrap().get(),
            "[ 1,  2 ]"
        );
        // A part whose answer is only extracted is not parsed into a tree.
        let plan = compile(
            "parts:\n- {name: p, cluster: a, path: /p, extract: items}\n- {name: q, cluster: a, path: /q, extract: items, fields: [id]}\n",
            None,
        )
        .unwrap();
        assert_eq!(plan.parts[0].read, Read::RawAt(["items".to_owned()].into()));
        assert_eq!(plan.parts[1].read, Read::Tree);
    }

    #[test]
    fn shaping_and_joining() {
        let plan = compile(
            "parts:\n- {name: p, cluster: a, path: /p, extract: data, fields: [id, name], rename: {name: title}}\n- {name: e, cluster: a, path: /e, extract: items, fields: [amount], enrich: {each: list.items, key: id, by: pid, into: price}, fallback: 0}\n",
            None,
        )
        .unwrap();
        let v = serde_json::json!({"data": {"id": 1, "name": "n", "secret": true}});
        assert_eq!(
            shape(&plan.parts[0], &v),
            serde_json::json!({"id": 1, "title": "n"})
        );
        let items: [String; 2] = ["list".into(), "items".into()];
        let raw_at: [String; 2] = ["list".into(), "raw".into()];
        let mut doc = BTreeMap::new();
        put(
            &mut doc,
            &items,
            Out::Value(serde_json::json!([{"id": "a"}, {"id": "b"}, {"id": 3}])),
        );
        let raw = serde_json::from_str::<&RawValue>(r#"{"kept": [1, 2]}"#).unwrap();
        put(&mut doc, &raw_at, Out::Raw(raw));
        let report = Report {
            raw: None,
            value: Some(Arc::new(serde_json::json!({"items": [
                {"pid": "a", "amount": 10, "x": 1}, {"pid": 3, "amount": 30}
            ]}))),
            failure: None,
            status: Some(200),
            elapsed: Duration::ZERO,
            via: None,
            skipped: false,
        };
        let e = plan.parts[1].enrich.as_ref().unwrap();
        enrich(&mut doc, &plan.parts[1], e, &report);
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            serde_json::json!({"list": {"items": [
                {"id": "a", "price": {"amount": 10}},
                {"id": "b", "price": 0},
                {"id": 3, "price": {"amount": 30}}
            ], "raw": {"kept": [1, 2]}}})
        );
    }
}
