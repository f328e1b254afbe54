//! `shopmesh up --mesh`: every call between services goes through sidecars over mutual TLS
//! (the proxy pattern's third form), in the same process as the rest of the shop.
//!
//! - The mesh CA lives in the mesh directory (`ca.pem`, `ca-key.pem`); it is made on first
//!   start and kept.
//! - Each instance of a service that is called by another (pricing, payments, users) gets
//!   an inbound sidecar in front of it, with the shop's policy: only orders may call it, on
//!   the routes orders uses ([`policy`]); anything else is 403 problem+json. A replica
//!   ([`Replica`], `SystemConfig::replicas`) has its sidecar on its own runtime, so that it
//!   dies with it.
//! - orders gets an outbound sidecar; its clients send plain HTTP to it by service name
//!   ([`shopmesh_platform::client::ServiceClient::through`]); it balances over the
//!   instances of each.
//! - Leaf certificates live [`LEAF_TTL`] and are re-issued at a third of it; the sidecars
//!   reload them in place, so a rotation drops nothing.
//!
//! The gateway reaches the services directly: it is the way in, not a member of the mesh.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shopmesh_gateway::config::ClusterConfig;
use shopmesh_mesh::ca::{Ca, ca_paths, leaf_paths};
use shopmesh_mesh::config::{InboundConfig, MeshTls, OutboundConfig, Rule, SidecarConfig};
use shopmesh_mesh::sidecar::Sidecar;
use tokio_util::sync::CancellationToken;

use crate::{Error, ServiceName};

/// How long a leaf certificate lives.
pub const LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// The mesh CA's lifetime, when `up` makes one.
const CA_DAYS: u32 = 365;

/// The services orders calls, and what of each.
pub const CALLEES: [ServiceName; 3] = [
    ServiceName::Pricing,
    ServiceName::Payments,
    ServiceName::Users,
];

/// The shop's authorization policy: what orders may call on `service`; nobody else may.
pub fn policy(service: ServiceName) -> Vec<Rule> {
    let rule = |paths: &[&str], methods: &[&str]| Rule {
        from: ServiceName::Orders.as_str().to_owned(),
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
    };
    match service {
        ServiceName::Pricing => vec![rule(&["/api/prices"], &["GET"])],
        ServiceName::Payments => vec![rule(&["/api/payment-methods"], &["GET", "POST"])],
        ServiceName::Users => vec![rule(&["/internal/users/"], &["GET"])],
        _ => Vec::new(),
    }
}

/// The running sidecars.
pub struct Mesh {
    /// orders' outbound sidecar, as an HTTP proxy URL.
    pub outbound: String,
    /// Each inbound sidecar: the service behind it and its mutual-TLS address; a service's
    /// first instance first, then its replicas in order.
    pub inbound: Vec<(ServiceName, SocketAddr)>,
    sidecars: Vec<Sidecar>,
    stop: CancellationToken,
}

fn mesh_error(e: impl std::fmt::Display) -> Error {
    Error::Service {
        service: "mesh",
        reason: e.to_string(),
    }
}

fn tls(dir: &Path, service: ServiceName) -> MeshTls {
    let (ca, _) = ca_paths(dir);
    let (cert, key) = leaf_paths(dir, service.as_str());
    MeshTls {
        ca_file: ca.to_string_lossy().into_owned(),
        cert_file: cert.to_string_lossy().into_owned(),
        key_file: key.to_string_lossy().into_owned(),
    }
}

/// Issues (or re-issues) the leaf of every service in the mesh.
fn issue_all(ca: &Ca, dir: &Path) -> Result<(), Error> {
    for s in CALLEES.iter().chain([&ServiceName::Orders]) {
        ca.issue(s.as_str(), LEAF_TTL)
            .and_then(|leaf| leaf.save(dir, s.as_str()))
            .map_err(mesh_error)?;
    }
    Ok(())
}

/// A further instance of a callee: where it listens, and the runtime its inbound sidecar
/// runs on (the instance's own, so that killing the instance kills its sidecar too).
pub struct Replica {
    pub service: ServiceName,
    pub local: SocketAddr,
    pub runtime: tokio::runtime::Handle,
}

/// Where orders' outbound sidecar listens by default when each service runs as a process of
/// its own (`shopmesh mesh sidecar-config`).
pub const OUTBOUND_PORT: u16 = 15001;

/// Where a callee's inbound sidecar listens by default in that mode: its service's port
/// plus 8000 (pricing 15003, users 15005, payments 15007).
pub fn inbound_port(service: ServiceName) -> u16 {
    service.default_port() + 8000
}

/// The inbound sidecar of a callee (`service`, one of [`CALLEES`]) listening on `listen`,
/// in front of its instance at `local`, with the shop's [`policy`]; TLS files in `dir`.
pub fn inbound_config(
    dir: &Path,
    listen: &str,
    service: ServiceName,
    local: SocketAddr,
) -> SidecarConfig {
    SidecarConfig {
        service: service.as_str().to_owned(),
        inbound: Some(InboundConfig {
            listen: listen.to_owned(),
            local: format!("http://{local}"),
            timeout_ms: 15_000,
        }),
        outbound: None,
        admin: None,
        tls: tls(dir, service),
        targets: Vec::new(),
        policy: Some(policy(service)),
    }
}

/// orders' outbound sidecar listening on `listen`, calling each of [`CALLEES`] at the
/// inbound sidecars `at(callee)` gives; TLS files in `dir`.
pub fn outbound_config(
    dir: &Path,
    listen: &str,
    at: impl Fn(ServiceName) -> Vec<SocketAddr>,
) -> SidecarConfig {
    SidecarConfig {
        service: ServiceName::Orders.as_str().to_owned(),
        inbound: None,
        outbound: Some(OutboundConfig {
            listen: listen.to_owned(),
        }),
        admin: None,
        tls: tls(dir, ServiceName::Orders),
        targets: CALLEES
            .iter()
            .map(|s| {
                let endpoints = at(*s).iter().map(|a| format!("https://{a}")).collect();
                ClusterConfig::new(s.as_str(), endpoints)
            })
            .collect(),
        policy: None,
    }
}

impl Mesh {
    /// Starts the sidecars on `host` (any free ports), in front of the services at `addr`
    /// and of the `replicas`.
    pub async fn start(
        dir: PathBuf,
        host: IpAddr,
        addr: impl Fn(ServiceName) -> SocketAddr,
        replicas: &[Replica],
    ) -> Result<Self, Error> {
        let ca = if ca_paths(&dir).1.exists() {
            Ca::load(&dir).map_err(mesh_error)?
        } else {
            let ca = Ca::generate(CA_DAYS).map_err(mesh_error)?;
            ca.save(&dir).map_err(mesh_error)?;
            ca
        };
        issue_all(&ca, &dir)?;
        let any = SocketAddr::new(host, 0).to_string();
        let mut sidecars = Vec::new();
        let mut inbound = Vec::new();
        for service in CALLEES {
            let first = Sidecar::start(inbound_config(&dir, &any, service, addr(service)));
            let mut started = vec![first.await.map_err(mesh_error)?];
            for r in replicas.iter().filter(|r| r.service == service) {
                let cfg = inbound_config(&dir, &any, service, r.local);
                // Started on the replica's runtime: its tasks are spawned there.
                let sidecar = r
                    .runtime
                    .spawn(Sidecar::start(cfg))
                    .await
                    .map_err(mesh_error)?
                    .map_err(mesh_error)?;
                started.push(sidecar);
            }
            for sidecar in started {
                let at = sidecar
                    .inbound_addr
                    .ok_or_else(|| mesh_error("an inbound sidecar has no address"))?;
                inbound.push((service, at));
                sidecars.push(sidecar);
            }
        }
        let orders = Sidecar::start(outbound_config(&dir, &any, |s| {
            inbound
                .iter()
                .filter(|(t, _)| *t == s)
                .map(|(_, at)| *at)
                .collect()
        }))
        .await
        .map_err(mesh_error)?;
        let outbound = orders
            .outbound_addr
            .map(|a| format!("http://{a}"))
            .ok_or_else(|| mesh_error("the outbound sidecar has no address"))?;
        sidecars.push(orders);
        let stop = CancellationToken::new();
        tokio::spawn(rotate(ca, dir, sidecars.clone(), stop.clone()));
        Ok(Self {
            outbound,
            inbound,
            sidecars,
            stop,
        })
    }

    /// Stops the sidecars (after the services: calls under way finish first).
    pub async fn shutdown(self) {
        self.stop.cancel();
        for s in &self.sidecars {
            s.shutdown();
        }
        for s in &self.sidecars {
            s.stopped().await;
        }
    }
}

/// Re-issues every leaf at a third of its life and has each sidecar reload it.
async fn rotate(ca: Ca, dir: PathBuf, sidecars: Vec<Sidecar>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEAF_TTL / 3) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = issue_all(&ca, &dir) {
            tracing::error!(error = %e, "mesh certificates not re-issued; retried later");
            continue;
        }
        for s in &sidecars {
            if let Err(e) = s.reload() {
                tracing::error!(error = %e, "a sidecar kept its old certificate");
            }
        }
        tracing::info!("mesh certificates re-issued");
    }
}
