//! The gateway as one tower [`Service`]: route, authenticate, forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use shopmesh_platform::TRUSTED_HEADER_PREFIX;
use shopmesh_platform::problem::Problem;
use tower::Service;
use tracing::Instrument;

use crate::aggregate::{CallerView, Incoming};
use crate::config::{ConfigError, GatewayConfig, HashOn, RateLimitKey};
use crate::jwt::AuthError;
use crate::ratelimit::Decision;
use crate::runtime::{Runtime, Target};
use crate::server::ConnInfo;
use crate::traffic::cookie;
use hyper_util::rt::TokioIo;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the gateway.
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The peer address of the connection a request came on (set by the server loop).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The gateway service: a handle on the serving configuration generation. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<Runtime>,
    /// Serialises reloads.
    reload: std::sync::Mutex<ReloadState>,
}

#[derive(Default)]
struct ReloadState {
    next_version: u64,
    last_error: Option<String>,
    last_attempt: Option<SystemTime>,
}

/// What the admin API reports about configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigStatus {
    pub version: u64,
    pub loaded_at_unix: u64,
    pub last_error: Option<String>,
    pub last_attempt_unix: Option<u64>,
}

impl Gateway {
    /// Builds the first generation and starts its health checks. Needs a tokio runtime.
    pub fn new(cfg: GatewayConfig) -> Result<Self, ConfigError> {
        let rt = Runtime::build(cfg, 1, None)?;
        rt.start();
        Ok(Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(rt),
                reload: std::sync::Mutex::new(ReloadState {
                    next_version: 2,
                    ..Default::default()
                }),
            }),
        })
    }

    /// The serving generation.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.current.load_full()
    }

    /// Builds and validates `cfg` next to the serving generation, then swaps it in. When it
    /// is invalid nothing changes and the error is kept for the admin API.
    pub fn apply(&self, cfg: GatewayConfig) -> Result<u64, ConfigError> {
        let mut st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        st.last_attempt = Some(SystemTime::now());
        let old = self.shared.current.load_full();
        let mut cfg = cfg;
        if cfg.listen != old.config.listen
            || cfg.admin.listen != old.config.admin.listen
            || cfg.workers != old.config.workers
        {
            tracing::warn!(
                "listen addresses and workers change only on restart; the rest is applied"
            );
            // Validated against what is bound: an exposed admin port keeps needing a token.
            cfg.listen = old.config.listen;
            cfg.admin.listen = old.config.admin.listen;
            cfg.workers = old.config.workers;
        }
        let (l, o) = (&cfg.limits, &old.config.limits);
        if (
            l.header_read_timeout_ms,
            l.max_headers,
            l.max_header_bytes,
            l.max_connections,
            l.max_concurrent_streams,
        ) != (
            o.header_read_timeout_ms,
            o.max_headers,
            o.max_header_bytes,
            o.max_connections,
            o.max_concurrent_streams,
        ) {
            tracing::warn!(
                "limits on connections and request heads change only on restart; body limits and the rest are applied"
            );
        }
        let built = if cfg.tls.is_some() != old.config.tls.is_some() {
            // Clients of a TLS port would be served in the clear, or the other way round.
            Err(ConfigError::Invalid(
                "tls can be turned on or off only by a restart (certificates reload)".into(),
            ))
        } else {
            Runtime::build(cfg, st.next_version, Some(&old))
        };
        match built {
            Ok(rt) => {
                let version = rt.version;
                st.next_version += 1;
                st.last_error = None;
                // The old generation's health checks stop first (the endpoints they probe
                // may be kept); its requests still finish.
                old.stop.cancel();
                rt.start();
                self.shared.current.store(Arc::new(rt));
                metrics::counter!("gateway_config_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("gateway_config_version").set(version as f64);
                tracing::info!(version, "configuration applied");
                Ok(version)
            }
            Err(e) => {
                st.last_error = Some(e.to_string());
                metrics::counter!("gateway_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration refused; the previous one keeps serving");
                Err(e)
            }
        }
    }

    /// Reads, validates and applies a configuration file.
    pub fn reload_file(&self, path: &std::path::Path) -> Result<u64, ConfigError> {
        match GatewayConfig::from_file(path) {
            Ok(cfg) => self.apply(cfg),
            Err(e) => {
                let mut st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
                st.last_attempt = Some(SystemTime::now());
                st.last_error = Some(e.to_string());
                metrics::counter!("gateway_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration refused; the previous one keeps serving");
                Err(e)
            }
        }
    }

    pub fn status(&self) -> ConfigStatus {
        let rt = self.runtime();
        let st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        ConfigStatus {
            version: rt.version,
            loaded_at_unix: unix(rt.loaded_at),
            last_error: st.last_error.clone(),
            last_attempt_unix: st.last_attempt.map(unix),
        }
    }
}

impl<B> Service<Request<B>> for Gateway
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let rt = self.shared.current.load_full();
        Box::pin(async move { Ok(handle(rt, req.map(|b| b.map_err(Into::into).boxed())).await) })
    }
}

/// Request ids from clients are kept when they are short and printable; otherwise replaced.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&names::REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated();
            HeaderValue::from_bytes(id.encode_lower(&mut buf).as_bytes())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        })
}

/// W3C trace context for the upstream hop: the client's trace continues (with this hop as
/// the parent span), or a new trace starts. Returns the header and the trace id.
fn traceparent(headers: &HeaderMap) -> (HeaderValue, String) {
    fn hex(s: &[u8]) -> bool {
        s.iter().all(u8::is_ascii_hexdigit)
    }
    // `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, 55 bytes.
    let incoming = headers
        .get(&names::TRACEPARENT)
        .map(HeaderValue::as_bytes)
        .filter(|v| {
            v.len() == 55
                && v.starts_with(b"00-")
                && v[35] == b'-'
                && v[52] == b'-'
                && hex(&v[3..35])
                && &v[3..35] != b"00000000000000000000000000000000"
                && hex(&v[36..52])
                && hex(&v[53..55])
        });
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming {
        Some(v) => {
            value[3..35].copy_from_slice(&v[3..35]);
            value[3..35].make_ascii_lowercase();
            value[53..55].copy_from_slice(&v[53..55]);
        }
        None => {
            uuid::Uuid::new_v4()
                .simple()
                .encode_lower(&mut value[3..35]);
        }
    }
    let mut span_id = [0u8; 32];
    uuid::Uuid::new_v4().simple().encode_lower(&mut span_id);
    value[36..52].copy_from_slice(&span_id[..16]);
    let trace_id = String::from_utf8_lossy(&value[3..35]).into_owned();
    (
        HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static("")),
        trace_id,
    )
}

/// What one request did, for metrics and the access log.
struct Outcome {
    route: Arc<str>,
    cluster: Option<Arc<str>>,
    variant: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
    caller: Option<String>,
    attempts: u32,
}

impl Outcome {
    fn new(route: Arc<str>) -> Self {
        Self {
            route,
            cluster: None,
            variant: None,
            endpoint: None,
            caller: None,
            attempts: 0,
        }
    }
}

async fn handle(rt: Arc<Runtime>, mut req: Request<Body>) -> Response<Body> {
    let start = Instant::now();
    // What survives the hop-by-hop cleaning: a WebSocket upgrade (HTTP/1.1 `GET` asking
    // for exactly `websocket`, with its key; honoured only on routes that allow it) and
    // gRPC's `te: trailers`.
    let websocket = req.version() == http::Version::HTTP_11
        && req.method() == http::Method::GET
        && connection_has(req.headers(), "upgrade")
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && req.headers().contains_key(header::SEC_WEBSOCKET_KEY);
    let te_trailers = req
        .headers()
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // First, so that a client's `Connection: <name>` cannot remove what the gateway adds.
    strip_hop_by_hop(req.headers_mut());
    if te_trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let rid = request_id(req.headers());
    req.headers_mut()
        .insert(names::REQUEST_ID.clone(), rid.clone());
    let method = req.method().clone();
    // The path as the client sent it, for the span and the access log (a shared copy).
    let uri = req.uri().clone();
    // Exported when OpenTelemetry is on (a child of the client's `traceparent`); otherwise
    // not made at all (the registry would still track it): the access log carries the
    // request's fields.
    let span = if !shopmesh_platform::otel::active() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        target: shopmesh_platform::otel::SPAN_TARGET,
        "gateway",
        otel.name = %format_args!("{method} {}", uri.path()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        url.path = %uri.path(),
        request_id = rid.to_str().unwrap_or(""),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        )
    };
    shopmesh_platform::otel::link_parent(
        &span,
        req.headers()
            .get(&names::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let (tp, trace_id) = match shopmesh_platform::otel::traceparent(&span)
        .and_then(|t| Some((HeaderValue::from_str(&t).ok()?, t)))
    {
        Some((value, text)) => (value, text[3..35].to_owned()),
        None => traceparent(req.headers()),
    };
    req.headers_mut().insert(names::TRACEPARENT.clone(), tp);
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|a| Sender::of(&rt, a.0.ip(), req.headers()));
    let client_ip = client.map(|c| c.ip);
    let (outcome, mut res) = route_and_forward(&rt, req, client, websocket)
        .instrument(span.clone())
        .await;
    res.headers_mut()
        .insert(names::REQUEST_ID.clone(), rid.clone());
    let status = res.status().as_u16();
    span.record("http.route", &*outcome.route);
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let elapsed = start.elapsed();
    rt.request_metrics.record(
        &crate::observe::Labels {
            route: &outcome.route,
            variant: outcome.variant.as_ref(),
            cluster: outcome.cluster.as_ref(),
            endpoint: outcome.endpoint.as_ref(),
            status,
        },
        elapsed.as_secs_f64(),
    );
    if rt.config.access_log {
        tracing::info!(
            target: "shopmesh::access",
            client = %client_ip.map(|i| i.to_string()).unwrap_or_default(),
            method = %method,
            path = %uri.path(),
            status,
            route = &*outcome.route,
            variant = outcome.variant.as_deref().unwrap_or(""),
            cluster = outcome.cluster.as_deref().unwrap_or(""),
            endpoint = outcome.endpoint.as_deref().unwrap_or(""),
            attempts = outcome.attempts,
            caller = outcome.caller.as_deref().unwrap_or(""),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            request_id = rid.to_str().unwrap_or(""),
            trace_id = %trace_id,
        );
    }
    res
}

/// Who sent a request: the connection's peer, whether it is a trusted proxy, and the
/// client's address (worked out once per request).
#[derive(Clone, Copy)]
struct Sender {
    peer: IpAddr,
    trusted: bool,
    ip: IpAddr,
}

impl Sender {
    fn of(rt: &Runtime, peer: IpAddr, headers: &HeaderMap) -> Self {
        let trusted = rt.is_trusted(peer);
        let ip = if trusted {
            client_ip(rt, peer, headers)
        } else {
            peer
        };
        Sender { peer, trusted, ip }
    }
}

/// Behind a trusted proxy, the first address from the right of `X-Forwarded-For` that is not
/// a trusted proxy.
fn client_ip(rt: &Runtime, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut ip = peer;
    let hops: Vec<&str> = headers
        .get_all(&names::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let hop = hop.trim();
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()));
        match parsed {
            Ok(addr) => {
                ip = addr;
                if !rt.is_trusted(addr) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ip
}

pub(crate) fn problem(p: Problem) -> Response<Body> {
    let mut res = Response::new(full(p.to_body()));
    *res.status_mut() = p.status;
    for (name, value) in p.headers() {
        res.headers_mut().insert(name, value);
    }
    res
}

/// Header names the proxy and the composites set on every request, parsed once (a `&str`
/// name is parsed and validated on every map operation).
pub(crate) mod names {
    use http::HeaderName;
    pub static REQUEST_ID: HeaderName =
        HeaderName::from_static(shopmesh_platform::REQUEST_ID_HEADER);
    pub static USER_ID: HeaderName = HeaderName::from_static(shopmesh_platform::USER_ID_HEADER);
    pub static USER_ROLES: HeaderName =
        HeaderName::from_static(shopmesh_platform::USER_ROLES_HEADER);
    pub static CLIENT_IP: HeaderName = HeaderName::from_static(shopmesh_platform::CLIENT_IP_HEADER);
    pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
/// (`Trailer` is end-to-end: HTTP/1.1 senders name the trailer fields in it.)
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Whether the `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine removals.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

fn auth_problem(e: &AuthError) -> Problem {
    match e {
        AuthError::KeysUnavailable(_) => {
            Problem::unavailable("the identity provider's keys cannot be fetched; retry shortly")
        }
        AuthError::Expired => Problem::unauthorized("the access token has expired"),
        AuthError::Revoked => Problem::unauthorized("the access token was revoked; sign in again"),
        _ => Problem::unauthorized("the access token is not valid"),
    }
}

/// The caller a request was authenticated as.
struct Caller {
    id: String,
    roles: Vec<String>,
    scopes: Vec<String>,
    api_key: Option<String>,
    /// The token's claims (none for an API key).
    claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

/// Verifies whatever credentials came with the request. `Ok(None)`: anonymous.
async fn authenticate(rt: &Runtime, req: &mut Request<Body>) -> Result<Option<Caller>, Problem> {
    // The key never goes upstream, whichever credential is used.
    let presented_key = rt
        .api_keys
        .as_ref()
        .and_then(|k| req.headers_mut().remove(&k.header));
    let bearer = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| {
            let (scheme, token) = s.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        }) {
            Some(t) if !t.is_empty() => Some(t.to_owned()),
            _ => {
                return Err(Problem::unauthorized(
                    "expected `Authorization: Bearer <token>`",
                ));
            }
        },
    };
    if let Some(token) = bearer {
        let Some(jwt) = &rt.jwt else {
            return Err(Problem::unauthorized("bearer tokens are not accepted here"));
        };
        return match jwt.verify(&token).await {
            Ok(id) => Ok(Some(Caller {
                id: id.subject,
                roles: id.roles,
                scopes: id.scopes,
                api_key: None,
                claims: Some(id.claims),
            })),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(auth_problem(&e))
            }
        };
    }
    if let Some(keys) = &rt.api_keys
        && let Some(presented) = presented_key
    {
        return match keys.find(presented.as_bytes()) {
            Some(k) => Ok(Some(Caller {
                id: format!("apikey:{}", k.name),
                roles: k.roles.clone(),
                scopes: Vec::new(),
                api_key: Some(k.name.clone()),
                claims: None,
            })),
            None => Err(Problem::unauthorized("the API key is not valid")),
        };
    }
    Ok(None)
}

/// The path and query sent upstream: `path` (normalised, maybe rewritten) and the client's
/// query. When `path` is what the client sent (the usual case) the client's own target is
/// reused, shared; but only when its text starts with that path: an absolute-form
/// `http://host?q` has the path `/` and the text `?q`, which an HTTP/2 upstream refuses.
fn upstream_target(uri: &Uri, path: String) -> Option<http::uri::PathAndQuery> {
    if path == uri.path()
        && let Some(pq) = uri
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
    {
        return Some(pq.clone());
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    http::uri::PathAndQuery::try_from(target).ok()
}

/// Methods a retry cannot turn into a second effect (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

fn rate_limit_headers(res: &mut Response<Body>, d: &Decision) {
    let h = res.headers_mut();
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert(
        "ratelimit-reset",
        HeaderValue::from(d.reset.as_secs_f64().ceil() as u64),
    );
}

async fn route_and_forward(
    rt: &Runtime,
    mut req: Request<Body>,
    client: Option<Sender>,
    websocket: bool,
) -> (Outcome, Response<Body>) {
    let client_ip = client.map(|c| c.ip);
    // 1. Nobody but the gateway speaks for the caller's identity.
    let spoofed: Vec<HeaderName> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with(TRUSTED_HEADER_PREFIX))
        .cloned()
        .collect();
    for k in spoofed {
        req.headers_mut().remove(k);
    }

    // 2. Normalise the path: what is matched is what is forwarded.
    let path = match crate::router::normalize(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            return (
                Outcome::new(rt.unmatched.clone()),
                problem(Problem::bad_request(e.to_string())),
            );
        }
    };

    // 3. Route.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let matched = crate::router::match_path(&path);
    let Some((route, params)) = rt.routes.iter().find_map(|r| {
        r.matcher
            .matches(req.method(), host, &matched, req.headers())
            .map(|params| (r, params))
    }) else {
        return (
            Outcome::new(rt.unmatched.clone()),
            problem(Problem::not_found("no route matches this request")),
        );
    };
    let mut outcome = Outcome::new(route.name.clone());
    if let Target::Cluster(c) = &route.target {
        outcome.cluster = Some(c.name.clone());
    }
    let tls = req.extensions().get::<ConnInfo>().is_some_and(|c| c.tls);

    // 4. Authenticate and authorise.
    let caller = match authenticate(rt, &mut req).await {
        Ok(c) => c,
        Err(p) => {
            metrics::counter!("gateway_auth_failures_total", "route" => route.name.clone())
                .increment(1);
            return (outcome, problem(p));
        }
    };
    match &caller {
        None if route.needs_identity() => {
            return (
                outcome,
                problem(Problem::unauthorized("credentials are required")),
            );
        }
        Some(c) => {
            if !route.auth.roles.is_empty() && !c.roles.iter().any(|r| route.auth.roles.contains(r))
            {
                outcome.caller = Some(c.id.clone());
                return (
                    outcome,
                    problem(Problem::forbidden(
                        "the caller lacks a role this route requires",
                    )),
                );
            }
            if !route.auth.scopes.iter().all(|s| c.scopes.contains(s)) {
                outcome.caller = Some(c.id.clone());
                return (
                    outcome,
                    problem(Problem::forbidden(
                        "the token lacks a scope this route requires",
                    )),
                );
            }
            let h = req.headers_mut();
            match HeaderValue::from_str(&c.id) {
                Ok(v) => h.insert(names::USER_ID.clone(), v),
                Err(_) => {
                    return (
                        outcome,
                        problem(Problem::unauthorized("the credentials are not valid")),
                    );
                }
            };
            if let Ok(v) = HeaderValue::from_str(&c.roles.join(",")) {
                h.insert(names::USER_ROLES.clone(), v);
            }
            outcome.caller = Some(c.id.clone());
        }
        None => {}
    }
    // The client's address as a header value, made once (it is also the peer's, and so the
    // whole `X-Forwarded-For`, whenever the peer is not a trusted proxy).
    let client_ip_value = client_ip.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok());
    if let Some(v) = &client_ip_value {
        req.headers_mut()
            .insert(names::CLIENT_IP.clone(), v.clone());
    }

    // 5. Rate limit.
    let mut limit_decision = None;
    if let Some(limiter) = &route.limiter {
        let ip = || client_ip.map(|i| i.to_string()).unwrap_or_default();
        let key = match route.limit_key {
            RateLimitKey::Ip => ip(),
            RateLimitKey::Route => String::new(),
            RateLimitKey::User => caller.as_ref().map(|c| c.id.clone()).unwrap_or_else(ip),
            RateLimitKey::ApiKey => caller
                .as_ref()
                .and_then(|c| c.api_key.clone())
                .unwrap_or_else(ip),
        };
        let d = limiter.check(&route.name, &key).await;
        if !d.allowed {
            metrics::counter!("gateway_ratelimit_rejections_total", "route" => route.name.clone())
                .increment(1);
            let secs = d.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let mut res = problem(Problem::too_many_requests(secs));
            rate_limit_headers(&mut res, &d);
            return (outcome, res);
        }
        limit_decision = Some(d);
    }

    // 6. Bound the body: refuse at once when the declared length is too big; a streamed
    // body that grows past the limit is cut.
    let max = route.max_body;
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|len| len > max) {
        return (outcome, problem(Problem::payload_too_large(max as usize)));
    }

    // 7. A composite fans out and merges; anything else is forwarded (to the variant the
    // split assigns), idempotent body-less requests retried within the cluster's budget.
    let mut set_cookie = None;
    let cluster = match &route.target {
        Target::Cluster(c) => c,
        Target::Split(split) => {
            let a = split.assign(
                req.headers(),
                req.uri().query(),
                caller.as_ref().map(|c| c.id.as_str()),
                tls,
            );
            outcome.variant = Some(a.variant.name.clone());
            outcome.cluster = Some(a.variant.cluster.name.clone());
            set_cookie = a.set_cookie;
            if let Ok(v) = HeaderValue::from_str(&a.variant.name) {
                req.headers_mut().insert(crate::traffic::VARIANT_HEADER, v);
            }
            &a.variant.cluster
        }
        Target::Aggregate(composite) => {
            let mut res = composite
                .serve(Incoming {
                    params,
                    query: req.uri().query(),
                    headers: req.headers(),
                    caller: caller.as_ref().map(|c| CallerView {
                        id: &c.id,
                        roles: &c.roles,
                        claims: c.claims.as_deref(),
                    }),
                    deadline: route.deadline(),
                })
                .await;
            if let Some(d) = &limit_decision {
                rate_limit_headers(&mut res, d);
            }
            // HEAD: hyper sends the headers (the length included) and drops the body.
            return (outcome, res);
        }
        Target::Document(doc) => return (outcome, doc.serve().await),
    };
    let forwarded_path = if route.strip_prefix.is_some() || route.add_prefix.is_some() {
        crate::router::rewrite(
            &path,
            route.strip_prefix.as_deref(),
            route.add_prefix.as_deref(),
        )
    } else {
        path
    };
    let Some(path_and_query) = upstream_target(req.uri(), forwarded_path) else {
        return (
            outcome,
            problem(Problem::bad_request("the request target is not valid")),
        );
    };
    // A WebSocket: the client's side of the tunnel, once the upstream agrees. Only where
    // the route allows it, and not to HTTP/2 upstreams.
    let client_upgrade =
        (websocket && route.websocket && cluster.version() == http::Version::HTTP_11)
            .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let original_host = parts.headers.remove(header::HOST);
    // Forwarding headers: believed (and extended) only from trusted proxies; from anyone
    // else they are replaced, so an upstream reading any of them sees the truth.
    let peer = client.map(|c| c.peer);
    let trusted = client.is_some_and(|c| c.trusted);
    let prior_xff = trusted
        .then(|| {
            parts
                .headers
                .get_all(&names::X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|x| !x.is_empty());
    if !trusted {
        for h in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            parts.headers.remove(h);
        }
    }
    parts.headers.remove(&names::X_FORWARDED_FOR);
    if let Some(ip) = peer {
        let xff = match (prior_xff, &client_ip_value) {
            (None, Some(v)) if client_ip == Some(ip) => Some(v.clone()),
            (Some(prev), _) => HeaderValue::from_str(&format!("{prev}, {ip}")).ok(),
            (None, _) => HeaderValue::from_str(&ip.to_string()).ok(),
        };
        if let Some(v) = xff {
            parts.headers.insert(names::X_FORWARDED_FOR.clone(), v);
        }
    }
    if !parts.headers.contains_key(&names::X_FORWARDED_HOST)
        && let Some(host) = original_host.or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
    {
        parts.headers.insert(names::X_FORWARDED_HOST.clone(), host);
    }
    if !parts.headers.contains_key(&names::X_FORWARDED_PROTO) {
        let proto = if tls { "https" } else { "http" };
        parts.headers.insert(
            names::X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(proto),
        );
    }
    if client_upgrade.is_some() {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    } else if cluster.version() == http::Version::HTTP_11 && parts.headers.contains_key(header::TE)
    {
        // `te: trailers` is hop-by-hop in HTTP/1.1: named in `Connection`.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("te"));
    }
    parts.version = cluster.version();

    let hash_key: Option<Vec<u8>> = match &cluster.hash_on {
        Some(HashOn::Header(h)) => parts.headers.get(h).map(|v| v.as_bytes().to_vec()),
        Some(HashOn::Cookie(name)) => cookie(&parts.headers, name).map(|c| c.into_bytes()),
        None => None,
    };
    let bodiless = body.is_end_stream();
    let retryable = idempotent(&parts.method) && bodiless;
    let timeout = route.timeout.unwrap_or(cluster.request_timeout);
    // Shadow traffic: the copy leaves before the request, on its own task. A copied body
    // is read first (it is small, and must arrive within the route's timeout).
    let mirror = route
        .mirror
        .as_ref()
        .filter(|m| client_upgrade.is_none() && m.sample(content_length, bodiless));
    let body = match mirror {
        None => body,
        Some(m) => {
            let buffered = if bodiless {
                None
            } else {
                match tokio::time::timeout(timeout, crate::traffic::buffer(body, m.max_body)).await
                {
                    Ok(Some(b)) => Some(b),
                    Ok(None) => {
                        return (
                            outcome,
                            problem(Problem::bad_request("the request body could not be read")),
                        );
                    }
                    Err(_) => {
                        return (
                            outcome,
                            problem(
                                Problem::typed(
                                    http::StatusCode::REQUEST_TIMEOUT,
                                    "request-timeout",
                                    "Request Timeout",
                                )
                                .detail("the request body did not arrive in time"),
                            ),
                        );
                    }
                }
            };
            if let Some(shadow) = m.slot() {
                shadow.send(
                    parts.method.clone(),
                    path_and_query.clone(),
                    parts.headers.clone(),
                    buffered.clone(),
                    m.cluster.request_timeout,
                );
            }
            match buffered {
                Some(b) => Full::new(b).map_err(|never| match never {}).boxed(),
                None => empty(),
            }
        }
    };
    let mut body = Some(Limited::new(body, max as usize).boxed());
    cluster.deposit();
    let mut last_endpoint: Option<Arc<crate::cluster::Endpoint>> = None;
    loop {
        outcome.attempts += 1;
        let Some(lease) = cluster.pick(hash_key.as_deref(), last_endpoint.as_deref()) else {
            metrics::counter!("gateway_upstream_errors_total", "route" => route.name.clone(), "kind" => "no_endpoint").increment(1);
            return (
                outcome,
                problem(Problem::unavailable(
                    "no healthy upstream endpoint; retry shortly",
                )),
            );
        };
        outcome.endpoint = Some(lease.endpoint.url.clone());
        let uri = match Uri::builder()
            .scheme(lease.endpoint.scheme.clone())
            .authority(lease.endpoint.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
        {
            Ok(u) => u,
            Err(_) => {
                return (
                    outcome,
                    problem(Problem::bad_request("the request target is not valid")),
                );
            }
        };
        let mut upstream_req = Request::new(body.take().unwrap_or_else(empty));
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = if retryable {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        *upstream_req.version_mut() = parts.version;

        let sent = tokio::time::timeout(timeout, cluster.client().request(upstream_req)).await;
        let can_retry = retryable && outcome.attempts <= cluster.retry_attempts;
        match sent {
            Err(_) => {
                // With a body, a slow client may be the cause: no verdict on the endpoint.
                if bodiless {
                    lease.finish(false);
                }
                metrics::counter!("gateway_upstream_errors_total", "route" => route.name.clone(), "kind" => "timeout").increment(1);
                return (
                    outcome,
                    problem(Problem::gateway_timeout(
                        "the upstream service did not answer in time",
                    )),
                );
            }
            Ok(Err(e)) => {
                if is_length_limit(&e) {
                    // The client's fault: the lease goes back without a verdict.
                    return (outcome, problem(Problem::payload_too_large(max as usize)));
                }
                let ep = lease.endpoint.clone();
                // A broken request body is the client's doing, not the endpoint's.
                if bodiless || e.is_connect() {
                    lease.finish(false);
                }
                tracing::warn!(error = %e, route = &*route.name, endpoint = %outcome.endpoint.as_deref().unwrap_or(""), "upstream request failed");
                metrics::counter!("gateway_upstream_errors_total", "route" => route.name.clone(), "kind" => "connect").increment(1);
                if can_retry && cluster.withdraw() {
                    metrics::counter!("gateway_retries_total", "cluster" => cluster.name.clone())
                        .increment(1);
                    last_endpoint = Some(ep);
                    continue;
                }
                return (
                    outcome,
                    problem(Problem::bad_gateway("the upstream service is unreachable")),
                );
            }
            Ok(Ok(res)) => {
                let failed = res.status().is_server_error();
                let ep = lease.endpoint.clone();
                lease.finish(!failed);
                if failed
                    && can_retry
                    && matches!(res.status().as_u16(), 502..=504)
                    && cluster.withdraw()
                {
                    metrics::counter!("gateway_retries_total", "cluster" => cluster.name.clone())
                        .increment(1);
                    last_endpoint = Some(ep);
                    continue;
                }
                let mut res = res;
                let tunnel = if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    let agreed = res
                        .headers()
                        .get(header::UPGRADE)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                    let Some(client_side) = client_upgrade.filter(|_| agreed) else {
                        tracing::warn!(route = &*route.name, "upstream switched protocols unasked");
                        return (
                            outcome,
                            problem(Problem::bad_gateway("the upstream answered unexpectedly")),
                        );
                    };
                    let upstream_side = hyper::upgrade::on(&mut res);
                    tunnel(
                        client_side,
                        upstream_side,
                        route.name.clone(),
                        parts.extensions.get::<ConnInfo>().cloned(),
                        Duration::from_millis(rt.config.limits.websocket_idle_timeout_ms),
                    );
                    Some(HeaderValue::from_static("websocket"))
                } else {
                    None
                };
                let (mut rparts, rbody) = res.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Some(proto) = tunnel {
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    rparts.headers.insert(header::UPGRADE, proto);
                }
                let mut res = Response::from_parts(rparts, rbody.map_err(Into::into).boxed());
                if let Some(d) = &limit_decision {
                    rate_limit_headers(&mut res, d);
                }
                if let Some(c) = set_cookie {
                    res.headers_mut().append(header::SET_COOKIE, c);
                }
                return (outcome, res);
            }
        }
    }
}

/// Joins the two sides of a WebSocket once both are handed over, and copies bytes both
/// ways until both have closed, or nothing has moved for `idle`. The client connection's
/// slot is held meanwhile.
fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: Arc<str>,
    conn: Option<ConnInfo>,
    idle: Duration,
) {
    tokio::spawn(async move {
        let _slot = conn;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let gauge = metrics::gauge!("gateway_websockets_open", "route" => route);
                gauge.increment(1.0);
                if let Err(e) = pump(TokioIo::new(c), TokioIo::new(u), idle).await {
                    tracing::debug!(error = %e, "WebSocket ended with an error");
                }
                gauge.decrement(1.0);
            }
            Err(e) => tracing::debug!(error = %e, "upgrade not completed"),
        }
    });
}

/// Copies both ways, passing on half-closes, until both sides are done or `idle` passes
/// with no byte either way.
async fn pump<A, B>(mut a: A, mut b: B, idle: Duration) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut buf_a, mut buf_b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = a.read(&mut buf_a), if a_open => match r? {
                0 => {
                    a_open = false;
                    b.shutdown().await?;
                }
                n => b.write_all(&buf_a[..n]).await?,
            },
            r = b.read(&mut buf_b), if b_open => match r? {
                0 => {
                    b_open = false;
                    a.shutdown().await?;
                }
                n => a.write_all(&buf_b[..n]).await?,
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!("WebSocket idle; closed");
                return Ok(());
            }
        }
    }
    Ok(())
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_continues_or_starts() {
        let mut h = HeaderMap::new();
        let (v, id) = traceparent(&h);
        assert_eq!(id.len(), 32);
        assert!(v.to_str().unwrap().starts_with(&format!("00-{id}-")));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (v, id) = traceparent(&h);
        assert_eq!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let v = v.to_str().unwrap().to_owned();
        assert!(v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && v.ends_with("-01"));
        assert!(!v.contains("00f067aa0ba902b7"));
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_ne!(traceparent(&h).1, "garbage");
        // Upper-case hex is read (and the id lower-cased); the flags pass unchanged.
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00"),
        );
        let (v, id) = traceparent(&h);
        assert_eq!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(v.to_str().unwrap().ends_with("-00"));
        // An all-zero trace id, another version, a bad length or a non-hex id: a new trace.
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            let (v, id) = traceparent(&h);
            assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_ne!(id, "00000000000000000000000000000000", "{bad}");
            assert_eq!(v.len(), 55);
            assert!(v.to_str().unwrap().ends_with("-01"), "{bad}");
        }
    }

    #[test]
    fn upstream_target_reuses_the_clients_only_when_it_is_the_same() {
        let t = |uri: &str, path: &str| {
            upstream_target(&uri.parse().unwrap(), path.to_owned())
                .unwrap()
                .as_str()
                .to_owned()
        };
        assert_eq!(t("/a/b?x=1", "/a/b"), "/a/b?x=1");
        assert_eq!(t("/a/b?", "/a/b"), "/a/b?");
        assert_eq!(t("/a/%7Eb?x=1", "/a/~b"), "/a/~b?x=1");
        assert_eq!(t("/api/x?y", "/x"), "/x?y");
        // Absolute form with a query and no path: the path is `/`, never the bare `?x=1`
        // (which is what the parsed target's own text is).
        let bare: Uri = "http://gw.example?x=1".parse().unwrap();
        assert_eq!(
            (bare.path(), bare.path_and_query().unwrap().as_str()),
            ("/", "?x=1")
        );
        assert_eq!(t("http://gw.example?x=1", "/"), "/?x=1");
        assert_eq!(t("http://gw.example", "/"), "/");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}
