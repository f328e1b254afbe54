//! `shopmesh mesh …` (the mesh's certificate authority) and `shopmesh sidecar`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shopmesh_mesh::ca::{Ca, ca_paths};

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
