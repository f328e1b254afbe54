//! What the operations console ([`shopmesh_console`]) shows of the gateway: routes,
//! clusters, endpoints with their health and breakers, the configuration (secrets masked)
//! and its reload history; and its actions (reload the file, validate a candidate). Read
//! from the serving generation when the console asks, once a second while somebody
//! watches; nothing here runs on the request path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use shopmesh_console::{
    ClusterView, EndpointView, Features, GatewayView, Health, MirrorView, Observation, PartView,
    ReloadView, RouteView, Source, VariantView,
};
use shopmesh_platform::Problem;
use shopmesh_platform::extract::Json;

use crate::config::{GatewayConfig, RouteConfig};
pub use crate::history::{RELOADS_KEPT, ReloadRecord, changes};
use crate::proxy::Gateway;

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The configuration as the admin API shows it: the admin token and Redis credentials
/// masked.
pub fn masked(cfg: &GatewayConfig) -> Value {
    let mut v = serde_json::to_value(cfg).unwrap_or(Value::Null);
    if let Some(t) = v.pointer_mut("/admin/token")
        && !t.is_null()
    {
        *t = json!("********");
    }
    if let Some(u) = v.pointer_mut("/redis/url")
        && let Some(s) = u.as_str()
        && let Some((scheme, rest)) = s.split_once("://")
        && let Some((_, host)) = rest.rsplit_once('@')
    {
        *u = json!(format!("{scheme}://********@{host}"));
    }
    // API keys are kept as digests; still, nothing to see there.
    if let Some(keys) = v
        .pointer_mut("/api_keys/keys")
        .and_then(Value::as_array_mut)
    {
        for k in keys {
            if let Some(d) = k.get_mut("sha256") {
                *d = json!("********");
            }
        }
    }
    v
}

fn matches(r: &RouteConfig) -> String {
    let m = &r.matches;
    let mut s = String::new();
    if !m.methods.is_empty() {
        s.push_str(&m.methods.join("|"));
        s.push(' ');
    }
    if let Some(h) = &m.host {
        s.push_str(&format!("host {h} "));
    }
    match (&m.prefix, &m.exact, &m.template) {
        (Some(p), _, _) => s.push_str(&format!("prefix {p}")),
        (_, Some(e), _) => s.push_str(&format!("exact {e}")),
        (_, _, Some(t)) => s.push_str(&format!("template {t}")),
        _ => s.push_str("any path"),
    }
    for (k, v) in &m.headers {
        s.push_str(&format!(" [{k}: {v}]"));
    }
    s
}

fn route_view(r: &RouteConfig) -> RouteView {
    let kind = if r.cluster.is_some() {
        "cluster"
    } else if r.split.is_some() {
        "split"
    } else {
        "aggregate"
    };
    let parts = r
        .aggregate
        .as_ref()
        .map(|a| {
            let names: Vec<&str> = a.parts.iter().map(|p| p.name.as_str()).collect();
            a.parts
                .iter()
                .map(|p| {
                    let text = std::iter::once(p.path.as_str())
                        .chain(p.query.values().map(String::as_str))
                        .chain(p.headers.values().map(String::as_str))
                        .collect::<Vec<_>>()
                        .join(" ");
                    PartView {
                        name: p.name.clone(),
                        cluster: p.cluster.clone(),
                        required: p.required,
                        timeout_ms: Some(p.timeout_ms),
                        cached: p.cache.is_some(),
                        after: names
                            .iter()
                            .filter(|n| **n != p.name && text.contains(&format!("{{{n}.")))
                            .map(|n| (*n).to_owned())
                            .collect(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    RouteView {
        name: r.name.clone(),
        matches: matches(r),
        kind,
        cluster: r.cluster.clone(),
        variants: r
            .split
            .as_ref()
            .map(|s| {
                s.variants
                    .iter()
                    .map(|v| VariantView {
                        name: v.name.clone(),
                        cluster: v.cluster.clone(),
                        weight: f64::from(v.weight),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        parts,
        mirror: r.mirror.as_ref().map(|m| MirrorView {
            cluster: m.cluster.clone(),
            percent: m.percent,
        }),
        auth: r.auth.required || !r.auth.roles.is_empty() || !r.auth.scopes.is_empty(),
        rate_limited: r.rate_limit.is_some(),
    }
}

/// The gateway as the console shows it now.
pub fn view(gateway: &Gateway, source: Option<&std::path::Path>) -> GatewayView {
    let rt = gateway.runtime();
    let status = gateway.status();
    let now = SystemTime::now();
    let mut routes: Vec<RouteView> = Vec::new();
    if let Some(o) = &rt.config.openapi {
        routes.push(RouteView {
            name: "openapi".into(),
            matches: format!("GET|HEAD exact {}", o.path),
            kind: "document",
            cluster: None,
            variants: Vec::new(),
            parts: Vec::new(),
            mirror: None,
            auth: false,
            rate_limited: false,
        });
    }
    routes.extend(rt.config.routes.iter().map(route_view));
    let clusters = rt
        .clusters
        .iter()
        .zip(&rt.config.clusters)
        .map(|(c, cfg)| ClusterView {
            name: c.name.to_string(),
            load_balancer: serde_json::to_value(cfg.load_balancer)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            health_checked: cfg.health_check.is_some(),
            endpoints: c
                .endpoints
                .iter()
                .map(|e| {
                    let b = e.breaker.snapshot();
                    EndpointView {
                        url: e.url.to_string(),
                        healthy: e.is_healthy(),
                        last_check: e.last_check().map(|t| t as i64),
                        breaker: b.state.as_str(),
                        breaker_since: unix_ms(now - b.for_.min(Duration::from_secs(1 << 30))),
                        trips: b.trips,
                        in_flight: e.in_flight(),
                    }
                })
                .collect(),
        })
        .collect();
    GatewayView {
        version: rt.version,
        loaded_at: unix_ms(rt.loaded_at),
        source: source.map(|p| p.display().to_string()),
        last_error: status.last_error,
        config: masked(&rt.config),
        reloads: gateway
            .reloads()
            .into_iter()
            .map(|r| ReloadView {
                seq: r.seq,
                at: unix_ms(r.at),
                ok: r.ok,
                version: r.version,
                error: r.error,
                changes: r.changes,
            })
            .collect(),
        routes,
        clusters,
        signing_keys: rt.jwt.as_ref().map(|j| j.key_ids()).unwrap_or_default(),
    }
}

/// The gateway's own dependencies for the health strip: Redis, when limits are shared.
pub async fn health(gateway: &Gateway) -> Vec<Health> {
    let rt = gateway.runtime();
    let mut out = Vec::new();
    if let Some(redis) = &rt.redis {
        let r = redis.ping().await;
        out.push(Health {
            name: "redis".into(),
            status: if r.is_ok() { "ok" } else { "down" },
            detail: r.err(),
        });
    }
    out
}

#[derive(Clone)]
struct Actions {
    gateway: Gateway,
    path: Option<Arc<PathBuf>>,
}

async fn reload(State(a): State<Actions>) -> Result<Json<Value>, Problem> {
    let Some(path) = &a.path else {
        return Err(Problem::conflict(
            "this gateway was configured in code, not from a file; nothing to reload",
        ));
    };
    match a.gateway.reload_file(path) {
        Ok(version) => Ok(Json(json!({ "version": version }))),
        Err(e) => Err(Problem::unprocessable(format!(
            "the configuration was refused and version {} serves on: {e}",
            a.gateway.runtime().version
        ))),
    }
}

/// Checks a candidate configuration (YAML) as a reload would, without applying it: the
/// verdict is the answer (`valid`, and the error when it is not).
async fn validate(State(a): State<Actions>, body: String) -> Json<Value> {
    let refused = |e: &dyn std::fmt::Display| json!({ "valid": false, "error": e.to_string() });
    let cfg = match GatewayConfig::from_yaml(&body) {
        Ok(cfg) => cfg,
        Err(e) => return Json(refused(&e)),
    };
    let current = a.gateway.runtime();
    let (routes, clusters) = (cfg.routes.len(), cfg.clusters.len());
    // Built (never started) beside the serving generation: what a reload would check.
    match crate::runtime::Runtime::build(cfg, 0, Some(&current)) {
        Ok(_) => Json(json!({ "valid": true, "routes": routes, "clusters": clusters })),
        Err(e) => Json(refused(&e)),
    }
}

/// The console's gateway actions: `POST /config/reload` (from the file, when there is one)
/// and `POST /config/validate` (a YAML body).
pub fn api(gateway: Gateway, path: Option<PathBuf>) -> Router {
    Router::new()
        .route("/config/reload", post(reload))
        .route("/config/validate", post(validate))
        .with_state(Actions {
            gateway,
            path: path.map(Arc::new),
        })
}

/// The standalone gateway's console source.
pub struct GatewaySource {
    pub gateway: Gateway,
    pub path: Option<PathBuf>,
}

impl Source for GatewaySource {
    fn features(&self) -> Features {
        Features {
            gateway: true,
            reload: self.path.is_some(),
            ..Default::default()
        }
    }

    fn observe(&self) -> futures::future::BoxFuture<'_, Observation> {
        Box::pin(async move {
            Observation {
                gateway: Some(view(&self.gateway, self.path.as_deref())),
                health: health(&self.gateway).await,
                ..Default::default()
            }
        })
    }

    fn api(&self) -> Router {
        api(self.gateway.clone(), self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let mut cfg = GatewayConfig::new(Vec::new(), Vec::new());
        cfg.admin.token = Some("s3cret".into());
        let v = masked(&cfg);
        assert_eq!(v["admin"]["token"], "********");
        assert!(!v.to_string().contains("s3cret"));
    }
}
