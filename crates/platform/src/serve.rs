//! The HTTP stack every service runs behind, and graceful serving.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::REQUEST_ID_HEADER;
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
    /// finish (bounded by `drain`).
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) -> std::io::Result<()> {
        let name = self.name;
        let signal = shutdown.clone();
        let serve = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { signal.cancelled().await })
        .into_future();
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => r,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(service = name, "drain timeout: closing remaining connections");
                Ok(())
            }
        }
    }
}
