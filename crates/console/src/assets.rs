//! The page's files, embedded in the binary.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// (path under `/console/assets/`, content type, content)
const FILES: &[(&str, &str, &str)] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../static/console.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("../static/icon.svg"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/app.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/dom.js"),
    ),
    (
        "views/overview.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/overview.js"),
    ),
    (
        "views/routes.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/routes.js"),
    ),
    (
        "views/topology.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/topology.js"),
    ),
    (
        "views/composites.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/composites.js"),
    ),
    (
        "views/orders.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/orders.js"),
    ),
    (
        "views/messaging.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/messaging.js"),
    ),
    (
        "views/config.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/config.js"),
    ),
    (
        "views/feed.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/views/feed.js"),
    ),
];

const INDEX: &str = include_str!("../static/index.html");

/// Each file's entity tag (a digest of the build's content).
fn etags() -> &'static Vec<String> {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, _, body)| format!("\"{}\"", &hex::encode(Sha256::digest(body))[..16]))
            .collect()
    })
}

pub(crate) async fn index() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        INDEX,
    )
        .into_response()
}

pub(crate) async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(p, _, _)| *p == path) else {
        return shopmesh_platform::Problem::not_found("no such file").into_response();
    };
    let (_, content_type, body) = FILES[i];
    let tag = &etags()[i];
    let cache = [
        (header::ETAG, HeaderValue::from_str(tag).expect("hex")),
        // Revalidated each time: a new binary may bring new files under the same names.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

#[cfg(test)]
pub(crate) fn paths() -> impl Iterator<Item = &'static str> {
    FILES.iter().map(|(p, _, _)| *p)
}
