//! Catalog service: the products of the shop (id, sku, name, description, category,
//! attributes), listed with pagination, searched by text and category.
//!
//! Same layout as every shopmesh service: `model.rs` (API types), `store.rs` (SQL),
//! `api.rs` (handlers and the OpenAPI document), `migrations/`.

pub mod api;
pub mod model;
pub mod store;

use shopmesh_platform::db::Db;

pub const NAME: &str = "catalog";
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
