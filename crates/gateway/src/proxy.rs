//! The gateway as one tower [`Service`]: route, authenticate, forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shopmesh_platform::problem::Problem;
use shopmesh_platform::{
    REQUEST_ID_HEADER, TRUSTED_HEADER_PREFIX, USER_ID_HEADER, USER_ROLES_HEADER,
};
use tower::Service;
use tracing::Instrument;

use crate::config::{ConfigError, GatewayConfig, RouteAuth};
use crate::jwt::{AuthError, JwtVerifier};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the gateway.
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// The peer address of the connection a request came on (set by the server loop).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

struct Route {
    name: Arc<str>,
    prefix: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    auth: RouteAuth,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        let p = self.prefix.trim_end_matches('/');
        p.is_empty()
            || (path.starts_with(p) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/'))
    }
}

struct Inner {
    routes: Vec<Route>,
    client: HttpClient,
    jwt: Option<JwtVerifier>,
    max_body: u64,
    upstream_timeout: Duration,
}

/// The gateway service. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        let mut routes = cfg
            .routes
            .iter()
            .map(|r| {
                let uri: Uri = r.upstream.parse().map_err(|_| ConfigError::Route {
                    route: r.name.clone(),
                    reason: "bad upstream".into(),
                })?;
                let parts = uri.into_parts();
                Ok(Route {
                    name: r.name.as_str().into(),
                    prefix: r.prefix.clone(),
                    scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
                    authority: parts.authority.ok_or_else(|| ConfigError::Route {
                        route: r.name.clone(),
                        reason: "upstream has no host".into(),
                    })?,
                    auth: r.auth,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        // Longest prefix first.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.trim_end_matches('/').len()));
        let jwt = cfg.jwt.map(|j| JwtVerifier::new(j, client.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                routes,
                client,
                jwt,
                max_body: cfg.max_body_bytes,
                upstream_timeout: Duration::from_millis(cfg.upstream_timeout_ms),
            }),
        })
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
        let inner = self.inner.clone();
        Box::pin(async move { Ok(handle(inner, req.map(|b| b.map_err(Into::into).boxed())).await) })
    }
}

/// Request ids from clients are kept when they are short and printable; otherwise replaced.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        })
}

/// W3C trace context for the upstream hop: the client's trace continues (with this hop as
/// the parent span), or a new trace starts. Returns the header and the trace id.
fn traceparent(headers: &HeaderMap) -> (HeaderValue, String) {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let parts: Vec<&str> = v.split('-').collect();
            let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
            (parts.len() == 4
                && parts[0] == "00"
                && hex(parts[1], 32)
                && parts[1] != "00000000000000000000000000000000"
                && hex(parts[2], 16)
                && hex(parts[3], 2))
            .then(|| (parts[1].to_ascii_lowercase(), parts[3].to_owned()))
        });
    let (trace_id, flags) =
        incoming.unwrap_or_else(|| (uuid::Uuid::new_v4().simple().to_string(), "01".to_owned()));
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let value = format!("00-{trace_id}-{span_id}-{flags}");
    (
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("")),
        trace_id,
    )
}

async fn handle(inner: Arc<Inner>, mut req: Request<Body>) -> Response<Body> {
    let start = Instant::now();
    // First, so that a client's `Connection: <name>` cannot remove what the gateway adds.
    strip_hop_by_hop(req.headers_mut());
    let rid = request_id(req.headers());
    req.headers_mut().insert(REQUEST_ID_HEADER, rid.clone());
    let (tp, trace_id) = traceparent(req.headers());
    req.headers_mut().insert("traceparent", tp);
    let span = tracing::info_span!(
        "gateway",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = rid.to_str().unwrap_or(""),
        trace_id = %trace_id,
        route = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let (route_name, mut res) = route_and_forward(&inner, req)
        .instrument(span.clone())
        .await;
    res.headers_mut().insert(REQUEST_ID_HEADER, rid);
    let status = res.status().as_u16();
    span.record("route", &*route_name);
    span.record("status", status);
    let elapsed = start.elapsed();
    metrics::counter!("gateway_requests_total", "route" => route_name.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "route" => route_name)
        .record(elapsed.as_secs_f64());
    tracing::debug!(parent: &span, status, elapsed_ms = elapsed.as_secs_f64() * 1e3, "request");
    res
}

fn problem(p: Problem) -> Response<Body> {
    let mut res = Response::new(full(p.to_body()));
    *res.status_mut() = p.status;
    for (name, value) in p.headers() {
        res.headers_mut().insert(name, value);
    }
    res
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

fn auth_problem(e: &AuthError) -> Problem {
    match e {
        AuthError::KeysUnavailable(_) => {
            Problem::unavailable("the identity provider's keys cannot be fetched; retry shortly")
        }
        AuthError::Expired => Problem::unauthorized("the access token has expired"),
        _ => Problem::unauthorized("the access token is not valid"),
    }
}

async fn route_and_forward(inner: &Inner, mut req: Request<Body>) -> (Arc<str>, Response<Body>) {
    // 1. Nobody but the gateway speaks for the caller's identity.
    let spoofed: Vec<HeaderName> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with(TRUSTED_HEADER_PREFIX))
        .cloned()
        .collect();
    for k in spoofed {
        req.headers_mut().remove(k);
    }

    // 2. Route.
    let Some(route) = inner.routes.iter().find(|r| r.matches(req.uri().path())) else {
        return (
            "unmatched".into(),
            problem(Problem::not_found("no route matches this path")),
        );
    };
    let name = route.name.clone();

    // 3. Authenticate.
    let bearer = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| {
            let (scheme, token) = s.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        }) {
            Some(t) if !t.is_empty() => Some(t.to_owned()),
            _ => {
                return (
                    name,
                    problem(Problem::unauthorized(
                        "expected `Authorization: Bearer <token>`",
                    )),
                );
            }
        },
    };
    match (bearer, &inner.jwt) {
        (Some(token), Some(jwt)) => match jwt.verify(&token).await {
            Ok(id) => {
                let h = req.headers_mut();
                match HeaderValue::from_str(&id.subject) {
                    Ok(v) => h.insert(USER_ID_HEADER, v),
                    Err(_) => {
                        return (
                            name,
                            problem(Problem::unauthorized("the access token is not valid")),
                        );
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&id.roles.join(",")) {
                    h.insert(USER_ROLES_HEADER, v);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                metrics::counter!("gateway_auth_failures_total", "route" => name.clone())
                    .increment(1);
                return (name, problem(auth_problem(&e)));
            }
        },
        (Some(_), None) | (None, _) if route.auth == RouteAuth::Required => {
            return (
                name,
                problem(Problem::unauthorized("a valid bearer token is required")),
            );
        }
        _ => {}
    }

    // 4. Bound the body: refuse at once when the declared length is too big, and cut a
    // streamed body that grows past the limit.
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > inner.max_body
    {
        return (
            name,
            problem(Problem::payload_too_large(inner.max_body as usize)),
        );
    }

    // 5. Forward.
    let client_ip = req.extensions().get::<ClientAddr>().map(|a| a.0.ip());
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = match Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(u) => u,
        Err(_) => {
            return (
                name,
                problem(Problem::bad_request("the request target is not valid")),
            );
        }
    };
    let original_host = parts.headers.remove(header::HOST);
    if let Some(ip) = client_ip {
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
    }
    if let Some(host) = original_host.or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    }) {
        parts.headers.insert("x-forwarded-host", host);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let max = inner.max_body as usize;
    let body = Limited::new(body, max).boxed();
    let upstream_req = Request::from_parts(parts, body);

    let sent =
        tokio::time::timeout(inner.upstream_timeout, inner.client.request(upstream_req)).await;
    let res = match sent {
        Err(_) => {
            metrics::counter!("gateway_upstream_errors_total", "route" => name.clone(), "kind" => "timeout").increment(1);
            return (
                name,
                problem(Problem::gateway_timeout(
                    "the upstream service did not answer in time",
                )),
            );
        }
        Ok(Err(e)) => {
            if is_length_limit(&e) {
                return (name, problem(Problem::payload_too_large(max)));
            }
            tracing::warn!(error = %e, route = &*name, "upstream request failed");
            metrics::counter!("gateway_upstream_errors_total", "route" => name.clone(), "kind" => "connect").increment(1);
            return (
                name,
                problem(Problem::bad_gateway("the upstream service is unreachable")),
            );
        }
        Ok(Ok(res)) => res,
    };
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    (
        name,
        Response::from_parts(parts, body.map_err(Into::into).boxed()),
    )
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str) -> Route {
        Route {
            name: "r".into(),
            prefix: prefix.into(),
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("127.0.0.1:1"),
            auth: RouteAuth::Optional,
        }
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let r = route("/api/orders");
        assert!(r.matches("/api/orders"));
        assert!(r.matches("/api/orders/1"));
        assert!(!r.matches("/api/ordersx"));
        assert!(!r.matches("/api"));
        assert!(route("/").matches("/anything"));
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
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}
