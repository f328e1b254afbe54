use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::User;

const COLUMNS: &str = "id, email, name, role, status, addresses, version, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<User, sqlx::Error> {
    let addresses: String = row.try_get("addresses")?;
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        status: row.try_get("status")?,
        addresses: serde_json::from_str(&addresses)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: shopmesh_platform::millis_to_rfc3339(row.try_get("created_at")?),
        updated_at: shopmesh_platform::millis_to_rfc3339(row.try_get("updated_at")?),
    })
}

pub struct NewUser<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub password_hash: &'a str,
    pub role: &'a str,
}

/// Inserts a user; a duplicate email surfaces as a unique violation.
pub async fn insert(db: &Db, u: &NewUser<'_>) -> Result<(), sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, role, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', $6, $6)",
    )
    .bind(u.id)
    .bind(u.email)
    .bind(u.name)
    .bind(u.password_hash)
    .bind(u.role)
    .bind(now)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub async fn get(db: &Db, id: &str) -> Result<Option<User>, sqlx::Error> {
    Ok(get_versioned(db, id).await?.map(|(u, _)| u))
}

/// The user and the version of their profile (what the `ETag` is made of).
pub async fn get_versioned(db: &Db, id: &str) -> Result<Option<(User, i64)>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .as_ref()
        .map(|r| Ok((from_row(r)?, r.try_get("version")?)))
        .transpose()
}

/// Whether the user exists and may get tokens.
pub async fn is_active(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?;
    Ok(status.as_deref() == Some("active"))
}

/// The user and their password hash, by (normalised) email.
pub async fn credentials(db: &Db, email: &str) -> Result<Option<(User, String)>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS}, password_hash FROM users WHERE email = $1"
    ))
    .bind(email)
    .fetch_optional(&db.pool)
    .await?;
    row.map(|r| Ok((from_row(&r)?, r.try_get("password_hash")?)))
        .transpose()
}

/// Writes a new profile if its version is still `expected` (optimistic concurrency);
/// false when another write came first.
pub async fn update_profile(
    db: &Db,
    id: &str,
    expected: i64,
    name: &str,
    addresses: &[crate::model::Address],
) -> Result<bool, sqlx::Error> {
    let addresses =
        serde_json::to_string(addresses).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let r = sqlx::query(
        "UPDATE users SET name = $1, addresses = $2, version = version + 1, updated_at = $3 \
         WHERE id = $4 AND version = $5",
    )
    .bind(name)
    .bind(addresses)
    .bind(shopmesh_platform::now_millis())
    .bind(id)
    .bind(expected)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() == 1)
}
