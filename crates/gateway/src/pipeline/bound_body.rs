//! Phase `bound_body`: a request body larger than the route allows goes no further.
//!
//! Reads `Content-Length` and the route's `max_body_bytes`; hands on the declared length.
//! Ends the request with 413 at once when the declared length is too big; a streamed body
//! that grows past the limit is cut later, in `forward`.

use http::Request;
use http::header;
use shopmesh_platform::problem::Problem;

use super::Flow;
use crate::runtime::Route;
use crate::wire::{Body, problem};

pub(super) fn run(route: &Route, req: &Request<Body>) -> Flow<Option<u64>> {
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|len| len > route.max_body) {
        return Err(problem(Problem::payload_too_large(route.max_body as usize)).into());
    }
    Ok(content_length)
}
