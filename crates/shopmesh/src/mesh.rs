//! `shopmesh mesh …` (the mesh's certificate authority, the shop's sidecar configurations)
//! and `shopmesh sidecar`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shopmesh_mesh::ca::{Ca, ca_paths};
use shopmesh_mesh::config::{AdminConfig, SidecarConfig};
use shopmesh_shop::{ServiceName, mesh};

#[derive(Args)]
pub struct MeshArgs {
    #[command(subcommand)]
    what: MeshCommand,
}

#[derive(Subcommand)]
enum MeshCommand {
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Service certificates.
    Cert {
        #[command(subcommand)]
        action: CertAction,
    },
    /// Print the configuration of one sidecar of the shop's mesh when each service runs as
    /// a process of its own (`shopmesh service NAME`): an inbound sidecar with the shop's
    /// policy for pricing, payments or users (at its service port + 8000 unless --listen
    /// says otherwise), or orders' outbound sidecar (at 127.0.0.1:15001) calling their
    /// inbound sidecars. Start orders with `--sidecar http://<its outbound address>`.
    SidecarConfig(SidecarConfigArgs),
}

#[derive(Args)]
struct SidecarConfigArgs {
    /// pricing, payments or users (an inbound sidecar), or orders (its outbound one).
    #[arg(long)]
    service: ServiceName,
    /// The mesh directory: its CA and the service's certificate (`shopmesh mesh ca init`,
    /// `shopmesh mesh cert issue`), named as the configuration's paths.
    #[arg(long)]
    dir: PathBuf,
    /// Where the sidecar listens.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// An inbound sidecar's local service (default: 127.0.0.1 at the service's port).
    #[arg(long)]
    local: Option<SocketAddr>,
    /// orders: where a callee's inbound sidecars are, `NAME=HOST:PORT`, repeated for
    /// several instances (default: 127.0.0.1 at the callee's port + 8000).
    #[arg(long = "target", value_parser = crate::parse_service_addr)]
    targets: Vec<(ServiceName, SocketAddr)>,
    /// The sidecar's admin listener (/metrics, /healthz); none by default.
    #[arg(long)]
    admin: Option<SocketAddr>,
}

/// The configuration `shopmesh mesh sidecar-config` prints.
fn sidecar_config(a: &SidecarConfigArgs) -> anyhow::Result<SidecarConfig> {
    let local_host = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let mut cfg = if a.service == ServiceName::Orders {
        anyhow::ensure!(a.local.is_none(), "--local is for an inbound sidecar");
        let listen = a.listen.unwrap_or(local_host(mesh::OUTBOUND_PORT));
        mesh::outbound_config(&a.dir, &listen.to_string(), |callee| {
            let given: Vec<SocketAddr> = a
                .targets
                .iter()
                .filter(|(s, _)| *s == callee)
                .map(|(_, at)| *at)
                .collect();
            if given.is_empty() {
                vec![local_host(mesh::inbound_port(callee))]
            } else {
                given
            }
        })
    } else {
        anyhow::ensure!(
            mesh::CALLEES.contains(&a.service),
            "{} is not in the shop's mesh: it calls no service and none calls it (pricing, payments and users have inbound sidecars, orders an outbound one)",
            a.service.as_str()
        );
        anyhow::ensure!(
            a.targets.is_empty(),
            "--target is for orders' outbound sidecar"
        );
        let listen = a
            .listen
            .unwrap_or(local_host(mesh::inbound_port(a.service)));
        let local = a.local.unwrap_or(local_host(a.service.default_port()));
        mesh::inbound_config(&a.dir, &listen.to_string(), a.service, local)
    };
    cfg.admin = a.admin.map(|at| AdminConfig {
        listen: at.to_string(),
    });
    Ok(cfg)
}

#[derive(Subcommand)]
enum CaAction {
    /// Create a CA (`ca.pem`, `ca-key.pem`) in DIR; an existing one is never overwritten.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// How long the CA is valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum CertAction {
    /// Issue a short-lived certificate for a service (`NAME.pem`, `NAME-key.pem` in DIR)
    /// with the URI SAN `spiffe://shopmesh/service/NAME`, signed by DIR's CA. Reissue it
    /// before it expires: sidecars pick up the new files without dropping a request.
    Issue {
        #[arg(long)]
        service: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

pub fn run(a: MeshArgs) -> anyhow::Result<()> {
    match a.what {
        MeshCommand::Ca {
            action: CaAction::Init { dir, days },
        } => {
            Ca::generate(days).and_then(|ca| ca.save(&dir))?;
            println!("{}", ca_paths(&dir).0.display());
        }
        MeshCommand::Cert {
            action:
                CertAction::Issue {
                    service,
                    dir,
                    ttl_hours,
                },
        } => {
            anyhow::ensure!(ttl_hours > 0, "--ttl-hours must be at least 1");
            let ca = Ca::load(&dir)?;
            let leaf = ca.issue(&service, Duration::from_secs(ttl_hours * 3600))?;
            let (cert, _key) = leaf.save(&dir, &service)?;
            println!("{} (until {})", cert.display(), leaf.not_after);
        }
        MeshCommand::SidecarConfig(a) => {
            let cfg = sidecar_config(&a)?;
            // JSON is YAML; the sidecar reads it as its configuration.
            crate::print_document(&serde_json::to_string_pretty(&cfg)?)?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct SidecarArgs {
    /// The sidecar's YAML configuration (reloaded with its TLS files on change and on
    /// SIGHUP).
    #[arg(long, env = "SHOPMESH_SIDECAR_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and its TLS files, and exit.
    #[arg(long)]
    check: bool,
    /// How often the configuration and TLS files are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_poll_ms: u64,
}

pub async fn sidecar(a: SidecarArgs) -> anyhow::Result<()> {
    if a.check {
        let cfg = shopmesh_mesh::SidecarConfig::load(&a.config.to_string_lossy())?;
        shopmesh_mesh::tls::Material::load(&cfg.tls, &cfg.service)?;
        println!("{}: valid", a.config.display());
        return Ok(());
    }
    let s = shopmesh_mesh::Sidecar::start_file(&a.config)
        .await
        .with_context(|| format!("sidecar {}", a.config.display()))?;
    s.watch(Duration::from_millis(a.reload_poll_ms.max(10)));
    crate::shutdown_signal().await;
    s.shutdown();
    Ok(())
}
