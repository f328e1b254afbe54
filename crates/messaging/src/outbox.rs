//! Transactional outbox.
//!
//! [`stage`] writes an event into the service's own `outbox` table inside the caller's
//! transaction, so the business write and its events commit or roll back together. The
//! [`Relay`] reads staged events in order, publishes them in batches, and deletes them only
//! after the broker has acknowledged them: a crash before the delete republishes (consumers
//! deduplicate by message id), never loses.

use std::sync::Arc;
use std::time::Duration;

use shopmesh_platform::db::Db;
use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Broker, BrokerError, Envelope};

/// Tables the messaging layer keeps in a service's database: the outbox, the consumers'
/// inbox and their dead letters. Idempotent; portable across SQLite and PostgreSQL.
const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS outbox (
        id         TEXT PRIMARY KEY,
        topic      TEXT NOT NULL,
        envelope   TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS inbox (
        consumer     TEXT NOT NULL,
        message_id   TEXT NOT NULL,
        processed_at BIGINT NOT NULL,
        PRIMARY KEY (consumer, message_id)
    )",
    "CREATE TABLE IF NOT EXISTS dead_letters (
        id         TEXT PRIMARY KEY,
        consumer   TEXT NOT NULL,
        topic      TEXT NOT NULL,
        message_id TEXT,
        payload    TEXT NOT NULL,
        reason     TEXT NOT NULL,
        attempts   BIGINT NOT NULL,
        failed_at  BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS dead_letters_by_consumer ON dead_letters (consumer, failed_at)",
];

/// Creates the messaging tables in a service's database if they are missing.
pub async fn install(db: &Db) -> Result<(), sqlx::Error> {
    for stmt in SCHEMA {
        sqlx::query(stmt).execute(&db.pool).await?;
    }
    Ok(())
}

/// Stages `envelope` for `topic` in the caller's transaction.
pub async fn stage(
    tx: &mut Transaction<'static, Any>,
    topic: &str,
    envelope: &Envelope,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (id, topic, envelope, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&envelope.id)
        .bind(topic)
        .bind(envelope.to_json())
        .bind(shopmesh_platform::now_millis())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Publishes staged events. One relay per service database.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    broker: Arc<dyn Broker>,
    wake: Arc<Notify>,
    batch: usize,
    observer: Option<Observer>,
}

/// An event the relay handed to the broker, told to its [`Observer`] (the operations
/// console keeps a journal of them per subject).
#[derive(Debug)]
pub struct Published<'a> {
    pub topic: &'a str,
    pub envelope: &'a Envelope,
    /// When it was staged (Unix milliseconds).
    pub staged_at: i64,
}

/// Told of every event the relay published, after the broker has it. Called on the relay's
/// task: it must be quick and must not block.
pub type Observer = Arc<dyn Fn(&Published<'_>) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Relay {
    pub fn new(db: Db, broker: Arc<dyn Broker>) -> Self {
        Self {
            db,
            broker,
            wake: Arc::new(Notify::new()),
            batch: 256,
            observer: None,
        }
    }

    /// Tells `observer` of each event published from now on.
    pub fn observe(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Call after committing a transaction that staged events, to publish them at once
    /// instead of at the next poll.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes one batch of staged events; returns how many went out.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let rows =
            sqlx::query("SELECT id, topic, envelope, created_at FROM outbox ORDER BY id LIMIT $1")
                .bind(self.batch as i64)
                .fetch_all(&self.db.pool)
                .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut staged: Vec<(String, String, Envelope, i64)> = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for r in &rows {
            let id: String = r.try_get(0)?;
            let topic: String = r.try_get(1)?;
            let raw: String = r.try_get(2)?;
            let created_at: i64 = r.try_get(3)?;
            match Envelope::from_json(&raw) {
                Ok(env) => staged.push((id, topic, env, created_at)),
                Err(e) => {
                    // Only this process writes the outbox, so this cannot happen short of
                    // manual edits; drop it loudly rather than wedge the relay.
                    tracing::error!(id, error = %e, "unreadable outbox row dropped");
                    malformed.push(id);
                }
            }
        }
        crate::failpoint::hit("relay.before_publish");
        // Publish runs of the same topic together, in order.
        let mut start = 0;
        while start < staged.len() {
            let topic = &staged[start].1;
            let end = staged[start..]
                .iter()
                .position(|(_, t, _, _)| t != topic)
                .map_or(staged.len(), |n| start + n);
            let batch: Vec<Envelope> = staged[start..end]
                .iter()
                .map(|(_, _, e, _)| e.clone())
                .collect();
            self.broker.publish(topic, &batch).await?;
            start = end;
        }
        crate::failpoint::hit("relay.after_publish");
        if let Some(observe) = &self.observer {
            for (_, topic, envelope, staged_at) in &staged {
                observe(&Published {
                    topic,
                    envelope,
                    staged_at: *staged_at,
                });
            }
        }
        let ids: Vec<String> = staged
            .into_iter()
            .map(|(id, _, _, _)| id)
            .chain(malformed)
            .collect();
        let placeholders = shopmesh_platform::db::placeholders(1, ids.len());
        let sql = format!("DELETE FROM outbox WHERE id IN ({placeholders})");
        let mut q = sqlx::query(&sql);
        for id in &ids {
            q = q.bind(id);
        }
        q.execute(&self.db.pool).await?;
        Ok(ids.len())
    }

    /// Runs until `shutdown`: publishes whenever woken, and polls as a safety net.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.relay_once().await {
                Ok(n) if n >= self.batch => continue,
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Events staged and not yet published.
    pub async fn pending(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&self.db.pool)
            .await
    }
}
