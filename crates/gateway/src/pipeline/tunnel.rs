//! A WebSocket tunnel: the client's and the upstream's upgraded connections joined, bytes
//! copied both ways (not a phase: `forward` opens one when the upstream agrees to upgrade).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;

use crate::worker::ConnInfo;

/// Joins the two sides of a WebSocket once both are handed over, and copies bytes both
/// ways until both have closed, or nothing has moved for `idle`. The client connection's
/// slot is held meanwhile.
pub(super) fn open(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: Arc<str>,
    conn: Option<ConnInfo>,
    idle: Duration,
) {
    tokio::spawn(async move {
        let _slot = conn;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let gauge = metrics::gauge!("gateway_websockets_open", "route" => route);
                gauge.increment(1.0);
                if let Err(e) = pump(TokioIo::new(c), TokioIo::new(u), idle).await {
                    tracing::debug!(error = %e, "WebSocket ended with an error");
                }
                gauge.decrement(1.0);
            }
            Err(e) => tracing::debug!(error = %e, "upgrade not completed"),
        }
    });
}

/// Copies both ways, passing on half-closes, until both sides are done or `idle` passes
/// with no byte either way.
async fn pump<A, B>(mut a: A, mut b: B, idle: Duration) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut buf_a, mut buf_b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = a.read(&mut buf_a), if a_open => match r? {
                0 => {
                    a_open = false;
                    b.shutdown().await?;
                }
                n => b.write_all(&buf_a[..n]).await?,
            },
            r = b.read(&mut buf_b), if b_open => match r? {
                0 => {
                    b_open = false;
                    a.shutdown().await?;
                }
                n => a.write_all(&buf_b[..n]).await?,
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!("WebSocket idle; closed");
                return Ok(());
            }
        }
    }
    Ok(())
}
