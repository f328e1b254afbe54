//! Phase `normalise`: what is matched is what is forwarded.
//!
//! Reads the request's path; hands on the normalised path (dot segments, `%2e`, repeated
//! slashes resolved). Ends the request with 400 when the path cannot be normalised safely
//! (encoded slashes or backslashes).

use http::Request;
use shopmesh_platform::problem::Problem;

use super::Flow;
use crate::wire::{Body, problem};

pub(super) fn run(req: &Request<Body>) -> Flow<String> {
    crate::router::normalize(req.uri().path())
        .map_err(|e| problem(Problem::bad_request(e.to_string())).into())
}
