//! Phase `route`: the first route, in declaration order, whose match fits (found through
//! the routes' index: the cost is the path's length, not the number of routes).
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

thread_local! {
    static CANDIDATES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
    // The routes whose path pattern fits, from the index, tried in declaration order with
    // their whole match (method, host, headers). The scratch list is this thread's.
    let found = CANDIDATES.with_borrow_mut(|candidates| {
        ctx.rt.route_index.candidates(&matched, candidates);
        candidates.iter().find_map(|&i| {
            let r = ctx.rt.routes.get(i as usize)?;
            r.matcher
                .matches(req.method(), host, &matched, req.headers())
                .map(|params| (r, params))
        })
    });
    let Some((route, params)) = found else {
        return Err(problem(Problem::not_found("no route matches this request")).into());
    };
    ctx.outcome = Outcome::new(route.name.clone());
    if let Target::Cluster(c) = &route.target {
        ctx.outcome.cluster = Some(c.name.clone());
    }
    Ok((route, params))
}
