//! Pricing service: the price of each product (an amount in minor units and an ISO 4217
//! currency code), read one at a time or in batches, and set by administrators.
//!
//! Same layout as every shopmesh service: `model.rs` (API types), `store.rs` (SQL),
//! `api.rs` (handlers and the OpenAPI document), `migrations/`.

pub mod api;
pub mod model;
pub mod store;

use shopmesh_platform::db::Db;

pub const NAME: &str = "pricing";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Shared state of the handlers.
#[derive(Clone)]
pub struct State {
    pub db: Db,
}

/// The service's complete HTTP application (routes + the common stack).
pub fn app(db: Db) -> axum::Router {
    shopmesh_platform::serve::stack(
        NAME,
        api::routes(State { db }),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    )
}

/// Inserts `(product_id, amount_minor, currency)` prices, skipping products that already have
/// one. Returns how many were new.
pub async fn seed(db: &Db, prices: &[(String, i64, String)]) -> Result<u64, sqlx::Error> {
    store::insert_many(db, prices).await
}

/// How many products have a price.
pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    store::count(db).await
}
