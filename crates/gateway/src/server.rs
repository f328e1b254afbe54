//! Accept loop: HTTP/1.1 and HTTP/2 (h2c) through hyper-util, bounded header reading, a
//! cap on open connections, and graceful shutdown that lets in-flight requests finish.
//! These limits are read at start; a reload does not change them.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::proxy::{ClientAddr, Gateway};

/// Serves `gateway` on `listener` until `shutdown`, then drains for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let limits = gateway.runtime().config.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(64 * 1024)
        .max_headers(limits.max_headers);
    builder.http2().max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc =
            gateway
                .clone()
                .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ClientAddr(addr));
                    req
                });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with error");
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("gateway drain timed out"),
    }
}

/// A standalone gateway started from a configuration file: the proxy listener, the admin
/// API, and the reloader watching the file.
pub struct Standalone {
    pub addr: std::net::SocketAddr,
    pub admin: Option<std::net::SocketAddr>,
    pub gateway: Gateway,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Standalone {
    /// Loads `path`, binds the listeners and starts serving. `poll` is how often the file
    /// is checked for changes.
    pub async fn start(
        path: std::path::PathBuf,
        poll: Duration,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let cfg = crate::GatewayConfig::from_file(&path)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        let admin_listener = match cfg.admin.listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("admin: cannot listen on {a}: {e}"))?,
            ),
            None => None,
        };
        let gateway = Gateway::new(cfg)?;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let addr = listener.local_addr()?;
        tasks.spawn(serve(
            listener,
            gateway.clone(),
            stop.clone(),
            Duration::from_secs(30),
        ));
        let mut admin = None;
        if let Some(l) = admin_listener {
            let server = shopmesh_platform::serve::Server {
                name: "gateway-admin",
                listener: l,
                router: crate::admin::router(gateway.clone(), Some(path.clone())),
            };
            admin = Some(server.local_addr());
            let token = stop.clone();
            tasks.spawn(async move {
                let _ = server.run(token, Duration::from_secs(1)).await;
            });
        }
        tasks.spawn(crate::reload::watch(
            gateway.clone(),
            path,
            poll,
            stop.clone(),
        ));
        Ok(Self {
            addr,
            admin,
            gateway,
            stop,
            tasks,
        })
    }

    /// Stops accepting, lets in-flight requests finish, and returns.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
