//! Phase `identity`: nobody but the gateway speaks for the caller's identity.
//!
//! Reads the request's headers; removes every `x-shopmesh-*` header a client sent (the
//! services trust those, and only `authorise` sets them, from verified credentials). Never
//! ends a request.

use http::Request;
use http::header::HeaderName;
use shopmesh_platform::TRUSTED_HEADER_PREFIX;

use crate::wire::Body;

pub(super) fn run(req: &mut Request<Body>) {
    let spoofed: Vec<HeaderName> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with(TRUSTED_HEADER_PREFIX))
        .cloned()
        .collect();
    for k in spoofed {
        req.headers_mut().remove(k);
    }
}
