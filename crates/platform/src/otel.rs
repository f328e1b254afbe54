//! OpenTelemetry tracing, exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g. `http://127.0.0.1:4318`; spans go to
//! `<endpoint>/v1/traces`; `OTEL_SERVICE_NAME` names the process, default `shopmesh`).
//!
//! Spans meant for export use the target [`SPAN_TARGET`] (the gateway's request span) or
//! come from the services' request and message-consumer spans. Without an endpoint those
//! export-only spans are disabled and cost nothing.
//!
//! W3C trace context crosses every hop: [`link_parent`] makes a span the child of an
//! incoming `traceparent`, [`traceparent`] gives the one to send on.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Target of spans that exist only to be exported.
pub const SPAN_TARGET: &str = "shopmesh::span";

static ACTIVE: OnceLock<bool> = OnceLock::new();

/// Whether spans are being exported.
pub fn active() -> bool {
    ACTIVE.get().copied().unwrap_or(false)
}

/// The exporter's lifetime: dropping it flushes the spans still queued.
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

impl OtelGuard {
    /// Exports the spans queued so far (tests use it to avoid waiting for a batch).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// The OTLP transport: reqwest, run on the tokio runtime given at start-up (the batch
/// exporter's own thread has none).
#[derive(Debug)]
struct ExportClient {
    http: reqwest::Client,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let call = async move {
            let (parts, body) = request.into_parts();
            let res = http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let mut out = http::Response::new(Bytes::new());
            *out.status_mut() = res.status();
            *out.headers_mut() = res.headers().clone();
            *out.body_mut() = res.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out)
        };
        self.rt.spawn(call).await?
    }
}

/// Builds the tracer provider for `endpoint`. Must be called inside a tokio runtime.
pub fn provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let rt = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(ExportClient { http, rt })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

/// The tracing layer that exports spans, with its filter; records that export is on.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer as _;
    let _ = ACTIVE.set(true);
    let tracer = provider.tracer("shopmesh");
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(SPAN_TARGET, tracing::Level::INFO)
                .with_target("shopmesh_platform::serve", tracing::Level::INFO)
                .with_target("shopmesh_messaging::consumer", tracing::Level::INFO),
        )
}

pub fn guard(provider: SdkTracerProvider) -> OtelGuard {
    OtelGuard { provider }
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Makes `span` a child of the remote span in `traceparent` (W3C), before it is entered.
/// Does nothing when export is off or the header is not valid.
pub fn link_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if !active() || span.is_disabled() {
        return;
    }
    let Some(tp) = traceparent else {
        return;
    };
    let cx = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &One(tp));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` naming `span` as the parent of the next hop, when export is on.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !active() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}
