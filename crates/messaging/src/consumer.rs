//! Idempotent consumers: inbox, retries with backoff and jitter, dead letters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use rand::Rng;
use shopmesh_platform::db::Db;
use sqlx::{Any, Transaction};
use tokio_util::sync::CancellationToken;

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
    /// Messages handled at once (different keys; one key is always sequential).
    pub concurrency: usize,
    /// Deliveries before a failing message goes to the dead letters.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with full jitter, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl ConsumerConfig {
    pub fn new(name: &str, topics: &[&str]) -> Self {
        Self {
            name: name.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            concurrency: 16,
            max_attempts: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
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
pub struct Consumer {
    cfg: ConsumerConfig,
    db: Db,
    sub: Box<dyn Subscription>,
    handler: Arc<dyn Handler>,
    after_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Retry,
    DeadLettered,
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
        Ok(Self {
            cfg,
            db,
            sub,
            handler,
            after_commit: None,
        })
    }

    /// Called after each applied message (e.g. to wake the outbox relay).
    pub fn after_commit(mut self, f: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.after_commit = Some(f);
        self
    }

    /// Handles one batch; returns how many deliveries it saw.
    pub async fn poll_once(&self, wait: Duration) -> Result<usize, BrokerError> {
        let batch = self.sub.next(self.cfg.concurrency, wait).await?;
        let n = batch.len();
        futures::stream::iter(batch)
            .for_each_concurrent(self.cfg.concurrency, |d| async move {
                let outcome = self.process(&d).await;
                metrics::counter!(
                    "messaging_consumed_total",
                    "consumer" => self.cfg.name.clone(),
                    "outcome" => format!("{outcome:?}").to_lowercase()
                )
                .increment(1);
            })
            .await;
        if let Ok(backlog) = self.sub.backlog().await {
            metrics::gauge!("messaging_backlog", "consumer" => self.cfg.name.clone())
                .set(backlog as f64);
        }
        Ok(n)
    }

    /// Runs until `shutdown`; a message being handled finishes first.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            tokio::select! {
                r = self.poll_once(Duration::from_secs(1)) => match r {
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(consumer = %self.cfg.name, error = %e, "broker error; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
                _ = shutdown.cancelled() => break,
            }
        }
    }

    async fn process(&self, d: &Delivery) -> Outcome {
        let started = Instant::now();
        let env = match Envelope::from_json(&d.payload) {
            Ok(env) => env,
            Err(e) => {
                return self
                    .dead_letter(d, None, &format!("malformed message: {e}"))
                    .await;
            }
        };
        let span = tracing::info_span!(
            "consume",
            consumer = %self.cfg.name,
            message_id = %env.id,
            kind = %env.kind,
            subject = %env.subject,
            attempt = d.attempt,
            traceparent = env.traceparent.as_deref().unwrap_or(""),
        );
        let _enter = span.enter();
        let result = self.apply(&env).await;
        drop(_enter);
        let outcome = match result {
            Ok(true) => Outcome::Applied,
            Ok(false) => Outcome::Duplicate,
            Err(HandlerError::Permanent(reason)) => {
                return self.dead_letter(d, Some(&env), &reason).await;
            }
            Err(HandlerError::Retryable(reason)) if d.attempt >= self.cfg.max_attempts => {
                return self
                    .dead_letter(
                        d,
                        Some(&env),
                        &format!("gave up after {} attempts: {reason}", d.attempt),
                    )
                    .await;
            }
            Err(HandlerError::Retryable(reason)) => {
                let delay = self.cfg.backoff(d.attempt);
                tracing::warn!(consumer = %self.cfg.name, message_id = %env.id, attempt = d.attempt,
                    retry_in_ms = delay.as_millis() as u64, reason, "handler failed; will retry");
                if let Err(e) = self.sub.nack(d, delay).await {
                    tracing::warn!(error = %e, "nack failed; the lease will expire instead");
                }
                return Outcome::Retry;
            }
        };
        if let Err(e) = self.sub.ack(d).await {
            // Applied but not acked: it will come again and the inbox will skip it.
            tracing::warn!(error = %e, "ack failed");
        }
        if outcome == Outcome::Applied
            && let Some(f) = &self.after_commit
        {
            f();
        }
        metrics::histogram!("messaging_handle_duration_seconds", "consumer" => self.cfg.name.clone())
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Inbox + effect in one transaction. `Ok(false)`: already processed.
    async fn apply(&self, env: &Envelope) -> Result<bool, HandlerError> {
        let mut tx = self.db.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO inbox (consumer, message_id, processed_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.cfg.name)
        .bind(&env.id)
        .bind(shopmesh_platform::now_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        self.handler.handle(&mut tx, env).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn dead_letter(&self, d: &Delivery, env: Option<&Envelope>, reason: &str) -> Outcome {
        tracing::error!(consumer = %self.cfg.name, topic = %d.topic, attempts = d.attempt, reason, "message dead-lettered");
        let stored = dlq::insert(
            &self.db,
            &dlq::NewDeadLetter {
                consumer: &self.cfg.name,
                topic: &d.topic,
                message_id: env.map(|e| e.id.as_str()),
                payload: &d.payload,
                reason,
                attempts: d.attempt,
            },
        )
        .await;
        match stored {
            Ok(()) => {
                if let Err(e) = self.sub.ack(d).await {
                    tracing::warn!(error = %e, "ack of a dead-lettered message failed");
                }
                metrics::counter!("messaging_dead_lettered_total", "consumer" => self.cfg.name.clone())
                    .increment(1);
                Outcome::DeadLettered
            }
            Err(e) => {
                // Never drop a message we could not park: try again later.
                tracing::error!(error = %e, "cannot store dead letter; will retry");
                let _ = self.sub.nack(d, self.cfg.max_backoff).await;
                Outcome::Retry
            }
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
