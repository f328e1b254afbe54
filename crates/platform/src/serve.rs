//! The HTTP stack every service runs behind, and serving it with a drain that loses no
//! request (the gateway's, `shopmesh_gateway::server`, in the same phases).
//!
//! Stopping, as [`Server::run_with_readiness`] does it:
//! 1. from not-ready (SIGTERM, through the pre-stop delay) the server still accepts and
//!    serves, but every HTTP/1 answer carries `Connection: close`, so a keep-alive client
//!    reconnects (to the replacement, or wherever its balancer sends it) after an answer,
//!    never in the middle of a request; an HTTP/2 connection gets GOAWAY (h2's two-step
//!    one: streams the client sent before it learns of it are still served);
//! 2. at the stop the listener closes (its queued connections move to another listener of
//!    the `SO_REUSEPORT` group where `net.ipv4.tcp_migrate_req=1`);
//! 3. an HTTP/1 connection still open may bring one more request for [`LINGER`] (answered
//!    with `Connection: close`), so a connection accepted but not yet read is served, not
//!    reset; then idle ones are closed and busy ones finish;
//! 4. the server waits for every connection for at most the drain timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::REQUEST_ID_HEADER;
use crate::health::Readiness;
use crate::problem::Problem;

/// Default cap on request bodies (services take small JSON documents).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// Wraps a service's routes in the common stack: request id (kept from the gateway or made
/// here), a tracing span per request carrying it, per-route metrics, a body limit, a panic
/// guard, and problem+json answers for unknown paths and wrong methods.
pub fn stack(service: &'static str, routes: Router, body_limit: usize) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    routes
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED)
                .detail("this method is not allowed on this resource")
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            record_metrics(service, req, next)
        }))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http().make_span_with(move |req: &Request| {
                        let rid = req
                            .headers()
                            .get(REQUEST_ID_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        // The trace id of the W3C trace context, if any.
                        let trace_id = req
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split('-').nth(1))
                            .unwrap_or("");
                        let span = tracing::info_span!(
                            "request",
                            service,
                            method = %req.method(),
                            path = %req.uri().path(),
                            request_id = rid,
                            trace_id,
                        );
                        crate::otel::link_parent(
                            &span,
                            req.headers()
                                .get("traceparent")
                                .and_then(|v| v.to_str().ok()),
                        );
                        span
                    }),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(CatchPanicLayer::custom(
                    |_: Box<dyn std::any::Any + Send>| {
                        Problem::internal(&"handler panicked").into_response()
                    },
                )),
        )
}

async fn record_metrics(service: &'static str, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    let labels = [
        ("service", service.to_owned()),
        ("method", method),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!("http_server_requests_total", &labels).increment(1);
    metrics::histogram!("http_server_request_duration_seconds", &labels[..3])
        .record(start.elapsed().as_secs_f64());
    res
}

/// Most connections one server holds at once; a connection keeps its slot until it ends.
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Once accepting has stopped, how long an HTTP/1 connection may still bring a request
/// (answered with `Connection: close`) before it is closed if idle: a connection the kernel
/// handed over just before the stop gets its answer instead of a reset.
pub const LINGER: Duration = Duration::from_secs(1);

/// A bound listener plus the router it will serve.
pub struct Server {
    pub name: &'static str,
    pub listener: TcpListener,
    pub router: Router,
}

impl Server {
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        router: Router,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("{name}: cannot listen on {addr}: {e}"))
        })?;
        Ok(Self {
            name,
            listener,
            router,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets in-flight requests
    /// finish (bounded by `drain`). As [`Server::run_with_readiness`] with a readiness that
    /// never drains before `shutdown`.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) -> std::io::Result<()> {
        self.run_with_readiness(Readiness::new(), shutdown, drain)
            .await
    }

    /// Serves until `shutdown` is cancelled, then drains for at most `drain` (the module's
    /// phases). From the moment `readiness` drains (SIGTERM, before the pre-stop delay
    /// ends) HTTP/1 answers carry `Connection: close` and HTTP/2 connections get GOAWAY.
    pub async fn run_with_readiness(
        self,
        readiness: Readiness,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> std::io::Result<()> {
        let Server {
            name,
            listener,
            router,
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        let phases = Phases {
            closing: readiness,
            stop: shutdown,
        };
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let linger = CancellationToken::new();
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = phases.stop.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(service = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = phases.stop.cancelled() => break,
            };
            let conn = Connection {
                router: router.clone(),
                peer,
                phases: phases.clone(),
                h2: Arc::new(H2Seen::default()),
            };
            let (builder, linger) = (builder.clone(), linger.clone());
            tokio::spawn(async move {
                conn.serve(&builder, stream, linger).await;
                drop(permit);
            });
        }
        // Stop accepting: queued connections move to another listener of the group where
        // the kernel migrates them (`tcp_migrate_req`).
        drop(listener);
        // All slots back means all connections done.
        let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
        let done = slots.acquire_many(all);
        tokio::pin!(done);
        let linger_for = LINGER.min(drain);
        tokio::select! {
            _ = &mut done => return Ok(()),
            _ = tokio::time::sleep(linger_for) => {}
        }
        linger.cancel();
        tokio::select! {
            _ = &mut done => {}
            _ = tokio::time::sleep(drain.saturating_sub(linger_for)) => {
                tracing::warn!(service = name, "drain timeout: closing remaining connections");
            }
        }
        Ok(())
    }
}

/// Where a server is in its life, as its connections see it (these servers' and the
/// gateway's).
#[derive(Clone)]
pub struct Phases {
    /// Draining (not ready): HTTP/1 answers carry `Connection: close`, HTTP/2 gets GOAWAY.
    pub closing: Readiness,
    /// Cancelled when the server stops accepting.
    pub stop: CancellationToken,
}

impl Phases {
    /// Whether a connection should be told to go: draining, or stopped.
    pub fn closing(&self) -> bool {
        self.closing.is_draining() || self.stop.is_cancelled()
    }
}

/// Whether a connection speaks HTTP/2, as its first request shows.
#[derive(Default)]
struct H2Seen {
    yes: AtomicBool,
    told: Notify,
}

/// One accepted connection and what its requests share.
struct Connection {
    router: Router,
    peer: SocketAddr,
    phases: Phases,
    h2: Arc<H2Seen>,
}

impl Connection {
    /// Serves the connection through the phases: as usual until not-ready; then an HTTP/2
    /// connection gets GOAWAY (its streams finish) and an HTTP/1 one learns from its next
    /// answer; at the stop an HTTP/1 connection (or one that said nothing yet) may bring
    /// requests until `linger`, then it is closed once idle.
    async fn serve(
        self,
        builder: &auto::Builder<TokioExecutor>,
        stream: TcpStream,
        linger: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let Connection {
            router,
            peer,
            phases,
            h2,
        } = self;
        let svc = {
            let (phases, h2) = (phases.clone(), h2.clone());
            hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let http1 = req.version() < http::Version::HTTP_2;
                if !http1 && !h2.yes.swap(true, Ordering::Relaxed) {
                    h2.told.notify_one();
                }
                req.extensions_mut().insert(ConnectInfo(peer));
                let answer = router.clone().oneshot(req);
                let phases = phases.clone();
                async move {
                    let mut res = match answer.await {
                        Ok(res) => res,
                        Err(never) => match never {},
                    };
                    // Decided when the answer leaves: a request that began before SIGTERM
                    // and ends after it closes its connection too (a WebSocket's 101
                    // keeps its connection).
                    if http1 && phases.closing() && res.status() != StatusCode::SWITCHING_PROTOCOLS
                    {
                        res.headers_mut()
                            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(res)
                }
            })
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let result = 'served: {
            tokio::select! {
                r = conn.as_mut() => break 'served r,
                _ = phases.closing.draining() => {}
                _ = phases.stop.cancelled() => {}
            }
            if !h2.yes.load(Ordering::Relaxed) {
                tokio::select! {
                    r = conn.as_mut() => break 'served r,
                    _ = h2.told.notified() => {}
                    _ = phases.stop.cancelled() => tokio::select! {
                        r = conn.as_mut() => break 'served r,
                        _ = h2.told.notified() => {}
                        _ = linger.cancelled() => {}
                    },
                }
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with error");
        }
    }
}
