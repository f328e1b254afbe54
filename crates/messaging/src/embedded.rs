//! A durable, in-process broker on SQLite: no server to run, and `kill -9` loses nothing.
//!
//! Each subscription group is a queue. A publish fans a message out to the queue of every
//! group subscribed to its topic, in one transaction, fsynced (WAL, `synchronous = FULL`)
//! before `publish` returns. A subscriber leases messages for a while; an ack deletes the
//! message, a nack makes it available again after a delay, and a lease that runs out (the
//! subscriber died) makes it deliverable again. Only the oldest message of each subject in a
//! queue can be leased, so messages of one key are handled in order while different keys run
//! concurrently. Waiting subscribers are woken at once by what concerns their group in the
//! same process (a publish to one of its topics, an ack of one of its messages), and poll
//! for publishes from other processes.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;

use crate::Envelope;
use crate::broker::{Backlog, Broker, BrokerError, Delivery, Subscription};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subscriptions (
    grp   TEXT NOT NULL,
    topic TEXT NOT NULL,
    PRIMARY KEY (grp, topic)
);
CREATE TABLE IF NOT EXISTS queue (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    grp          TEXT NOT NULL,
    topic        TEXT NOT NULL,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL,
    leased_until INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_by_subject ON queue (grp, subject, seq);
DROP INDEX IF EXISTS queue_by_time;
CREATE INDEX IF NOT EXISTS queue_by_group ON queue (grp, seq);
";

/// How long a delivery stays leased to a subscriber before it is handed out again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct EmbeddedBroker {
    /// Publishes: every commit is fsynced before `publish` returns.
    pool: SqlitePool,
    /// Leases, acks and nacks: committed to the WAL without waiting for fsync. A process
    /// crash loses none of them (the WAL is in the OS's hands); a power cut may lose the last
    /// acks, which means redeliveries the inboxes absorb.
    work: SqlitePool,
    wakeups: Arc<Wakeups>,
    lease: Duration,
    poll: Duration,
}

/// Who to wake in this process: each group's waiting subscribers, and the groups of each
/// topic. Waking only the groups concerned keeps the others from running an empty lease
/// query for every publish and ack.
#[derive(Default)]
struct Wakeups {
    groups: Mutex<HashMap<String, Arc<Notify>>>,
    topics: Mutex<HashMap<String, HashSet<String>>>,
}

impl Wakeups {
    fn group(&self, group: &str) -> Arc<Notify> {
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(group.to_owned()).or_default().clone()
    }

    fn subscribe(&self, group: &str, topics: &[&str]) -> Arc<Notify> {
        let mut t = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for topic in topics {
            t.entry((*topic).to_owned())
                .or_default()
                .insert(group.to_owned());
        }
        drop(t);
        self.group(group)
    }

    fn wake_group(&self, group: &str) {
        let g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get(group) {
            n.notify_waiters();
        }
    }

    fn wake_topic(&self, topic: &str) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for g in topics.get(topic).into_iter().flatten() {
            if let Some(n) = groups.get(g) {
                n.notify_waiters();
            }
        }
    }
}

fn now_ms() -> i64 {
    shopmesh_platform::now_millis()
}

impl EmbeddedBroker {
    /// Opens (creating if needed) the broker stored in the file `path`.
    pub async fn open(path: &Path) -> Result<Self, BrokerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts.clone())
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let work = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.synchronous(SqliteSynchronous::Normal))
            .await?;
        Ok(Self {
            pool,
            work,
            wakeups: Arc::default(),
            lease: DEFAULT_LEASE,
            poll: Duration::from_millis(200),
        })
    }

    /// Messages waiting in every queue, by group.
    pub async fn backlogs(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let rows = sqlx::query("SELECT grp, COUNT(*) FROM queue GROUP BY grp ORDER BY grp")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    async fn publish_batch(&self, topic: &str, batch: &[Envelope]) -> Result<(), BrokerError> {
        let messages: Vec<&Envelope> = batch.iter().collect();
        // One statement per chunk: the whole chunk fans out to every subscribed group, in
        // message order (the ordinal column), in one fsynced commit.
        for chunk in messages.chunks(200) {
            let mut sql = String::from(
                "INSERT INTO queue (grp, topic, subject, payload, available_at) \
                 SELECT s.grp, ?1, v.column2, v.column3, ?2 FROM (VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("({i}, ?{}, ?{})", 3 + 2 * i, 4 + 2 * i));
            }
            sql.push_str(") AS v JOIN subscriptions s ON s.topic = ?1 ORDER BY v.column1, s.grp");
            let mut q = sqlx::query(&sql).bind(topic).bind(now_ms());
            for env in chunk {
                q = q.bind(&env.subject).bind(env.to_json());
            }
            q.execute(&self.pool).await?;
        }
        metrics::counter!("messaging_published_total", "topic" => topic.to_owned())
            .increment(batch.len() as u64);
        self.wakeups.wake_topic(topic);
        Ok(())
    }
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.publish_batch(topic, batch).boxed()
    }

    fn deliver_to<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let mut tx = self.pool.begin().await?;
            for env in batch {
                sqlx::query(
                    "INSERT INTO queue (grp, topic, subject, payload, available_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .bind(group)
                .bind(topic)
                .bind(&env.subject)
                .bind(env.to_json())
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            self.wakeups.wake_group(group);
            Ok(())
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        async move {
            let mut tx = self.pool.begin().await?;
            for t in topics {
                sqlx::query(
                    "INSERT INTO subscriptions (grp, topic) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )
                .bind(group)
                .bind(*t)
                .execute(&mut *tx)
                .await?;
            }
            // The embedded broker lives in one process, so whatever this group had leased
            // belonged to a previous run of it: hand it out again now rather than after the
            // lease runs out.
            sqlx::query("UPDATE queue SET leased_until = 0 WHERE grp = ?1 AND leased_until > 0")
                .bind(group)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Box::new(EmbeddedSubscription {
                notify: self.wakeups.subscribe(group, topics),
                broker: self.clone(),
                group: group.to_owned(),
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }
}

struct EmbeddedSubscription {
    broker: EmbeddedBroker,
    group: String,
    /// Woken by what concerns this group.
    notify: Arc<Notify>,
}

impl EmbeddedSubscription {
    async fn lease(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_ms();
        let until = now + self.broker.lease.as_millis() as i64;
        let rows = sqlx::query(
            "UPDATE queue SET leased_until = ?1, attempts = attempts + 1 WHERE seq IN (\
                SELECT q.seq FROM queue q \
                WHERE q.grp = ?2 AND q.available_at <= ?3 AND q.leased_until <= ?3 \
                  AND NOT EXISTS (SELECT 1 FROM queue p \
                                  WHERE p.grp = q.grp AND p.subject = q.subject AND p.seq < q.seq) \
                ORDER BY q.seq LIMIT ?4) \
             RETURNING seq, topic, payload, attempts",
        )
        .bind(until)
        .bind(&self.group)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&self.broker.work)
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(Delivery {
                    tag: r.try_get(0)?,
                    topic: r.try_get(1)?,
                    payload: r.try_get(2)?,
                    attempt: r.try_get::<i64, _>(3)? as u32,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        out.sort_by_key(|d| d.tag);
        Ok(out)
    }
}

impl Subscription for EmbeddedSubscription {
    fn next(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Register for wake-ups before looking, so a publish in between is not missed.
                let notified = self.notify.notified();
                let got = self.lease(max).await?;
                if !got.is_empty() {
                    return Ok(got);
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(Vec::new());
                }
                let nap = self.broker.poll.min(deadline - now);
                let _ = tokio::time::timeout(nap, notified).await;
            }
        }
        .boxed()
    }

    fn ack<'a>(&'a self, ds: &'a [Delivery]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            if ds.is_empty() {
                return Ok(());
            }
            let list = ds
                .iter()
                .map(|d| d.tag.to_string())
                .collect::<Vec<_>>()
                .join(",");
            sqlx::query(&format!("DELETE FROM queue WHERE seq IN ({list})"))
                .execute(&self.broker.work)
                .await?;
            // The next message of the same key may be deliverable now.
            self.notify.notify_waiters();
            Ok(())
        }
        .boxed()
    }

    fn nack<'a>(
        &'a self,
        d: &'a Delivery,
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            sqlx::query("UPDATE queue SET available_at = ?1, leased_until = 0 WHERE seq = ?2")
                .bind(now_ms() + delay.as_millis() as i64)
                .bind(d.tag)
                .execute(&self.broker.work)
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, BrokerError>> {
        async move {
            let (n, oldest): (i64, Option<i64>) =
                sqlx::query_as("SELECT COUNT(*), MIN(available_at) FROM queue WHERE grp = ?1")
                    .bind(&self.group)
                    .fetch_one(&self.broker.work)
                    .await?;
            let age = oldest.map_or(0, |t| (now_ms() - t).max(0)) as u64;
            Ok(Backlog {
                messages: n as u64,
                oldest: Duration::from_millis(age),
            })
        }
        .boxed()
    }
}
