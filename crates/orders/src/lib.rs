//! Orders service: an authenticated user places an order; its line items are priced from the
//! pricing service over HTTP and it is stored as `PENDING` together with its `OrderPlaced`
//! event (transactional outbox). The orders service then orchestrates the saga
//! ([`saga`]) that confirms or cancels it. Users get and list their own orders only.
//! Same layout as every shopmesh service.

pub mod api;
pub mod model;
pub mod saga;
pub mod store;

use shopmesh_messaging::outbox::Relay;
use shopmesh_platform::client::ServiceClient;
use shopmesh_platform::db::Db;

pub const NAME: &str = "orders";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Where the services orders depends on live.
#[derive(Debug, Clone)]
pub struct Deps {
    pub pricing_url: String,
    /// The payments service, whose vault takes the card at order time.
    pub payments_url: String,
    /// The user center's interface: who may order, and where to ship.
    pub directory: std::sync::Arc<shopmesh_users_client::Directory>,
    /// The mesh sidecar's outbound address: pricing and payments are called through it
    /// (mutual TLS, the mesh's policy), by name. `None`: straight to the URLs above.
    pub sidecar: Option<String>,
}

#[derive(Clone)]
pub struct State {
    pub db: Db,
    pub pricing: ServiceClient,
    pub payments: ServiceClient,
    pub directory: std::sync::Arc<shopmesh_users_client::Directory>,
    /// Woken after an order commits, to publish its `OrderPlaced` at once.
    pub relay: Relay,
}

/// The orders service's router. Fails only on a sidecar address that is not a URL.
pub fn app(
    db: Db,
    deps: Deps,
    relay: Relay,
) -> Result<axum::Router, shopmesh_platform::client::InvalidSidecar> {
    let sidecar = deps.sidecar.as_deref();
    let state = State {
        db,
        pricing: ServiceClient::through("pricing", deps.pricing_url, sidecar)?,
        payments: ServiceClient::through("payments", deps.payments_url, sidecar)?,
        directory: deps.directory,
        relay,
    };
    Ok(shopmesh_platform::serve::stack(
        NAME,
        api::routes(state),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    ))
}
