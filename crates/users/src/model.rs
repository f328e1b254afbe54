use serde::{Deserialize, Serialize};
use shopmesh_platform::openapi::{one_of, one_of_or_null};
use utoipa::ToSchema;
use utoipa::openapi::schema::Object;

/// The roles of an account.
pub const ROLES: [&str; 2] = ["customer", "admin"];
/// The statuses of an account.
pub const STATUSES: [&str; 2] = ["active", "disabled"];

fn role_schema() -> Object {
    one_of(&ROLES)
}

fn status_schema() -> Object {
    one_of(&STATUSES)
}

fn role_or_null() -> Object {
    one_of_or_null(&ROLES)
}

fn status_or_null() -> Object {
    one_of_or_null(&STATUSES)
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    pub id: String,
    #[schema(max_length = 254)]
    pub email: String,
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    #[schema(schema_with = role_schema)]
    pub role: String,
    #[schema(schema_with = status_schema)]
    pub status: String,
    #[schema(max_items = 10)]
    pub addresses: Vec<Address>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A postal address of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// What the user calls it ("home", "work"), at most 50 characters.
    #[serde(default)]
    #[schema(max_length = 50)]
    pub label: Option<String>,
    /// Who receives the parcel: 1 to 100 characters, not blank.
    #[schema(min_length = 1, max_length = 100)]
    pub recipient: String,
    /// 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200)]
    pub line1: String,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub line2: Option<String>,
    /// 1 to 100 characters, not blank.
    #[schema(min_length = 1, max_length = 100)]
    pub city: String,
    /// 1 to 20 characters, not blank.
    #[schema(min_length = 1, max_length = 20)]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, upper case.
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// An email address (`local@domain.tld`), at most 254 characters once trimmed.
    #[schema(min_length = 1, max_length = 254)]
    pub email: String,
    /// 8 to 128 characters; not a common password, one repeated character, or the email.
    #[schema(min_length = 8, max_length = 128)]
    pub password: String,
    /// 1 to 100 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenResponse {
    /// A JWT signed with EdDSA (Ed25519), verified at the gateway.
    pub access_token: String,
    #[schema(schema_with = bearer_schema)]
    pub token_type: &'static str,
    /// Seconds.
    pub expires_in: u64,
    /// Exchanged at `POST /api/auth/refresh` for a new pair; single use.
    pub refresh_token: String,
    /// Seconds.
    pub refresh_expires_in: u64,
}

fn bearer_schema() -> Object {
    one_of(&["Bearer"])
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// A profile change: absent fields stay as they are; `addresses` replaces the list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    /// 1 to 100 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 100)]
    pub name: Option<String>,
    /// At most 10.
    #[schema(max_items = 10)]
    pub addresses: Option<Vec<Address>>,
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub roles: Vec<String>,
}

/// An administrator's change to an account.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminUpdate {
    /// `customer` or `admin`.
    #[schema(schema_with = role_or_null)]
    pub role: Option<String>,
    /// `active` or `disabled`. A disabled account cannot sign in or refresh, and the gateway
    /// refuses its access tokens within its revocation poll interval.
    #[schema(schema_with = status_or_null)]
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminListQuery {
    /// Text searched in email and name (case-insensitive), at most 200 bytes.
    #[param(max_length = 200)]
    pub q: Option<String>,
    /// `customer` or `admin`.
    #[param(schema_with = role_schema)]
    pub role: Option<String>,
    /// `active` or `disabled`.
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<i64>,
    /// Items to skip, 0 to 1000000 (default 0).
    #[param(minimum = 0, maximum = 1_000_000, default = 0)]
    pub offset: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<User>,
    #[schema(minimum = 0)]
    pub total: i64,
    #[schema(minimum = 1, maximum = 100)]
    pub limit: i64,
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub offset: i64,
}

/// A signing key rotation: the new key is published now and signs from `signs_from`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyRotation {
    /// The new key's id (its `kid` in the JWKS).
    pub kid: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub signs_from: String,
}

/// Accounts whose tokens the gateway must refuse.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Revocations {
    pub revoked: Vec<Revoked>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Revoked {
    /// The account (a token's `sub`).
    pub sub: String,
    /// Since when (Unix seconds).
    pub since: i64,
}
