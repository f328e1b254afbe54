//! Promotions service: time-boxed discounts (a percentage or a fixed amount off) that apply to
//! one product or to a whole category, listed by target and by whether they are running now.
//!
//! Same layout as every shopmesh service: `model.rs` (API types), `store.rs` (SQL),
//! `api.rs` (handlers and the OpenAPI document), `migrations/`.

pub mod api;
pub mod model;
pub mod store;

use shopmesh_platform::db::Db;

pub use model::{PromotionKind, PromotionSeed};

pub const NAME: &str = "promotions";
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

/// Inserts promotions as given (no validation), skipping ids that already exist. Returns how
/// many were new.
pub async fn seed(db: &Db, promos: &[PromotionSeed]) -> Result<u64, sqlx::Error> {
    store::insert_many(db, promos).await
}

/// How many promotions exist (running or not).
pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    store::count(db).await
}
