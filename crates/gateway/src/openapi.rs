//! The public API's OpenAPI document, built from the live configuration.
//!
//! A client of the gateway sees neither the services nor their documents: it sees routes.
//! This module describes exactly that. Each proxied route takes, from the document its
//! cluster serves (`clusters[].openapi`), the operations its match exposes: paths mapped back
//! through the route's rewrite, first match in declaration order (an operation an earlier
//! route answers is that route's), the upstream's trust in gateway-set identity headers
//! replaced by the route's own authentication (bearer JWT, API key), and the statuses the
//! gateway itself can answer on that route added (400, 401, 403, 413, 429, 502, 503, 504, as
//! problem+json). A composite route is described from its configuration: the merged shape
//! (each part's answer schema under its `extract`, `fields`, `rename`, `into` or `enrich`, a
//! fallback where the part is optional), the `X-Aggregate-*` headers, and the statuses a
//! composite gives (a required part's own 4xx, 502, 503, 504).
//!
//! [`build`] is a pure function of the configuration and the upstream documents, so what a
//! configuration publishes is testable without a network; [`PublicDocument`] fetches the
//! documents once per configuration generation (a reload builds a new one) and serves the
//! result. Components are imported under their own name when every service that defines
//! the name defines it alike, and under `<Cluster><Name>` otherwise; components nothing
//! refers to are left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use serde_json::{Map, Value, json};
use shopmesh_platform::problem::Problem;

use crate::config::{GatewayConfig, OpenApiConfig, PartConfig, RouteConfig};
use crate::router::{Matcher, Template, normalize};
use crate::wire::{Body, HttpClient, full, problem};

/// Largest upstream document accepted.
const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;
/// One upstream document fetch, body included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The security scheme upstream documents use for the gateway-set identity headers.
const UPSTREAM_IDENTITY: &str = "gatewayIdentity";
const BEARER: &str = "bearerAuth";
const API_KEY: &str = "apiKey";
const PROBLEM: &str = "Problem";
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Why the document cannot be served now.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cluster `{cluster}`: its OpenAPI document could not be fetched: {reason}")]
    Fetch { cluster: String, reason: String },
}

/// One generation's public document: built on first use, then kept until a reload.
pub struct PublicDocument {
    config: Arc<GatewayConfig>,
    client: HttpClient,
    built: tokio::sync::OnceCell<Bytes>,
}

impl PublicDocument {
    pub fn new(config: Arc<GatewayConfig>, client: HttpClient) -> Self {
        Self {
            config,
            client,
            built: tokio::sync::OnceCell::new(),
        }
    }

    /// The document as JSON bytes. Concurrent callers share one build; a failed fetch is
    /// not kept (the next request tries again).
    pub async fn bytes(&self) -> Result<Bytes, DocumentError> {
        self.built
            .get_or_try_init(|| async {
                let docs = fetch_documents(&self.config, &self.client).await?;
                let doc = build(&self.config, &docs);
                Ok(Bytes::from(serde_json::to_vec(&doc).unwrap_or_default()))
            })
            .await
            .cloned()
    }

    /// The answer to `GET /openapi.json`.
    pub async fn serve(&self) -> Response<Body> {
        match self.bytes().await {
            Ok(b) => {
                let mut res = Response::new(full(b));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                res
            }
            Err(e) => {
                tracing::warn!(error = %e, "the public API document is not available");
                let mut res = problem(
                    Problem::typed(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "document-unavailable",
                        "Document unavailable",
                    )
                    .detail(
                        "an upstream's own API document could not be fetched; try again shortly",
                    ),
                );
                res.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                res
            }
        }
    }
}

/// Fetches the document of every cluster that names one and that a route or a part uses,
/// from its first endpoint that answers.
pub async fn fetch_documents(
    cfg: &GatewayConfig,
    client: &HttpClient,
) -> Result<BTreeMap<String, Value>, DocumentError> {
    let used: BTreeSet<&str> = cfg
        .routes
        .iter()
        .flat_map(|r| {
            let mut names: Vec<&str> = r.cluster.iter().map(String::as_str).collect();
            if let Some(s) = &r.split {
                names.extend(s.variants.iter().map(|v| v.cluster.as_str()));
            }
            if let Some(a) = &r.aggregate {
                names.extend(a.parts.iter().map(|p| p.cluster.as_str()));
            }
            names
        })
        .collect();
    let fetches = cfg
        .clusters
        .iter()
        .filter(|c| used.contains(c.name.as_str()))
        .filter_map(|c| Some((c, c.openapi.as_deref()?)))
        .map(|(c, path)| async move {
            let mut last = String::from("no endpoint");
            for endpoint in &c.endpoints {
                let url = format!("{}{}", endpoint.trim_end_matches('/'), path);
                match get_json(client, &url).await {
                    Ok(doc) => return Ok((c.name.clone(), doc)),
                    Err(e) => last = format!("{url}: {e}"),
                }
            }
            Err(DocumentError::Fetch {
                cluster: c.name.clone(),
                reason: last,
            })
        });
    futures::future::join_all(fetches)
        .await
        .into_iter()
        .collect()
}

async fn get_json(client: &HttpClient, url: &str) -> Result<Value, String> {
    let body = crate::wire::get_bounded(client, url, MAX_DOCUMENT_BYTES, FETCH_TIMEOUT).await?;
    serde_json::from_slice::<Value>(&body).map_err(|e| format!("not JSON: {e}"))
}

/// The public document of `cfg`, given the upstream documents by cluster name.
pub fn build(cfg: &GatewayConfig, docs: &BTreeMap<String, Value>) -> Value {
    let default = OpenApiConfig::default();
    let meta = cfg.openapi.as_ref().unwrap_or(&default);
    let imported = Import::new(docs);
    let mut out = Out {
        paths: BTreeMap::new(),
        components: imported.components.clone(),
        operation_ids: BTreeSet::new(),
        undocumented: Vec::new(),
    };
    out.components
        .entry("schemas".into())
        .or_default()
        .entry(PROBLEM.into())
        .or_insert_with(problem_schema);

    let matchers: Vec<Option<Matcher>> = cfg
        .routes
        .iter()
        .map(|r| Matcher::new(&r.effective_match()).ok())
        .collect();
    let ctx = Ctx {
        cfg,
        imported: &imported,
        matchers: &matchers,
    };
    if let Some(path) = cfg.openapi.as_ref().map(|o| o.path.as_str()) {
        out.add(path, "get", document_operation(), None);
    }
    for (i, route) in cfg.routes.iter().enumerate() {
        if route.aggregate.is_some() {
            ctx.composite(i, route, &mut out);
        } else if route.websocket {
            out.undocumented.push(route.name.clone());
        } else {
            ctx.proxied(i, route, &mut out);
        }
    }
    let links_to: BTreeSet<String> = out.operation_ids.clone();
    let mut paths = Map::new();
    for (path, ops) in out.paths {
        let mut item = Map::new();
        for (method, mut op) in ops {
            drop_dangling_links(&mut op, &links_to);
            item.insert(method, op);
        }
        paths.insert(path, Value::Object(item));
    }
    let mut security_schemes = Map::new();
    if cfg.jwt.is_some() {
        security_schemes.insert(
            BEARER.into(),
            json!({"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "An access token from the identity provider (a JWT)."}),
        );
    }
    if let Some(k) = &cfg.api_keys {
        security_schemes.insert(
            API_KEY.into(),
            json!({"type": "apiKey", "in": "header", "name": k.header}),
        );
    }
    let mut components: Map<String, Value> = Map::new();
    let paths = Value::Object(paths);
    let reachable = reachable_components(&paths, &out.components);
    for (kind, items) in out.components {
        let kept: Map<String, Value> = items
            .into_iter()
            .filter(|(name, _)| reachable.contains(&(kind.clone(), name.clone())))
            .collect();
        if !kept.is_empty() {
            components.insert(kind, Value::Object(kept));
        }
    }
    if !security_schemes.is_empty() {
        components.insert("securitySchemes".into(), Value::Object(security_schemes));
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": meta.title, "version": meta.version},
        "paths": paths,
        "components": components,
    });
    if let Some(d) = &meta.description {
        doc["info"]["description"] = Value::String(d.clone());
    }
    if !out.undocumented.is_empty() {
        doc["x-shopmesh-undocumented-routes"] = json!(out.undocumented);
    }
    doc
}

struct Ctx<'a> {
    cfg: &'a GatewayConfig,
    imported: &'a Import,
    matchers: &'a [Option<Matcher>],
}

struct Out {
    /// path → method → operation.
    paths: BTreeMap<String, BTreeMap<String, Value>>,
    /// kind (`schemas`, `responses`, …) → name → component.
    components: BTreeMap<String, BTreeMap<String, Value>>,
    operation_ids: BTreeSet<String>,
    undocumented: Vec<String>,
}

impl Out {
    /// Adds an operation unless the path already has one for this method, giving it an
    /// operation id no other operation has (prefixed by `prefix` on a clash).
    fn add(&mut self, path: &str, method: &str, mut op: Value, prefix: Option<&str>) {
        let ops = self.paths.entry(path.to_owned()).or_default();
        if ops.contains_key(method) {
            return;
        }
        if let Some(id) = op.get("operationId").and_then(Value::as_str) {
            let mut id = id.to_owned();
            if self.operation_ids.contains(&id) {
                id = format!("{}_{id}", prefix.unwrap_or("route").replace('-', "_"));
            }
            let base = id.clone();
            let mut n = 2;
            while self.operation_ids.contains(&id) {
                id = format!("{base}_{n}");
                n += 1;
            }
            op["operationId"] = Value::String(id.clone());
            self.operation_ids.insert(id);
        }
        ops.insert(method.to_owned(), op);
    }
}

impl Ctx<'_> {
    /// Whether an earlier route that always applies (no host or header condition) takes
    /// `method path` before route `index` could.
    fn taken_earlier(&self, index: usize, method: &Method, path: &str) -> bool {
        self.cfg.routes[..index]
            .iter()
            .zip(self.matchers)
            .any(|(r, m)| {
                r.matches.host.is_none()
                    && r.matches.headers.is_empty()
                    && m.as_ref()
                        .is_some_and(|m| m.matches(method, None, path, &HeaderMap::new()).is_some())
            })
    }

    /// Whether route `index` itself matches `method path`, its host and header conditions
    /// taken as met.
    fn route_matches(&self, index: usize, method: &Method, path: &str) -> bool {
        let r = &self.cfg.routes[index];
        let mut headers = HeaderMap::new();
        for (n, v) in &r.matches.headers {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                headers.insert(n, v);
            }
        }
        self.matchers[index].as_ref().is_some_and(|m| {
            m.matches(method, r.matches.host.as_deref(), path, &headers)
                .is_some()
        })
    }

    /// Who may call the route, in the public document's terms.
    fn security(&self, route: &RouteConfig, upstream: Option<&Value>) -> Option<Value> {
        let mut schemes = Vec::new();
        if self.cfg.jwt.is_some() {
            schemes.push(json!({ BEARER: [] }));
        }
        if self.cfg.api_keys.is_some() {
            schemes.push(json!({ API_KEY: [] }));
        }
        if schemes.is_empty() {
            return None;
        }
        let needs = route.auth.required
            || !route.auth.roles.is_empty()
            || !route.auth.scopes.is_empty()
            || upstream.is_some_and(|s| {
                s.as_array().is_some_and(|alts| {
                    !alts.is_empty()
                        && alts.iter().all(|a| {
                            a.as_object()
                                .is_some_and(|o| o.contains_key(UPSTREAM_IDENTITY))
                        })
                })
            });
        if !needs {
            // Anonymous callers are served; a presented credential must still be valid.
            schemes.insert(0, json!({}));
        }
        Some(Value::Array(schemes))
    }

    /// The statuses the gateway itself may answer on a route.
    fn gateway_responses(&self, route: &RouteConfig, op: &mut Value, composite: bool) {
        let has_body = !composite && op.get("requestBody").is_some();
        let responses = op
            .as_object_mut()
            .map(|o| o.entry("responses").or_insert_with(|| json!({})));
        let Some(responses) = responses.and_then(Value::as_object_mut) else {
            return;
        };
        // Every error a client sees is problem+json, the upstreams' included.
        for (status, r) in responses.iter_mut() {
            if (status.starts_with('4') || status.starts_with('5')) && r.get("content").is_none() {
                set_problem_content(r);
            }
        }
        if self.cfg.jwt.is_some() || self.cfg.api_keys.is_some() {
            // The gateway's meaning, whatever the upstream said of its own trusted headers:
            // a client meets a 401 only for its credentials.
            let mut r = json!({"description": "Credentials are missing where required, or the presented ones are not valid."});
            set_problem_content(&mut r);
            responses.insert("401".into(), r);
        }
        let mut add = |status: u16, description: &str| {
            let entry = responses
                .entry(status.to_string())
                .or_insert_with(|| json!({ "description": description }));
            set_problem_content(entry);
        };
        add(400, "The path or request is malformed.");
        if !route.auth.roles.is_empty() || !route.auth.scopes.is_empty() {
            add(403, "The caller lacks a role or scope this route requires.");
        }
        if has_body {
            add(413, "The request body is larger than the route allows.");
        }
        if route.rate_limit.is_some() {
            add(
                429,
                "Too many requests from this caller; see `Retry-After`.",
            );
        }
        add(
            502,
            "An upstream failed or gave an answer the gateway cannot pass on.",
        );
        add(
            503,
            "No upstream endpoint is available (all unhealthy or their breakers open).",
        );
        add(504, "The upstream did not answer in time.");
    }

    fn proxied(&self, index: usize, route: &RouteConfig, out: &mut Out) {
        let cluster = route.cluster.as_deref().or_else(|| {
            route.split.as_ref().and_then(|s| {
                s.variants
                    .iter()
                    .map(|v| v.cluster.as_str())
                    .find(|c| self.imported.docs.contains_key(*c))
            })
        });
        let Some((cluster, doc)) = cluster.and_then(|c| Some((c, self.imported.docs.get(c)?)))
        else {
            out.undocumented.push(route.name.clone());
            return;
        };
        let strip = route
            .rewrite
            .as_ref()
            .and_then(|r| r.strip_prefix.as_deref());
        let add = route.rewrite.as_ref().and_then(|r| r.add_prefix.as_deref());
        let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
            return;
        };
        for (upstream_path, item) in paths {
            let Some(public) = public_path(upstream_path, strip, add) else {
                continue;
            };
            let Some(item) = item.as_object() else {
                continue;
            };
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                    continue;
                };
                if !self.route_matches(index, &m, &public) || self.taken_earlier(index, &m, &public)
                {
                    continue;
                }
                let mut op = op.clone();
                // Path-level parameters belong to every operation of the path.
                if let Some(shared) = item.get("parameters").and_then(Value::as_array) {
                    let own = op
                        .as_object_mut()
                        .map(|o| o.entry("parameters").or_insert_with(|| json!([])));
                    if let Some(Value::Array(own)) = own {
                        for p in shared {
                            if !own.iter().any(|o| o.get("name") == p.get("name")) {
                                own.push(p.clone());
                            }
                        }
                    }
                }
                self.imported.rewrite(cluster, &mut op);
                declare_path_parameters(&public, &mut op);
                parameters_not_null(&mut op);
                if public.contains('{')
                    && let Some(r) = op.get_mut("responses").and_then(Value::as_object_mut)
                {
                    // A parameter the gateway's normalisation removes (`..`, `.`, a segment
                    // of `;` parameters) leaves the path of another resource, or of none.
                    for (status, description) in [
                        (
                            "404",
                            "The path, once normalised (dot segments, `;` parameters), names no resource.",
                        ),
                        (
                            "405",
                            "The path, once normalised (dot segments, `;` parameters), names a resource that does not take this method.",
                        ),
                    ] {
                        r.entry(status)
                            .or_insert_with(|| json!({ "description": description }));
                    }
                }
                // The gateway removes every `x-shopmesh-*` header a client sends.
                if let Some(Value::Array(params)) = op.get_mut("parameters") {
                    params.retain(|p| {
                        !(p.get("in").and_then(Value::as_str) == Some("header")
                            && p.get("name").and_then(Value::as_str).is_some_and(|n| {
                                n.to_ascii_lowercase()
                                    .starts_with(shopmesh_platform::TRUSTED_HEADER_PREFIX)
                            }))
                    });
                }
                match self.security(route, op.get("security")) {
                    Some(s) => op["security"] = s,
                    None => {
                        if let Some(o) = op.as_object_mut() {
                            o.remove("security");
                        }
                    }
                }
                self.gateway_responses(route, &mut op, false);
                out.add(&public, method, op, Some(cluster));
            }
        }
    }

    fn composite(&self, index: usize, route: &RouteConfig, out: &mut Out) {
        let Some(agg) = &route.aggregate else { return };
        let Some(public) = route
            .matches
            .template
            .as_deref()
            .or(route.matches.exact.as_deref())
            .or(route.matches.prefix.as_deref())
            .and_then(|p| normalize(p).ok())
        else {
            return;
        };
        let methods = route.effective_match().methods;
        if !methods.iter().any(|m| m.eq_ignore_ascii_case("GET"))
            || self.taken_earlier(index, &Method::GET, &public)
        {
            return;
        }
        let template_params: Vec<String> = Template::parse(&public)
            .map(|t| t.params().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut parameters: Vec<Value> = template_params
            .iter()
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut seen_query = BTreeSet::new();
        let mut seen_header = BTreeSet::new();
        let mut merged = Shape::default();
        let mut statuses: BTreeMap<String, Value> = BTreeMap::new();
        let mut names = Vec::new();
        for part in &agg.parts {
            names.push(part.name.clone());
            let upstream = self.part_operation(part);
            // What the client may send that reaches the part: the query when forwarded,
            // and the query parameters and headers its templates read.
            if part.forward_query
                && let Some(params) = upstream
                    .as_ref()
                    .and_then(|op| op.get("parameters"))
                    .and_then(Value::as_array)
            {
                for p in params {
                    if p.get("in").and_then(Value::as_str) == Some("query")
                        && let Some(n) = p.get("name").and_then(Value::as_str)
                        && seen_query.insert(n.to_owned())
                    {
                        parameters.push(p.clone());
                    }
                }
            }
            for t in part
                .query
                .values()
                .chain(part.headers.values())
                .chain(std::iter::once(&part.path))
            {
                for (source, name) in template_sources(t) {
                    match source.as_str() {
                        "query" if seen_query.insert(name.clone()) => parameters.push(json!({
                            "name": name, "in": "query", "required": false,
                            "schema": {"type": "string"},
                        })),
                        "header" if seen_header.insert(name.clone()) => parameters.push(json!({
                            "name": name, "in": "header", "required": false,
                            "schema": {"type": "string"},
                        })),
                        _ => {}
                    }
                }
            }
            if part.required
                && let Some(responses) = upstream
                    .as_ref()
                    .and_then(|op| op.get("responses"))
                    .and_then(Value::as_object)
            {
                for (status, r) in responses {
                    if status.starts_with('4') {
                        statuses.entry(status.clone()).or_insert_with(|| r.clone());
                    }
                }
            }
            let answer = upstream
                .as_ref()
                .and_then(ok_schema)
                .unwrap_or_else(|| json!({}));
            let schema = self.imported.shape_part(part, answer);
            merged.place(part, schema, self.imported);
        }
        parameters.push(json!({
            "name": "x-aggregate-parts", "in": "header", "required": false,
            "description": "`true` adds a `_parts` member with each part's outcome, status, time and cache use.",
            "schema": {"type": "string", "enum": ["true", "false"]},
        }));
        let mut schema = merged.into_schema();
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert(
                "_parts".into(),
                json!({"type": "object", "description": "Each part's outcome (only with `X-Aggregate-Parts: true`).",
                       "additionalProperties": true}),
            );
        }
        let component = format!("{}Composite", pascal(&route.name));
        out.components
            .entry("schemas".into())
            .or_default()
            .insert(component.clone(), schema);
        let mut responses = Map::new();
        responses.insert(
            "200".into(),
            json!({
                "description": format!("The merged answer of {}.", names.join(", ")),
                "headers": {
                    "X-Aggregate-Complete": {
                        "description": "`false` when an optional part was replaced by its fallback.",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                },
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{component}")}}},
            }),
        );
        for (status, mut r) in statuses {
            let description = format!(
                "A required part answered {status}: {}",
                r.get("description").and_then(Value::as_str).unwrap_or("")
            );
            r["description"] = Value::String(description.trim_end_matches(": ").to_owned());
            set_problem_content(&mut r);
            responses.insert(status, r);
        }
        let mut op = json!({
            "operationId": route.name.replace('-', "_"),
            "summary": format!("Composite: {}", names.join(" + ")),
            "description": "One call, several backend calls (a composite endpoint of the gateway). \
                A required part's failure fails the call (504 past its timeout, 502 or 503 when its \
                upstream fails, its own 4xx); an optional one is replaced by its fallback and the \
                answer is flagged `X-Aggregate-Complete: false`.",
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(s) = self.security(route, None) {
            op["security"] = s;
        }
        parameters_not_null(&mut op);
        self.gateway_responses(route, &mut op, true);
        out.add(&public, "get", op, Some(&route.name));
    }

    /// The upstream operation a part calls (`GET` on its path template), already rewritten
    /// into the public document's component names.
    fn part_operation(&self, part: &PartConfig) -> Option<Value> {
        let doc = self.imported.docs.get(&part.cluster)?;
        let wanted: Vec<Option<&str>> = split_template(&part.path);
        let paths = doc.get("paths")?.as_object()?;
        let (_, item) = paths.iter().find(|(p, _)| {
            let segs = split_template(p);
            segs.len() == wanted.len()
                && segs.iter().zip(&wanted).all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    (None, None) => true,
                    _ => false,
                })
        })?;
        let mut op = item.get("get")?.clone();
        self.imported.rewrite(&part.cluster, &mut op);
        Some(op)
    }
}

/// Makes an operation's path parameters those of its path: each `{name}` declared (a
/// string, when the upstream document forgot it), none that the path does not have.
fn declare_path_parameters(path: &str, op: &mut Value) {
    let names: Vec<&str> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(|s| s.trim_start_matches('*'))
        .collect();
    let Some(o) = op.as_object_mut() else { return };
    let params = o.entry("parameters").or_insert_with(|| json!([]));
    let Some(params) = params.as_array_mut() else {
        return;
    };
    let is_path = |p: &Value| p.get("in").and_then(Value::as_str) == Some("path");
    params.retain(|p| {
        !is_path(p)
            || p.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| names.contains(&n))
    });
    for name in names {
        if !params
            .iter()
            .any(|p| is_path(p) && p.get("name").and_then(Value::as_str) == Some(name))
        {
            params.push(json!({"name": name, "in": "path", "required": true,
                               "schema": {"type": "string", "minLength": 1}}));
        }
    }
    if params.is_empty() {
        o.remove("parameters");
    }
}

/// A parameter is absent or has a value: a `null` alternative in its schema (what an
/// `Option` field becomes in some generators) means nothing on the wire, and makes clients
/// take an `Option<Option<_>>`.
fn parameters_not_null(op: &mut Value) {
    let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
        return;
    };
    for p in params {
        let Some(schema) = p.get_mut("schema").and_then(Value::as_object_mut) else {
            continue;
        };
        if let Some(Value::Array(types)) = schema.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types[0].clone();
                schema.insert("type".into(), only);
            }
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(Value::Array(alts)) = schema.get(key) {
                let kept: Vec<Value> = alts
                    .iter()
                    .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                    .cloned()
                    .collect();
                if kept.len() == 1 && kept.len() != alts.len() {
                    schema.remove(key);
                    if let Value::Object(only) = &kept[0] {
                        for (k, v) in only {
                            schema.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
    }
}

/// Path segments, `None` for a `{…}` segment.
fn split_template(p: &str) -> Vec<Option<&str>> {
    p.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| (!s.starts_with('{')).then_some(s))
        .collect()
}

/// The `(source, name)` pairs of a part template's `{source.name…}` placeholders.
fn template_sources(t: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 1..start + end];
        if let Some((source, name)) = inner.split_once('.') {
            let name = name.split('.').next().unwrap_or(name);
            out.push((source.to_owned(), name.to_owned()));
        }
        rest = &rest[start + end + 1..];
    }
    out
}

/// The public path of an upstream path under a route's rewrite (`strip_prefix` is what the
/// client sends, `add_prefix` what the upstream sees), or `None` when the route cannot
/// reach it.
fn public_path(upstream: &str, strip: Option<&str>, add: Option<&str>) -> Option<String> {
    let add = add.map(|a| a.trim_end_matches('/')).unwrap_or("");
    let rest = if add.is_empty() {
        upstream
    } else {
        let r = upstream.strip_prefix(add)?;
        if !(r.is_empty() || r.starts_with('/')) {
            return None;
        }
        r
    };
    let strip = strip.map(|s| s.trim_end_matches('/')).unwrap_or("");
    let mut p = format!("{strip}{rest}");
    if p.is_empty() {
        p.push('/');
    }
    Some(p)
}

/// The schema of an operation's successful JSON answer.
fn ok_schema(op: &Value) -> Option<Value> {
    let responses = op.get("responses")?.as_object()?;
    let (_, r) = responses.iter().find(|(s, _)| s.starts_with('2'))?;
    r.get("content")?
        .get("application/json")?
        .get("schema")
        .cloned()
}

/// problem+json content for an error response (kept when it already has it).
fn set_problem_content(r: &mut Value) {
    if r.get("$ref").is_some() {
        return;
    }
    let has = r
        .get("content")
        .and_then(|c| c.get(shopmesh_platform::problem::CONTENT_TYPE))
        .is_some();
    if !has {
        r["content"] = json!({
            shopmesh_platform::problem::CONTENT_TYPE: {
                "schema": {"$ref": format!("#/components/schemas/{PROBLEM}")}
            }
        });
    }
}

/// RFC 9457 problem details, as the gateway and the services write them.
fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string", "description": "A URI reference identifying the problem type."},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
        "additionalProperties": true,
    })
}

fn document_operation() -> Value {
    json!({
        "operationId": "public_api_document",
        "summary": "This document: the public API, built from the gateway's configuration.",
        "responses": {"200": {"description": "An OpenAPI 3.1 document.",
            "content": {"application/json": {"schema": {"type": "object"}}}}},
    })
}

/// Links whose target operation is not in the public document are removed.
fn drop_dangling_links(op: &mut Value, ids: &BTreeSet<String>) {
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for r in responses.values_mut() {
        if let Some(links) = r.get_mut("links").and_then(Value::as_object_mut) {
            links.retain(|_, l| {
                l.get("operationId")
                    .and_then(Value::as_str)
                    .is_some_and(|id| ids.contains(id))
            });
            if links.is_empty()
                && let Some(o) = r.as_object_mut()
            {
                o.remove("links");
            }
        }
    }
}

fn pascal(name: &str) -> String {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The `(kind, name)` of every component the paths reach, through references.
fn reachable_components(
    paths: &Value,
    components: &BTreeMap<String, BTreeMap<String, Value>>,
) -> BTreeSet<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut todo = Vec::new();
    refs(paths, &mut todo);
    while let Some(r) = todo.pop() {
        if !seen.insert(r.clone()) {
            continue;
        }
        if let Some(c) = components.get(&r.0).and_then(|k| k.get(&r.1)) {
            refs(c, &mut todo);
        }
    }
    seen
}

fn parse_ref(r: &str) -> Option<(String, String)> {
    let rest = r.strip_prefix("#/components/")?;
    let (kind, name) = rest.split_once('/')?;
    Some((kind.to_owned(), name.to_owned()))
}

fn refs(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            if let Some(r) = o.get("$ref").and_then(Value::as_str).and_then(parse_ref) {
                out.push(r);
            }
            for v in o.values() {
                refs(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

fn map_refs(v: &mut Value, f: &impl Fn(&str, &str) -> Option<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref")
                && let Some((kind, name)) = parse_ref(r)
                && let Some(new) = f(&kind, &name)
            {
                *r = format!("#/components/{kind}/{new}");
            }
            for v in o.values_mut() {
                map_refs(v, f);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| map_refs(v, f)),
        _ => {}
    }
}

/// The upstream documents' components under public names.
struct Import {
    docs: BTreeMap<String, Value>,
    /// cluster → (kind, name) → public name.
    names: HashMap<String, HashMap<(String, String), String>>,
    components: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Import {
    fn new(docs: &BTreeMap<String, Value>) -> Self {
        // (kind, name) → [(cluster, component)]
        let mut by_name: BTreeMap<(String, String), Vec<(String, Value)>> = BTreeMap::new();
        for (cluster, doc) in docs {
            let Some(components) = doc.get("components").and_then(Value::as_object) else {
                continue;
            };
            for (kind, items) in components {
                if kind == "securitySchemes" {
                    continue;
                }
                for (name, c) in items.as_object().into_iter().flatten() {
                    by_name
                        .entry((kind.clone(), name.clone()))
                        .or_default()
                        .push((cluster.clone(), c.clone()));
                }
            }
        }
        // A name is shared when every definition is the same and everything those refer
        // to is shared too (to a fixed point). The services' shared `Problem` describes the
        // gateway's problems too (the same type writes them); without one, the gateway's own.
        let mut shared: BTreeSet<(String, String)> = by_name
            .iter()
            .filter(|(_, defs)| defs.windows(2).all(|w| w[0].1 == w[1].1))
            .map(|(k, _)| k.clone())
            .collect();
        loop {
            let before = shared.len();
            let snapshot = shared.clone();
            shared.retain(|k| {
                let mut r = Vec::new();
                refs(&by_name[k][0].1, &mut r);
                r.iter().all(|x| snapshot.contains(x))
            });
            if shared.len() == before {
                break;
            }
        }
        let mut names: HashMap<String, HashMap<(String, String), String>> = HashMap::new();
        for (key, defs) in &by_name {
            for (cluster, _) in defs {
                let public = if shared.contains(key) {
                    key.1.clone()
                } else {
                    format!("{}{}", pascal(cluster), key.1)
                };
                names
                    .entry(cluster.clone())
                    .or_default()
                    .insert(key.clone(), public);
            }
        }
        let mut components: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for (key, defs) in &by_name {
            for (cluster, c) in defs {
                let mut c = c.clone();
                let map = &names[cluster];
                map_refs(&mut c, &|k, n| {
                    map.get(&(k.to_owned(), n.to_owned())).cloned()
                });
                components
                    .entry(key.0.clone())
                    .or_default()
                    .insert(map[key].clone(), c);
            }
        }
        Self {
            docs: docs.clone(),
            names,
            components,
        }
    }

    /// Points an operation of `cluster`'s document at the public component names.
    fn rewrite(&self, cluster: &str, op: &mut Value) {
        if let Some(map) = self.names.get(cluster) {
            map_refs(op, &|k, n| map.get(&(k.to_owned(), n.to_owned())).cloned());
        }
    }

    /// Follows `$ref`s (and a nullable `oneOf`/`anyOf` wrapper) to the schema itself.
    fn resolve<'a>(&'a self, mut s: &'a Value) -> &'a Value {
        for _ in 0..16 {
            if let Some((kind, name)) = s.get("$ref").and_then(Value::as_str).and_then(parse_ref) {
                match self.components.get(&kind).and_then(|k| k.get(&name)) {
                    Some(c) => s = c,
                    None => return s,
                }
                continue;
            }
            let alternatives = s
                .get("oneOf")
                .or_else(|| s.get("anyOf"))
                .and_then(Value::as_array);
            if let Some(alts) = alternatives {
                let non_null: Vec<&Value> = alts
                    .iter()
                    .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                    .collect();
                if non_null.len() == 1 {
                    s = non_null[0];
                    continue;
                }
            }
            return s;
        }
        s
    }

    /// A part's answer schema after `extract`, `fields` and `rename`.
    fn shape_part(&self, part: &PartConfig, answer: Value) -> Value {
        let mut s = answer;
        if let Some(path) = &part.extract {
            for seg in path.split('.').filter(|s| !s.is_empty()) {
                s = self
                    .resolve(&s)
                    .get("properties")
                    .and_then(|p| p.get(seg))
                    .cloned()
                    .unwrap_or_else(|| json!({}));
            }
        }
        if part.fields.is_empty() && part.rename.is_empty() {
            return s;
        }
        self.reshape(&s, part)
    }

    fn reshape(&self, s: &Value, part: &PartConfig) -> Value {
        let r = self.resolve(s);
        if let Some(items) = r.get("items") {
            let mut out = r.clone();
            out["items"] = self.reshape(items, part);
            return out;
        }
        let Some(props) = r.get("properties").and_then(Value::as_object) else {
            return r.clone();
        };
        let required: BTreeSet<&str> = r
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut out_props = Map::new();
        let mut out_required = Vec::new();
        for (name, p) in props {
            if !part.fields.is_empty() && !part.fields.contains(name) {
                continue;
            }
            let public = part.rename.get(name).unwrap_or(name);
            out_props.insert(public.clone(), p.clone());
            if required.contains(name.as_str()) {
                out_required.push(Value::String(public.clone()));
            }
        }
        let mut out = json!({"type": "object", "properties": out_props});
        if !out_required.is_empty() {
            out["required"] = Value::Array(out_required);
        }
        out
    }
}

/// The merged answer's schema, as parts are placed into it.
#[derive(Default)]
struct Shape {
    properties: Map<String, Value>,
    required: BTreeSet<String>,
}

impl Shape {
    fn place(&mut self, part: &PartConfig, schema: Value, imported: &Import) {
        let schema = if part.required {
            schema
        } else {
            with_fallback(schema, &part.fallback, imported)
        };
        if let Some(e) = &part.enrich {
            // Each element of `each` gets the part's matching element (or the fallback).
            let element = imported
                .resolve(&schema)
                .get("items")
                .cloned()
                .unwrap_or_else(|| json!({}));
            let element = with_fallback(element, &part.fallback, imported);
            let path: Vec<&str> = e.each.split('.').filter(|s| !s.is_empty()).collect();
            self.enrich(&path, &e.into, element, imported);
            return;
        }
        let into = part.into.clone().unwrap_or_else(|| part.name.clone());
        if into == "." {
            let r = imported.resolve(&schema);
            if let Some(props) = r.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    self.properties.insert(k.clone(), v.clone());
                }
            }
            for k in r
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                self.required.insert(k.to_owned());
            }
            return;
        }
        let path: Vec<&str> = into.split('.').filter(|s| !s.is_empty()).collect();
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let mut value = schema;
        for seg in rest.iter().rev() {
            value = json!({"type": "object", "properties": {*seg: value}, "required": [seg]});
        }
        match self.properties.get_mut(*first) {
            Some(existing) if !rest.is_empty() => merge_objects(existing, value),
            _ => {
                self.properties.insert((*first).to_owned(), value);
            }
        }
        self.required.insert((*first).to_owned());
    }

    /// Sets `into` on the elements of the array at `path`, inlining their schema.
    fn enrich(&mut self, path: &[&str], into: &str, element: Value, imported: &Import) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let Some(slot) = self.properties.get_mut(*first) else {
            return;
        };
        let mut target = inline(slot, imported);
        {
            let mut cur = &mut target;
            for seg in rest {
                let Some(next) = cur.get_mut("properties").and_then(|p| p.get_mut(*seg)) else {
                    return;
                };
                *next = inline(next, imported);
                cur = next;
            }
            let Some(items) = cur.get_mut("items") else {
                return;
            };
            *items = inline(items, imported);
            if let Some(props) = items
                .as_object_mut()
                .map(|o| o.entry("properties").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut)
            {
                props.insert(into.to_owned(), element);
            }
            let required = items
                .as_object_mut()
                .map(|o| o.entry("required").or_insert_with(|| json!([])));
            if let Some(Value::Array(r)) = required {
                r.push(Value::String(into.to_owned()));
            }
        }
        *slot = target;
    }

    fn into_schema(self) -> Value {
        json!({
            "type": "object",
            "properties": self.properties,
            "required": self.required.into_iter().collect::<Vec<_>>(),
        })
    }
}

/// A copy of the schema itself (references followed), so that it can be changed.
fn inline(s: &Value, imported: &Import) -> Value {
    imported.resolve(s).clone()
}

fn merge_objects(into: &mut Value, from: Value) {
    if let (Some(a), Some(b)) = (
        into.get_mut("properties").and_then(Value::as_object_mut),
        from.get("properties").and_then(Value::as_object),
    ) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// The schema of a value that may also be the part's fallback.
fn with_fallback(schema: Value, fallback: &Value, imported: &Import) -> Value {
    let resolved = imported.resolve(&schema);
    let fits = match fallback {
        Value::Array(a) => a.is_empty() && resolved.get("type") == Some(&json!("array")),
        Value::Object(o) => {
            o.is_empty()
                && resolved.get("type") == Some(&json!("object"))
                && resolved.get("required").is_none()
        }
        _ => false,
    };
    if fits {
        return schema;
    }
    let alternative = match fallback {
        Value::Null => json!({"type": "null"}),
        Value::Bool(_) => json!({"type": "boolean"}),
        Value::Number(_) => json!({"type": "number"}),
        Value::String(_) => json!({"type": "string"}),
        Value::Array(_) => json!({"type": "array"}),
        Value::Object(_) => json!({"type": "object"}),
    };
    json!({"anyOf": [schema, alternative]})
}

/// Rewrites a 3.1 document as OpenAPI 3.0.3, for generators that read only 3.0 (progenitor,
/// oapi-codegen 1): `type: [T, "null"]` becomes `type: T, nullable: true`, a `{"type":
/// "null"}` alternative becomes `{"enum": [null]}`, numeric exclusive bounds become 3.0's
/// boolean ones, `const` becomes a one-value `enum`.
pub fn to_openapi_30(doc: &mut Value) {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(types)) = m.get("type").cloned() {
                    let non_null: Vec<Value> =
                        types.iter().filter(|t| *t != "null").cloned().collect();
                    if non_null.len() != types.len() {
                        m.insert("nullable".into(), Value::Bool(true));
                    }
                    match non_null.len() {
                        0 => {
                            m.remove("type");
                            m.insert("enum".into(), json!([null]));
                        }
                        1 => {
                            m.insert("type".into(), non_null[0].clone());
                        }
                        _ => {
                            m.remove("type");
                        }
                    }
                }
                if m.get("type") == Some(&json!("null")) {
                    m.remove("type");
                    m.insert("enum".into(), json!([null]));
                }
                for (exclusive, bound) in [
                    ("exclusiveMinimum", "minimum"),
                    ("exclusiveMaximum", "maximum"),
                ] {
                    if let Some(n @ Value::Number(_)) = m.get(exclusive).cloned() {
                        m.insert(bound.into(), n);
                        m.insert(exclusive.into(), Value::Bool(true));
                    }
                }
                if let Some(c) = m.remove("const") {
                    m.insert("enum".into(), json!([c]));
                }
                for (k, v) in m.iter_mut() {
                    match (k.as_str(), v) {
                        // Maps of names (a property may be called `type` or `const`).
                        ("properties" | "schemas", Value::Object(named)) => {
                            named.values_mut().for_each(walk);
                        }
                        (_, v) => walk(v),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(doc);
    doc["openapi"] = Value::String("3.0.3".into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GatewayConfig {
        GatewayConfig::from_yaml(
            r#"
jwt: { jwks_url: "http://127.0.0.1:1/jwks", issuer: i, audience: a }
openapi: { title: Shop, version: "2" }
clusters:
  - { name: catalog, endpoints: ["http://127.0.0.1:1"], openapi: /openapi.json }
  - { name: pricing, endpoints: ["http://127.0.0.1:2"], openapi: /openapi.json }
  - { name: legacy, endpoints: ["http://127.0.0.1:3"] }
routes:
  - name: product-page
    match: { template: "/shop/products/{id}" }
    rate_limit: { per_second: 10, burst: 10 }
    aggregate:
      parts:
        - { name: product, cluster: catalog, path: "/products/{path.id}", fields: [id, name], rename: { name: title } }
        - name: price
          cluster: pricing
          path: "/prices/{path.id}"
          required: false
          into: offer.price
          query: { currency: "{query.currency}" }
  - name: products
    match: { prefix: /shop/products }
    rewrite: { strip_prefix: /shop, add_prefix: /v1 }
    cluster: catalog
  - name: admin-prices
    match: { prefix: /prices }
    auth: { roles: [admin] }
    cluster: pricing
  - name: old
    match: { prefix: /old }
    cluster: legacy
"#,
        )
        .unwrap()
    }

    fn problem_response() -> Value {
        json!({"description": "no", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    }

    fn docs() -> BTreeMap<String, Value> {
        let product = json!({"type": "object", "required": ["id", "name", "sku"], "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "sku": {"type": "string"}}});
        let catalog = json!({
            "openapi": "3.1.0",
            "paths": {
                "/v1/products/{id}": {
                    "get": {"operationId": "get_product", "security": [{"gatewayIdentity": []}],
                        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                                       {"name": "x-shopmesh-user-id", "in": "header", "schema": {"type": "string"}}],
                        "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Product"}}}},
                                      "404": problem_response()}},
                    "delete": {"operationId": "delete_product", "parameters": [{"name": "x-shopmesh-user-id", "in": "header", "schema": {"type": "string"}}, {"name": "if-match", "in": "header", "schema": {"type": ["string", "null"]}}], "responses": {"204": {"description": "gone"}, "409": {"description": "in use"}}}
                },
                "/v1/products": {"post": {"operationId": "create", "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Product"}}}},
                    "responses": {"201": {"description": "made", "links": {
                        "get": {"operationId": "get_product", "parameters": {"id": "$response.body#/id"}},
                        "del": {"operationId": "delete_product", "parameters": {"id": "$response.body#/id"}}}}}}},
                "/internal/stats": {"get": {"operationId": "stats", "responses": {"200": {"description": "ok"}}}},
                "/products/{id}": {"get": {"operationId": "bare_product", "responses": {"200": {"description": "ok",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Product"}}}}, "404": problem_response()}}},
            },
            "components": {"schemas": {"Product": product, "Problem": problem_schema(), "Unused": {"type": "string"}}},
        });
        let pricing = json!({
            "openapi": "3.1.0",
            "paths": {"/prices/{product_id}": {"get": {"operationId": "create", "responses": {"200": {"description": "ok",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Product"}}}}}}}},
            "components": {"schemas": {"Product": {"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]},
                                       "Problem": problem_schema()}},
        });
        BTreeMap::from([("catalog".into(), catalog), ("pricing".into(), pricing)])
    }

    #[test]
    fn proxied_operations_follow_the_routes() {
        let doc = build(&config(), &docs());
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(doc["info"]["title"], "Shop");
        // The rewrite is undone: /v1/products → /shop/products; /internal and the
        // unprefixed /products are not reachable through any route.
        assert!(paths.contains_key("/shop/products"));
        assert!(
            !paths.keys().any(|p| p.contains("internal")
                || p.starts_with("/products")
                || p.starts_with("/v1"))
        );
        // GET /shop/products/{id} is the composite's (first match); DELETE is the
        // catalog's, through the prefix route.
        let item = &doc["paths"]["/shop/products/{id}"];
        assert_eq!(item["get"]["operationId"], "product_page");
        assert_eq!(item["delete"]["operationId"], "delete_product");
        // Upstream errors without content are problem+json at the gateway.
        assert!(
            item["delete"]["responses"]["409"]["content"]["application/problem+json"].is_object()
        );
        // The gateway's own statuses are there.
        for s in ["400", "401", "502", "503", "504"] {
            assert!(item["delete"]["responses"][s].is_object(), "{s}");
        }
        assert!(item["delete"]["responses"]["403"].is_null());
        // A path parameter normalisation removes leaves another resource's path.
        assert!(
            item["delete"]["responses"]["405"]["content"]["application/problem+json"].is_object()
        );
        assert!(doc["paths"]["/shop/products"]["post"]["responses"]["405"].is_null());
        assert!(doc["paths"]["/shop/products"]["post"]["responses"]["413"].is_object());
        // A link to an operation another route took is dropped; the other stays.
        let links = &doc["paths"]["/shop/products"]["post"]["responses"]["201"]["links"];
        assert!(links["get"].is_null());
        assert_eq!(links["del"]["operationId"], "delete_product");
        // Clashing operation ids are made unique with the cluster's name.
        assert_eq!(
            doc["paths"]["/shop/products"]["post"]["operationId"],
            "create"
        );
        assert_eq!(
            doc["paths"]["/prices/{product_id}"]["get"]["operationId"],
            "pricing_create"
        );
        // Roles on the route: 403 and credentials required (no anonymous alternative).
        let admin = &doc["paths"]["/prices/{product_id}"]["get"];
        assert!(admin["responses"]["403"].is_object());
        assert_eq!(admin["security"], json!([{"bearerAuth": []}]));
        // A route without an upstream document is listed as undocumented.
        assert_eq!(doc["x-shopmesh-undocumented-routes"], json!(["old"]));
        // The served document describes itself.
        assert!(doc["paths"]["/openapi.json"]["get"].is_object());
    }

    #[test]
    fn identity_and_components_are_the_gateways() {
        let doc = build(&config(), &docs());
        let del = &doc["paths"]["/shop/products/{id}"]["delete"];
        // An anonymous call is allowed, but a presented token must be valid.
        assert_eq!(del["security"], json!([{}, {"bearerAuth": []}]));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
            "bearer"
        );
        // `Product` differs between the services: each under its cluster's name; the
        // identical `Problem` once; unused components left out.
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("CatalogProduct") && schemas.contains_key("PricingProduct"));
        assert!(schemas.contains_key("Problem") && !schemas.contains_key("CatalogProblem"));
        assert!(!schemas.keys().any(|k| k.contains("Unused")));
        assert_eq!(
            doc["paths"]["/shop/products"]["post"]["requestBody"]["content"]["application/json"]["schema"]
                ["$ref"],
            "#/components/schemas/CatalogProduct"
        );
        // The trusted identity headers are not a client's to send; a path parameter the
        // upstream forgot is declared.
        assert!(!doc["paths"].to_string().contains("x-shopmesh-user-id"));
        // A parameter is never null on the wire.
        assert_eq!(
            del["parameters"],
            json!([{"name": "if-match", "in": "header", "schema": {"type": "string"}},
                   {"name": "id", "in": "path", "required": true,
                    "schema": {"type": "string", "minLength": 1}}])
        );
    }

    #[test]
    fn a_composite_is_described_from_its_parts() {
        let doc = build(&config(), &docs());
        let op = &doc["paths"]["/shop/products/{id}"]["get"];
        let params: Vec<(&str, &str)> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["in"].as_str().unwrap(), p["name"].as_str().unwrap()))
            .collect();
        assert!(params.contains(&("path", "id")));
        assert!(params.contains(&("query", "currency")));
        assert!(params.contains(&("header", "x-aggregate-parts")));
        // The required part's own 404, the rate limit's 429, the gateway's 5xx.
        for s in ["200", "404", "429", "502", "503", "504"] {
            assert!(op["responses"][s].is_object(), "{s}");
        }
        assert!(op["responses"]["200"]["headers"]["X-Aggregate-Complete"].is_object());
        let schema = &doc["components"]["schemas"]["ProductPageComposite"];
        // `fields` then `rename`: {id, title}; the optional part nested under `into`
        // and nullable (its fallback is null).
        let product = &schema["properties"]["product"];
        assert_eq!(
            product["properties"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["id", "title"]
        );
        assert_eq!(product["required"], json!(["id", "title"]));
        let price = &schema["properties"]["offer"]["properties"]["price"];
        assert_eq!(price["anyOf"][1], json!({"type": "null"}));
        assert_eq!(
            price["anyOf"][0]["$ref"],
            "#/components/schemas/PricingProduct"
        );
        assert_eq!(schema["required"], json!(["offer", "product"]));
    }

    #[tokio::test]
    async fn a_reload_rebuilds_the_document() {
        let cfg = |route: &str| {
            GatewayConfig::from_yaml(&format!(
                "openapi: {{}}\nclusters: [{{ name: c, endpoints: [\"http://127.0.0.1:1\"] }}]\n\
                 routes: [{{ name: {route}, match: {{ prefix: /{route} }}, cluster: c }}]\n"
            ))
            .unwrap()
        };
        let gateway = crate::Gateway::new(cfg("first")).unwrap();
        let served = |g: &crate::Gateway| {
            let doc = g.runtime().document.clone().unwrap();
            async move { serde_json::from_slice::<Value>(&doc.bytes().await.unwrap()).unwrap() }
        };
        let before = served(&gateway).await;
        assert_eq!(before["x-shopmesh-undocumented-routes"], json!(["first"]));
        gateway.apply(cfg("second")).unwrap();
        let after = served(&gateway).await;
        assert_eq!(after["x-shopmesh-undocumented-routes"], json!(["second"]));
    }

    #[test]
    fn openapi_30_form() {
        let mut doc = json!({"openapi": "3.1.0", "components": {"schemas": {"A": {
            "type": "object",
            "properties": {"type": {"type": ["string", "null"]}, "const": {"const": 3},
                           "n": {"anyOf": [{"$ref": "#/components/schemas/B"}, {"type": "null"}]},
                           "x": {"type": "integer", "exclusiveMinimum": 0}}}}}});
        to_openapi_30(&mut doc);
        let props = &doc["components"]["schemas"]["A"]["properties"];
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(props["type"], json!({"type": "string", "nullable": true}));
        assert_eq!(props["const"], json!({"enum": [3]}));
        assert_eq!(props["n"]["anyOf"][1], json!({"enum": [null]}));
        assert_eq!(
            props["x"],
            json!({"type": "integer", "minimum": 0, "exclusiveMinimum": true})
        );
    }
}
