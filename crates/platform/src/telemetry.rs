//! Logs (tracing) and metrics (Prometheus).

use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Log lines queued for the writer thread at most (about 4 MiB of access log).
pub const LOG_QUEUE_LINES: usize = 8192;

/// Keeps the log writer and the span exporter running; dropping it flushes both.
pub struct LogGuard {
    _logs: tracing_appender::non_blocking::WorkerGuard,
    pub otel: Option<crate::otel::OtelGuard>,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
///
/// Lines are written to stdout by a background thread through a bounded queue
/// ([`LOG_QUEUE_LINES`]), so a request never waits on the terminal or a pipe; when the
/// queue is full, lines are dropped rather than slowing the traffic down. Keep the guard
/// until exit.
///
/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported over OTLP (see
/// [`crate::otel`]); that needs a tokio runtime, so call this inside one.
pub fn init_tracing(format: LogFormat) -> LogGuard {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"))
        .add_directive(
            format!("{}=off", crate::otel::SPAN_TARGET)
                .parse()
                .expect("a static directive"),
        );
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        // Block-buffered: the writer thread flushes whenever its queue runs empty, so a
        // line waits for nothing but the lines queued with it, and a busy gateway makes
        // one `write` per batch instead of one per line (stdout alone is line-buffered).
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "shopmesh".into());
    let (otel_layer, otel) = match endpoint.map(|e| crate::otel::provider(&e, &service)) {
        Some(Ok(provider)) => (
            Some(crate::otel::layer(&provider).boxed()),
            Some(crate::otel::guard(provider)),
        ),
        Some(Err(e)) => {
            eprintln!("OpenTelemetry export disabled: {e}");
            (None, None)
        }
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
    LogGuard { _logs: guard, otel }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder (installed on first call).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static buckets are valid")
                // Istio's `istio_request_duration_milliseconds` (the mesh's sidecars).
                .set_buckets_for_metric(
                    Matcher::Suffix("_milliseconds".into()),
                    &LATENCY_BUCKETS
                        .iter()
                        .map(|s| s * 1000.0)
                        .collect::<Vec<_>>(),
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// What runs before every [`render`]: the request paths' per-core tallies hand their counts
/// to the recorder (see the gateway's `observe`).
static BEFORE_RENDER: std::sync::Mutex<Vec<fn()>> = std::sync::Mutex::new(Vec::new());

/// Registers `f` to run before every [`render`] (once, however often it is registered).
pub fn before_render(f: fn()) {
    let mut hooks = BEFORE_RENDER.lock().unwrap_or_else(|p| p.into_inner());
    if !hooks.iter().any(|g| std::ptr::fn_addr_eq(*g, f)) {
        hooks.push(f);
    }
}

/// The process's metrics as Prometheus text, every per-core tally included.
pub fn render() -> String {
    let hooks = BEFORE_RENDER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for f in hooks {
        f();
    }
    prometheus().render()
}

/// Admin routes: `/metrics` (Prometheus text), `/healthz`.
pub fn admin_router() -> Router {
    let handle = prometheus();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}
