//! Phase `limit`: the route's rate limit.
//!
//! Reads the route's limiter and key (client address, caller, API key or the whole route);
//! hands on the decision, whose `RateLimit-*` headers the answer carries. Ends the request
//! with 429 (and `Retry-After`) when the bucket is empty.

use http::Response;
use http::header::HeaderValue;
use shopmesh_platform::problem::Problem;

use super::{Caller, Ctx, Flow};
use crate::config::RateLimitKey;
use crate::ratelimit::Decision;
use crate::runtime::Route;
use crate::wire::{Body, problem};

pub(super) async fn run(
    ctx: &Ctx<'_>,
    route: &Route,
    caller: Option<&Caller>,
) -> Flow<Option<Decision>> {
    let Some(limiter) = &route.limiter else {
        return Ok(None);
    };
    let client_ip = ctx.client.map(|c| c.ip);
    let ip = || client_ip.map(|i| i.to_string()).unwrap_or_default();
    let key = match route.limit_key {
        RateLimitKey::Ip => ip(),
        RateLimitKey::Route => String::new(),
        RateLimitKey::User => caller.map(|c| c.id.clone()).unwrap_or_else(ip),
        RateLimitKey::ApiKey => caller.and_then(|c| c.api_key.clone()).unwrap_or_else(ip),
    };
    let d = limiter.check(&route.name, &key).await;
    if !d.allowed {
        metrics::counter!("gateway_ratelimit_rejections_total", "route" => route.name.clone())
            .increment(1);
        let secs = d.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut res = problem(Problem::too_many_requests(secs));
        headers(&mut res, &d);
        return Err(res.into());
    }
    Ok(Some(d))
}

/// `RateLimit-Limit`, `-Remaining`, `-Reset` on an answer.
pub(super) fn headers(res: &mut Response<Body>, d: &Decision) {
    let h = res.headers_mut();
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert(
        "ratelimit-reset",
        HeaderValue::from(d.reset.as_secs_f64().ceil() as u64),
    );
}
