//! The broker contract: every adapter passes the same tests. The embedded broker's run with
//! `cargo test`; RabbitMQ's, NATS's and Kafka's are `#[ignore]`d and run with `-- --ignored`
//! against the servers at `SHOPMESH_TEST_RABBITMQ` (default
//! `amqp://guest:guest@127.0.0.1:5672`), `SHOPMESH_TEST_NATS` (default
//! `nats://127.0.0.1:4222`) and `SHOPMESH_TEST_KAFKA` (default `kafka://127.0.0.1:9092`, a
//! Tansu started by `.ci/kafka.sh`; its restart test needs Tansu's durable storage, which
//! `.ci/kafka.sh` uses when that binary is installed). A missing server fails them.
//!
//! Each test uses its own group and topic names, so they run side by side; the broker
//! restart test takes a lock that keeps the others of the same broker out meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::RwLock;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shopmesh_messaging::{
    Broker, Consumer, ConsumerConfig, Delivery, Envelope, Event, Handler, HandlerError,
    Subscription, dlq, outbox,
};
use shopmesh_platform::db::{Db, DbConfig};
use sqlx::{Any, Transaction};

#[derive(Debug, Serialize, Deserialize)]
struct Step {
    key: String,
    seq: u32,
}
impl Event for Step {
    const TYPE: &'static str = "test.step";
}

fn step(key: &str, seq: u32) -> Envelope {
    Envelope::new(
        "contract",
        key,
        &Step {
            key: key.into(),
            seq,
        },
    )
    .unwrap()
}

fn decode(d: &Delivery) -> (String, u32, String) {
    let env = Envelope::from_json(&d.payload).unwrap();
    let s: Step = serde_json::from_value(env.data).unwrap();
    (s.key, s.seq, env.id)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    /// Quorum queues (the default).
    RabbitMq,
    /// Classic queues (`queue_type=classic`).
    RabbitMqClassic,
    Nats,
    Kafka,
}

/// A broker under test. `connect` opens a new connection: a new "process".
struct Fixture {
    kind: Kind,
    dir: tempfile::TempDir,
}

static EMBEDDED: RwLock<()> = RwLock::const_new(());
static RABBIT: RwLock<()> = RwLock::const_new(());
static NATS: RwLock<()> = RwLock::const_new(());
static KAFKA: RwLock<()> = RwLock::const_new(());

impl Fixture {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn lock(&self) -> &'static RwLock<()> {
        match self.kind {
            Kind::Embedded => &EMBEDDED,
            Kind::RabbitMq | Kind::RabbitMqClassic => &RABBIT,
            Kind::Nats => &NATS,
            Kind::Kafka => &KAFKA,
        }
    }

    fn url(&self) -> String {
        // Few partitions: quicker to declare, and the per-key rules are exercised harder.
        match self.kind {
            Kind::Embedded => String::new(),
            Kind::RabbitMq | Kind::RabbitMqClassic => format!(
                "{}?partitions=4&namespace=contract&expires=300{}",
                std::env::var("SHOPMESH_TEST_RABBITMQ")
                    .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into()),
                if matches!(self.kind, Kind::RabbitMqClassic) {
                    // Its own namespace: a queue keeps the type it was declared with.
                    "&queue_type=classic&namespace=contract-classic"
                } else {
                    ""
                }
            ),
            Kind::Nats => format!(
                "{}?partitions=4&namespace=contract&expires=300",
                std::env::var("SHOPMESH_TEST_NATS")
                    .unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
            ),
            Kind::Kafka => format!(
                "{}?partitions=4&namespace=contract&expires=300",
                std::env::var("SHOPMESH_TEST_KAFKA")
                    .unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
            ),
        }
    }

    async fn connect(&self) -> Arc<dyn Broker> {
        let path = self.dir.path().join("broker.db");
        let url = match self.kind {
            Kind::Embedded => shopmesh_messaging::BrokerUrl::Embedded,
            _ => self.url().parse().unwrap(),
        };
        shopmesh_messaging::connect(&url, &path)
            .await
            .unwrap_or_else(|e| panic!("{:?} broker at {}: {e}", self.kind, self.url()))
    }

    /// Restarts the broker server (the embedded one: closes and reopens its file).
    fn restart(&self) {
        let sh = |cmd: &str| {
            let ok = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "`{cmd}` failed");
        };
        match self.kind {
            Kind::Embedded => {}
            Kind::RabbitMq | Kind::RabbitMqClassic => {
                sh("rabbitmqctl -q stop_app && rabbitmqctl -q start_app")
            }
            Kind::Nats => sh(
                "pkill -x nats-server; for i in $(seq 1 50); do pgrep -x nats-server >/dev/null || break; sleep 0.1; done; \
                 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
                 -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
            ),
            // Tansu, as `.ci/kafka.sh` started it (the durable one keeps everything). The
            // script of the checkout being tested (cargo sets the directory when it runs us).
            Kind::Kafka => sh(&format!(
                "{}/../../.ci/kafka.sh restart",
                std::env::var("CARGO_MANIFEST_DIR")
                    .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
            )),
        }
    }
}

fn names() -> (String, String) {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    (format!("g{id}"), format!("t{id}"))
}

/// Takes deliveries until `want` distinct message ids were seen or `within` passes.
async fn take(
    sub: &dyn Subscription,
    want: usize,
    within: Duration,
    ack: bool,
) -> Vec<(String, u32, String, u32)> {
    let mut seen = Vec::new();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + within;
    while ids.len() < want && Instant::now() < deadline {
        let ds = sub.next(64, Duration::from_millis(200)).await.unwrap();
        for d in &ds {
            let (k, s, id) = decode(d);
            ids.insert(id.clone());
            seen.push((k, s, id, d.attempt));
        }
        if ack {
            sub.ack(&ds).await.unwrap();
        }
    }
    seen
}

async fn publish_retrying(b: &dyn Broker, topic: &str, batch: &[Envelope]) {
    // What the outbox relay does: keep the events and try again until the broker takes them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match b.publish(topic, batch).await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publish never succeeded: {e}"),
        }
    }
}

async fn publish_consume_ack(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    let (g, t) = names();
    let sub = b.subscribe(&g, &[&t]).await.unwrap();
    let batch: Vec<Envelope> = (0..50)
        .map(|i| step(&format!("k{}", i % 10), i / 10))
        .collect();
    b.publish(&t, &batch).await.unwrap();
    let got = take(sub.as_ref(), 50, Duration::from_secs(20), true).await;
    let ids: HashSet<&String> = got.iter().map(|g| &g.2).collect();
    assert_eq!(ids.len(), 50, "every message arrives");
    assert!(
        got.iter().all(|g| g.3 == 1),
        "first deliveries say attempt 1"
    );
    // Acknowledged means gone, for this subscriber and for the next one of its group.
    assert!(
        sub.next(64, Duration::from_millis(800))
            .await
            .unwrap()
            .is_empty()
    );
    drop(sub);
    let again = b.subscribe(&g, &[&t]).await.unwrap();
    assert!(
        again
            .next(64, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn every_group_gets_a_copy(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    let (g, t) = names();
    let one = b.subscribe(&format!("{g}a"), &[&t]).await.unwrap();
    let two = b.subscribe(&format!("{g}b"), &[&t]).await.unwrap();
    let batch: Vec<Envelope> = (0..10).map(|i| step("k", i)).collect();
    b.publish(&t, &batch).await.unwrap();
    for sub in [&one, &two] {
        let got = take(sub.as_ref(), 10, Duration::from_secs(20), true).await;
        assert_eq!(got.len(), 10);
    }
}

async fn redelivery_after_a_consumer_crash(f: Fixture) {
    let _l = f.lock().read().await;
    let (g, t) = names();
    let b = f.connect().await;
    drop(b.subscribe(&g, &[&t]).await.unwrap());
    let batch: Vec<Envelope> = (0..6).map(|i| step(&format!("k{i}"), 0)).collect();
    b.publish(&t, &batch).await.unwrap();
    let taken: HashSet<String> = {
        // A "process" takes what it can (one per partition on the partitioned brokers) and
        // dies before acknowledging.
        let crashed = f.connect().await;
        let sub = crashed.subscribe(&g, &[&t]).await.unwrap();
        // (Kafka: a consumer group's first join takes a few seconds on Tansu.)
        let within = Duration::from_secs(if matches!(f.kind, Kind::Kafka) { 10 } else { 3 });
        let got = take(sub.as_ref(), 6, within, false).await;
        assert!(!got.is_empty());
        got.into_iter().map(|g| g.2).collect()
    };
    // Long enough for the broker to notice the closed connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b2 = f.connect().await;
    let sub = b2.subscribe(&g, &[&t]).await.unwrap();
    // NATS hands them out again once their ack wait (30 s) runs out.
    let got = take(sub.as_ref(), 6, Duration::from_secs(45), true).await;
    let ids: HashSet<&String> = got.iter().map(|g| &g.2).collect();
    assert_eq!(ids.len(), 6, "unacknowledged messages come again");
    for (_, _, id, attempt) in &got {
        if taken.contains(id) {
            assert!(*attempt >= 2, "a redelivery says so: {got:?}");
        }
    }
}

async fn one_key_in_order_across_retries(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    let (g, t) = names();
    let sub = b.subscribe(&g, &[&t]).await.unwrap();
    let keys = 12;
    let per_key = 8u32;
    for seq in 0..per_key {
        let batch: Vec<Envelope> = (0..keys).map(|k| step(&format!("k{k}"), seq)).collect();
        b.publish(&t, &batch).await.unwrap();
    }
    let mut done: HashMap<String, Vec<u32>> = HashMap::new();
    let mut n = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.values().map(Vec::len).sum::<usize>() < keys * per_key as usize {
        assert!(Instant::now() < deadline, "not all handled: {done:?}");
        let ds = sub.next(64, Duration::from_millis(200)).await.unwrap();
        let mut ok = Vec::new();
        for d in ds {
            n += 1;
            // Every third delivery fails and is retried a little later.
            if n.is_multiple_of(3) {
                sub.nack(&d, Duration::from_millis(30)).await.unwrap();
            } else {
                let (k, s, _) = decode(&d);
                done.entry(k).or_default().push(s);
                ok.push(d);
            }
        }
        sub.ack(&ok).await.unwrap();
    }
    for (k, seqs) in &done {
        assert_eq!(
            seqs,
            &(0..per_key).collect::<Vec<_>>(),
            "key {k} out of order"
        );
    }
}

/// (key, sequence, message id, instance)
type Handled = (String, u32, String, usize);

async fn competing_consumers_share_the_work(f: Fixture) {
    let _l = f.lock().read().await;
    let (g, t) = names();
    let one = f.connect().await;
    let two = f.connect().await;
    let s1: Arc<dyn Subscription> = one.subscribe(&g, &[&t]).await.unwrap().into();
    let s2: Arc<dyn Subscription> = two.subscribe(&g, &[&t]).await.unwrap().into();
    let total = 400u32;
    let keys = 40u32;
    // The order in which messages were handled, across both instances.
    let log: Arc<Mutex<Vec<Handled>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for (i, s) in [s1, s2].into_iter().enumerate() {
        let (log, stop) = (log.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                // Small batches that take a while: work waits for whichever instance is free.
                let ds = s.next(8, Duration::from_millis(100)).await.unwrap();
                for d in &ds {
                    let (k, seq, id) = decode(d);
                    log.lock().unwrap().push((k, seq, id, i));
                }
                tokio::time::sleep(Duration::from_millis(3) * ds.len() as u32).await;
                s.ack(&ds).await.unwrap();
            }
        }));
    }
    // A steady stream over a few seconds, so a consumer that joins the split gets some.
    for seq in 0..total / keys {
        let batch: Vec<Envelope> = (0..keys).map(|k| step(&format!("k{k}"), seq)).collect();
        one.publish(&t, &batch).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: HashSet<String> = log.lock().unwrap().iter().map(|l| l.2.clone()).collect();
        if ids.len() == total as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {total} handled",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let log = log.lock().unwrap();
    let by = |i| log.iter().filter(|l| l.3 == i).count();
    assert!(
        by(0) > 0 && by(1) > 0,
        "both instances worked: {} and {}",
        by(0),
        by(1)
    );
    assert_eq!(log.len(), total as usize, "nothing handled twice");
    let mut next: HashMap<&str, u32> = HashMap::new();
    for (k, seq, _, _) in log.iter() {
        let want = next.entry(k.as_str()).or_default();
        assert_eq!(seq, want, "key {k} out of order across instances");
        *want += 1;
    }
}

/// Fails every message with the subject `bad`; records every other one as a row in the
/// consumer's transaction (a counter outside it would also count the tries of a batch that
/// was rolled back and run again).
struct Picky;

impl Handler for Picky {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if envelope.subject == "bad" {
                return Err(HandlerError::Retryable("always fails".into()));
            }
            sqlx::query("INSERT INTO applied (subject) VALUES ($1)")
                .bind(&envelope.subject)
                .execute(&mut **tx)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        }
        .boxed()
    }
}

async fn service_db(dir: &std::path::Path) -> Db {
    let db = Db::open(
        &DbConfig::Sqlite {
            path: dir.join("service.db"),
        },
        2,
    )
    .await
    .unwrap();
    outbox::install(&db).await.unwrap();
    db
}

async fn dead_lettering(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    let (g, t) = names();
    let db = service_db(f.dir.path()).await;
    let mut cfg = ConsumerConfig::new(&g, &[&t]);
    cfg.max_attempts = 3;
    cfg.base_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(50);
    sqlx::query("CREATE TABLE applied (subject TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let consumer = Consumer::new(cfg, db.clone(), b.as_ref(), Arc::new(Picky))
        .await
        .unwrap();
    let mut batch = vec![step("bad", 0)];
    batch.extend((0..20).map(|i| step(&format!("k{i}"), 0)));
    b.publish(&t, &batch).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        consumer
            .poll_once(Duration::from_millis(100))
            .await
            .unwrap();
        let dead = dlq::list(&db, 10).await.unwrap();
        let (applied, distinct): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT subject) FROM applied")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(applied, distinct, "a message took effect twice");
        if !dead.is_empty() && applied == 20 {
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].attempts, 3);
            assert!(
                dead[0].reason.contains("always fails"),
                "{}",
                dead[0].reason
            );
            assert_eq!(dead[0].message_id.as_deref(), Some(batch[0].id.as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing message was not dead-lettered ({} dead letters, {applied} of 20 applied)",
            dead.len(),
        );
    }
}

async fn applied_count(db: &Db) -> (i64, i64) {
    sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT subject) FROM applied")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn duplicates_are_absorbed(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    // Every batch published twice, same message ids: what a publisher retry after a lost
    // confirmation does.
    let dup = shopmesh_messaging::broker::Duplicating(b.clone());
    let (g, t) = names();
    let db = service_db(f.dir.path()).await;
    sqlx::query("CREATE TABLE applied (subject TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let consumer = Consumer::new(
        ConsumerConfig::new(&g, &[&t]),
        db.clone(),
        &dup,
        Arc::new(Picky),
    )
    .await
    .unwrap();
    let batch: Vec<Envelope> = (0..20).map(|i| step(&format!("k{i}"), 0)).collect();
    dup.publish(&t, &batch).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    loop {
        seen += consumer
            .poll_once(Duration::from_millis(100))
            .await
            .unwrap();
        let (applied, distinct) = applied_count(&db).await;
        assert_eq!(applied, distinct, "a message took effect twice");
        if applied == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "only {applied} of 20 applied");
    }
    // The second copies (those the broker did not drop itself) come and change nothing.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        seen += consumer
            .poll_once(Duration::from_millis(100))
            .await
            .unwrap();
    }
    assert_eq!(
        applied_count(&db).await,
        (20, 20),
        "a duplicate took effect"
    );
    assert!(seen >= 20, "{seen} deliveries");
}

/// Fails the message with the subject `bad` until `fixed`; records every message it applies.
struct Flaky {
    fixed: Arc<std::sync::atomic::AtomicBool>,
}

impl Handler for Flaky {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if envelope.subject == "bad" && !self.fixed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(HandlerError::Retryable("not yet".into()));
            }
            sqlx::query("INSERT INTO applied (subject) VALUES ($1)")
                .bind(&envelope.subject)
                .execute(&mut **tx)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            Ok(())
        }
        .boxed()
    }
}

/// Polls every consumer once, at the same time.
async fn poll_all(parts: &[(Consumer, Db)]) {
    let polls = parts
        .iter()
        .map(|(c, _)| c.poll_once(Duration::from_millis(50)));
    for r in futures::future::join_all(polls).await {
        r.unwrap();
    }
}

/// A dead letter replayed reaches the consumer that gave up on it, which applies it once;
/// the other group, which applied it the first time, applies it no second time.
async fn replay_reaches_the_consumer_that_gave_up(f: Fixture) {
    let _l = f.lock().read().await;
    let b = f.connect().await;
    let (g, t) = names();
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut parts = Vec::new();
    for (name, handler) in [
        (
            format!("{g}a"),
            Arc::new(Flaky {
                fixed: fixed.clone(),
            }) as Arc<dyn Handler>,
        ),
        (
            format!("{g}b"),
            Arc::new(Flaky {
                fixed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            }) as Arc<dyn Handler>,
        ),
    ] {
        let dir = f.dir.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let db = service_db(&dir).await;
        sqlx::query("CREATE TABLE applied (subject TEXT NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
        let mut cfg = ConsumerConfig::new(&name, &[&t]);
        cfg.max_attempts = 2;
        cfg.base_backoff = Duration::from_millis(20);
        cfg.max_backoff = Duration::from_millis(50);
        let c = Consumer::new(cfg, db.clone(), b.as_ref(), handler)
            .await
            .unwrap();
        parts.push((c, db));
    }
    let mut batch = vec![step("bad", 0)];
    batch.extend((0..5).map(|i| step(&format!("k{i}"), 0)));
    b.publish(&t, &batch).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        poll_all(&parts).await;
        let dead = dlq::list(&parts[0].1, 10).await.unwrap();
        if dead.len() == 1 && applied_count(&parts[0].1).await == (5, 5) {
            break dead;
        }
        assert!(Instant::now() < deadline, "the first group never gave up");
    };
    assert_eq!(dead[0].message_id.as_deref(), Some(batch[0].id.as_str()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied_count(&parts[1].1).await != (6, 6) {
        poll_all(&parts).await;
        assert!(
            Instant::now() < deadline,
            "the second group did not apply all six"
        );
    }
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    dlq::replay(&parts[0].1, b.as_ref(), &dead[0].id)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        poll_all(&parts).await;
        if applied_count(&parts[0].1).await == (6, 6) {
            break;
        }
        assert!(Instant::now() < deadline, "the replay was not applied");
    }
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        poll_all(&parts).await;
    }
    assert_eq!(applied_count(&parts[0].1).await, (6, 6));
    assert!(dlq::list(&parts[0].1, 10).await.unwrap().is_empty());
    assert_eq!(
        applied_count(&parts[1].1).await,
        (6, 6),
        "the other group applied the replay again"
    );
}

async fn nothing_lost_across_a_broker_restart(f: Fixture) {
    let _l = f.lock().write().await;
    let b = f.connect().await;
    let (g, t) = names();
    let sub = b.subscribe(&g, &[&t]).await.unwrap();
    let first: Vec<Envelope> = (0..100)
        .map(|i| step(&format!("k{}", i % 10), i / 10))
        .collect();
    b.publish(&t, &first).await.unwrap();
    let got = take(sub.as_ref(), 30, Duration::from_secs(20), true).await;
    assert!(got.len() >= 30);
    f.restart();
    // Published while (or right after) the broker restarts: the publisher retries.
    let second: Vec<Envelope> = (10..20)
        .flat_map(|s| (0..10).map(move |k| step(&format!("k{k}"), s)))
        .collect();
    publish_retrying(b.as_ref(), &t, &second).await;
    // The same connection and subscription carry on once reconnected.
    let before: HashSet<&String> = got.iter().map(|g| &g.2).collect();
    let rest = take(
        sub.as_ref(),
        200 - before.len(),
        Duration::from_secs(90),
        true,
    )
    .await;
    let ids: HashSet<String> = got.iter().chain(&rest).map(|g| g.2.clone()).collect();
    let want: HashSet<String> = first.iter().chain(&second).map(|e| e.id.clone()).collect();
    let missing: Vec<_> = want.difference(&ids).collect();
    assert!(missing.is_empty(), "lost {} messages", missing.len());
}

macro_rules! contract {
    ($module:ident, $kind:expr, $($ignore:meta)?) => {
        mod $module {
            use super::*;
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publish_consume_ack() { super::publish_consume_ack(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_group_gets_a_copy() { super::every_group_gets_a_copy(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redelivery_after_a_consumer_crash() { super::redelivery_after_a_consumer_crash(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_key_in_order_across_retries() { super::one_key_in_order_across_retries(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn competing_consumers_share_the_work() { super::competing_consumers_share_the_work(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_lettering() { super::dead_lettering(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn duplicates_are_absorbed() { super::duplicates_are_absorbed(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replay_reaches_the_consumer_that_gave_up() { super::replay_reaches_the_consumer_that_gave_up(Fixture::new($kind)).await }
            $(#[$ignore])?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nothing_lost_across_a_broker_restart() { super::nothing_lost_across_a_broker_restart(Fixture::new($kind)).await }
        }
    };
}

contract!(embedded, Kind::Embedded,);
contract!(
    rabbitmq,
    Kind::RabbitMq,
    ignore = "needs RabbitMQ: cargo test -- --ignored"
);
contract!(
    nats,
    Kind::Nats,
    ignore = "needs NATS JetStream: cargo test -- --ignored"
);
contract!(
    kafka,
    Kind::Kafka,
    ignore = "needs Kafka (Tansu: .ci/kafka.sh): cargo test -- --ignored"
);
contract!(
    rabbitmq_classic,
    Kind::RabbitMqClassic,
    ignore = "needs RabbitMQ: cargo test -- --ignored"
);

/// Kafka only (a group rebalances when a member joins): an instance that gives partitions up
/// while it holds fetched messages the consumer has not taken yet gives them back, and the
/// group's committed offset stops at them, so the next owner handles them. (Issue 19: the
/// revocation committed past them and they were lost.)
async fn a_rebalance_gives_back_what_was_not_taken(f: Fixture) {
    let _l = f.lock().read().await;
    let (g, t) = names();
    let one = f.connect().await;
    let two = f.connect().await;
    let s1: Arc<dyn Subscription> = one.subscribe(&g, &[&t]).await.unwrap().into();
    // 8 keys, 5 messages each: some wait behind their key's earlier message.
    let total = 40usize;
    let batch: Vec<Envelope> = (0..total as u32)
        .map(|i| step(&format!("k{}", i % 8), i / 8))
        .collect();
    one.publish(&t, &batch).await.unwrap();
    // The first instance, alone in the group, fetches everything and takes a few.
    let log: Arc<Mutex<Vec<Handled>>> = Arc::default();
    let mut taken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken.len() < 3 {
        assert!(Instant::now() < deadline, "the first instance got nothing");
        taken.extend(
            s1.next(3 - taken.len(), Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    loop {
        let held = s1.backlog().await.unwrap().messages as usize;
        if held == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first instance fetched {held} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in &taken {
        let (k, seq, id) = decode(d);
        log.lock().unwrap().push((k, seq, id, 0));
    }
    // A second instance joins; the first settles what it took meanwhile (its revocation
    // waits for that) and takes nothing more until the second has been given partitions.
    let s2: Arc<dyn Subscription> = two.subscribe(&g, &[&t]).await.unwrap().into();
    let stop = tokio_util::sync::CancellationToken::new();
    let second_got = Arc::new(tokio::sync::Notify::new());
    let settle = {
        let s1 = s1.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            s1.ack(&taken).await.unwrap();
        })
    };
    let mut workers = Vec::new();
    for (i, s) in [s1, s2].into_iter().enumerate() {
        let (log, stop, second_got) = (log.clone(), stop.clone(), second_got.clone());
        workers.push(tokio::spawn(async move {
            if i == 0 {
                // At most 30 s: with a broken rebalance the second one may never get any.
                let _ = tokio::time::timeout(Duration::from_secs(30), second_got.notified()).await;
            }
            while !stop.is_cancelled() {
                let ds = s.next(8, Duration::from_millis(100)).await.unwrap();
                for d in &ds {
                    let (k, seq, id) = decode(d);
                    log.lock().unwrap().push((k, seq, id, i));
                }
                if i == 1 && !ds.is_empty() {
                    second_got.notify_one();
                }
                s.ack(&ds).await.unwrap();
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: HashSet<String> = log.lock().unwrap().iter().map(|l| l.2.clone()).collect();
        if ids.len() == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {total} handled: a revocation committed past messages it gave back",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    settle.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    // Messages given back come again (at least once); a key's messages were first handled
    // in order.
    let log = log.lock().unwrap();
    assert!(log.iter().any(|l| l.3 == 1), "the second instance worked");
    let mut first: HashSet<&str> = HashSet::new();
    let mut next: HashMap<&str, u32> = HashMap::new();
    for (k, seq, id, _) in log.iter() {
        if first.insert(id.as_str()) {
            let want = next.entry(k.as_str()).or_default();
            assert_eq!(seq, want, "key {k} out of order across instances");
            *want += 1;
        }
    }
}

mod kafka_rebalance {
    use super::*;
    #[ignore = "needs Kafka (Tansu: .ci/kafka.sh): cargo test -- --ignored"]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebalance_gives_back_what_was_not_taken() {
        super::a_rebalance_gives_back_what_was_not_taken(Fixture::new(Kind::Kafka)).await
    }
}

/// A Kafka broker at `url` (a new "process").
async fn kafka_at(url: &str) -> Arc<dyn Broker> {
    Arc::new(
        shopmesh_messaging::kafka::KafkaBroker::connect(url)
            .await
            .unwrap_or_else(|e| panic!("Kafka at {url}: {e}")),
    )
}

/// The ids of the messages waiting in `sub` (taken and acknowledged), waiting up to `wait`
/// for the first.
async fn drain_ids(sub: &dyn Subscription, wait: Duration) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut wait = wait;
    loop {
        let ds = sub.next(64, wait).await.unwrap();
        if ds.is_empty() {
            return ids;
        }
        ids.extend(
            ds.iter()
                .filter_map(|d| Envelope::from_json(&d.payload).ok())
                .map(|e| e.id),
        );
        sub.ack(&ds).await.unwrap();
        wait = Duration::ZERO;
    }
}

/// Kafka only (its delivery limit is the adapter's, set in the URL; RabbitMQ's and NATS's,
/// 100, are set on queues and consumers when they are created, too many crashes for a test):
/// a message that its consumer process never settles, dying each time it has it, is delivered
/// `delivery_limit` times, with attempts 1, 2, 3…, and then parked on the dead-letter topic
/// instead of delivered again, and not before. The topic's other messages are not held up
/// meanwhile: those of the other partitions come and are settled in the first life; those
/// behind it in its partition come once it is parked.
async fn a_crash_loop_ends_in_the_dead_letters(f: Fixture) {
    let _l = f.lock().read().await;
    const LIMIT: u32 = 3;
    let partitions = 4; // the fixture's
    let url = format!("{}&delivery_limit={LIMIT}", f.url());
    let (g, t) = names();
    let b = kafka_at(&url).await;
    b.declare(&g, &[&t]).await.unwrap();
    // The dead letters, watched throughout by a group of their own (read from the start; the
    // namespace's other parked messages are not this test's).
    let dead = b
        .subscribe(
            &format!("{g}dead"),
            &[shopmesh_messaging::kafka::DEAD_LETTER_TOPIC],
        )
        .await
        .unwrap();
    let mut batch = vec![step("poison", 0)];
    batch.extend((0..16).map(|i| step(&format!("k{i}"), 0)));
    b.publish(&t, &batch).await.unwrap();
    let poison = batch[0].id.clone();
    let of = |e: &Envelope| shopmesh_messaging::partition::of(&e.subject, partitions);
    let others: HashSet<String> = batch[1..].iter().map(|e| e.id.clone()).collect();
    // Not behind the poison message in its partition.
    let free: HashSet<String> = batch[1..]
        .iter()
        .filter(|e| of(e) != of(&batch[0]))
        .map(|e| e.id.clone())
        .collect();
    assert!(
        !free.is_empty() && free.len() < others.len(),
        "keys over the partitions"
    );
    let mut seen: HashSet<String> = HashSet::new();
    let mut parked: HashSet<String> = HashSet::new();
    for life in 1..=LIMIT {
        let process = kafka_at(&url).await;
        let sub = process.subscribe(&g, &[&t]).await.unwrap();
        // Everything but the poison message is settled; this life ends once the poison message
        // came and so did every message of the other partitions.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = None;
        while attempt.is_none() || !free.is_subset(&seen) {
            assert!(
                Instant::now() < deadline,
                "life {life}: poison message {attempt:?}, {} of {} others",
                free.intersection(&seen).count(),
                free.len()
            );
            let ds = sub.next(64, Duration::from_millis(200)).await.unwrap();
            let mut ok = Vec::new();
            for d in ds {
                let (_, _, id) = decode(&d);
                if id == poison {
                    attempt = Some(d.attempt);
                } else {
                    seen.insert(id);
                    ok.push(d);
                }
            }
            sub.ack(&ok).await.unwrap();
        }
        assert_eq!(attempt, Some(life), "life {life}: every crash counts, once");
        // The crash: the process goes with the poison message unsettled.
        drop(sub);
        drop(process);
        parked.extend(drain_ids(dead.as_ref(), Duration::from_millis(500)).await);
        assert!(
            !parked.contains(&poison),
            "parked after {life} deliveries; the limit is {LIMIT}"
        );
    }
    // The next life: it is parked instead of delivered, and what was behind it comes.
    let process = kafka_at(&url).await;
    let sub = process.subscribe(&g, &[&t]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !others.is_subset(&seen) || !parked.contains(&poison) {
        assert!(
            Instant::now() < deadline,
            "after the limit: parked {}, {} of {} others",
            parked.contains(&poison),
            others.intersection(&seen).count(),
            others.len()
        );
        let ds = sub.next(64, Duration::from_millis(200)).await.unwrap();
        for d in &ds {
            let (_, _, id) = decode(d);
            assert_ne!(
                id, poison,
                "delivered past the limit (attempt {})",
                d.attempt
            );
            seen.insert(id);
        }
        sub.ack(&ds).await.unwrap();
        parked.extend(drain_ids(dead.as_ref(), Duration::ZERO).await);
    }
    // And not delivered again later.
    for d in sub.next(64, Duration::from_secs(1)).await.unwrap() {
        assert_ne!(decode(&d).2, poison, "delivered after it was parked");
    }
}

mod kafka_delivery_limit {
    use super::*;
    #[ignore = "needs Kafka (Tansu: .ci/kafka.sh): cargo test -- --ignored"]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_loop_ends_in_the_dead_letters() {
        super::a_crash_loop_ends_in_the_dead_letters(Fixture::new(Kind::Kafka)).await
    }
}
