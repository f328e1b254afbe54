//! Accept loop: HTTP/1.1 and HTTP/2 (h2c, or either over TLS by ALPN) through hyper-util,
//! bounded header reading, a cap on open connections (an upgraded connection, a WebSocket,
//! keeps its slot), and graceful shutdown that lets in-flight requests finish. These limits
//! are read at start; a reload does not change them. TLS is taken from the serving
//! generation for each new connection, so a reload renews the certificate.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::proxy::{Body, ClientAddr, Gateway};

/// What the gateway knows of the connection a request came on (a request extension).
#[derive(Clone)]
pub struct ConnInfo {
    /// The client spoke TLS.
    pub tls: bool,
    /// The connection's place under `limits.max_connections`, held as long as any clone
    /// lives: an upgraded connection (a WebSocket tunnel) keeps it.
    pub slot: Arc<OwnedSemaphorePermit>,
}

/// The gateway as one connection sees it: every request carries the peer and [`ConnInfo`].
#[derive(Clone)]
struct ConnService {
    gateway: Gateway,
    peer: std::net::SocketAddr,
    info: ConnInfo,
}

impl Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = <Gateway as Service<http::Request<Incoming>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ClientAddr(self.peer));
        req.extensions_mut().insert(self.info.clone());
        self.gateway.call(req)
    }
}

/// Most worker threads [`serve_workers`] starts.
pub const MAX_WORKERS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker thread the caller runs on (1..=workers), or 0 off the workers.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// `n` listeners on one address with `SO_REUSEPORT` (the kernel spreads connections among
/// them), one per worker thread. The first bind fixes the port when `addr` asks for any.
pub fn reuseport_listeners(
    addr: std::net::SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let bind = |addr: std::net::SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(4096)?.into_std()
    };
    let first = bind(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n.max(1) {
        listeners.push(bind(bound)?);
    }
    Ok(listeners)
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
    let listeners = reuseport_listeners(addr, workers)?;
    let bound = listeners[0].local_addr()?;
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
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(100)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
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
        let tls = gateway.runtime().tls.clone();
        let svc = ConnService {
            gateway: gateway.clone(),
            peer: addr,
            info: ConnInfo {
                tls: tls.is_some(),
                slot: Arc::new(permit),
            },
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            match tls {
                None => serve_io(&builder, watcher, TokioIo::new(stream), svc).await,
                // Boxed: a TLS session is large, and an unboxed branch would make every
                // plain connection's task as big as a TLS one's.
                Some(acceptor) => {
                    Box::pin(async move {
                        // The handshake is part of the request head: the same time limit.
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                serve_io(&builder, watcher, TokioIo::new(tls), svc).await
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    })
                    .await
                }
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("gateway drain timed out"),
    }
}

async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    svc: ConnService,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(svc));
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with error");
    }
}

/// A standalone gateway started from a configuration file: the proxy listener, the admin
/// API, and the reloader watching the file.
pub struct Standalone {
    pub addr: std::net::SocketAddr,
    pub admin: Option<std::net::SocketAddr>,
    pub gateway: Gateway,
    /// `/readyz` on the admin port; [`shopmesh_platform::health::prestop`] turns it off.
    pub readiness: shopmesh_platform::health::Readiness,
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
        // Ready once the listeners are bound and the configuration is loaded (both done
        // when `start` returns), until shutdown begins.
        let readiness = shopmesh_platform::health::Readiness::new();
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
                router: crate::admin::router(gateway.clone(), Some(path.clone()))
                    .merge(readiness.router()),
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
            readiness,
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
