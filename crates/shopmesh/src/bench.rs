//! `shopmesh bench backend`: stand-in backends for the benchmarks under `bench/`. Each
//! listener answers the shop's read paths with small fixed JSON documents after an injected
//! delay, so a benchmark measures the gateway, not a database.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Serve stand-in JSON backends (products, inventory, prices, promotions).
    Backend(BackendArgs),
}

#[derive(Args)]
struct BackendArgs {
    /// Addresses to listen on (one backend each); repeat the flag.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchCommand::Backend(b) => backend(b).await,
    }
}

async fn backend(a: BackendArgs) -> anyhow::Result<()> {
    let delay = Duration::from_millis(a.delay_ms);
    let app = Router::new()
        .route("/api/products/{id}", get(product))
        .route("/api/inventory/{id}", get(stock))
        .route("/api/prices/{id}", get(price))
        .route("/api/promotions", get(promotions))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(delay);
    let mut tasks = tokio::task::JoinSet::new();
    for addr in a.listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let app = app.clone();
        tasks.spawn(async move { axum::serve(listener, app).await });
    }
    println!("bench backends ready");
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Waits `d` precisely: tokio's timer rounds up to its next millisecond tick, which would
/// add up to a millisecond to every "20 ms" answer; a blocking-pool sleep does not.
async fn pause(d: Duration) {
    if !d.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
    }
}

async fn product(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({
        "id": id, "sku": "SKU-000001", "name": "Acme Sturdy Kettle",
        "description": "A sturdy kettle from Acme, in red.", "category": "kitchen",
        "attributes": {"brand": "Acme", "color": "red", "weight_g": 1200},
        "created_at": "2026-11-27T00:00:00Z"
    }))
}

async fn stock(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({"product_id": id, "on_hand": 120, "reserved": 3, "available": 117}))
}

async fn price(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({
        "product_id": id, "amount_minor": 4999, "currency": "EUR",
        "updated_at": "2026-11-27T00:00:00Z"
    }))
}

async fn promotions(State(d): State<Duration>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({"items": [{
        "id": "promo-1", "name": "Kitchen week", "kind": "percent", "value": 10,
        "category": "kitchen", "active": true
    }], "total": 1, "limit": 20, "offset": 0}))
}
