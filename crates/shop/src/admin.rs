//! The admin API (loopback by default): Prometheus metrics, health, and the dead letters.
//! With a token configured, every path but the probes (`/healthz`; `/readyz` is merged
//! beside it) asks for it, the console's included.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use shopmesh_messaging::dlq::DlqError;
use shopmesh_platform::Problem;
use shopmesh_platform::extract::{Json, Path, Query};

use crate::dlq::{DeadLetters, Entry};

fn problem(e: DlqError) -> Problem {
    match e {
        DlqError::NotFound(id) => Problem::not_found(format!("no dead letter `{id}`")),
        DlqError::Unreplayable(id) => {
            Problem::unprocessable(format!("dead letter `{id}` is not a readable message"))
        }
        other => Problem::internal(&other),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list(
    State(d): State<DeadLetters>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Entry>>, Problem> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    d.list(limit).await.map(Json).map_err(problem)
}

async fn show(
    State(d): State<DeadLetters>,
    Path(id): Path<String>,
) -> Result<Json<Entry>, Problem> {
    d.get(&id).await.map(Json).map_err(problem)
}

async fn replay(
    State(d): State<DeadLetters>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Entry>), Problem> {
    d.replay(&id)
        .await
        .map(|e| (StatusCode::ACCEPTED, Json(e)))
        .map_err(problem)
}

async fn purge(
    State(d): State<DeadLetters>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    d.purge(Some(&id))
        .await
        .map(|_| StatusCode::NO_CONTENT)
        .map_err(problem)
}

async fn require_token(token: Arc<str>, req: Request, next: Next) -> Response {
    match shopmesh_console::refused(req.uri().path(), req.headers(), &token) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// `/metrics`, `/healthz`, the gateway's `/routes`, `/clusters`, `/config`, and `GET /dlq`, `GET|DELETE /dlq/{id}`, `POST /dlq/{id}/replay`,
/// and the operations console (`/console`). Writes from another origin's page are refused.
/// With `token`, every path but `/healthz` needs it.
pub fn router(
    dead_letters: DeadLetters,
    gateway: shopmesh_gateway::Gateway,
    token: Option<String>,
    console: shopmesh_console::Console,
) -> Router {
    let token: Option<Arc<str>> = token.filter(|t| !t.is_empty()).map(Into::into);
    let configured = token.is_some();
    let dlq = Router::new()
        .route("/dlq", get(list))
        .route("/dlq/{id}", get(show).delete(purge))
        .route("/dlq/{id}/replay", post(replay))
        .with_state(dead_letters);
    let admin = shopmesh_platform::serve::stack(
        "admin",
        shopmesh_platform::telemetry::admin_router()
            .merge(dlq)
            .merge(shopmesh_gateway::admin::api_routes(gateway, None))
            .merge(shopmesh_console::router(
                console,
                shopmesh_console::Options {
                    token_configured: Arc::new(move || configured),
                },
            ))
            .layer(axum::middleware::from_fn(shopmesh_console::guard_writes)),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    );
    match token {
        Some(token) => admin.layer(axum::middleware::from_fn(move |req, next| {
            require_token(token.clone(), req, next)
        })),
        None => admin,
    }
}
