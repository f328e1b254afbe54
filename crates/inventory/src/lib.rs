//! Inventory service: the stock of each product (units on hand and units reserved), read one
//! at a time or in batches, and set by administrators.
//!
//! Same layout as every shopmesh service: `model.rs` (API types), `store.rs` (SQL),
//! `api.rs` (handlers and the OpenAPI document), `migrations/`.

pub mod api;
pub mod model;
pub mod saga;
pub mod store;

use shopmesh_platform::db::Db;

pub const NAME: &str = "inventory";
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

/// Inserts `(product_id, on_hand)` stock levels with nothing reserved, skipping products that
/// already have one. Returns how many were new.
pub async fn seed(db: &Db, levels: &[(String, i64)]) -> Result<u64, sqlx::Error> {
    store::insert_many(db, levels).await
}

/// How many products have a stock level.
pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    store::count(db).await
}
