//! The admin API (loopback by default): Prometheus metrics, health, and the dead letters.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
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

/// `/metrics`, `/healthz`, the gateway's `/routes`, `/clusters`, `/config`, and `GET /dlq`, `GET|DELETE /dlq/{id}`, `POST /dlq/{id}/replay`,
/// and the operations console (`/console`). Writes from another origin's page are refused.
pub fn router(
    dead_letters: DeadLetters,
    gateway: shopmesh_gateway::Gateway,
    console: shopmesh_console::Console,
) -> Router {
    let dlq = Router::new()
        .route("/dlq", get(list))
        .route("/dlq/{id}", get(show).delete(purge))
        .route("/dlq/{id}/replay", post(replay))
        .with_state(dead_letters);
    shopmesh_platform::serve::stack(
        "admin",
        shopmesh_platform::telemetry::admin_router()
            .merge(dlq)
            .merge(shopmesh_gateway::admin::api_routes(gateway, None))
            .merge(shopmesh_console::router(
                console,
                shopmesh_console::Options::default(),
            ))
            .layer(axum::middleware::from_fn(shopmesh_console::guard_writes)),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    )
}
