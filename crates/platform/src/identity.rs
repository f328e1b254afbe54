//! The caller's identity as the gateway vouches for it.
//!
//! Services run behind the gateway, which verifies the bearer token and sets
//! [`USER_ID_HEADER`](crate::USER_ID_HEADER) / [`USER_ROLES_HEADER`](crate::USER_ROLES_HEADER)
//! after stripping every `x-shopmesh-*` header a client sent. A service therefore trusts
//! these headers, and must only be reachable through the gateway (loopback by default).

use axum::extract::FromRequestParts;
use http::request::Parts;

use crate::problem::Problem;
use crate::{USER_ID_HEADER, USER_ROLES_HEADER};

/// An authenticated caller. Extracting it from a request without identity answers 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub roles: Vec<String>,
}

impl Caller {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// 403 unless the caller has `role`.
    pub fn require_role(&self, role: &str) -> Result<(), Problem> {
        if self.has_role(role) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this action needs the `{role}` role"
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user_id = parts
            .headers
            .get(USER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Problem::unauthorized("a valid bearer token is required"))?
            .to_owned();
        let roles = parts
            .headers
            .get(USER_ROLES_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Caller { user_id, roles })
    }
}
