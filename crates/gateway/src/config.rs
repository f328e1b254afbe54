//! Typed gateway configuration: YAML on disk (or built in code by `shopmesh up`), defaults in
//! code, unknown keys rejected with their line and column, a JSON Schema generated from the
//! same types. Start-up and hot reload go through the same [`GatewayConfig::from_yaml`] and
//! [`GatewayConfig::validate`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The whole gateway: where it listens, what it routes where, and how it protects upstreams.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the gateway listens on (`host:port`). Not changed by a reload.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Worker threads serving traffic, each with its own runtime and listener (default: one
    /// per CPU, at most 16). Not changed by a reload.
    #[serde(default)]
    pub workers: Option<usize>,
    /// The admin API (routes, clusters, health, breakers, reload, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Limits on what clients may send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Proxies whose `X-Forwarded-For` is believed (CIDR blocks or addresses). The client IP
    /// is the first address, from the right, that is not one of them.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// One structured log line per request (target `shopmesh::access`).
    #[serde(default)]
    pub access_log: bool,
    /// Bearer-token (JWT) verification against a JWKS.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// API keys, presented in a header.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// Redis for rate limits shared by several gateway instances.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// TLS on the listener (HTTP/2 and HTTP/1.1 by ALPN). The certificate and key files are
    /// read again on every reload.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Groups of upstream endpoints.
    pub clusters: Vec<ClusterConfig>,
    /// Routes, tried in order: the first whose match fits the request wins.
    pub routes: Vec<RouteConfig>,
    /// Serve the public API's OpenAPI document, built from these routes and the clusters'
    /// own documents (`clusters[].openapi`).
    #[serde(default)]
    pub openapi: Option<OpenApiConfig>,
}

/// The public API document the gateway serves (also on the admin port, and printed by
/// `shopmesh gateway --openapi`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenApiConfig {
    /// Path it is served at, before any route (`GET`).
    #[serde(default = "default_openapi_path")]
    pub path: String,
    /// `info.title`.
    #[serde(default = "default_openapi_title")]
    pub title: String,
    /// `info.version`.
    #[serde(default = "default_openapi_version")]
    pub version: String,
    /// `info.description`.
    #[serde(default)]
    pub description: Option<String>,
}

impl Default for OpenApiConfig {
    fn default() -> Self {
        Self {
            path: default_openapi_path(),
            title: default_openapi_title(),
            version: default_openapi_version(),
            description: None,
        }
    }
}

fn default_openapi_path() -> String {
    "/openapi.json".into()
}
fn default_openapi_title() -> String {
    "API".into()
}
fn default_openapi_version() -> String {
    "1".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API; loopback by default. Absent or `null` disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: Option<SocketAddr>,
    /// Bearer token the admin API requires. Mandatory when `listen` is not loopback.
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body forwarded, in bytes (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Time a client has to send its request headers, in milliseconds. On HTTP/1.1 it also
    /// runs while a kept-alive connection waits for its next request, so it is the idle
    /// timeout too: slow-loris and idle clients are cut after it.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// Most request headers accepted.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Most client connections open at once, per worker thread; further ones wait in the
    /// accept queue. An open WebSocket keeps its connection's place.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted, in bytes (431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most HTTP/2 streams a client may have open at once on one connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// A WebSocket with no traffic either way for this long is closed, in milliseconds.
    #[serde(default = "default_tunnel_idle")]
    pub websocket_idle_timeout_ms: u64,
}

/// TLS for client connections.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first. A relative path is taken from the
    /// configuration file's directory.
    pub cert_file: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            header_read_timeout_ms: default_header_read_timeout(),
            max_headers: default_max_headers(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            max_concurrent_streams: default_max_streams(),
            websocket_idle_timeout_ms: default_tunnel_idle(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// URL of the JSON Web Key Set (`http://…`).
    pub jwks_url: String,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Minimum time between two JWKS fetches triggered by an unknown `kid`, in seconds.
    #[serde(default = "default_refetch")]
    pub min_refetch_secs: u64,
    /// A list of subjects whose tokens are refused (disabled accounts), polled from this URL:
    /// `{"revoked": [{"sub": "…", "since": <unix seconds>}]}`. A token of a listed subject
    /// issued (`iat`) at or before `since` is refused within `revocations_poll_ms`.
    #[serde(default)]
    pub revocations_url: Option<String>,
    /// How often the revocation list is fetched, in milliseconds.
    #[serde(default = "default_revocations_poll")]
    pub revocations_poll_ms: u64,
    /// How often the JWKS is fetched in any case, in milliseconds (besides the fetches an
    /// unknown `kid` triggers): an identity provider that publishes a new key ahead of using
    /// it (as shopmesh's does on rotation) must wait longer than this before signing with it.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_ms: u64,
    /// Remember verified tokens (10,000 of them, each until its `exp` and at most 60 s), so a
    /// client presenting the same token again skips the signature check; revocations still
    /// apply to a remembered token. `false`: every request's signature is checked (what
    /// HAProxy's `jwt_verify` does; `bench/proxy-vs-peers.sh` compares the two that way).
    #[serde(default = "default_true")]
    pub cache: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Header the key is read from.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    pub keys: Vec<ApiKeyConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key; passed upstream as the caller (`apikey:<name>`).
    pub name: String,
    /// SHA-256 of the key, in hex. The key itself is never written in the config.
    pub sha256: String,
    /// Roles granted to the key's holder.
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Longest wait for one rate-limit decision; past it the request is let through.
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Base URLs of the endpoints (`http://host:port`).
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// For `consistent_hash`: what identifies a client.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    /// Active health checks; without them endpoints are judged by live traffic only.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Per-endpoint circuit breaker (an open breaker also takes the endpoint out of the
    /// balancer: passive outlier ejection).
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Retries of idempotent requests without a body, within a budget.
    #[serde(default)]
    pub retry: RetryConfig,
    /// What the endpoints speak.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Path of the endpoints' own OpenAPI document (e.g. `/openapi.json`): the public
    /// document takes the operations this cluster's routes expose from it.
    #[serde(default)]
    pub openapi: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 over cleartext (prior knowledge), as gRPC servers speak: every request of a
    /// worker thread is a stream on one shared connection per endpoint.
    H2c,
}

impl ClusterConfig {
    /// A cluster with every setting at its default.
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        Self {
            name: name.into(),
            endpoints,
            load_balancer: LoadBalancer::default(),
            hash_on: None,
            health_check: None,
            circuit_breaker: BreakerConfig::default(),
            timeouts: TimeoutsConfig::default(),
            retry: RetryConfig::default(),
            protocol: UpstreamProtocol::default(),
            openapi: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Power of two random choices, the one with fewer requests in flight wins.
    LeastRequest,
    /// Rendezvous hashing on `hash_on`; a client sticks to one endpoint while it is up.
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path probed with `GET`; any 2xx is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u64,
    /// Consecutive failed probes that take an endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive good probes that bring it back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures (connect errors, timeouts, 5xx) that open the breaker.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Failure rate in the window (0–1) that opens the breaker, once `min_requests` are seen.
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// How long the breaker stays open before letting probes through.
    #[serde(default = "default_open")]
    pub open_ms: u64,
    /// Requests let through while half-open; all must succeed to close again.
    #[serde(default = "default_half_open")]
    pub half_open_requests: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            failure_rate: default_failure_rate(),
            min_requests: default_min_requests(),
            window_ms: default_window(),
            open_ms: default_open(),
            half_open_requests: default_half_open(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    #[serde(default = "default_connect_timeout")]
    pub connect_ms: u64,
    /// Time allowed for the upstream to answer with headers.
    #[serde(default = "default_request_timeout")]
    pub request_ms: u64,
    /// Idle upstream connections are closed after this long. Keep it below the upstream's
    /// own keep-alive timeout (the shop's services close an idle connection after 10 s;
    /// Node and uvicorn after 5 s), or a request may go out on a connection the upstream is
    /// closing at that moment: an idempotent body-less one is sent again, any other fails.
    #[serde(default = "default_idle_timeout")]
    pub idle_ms: u64,
    /// Idle connections kept per endpoint and worker thread (more are closed when freed).
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_timeout(),
            request_ms: default_request_timeout(),
            idle_ms: default_idle_timeout(),
            max_idle_per_endpoint: default_max_idle(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra attempts after the first (0 disables retries).
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Retries allowed as a percentage of recent requests (the retry budget).
    #[serde(default = "default_retry_percent")]
    pub budget_percent: f32,
    /// Retries always allowed per second, whatever the budget.
    #[serde(default = "default_retry_min")]
    pub min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: default_retry_attempts(),
            budget_percent: default_retry_percent(),
            min_per_sec: default_retry_min(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics, logs and the admin API.
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// Cluster the route forwards to. Exactly one of `cluster`, `split` and `aggregate`.
    #[serde(default)]
    pub cluster: Option<String>,
    /// A gray release or A/B test: the route's traffic divided between versions of the
    /// upstream (one cluster each) by rules and weights. Exactly one of `cluster`, `split`
    /// and `aggregate`.
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// A copy of a fraction of the requests goes to a shadow cluster; its answers are
    /// discarded. Not for `aggregate` routes.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Overrides `limits.max_body_bytes` for this route (an upload route, say). Bodies are
    /// streamed, never held whole, so a large limit costs no memory.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Let clients open WebSockets on this route (`GET` with `Upgrade: websocket`); the
    /// route's authentication and rate limit apply to the upgrade request. Other upgrades
    /// are never passed on.
    #[serde(default)]
    pub websocket: bool,
    /// A composite endpoint: the request fans out to several backend calls whose answers
    /// are merged into one JSON document. Exactly one of `cluster`, `split` and `aggregate`.
    #[serde(default)]
    pub aggregate: Option<AggregateConfig>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Overrides the cluster's request timeout for this route, in milliseconds. For an
    /// `aggregate` route: the deadline of the whole composite (default 10 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl RouteConfig {
    /// A prefix route with no rewrite, anonymous access and no rate limit.
    pub fn prefix(
        name: impl Into<String>,
        prefix: impl Into<String>,
        cluster: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            matches: RouteMatch {
                prefix: Some(prefix.into()),
                ..Default::default()
            },
            cluster: Some(cluster.into()),
            split: None,
            mirror: None,
            max_body_bytes: None,
            websocket: false,
            aggregate: None,
            rewrite: None,
            auth: AuthConfig::default(),
            rate_limit: None,
            timeout_ms: None,
        }
    }
}

impl RouteConfig {
    /// The match as the gateway compiles it: a composite answers reads, `GET` and `HEAD`,
    /// unless the route names its methods.
    pub fn effective_match(&self) -> RouteMatch {
        let mut m = self.matches.clone();
        if self.aggregate.is_some() && m.methods.is_empty() {
            m.methods = vec!["GET".into(), "HEAD".into()];
        }
        m
    }
}

impl GatewayConfig {
    /// A configuration with these clusters and routes and every other setting at its default.
    pub fn new(clusters: Vec<ClusterConfig>, routes: Vec<RouteConfig>) -> Self {
        Self {
            listen: default_listen(),
            workers: None,
            admin: AdminConfig::default(),
            limits: LimitsConfig::default(),
            trusted_proxies: Vec::new(),
            access_log: false,
            jwt: None,
            api_keys: None,
            redis: None,
            tls: None,
            clusters,
            routes,
            openapi: None,
        }
    }
}

/// What a request must look like. Exactly one of `prefix`, `exact` and `template`. Paths
/// are compared after normalisation, ignoring ASCII case.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Path prefix on segment boundaries: `/api/orders` matches `/api/orders/1`, not
    /// `/api/ordersx`.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub exact: Option<String>,
    /// Segments in braces match one segment (`/api/products/{id}`); `{*rest}` at the end
    /// matches the rest.
    #[serde(default)]
    pub template: Option<String>,
    /// `Host` (without port), compared ignoring case.
    #[serde(default)]
    pub host: Option<String>,
    /// Methods accepted (any when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A route's traffic divided between variants. A request goes to the first variant (in
/// order) whose `when` it satisfies; otherwise to a variant drawn by weight. The draw is
/// weighted rendezvous hashing of who the caller is (the token's subject, else the
/// gateway's cookie, set on the first answer), so a caller keeps its variant while the
/// weights stay, and when a variant's weight grows only callers moving into it move.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub variants: Vec<VariantConfig>,
    /// `caller` (default): the same caller always draws the same variant; `none`: every
    /// request draws anew.
    #[serde(default)]
    pub sticky: Stickiness,
    /// Cookie that identifies an anonymous caller.
    #[serde(default = "default_variant_cookie")]
    pub cookie: String,
    /// Lifetime of that cookie, in seconds. It is `Secure` when the client came over TLS.
    #[serde(default = "default_variant_cookie_age")]
    pub cookie_max_age_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stickiness {
    #[default]
    Caller,
    None,
}

/// One version of the upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// Name, in metrics (`variant` label), logs and the `x-shopmesh-variant` request header.
    pub name: String,
    pub cluster: String,
    /// Share of the traffic no rule claims, relative to the other variants' weights.
    #[serde(default)]
    pub weight: u32,
    /// Requests that satisfy all of these go to this variant, whatever the weights.
    #[serde(default)]
    pub when: Option<VariantRules>,
}

/// Conditions on the request, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantRules {
    /// Headers with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Cookies with exactly these values.
    #[serde(default)]
    pub cookies: BTreeMap<String, String>,
    /// Query parameters with exactly these values.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
}

/// Shadow traffic: copies of requests sent to another cluster, answers discarded. The
/// client's request never waits for the shadow and never sees its failures.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub cluster: String,
    /// Share of the requests copied, in percent (0–100).
    pub percent: f64,
    /// Most copies in flight at once; beyond it copies are skipped, so
    /// a slow shadow cannot pile up memory.
    #[serde(default = "default_mirror_in_flight")]
    pub max_in_flight: usize,
    /// Requests with a body larger than this (or of unknown length) are not copied; a
    /// copied body is held in memory until both have it.
    #[serde(default = "default_mirror_body")]
    pub max_body_bytes: u64,
}

/// How the path is changed before forwarding.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Removed from the start of the path (the route must be a `prefix` route).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Put in front of the (stripped) path.
    #[serde(default)]
    pub add_prefix: Option<String>,
}

/// A composite endpoint (the aggregation pattern): one client call, several backend calls,
/// one merged JSON document. Parts run as soon as the parts they read from have answered.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The backend calls. Their order is the order they are merged in.
    pub parts: Vec<PartConfig>,
}

/// One backend call of a composite endpoint.
///
/// `path`, `query` values and `headers` values are templates: `{path.NAME}` (a parameter of
/// the route's `template`), `{query.NAME}`, `{header.NAME}`, `{claims.NAME}` (a claim of the
/// verified token; `sub` for an API key's caller) and `{PART.a.b}` (a field of another part's
/// answer, which makes this part wait for that one). A `*` step takes every element of an
/// array, joined with commas: `{page.items.*.id}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// Name: used in templates, in `_parts`, in errors and metrics.
    pub name: String,
    /// Cluster the call goes to (its balancer, health checks and breakers apply).
    pub cluster: String,
    /// Path template of the `GET` request, starting with `/`.
    pub path: String,
    /// Query parameters (templates). A parameter whose value cannot be resolved is left out.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Pass the client's query string on (before `query`).
    #[serde(default)]
    pub forward_query: bool,
    /// Request headers (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Send the caller's identity (`x-shopmesh-user-id`, `x-shopmesh-user-roles`). Cached
    /// answers are then kept per caller and roles.
    #[serde(default)]
    pub forward_identity: bool,
    /// How long this call may take, in milliseconds, body included.
    #[serde(default = "default_part_timeout")]
    pub timeout_ms: u64,
    /// A required part that fails fails the whole request (502, 504, or the backend's 4xx);
    /// an optional one is replaced by `fallback` and the answer is flagged incomplete.
    #[serde(default = "default_true")]
    pub required: bool,
    /// Value used when an optional part fails (default `null`).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub fallback: serde_json::Value,
    /// Take only this field of the answer (dotted path, e.g. `data.items`).
    #[serde(default)]
    pub extract: Option<String>,
    /// Keep only these fields (of the object, or of each object of an array).
    #[serde(default)]
    pub fields: Vec<String>,
    /// Rename fields: `from: to` (after `fields`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Where the result goes in the merged document: a dotted path, default the part's
    /// name; `.` merges an object's fields into the top level.
    #[serde(default)]
    pub into: Option<String>,
    /// Instead of `into`: join this part's array into the elements of an array already in
    /// the merged document (a batch call enriching a page of items).
    #[serde(default)]
    pub enrich: Option<EnrichConfig>,
    /// Cache successful answers.
    #[serde(default)]
    pub cache: Option<PartCacheConfig>,
    /// Largest answer accepted, in bytes.
    #[serde(default = "default_part_body")]
    pub max_body_bytes: usize,
}

/// Joins a batch answer into a list: for every element `e` of `each` in the merged document,
/// the part's element `p` with `p[by] == e[key]` is set as `e[into]` (`fallback` when none).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// Dotted path of the array in the merged document, e.g. `items`.
    pub each: String,
    /// Field of each of its elements that identifies it, e.g. `id`.
    pub key: String,
    /// Field of each element of this part's array holding the same value, e.g. `product_id`.
    pub by: String,
    /// Field set on each element, e.g. `price`.
    pub into: String,
}

/// Per-part answer cache. Only complete, successful answers are cached; a backend's
/// `Cache-Control: no-store | no-cache | private` prevents it, and its `max-age` shortens
/// the TTL. Identical concurrent calls always share one backend call, cached or not.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartCacheConfig {
    /// Longest time an answer is reused, in milliseconds.
    pub ttl_ms: u64,
    /// Memory the cached answers of this part may take, in bytes (their size on the wire
    /// plus their keys); the least useful are evicted beyond it.
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse anonymous requests (401). Presented credentials are always checked.
    #[serde(default)]
    pub required: bool,
    /// The caller needs at least one of these roles (403 otherwise); implies `required`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The token's `scope` claim must hold all of these (403 otherwise); implies `required`.
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: requests allowed at once after a quiet period.
    pub burst: u32,
    #[serde(default)]
    pub key: RateLimitKey,
    /// `true`: one limit across every gateway sharing `redis`; `false`: in memory.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKey {
    /// The client IP (see `trusted_proxies`).
    #[default]
    Ip,
    /// The authenticated caller; anonymous requests fall back to the IP.
    User,
    /// The API key's name; requests without one fall back to the IP.
    ApiKey,
    /// One bucket for the whole route.
    Route,
}

fn default_part_timeout() -> u64 {
    1_000
}
fn default_true() -> bool {
    true
}
fn default_part_body() -> usize {
    1024 * 1024
}
fn default_cache_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9901)))
}
fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_max_headers() -> usize {
    100
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_streams() -> u32 {
    256
}
fn default_tunnel_idle() -> u64 {
    300_000
}
fn default_variant_cookie() -> String {
    "shopmesh-variant".into()
}
fn default_variant_cookie_age() -> u64 {
    30 * 24 * 3600
}
fn default_mirror_in_flight() -> usize {
    64
}
fn default_mirror_body() -> u64 {
    64 * 1024
}
fn default_leeway() -> u64 {
    30
}
fn default_jwks_refresh() -> u64 {
    60_000
}
fn default_revocations_poll() -> u64 {
    2_000
}
fn default_refetch() -> u64 {
    10
}
fn default_api_key_header() -> String {
    "x-api-key".into()
}
fn default_redis_timeout() -> u64 {
    50
}
fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> u64 {
    5_000
}
fn default_health_timeout() -> u64 {
    1_000
}
fn default_unhealthy_threshold() -> u32 {
    2
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_min_requests() -> u32 {
    20
}
fn default_window() -> u64 {
    10_000
}
fn default_open() -> u64 {
    5_000
}
fn default_half_open() -> u32 {
    1
}
fn default_connect_timeout() -> u64 {
    2_000
}
fn default_request_timeout() -> u64 {
    15_000
}
fn default_idle_timeout() -> u64 {
    4_000
}
fn default_max_idle() -> usize {
    64
}
fn default_retry_attempts() -> u32 {
    1
}
fn default_retry_percent() -> f32 {
    20.0
}
fn default_retry_min() -> u32 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Syntax or shape: the message carries the line and column.
    #[error("{0}")]
    Parse(String),
    #[error("route `{route}`: {reason}")]
    Route { route: String, reason: String },
    #[error("cluster `{cluster}`: {reason}")]
    Cluster { cluster: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl GatewayConfig {
    /// Parses and validates YAML. Unknown keys, wrong types and bad values are refused with
    /// their line and column.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: GatewayConfig =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a fragment of configuration (e.g. a list of routes) with the same error
    /// reporting; the caller validates the whole configuration it becomes part of.
    pub fn fragment<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads a configuration file. Relative TLS file paths are taken from the file's
    /// directory.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Self::from_yaml(&text)?;
        if let (Some(tls), Some(dir)) = (&mut cfg.tls, path.parent()) {
            for f in [&mut tls.cert_file, &mut tls.key_file] {
                if std::path::Path::new(f.as_str()).is_relative() {
                    *f = dir.join(&*f).display().to_string();
                }
            }
        }
        Ok(cfg)
    }

    /// The JSON Schema of the configuration file.
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(GatewayConfig);
        serde_json::to_string_pretty(&schema).unwrap_or_default()
    }

    /// Worker threads of a standalone gateway: `workers`, else one per CPU.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .clamp(1, crate::worker::MAX_WORKERS)
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
clusters:
  - name: app
    endpoints: [\"http://127.0.0.1:9000\"]
routes:
  - name: all
    match: { prefix: / }
    cluster: app
";

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(cfg.listen.port(), 8080);
        assert_eq!(cfg.limits.max_body_bytes, 1024 * 1024);
        assert_eq!(cfg.clusters[0].load_balancer, LoadBalancer::RoundRobin);
        assert_eq!(cfg.clusters[0].retry.attempts, 1);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_position() {
        let text = MINIMAL.replace("    cluster: app", "    cluster: app\n    clutser: typo");
        let e = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(e.contains("clutser"), "{e}");
        assert!(e.contains("line 9"), "{e}");
    }

    #[test]
    fn wrong_types_are_refused_with_their_position() {
        let text = MINIMAL.replace("routes:", "limits: { max_body_bytes: lots }\nroutes:");
        let e = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn references_and_values_are_checked() {
        for (from, to, needle) in [
            ("cluster: app", "cluster: nope", "unknown cluster"),
            ("{ prefix: / }", "{ prefix: /, exact: /x }", "exactly one"),
            ("{ prefix: / }", "{ template: \"/a/{id\" }", "template"),
            ("http://127.0.0.1:9000", "ftp://x", "http://"),
            (
                "http://127.0.0.1:9000",
                "http://127.0.0.1:9000/base",
                "path",
            ),
        ] {
            let text = MINIMAL.replace(from, to);
            let e = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{to}: {e}");
        }
        let exposed = format!("admin: {{ listen: \"0.0.0.0:9901\" }}\n{MINIMAL}");
        let e = GatewayConfig::from_yaml(&exposed).unwrap_err().to_string();
        assert!(e.contains("token"), "{e}");
        let auth = MINIMAL.replace(
            "cluster: app\n",
            "cluster: app\n    auth: { required: true }\n",
        );
        let e = GatewayConfig::from_yaml(&auth).unwrap_err().to_string();
        assert!(e.contains("jwt"), "{e}");
    }

    #[test]
    fn cidrs_parse() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("::1").is_some());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("ten").is_none());
    }

    #[test]
    fn schema_is_generated() {
        let s = GatewayConfig::json_schema();
        assert!(s.contains("\"clusters\""), "{s}");
        assert!(s.contains("additionalProperties"), "{s}");
    }
}
