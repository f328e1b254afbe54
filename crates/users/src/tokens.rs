//! Refresh tokens: opaque random strings, stored as their SHA-256, rotated on every use.
//!
//! Every token issued from one login belongs to a family. A refresh marks the presented token
//! used and issues its successor in the same family; presenting a used token again means it
//! was copied (or the client is confused), so the whole family is revoked and the session
//! ends (RFC 9700 §4.14.2, "refresh token rotation").

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use shopmesh_platform::db::Db;
use sqlx::Row;

/// What presenting a refresh token led to.
#[derive(Debug, PartialEq)]
pub enum Refresh {
    /// Rotated: the user and the successor token.
    Rotated { user_id: String, token: String },
    /// Unknown, expired or revoked.
    Invalid,
    /// Already used: the family is now revoked.
    Reused,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn mint() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Issues the first token of a new family (a login).
pub async fn issue(db: &Db, user_id: &str, ttl_ms: i64) -> Result<String, sqlx::Error> {
    let token = mint();
    let family = uuid::Uuid::now_v7().to_string();
    insert(&db.pool, &token, &family, user_id, ttl_ms).await?;
    Ok(token)
}

async fn insert<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    exec: E,
    token: &str,
    family: &str,
    user_id: &str,
    ttl_ms: i64,
) -> Result<(), sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family, user_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(digest(token))
    .bind(family)
    .bind(user_id)
    .bind(now)
    .bind(now + ttl_ms)
    .execute(exec)
    .await?;
    Ok(())
}

/// Presents `token`: rotates it, or refuses it (revoking its family when it was reused, or
/// when its account may no longer get tokens).
pub async fn refresh(db: &Db, token: &str, ttl_ms: i64) -> Result<Refresh, sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    let id = digest(token);
    let mut tx = db.pool.begin().await?;
    // Claim first, with a write: two concurrent refreshes with one token cannot both win,
    // and the transaction holds the write lock from its first statement (on SQLite a read
    // followed by a write could not be upgraded after the other one committed).
    let claimed = sqlx::query(
        "UPDATE refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL \
         AND revoked_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(&id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let Some(row) = sqlx::query(
        "SELECT family, user_id, used_at, revoked_at FROM refresh_tokens WHERE id = $1",
    )
    .bind(&id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(Refresh::Invalid);
    };
    let family: String = row.try_get("family")?;
    let user_id: String = row.try_get("user_id")?;
    let used_at: Option<i64> = row.try_get("used_at")?;
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    if !claimed {
        // Known but not claimable: revoked or expired, or used before (a reuse).
        if revoked_at.is_some() || used_at.is_none() {
            return Ok(Refresh::Invalid);
        }
        revoke_family(&mut *tx, &family, now).await?;
        tx.commit().await?;
        tracing::warn!(user_id = %user_id, family = %family, "refresh token reused: session revoked");
        return Ok(Refresh::Reused);
    }
    // The account's status, read in this transaction: no second connection is needed (a
    // burst of refreshes cannot starve the pool), and on PostgreSQL the row is locked, so a
    // concurrent disabling waits for this refresh and its revocation then sees the successor.
    let lock = if db.backend == shopmesh_platform::db::Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let status: Option<String> =
        sqlx::query_scalar(&format!("SELECT status FROM users WHERE id = $1{lock}"))
            .bind(&user_id)
            .fetch_optional(&mut *tx)
            .await?;
    if status.as_deref() != Some("active") {
        revoke_family(&mut *tx, &family, now).await?;
        tx.commit().await?;
        return Ok(Refresh::Invalid);
    }
    let next = mint();
    insert(&mut *tx, &next, &family, &user_id, ttl_ms).await?;
    tx.commit().await?;
    Ok(Refresh::Rotated {
        user_id,
        token: next,
    })
}

async fn revoke_family<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    exec: E,
    family: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(family)
    .execute(exec)
    .await?;
    Ok(())
}

/// Logs out: revokes the family of `token` (nothing happens for an unknown token).
pub async fn revoke(db: &Db, token: &str) -> Result<(), sqlx::Error> {
    let family: Option<String> =
        sqlx::query_scalar("SELECT family FROM refresh_tokens WHERE id = $1")
            .bind(digest(token))
            .fetch_optional(&db.pool)
            .await?;
    if let Some(f) = family {
        revoke_family(&db.pool, &f, shopmesh_platform::now_millis()).await?;
    }
    Ok(())
}

/// Revokes every session of a user (an account disabled, a password changed).
pub async fn revoke_user(db: &Db, user_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(shopmesh_platform::now_millis())
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Deletes tokens expired for more than a day (housekeeping).
pub async fn purge(db: &Db) -> Result<u64, sqlx::Error> {
    let cutoff = shopmesh_platform::now_millis() - 24 * 3600 * 1000;
    Ok(
        sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1")
            .bind(cutoff)
            .execute(&db.pool)
            .await?
            .rows_affected(),
    )
}
