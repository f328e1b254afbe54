//! The gateway's admin API, on its own port (loopback by default; a bearer token is
//! required when one is configured, and the config refuses a non-loopback address without
//! one): `GET /routes`, `GET /clusters` (endpoints, health, breaker states), `GET /config`
//! (version, last reload error, the configuration with secrets masked), `POST /reload`,
//! `GET /metrics`, `GET /healthz`, and the operations console (`/console`, see
//! [`shopmesh_console`]). Writes from another origin's page are refused
//! ([`shopmesh_console::guard_writes`]); a browser may present the token as the password of
//! Basic credentials, which it asks its user for on a console path.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use shopmesh_platform::Problem;
use shopmesh_platform::extract::Json;

use crate::proxy::Gateway;

#[derive(Clone)]
struct AdminState {
    gateway: Gateway,
    config_path: Option<Arc<PathBuf>>,
}

async fn require_token(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let rt = s.gateway.runtime();
    if let Some(token) = rt.config.admin.token.as_deref().filter(|t| !t.is_empty())
        && let Some(refused) = shopmesh_console::refused(req.uri().path(), req.headers(), token)
    {
        return refused;
    }
    next.run(req).await
}

async fn routes(State(s): State<AdminState>) -> Json<Value> {
    let rt = s.gateway.runtime();
    let routes: Vec<Value> = rt
        .config
        .routes
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    Json(json!({ "version": rt.version, "routes": routes }))
}

async fn clusters(State(s): State<AdminState>) -> Json<Value> {
    let rt = s.gateway.runtime();
    let clusters: Vec<Value> = rt
        .clusters
        .iter()
        .zip(&rt.config.clusters)
        .map(|(c, cfg)| {
            json!({
                "name": &*c.name,
                "load_balancer": cfg.load_balancer,
                "health_check": cfg.health_check.is_some(),
                "endpoints": c.endpoints.iter().map(|e| json!({
                    "url": e.url,
                    "healthy": e.is_healthy(),
                    "breaker": e.breaker.state().as_str(),
                    "in_flight": e.in_flight(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "version": rt.version, "clusters": clusters }))
}

async fn config(State(s): State<AdminState>) -> Json<Value> {
    let cfg = crate::console::masked(&s.gateway.runtime().config);
    Json(json!({
        "status": s.gateway.status(),
        "source": s.config_path.as_ref().map(|p| p.display().to_string()),
        "config": cfg,
    }))
}

/// The public API document of the serving configuration (404 when it asks for none).
async fn document(State(s): State<AdminState>) -> Response {
    match &s.gateway.runtime().document {
        Some(doc) => doc.serve().await.into_response(),
        None => Problem::not_found("the configuration has no `openapi` section").into_response(),
    }
}

async fn reload(State(s): State<AdminState>) -> Result<Json<Value>, Problem> {
    let Some(path) = &s.config_path else {
        return Err(Problem::conflict(
            "this gateway was configured in code, not from a file; nothing to reload",
        ));
    };
    match s.gateway.reload_file(path) {
        Ok(version) => Ok(Json(json!({ "version": version }))),
        Err(e) => Err(Problem::unprocessable(format!(
            "the configuration was refused and the previous one keeps serving: {e}"
        ))),
    }
}

/// The gateway's own admin routes, without metrics, stack or token check (for embedding
/// in another admin API, as `shopmesh up` does). `config_path` enables `POST /reload`.
pub fn api_routes(gateway: Gateway, config_path: Option<PathBuf>) -> Router {
    let state = AdminState {
        gateway,
        config_path: config_path.map(Arc::new),
    };
    Router::new()
        .route("/routes", get(routes))
        .route("/clusters", get(clusters))
        .route("/config", get(config))
        .route("/reload", post(reload))
        .route("/openapi.json", get(document))
        .with_state(state)
}

/// The standalone admin API: the routes above, `/metrics`, `/healthz`, the console, and the
/// token check.
pub fn router(gateway: Gateway, config_path: Option<PathBuf>) -> Router {
    let state = AdminState {
        gateway: gateway.clone(),
        config_path: None,
    };
    let console = shopmesh_console::Console::new(crate::console::GatewaySource {
        gateway: gateway.clone(),
        path: config_path.clone(),
    });
    let g = gateway.clone();
    let options = shopmesh_console::Options {
        token_configured: Arc::new(move || {
            g.runtime()
                .config
                .admin
                .token
                .as_deref()
                .is_some_and(|t| !t.is_empty())
        }),
    };
    shopmesh_platform::serve::stack(
        "gateway-admin",
        shopmesh_platform::telemetry::admin_router()
            .merge(api_routes(gateway, config_path))
            .merge(shopmesh_console::router(console, options))
            .layer(axum::middleware::from_fn(shopmesh_console::guard_writes)),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    )
    .layer(axum::middleware::from_fn_with_state(state, require_token))
}
