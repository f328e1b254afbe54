//! The sidecar: one beside each service instance, on the gateway's data plane.
//!
//! - **Inbound** (`inbound.listen`): mutual TLS only (TLS 1.3, a client certificate of the
//!   mesh CA required); the caller is the service its certificate's SPIFFE id names; the
//!   policy decides (403 problem+json, counted); the request goes to the local service on
//!   loopback with `x-shopmesh-peer-service: <caller>` (any copy the caller sent is
//!   removed first, so the service can trust it).
//! - **Outbound** (`outbound.listen`, loopback): the local service sends plain HTTP with
//!   the target service as the `Host` header (`http://127.0.0.1:15001/api/...` with
//!   `Host: payments`, a port in it ignored); the sidecar balances over the target's
//!   sidecars with the gateway's [`Cluster`] (balancer, per-endpoint breakers as outlier
//!   detection, retry budget, timeouts) and speaks mutual TLS, accepting only a peer whose
//!   certificate names the target's SPIFFE id. A request that could not be connected is
//!   sent elsewhere whatever its method (its body is buffered, ≤ 1 MiB), and so is one
//!   the target's sidecar answered 503 with `x-shopmesh-not-delivered` (its local service
//!   refused the connection: the request never reached it); one that failed after
//!   sending only if idempotent; all within the cluster's attempts and budget.
//! - **Reload** ([`Sidecar::reload`]; on SIGHUP and when the configuration or a TLS file
//!   changes): a whole new generation (TLS material, policy, targets; endpoints and their
//!   breakers kept) is swapped in atomically; connections and requests under way keep the
//!   one they started with, so a certificate rotation drops nothing.
//! - **Telemetry**: Istio's standard metrics, `istio_requests_total{reporter,
//!   source_workload, destination_workload, response_code}` and
//!   `istio_request_duration_milliseconds` (a histogram), `mesh_policy_denials_total`,
//!   `mesh_tls_handshake_failures_total`; W3C `traceparent`/`tracestate` and
//!   `x-request-id` carried across the hop unchanged; one access-log line per request
//!   (target `mesh_access`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shopmesh_gateway::cluster::Cluster;
use shopmesh_platform::problem::Problem;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ca::service_of_cert;
use crate::config::{Policy, SidecarConfig};
use crate::error::MeshError;
use crate::tls::Material;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// The header carrying the calling service's verified identity to the local service.
pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-shopmesh-peer-service");

/// Set by an inbound sidecar on its 503 when the local service could not be connected to:
/// the request never reached it, so the caller's sidecar may send it to another instance
/// whatever its method. Removed from the local service's own answers (a service cannot
/// claim it) and from what the outbound side hands back.
pub const NOT_DELIVERED_HEADER: HeaderName = HeaderName::from_static("x-shopmesh-not-delivered");

/// Bodies buffered by the outbound side (so that a request can go to another endpoint).
const MAX_BODY: usize = 1 << 20;

struct Target {
    cluster: Cluster,
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

/// One configuration generation: everything a request needs, swapped whole.
struct Generation {
    cfg: SidecarConfig,
    acceptor: Option<TlsAcceptor>,
    policy: Policy,
    targets: HashMap<String, Arc<Target>>,
    local: Option<(Uri, Duration)>,
}

impl Generation {
    fn build(cfg: SidecarConfig, previous: Option<&Generation>) -> Result<Self, MeshError> {
        cfg.validate()?;
        let material = Material::load(&cfg.tls, &cfg.service)?;
        let acceptor = match &cfg.inbound {
            Some(_) => Some(TlsAcceptor::from(material.server_config()?)),
            None => None,
        };
        let mut targets = HashMap::new();
        for t in &cfg.targets {
            let prev = previous.and_then(|p| p.targets.get(&t.name));
            let cluster =
                Cluster::new(t, prev.map(|p| &p.cluster), 0).map_err(|e| MeshError::Target {
                    target: t.name.clone(),
                    reason: e.to_string(),
                })?;
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_millis(t.timeouts.connect_ms)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config({
                    // hyper-rustls sets ALPN itself (http/1.1, from `enable_http1`).
                    let mut c = Arc::unwrap_or_clone(material.client_config(&t.name)?);
                    c.alpn_protocols.clear();
                    c
                })
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_millis(t.timeouts.idle_ms))
                .pool_max_idle_per_host(t.timeouts.max_idle_per_endpoint)
                .build(https);
            targets.insert(t.name.clone(), Arc::new(Target { cluster, client }));
        }
        let local = match &cfg.inbound {
            Some(i) => Some((
                i.local
                    .parse::<Uri>()
                    .map_err(|e| MeshError::Invalid(format!("inbound.local `{}`: {e}", i.local)))?,
                Duration::from_millis(i.timeout_ms),
            )),
            None => None,
        };
        Ok(Self {
            policy: Policy::new(cfg.policy.clone()),
            cfg,
            acceptor,
            targets,
            local,
        })
    }
}

struct Shared {
    path: Option<std::path::PathBuf>,
    generation: ArcSwap<Generation>,
    service: String,
}

/// A running sidecar. Dropping it does not stop it: call [`Sidecar::shutdown`].
#[derive(Clone)]
pub struct Sidecar {
    shared: Arc<Shared>,
    stop: CancellationToken,
    pub inbound_addr: Option<SocketAddr>,
    pub outbound_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

impl Sidecar {
    /// Reads the configuration file, binds the listeners and starts serving.
    pub async fn start_file(path: impl Into<std::path::PathBuf>) -> Result<Self, MeshError> {
        let path = path.into();
        let cfg = SidecarConfig::load(&path.to_string_lossy())?;
        Self::start_with(cfg, Some(path)).await
    }

    /// Starts from a configuration in memory ([`Sidecar::reload`] then re-reads nothing).
    pub async fn start(cfg: SidecarConfig) -> Result<Self, MeshError> {
        Self::start_with(cfg, None).await
    }

    async fn start_with(
        cfg: SidecarConfig,
        path: Option<std::path::PathBuf>,
    ) -> Result<Self, MeshError> {
        let _ = shopmesh_platform::telemetry::prometheus();
        let generation = Generation::build(cfg.clone(), None)?;
        let shared = Arc::new(Shared {
            path,
            service: cfg.service.clone(),
            generation: ArcSwap::from_pointee(generation),
        });
        let stop = CancellationToken::new();
        let bind = |addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|error| MeshError::Bind { addr, error })
        };
        let mut me = Self {
            shared: shared.clone(),
            stop: stop.clone(),
            inbound_addr: None,
            outbound_addr: None,
            admin_addr: None,
        };
        if let Some(i) = &cfg.inbound {
            let l = bind(i.listen.clone()).await?;
            me.inbound_addr = l.local_addr().ok();
            tokio::spawn(serve_inbound(l, shared.clone(), stop.clone()));
        }
        if let Some(o) = &cfg.outbound {
            let l = bind(o.listen.clone()).await?;
            me.outbound_addr = l.local_addr().ok();
            tokio::spawn(serve_outbound(l, shared.clone(), stop.clone()));
        }
        if let Some(a) = &cfg.admin {
            let l = bind(a.listen.clone()).await?;
            me.admin_addr = l.local_addr().ok();
            let app = shopmesh_platform::telemetry::admin_router();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            });
        }
        tracing::info!(service = %cfg.service, inbound = ?me.inbound_addr, outbound = ?me.outbound_addr, admin = ?me.admin_addr, "sidecar serving");
        Ok(me)
    }

    /// Re-reads the configuration file (if started from one) and the TLS files, and swaps
    /// the new generation in. On error the serving one stays.
    pub fn reload(&self) -> Result<(), MeshError> {
        let cfg = match &self.shared.path {
            Some(p) => SidecarConfig::load(&p.to_string_lossy())?,
            None => self.shared.generation.load().cfg.clone(),
        };
        if cfg.service != self.shared.service {
            return Err(MeshError::ServiceChanged {
                from: self.shared.service.clone(),
                to: cfg.service,
            });
        }
        let current = self.shared.generation.load_full();
        let next = Generation::build(cfg, Some(&current)).inspect_err(|e| {
            tracing::error!(error = %e, "sidecar reload failed; serving on");
            metrics::counter!("mesh_reloads_total", "result" => "error").increment(1);
        })?;
        self.shared.generation.store(Arc::new(next));
        metrics::counter!("mesh_reloads_total", "result" => "ok").increment(1);
        tracing::info!("sidecar reloaded");
        Ok(())
    }

    /// Reloads on SIGHUP and whenever the configuration file or a TLS file it names
    /// changes (polled every `poll`), until [`Sidecar::shutdown`].
    pub fn watch(&self, poll: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let snapshot = |me: &Sidecar| {
                let g = me.shared.generation.load();
                let mut files = vec![
                    g.cfg.tls.ca_file.clone(),
                    g.cfg.tls.cert_file.clone(),
                    g.cfg.tls.key_file.clone(),
                ];
                files.extend(
                    me.shared
                        .path
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned()),
                );
                files
                    .iter()
                    .map(|f| std::fs::read(f).unwrap_or_default())
                    .collect::<Vec<_>>()
            };
            let mut last = snapshot(&me);
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
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
                    _ = me.stop.cancelled() => return,
                    _ = tick.tick() => false,
                    _ = sighup => true,
                };
                let now = snapshot(&me);
                if forced || now != last {
                    let _ = me.reload();
                    last = snapshot(&me);
                }
            }
        });
    }

    /// Stops accepting; connections under way finish on their own.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }
}

async fn serve_inbound(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = shared.generation.load().acceptor.clone() else {
                return;
            };
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "inbound TLS handshake refused");
                    metrics::counter!("mesh_tls_handshake_failures_total", "direction" => "inbound").increment(1);
                    return;
                }
                Err(_) => return,
            };
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| service_of_cert(c));
            let Some(caller) = caller else {
                metrics::counter!("mesh_tls_handshake_failures_total", "direction" => "inbound")
                    .increment(1);
                return;
            };
            let caller: Arc<str> = caller.into();
            let svc = hyper::service::service_fn(move |req| {
                let (shared, caller) = (shared.clone(), caller.clone());
                async move { Ok::<_, std::convert::Infallible>(inbound(&shared, &caller, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc);
            // Shutting down drops the connections too: the sidecar is gone, as a killed
            // process would be (its local service's own shutdown is what drains).
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn problem(p: Problem) -> Response<Body> {
    let mut res = Response::new(
        Full::new(Bytes::from(p.to_body()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *res.status_mut() = p.status;
    for (k, v) in p.headers() {
        res.headers_mut().insert(k, v);
    }
    res
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    for h in listed {
        headers.remove(h);
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        headers.remove(h);
    }
}

/// One request through the sidecar, for its metrics and access-log line.
struct Hop<'a> {
    reporter: &'static str,
    source: &'a str,
    destination: &'a str,
    method: Method,
    path: String,
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
    started: Instant,
}

impl<'a> Hop<'a> {
    fn new<B>(
        reporter: &'static str,
        source: &'a str,
        destination: &'a str,
        req: &Request<B>,
    ) -> Self {
        Self {
            reporter,
            source,
            destination,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            request_id: req.headers().get("x-request-id").cloned(),
            traceparent: req.headers().get("traceparent").cloned(),
            started: Instant::now(),
        }
    }

    /// Istio's standard metrics, and the access-log line.
    fn done(self, status: StatusCode, endpoint: Option<&str>) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let code = status.as_str().to_owned();
        metrics::counter!("istio_requests_total",
            "reporter" => self.reporter, "source_workload" => self.source.to_owned(),
            "destination_workload" => self.destination.to_owned(), "response_code" => code.clone())
        .increment(1);
        metrics::histogram!("istio_request_duration_milliseconds",
            "reporter" => self.reporter, "source_workload" => self.source.to_owned(),
            "destination_workload" => self.destination.to_owned(), "response_code" => code)
        .record(ms);
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        tracing::info!(
            target: "mesh_access",
            reporter = self.reporter,
            source_workload = self.source,
            destination_workload = self.destination,
            method = %self.method,
            path = self.path,
            status = status.as_u16(),
            duration_ms = ms,
            endpoint = endpoint.unwrap_or(""),
            request_id = text(&self.request_id),
            traceparent = text(&self.traceparent),
        );
    }
}

async fn inbound(shared: &Shared, caller: &str, req: Request<Incoming>) -> Response<Body> {
    let generation = shared.generation.load_full();
    let hop = Hop::new("destination", caller, &shared.service, &req);
    let res = inbound_inner(&generation, caller, req).await;
    hop.done(res.status(), None);
    res
}

async fn inbound_inner(g: &Generation, caller: &str, req: Request<Incoming>) -> Response<Body> {
    let Ok(path) = shopmesh_gateway::router::normalize(req.uri().path()) else {
        return problem(Problem::bad_request("the request path is not valid"));
    };
    if !g.policy.allows(caller, req.method(), &path) {
        metrics::counter!("mesh_policy_denials_total",
            "source_workload" => caller.to_owned(), "destination_workload" => g.cfg.service.clone())
        .increment(1);
        tracing::warn!(source_workload = caller, method = %req.method(), path, "mesh policy denied the call");
        return problem(Problem::forbidden(format!(
            "the mesh policy of {} does not let {caller} call {} {path}",
            g.cfg.service,
            req.method()
        )));
    }
    let Some((base, timeout)) = &g.local else {
        return problem(Problem::not_found("no inbound side"));
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(uri) = format!("{}{pq}", base.to_string().trim_end_matches('/')).parse::<Uri>() else {
        return problem(Problem::bad_request("the request target is not valid"));
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&PEER_HEADER);
    if let Ok(v) = HeaderValue::from_str(caller) {
        parts.headers.insert(PEER_HEADER, v);
    }
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
    let client = g_local_client();
    match tokio::time::timeout(*timeout, client.request(req)).await {
        Ok(Ok(res)) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(&NOT_DELIVERED_HEADER);
            Response::from_parts(parts, body.map_err(BoxError::from).boxed())
        }
        Ok(Err(e)) if e.is_connect() => {
            // Nothing was sent: the caller's sidecar may try another instance.
            tracing::warn!(error = %e, "local service not reachable");
            let mut res = problem(Problem::unavailable("the local service is not reachable"));
            res.headers_mut()
                .insert(NOT_DELIVERED_HEADER, HeaderValue::from_static("1"));
            res
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "local service failed");
            problem(Problem::bad_gateway("the local service did not answer"))
        }
        Err(_) => problem(Problem::gateway_timeout(
            "the local service did not answer in time",
        )),
    }
}

/// One pooled client to the local service per process (loopback, plain HTTP).
fn g_local_client() -> Client<HttpConnector, Body> {
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Body>> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(c)
        })
        .clone()
}

async fn serve_outbound(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(outbound(&shared, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The target service a request from the local service names: its `Host` (or the
/// authority of an absolute-form target), any port ignored.
fn target_of<B>(req: &Request<B>) -> Option<String> {
    let host = req.uri().host().map(str::to_owned).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.split(':').next().unwrap_or(h).to_owned())
    })?;
    Some(host.to_ascii_lowercase())
}

async fn outbound(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let target = target_of(&req).unwrap_or_default();
    let hop = Hop::new("source", &shared.service, &target, &req);
    let (res, endpoint) = outbound_inner(shared, &target, req).await;
    hop.done(res.status(), endpoint.as_deref());
    res
}

async fn outbound_inner(
    shared: &Shared,
    target_name: &str,
    req: Request<Incoming>,
) -> (Response<Body>, Option<String>) {
    let generation = shared.generation.load_full();
    let Some(target) = generation.targets.get(target_name).cloned() else {
        return (
            problem(Problem::not_found(format!(
                "`{target_name}` is not a target of this sidecar"
            ))),
            None,
        );
    };
    drop(generation);
    let (mut parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return (problem(Problem::payload_too_large(MAX_BODY)), None);
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&PEER_HEADER);
    parts.headers.remove(header::HOST);
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    let cluster = &target.cluster;
    cluster.deposit();
    let mut avoid: Option<Arc<shopmesh_gateway::cluster::Endpoint>> = None;
    let mut attempt = 0u32;
    loop {
        let Some(lease) = cluster.pick(None, avoid.as_deref()) else {
            return (
                problem(Problem::unavailable(format!(
                    "no instance of {target_name} is available"
                ))),
                None,
            );
        };
        let endpoint = lease.endpoint.clone();
        let Ok(uri) = format!("{}{pq}", endpoint.url).parse::<Uri>() else {
            return (
                problem(Problem::bad_request("the request target is not valid")),
                None,
            );
        };
        let mut req = Request::new(Full::new(body.clone()).map_err(|e| match e {}).boxed());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        let result =
            tokio::time::timeout(cluster.request_timeout, target.client.request(req)).await;
        let retry_allowed = |connect_failed: bool| {
            attempt < cluster.retry_attempts && (connect_failed || idempotent) && cluster.withdraw()
        };
        match result {
            // The target's sidecar could not reach its service: nothing was delivered, so
            // any method may go elsewhere, as after a refused connection.
            Ok(Ok(res))
                if res.status() == StatusCode::SERVICE_UNAVAILABLE
                    && res.headers().contains_key(&NOT_DELIVERED_HEADER) =>
            {
                lease.finish(false);
                if retry_allowed(true) {
                    attempt += 1;
                    avoid = Some(endpoint);
                    continue;
                }
                return (upstream_answer(res), Some(endpoint.url.to_string()));
            }
            Ok(Ok(res)) if res.status().is_server_error() && idempotent => {
                lease.finish(false);
                if retry_allowed(false) {
                    attempt += 1;
                    avoid = Some(endpoint);
                    continue;
                }
                return (upstream_answer(res), Some(endpoint.url.to_string()));
            }
            Ok(Ok(res)) => {
                lease.finish(!res.status().is_server_error());
                return (upstream_answer(res), Some(endpoint.url.to_string()));
            }
            Ok(Err(e)) => {
                lease.finish(false);
                let connect = e.is_connect();
                tracing::warn!(target = target_name, endpoint = %endpoint.url, error = %e, connect, "mesh call failed");
                if retry_allowed(connect) {
                    attempt += 1;
                    avoid = Some(endpoint);
                    continue;
                }
                return (
                    problem(Problem::bad_gateway(format!(
                        "{target_name} did not answer"
                    ))),
                    Some(endpoint.url.to_string()),
                );
            }
            Err(_) => {
                lease.finish(false);
                if retry_allowed(false) {
                    attempt += 1;
                    avoid = Some(endpoint);
                    continue;
                }
                return (
                    problem(Problem::gateway_timeout(format!(
                        "{target_name} did not answer in time"
                    ))),
                    Some(endpoint.url.to_string()),
                );
            }
        }
    }
}

fn upstream_answer(res: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&NOT_DELIVERED_HEADER);
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}
