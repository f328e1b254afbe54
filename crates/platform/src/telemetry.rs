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

/// Keeps the log writer running; logs still queued are flushed when it is dropped.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
///
/// Lines are written to stdout by a background thread through a bounded queue
/// ([`LOG_QUEUE_LINES`]), so a request never waits on the terminal or a pipe; when the
/// queue is full, lines are dropped rather than slowing the traffic down. Keep the guard
/// until exit.
pub fn init_tracing(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
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
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
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
                        handle.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}
