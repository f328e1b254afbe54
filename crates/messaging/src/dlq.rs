//! Dead letters: messages a consumer gave up on, with the reason and the attempts, kept in
//! the consumer's own database. Replay delivers the original message (same id) again to the
//! consumer that gave up on it, and only to it; having no inbox record of it, it handles it
//! again.

use serde::Serialize;
use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Broker, BrokerError, Envelope};

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub consumer: String,
    pub topic: String,
    pub message_id: Option<String>,
    pub payload: String,
    pub reason: String,
    pub attempts: i64,
    pub failed_at: String,
    /// `failed_at` in Unix milliseconds.
    #[serde(skip)]
    pub failed_at_ms: i64,
}

pub struct NewDeadLetter<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub message_id: Option<&'a str>,
    pub payload: &'a str,
    pub reason: &'a str,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no dead letter `{0}`")]
    NotFound(String),
    #[error("dead letter `{0}` is not a readable message and cannot be replayed")]
    Unreplayable(String),
}

const COLUMNS: &str = "id, consumer, topic, message_id, payload, reason, attempts, failed_at";

fn from_row(r: &AnyRow) -> Result<DeadLetter, sqlx::Error> {
    let failed_at: i64 = r.try_get("failed_at")?;
    Ok(DeadLetter {
        id: r.try_get("id")?,
        consumer: r.try_get("consumer")?,
        topic: r.try_get("topic")?,
        message_id: r.try_get("message_id")?,
        payload: r.try_get("payload")?,
        reason: r.try_get("reason")?,
        attempts: r.try_get("attempts")?,
        failed_at: shopmesh_platform::millis_to_rfc3339(failed_at),
        failed_at_ms: failed_at,
    })
}

pub async fn insert<'e, E>(ex: E, d: &NewDeadLetter<'_>) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(&format!(
        "INSERT INTO dead_letters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    ))
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(d.consumer)
    .bind(d.topic)
    .bind(d.message_id)
    .bind(d.payload)
    .bind(d.reason)
    .bind(i64::from(d.attempts))
    .bind(shopmesh_platform::now_millis())
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn list(db: &Db, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM dead_letters ORDER BY failed_at, id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// The dead letters of messages whose subject is `subject` (an order), oldest first, at
/// most `limit`. Reads the payloads (a scan of the table, which is short when all is well):
/// for an operator's look at one subject, not for a hot path.
pub async fn for_subject(
    db: &Db,
    subject: &str,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let literal = serde_json::to_string(subject).unwrap_or_default();
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE payload LIKE $1 ORDER BY failed_at, id LIMIT $2"
    ))
    .bind(format!("%\"subject\":{literal}%"))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    // LIKE narrows; the payload's own subject decides (`_` and `%` in it match more).
    Ok(rows
        .iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|d| Envelope::from_json(&d.payload).is_ok_and(|e| e.subject == subject))
        .collect())
}

pub async fn get(db: &Db, id: &str) -> Result<Option<DeadLetter>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"))
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Delivers the dead letter's message again to its consumer, then removes it.
pub async fn replay(db: &Db, broker: &dyn Broker, id: &str) -> Result<(), DlqError> {
    let d = get(db, id)
        .await?
        .ok_or_else(|| DlqError::NotFound(id.into()))?;
    let env = Envelope::from_json(&d.payload).map_err(|_| DlqError::Unreplayable(id.into()))?;
    // The consumer recorded the message as handled when it parked it; forget that, or the
    // replay would be skipped as a duplicate. (A crash from here until the dead letter is
    // removed leaves the dead letter in place: replay again.)
    sqlx::query("DELETE FROM inbox WHERE consumer = $1 AND message_id = $2")
        .bind(&d.consumer)
        .bind(&env.id)
        .execute(&db.pool)
        .await?;
    broker
        .deliver_to(&d.consumer, &d.topic, std::slice::from_ref(&env))
        .await?;
    sqlx::query("DELETE FROM dead_letters WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Removes one dead letter, or all of them with `None`. Returns how many went.
pub async fn purge(db: &Db, id: Option<&str>) -> Result<u64, sqlx::Error> {
    let r = match id {
        Some(id) => {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&db.pool)
                .await?
        }
        None => {
            sqlx::query("DELETE FROM dead_letters")
                .execute(&db.pool)
                .await?
        }
    };
    Ok(r.rows_affected())
}
