//! The shopmesh gateway: one entry for all traffic, on hyper 1 and tower.
//!
//! Request lifecycle ([`proxy::Gateway`], one tower service over the serving
//! configuration generation, [`runtime::Runtime`]):
//! 1. hop-by-hop headers go; request id kept or minted; W3C trace context continued;
//! 2. every `x-shopmesh-*` header the client sent is stripped;
//! 3. the path is normalised ([`router::normalize`]) and the first matching route wins;
//! 4. credentials (bearer JWT, API key) are verified; roles and scopes checked (401/403);
//! 5. the route's rate limit, in memory or in Redis (429 with `Retry-After`);
//! 6. the body is bounded (413);
//! 7. the cluster's balancer picks a healthy endpoint whose breaker is closed (503 when
//!    none), the request goes out with a timeout (502/504), idempotent body-less requests
//!    are retried elsewhere within the retry budget;
//!    An `aggregate` route instead fans out to several backend calls and merges their
//!    answers ([`aggregate`]);
//! 8. metrics, a span, and an access-log line.
//!
//! Configuration is YAML ([`config::GatewayConfig`]); [`reload`] re-applies it on file
//! change and SIGHUP, and [`admin`] serves the admin API.

pub mod access;
pub mod admin;
pub mod aggregate;
pub mod breaker;
mod check;
pub mod cluster;
pub mod config;
pub mod console;
pub mod history;
pub mod jwt;
mod jwt_crypto;
mod observe;
pub mod openapi;
mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod router;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod traffic;
mod upstream;
mod wire;
pub mod worker;

pub use config::GatewayConfig;
pub use proxy::Gateway;
