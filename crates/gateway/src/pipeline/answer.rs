//! Phase `answer`: routes the gateway answers itself.
//!
//! A composite fans out to its parts and merges their answers (`crate::aggregate`); the
//! public API document is served from the configuration (`crate::openapi`). Reads the
//! route's target, its path parameters, the query, the headers and the caller. Ends the
//! request with that answer; for every other target hands on where the request is to be
//! forwarded.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::Request;

use super::{Caller, Flow, limit};
use crate::aggregate::{CallerView, Incoming};
use crate::cluster::Cluster;
use crate::ratelimit::Decision;
use crate::runtime::{Route, Target};
use crate::traffic::Split;
use crate::wire::Body;

/// Where a request the gateway does not answer itself goes.
pub(super) enum Upstream<'rt> {
    Cluster(&'rt Arc<Cluster>),
    Split(&'rt Split),
}

pub(super) async fn run<'rt>(
    route: &'rt Route,
    params: BTreeMap<String, String>,
    caller: Option<&Caller>,
    req: &Request<Body>,
    decision: Option<&Decision>,
) -> Flow<Upstream<'rt>> {
    match &route.target {
        Target::Aggregate(composite) => {
            let mut res = composite
                .serve(Incoming {
                    params,
                    query: req.uri().query(),
                    headers: req.headers(),
                    caller: caller.map(|c| CallerView {
                        id: &c.id,
                        roles: &c.roles,
                        claims: c.claims.as_deref(),
                    }),
                    deadline: route.deadline(),
                })
                .await;
            if let Some(d) = decision {
                limit::headers(&mut res, d);
            }
            // HEAD: hyper sends the headers (the length included) and drops the body.
            Err(res.into())
        }
        Target::Document(doc) => Err(doc.serve().await.into()),
        Target::Cluster(c) => Ok(Upstream::Cluster(c)),
        Target::Split(s) => Ok(Upstream::Split(s)),
    }
}
