//! The gateway as one tower [`Service`]: route, authenticate, forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::Service;
use tracing::Instrument;

use crate::config::{ConfigError, GatewayConfig};
use crate::runtime::Runtime;
use crate::worker::PerWorker;

pub use crate::wire::{Body, BoxError, HttpClient, empty};
use crate::wire::{connection_has, names, strip_hop_by_hop};

/// The gateway service: a handle on the serving configuration generation. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<Runtime>,
    /// Each worker's own handle on `current`: a request clones its worker's handle, so the
    /// reference count it writes is on a cache line no other core writes (cloning `current`
    /// itself would bounce one count between every core, twice per request).
    held: PerWorker<std::sync::Mutex<Option<Arc<Held>>>>,
    /// Given to every configuration applied, so that a reload neither undoes nor warns of
    /// what the command line set.
    overrides: Overrides,
    /// Serialises reloads.
    reload: std::sync::Mutex<ReloadState>,
}

#[derive(Default)]
struct ReloadState {
    next_version: u64,
    last_error: Option<String>,
    last_attempt: Option<SystemTime>,
    /// The latest attempts, for the operations console.
    history: std::collections::VecDeque<crate::history::ReloadRecord>,
}

impl ReloadState {
    fn record(&mut self, ok: bool, version: u64, error: Option<String>, changes: Vec<String>) {
        let seq = self.history.back().map_or(1, |r| r.seq + 1);
        self.history.push_back(crate::history::ReloadRecord {
            seq,
            at: SystemTime::now(),
            ok,
            version,
            error,
            changes,
        });
        while self.history.len() > crate::history::RELOADS_KEPT {
            self.history.pop_front();
        }
    }
}

/// What the command line sets over the configuration file (`shopmesh gateway
/// --admin-listen`): instances sharing one file on one host each need their own admin
/// port. Applied to the first configuration and to every reloaded one, so the file's
/// value is never compared with the running one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// Replaces `admin.listen`.
    pub admin_listen: Option<SocketAddr>,
}

impl Overrides {
    pub fn apply_to(&self, cfg: &mut GatewayConfig) {
        if let Some(a) = self.admin_listen {
            cfg.admin.listen = Some(a);
        }
    }
}

/// A worker's handle on a configuration generation.
pub(crate) struct Held(Arc<Runtime>);

impl std::ops::Deref for Held {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        &self.0
    }
}

impl Shared {
    /// The serving generation, through the calling worker's handle on it (made again when
    /// the generation changed).
    fn held(&self) -> Arc<Held> {
        let current = self.current.load();
        let mut mine = crate::worker::lock(self.held.mine());
        match &*mine {
            Some(h) if Arc::ptr_eq(&h.0, &current) => h.clone(),
            _ => {
                let h = Arc::new(Held(Arc::clone(&current)));
                *mine = Some(h.clone());
                h
            }
        }
    }

    /// Lets go of the workers' handles (after a reload: the old generation goes as soon as
    /// its last request ends, not at its worker's next request).
    fn release_held(&self) {
        for h in self.held.iter() {
            *crate::worker::lock(h) = None;
        }
    }
}

/// What the admin API reports about configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigStatus {
    pub version: u64,
    pub loaded_at_unix: u64,
    pub last_error: Option<String>,
    pub last_attempt_unix: Option<u64>,
}

impl Gateway {
    /// Builds the first generation and starts its health checks. Needs a tokio runtime.
    pub fn new(cfg: GatewayConfig) -> Result<Self, ConfigError> {
        Self::with_overrides(cfg, Overrides::default())
    }

    /// [`Gateway::new`] with the command line's `overrides`, kept for every reload.
    pub fn with_overrides(
        mut cfg: GatewayConfig,
        overrides: Overrides,
    ) -> Result<Self, ConfigError> {
        overrides.apply_to(&mut cfg);
        let rt = Runtime::build(cfg, 1, None)?;
        rt.start();
        Ok(Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(rt),
                held: PerWorker::new(crate::worker::MAX_WORKERS, |_| Default::default()),
                overrides,
                reload: std::sync::Mutex::new({
                    let mut st = ReloadState {
                        next_version: 2,
                        ..Default::default()
                    };
                    st.record(true, 1, None, vec!["initial configuration".into()]);
                    st
                }),
            }),
        })
    }

    /// The serving generation.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.current.load_full()
    }

    /// Builds and validates `cfg` next to the serving generation, then swaps it in. When it
    /// is invalid nothing changes and the error is kept for the admin API.
    pub fn apply(&self, cfg: GatewayConfig) -> Result<u64, ConfigError> {
        let mut st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        st.last_attempt = Some(SystemTime::now());
        let old = self.shared.current.load_full();
        let mut cfg = cfg;
        self.shared.overrides.apply_to(&mut cfg);
        if cfg.listen != old.config.listen
            || cfg.admin.listen != old.config.admin.listen
            || cfg.workers != old.config.workers
        {
            tracing::warn!(
                "listen addresses and workers change only on restart; the rest is applied"
            );
            // Validated against what is bound: an exposed admin port keeps needing a token.
            cfg.listen = old.config.listen;
            cfg.admin.listen = old.config.admin.listen;
            cfg.workers = old.config.workers;
        }
        let (l, o) = (&cfg.limits, &old.config.limits);
        if (
            l.header_read_timeout_ms,
            l.max_headers,
            l.max_header_bytes,
            l.max_connections,
            l.max_concurrent_streams,
        ) != (
            o.header_read_timeout_ms,
            o.max_headers,
            o.max_header_bytes,
            o.max_connections,
            o.max_concurrent_streams,
        ) {
            tracing::warn!(
                "limits on connections and request heads change only on restart; body limits and the rest are applied"
            );
        }
        let changes = crate::history::changes(&old.config, &cfg);
        let built = if cfg.tls.is_some() != old.config.tls.is_some() {
            // Clients of a TLS port would be served in the clear, or the other way round.
            Err(ConfigError::Invalid(
                "tls can be turned on or off only by a restart (certificates reload)".into(),
            ))
        } else {
            Runtime::build(cfg, st.next_version, Some(&old))
        };
        match built {
            Ok(rt) => {
                let version = rt.version;
                st.next_version += 1;
                st.last_error = None;
                st.record(true, version, None, changes);
                // The old generation's health checks stop first (the endpoints they probe
                // may be kept); its requests still finish.
                old.stop.cancel();
                rt.start();
                self.shared.current.store(Arc::new(rt));
                self.shared.release_held();
                metrics::counter!("gateway_config_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("gateway_config_version").set(version as f64);
                tracing::info!(version, "configuration applied");
                Ok(version)
            }
            Err(e) => {
                st.last_error = Some(e.to_string());
                st.record(false, old.version, Some(e.to_string()), changes);
                metrics::counter!("gateway_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration refused; the previous one keeps serving");
                Err(e)
            }
        }
    }

    /// The latest configuration attempts (start-up, reloads), oldest first.
    pub fn reloads(&self) -> Vec<crate::history::ReloadRecord> {
        let st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        st.history.iter().cloned().collect()
    }

    /// Reads, validates and applies a configuration file.
    pub fn reload_file(&self, path: &std::path::Path) -> Result<u64, ConfigError> {
        match GatewayConfig::from_file(path) {
            Ok(cfg) => self.apply(cfg),
            Err(e) => {
                let mut st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
                st.last_attempt = Some(SystemTime::now());
                st.last_error = Some(e.to_string());
                let serving = self.shared.current.load().version;
                st.record(false, serving, Some(e.to_string()), Vec::new());
                metrics::counter!("gateway_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "configuration refused; the previous one keeps serving");
                Err(e)
            }
        }
    }

    pub fn status(&self) -> ConfigStatus {
        let rt = self.runtime();
        let st = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        ConfigStatus {
            version: rt.version,
            loaded_at_unix: unix(rt.loaded_at),
            last_error: st.last_error.clone(),
            last_attempt_unix: st.last_attempt.map(unix),
        }
    }
}

impl<B> Service<Request<B>> for Gateway
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let rt = self.shared.held();
        Box::pin(async move { Ok(handle(rt, req.map(|b| b.map_err(Into::into).boxed())).await) })
    }
}

/// Request ids from clients are kept when they are short and printable; otherwise replaced.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&names::REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated();
            HeaderValue::from_bytes(id.encode_lower(&mut buf).as_bytes())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        })
}

/// A trace id, 32 lower-case hex digits, kept on the stack.
#[derive(Clone, Copy)]
struct TraceId([u8; 32]);

impl TraceId {
    /// The id in `text` (32 hex digits), or all zeros.
    fn of(text: &[u8]) -> Self {
        TraceId(text.try_into().unwrap_or([b'0'; 32]))
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// W3C trace context for the upstream hop: the client's trace continues (with this hop as
/// the parent span), or a new trace starts. Returns the header and the trace id.
fn traceparent(headers: &HeaderMap) -> (HeaderValue, TraceId) {
    fn hex(s: &[u8]) -> bool {
        s.iter().all(u8::is_ascii_hexdigit)
    }
    // `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, 55 bytes.
    let incoming = headers
        .get(&names::TRACEPARENT)
        .map(HeaderValue::as_bytes)
        .filter(|v| {
            v.len() == 55
                && v.starts_with(b"00-")
                && v[35] == b'-'
                && v[52] == b'-'
                && hex(&v[3..35])
                && &v[3..35] != b"00000000000000000000000000000000"
                && hex(&v[36..52])
                && hex(&v[53..55])
        });
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming {
        Some(v) => {
            value[3..35].copy_from_slice(&v[3..35]);
            value[3..35].make_ascii_lowercase();
            value[53..55].copy_from_slice(&v[53..55]);
        }
        None => {
            uuid::Uuid::new_v4()
                .simple()
                .encode_lower(&mut value[3..35]);
        }
    }
    let mut span_id = [0u8; 32];
    uuid::Uuid::new_v4().simple().encode_lower(&mut span_id);
    value[36..52].copy_from_slice(&span_id[..16]);
    let trace_id = TraceId::of(&value[3..35]);
    (
        HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static("")),
        trace_id,
    )
}

async fn handle(rt: Arc<Held>, mut req: Request<Body>) -> Response<Body> {
    let start = Instant::now();
    // What survives the hop-by-hop cleaning: a WebSocket upgrade (HTTP/1.1 `GET` asking
    // for exactly `websocket`, with its key; honoured only on routes that allow it) and
    // gRPC's `te: trailers`.
    let websocket = req.version() == http::Version::HTTP_11
        && req.method() == http::Method::GET
        && connection_has(req.headers(), "upgrade")
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && req.headers().contains_key(header::SEC_WEBSOCKET_KEY);
    let te_trailers = req
        .headers()
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // First, so that a client's `Connection: <name>` cannot remove what the gateway adds.
    strip_hop_by_hop(req.headers_mut());
    if te_trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let rid = request_id(req.headers());
    req.headers_mut()
        .insert(names::REQUEST_ID.clone(), rid.clone());
    let method = req.method().clone();
    // The path as the client sent it, for the span and the access log (a shared copy).
    let uri = req.uri().clone();
    // Exported when OpenTelemetry is on (a child of the client's `traceparent`); otherwise
    // not made at all (the registry would still track it): the access log carries the
    // request's fields.
    let span = if !shopmesh_platform::otel::active() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        target: shopmesh_platform::otel::SPAN_TARGET,
        "gateway",
        otel.name = %format_args!("{method} {}", uri.path()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        url.path = %uri.path(),
        request_id = rid.to_str().unwrap_or(""),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        )
    };
    shopmesh_platform::otel::link_parent(
        &span,
        req.headers()
            .get(&names::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let (tp, trace_id) = match shopmesh_platform::otel::traceparent(&span)
        .and_then(|t| Some((HeaderValue::from_str(&t).ok()?, t)))
    {
        Some((value, text)) => (
            value,
            TraceId::of(text.as_bytes().get(3..35).unwrap_or_default()),
        ),
        None => traceparent(req.headers()),
    };
    req.headers_mut().insert(names::TRACEPARENT.clone(), tp);
    let client = req
        .extensions()
        .get::<crate::worker::ConnInfo>()
        .map(|i| crate::pipeline::Sender::of(&rt, i.peer.ip(), req.headers()));
    let client_ip = client.map(|c| c.ip);
    let (outcome, mut res) = crate::pipeline::run(&rt, req, client, websocket)
        .instrument(span.clone())
        .await;
    res.headers_mut()
        .insert(names::REQUEST_ID.clone(), rid.clone());
    let status = res.status().as_u16();
    span.record("http.route", &*outcome.route);
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    crate::pipeline::log::run(
        &rt,
        &outcome,
        &crate::pipeline::log::Request {
            client_ip,
            method: &method,
            path: uri.path(),
            status,
            elapsed: start.elapsed(),
            request_id: &rid,
            trace_id: trace_id.as_str(),
        },
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traceparent(h: &HeaderMap) -> (HeaderValue, String) {
        let (v, id) = super::traceparent(h);
        (v, id.as_str().to_owned())
    }

    #[test]
    fn trace_context_continues_or_starts() {
        let mut h = HeaderMap::new();
        let (v, id) = traceparent(&h);
        assert_eq!(id.len(), 32);
        assert!(v.to_str().unwrap().starts_with(&format!("00-{id}-")));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (v, id) = traceparent(&h);
        assert_eq!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let v = v.to_str().unwrap().to_owned();
        assert!(v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && v.ends_with("-01"));
        assert!(!v.contains("00f067aa0ba902b7"));
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_ne!(traceparent(&h).1, "garbage");
        // Upper-case hex is read (and the id lower-cased); the flags pass unchanged.
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00"),
        );
        let (v, id) = traceparent(&h);
        assert_eq!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(v.to_str().unwrap().ends_with("-00"));
        // An all-zero trace id, another version, a bad length or a non-hex id: a new trace.
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            let (v, id) = traceparent(&h);
            assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_ne!(id, "00000000000000000000000000000000", "{bad}");
            assert_eq!(v.len(), 55);
            assert!(v.to_str().unwrap().ends_with("-01"), "{bad}");
        }
    }
}
