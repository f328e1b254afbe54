//! Phase `variant`: which cluster a forwarded request goes to.
//!
//! A plain route has one; a split (gray release, A/B test) assigns a variant by its rules,
//! else by a sticky weighted draw on who the caller is. Reads the headers, the query, the
//! caller and the variant cookie; sets the variant header for the upstream, names the
//! variant and its cluster in the outcome, and hands on the cluster and the cookie to set
//! on the answer. Never ends a request.

use std::sync::Arc;

use http::Request;
use http::header::HeaderValue;

use super::answer::Upstream;
use super::{Caller, Ctx};
use crate::cluster::Cluster;
use crate::wire::Body;

/// The cluster chosen, and the variant cookie a first-time caller gets.
pub(super) struct Chosen<'rt> {
    pub cluster: &'rt Arc<Cluster>,
    pub set_cookie: Option<HeaderValue>,
}

pub(super) fn run<'rt>(
    ctx: &mut Ctx<'_>,
    upstream: Upstream<'rt>,
    caller: Option<&Caller>,
    req: &mut Request<Body>,
) -> Chosen<'rt> {
    match upstream {
        Upstream::Cluster(cluster) => Chosen {
            cluster,
            set_cookie: None,
        },
        Upstream::Split(split) => {
            let a = split.assign(
                req.headers(),
                req.uri().query(),
                caller.map(|c| c.id.as_str()),
                ctx.tls,
            );
            ctx.outcome.variant = Some(a.variant.name.clone());
            ctx.outcome.cluster = Some(a.variant.cluster.name.clone());
            if let Ok(v) = HeaderValue::from_str(&a.variant.name) {
                req.headers_mut().insert(crate::traffic::VARIANT_HEADER, v);
            }
            Chosen {
                cluster: &a.variant.cluster,
                set_cookie: a.set_cookie,
            }
        }
    }
}
