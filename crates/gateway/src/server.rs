//! Accept loop: HTTP/1.1 and HTTP/2 (h2c, or either over TLS by ALPN) through hyper-util,
//! bounded header reading, a cap on open connections (an upgraded connection, a WebSocket,
//! keeps its slot), and graceful shutdown that lets in-flight requests finish. These limits
//! are read at start; a reload does not change them. TLS is taken from the serving
//! generation for each new connection, so a reload renews the certificate.
//!
//! Stopping loses no request a client could not have known to send elsewhere:
//! 1. from not-ready (SIGTERM, through the pre-stop delay) every HTTP/1 answer carries
//!    `Connection: close`, so keep-alive clients reconnect (elsewhere, once balancers have
//!    noticed) after an answer, never in the middle of a request;
//! 2. at the stop the listeners close (their queued connections move to another listener
//!    of the `SO_REUSEPORT` group when `net.ipv4.tcp_migrate_req=1`, or live on in the
//!    process a [`handover`] gave them to); HTTP/2 connections get GOAWAY at once (a client
//!    learns which of its streams were taken and sends the rest elsewhere);
//! 3. an HTTP/1 connection still open may bring one more request for [`LINGER`] (answered
//!    with `Connection: close`); then idle ones are closed and busy ones finish;
//! 4. the server waits for every connection, tunnels included, for at most the drain
//!    timeout.

pub mod handover;

use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use shopmesh_platform::health::Readiness;
use shopmesh_platform::serve::Phases;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::proxy::{Body, Gateway};
pub use crate::worker::{ConnInfo, MAX_WORKERS, worker_index};

/// The gateway as one connection sees it: every request carries its [`ConnInfo`] (the peer,
/// TLS, its place under the connection limit).
/// Cloned for every request: one `Arc` besides the gateway's.
#[derive(Clone)]
struct ConnService {
    gateway: Gateway,
    info: ConnInfo,
    conn: Arc<ConnState>,
}

/// What the server and one connection's requests share.
struct ConnState {
    /// The connection speaks HTTP/2 (seen on its requests).
    h2: AtomicBool,
    phases: Phases,
}

impl Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = <Gateway as Service<http::Request<Incoming>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Incoming>) -> Self::Future {
        let h1 = req.version() < http::Version::HTTP_2;
        if !h1 {
            self.conn.h2.store(true, Ordering::Relaxed);
        }
        req.extensions_mut().insert(self.info.clone());
        let answer = self.gateway.call(req);
        if !h1 || !self.conn.phases.closing() {
            return answer;
        }
        // Draining: this answer is the connection's last, and the client knows it before
        // it sends another request (a WebSocket's 101 keeps its connection).
        Box::pin(async move {
            let mut res = answer.await?;
            if res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                res.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(res)
        })
    }
}

/// `n` listeners on one address with `SO_REUSEPORT` (the kernel spreads connections among
/// them), one per worker thread. The first bind fixes the port when `addr` asks for any.
/// Another process of the same user binding the same address with `SO_REUSEPORT` joins
/// the same group: several gateways share one address.
pub fn reuseport_listeners(
    addr: std::net::SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n.max(1) {
        listeners.push(bind_reuseport(bound)?);
    }
    Ok(listeners)
}

fn bind_reuseport(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

/// Whether a listener bound to `have` serves the configured `want` (any port when it
/// asks for 0).
fn same_address(have: std::net::SocketAddr, want: std::net::SocketAddr) -> bool {
    have == want || (want.port() == 0 && have.ip() == want.ip())
}

/// The proxy's listeners: the inherited ones when they are on `addr` (all of them, so that
/// no accept queue is dropped: more workers than configured if need be), then new ones in
/// the same `SO_REUSEPORT` group up to `n`.
fn listener_set(
    addr: std::net::SocketAddr,
    n: usize,
    inherited: Vec<std::net::TcpListener>,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let (mut kept, other): (Vec<_>, Vec<_>) = inherited
        .into_iter()
        .partition(|l| l.local_addr().is_ok_and(|a| same_address(a, addr)));
    if !other.is_empty() {
        tracing::warn!(
            %addr,
            "the inherited listeners are on another address than `listen`: closed"
        );
    }
    let Some(first) = kept.first() else {
        return reuseport_listeners(addr, n);
    };
    let bound = first.local_addr()?;
    tracing::info!(%bound, inherited = kept.len(), "serving on inherited listeners");
    while kept.len() < n.clamp(1, MAX_WORKERS) {
        kept.push(bind_reuseport(bound)?);
    }
    Ok(kept)
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
    let listeners = reuseport_listeners(addr, workers.clamp(1, MAX_WORKERS))?;
    let phases = Phases {
        closing: Readiness::new(),
        stop: shutdown,
    };
    spawn_workers(listeners, gateway, phases, drain)
}

/// One worker thread per listener.
fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    gateway: Gateway,
    phases: Phases,
    drain: Duration,
) -> std::io::Result<(std::net::SocketAddr, std::thread::JoinHandle<()>)> {
    let bound = listeners[0].local_addr()?;
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        // A child token per worker: its connections wait on it, not on one token that all
        // threads share.
        let phases = Phases {
            closing: phases.closing.clone(),
            stop: phases.stop.child_token(),
        };
        let gateway = gateway.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("gateway-{}", i + 1))
                .spawn(move || {
                    crate::worker::enter_worker(i + 1);
                    rt.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => serve_phases(l, gateway, phases, drain).await,
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

/// Once accepting has stopped, how long an HTTP/1 connection may still bring a request
/// (the services' servers share it). A client that sends on a kept-alive connection at the
/// moment the server closes it sees the request fail (whether it arrived is unknowable); a
/// client busy on the connection gets its answer and the close together within this time,
/// and only a client idle for longer meets the close.
pub use shopmesh_platform::serve::LINGER;

/// Serves `gateway` on `listener` until `shutdown`, then drains for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let phases = Phases {
        closing: Readiness::new(),
        stop: shutdown,
    };
    serve_phases(listener, gateway, phases, drain).await
}

/// As [`serve`], and from the moment `readiness` drains (before the pre-stop delay ends)
/// HTTP/1 answers carry `Connection: close`.
pub async fn serve_with_readiness(
    listener: TcpListener,
    gateway: Gateway,
    readiness: Readiness,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let phases = Phases {
        closing: readiness,
        stop: shutdown,
    };
    serve_phases(listener, gateway, phases, drain).await
}

async fn serve_phases(listener: TcpListener, gateway: Gateway, phases: Phases, drain: Duration) {
    // On a worker's runtime, and on a shared one (`shopmesh up`, the mesh's sidecars): for
    // as long as this server runs, registering a request's timeout does not wake the thread.
    let floor = CancellationToken::new();
    tokio::spawn(
        floor
            .clone()
            .run_until_cancelled_owned(crate::worker::timer_floor()),
    );
    let _floor = floor.drop_guard();
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
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let linger = CancellationToken::new();
    let stop = phases.stop.clone();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
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
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        // Per worker: how the kernel spreads connections over the SO_REUSEPORT group.
        metrics::counter!("gateway_connections_total", "worker" => crate::worker::worker_label())
            .increment(1);
        let tls = gateway.runtime().tls.clone();
        let svc = ConnService {
            gateway: gateway.clone(),
            info: ConnInfo {
                peer: addr,
                tls: tls.is_some(),
                slot: Arc::new(permit),
                peer_ip: crate::wire::ip_value(addr.ip()),
            },
            conn: Arc::new(ConnState {
                h2: AtomicBool::new(false),
                phases: phases.clone(),
            }),
        };
        let (builder, linger) = (builder.clone(), linger.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_io(&builder, TokioIo::new(stream), svc, linger).await,
                // Boxed: a TLS session is large, and an unboxed branch would make every
                // plain connection's task as big as a TLS one's.
                Some(acceptor) => {
                    Box::pin(async move {
                        // The handshake is part of the request head: the same time limit.
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_io(&builder, TokioIo::new(tls), svc, linger).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    })
                    .await
                }
            }
        });
    }
    // Stop accepting. The socket itself closes only if no other process holds it (a
    // successor it was handed over to); a closed one's queued connections move to another
    // listener of its group where the kernel migrates them (`tcp_migrate_req`).
    drop(listener);
    // Every connection holds a slot until it ends (a tunnel too): all slots back means
    // all connections done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let done = slots.acquire_many(all);
    tokio::pin!(done);
    let linger_for = LINGER.min(drain);
    tokio::select! {
        _ = &mut done => return,
        _ = tokio::time::sleep(linger_for) => {}
    }
    linger.cancel();
    tokio::select! {
        _ = &mut done => {}
        _ = tokio::time::sleep(drain - linger_for) => tracing::warn!("gateway drain timed out"),
    }
}

/// Serves one connection. At the stop an HTTP/2 connection gets GOAWAY at once (its
/// in-flight streams finish); an HTTP/1 one (or one that has said nothing yet) may bring
/// requests until `linger` (each answered with `Connection: close`), then is closed if
/// idle or once its request is answered.
async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: ConnService,
    linger: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let state = svc.conn.clone();
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = state.phases.stop.cancelled() => None,
    };
    let ended = match ended {
        None if !state.h2.load(Ordering::Relaxed) => tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = linger.cancelled() => None,
        },
        e => e,
    };
    let r = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
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
    /// From then on, HTTP/1 answers carry `Connection: close`.
    pub readiness: Readiness,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    /// Duplicates of the listening sockets, to hand over to a successor
    /// ([`Standalone::upgrade`]). Dropped when shutdown begins: a socket kept open here
    /// after the workers have stopped accepting would still get connections.
    handover: std::sync::Mutex<Option<Sockets>>,
    /// The process this one replaces, to be told when this one serves.
    predecessor: std::sync::Mutex<Option<handover::Inherited>>,
}

struct Sockets {
    proxy: Vec<OwnedFd>,
    admin: Option<OwnedFd>,
}

/// A gateway dropped without [`Standalone::shutdown`] still stops its workers (they drain
/// in the background), so nothing waits on them forever.
impl Drop for Standalone {
    fn drop(&mut self) {
        self.handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.stop.cancel();
    }
}

/// What the command line adds to a standalone gateway's configuration file.
pub struct StartOptions {
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// Replaces the file's `admin.listen`: instances sharing one file on one host each
    /// need their own admin port.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Sockets handed over by the instance this one replaces; it is told once this one
    /// serves ([`Standalone::announce_ready`]).
    pub inherited: Option<handover::Inherited>,
    /// How long stopping may take, in-flight requests and tunnels included.
    pub drain: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            admin_listen: None,
            inherited: None,
            drain: Duration::from_secs(30),
        }
    }
}

impl Standalone {
    /// Loads `path`, binds the listeners and starts serving. `poll` is how often the file
    /// is checked for changes.
    pub async fn start(
        path: std::path::PathBuf,
        poll: Duration,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(
            path,
            StartOptions {
                poll,
                ..Default::default()
            },
        )
        .await
    }

    /// [`Standalone::start`] with the command line's additions.
    pub async fn start_with(
        path: std::path::PathBuf,
        opts: StartOptions,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        // The metrics recorder first, so that nothing recorded at start-up is lost.
        let _ = shopmesh_platform::telemetry::prometheus();
        let mut cfg = crate::GatewayConfig::from_file(&path)?;
        let overrides = crate::proxy::Overrides {
            admin_listen: opts.admin_listen,
        };
        overrides.apply_to(&mut cfg);
        let mut predecessor = opts.inherited;
        let (inherited, inherited_admin) = predecessor
            .as_mut()
            .map(handover::Inherited::take_listeners)
            .unwrap_or_default();
        let (listen, workers) = (cfg.listen, cfg.worker_count());
        let admin_listener = match cfg.admin.listen {
            Some(a) => Some(
                match inherited_admin
                    .filter(|l| l.local_addr().is_ok_and(|have| same_address(have, a)))
                {
                    Some(l) => TcpListener::from_std(l)?,
                    None => TcpListener::bind(a)
                        .await
                        .map_err(|e| format!("admin: cannot listen on {a}: {e}"))?,
                },
            ),
            None => None,
        };
        let gateway = Gateway::with_overrides(cfg, overrides)?;
        // Ready once the listeners are bound and the configuration is loaded (both done
        // when `start` returns), until shutdown begins.
        let readiness = Readiness::new();
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let listeners = listener_set(listen, workers, inherited)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut sockets = Sockets {
            proxy: listeners
                .iter()
                .map(|l| l.as_fd().try_clone_to_owned())
                .collect::<std::io::Result<_>>()?,
            admin: None,
        };
        let phases = Phases {
            closing: readiness.clone(),
            stop: stop.clone(),
        };
        let (addr, joiner) = spawn_workers(listeners, gateway.clone(), phases, opts.drain)?;
        tasks.spawn(async move {
            let _ = tokio::task::spawn_blocking(move || joiner.join()).await;
        });
        let mut admin = None;
        if let Some(l) = admin_listener {
            sockets.admin = Some(l.as_fd().try_clone_to_owned()?);
            let server = shopmesh_platform::serve::Server {
                name: "gateway-admin",
                listener: l,
                router: crate::admin::router(gateway.clone(), Some(path.clone()))
                    .merge(readiness.router()),
            };
            admin = Some(server.local_addr());
            // Answers from not-ready on close their connection (probes' included), so an
            // idle keep-alive one does not hold the exit for the linger.
            let (token, ready) = (stop.clone(), readiness.clone());
            tasks.spawn(async move {
                let _ = server
                    .run_with_readiness(ready, token, Duration::from_secs(1))
                    .await;
            });
        }
        tasks.spawn(crate::reload::watch(
            gateway.clone(),
            path,
            opts.poll,
            stop.clone(),
        ));
        Ok(Self {
            addr,
            admin,
            gateway,
            readiness,
            stop,
            tasks,
            handover: std::sync::Mutex::new(Some(sockets)),
            predecessor: std::sync::Mutex::new(predecessor),
        })
    }

    /// Tells the instance this one replaces, if any, that this one serves: it stops
    /// accepting and drains (the sockets live on here).
    pub fn announce_ready(&self) {
        if let Some(mut p) = self
            .predecessor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            p.announce_ready();
        }
    }

    /// Binary upgrade: starts `exe args` with this instance's listening sockets
    /// ([`handover`]) and waits up to `within` until it serves. On success (the new
    /// process's id) the caller shuts this instance down, with no pre-stop delay: the
    /// sockets' queues are the new process's now. On error the new process is gone and
    /// this one serves on.
    pub async fn upgrade(
        &self,
        exe: &std::path::Path,
        args: &[std::ffi::OsString],
        within: Duration,
    ) -> std::io::Result<u32> {
        let taken = self
            .handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(sockets) = taken else {
            return Err(std::io::Error::other(
                "an upgrade is already under way, or shutdown has begun",
            ));
        };
        let started =
            handover::start_successor(exe, args, &sockets.proxy, sockets.admin.as_ref(), within)
                .await;
        if started.is_err() && !self.stop.is_cancelled() {
            *self.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(sockets);
        }
        started
    }

    /// Stops accepting, lets in-flight requests finish, and returns.
    pub async fn shutdown(mut self) {
        self.handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.readiness.drain();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        crate::access::flush_all();
    }
}
