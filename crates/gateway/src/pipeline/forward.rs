//! Phase `forward`: the request goes upstream, and the upstream's answer comes back.
//!
//! Reads everything earlier phases decided (the route, the chosen cluster, the normalised
//! path, the rate-limit decision). Applies the route's rewrite, sets the forwarding headers
//! (`X-Forwarded-*`, believed and extended only from trusted proxies), copies a sample to
//! the route's shadow cluster (`mirror`), picks an endpoint (balancer, health, breakers),
//! sends with the route's timeout and retries idempotent body-less requests within the
//! cluster's budget, joins a WebSocket's two sides into a tunnel, and strips hop-by-hop
//! headers from the answer. Ends every request: with the upstream's answer, or 502 (the
//! upstream failed or answered unexpectedly), 503 (no endpoint available), 504 (no answer
//! in time), 413 (a streamed body past the limit), 400/408 (a body the mirror could not
//! read).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, Limited};
use shopmesh_platform::problem::Problem;

use super::variant::Chosen;
use super::{Ctx, limit, tunnel};
use crate::cluster::{Cluster, Endpoint};
use crate::config::HashOn;
use crate::ratelimit::Decision;
use crate::runtime::Route;
use crate::traffic::cookie;
use crate::upstream::{self, KeepAtEnd};
use crate::wire::{Body, empty, is_length_limit, names, problem, strip_hop_by_hop};
use crate::worker::ConnInfo;

/// What the earlier phases hand to `forward`.
pub(super) struct Forward<'rt> {
    pub route: &'rt Route,
    pub chosen: Chosen<'rt>,
    /// The normalised path.
    pub path: String,
    /// The declared body length.
    pub content_length: Option<u64>,
    pub limit: Option<Decision>,
}

pub(super) async fn run(
    ctx: &mut Ctx<'_>,
    mut f: Forward<'_>,
    mut req: Request<Body>,
) -> Response<Body> {
    let cluster = f.chosen.cluster;
    let forwarded_path = if f.route.strip_prefix.is_some() || f.route.add_prefix.is_some() {
        crate::router::rewrite(
            &f.path,
            f.route.strip_prefix.as_deref(),
            f.route.add_prefix.as_deref(),
        )
    } else {
        std::mem::take(&mut f.path)
    };
    let Some(path_and_query) = upstream_target(req.uri(), forwarded_path) else {
        return problem(Problem::bad_request("the request target is not valid"));
    };
    // A WebSocket: the client's side of the tunnel, once the upstream agrees. Only where
    // the route allows it, and not to HTTP/2 upstreams.
    let client_upgrade =
        (ctx.websocket && f.route.websocket && cluster.version() == http::Version::HTTP_11)
            .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    upstream_headers(ctx, cluster, &mut parts, client_upgrade.is_some());
    let hash_key: Option<Vec<u8>> = match &cluster.hash_on {
        Some(HashOn::Header(h)) => parts.headers.get(h).map(|v| v.as_bytes().to_vec()),
        Some(HashOn::Cookie(name)) => cookie(&parts.headers, name).map(|c| c.into_bytes()),
        None => None,
    };
    let bodiless = body.is_end_stream();
    let retryable = idempotent(&parts.method) && bodiless;
    let timeout = f.route.timeout.unwrap_or(cluster.request_timeout);
    let body = if client_upgrade.is_some() {
        body
    } else {
        match mirror(&f, &parts, &path_and_query, body, timeout).await {
            Ok(body) => body,
            Err(refused) => return refused,
        }
    };
    let mut body = Some(Limited::new(body, f.route.max_body as usize).boxed());
    cluster.deposit();
    let mut last_endpoint: Option<Arc<Endpoint>> = None;
    loop {
        ctx.outcome.attempts += 1;
        let Some(lease) = cluster.pick(hash_key.as_deref(), last_endpoint.as_deref()) else {
            metrics::counter!("gateway_upstream_errors_total", "route" => f.route.name.clone(), "kind" => "no_endpoint").increment(1);
            return problem(Problem::unavailable(
                "no healthy upstream endpoint; retry shortly",
            ));
        };
        ctx.outcome.endpoint = Some(lease.endpoint.url.clone());
        // An idempotent request without a body to an HTTP/1 cluster: this worker's own
        // connections to the endpoint, in origin-form (`upstream`), where a kept connection
        // the endpoint closed under it can be retried safely. Anything else (a body, a
        // method a retry could repeat, HTTP/2): the cluster's client, in absolute-form.
        let kept = retryable && cluster.version() == http::Version::HTTP_11;
        let Some(uri) = attempt_uri(kept, &lease.endpoint, &path_and_query) else {
            return problem(Problem::bad_request("the request target is not valid"));
        };
        // A request that may be sent again keeps the headers for the next attempt.
        let headers = if retryable {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let upstream_req = build(&parts, uri, headers, body.take().unwrap_or_else(empty));
        let call = send(cluster, &lease.endpoint, kept, upstream_req, &parts);
        let sent = tokio::time::timeout(timeout, call).await;
        let can_retry = retryable && ctx.outcome.attempts <= cluster.retry_attempts;
        match sent {
            Err(_) => {
                // With a body, a slow client may be the cause: no verdict on the endpoint.
                if bodiless {
                    lease.finish(false);
                }
                metrics::counter!("gateway_upstream_errors_total", "route" => f.route.name.clone(), "kind" => "timeout").increment(1);
                return problem(Problem::gateway_timeout(
                    "the upstream service did not answer in time",
                ));
            }
            Ok(Err(Failed {
                connect,
                too_large,
                error: e,
            })) => {
                if too_large {
                    // The client's fault: the lease goes back without a verdict.
                    return problem(Problem::payload_too_large(f.route.max_body as usize));
                }
                let ep = lease.endpoint.clone();
                // A broken request body is the client's doing, not the endpoint's.
                if bodiless || connect {
                    lease.finish(false);
                }
                tracing::warn!(error = %e, route = &*f.route.name, endpoint = %ctx.outcome.endpoint.as_deref().unwrap_or(""), "upstream request failed");
                metrics::counter!("gateway_upstream_errors_total", "route" => f.route.name.clone(), "kind" => "connect").increment(1);
                if can_retry && cluster.withdraw() {
                    metrics::counter!("gateway_retries_total", "cluster" => cluster.name.clone())
                        .increment(1);
                    last_endpoint = Some(ep);
                    continue;
                }
                return problem(Problem::bad_gateway("the upstream service is unreachable"));
            }
            Ok(Ok(res)) => {
                let failed = res.status().is_server_error();
                let ep = lease.endpoint.clone();
                lease.finish(!failed);
                if failed
                    && can_retry
                    && matches!(res.status().as_u16(), 502..=504)
                    && cluster.withdraw()
                {
                    metrics::counter!("gateway_retries_total", "cluster" => cluster.name.clone())
                        .increment(1);
                    last_endpoint = Some(ep);
                    continue;
                }
                let conn = parts.extensions.get::<ConnInfo>().cloned();
                return answer(ctx, f, res, client_upgrade, conn);
            }
        }
    }
}

/// The request's headers as the upstream gets them: `Host` removed (the client sets the
/// endpoint's), forwarding headers (believed and extended only from trusted proxies; from
/// anyone else replaced, so an upstream reading any of them sees the truth), a WebSocket's
/// upgrade or `te: trailers` named as hop-by-hop, and the cluster's HTTP version.
/// The forwarding headers: `X-Forwarded-For` (extended from trusted proxies, replaced from
/// anyone else), then those only a trusted proxy's are believed of.
static FORWARDING: [header::HeaderName; 5] = [
    header::HeaderName::from_static("x-forwarded-for"),
    header::FORWARDED,
    header::HeaderName::from_static("x-real-ip"),
    header::HeaderName::from_static("x-forwarded-proto"),
    header::HeaderName::from_static("x-forwarded-host"),
];

fn upstream_headers(
    ctx: &Ctx<'_>,
    cluster: &Cluster,
    parts: &mut http::request::Parts,
    upgrading: bool,
) {
    let client = ctx.client;
    let original_host = parts.headers.remove(header::HOST);
    let peer = client.map(|c| c.peer);
    let trusted = client.is_some_and(|c| c.trusted);
    let prior_xff = trusted
        .then(|| {
            parts
                .headers
                .get_all(&names::X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|x| !x.is_empty());
    // One pass over the names: most requests carry none of these.
    if parts.headers.keys().any(|k| FORWARDING.contains(k)) {
        if !trusted {
            for h in &FORWARDING[1..] {
                parts.headers.remove(h);
            }
        }
        parts.headers.remove(&names::X_FORWARDED_FOR);
    }
    if let Some(ip) = peer {
        let xff = match (prior_xff, &ctx.client_ip_value) {
            (None, Some(v)) if client.map(|c| c.ip) == Some(ip) => Some(v.clone()),
            (Some(prev), _) => HeaderValue::from_str(&format!("{prev}, {ip}")).ok(),
            (None, _) => crate::wire::ip_value(ip),
        };
        if let Some(v) = xff {
            parts.headers.insert(names::X_FORWARDED_FOR.clone(), v);
        }
    }
    if !parts.headers.contains_key(&names::X_FORWARDED_HOST)
        && let Some(host) = original_host.or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
    {
        parts.headers.insert(names::X_FORWARDED_HOST.clone(), host);
    }
    if !parts.headers.contains_key(&names::X_FORWARDED_PROTO) {
        let proto = if ctx.tls { "https" } else { "http" };
        parts.headers.insert(
            names::X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(proto),
        );
    }
    if upgrading {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    } else if cluster.version() == http::Version::HTTP_11 && parts.headers.contains_key(header::TE)
    {
        // `te: trailers` is hop-by-hop in HTTP/1.1: named in `Connection`.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("te"));
    }
    parts.version = cluster.version();
}

/// Shadow traffic: when the route mirrors this request, the copy leaves before the request,
/// on its own task. A copied body is read first (it is small, and must arrive within the
/// route's timeout); the body to send on is then that copy. Refused (400, 408) when the
/// body cannot be read in time.
async fn mirror(
    f: &Forward<'_>,
    parts: &http::request::Parts,
    path_and_query: &http::uri::PathAndQuery,
    body: Body,
    timeout: Duration,
) -> Result<Body, Response<Body>> {
    let bodiless = body.is_end_stream();
    let Some(m) = f
        .route
        .mirror
        .as_ref()
        .filter(|m| m.sample(f.content_length, bodiless))
    else {
        return Ok(body);
    };
    let buffered = if bodiless {
        None
    } else {
        match tokio::time::timeout(timeout, crate::traffic::buffer(body, m.max_body)).await {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                return Err(problem(Problem::bad_request(
                    "the request body could not be read",
                )));
            }
            Err(_) => {
                return Err(problem(
                    Problem::typed(
                        http::StatusCode::REQUEST_TIMEOUT,
                        "request-timeout",
                        "Request Timeout",
                    )
                    .detail("the request body did not arrive in time"),
                ));
            }
        }
    };
    if let Some(shadow) = m.slot() {
        shadow.send(
            parts.method.clone(),
            path_and_query.clone(),
            parts.headers.clone(),
            buffered.clone(),
            m.cluster.request_timeout,
        );
    }
    Ok(match buffered {
        Some(b) => Full::new(b).map_err(|never| match never {}).boxed(),
        None => empty(),
    })
}

/// The target of one attempt: origin-form over a kept connection, absolute-form (the
/// endpoint's scheme and authority) for the cluster's client.
fn attempt_uri(kept: bool, ep: &Endpoint, path_and_query: &http::uri::PathAndQuery) -> Option<Uri> {
    if kept {
        return Some(Uri::from(path_and_query.clone()));
    }
    Uri::builder()
        .scheme(ep.scheme.clone())
        .authority(ep.authority.clone())
        .path_and_query(path_and_query.clone())
        .build()
        .ok()
}

/// The upstream request: the client's method and the upstream's version from `parts`.
fn build(
    parts: &http::request::Parts,
    uri: Uri,
    headers: http::HeaderMap,
    body: Body,
) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = uri;
    *r.headers_mut() = headers;
    *r.version_mut() = parts.version;
    r
}

/// One attempt: over this worker's kept connections to the endpoint (`kept`: the request
/// is idempotent and body-less, so it can be built again from `parts` if a kept connection
/// ends under it before any answer), or through the cluster's client.
async fn send(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    kept: bool,
    req: Request<Body>,
    parts: &http::request::Parts,
) -> Result<Response<Body>, Failed> {
    if !kept {
        return match cluster.client().request(req).await {
            Ok(res) => Ok(res.map(|b| b.map_err(Into::into).boxed())),
            Err(e) => Err(Failed {
                connect: e.is_connect(),
                too_large: is_length_limit(&e),
                error: e.into(),
            }),
        };
    }
    let uri = req.uri().clone();
    let again = || Some(build(parts, uri.clone(), parts.headers.clone(), empty()));
    match ep
        .kept
        .send(&cluster.connector, &cluster.upstream, req, again)
        .await
    {
        // A WebSocket's connection is its tunnel's from now on.
        Ok((res, _)) if res.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
            Ok(res.map(|b| b.map_err(Into::into).boxed()))
        }
        Ok((res, conn)) => Ok(res.map(|b| {
            KeepAtEnd::new(b, conn, ep.kept.clone(), cluster.upstream)
                .map_err(Into::into)
                .boxed()
        })),
        Err(upstream::Error::Connect) => Err(Failed {
            connect: true,
            too_large: false,
            error: "the connection to the endpoint could not be made".into(),
        }),
        Err(upstream::Error::Request(e)) => Err(Failed {
            connect: false,
            too_large: is_length_limit(&e),
            error: e.into(),
        }),
    }
}

/// The upstream's answer as the client gets it: a WebSocket's tunnel opened (when the
/// upstream agreed to what the client asked), hop-by-hop headers stripped, the rate-limit
/// headers and a variant's cookie added.
fn answer(
    ctx: &Ctx<'_>,
    f: Forward<'_>,
    mut res: Response<Body>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    conn: Option<ConnInfo>,
) -> Response<Body> {
    let tunnel = if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let agreed = res
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let Some(client_side) = client_upgrade.filter(|_| agreed) else {
            tracing::warn!(
                route = &*f.route.name,
                "upstream switched protocols unasked"
            );
            return problem(Problem::bad_gateway("the upstream answered unexpectedly"));
        };
        let upstream_side = hyper::upgrade::on(&mut res);
        tunnel::open(
            client_side,
            upstream_side,
            f.route.name.clone(),
            conn,
            Duration::from_millis(ctx.rt.config.limits.websocket_idle_timeout_ms),
        );
        Some(HeaderValue::from_static("websocket"))
    } else {
        None
    };
    let (mut rparts, rbody) = res.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    if let Some(proto) = tunnel {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        rparts.headers.insert(header::UPGRADE, proto);
    }
    let mut res = Response::from_parts(rparts, rbody);
    if let Some(d) = &f.limit {
        limit::headers(&mut res, d);
    }
    if let Some(c) = f.chosen.set_cookie {
        res.headers_mut().append(header::SET_COOKIE, c);
    }
    res
}

/// An upstream call that got no answer.
struct Failed {
    /// No connection could be made (a verdict on the endpoint whatever the request).
    connect: bool,
    /// The request's body went past the route's limit (the client's doing).
    too_large: bool,
    error: crate::wire::BoxError,
}

/// The path and query sent upstream: `path` (normalised, maybe rewritten) and the client's
/// query. When `path` is what the client sent (the usual case) the client's own target is
/// reused, shared; but only when its text starts with that path: an absolute-form
/// `http://host?q` has the path `/` and the text `?q`, which an HTTP/2 upstream refuses.
fn upstream_target(uri: &Uri, path: String) -> Option<http::uri::PathAndQuery> {
    if path == uri.path()
        && let Some(pq) = uri
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
    {
        return Some(pq.clone());
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    http::uri::PathAndQuery::try_from(target).ok()
}

/// Methods a retry cannot turn into a second effect (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use http::Uri;

    use super::*;

    #[test]
    fn upstream_target_reuses_the_clients_only_when_it_is_the_same() {
        let t = |uri: &str, path: &str| {
            upstream_target(&uri.parse().unwrap(), path.to_owned())
                .unwrap()
                .as_str()
                .to_owned()
        };
        assert_eq!(t("/a/b?x=1", "/a/b"), "/a/b?x=1");
        assert_eq!(t("/a/b?", "/a/b"), "/a/b?");
        assert_eq!(t("/a/%7Eb?x=1", "/a/~b"), "/a/~b?x=1");
        assert_eq!(t("/api/x?y", "/x"), "/x?y");
        // Absolute form with a query and no path: the path is `/`, never the bare `?x=1`
        // (which is what the parsed target's own text is).
        let bare: Uri = "http://gw.example?x=1".parse().unwrap();
        assert_eq!(
            (bare.path(), bare.path_and_query().unwrap().as_str()),
            ("/", "?x=1")
        );
        assert_eq!(t("http://gw.example?x=1", "/"), "/?x=1");
        assert_eq!(t("http://gw.example", "/"), "/");
    }
}
