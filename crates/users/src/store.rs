use shopmesh_platform::db::Db;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

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
    tx: &mut Transaction<'static, Any>,
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
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The version and status of an account, read in `tx` (after a change, for its event).
pub async fn version_in(
    tx: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<Option<(i64, String)>, sqlx::Error> {
    sqlx::query_as("SELECT version, status FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Filters of the admin listing.
pub struct Filter<'a> {
    /// Text searched in email and name (case-insensitive).
    pub q: Option<&'a str>,
    pub role: Option<&'a str>,
    pub status: Option<&'a str>,
}

/// A page of users, by email, and the total matching.
pub async fn list(
    db: &Db,
    filter: &Filter<'_>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<User>, i64), sqlx::Error> {
    let mut clauses = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    if let Some(q) = filter.q {
        binds.push(shopmesh_platform::db::like_contains(&q.to_lowercase()));
        let n = binds.len();
        clauses.push(format!(
            "(email LIKE ${n} ESCAPE '\\' OR LOWER(name) LIKE ${n} ESCAPE '\\')"
        ));
    }
    for (column, value) in [("role", filter.role), ("status", filter.status)] {
        if let Some(v) = value {
            binds.push(v.to_owned());
            clauses.push(format!("{column} = ${}", binds.len()));
        }
    }
    let (rows, total) = shopmesh_platform::db::filtered_page(
        db,
        COLUMNS,
        "users",
        &clauses,
        binds,
        "email",
        (limit, offset),
    )
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    Ok((items, total))
}

/// Sets a user's role and/or status; false when there is no such user.
pub async fn administer(
    tx: &mut Transaction<'static, Any>,
    id: &str,
    role: Option<&str>,
    status: Option<&str>,
) -> Result<bool, sqlx::Error> {
    // Disabling or changing the role cuts the account's access tokens issued until now.
    let cut = status == Some("disabled") || role.is_some();
    let now = shopmesh_platform::now_millis();
    let r = sqlx::query(
        "UPDATE users SET role = COALESCE($1, role), status = COALESCE($2, status), \
         version = version + 1, updated_at = $3, \
         tokens_not_before = CASE WHEN $4 THEN $5 ELSE tokens_not_before END WHERE id = $6",
    )
    .bind(role)
    .bind(status)
    .bind(now)
    .bind(cut)
    .bind(now / 1000)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Makes these (normalised) emails admins, if they have accounts.
pub async fn promote(db: &Db, emails: &[String]) -> Result<u64, sqlx::Error> {
    let mut n = 0;
    for e in emails {
        n += sqlx::query(
            "UPDATE users SET role = 'admin', version = version + 1, updated_at = $1 \
             WHERE email = $2 AND role <> 'admin'",
        )
        .bind(shopmesh_platform::now_millis())
        .bind(e)
        .execute(&db.pool)
        .await?
        .rows_affected();
    }
    Ok(n)
}

/// What the gateway must refuse, as (account, refuse tokens issued at or before this Unix
/// second): every token of a disabled account, and the tokens from before a role change or
/// a re-enabling for as long as they can live (`recent_secs`).
pub async fn revocations(db: &Db, recent_secs: i64) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let cutoff = shopmesh_platform::now_millis() / 1000 - recent_secs;
    let rows = sqlx::query(
        "SELECT id, status, tokens_not_before FROM users \
         WHERE status = 'disabled' OR tokens_not_before > $1",
    )
    .bind(cutoff)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let status: String = r.try_get("status")?;
            let since = if status == "disabled" {
                // Any token, whenever issued (a sign-in racing the disabling included).
                i64::MAX / 2
            } else {
                r.try_get("tokens_not_before")?
            };
            Ok((r.try_get("id")?, since))
        })
        .collect()
}
