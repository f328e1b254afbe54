use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State as S;
use axum::http::{StatusCode, header};
use axum::routing::{get, post};
use shopmesh_platform::Problem;
use shopmesh_platform::db::is_unique_violation;
use shopmesh_platform::extract::Json;
use shopmesh_platform::identity::Caller;
use shopmesh_platform::validate::Errors;
use utoipa::OpenApi;

use crate::State;
use crate::keys::Jwks;
use crate::model::{Claims, Credentials, ProfileUpdate, Registration, TokenResponse, User};
use crate::{password, store};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh users",
        description = "User center: registration, tokens, JWKS, profile."
    ),
    paths(register, token, jwks, me, update_me),
    components(schemas(User, Registration, Credentials, TokenResponse, ProfileUpdate, Jwks))
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/users", post(register))
        .route("/api/users/me", get(me).patch(update_me))
        .route("/api/auth/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

fn email_ok(email: &str) -> bool {
    let mut parts = email.split('@');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(local), Some(domain), None) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && email.len() <= 254
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        _ => false,
    }
}

/// Register a new user (role `customer`).
#[utoipa::path(post, path = "/api/users", request_body = Registration,
    responses((status = 201, body = User), (status = 409, description = "Email taken"),
              (status = 422, description = "Invalid registration")))]
async fn register(
    S(s): S<State>,
    Json(r): Json<Registration>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<User>), Problem> {
    let email = normalise_email(&r.email);
    let name = r.name.trim();
    let pw_len = r.password.chars().count();
    let mut errs = Errors::new();
    errs.check(email_ok(&email), "email", "must be a valid email address")
        .check(
            (8..=128).contains(&pw_len),
            "password",
            "must be 8 to 128 characters",
        )
        .check(
            !name.is_empty() && name.chars().count() <= 100,
            "name",
            "must be 1 to 100 characters",
        );
    errs.into_result()?;
    let hash = password::hash(r.password)
        .await
        .map_err(|e| Problem::internal(&e))?;
    let id = uuid::Uuid::now_v7().to_string();
    let new = store::NewUser {
        id: &id,
        email: &email,
        name,
        password_hash: &hash,
        role: "customer",
    };
    match store::insert(&s.db, &new).await {
        Ok(()) => {}
        Err(e) if is_unique_violation(&e) => {
            return Err(Problem::conflict(
                "an account with this email already exists",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user_id = %id, "user registered");
    let user = store::get(&s.db, &id)
        .await?
        .ok_or_else(|| Problem::internal(&"registered user vanished"))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, "/api/users/me".to_owned())],
        Json(user),
    ))
}

/// Exchange email and password for an access token.
#[utoipa::path(post, path = "/api/auth/token", request_body = Credentials,
    responses((status = 200, body = TokenResponse),
              (status = 401, description = "Wrong email or password (same answer for both)")))]
async fn token(S(s): S<State>, Json(c): Json<Credentials>) -> Result<Json<TokenResponse>, Problem> {
    let email = normalise_email(&c.email);
    let found = if c.password.len() > 1024 {
        None
    } else {
        store::credentials(&s.db, &email).await?
    };
    let (user, hash) = match found {
        Some((u, h)) => (Some(u), Some(h)),
        None => (None, None),
    };
    let ok = password::verify(c.password, hash).await;
    let user = match user {
        Some(u) if ok && u.status == "active" => u,
        _ => return Err(Problem::unauthorized("wrong email or password")),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let ttl = s.settings.access_ttl.as_secs();
    let claims = Claims {
        sub: user.id,
        iss: s.settings.issuer.clone(),
        aud: s.settings.audience.clone(),
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: uuid::Uuid::new_v4().to_string(),
        roles: vec![user.role],
    };
    let access_token = s.keys.sign(&claims).map_err(|e| Problem::internal(&e))?;
    Ok(Json(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: ttl,
    }))
}

/// The public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, body = Jwks)))]
async fn jwks(S(s): S<State>) -> ([(header::HeaderName, &'static str); 1], Json<Jwks>) {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(s.keys.jwks().clone()),
    )
}

/// The caller's own profile.
#[utoipa::path(get, path = "/api/users/me",
    responses((status = 200, body = User), (status = 401, description = "No identity")))]
async fn me(S(s): S<State>, caller: Caller) -> Result<Json<User>, Problem> {
    store::get(&s.db, &caller.user_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("no such user"))
}

/// Update the caller's own profile.
#[utoipa::path(patch, path = "/api/users/me", request_body = ProfileUpdate,
    responses((status = 200, body = User), (status = 422, description = "Invalid profile")))]
async fn update_me(
    S(s): S<State>,
    caller: Caller,
    Json(u): Json<ProfileUpdate>,
) -> Result<Json<User>, Problem> {
    if let Some(name) = u.name.as_deref().map(str::trim) {
        let mut errs = Errors::new();
        errs.check(
            !name.is_empty() && name.chars().count() <= 100,
            "name",
            "must be 1 to 100 characters",
        );
        errs.into_result()?;
        if !store::update_name(&s.db, &caller.user_id, name).await? {
            return Err(Problem::not_found("no such user"));
        }
    }
    me(S(s), caller).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(email_ok("a@b.io"));
        assert!(!email_ok("a@b"));
        assert!(!email_ok("a b@c.io"));
        assert!(!email_ok("@c.io"));
        assert!(!email_ok("a@@c.io"));
        assert_eq!(normalise_email("  A@B.IO "), "a@b.io");
    }
}
