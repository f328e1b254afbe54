//! Phase `route`: the first route, in declaration order, whose match fits.
//!
//! Reads the method, the host, the headers and the normalised path; hands on the route and
//! its path parameters, and names the route (and its cluster) in the outcome. Ends the
//! request with 404 when no route matches.

use std::collections::BTreeMap;

use http::Request;
use http::header;
use shopmesh_platform::problem::Problem;

use super::{Ctx, Flow, Outcome};
use crate::runtime::{Route, Target};
use crate::wire::{Body, problem};

pub(super) fn run<'rt>(
    ctx: &mut Ctx<'rt>,
    path: &str,
    req: &Request<Body>,
) -> Flow<(&'rt Route, BTreeMap<String, String>)> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let matched = crate::router::match_path(path);
    let Some((route, params)) = ctx.rt.routes.iter().find_map(|r| {
        r.matcher
            .matches(req.method(), host, &matched, req.headers())
            .map(|params| (r, params))
    }) else {
        return Err(problem(Problem::not_found("no route matches this request")).into());
    };
    ctx.outcome = Outcome::new(route.name.clone());
    if let Target::Cluster(c) = &route.target {
        ctx.outcome.cluster = Some(c.name.clone());
    }
    Ok((route, params))
}
