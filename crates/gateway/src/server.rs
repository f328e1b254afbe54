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

/// Most worker threads [`serve_workers`] starts.
pub const MAX_WORKERS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker thread the caller runs on (1..=workers), or 0 off the workers.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// Thread per core, as nginx and pingora do: `workers` OS threads, each with a
/// single-threaded tokio runtime, its own `SO_REUSEPORT` listener on `addr` (the kernel
/// spreads connections among them) and its own upstream connection pools, so a request
/// never hops between threads. Returns the bound address and a handle that joins the
/// workers once `shutdown` is cancelled and they have drained.
pub fn serve_workers(
    addr: std::net::SocketAddr,
    gateway: Gateway,
    shutdown: CancellationToken,
    drain: Duration,
    workers: usize,
) -> std::io::Result<(std::net::SocketAddr, std::thread::JoinHandle<()>)> {
    let workers = workers.clamp(1, MAX_WORKERS);
    let bind = |addr: std::net::SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        listener.into_std()
    };
    // The first bind fixes the port (when `addr` asks for any port).
    let first = bind(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind(bound)?);
    }
    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let (gateway, shutdown) = (gateway.clone(), shutdown.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("gateway-{}", i + 1))
                .spawn(move || {
                    WORKER.with(|w| w.set(i + 1));
                    rt.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => serve(l, gateway, shutdown, drain).await,
                            Err(e) => tracing::error!(error = %e, "worker cannot listen"),
                        }
                    });
                })?,
        );
    }
    let joiner = std::thread::Builder::new()
        .name("gateway-join".into())
        .spawn(move || {
            for t in threads {
                let _ = t.join();
            }
        })?;
    Ok((bound, joiner))
}

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

/// A gateway dropped without [`Standalone::shutdown`] still stops its workers (they drain
/// in the background), so nothing waits on them forever.
impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Standalone {
    /// Loads `path`, binds the listeners and starts serving. `poll` is how often the file
    /// is checked for changes.
    pub async fn start(
        path: std::path::PathBuf,
        poll: Duration,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        // The metrics recorder first, so that nothing recorded at start-up is lost.
        let _ = shopmesh_platform::telemetry::prometheus();
        let cfg = crate::GatewayConfig::from_file(&path)?;
        let (listen, workers) = (cfg.listen, cfg.worker_count());
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
        let (addr, joiner) = serve_workers(
            listen,
            gateway.clone(),
            stop.clone(),
            Duration::from_secs(30),
            workers,
        )
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        tasks.spawn(async move {
            let _ = tokio::task::spawn_blocking(move || joiner.join()).await;
        });
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
