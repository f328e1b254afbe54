//! The wire primitives every part of the gateway shares: the body and client types,
//! problem answers, the header names the gateway sets, hop-by-hop headers. A leaf: it imports
//! nothing else of the gateway.

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use shopmesh_platform::problem::Problem;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the gateway.
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn problem(p: Problem) -> Response<Body> {
    let mut res = Response::new(full(p.to_body()));
    *res.status_mut() = p.status;
    for (name, value) in p.headers() {
        res.headers_mut().insert(name, value);
    }
    res
}

/// Header names the proxy and the composites set on every request, parsed once (a `&str`
/// name is parsed and validated on every map operation).
pub(crate) mod names {
    use http::HeaderName;
    pub static REQUEST_ID: HeaderName =
        HeaderName::from_static(shopmesh_platform::REQUEST_ID_HEADER);
    pub static USER_ID: HeaderName = HeaderName::from_static(shopmesh_platform::USER_ID_HEADER);
    pub static USER_ROLES: HeaderName =
        HeaderName::from_static(shopmesh_platform::USER_ROLES_HEADER);
    pub static CLIENT_IP: HeaderName = HeaderName::from_static(shopmesh_platform::CLIENT_IP_HEADER);
    pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
/// (`Trailer` is end-to-end: HTTP/1.1 senders name the trailer fields in it.)
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Whether the `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names marks the hop-by-hop ones present (most messages carry none,
    // or only `Connection`); only those are removed.
    let mut present = 0u16;
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too. A name of the list goes anyway when
    // present; any other is removed by name (the rare case that allocates).
    let mut named: Vec<HeaderName> = Vec::new();
    if present & 1 != 0 {
        let tokens = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(t))
            });
        named.extend(tokens.filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()));
    }
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// An address as a header value, formatted on the stack (no `String` per request).
pub(crate) fn ip_value(ip: std::net::IpAddr) -> Option<http::HeaderValue> {
    use std::io::Write;
    // The longest text of an address: an IPv6 one with an embedded IPv4 one, 45 bytes.
    let mut buf = [0u8; 48];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    write!(cur, "{ip}").ok()?;
    let n = cur.position() as usize;
    http::HeaderValue::from_bytes(&buf[..n]).ok()
}

pub(crate) fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// GETs a JSON document of at most `limit` bytes, body included within `deadline`.
pub(crate) async fn get_bounded(
    client: &HttpClient,
    url: &str,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, String> {
    let req = http::Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body::<Body>(empty())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let res = client.request(req).await.map_err(|e| e.to_string())?;
        if !res.status().is_success() {
            return Err(format!("status {}", res.status()));
        }
        http_body_util::Limited::new(res.into_body(), limit)
            .collect()
            .await
            .map_err(|e| e.to_string())
            .map(|b| b.to_bytes())
    };
    tokio::time::timeout(deadline, fetch)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use http::header::HeaderValue;

    use super::*;

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
        // Without `Connection`: the listed names still go; named in any case, a listed
        // name that is absent removes nothing else.
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["accept"]);
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("Keep-Alive, Upgrade"),
        );
        h.append("connection", HeaderValue::from_static(" X-Other ,"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["accept"]);
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn addresses_become_header_values() {
        for ip in [
            "127.0.0.1",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let v = ip_value(ip.parse().unwrap()).unwrap();
            assert_eq!(
                v.to_str().unwrap(),
                ip.parse::<std::net::IpAddr>().unwrap().to_string()
            );
        }
    }
}
