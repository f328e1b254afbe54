//! Phase `authenticate`: who is calling, from whatever credentials came with the request.
//!
//! Reads `Authorization: Bearer` (verified against the JWKS, through the verified-token
//! cache) and the API key header (removed from the request either way: a key never goes
//! upstream). Hands on the caller, or none for an anonymous request. Ends the request with
//! 401 for credentials that are presented but not valid (even on public routes), 503 when
//! the identity provider's keys cannot be fetched.

use std::sync::Arc;

use http::Request;
use http::header;
use shopmesh_platform::problem::Problem;

use super::{Ctx, Flow};
use crate::jwt::AuthError;
use crate::runtime::{Route, Runtime};
use crate::wire::{Body, problem};

/// The caller a request was authenticated as.
pub(crate) struct Caller {
    pub id: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub api_key: Option<String>,
    /// The token's claims (none for an API key).
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

pub(super) async fn run(
    ctx: &Ctx<'_>,
    route: &Route,
    req: &mut Request<Body>,
) -> Flow<Option<Caller>> {
    authenticate(ctx.rt, req).await.map_err(|p| {
        metrics::counter!("gateway_auth_failures_total", "route" => route.name.clone())
            .increment(1);
        problem(p).into()
    })
}

fn auth_problem(e: &AuthError) -> Problem {
    match e {
        AuthError::KeysUnavailable(_) => {
            Problem::unavailable("the identity provider's keys cannot be fetched; retry shortly")
        }
        AuthError::Expired => Problem::unauthorized("the access token has expired"),
        AuthError::Revoked => Problem::unauthorized("the access token was revoked; sign in again"),
        _ => Problem::unauthorized("the access token is not valid"),
    }
}

/// Verifies whatever credentials came with the request. `Ok(None)`: anonymous.
async fn authenticate(rt: &Runtime, req: &mut Request<Body>) -> Result<Option<Caller>, Problem> {
    // The key never goes upstream, whichever credential is used.
    let presented_key = rt
        .api_keys
        .as_ref()
        .and_then(|k| req.headers_mut().remove(&k.header));
    let bearer = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| {
            let (scheme, token) = s.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        }) {
            Some(t) if !t.is_empty() => Some(t.to_owned()),
            _ => {
                return Err(Problem::unauthorized(
                    "expected `Authorization: Bearer <token>`",
                ));
            }
        },
    };
    if let Some(token) = bearer {
        let Some(jwt) = &rt.jwt else {
            return Err(Problem::unauthorized("bearer tokens are not accepted here"));
        };
        return match jwt.verify(&token).await {
            Ok(id) => Ok(Some(Caller {
                id: id.subject,
                roles: id.roles,
                scopes: id.scopes,
                api_key: None,
                claims: Some(id.claims),
            })),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(auth_problem(&e))
            }
        };
    }
    if let Some(keys) = &rt.api_keys
        && let Some(presented) = presented_key
    {
        return match keys.find(presented.as_bytes()) {
            Some(k) => Ok(Some(Caller {
                id: format!("apikey:{}", k.name),
                roles: k.roles.clone(),
                scopes: Vec::new(),
                api_key: Some(k.name.clone()),
                claims: None,
            })),
            None => Err(Problem::unauthorized("the API key is not valid")),
        };
    }
    Ok(None)
}
