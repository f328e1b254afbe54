//! Phase `authorise`: may this caller use this route, and what the upstream is told.
//!
//! Reads the route's `auth` (required, roles, scopes) and the caller. Sets the identity
//! headers the services trust (`x-shopmesh-user-id`, `x-shopmesh-user-roles`) and the
//! client's address header, and names the caller in the outcome. Ends the request with 401
//! when the route needs credentials and none came, 403 when a role or scope is missing.

use http::Request;
use http::header::HeaderValue;
use shopmesh_platform::problem::Problem;

use super::{Caller, Ctx, Flow};
use crate::runtime::Route;
use crate::wire::{Body, names, problem};

pub(super) fn run(
    ctx: &mut Ctx<'_>,
    route: &Route,
    caller: Option<&Caller>,
    req: &mut Request<Body>,
) -> Flow<()> {
    match caller {
        None if route.needs_identity() => {
            return Err(problem(Problem::unauthorized("credentials are required")).into());
        }
        Some(c) => {
            ctx.outcome.caller = Some(c.id.clone());
            if !route.auth.roles.is_empty() && !c.roles.iter().any(|r| route.auth.roles.contains(r))
            {
                return Err(problem(Problem::forbidden(
                    "the caller lacks a role this route requires",
                ))
                .into());
            }
            if !route.auth.scopes.iter().all(|s| c.scopes.contains(s)) {
                return Err(problem(Problem::forbidden(
                    "the token lacks a scope this route requires",
                ))
                .into());
            }
            let h = req.headers_mut();
            let Ok(id) = HeaderValue::from_str(&c.id) else {
                ctx.outcome.caller = None;
                return Err(problem(Problem::unauthorized("the credentials are not valid")).into());
            };
            h.insert(names::USER_ID.clone(), id);
            if let Ok(v) = HeaderValue::from_str(&c.roles.join(",")) {
                h.insert(names::USER_ROLES.clone(), v);
            }
        }
        None => {}
    }
    ctx.client_ip_value = ctx.client.and_then(|c| {
        // The peer's own (made once per connection) unless a trusted proxy named another.
        req.extensions()
            .get::<crate::worker::ConnInfo>()
            .and_then(|i| i.peer_ip.clone())
            .filter(|_| c.ip == c.peer)
            .or_else(|| crate::wire::ip_value(c.ip))
    });
    if let Some(v) = &ctx.client_ip_value {
        req.headers_mut()
            .insert(names::CLIENT_IP.clone(), v.clone());
    }
    Ok(())
}
