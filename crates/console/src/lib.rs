//! The operations console: a web page on the admin port (`/console`) that shows the four
//! patterns at work, live, and lets an operator act on them (replay dead letters, reload the
//! configuration).
//!
//! - **Static files** (hand-written ES modules and CSS) are embedded in the binary and
//!   served with a strict Content-Security-Policy: nothing from another origin, no inline
//!   script or style. Everything that comes from users is put in the page as text.
//! - **One Server-Sent Events stream** (`/console/events`): a snapshot on connect (and on
//!   every reconnect), a tick a second with the figures and the sections that changed, and
//!   events for breakers, health, reloads, sagas, orders' messages and dead letters;
//!   keep-alives. A viewer that falls behind is dropped (its page reconnects), never waited
//!   for.
//! - **Nothing runs while nobody watches**: the sampler starts with the first viewer and
//!   stops a minute after the last; it reads the Prometheus registry the process keeps anyway
//!   and state the host keeps anyway ([`Source`]). The history (15 minutes at one-second
//!   resolution) stays in memory, so charts survive a reload of the page.
//! - **Actions are POSTs another origin cannot make**: they need the
//!   `X-Shopmesh-Console: 1` header (which no form and no simple cross-origin request can
//!   carry) and a same-origin `Origin` when one is sent. The admin token, when the host has
//!   one, is checked by the host for every console path.

mod assets;
mod hub;
pub mod metrics;
pub mod model;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use futures::stream::{self, Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use shopmesh_platform::Problem;

pub use hub::{Console, FeedEvent, HISTORY_SECS, LINGER, Source, VIEWER_BUFFER};
pub use model::*;

/// The header console actions must carry.
pub const ACTION_HEADER: &str = "x-shopmesh-console";

/// The policy every console answer carries: only this origin, no inline code, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How a host tells the console about its admin token.
#[derive(Clone)]
pub struct Options {
    /// Whether a token protects the admin port now (checked by the host). Without one the
    /// console answers only requests addressed to a loopback name or an IP address, so that
    /// a page on another site cannot reach it through DNS rebinding.
    pub token_configured: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token_configured: Arc::new(|| false),
        }
    }
}

/// The console's routes: `/console` (the page), `/console/assets/…`, `/console/events`
/// and the host's `/console/api/…`.
pub fn router(console: Console, options: Options) -> Router {
    let api = console.inner.source.api();
    Router::new()
        .route("/console", get(assets::index))
        .route("/console/", get(assets::index))
        .route("/console/assets/{*path}", get(assets::file))
        .route("/console/events", get(events).with_state(console.clone()))
        .nest("/console/api", api)
        .layer(axum::middleware::from_fn(guard_writes))
        .layer(axum::middleware::from_fn(move |req, next| {
            guard_host(options.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(security_headers))
}

/// The token presented on a request: `Authorization: Bearer TOKEN`, or Basic credentials
/// whose password is the token (what a browser sends after asking its user; the user name
/// is ignored).
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.to_owned());
    }
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

/// The 401 of a console path without the token: a browser asks its user for it (any user
/// name, the token as the password).
pub fn challenge() -> Response {
    let mut res = Problem::unauthorized("the admin API needs its token").into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"shopmesh admin\", charset=\"UTF-8\""),
    );
    res
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin token check of an admin port (the gateway's, the shop's): the answer refusing
/// the request, or `None` to let it through. `/healthz` passes (probes carry no credentials,
/// and liveness tells nothing an attacker could use); anything else needs `token` (Bearer,
/// or Basic credentials' password), else a 401: on the console's paths with a challenge, so
/// a browser asks its user for it.
pub fn refused(path: &str, headers: &HeaderMap, token: &str) -> Option<Response> {
    if path == "/healthz" {
        return None;
    }
    let presented = presented_token(headers).unwrap_or_default();
    if same(presented.as_bytes(), token.as_bytes()) {
        return None;
    }
    if path.starts_with("/console") {
        return Some(challenge());
    }
    Some(Problem::unauthorized("the admin API needs its bearer token").into_response())
}

fn forbidden(detail: &str) -> Response {
    Problem::new(StatusCode::FORBIDDEN)
        .detail(detail.to_owned())
        .into_response()
}

/// Whether the request's `Origin` (if any) and `Sec-Fetch-Site` (if any) say it comes from
/// a page of this very origin.
fn same_origin(req: &Request) -> bool {
    let h = req.headers();
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    let Some(origin) = h.get(header::ORIGIN) else {
        return true;
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let origin = origin.to_str().unwrap_or("null");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// Refuses writes (any method but GET, HEAD and OPTIONS) that another origin's page sent;
/// console actions must also carry [`ACTION_HEADER`]. Meant for every admin route: a
/// browser sends `Origin` with every cross-origin POST, and tools such as curl send none.
pub async fn guard_writes(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    if !same_origin(&req) {
        return forbidden("a page of another origin cannot act on the admin API");
    }
    if req.uri().path().starts_with("/console/")
        && req
            .headers()
            .get(ACTION_HEADER)
            .is_none_or(|v| v.as_bytes() != b"1")
    {
        return forbidden("console actions need the `X-Shopmesh-Console: 1` header");
    }
    next.run(req).await
}

/// Whether `host` (a Host header) names this machine's loopback or an IP address.
fn plain_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                n
            } else {
                host
            }
        }),
    };
    let name = name.to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
}

async fn guard_host(options: Options, req: Request, next: Next) -> Response {
    if !(options.token_configured)() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !host.is_empty() && !plain_host(host) {
            return forbidden(
                "without an admin token the console answers only on a loopback name or an IP address",
            );
        }
    }
    next.run(req).await
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// Keep-alive comments while nothing else is sent.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

async fn events(
    State(console): State<Console>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let resumed = headers.contains_key("last-event-id");
    let (viewer, snapshot) = console.join(resumed).await;
    let first = Event::default()
        .event(snapshot.event)
        .id(snapshot.id.to_string())
        .retry(Duration::from_secs(1))
        .data(snapshot.data);
    let rest = stream::unfold(viewer, |mut viewer| async move {
        match viewer.rx.recv().await {
            Ok(f) => {
                let e = Event::default()
                    .event(f.event)
                    .id(f.id.to_string())
                    .data(f.data.as_str());
                Some((Ok(e), viewer))
            }
            // Fell behind (or the console is gone): the stream ends, the page reconnects
            // and starts again from a snapshot.
            Err(_) => None,
        }
    });
    Sse::new(stream::once(async { Ok(first) }).chain(rest))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

#[cfg(test)]
mod tests;
