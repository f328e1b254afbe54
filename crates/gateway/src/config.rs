//! Typed gateway configuration. Defaults live in code; unknown keys are rejected.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub routes: Vec<RouteConfig>,
    /// Bearer-token verification; without it, routes that require auth refuse everything.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Largest request body forwarded, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Time allowed for an upstream to answer with headers, in milliseconds.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout_ms: u64,
    /// Time allowed to connect to an upstream, in milliseconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs.
    pub name: String,
    /// Path prefix, matched on segment boundaries (`/api/orders` matches `/api/orders` and
    /// `/api/orders/1`, not `/api/ordersx`).
    pub prefix: String,
    /// Upstream base URL, e.g. `http://127.0.0.1:7003`.
    pub upstream: String,
    #[serde(default)]
    pub auth: RouteAuth,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    /// Anonymous allowed; a presented token must still be valid.
    #[default]
    Optional,
    /// A valid bearer token is required.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Minimum time between two JWKS fetches triggered by an unknown `kid`, in seconds.
    #[serde(default = "default_refetch")]
    pub min_refetch_secs: u64,
}

fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_upstream_timeout() -> u64 {
    15_000
}
fn default_connect_timeout() -> u64 {
    2_000
}
fn default_leeway() -> u64 {
    30
}
fn default_refetch() -> u64 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("route `{route}`: {reason}")]
    Route { route: String, reason: String },
    #[error("jwt: {0}")]
    Jwt(String),
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for r in &self.routes {
            let err = |reason: &str| ConfigError::Route {
                route: r.name.clone(),
                reason: reason.into(),
            };
            if !r.prefix.starts_with('/') {
                return Err(err("prefix must start with `/`"));
            }
            if !seen.insert(r.prefix.trim_end_matches('/')) {
                return Err(err("duplicate prefix"));
            }
            let uri: http::Uri = r
                .upstream
                .parse()
                .map_err(|_| err("upstream is not a valid URL"))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(err("upstream must be an http://host:port URL"));
            }
            if r.auth == RouteAuth::Required && self.jwt.is_none() {
                return Err(err("requires auth but no `jwt` section is configured"));
            }
        }
        if let Some(j) = &self.jwt {
            let uri: http::Uri = j
                .jwks_url
                .parse()
                .map_err(|_| ConfigError::Jwt("jwks_url is not a valid URL".into()))?;
            if uri.scheme_str() != Some("http") {
                return Err(ConfigError::Jwt("jwks_url must be http:// for now".into()));
            }
        }
        Ok(())
    }
}
