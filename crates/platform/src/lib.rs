//! The parts every shopmesh service is built from, so that all seven look and behave alike:
//!
//! - [`problem`]: RFC 9457 problem+json, the one place client-visible errors are built;
//! - [`extract`]: JSON / path / query extractors whose rejections are problems;
//! - [`db`]: sqlx storage on SQLite (default) or PostgreSQL (one schema per service);
//! - [`serve`]: the common HTTP stack (request id, tracing, metrics, body limit,
//!   panic guard, 404/405 problems) and graceful serving;
//! - [`identity`]: the caller identity the gateway vouches for;
//! - [`telemetry`]: logs and the Prometheus recorder;
//! - [`client`]: service-to-service HTTP that carries the request id;
//! - [`openapi`]: the conventions every service's OpenAPI document follows (problems,
//!   the gateway identity, the statuses an operation's shape can answer).

pub mod client;
pub mod db;
pub mod extract;
pub mod health;
pub mod identity;
pub mod openapi;
pub mod otel;
pub mod problem;
pub mod serve;
pub mod telemetry;
pub mod validate;

pub use problem::Problem;

/// Header carrying the request id across every hop.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Prefix of every header the gateway vouches for; it strips all of them from clients.
pub const TRUSTED_HEADER_PREFIX: &str = "x-shopmesh-";
/// Verified user id (JWT `sub`), set only by the gateway.
pub const USER_ID_HEADER: &str = "x-shopmesh-user-id";
/// Verified roles (comma-separated), set only by the gateway.
pub const USER_ROLES_HEADER: &str = "x-shopmesh-user-roles";
/// The client's address as the gateway worked it out (its peer, or from `X-Forwarded-For`
/// behind trusted proxies). Clients can never set it.
pub const CLIENT_IP_HEADER: &str = "x-shopmesh-client-ip";

/// Milliseconds since the Unix epoch: how every service stores instants.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Millis since epoch → RFC 3339 (UTC), for API output.
pub fn millis_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
