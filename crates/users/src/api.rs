use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State as S;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::routing::{get, post};
use shopmesh_platform::Problem;
use shopmesh_platform::db::is_unique_violation;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::validate::Errors;
use utoipa::OpenApi;

use crate::State;
use crate::keys::Jwks;
use crate::model::{
    Address, AdminListQuery, AdminUpdate, Claims, Credentials, KeyRotation, ProfileUpdate, ROLES,
    RefreshRequest, Registration, Revocations, Revoked, STATUSES, TokenResponse, User, UserPage,
};
use crate::tokens::Refresh;
use crate::{password, store, tokens};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh users",
        description = "User center: registration, tokens, JWKS, profile."
    ),
    paths(
        register,
        token,
        refresh,
        logout,
        jwks,
        me,
        update_me,
        list_users,
        administer,
        rotate_keys
    ),
    components(schemas(
        User,
        Address,
        Registration,
        Credentials,
        TokenResponse,
        RefreshRequest,
        ProfileUpdate,
        Jwks,
        UserPage,
        AdminUpdate,
        KeyRotation
    )),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/users", post(register))
        .route("/api/users/me", get(me).patch(update_me))
        .route("/api/auth/token", post(token))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/logout", post(logout))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/admin/users", get(list_users))
        .route("/api/admin/users/{id}", axum::routing::patch(administer))
        .route("/api/admin/keys/rotate", post(rotate_keys))
        // For the gateway and the services, straight from the service: not routed to clients.
        .route("/internal/revocations", get(revocations))
        .route("/internal/users/{id}", get(directory_entry))
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
    responses((status = 201, body = User, description = "Registered",
               headers(("Location" = String, description = "`/api/users/me`")),
               links(("signIn" = (operation_id = "token", request_body = json!({
                          "email": "$request.body#/email",
                          "password": "$request.body#/password"
                      }))),
                     ("administer" = (operation_id = "administer",
                                      parameters(("id" = "$response.body#/id")))))),
              (status = 409, description = "Email taken"),
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
            !(8..=128).contains(&pw_len) || password::acceptable(&r.password, &email),
            "password",
            "is too easy to guess (a common password, one repeated character, or your email)",
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
    // Never admin at registration, whatever the email (emails are not verified): the
    // bootstrap administrators are promoted at start-up, once their accounts exist.
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
    responses((status = 200, body = TokenResponse, links(
                  ("refresh" = (operation_id = "refresh", request_body = json!({
                       "refresh_token": "$response.body#/refresh_token"
                   }))),
                  ("logout" = (operation_id = "logout", request_body = json!({
                       "refresh_token": "$response.body#/refresh_token"
                   }))))),
              (status = 401, description = "Wrong email or password (same answer for both)"),
              (status = 429, description = "Too many sign-in attempts for the account or from \
                                              the address",
               headers(("Retry-After" = u64, description = "Seconds until the next attempt")))))]
async fn token(
    S(s): S<State>,
    headers: HeaderMap,
    Json(c): Json<Credentials>,
) -> Result<Json<TokenResponse>, Problem> {
    let email = normalise_email(&c.email);
    // The client's address as the gateway worked it out (trusted proxies included); the
    // service is only reachable through the gateway, which never lets clients set it.
    let ip = headers
        .get(shopmesh_platform::CLIENT_IP_HEADER)
        .and_then(|v| v.to_str().ok());
    if email.len() > 254 {
        return Err(Problem::unauthorized("wrong email or password"));
    }
    if let Err(wait) = s.throttle.check(&email, ip) {
        metrics::counter!("users_login_throttled_total").increment(1);
        return Err(
            Problem::too_many_requests(wait.as_secs_f64().ceil().max(1.0) as u64).detail(
                "too many sign-in attempts for this account or from this address; retry later",
            ),
        );
    }
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
    // The hash check takes a while: an account disabled meanwhile gets nothing.
    if !store::is_active(&s.db, &user.id).await? {
        return Err(Problem::unauthorized("wrong email or password"));
    }
    let refresh_token = tokens::issue(&s.db, &user.id, refresh_ttl_ms(&s)).await?;
    tracing::info!(user_id = %user.id, "signed in");
    Ok(Json(access(&s, user.id, user.role, refresh_token).await?))
}

fn refresh_ttl_ms(s: &State) -> i64 {
    i64::try_from(s.settings.refresh_ttl.as_millis()).unwrap_or(i64::MAX / 2)
}

/// A new access token for `user_id`, paired with `refresh_token`.
async fn access(
    s: &State,
    user_id: String,
    role: String,
    refresh_token: String,
) -> Result<TokenResponse, Problem> {
    let keys = s.keys().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let ttl = s.settings.access_ttl.as_secs();
    let claims = Claims {
        sub: user_id,
        iss: s.settings.issuer.clone(),
        aud: s.settings.audience.clone(),
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: uuid::Uuid::new_v4().to_string(),
        roles: vec![role],
    };
    let access_token = keys.sign(&claims).map_err(|e| Problem::internal(&e))?;
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token,
        refresh_expires_in: s.settings.refresh_ttl.as_secs(),
    })
}

/// Exchange a refresh token for a new access token and a new refresh token. The presented
/// one is spent; presenting it again revokes the session.
#[utoipa::path(post, path = "/api/auth/refresh", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse, links(
                  ("refresh" = (operation_id = "refresh", request_body = json!({
                       "refresh_token": "$response.body#/refresh_token"
                   }))))),
              (status = 401, description = "Unknown, expired, revoked or reused refresh token")))]
async fn refresh(
    S(s): S<State>,
    Json(r): Json<RefreshRequest>,
) -> Result<Json<TokenResponse>, Problem> {
    if r.refresh_token.is_empty() || r.refresh_token.len() > 256 {
        return Err(Problem::unauthorized("the refresh token is not valid"));
    }
    let outcome = tokens::refresh(&s.db, &r.refresh_token, refresh_ttl_ms(&s)).await?;
    match outcome {
        Refresh::Rotated { user_id, token } => {
            let user = store::get(&s.db, &user_id)
                .await?
                .ok_or_else(|| Problem::unauthorized("the refresh token is not valid"))?;
            Ok(Json(access(&s, user.id, user.role, token).await?))
        }
        Refresh::Invalid => Err(Problem::unauthorized(
            "the refresh token is not valid; sign in again",
        )),
        Refresh::Reused => Err(Problem::unauthorized(
            "the refresh token was already used: the session is revoked; sign in again",
        )),
    }
}

/// End a session: the refresh token and every token rotated from it stop working.
#[utoipa::path(post, path = "/api/auth/logout", request_body = RefreshRequest,
    responses((status = 204, description = "Signed out (also for an unknown token)")))]
async fn logout(S(s): S<State>, Json(r): Json<RefreshRequest>) -> Result<StatusCode, Problem> {
    if r.refresh_token.len() <= 256 {
        tokens::revoke(&s.db, &r.refresh_token).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json",
    extensions(("x-shopmesh-no-storage" = json!(true))),
    responses((status = 200, body = Jwks,
               headers(("Cache-Control" = String, description = "`public, max-age=60`")))))]
async fn jwks(S(s): S<State>) -> ([(header::HeaderName, &'static str); 1], Json<Jwks>) {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(s.keys().await.jwks().clone()),
    )
}

/// Rotate the signing key (admin): a new key is published at once and signs after the
/// activation delay (by then every gateway has fetched it); the old one stays in the JWKS
/// until the tokens it signed have expired, so tokens in flight keep working.
#[utoipa::path(post, path = "/api/admin/keys/rotate",
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = KeyRotation, description = "The new key"),
              (status = 403, description = "Not an admin (by the token and in the user center)")))]
async fn rotate_keys(S(s): S<State>, caller: Caller) -> Result<Json<KeyRotation>, Problem> {
    require_admin(&s, &caller).await?;
    let (kid, at) = crate::keys::rotate(&s.db, s.settings.key_activation)
        .await
        .map_err(|e| Problem::internal(&e))?;
    s.reload_keys().await;
    tracing::info!(kid = %kid, by = %caller.user_id, "signing key rotated");
    Ok(Json(KeyRotation {
        kid,
        signs_from: shopmesh_platform::millis_to_rfc3339(at),
    }))
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Whether an `If-Match` header value holds for `version` (strong comparison, RFC 9110
/// §13.1.1): `*`, or a list holding the current entity tag.
fn if_match_holds(value: &str, version: i64) -> bool {
    let current = format!("\"{version}\"");
    value.trim() == "*" || value.split(',').any(|t| t.trim() == current)
}

/// The caller's own profile, with its `ETag`.
#[utoipa::path(get, path = "/api/users/me",
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = User, headers(("ETag" = String, description = "Version of the profile, for If-Match"))),
              (status = 404, description = "The caller has no account")))]
async fn me(
    S(s): S<State>,
    caller: Caller,
) -> Result<([(header::HeaderName, HeaderValue); 1], Json<User>), Problem> {
    let (user, version) = store::get_versioned(&s.db, &caller.user_id)
        .await?
        .ok_or_else(|| Problem::not_found("no such user"))?;
    Ok(([(header::ETAG, etag(version))], Json(user)))
}

/// List and search accounts (admin).
#[utoipa::path(get, path = "/api/admin/users", params(AdminListQuery),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = UserPage),
              (status = 403, description = "Not an admin (by the token and in the user center)"),
              (status = 422, description = "A parameter out of bounds")))]
async fn list_users(
    S(s): S<State>,
    caller: Caller,
    Query(q): Query<AdminListQuery>,
) -> Result<Json<UserPage>, Problem> {
    require_admin(&s, &caller).await?;
    let mut errs = Errors::new();
    let (limit, offset) = shopmesh_platform::validate::page(&mut errs, q.limit, q.offset);
    errs.check(
        q.q.as_ref().is_none_or(|t| t.len() <= 200),
        "q",
        "at most 200 characters",
    )
    .check(
        q.role.as_deref().is_none_or(|r| ROLES.contains(&r)),
        "role",
        "customer or admin",
    )
    .check(
        q.status.as_deref().is_none_or(|r| STATUSES.contains(&r)),
        "status",
        "active or disabled",
    );
    errs.into_result()?;
    let filter = store::Filter {
        q: q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()),
        role: q.role.as_deref(),
        status: q.status.as_deref(),
    };
    let (items, total) = store::list(&s.db, &filter, limit, offset).await?;
    Ok(Json(UserPage {
        items,
        total,
        limit,
        offset,
    }))
}

/// The token says admin, and so does the user center now: a demoted or disabled admin's
/// token does not keep administering until it expires.
async fn require_admin(s: &State, caller: &Caller) -> Result<(), Problem> {
    caller.require_role("admin")?;
    match store::get(&s.db, &caller.user_id).await? {
        Some(u) if u.role == "admin" && u.status == "active" => Ok(()),
        _ => Err(Problem::forbidden("this action needs the `admin` role")),
    }
}

/// Change an account's role or status (admin). Disabling ends its sessions at once (refresh
/// tokens revoked) and its access tokens at the gateway within the revocation poll interval.
#[utoipa::path(patch, path = "/api/admin/users/{id}", request_body = AdminUpdate,
    params(("id" = String, Path, description = "User id")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = User),
              (status = 403, description = "Not an admin (by the token and in the user center)"),
              (status = 404, description = "No such user"),
              (status = 409, description = "Admins cannot demote or disable themselves"),
              (status = 422, description = "Invalid change")))]
async fn administer(
    S(s): S<State>,
    caller: Caller,
    Path(id): Path<String>,
    Json(u): Json<AdminUpdate>,
) -> Result<Json<User>, Problem> {
    require_admin(&s, &caller).await?;
    let mut errs = Errors::new();
    errs.check(
        u.role.as_deref().is_none_or(|r| ROLES.contains(&r)),
        "role",
        "customer or admin",
    )
    .check(
        u.status.as_deref().is_none_or(|r| STATUSES.contains(&r)),
        "status",
        "active or disabled",
    );
    errs.into_result()?;
    if id == caller.user_id
        && (u.role.as_deref().is_some_and(|r| r != "admin")
            || u.status.as_deref().is_some_and(|st| st != "active"))
    {
        return Err(Problem::conflict(
            "an admin cannot demote or disable their own account",
        ));
    }
    let mut tx = s.db.pool.begin().await?;
    if !store::administer(&mut tx, &id, u.role.as_deref(), u.status.as_deref()).await? {
        return Err(Problem::not_found(format!("no user with id `{id}`")));
    }
    crate::stage_updated(&mut tx, &id).await?;
    tx.commit().await?;
    s.relay.notify();
    if u.status.as_deref() == Some("disabled") {
        tokens::revoke_user(&s.db, &id).await?;
    }
    tracing::info!(user_id = %id, by = %caller.user_id, role = ?u.role, status = ?u.status, "account administered");
    store::get(&s.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no user with id `{id}`")))
}

/// One account as other services read it (the user-center interface): profile, role,
/// status and version.
#[utoipa::path(get, path = "/internal/users/{id}",
    responses((status = 200, body = User), (status = 404, description = "No such user")))]
async fn directory_entry(
    S(s): S<State>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    let (user, version) = store::get_versioned(&s.db, &id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no user with id `{id}`")))?;
    let mut v = serde_json::to_value(user).map_err(|e| Problem::internal(&e))?;
    v["version"] = version.into();
    Ok(Json(v))
}

/// Disabled accounts, for the gateway to refuse their access tokens.
#[utoipa::path(get, path = "/internal/revocations", responses((status = 200, body = Revocations)))]
async fn revocations(S(s): S<State>) -> Result<Json<Revocations>, Problem> {
    let lifetime = i64::try_from(s.settings.key_publish_for().as_secs()).unwrap_or(i64::MAX / 4);
    let revoked = store::revocations(&s.db, lifetime)
        .await?
        .into_iter()
        .map(|(sub, since)| Revoked { sub, since })
        .collect();
    Ok(Json(Revocations { revoked }))
}

fn check_address(errs: &mut Errors, i: usize, a: &Address) {
    let len_ok = |v: &str, max: usize| !v.trim().is_empty() && v.chars().count() <= max;
    let field = |name: &str| format!("addresses[{i}].{name}");
    errs.check(
        len_ok(&a.recipient, 100),
        &field("recipient"),
        "1 to 100 characters",
    )
    .check(
        len_ok(&a.line1, 200),
        &field("line1"),
        "1 to 200 characters",
    )
    .check(
        a.line2.as_deref().is_none_or(|l| l.chars().count() <= 200),
        &field("line2"),
        "at most 200 characters",
    )
    .check(len_ok(&a.city, 100), &field("city"), "1 to 100 characters")
    .check(
        len_ok(&a.postal_code, 20),
        &field("postal_code"),
        "1 to 20 characters",
    )
    .check(
        a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase()),
        &field("country"),
        "an ISO 3166-1 alpha-2 code in upper case",
    )
    .check(
        a.label.as_deref().is_none_or(|l| l.chars().count() <= 50),
        &field("label"),
        "at most 50 characters",
    );
}

/// Update the caller's own profile. With `If-Match` (the `ETag` from a read) the update
/// applies only if nobody changed the profile since: otherwise 412.
#[utoipa::path(patch, path = "/api/users/me", request_body = ProfileUpdate,
    params(("If-Match" = Option<String>, Header,
            description = "The `ETag` of a read (a list of them, or `*`): the update applies only \
                           if the profile is still at that version")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = User, headers(("ETag" = String, description = "The new version"))),
              (status = 400, description = "Malformed JSON, a body that cannot be read, or an \
                                            `If-Match` that is not visible ASCII"),
              (status = 404, description = "The caller has no account"),
              (status = 412, description = "The profile changed since the If-Match version"),
              (status = 422, description = "Invalid profile")))]
async fn update_me(
    S(s): S<State>,
    caller: Caller,
    headers: HeaderMap,
    Json(u): Json<ProfileUpdate>,
) -> Result<([(header::HeaderName, HeaderValue); 1], Json<User>), Problem> {
    let mut errs = Errors::new();
    let name = u.name.as_deref().map(str::trim);
    if let Some(name) = name {
        errs.check(
            !name.is_empty() && name.chars().count() <= 100,
            "name",
            "must be 1 to 100 characters",
        );
    }
    if let Some(addresses) = &u.addresses {
        errs.check(addresses.len() <= 10, "addresses", "at most 10 addresses");
        for (i, a) in addresses.iter().enumerate() {
            check_address(&mut errs, i, a);
        }
    }
    errs.into_result()?;
    let if_match = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Problem::bad_request("If-Match is not a valid entity tag list"))?
                .to_owned(),
        ),
    };
    let (current, version) = store::get_versioned(&s.db, &caller.user_id)
        .await?
        .ok_or_else(|| Problem::not_found("no such user"))?;
    if let Some(m) = &if_match
        && !if_match_holds(m, version)
    {
        return Err(Problem::precondition_failed(
            "the profile changed since it was read: read it again and reapply the change",
        ));
    }
    let name = name.unwrap_or(&current.name);
    let addresses = u.addresses.as_deref().unwrap_or(&current.addresses);
    // Also guards the window between the read above and this write. The change and its
    // event commit together.
    let mut tx = s.db.pool.begin().await?;
    if !store::update_profile(&mut tx, &caller.user_id, version, name, addresses).await? {
        return Err(Problem::precondition_failed(
            "the profile changed while it was being updated: read it again and reapply the change",
        ));
    }
    crate::stage_updated(&mut tx, &caller.user_id).await?;
    tx.commit().await?;
    s.relay.notify();
    tracing::info!(user_id = %caller.user_id, "profile updated");
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

    #[test]
    fn if_match() {
        assert!(if_match_holds("\"3\"", 3));
        assert!(if_match_holds("\"1\", \"3\"", 3));
        assert!(if_match_holds("*", 3));
        assert!(!if_match_holds("\"2\"", 3));
        assert!(!if_match_holds("W/\"3\"", 3), "If-Match compares strongly");
        assert!(!if_match_holds("3", 3));
    }
}
