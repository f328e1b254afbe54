use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub status: String,
    pub addresses: Vec<Address>,
    pub created_at: String,
    pub updated_at: String,
}

/// A postal address of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// What the user calls it ("home", "work").
    #[serde(default)]
    pub label: Option<String>,
    /// Who receives the parcel.
    pub recipient: String,
    pub line1: String,
    #[serde(default)]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub email: String,
    pub password: String,
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
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    /// Exchanged at `POST /api/auth/refresh` for a new pair; single use.
    pub refresh_token: String,
    pub refresh_expires_in: u64,
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
    pub name: Option<String>,
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
    pub role: Option<String>,
    /// `active` or `disabled`. A disabled account cannot sign in or refresh, and the gateway
    /// refuses its access tokens within its revocation poll interval.
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
pub struct AdminListQuery {
    /// Text searched in email and name (case-insensitive).
    pub q: Option<String>,
    /// `customer` or `admin`.
    pub role: Option<String>,
    /// `active` or `disabled`.
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    pub offset: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<User>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
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
