//! Idempotent consumers: inbox, retries with backoff and jitter, dead letters.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rand::Rng;
use shopmesh_platform::db::Db;
use sqlx::{Any, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Delivery, Subscription};
use crate::{Envelope, dlq};

/// What a handler reports when it cannot apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (a dependency is down, a lock timed out…).
    #[error("retryable: {0}")]
    Retryable(String),
    /// Will never succeed (unknown type, invalid data): straight to the dead letters.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Retryable(e.to_string())
    }
}

/// Applies one message inside the consumer's transaction. Everything it writes through `tx`
/// (its effect, events staged in the outbox) commits atomically with the inbox record.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: its subscription group and its inbox namespace.
    pub name: String,
    pub topics: Vec<String>,
    /// Messages taken per batch and applied in one transaction (different keys; one key is
    /// always sequential).
    pub concurrency: usize,
    /// Deliveries before a failing message goes to the dead letters.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with full jitter, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a small batch waits for more messages before it is applied.
    pub linger: Duration,
    /// How long processed message ids are remembered. Redeliveries come within minutes (a
    /// relay or consumer crash); the default is a week.
    pub inbox_retention: Duration,
}

impl ConsumerConfig {
    pub fn new(name: &str, topics: &[&str]) -> Self {
        Self {
            name: name.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            concurrency: 256,
            max_attempts: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            linger: Duration::from_millis(5),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// Delay before delivery number `attempt + 1`: exponential with full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let ms = exp.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
    }
}

/// A running consumer: subscription + handler + inbox + retries + dead letters.
///
/// Deliveries are taken in batches and applied in one database transaction, each message
/// inside its own savepoint: a failing message is rolled back alone, and the batch pays for
/// one commit instead of one per message. The broker hands out at most one message per
/// subject at a time, so a batch never holds two messages of one key.
pub struct Consumer {
    cfg: ConsumerConfig,
    db: Db,
    sub: Box<dyn Subscription>,
    handler: Arc<dyn Handler>,
    after_commit: Option<Arc<dyn Fn() + Send + Sync>>,
    observer: Option<Observer>,
    /// Deliveries taken from the subscription and not yet acked or handed back.
    in_flight: metrics::Gauge,
    last_backlog: std::sync::Mutex<Option<Instant>>,
}

/// What a consumer did with one delivery, told to its [`Observer`] after the batch's commit
/// (the operations console keeps a journal of them per subject).
#[derive(Debug)]
pub struct Handled<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    /// The envelope's id, type and subject (`None`: the payload was not a readable message).
    pub message_id: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub subject: Option<&'a str>,
    /// Which delivery this was, from 1.
    pub attempt: u32,
    pub outcome: Outcome,
    /// Why it was not applied (a retry, a dead letter).
    pub reason: Option<&'a str>,
}

/// Told of every delivery a consumer handled. Called on the consumer's task: it must be
/// quick and must not block.
pub type Observer = Arc<dyn Fn(&Handled<'_>) + Send + Sync>;

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Retry,
    DeadLettered,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Retry => "retry",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Why one message was not applied.
enum Failure {
    Dead {
        message_id: Option<String>,
        reason: String,
    },
    Retry(String),
}

impl Consumer {
    pub async fn new(
        cfg: ConsumerConfig,
        db: Db,
        broker: &dyn Broker,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, BrokerError> {
        crate::outbox::install(&db).await?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        let sub = broker.subscribe(&cfg.name, &topics).await?;
        let in_flight = metrics::gauge!("messaging_in_flight", "consumer" => cfg.name.clone());
        Ok(Self {
            cfg,
            db,
            sub,
            handler,
            after_commit: None,
            observer: None,
            in_flight,
            last_backlog: std::sync::Mutex::new(None),
        })
    }

    /// Called after each batch that applied something (e.g. to wake the outbox relay).
    pub fn after_commit(mut self, f: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.after_commit = Some(f);
        self
    }

    /// Tells `observer` what became of each delivery (after the batch's commit).
    pub fn observe(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Handles one batch; returns how many deliveries it saw.
    pub async fn poll_once(&self, wait: Duration) -> Result<usize, BrokerError> {
        let batch = self.fetch(wait).await?;
        Ok(self.settle(&batch).await)
    }

    /// Takes the next batch (waiting up to `wait`, lingering a moment when it is small).
    /// Cancel-safe as far as the contract goes: a batch dropped before it is returned is not
    /// acknowledged, so the broker delivers it again.
    async fn fetch(&self, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let mut batch = self.sub.next(self.cfg.concurrency, wait).await?;
        // A small batch under a steady trickle costs a commit per few messages; waiting a
        // moment gathers more into the same transaction (like Kafka's linger.ms).
        if !batch.is_empty() && batch.len() < self.cfg.concurrency / 8 && !self.cfg.linger.is_zero()
        {
            tokio::time::sleep(self.cfg.linger).await;
            let more = self
                .sub
                .next(self.cfg.concurrency - batch.len(), Duration::ZERO)
                .await?;
            batch.extend(more);
        }
        self.report_backlog().await;
        Ok(batch)
    }

    /// Applies, acknowledges or hands back a batch taken: runs to the end once started.
    async fn settle(&self, batch: &[Delivery]) -> usize {
        if batch.is_empty() {
            return 0;
        }
        self.in_flight.set(batch.len() as f64);
        let handled = self.handle_batch(batch).await;
        self.in_flight.set(0.0);
        handled
    }

    /// Applies, acks and hands back one batch; returns how many deliveries it saw.
    async fn handle_batch(&self, batch: &[Delivery]) -> usize {
        let redelivered = batch.iter().filter(|d| d.attempt > 1).count();
        if redelivered > 0 {
            metrics::counter!("messaging_redeliveries_total", "consumer" => self.cfg.name.clone())
                .increment(redelivered as u64);
        }
        let started = Instant::now();
        // Each payload is decoded once, here.
        let parsed: Vec<Result<Envelope, String>> = batch
            .iter()
            .map(|d| Envelope::from_json(&d.payload).map_err(|e| e.to_string()))
            .collect();
        // Optimistically without savepoints (two statements fewer per message); if a message
        // fails, the batch is rolled back and run again with a savepoint per message.
        let attempt = match self.apply_batch(batch, &parsed, false).await {
            Ok(None) => self.apply_batch(batch, &parsed, true).await,
            other => other,
        };
        let outcomes = match attempt {
            Ok(Some(o)) => o,
            failed => {
                // The transaction itself failed (database down, commit refused): nothing was
                // applied, everything comes again later. (With savepoints a batch always
                // completes, so `Ok(None)` cannot come here; it is handled the same anyway.)
                let error = failed.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(consumer = %self.cfg.name, error, "batch failed; will retry");
                for d in batch {
                    let _ = self.sub.nack(d, self.cfg.backoff(d.attempt)).await;
                }
                return batch.len();
            }
        };
        crate::failpoint::hit("consumer.after_commit");
        let mut done = Vec::with_capacity(batch.len());
        let mut applied = false;
        for ((d, (outcome, reason)), env) in batch.iter().zip(&outcomes).zip(&parsed) {
            if let Some(observe) = &self.observer {
                let env = env.as_ref().ok();
                observe(&Handled {
                    consumer: &self.cfg.name,
                    topic: &d.topic,
                    message_id: env.map(|e| e.id.as_str()),
                    kind: env.map(|e| e.kind.as_str()),
                    subject: env.map(|e| e.subject.as_str()),
                    attempt: d.attempt,
                    outcome: *outcome,
                    reason: reason.as_deref(),
                });
            }
            metrics::counter!(
                "messaging_consumed_total",
                "consumer" => self.cfg.name.clone(),
                "outcome" => outcome.label()
            )
            .increment(1);
            match outcome {
                Outcome::Retry => {
                    if let Err(e) = self.sub.nack(d, self.cfg.backoff(d.attempt)).await {
                        tracing::warn!(error = %e, "nack failed; the lease will expire instead");
                    }
                }
                o => {
                    applied |= *o == Outcome::Applied;
                    done.push(d.clone());
                }
            }
        }
        if let Err(e) = self.sub.ack(&done).await {
            // Applied but not acked: they will come again and the inbox will skip them.
            tracing::warn!(error = %e, "ack failed");
        }
        if applied && let Some(f) = &self.after_commit {
            f();
        }
        metrics::histogram!("messaging_batch_duration_seconds", "consumer" => self.cfg.name.clone())
            .record(started.elapsed().as_secs_f64());
        batch.len()
    }

    /// Publishes the subscription's backlog as a gauge, at most once a second.
    async fn report_backlog(&self) {
        {
            let mut last = self.last_backlog.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Ok(b) = self.sub.backlog().await {
            metrics::gauge!("messaging_backlog", "consumer" => self.cfg.name.clone())
                .set(b.messages as f64);
            metrics::gauge!("messaging_lag_seconds", "consumer" => self.cfg.name.clone())
                .set(b.oldest.as_secs_f64());
        }
    }

    /// Forgets processed message ids older than the retention; returns how many went.
    pub async fn prune_inbox(&self) -> Result<u64, sqlx::Error> {
        let cutoff = shopmesh_platform::now_millis() - self.cfg.inbox_retention.as_millis() as i64;
        let r = sqlx::query("DELETE FROM inbox WHERE consumer = $1 AND processed_at < $2")
            .bind(&self.cfg.name)
            .bind(cutoff)
            .execute(&self.db.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Runs until `shutdown`; the batch being handled finishes first. Prunes the inbox hourly.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut pruned = Instant::now();
        while !shutdown.is_cancelled() {
            if pruned.elapsed() > Duration::from_secs(3600) {
                pruned = Instant::now();
                match self.prune_inbox().await {
                    Ok(n) => tracing::debug!(consumer = %self.cfg.name, pruned = n, "inbox pruned"),
                    Err(e) => {
                        tracing::warn!(consumer = %self.cfg.name, error = %e, "inbox prune failed")
                    }
                }
            }
            // Only the wait for a batch is cut by shutdown: a batch taken is settled
            // (applied and acknowledged, or handed back) before the loop looks again.
            let fetched = tokio::select! {
                r = self.fetch(Duration::from_secs(1)) => r,
                _ = shutdown.cancelled() => break,
            };
            match fetched {
                Ok(batch) => {
                    self.settle(&batch).await;
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.cfg.name, error = %e, "broker error; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Applies a batch in one transaction. With `savepoints`, each message runs in its own
    /// savepoint and a failing one is rolled back alone; without, the first failure rolls the
    /// whole batch back and returns `None`.
    async fn apply_batch(
        &self,
        batch: &[Delivery],
        parsed: &[Result<Envelope, String>],
        savepoints: bool,
    ) -> Result<Option<Vec<(Outcome, Option<String>)>>, sqlx::Error> {
        let mut tx = self.db.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        // Optimistically, the whole batch's inbox records go in one statement.
        let mut fresh = if savepoints {
            None
        } else {
            match self.record_batch(&mut tx, parsed).await? {
                Some(fresh) => Some(fresh),
                None => {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
        };
        for (d, env) in batch.iter().zip(parsed) {
            if savepoints {
                sqlx::query("SAVEPOINT msg").execute(&mut *tx).await?;
            }
            let result = self.apply_one(&mut tx, d, env, fresh.as_mut()).await;
            let outcome = match result {
                Ok(o) => (o, None),
                Err(_) if !savepoints => {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Err(failure) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT msg")
                        .execute(&mut *tx)
                        .await?;
                    match failure {
                        Failure::Retry(reason) => {
                            tracing::warn!(consumer = %self.cfg.name, topic = %d.topic,
                                attempt = d.attempt, reason, "handler failed; will retry");
                            (Outcome::Retry, Some(reason))
                        }
                        Failure::Dead { message_id, reason } => {
                            tracing::error!(consumer = %self.cfg.name, topic = %d.topic,
                                attempts = d.attempt, reason, "message dead-lettered");
                            // Remembered as handled: a redelivery (lost ack, crash before the
                            // ack) is then a duplicate, not a second dead letter. Replay
                            // forgets it first.
                            if let Some(id) = &message_id {
                                sqlx::query(
                                    "INSERT INTO inbox (consumer, message_id, processed_at) \
                                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                                )
                                .bind(&self.cfg.name)
                                .bind(id)
                                .bind(shopmesh_platform::now_millis())
                                .execute(&mut *tx)
                                .await?;
                            }
                            dlq::insert(
                                &mut *tx,
                                &dlq::NewDeadLetter {
                                    consumer: &self.cfg.name,
                                    topic: &d.topic,
                                    message_id: message_id.as_deref(),
                                    payload: &d.payload,
                                    reason: &reason,
                                    attempts: d.attempt,
                                },
                            )
                            .await?;
                            metrics::counter!("messaging_dead_lettered_total", "consumer" => self.cfg.name.clone())
                                .increment(1);
                            (Outcome::DeadLettered, Some(reason))
                        }
                    }
                }
            };
            if savepoints {
                sqlx::query("RELEASE SAVEPOINT msg")
                    .execute(&mut *tx)
                    .await?;
            }
            outcomes.push(outcome);
        }
        tx.commit().await?;
        Ok(Some(outcomes))
    }

    /// Inbox + effect for one message, inside the batch's transaction.
    /// Inserts the inbox records of a whole batch in one statement; returns the ids that were
    /// new (the rest are duplicates), or `None` if a payload is unreadable.
    async fn record_batch(
        &self,
        tx: &mut Transaction<'static, Any>,
        parsed: &[Result<Envelope, String>],
    ) -> Result<Option<HashSet<String>>, sqlx::Error> {
        let mut ids = Vec::with_capacity(parsed.len());
        for env in parsed {
            match env {
                Ok(env) => ids.push(env.id.as_str()),
                Err(_) => return Ok(None),
            }
        }
        let mut sql =
            String::from("INSERT INTO inbox (consumer, message_id, processed_at) VALUES ");
        for i in 0..ids.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("($1, ${}, $2)", i + 3));
        }
        sql.push_str(" ON CONFLICT DO NOTHING RETURNING message_id");
        let mut q = sqlx::query_scalar::<_, String>(&sql)
            .bind(&self.cfg.name)
            .bind(shopmesh_platform::now_millis());
        for id in ids {
            q = q.bind(id);
        }
        Ok(Some(q.fetch_all(&mut **tx).await?.into_iter().collect()))
    }

    /// `fresh`: the batch's inbox records are already written and these ids were new (each is
    /// removed as it is applied).
    async fn apply_one(
        &self,
        tx: &mut Transaction<'static, Any>,
        d: &Delivery,
        env: &Result<Envelope, String>,
        fresh: Option<&mut HashSet<String>>,
    ) -> Result<Outcome, Failure> {
        let env = env.as_ref().map_err(|e| Failure::Dead {
            message_id: None,
            reason: format!("malformed message: {e}"),
        })?;
        let span = tracing::info_span!(
            "consume",
            consumer = %self.cfg.name,
            message_id = %env.id,
            kind = %env.kind,
            subject = %env.subject,
            attempt = d.attempt,
            traceparent = env.traceparent.as_deref().unwrap_or(""),
        );
        shopmesh_platform::otel::link_parent(&span, env.traceparent.as_deref());
        let retry = |e: sqlx::Error| Failure::Retry(e.to_string());
        if let Some(fresh) = fresh {
            // Taken out once applied: a second copy in the same batch is a duplicate too.
            if !fresh.remove(&env.id) {
                return Ok(Outcome::Duplicate);
            }
            return self.run_handler(tx, d, env, span).await;
        }
        let inserted = sqlx::query(
            "INSERT INTO inbox (consumer, message_id, processed_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.cfg.name)
        .bind(&env.id)
        .bind(shopmesh_platform::now_millis())
        .execute(&mut **tx)
        .instrument(span.clone())
        .await
        .map_err(retry)?
        .rows_affected();
        if inserted == 0 {
            return Ok(Outcome::Duplicate);
        }
        self.run_handler(tx, d, env, span).await
    }

    async fn run_handler(
        &self,
        tx: &mut Transaction<'static, Any>,
        d: &Delivery,
        env: &Envelope,
        span: tracing::Span,
    ) -> Result<Outcome, Failure> {
        match self.handler.handle(tx, env).instrument(span).await {
            Ok(()) => Ok(Outcome::Applied),
            Err(HandlerError::Permanent(reason)) => Err(Failure::Dead {
                message_id: Some(env.id.clone()),
                reason,
            }),
            Err(HandlerError::Retryable(reason)) if d.attempt >= self.cfg.max_attempts => {
                Err(Failure::Dead {
                    message_id: Some(env.id.clone()),
                    reason: format!("gave up after {} attempts: {reason}", d.attempt),
                })
            }
            Err(HandlerError::Retryable(reason)) => Err(Failure::Retry(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let cfg = ConsumerConfig::new("c", &["t"]);
        for attempt in 1..30 {
            let d = cfg.backoff(attempt);
            let cap = cfg
                .base_backoff
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(cfg.max_backoff);
            assert!(
                d <= cap && d >= cap / 2,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
    }
}
