//! The shopmesh gateway (first cut): one listener, routes by path prefix to upstream HTTP
//! services, verifies bearer JWTs against a JWKS, and passes the verified identity on in
//! `x-shopmesh-*` headers that it always strips from client requests.
//!
//! Request lifecycle (one tower service, [`proxy::Gateway`]):
//! 1. request id: kept if the client sent a sane one, else minted; echoed on the response;
//! 2. strip every `x-shopmesh-*` header the client sent;
//! 3. route: longest matching path prefix, else 404 problem+json;
//! 4. authenticate: a bearer token, when present, must verify (else 401); routes marked
//!    `required` refuse requests without one;
//! 5. bound the body (413), forward over a pooled HTTP client with a timeout (502/504);
//! 6. record metrics and a tracing span per request.

pub mod config;
pub mod jwt;
pub mod proxy;
pub mod server;

pub use config::{GatewayConfig, RouteAuth, RouteConfig};
pub use proxy::Gateway;
