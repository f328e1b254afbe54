//! The shopmesh service mesh (the design document's "Istio sidecar", the proxy pattern's
//! third form): [`ca`] a certificate authority issuing short-lived SPIFFE-style identities,
//! [`tls`] mutual TLS between sidecars, [`config`] the sidecar's configuration and
//! authorization policy, [`error`] the crate's error type, and [`sidecar`] the sidecar itself, inbound and outbound, on the
//! gateway's data plane (its cluster balancing, breakers and retry budget).

pub mod ca;
pub mod config;
pub mod error;
pub mod sidecar;
pub mod tls;

pub use config::SidecarConfig;
pub use error::MeshError;
pub use sidecar::Sidecar;
