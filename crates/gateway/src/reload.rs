//! Hot reload: the configuration file is re-read when its content, or that of the TLS
//! certificate or key it names, changes (checked every `poll`, which also catches editors'
//! atomic renames, Kubernetes ConfigMap and Secret symlink swaps, and renewed
//! certificates) and on SIGHUP. Each reload goes through [`Gateway::reload_file`], the same
//! parse-validate-build path as start-up; an invalid file changes nothing.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::proxy::Gateway;

/// The configuration file's digest, with the serving TLS files' (a missing one counts as
/// empty).
fn digest(gateway: &Gateway, path: &PathBuf) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(std::fs::read(path).ok()?);
    if let Some(tls) = &gateway.runtime().config.tls {
        for f in [&tls.cert_file, &tls.key_file] {
            h.update([0]);
            h.update(std::fs::read(f).unwrap_or_default());
        }
    }
    Some(h.finalize().into())
}

/// Watches `path` until `stop`.
pub async fn watch(gateway: Gateway, path: PathBuf, poll: Duration, stop: CancellationToken) {
    let mut last = digest(&gateway, &path);
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            _ = sighup => true,
        };
        let now = digest(&gateway, &path);
        if forced || (now.is_some() && now != last) {
            tracing::info!(path = %path.display(), trigger = if forced { "SIGHUP" } else { "file change" }, "reloading configuration");
            // Errors are logged and kept for the admin API by `reload_file`.
            let _ = gateway.reload_file(&path);
            // Over the TLS files the new generation names.
            last = digest(&gateway, &path).or(now);
        }
    }
}
