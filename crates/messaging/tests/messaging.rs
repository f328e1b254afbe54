//! The messaging layer on the embedded broker, with the service database on SQLite (or on
//! PostgreSQL with SHOPMESH_TEST_DATABASE).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shopmesh_messaging::embedded::EmbeddedBroker;
use shopmesh_messaging::outbox::{self, Relay};
use shopmesh_messaging::{
    Broker, Consumer, ConsumerConfig, Envelope, Event, Handler, HandlerError, dlq,
};
use shopmesh_platform::db::{Db, DbConfig};
use sqlx::{Any, Transaction};

#[derive(Debug, Serialize, Deserialize)]
struct Credit {
    account: String,
    amount: i64,
}
impl Event for Credit {
    const TYPE: &'static str = "test.credit";
}

struct Env {
    _dir: tempfile::TempDir,
    broker: EmbeddedBroker,
    db: Db,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::open(&dir.path().join("broker.db"))
        .await
        .unwrap();
    let cfg = match std::env::var("SHOPMESH_TEST_DATABASE") {
        Ok(url) if !url.is_empty() => DbConfig::Postgres {
            url,
            schema: format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        },
        _ => DbConfig::Sqlite {
            path: dir.path().join("service.db"),
        },
    };
    let db = Db::open(&cfg, 4).await.unwrap();
    outbox::install(&db).await.unwrap();
    sqlx::query("CREATE TABLE ledger (account TEXT NOT NULL, amount BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    Env {
        _dir: dir,
        broker,
        db,
    }
}

fn credit(account: &str, amount: i64) -> Envelope {
    Envelope::new(
        "tests",
        account,
        &Credit {
            account: account.into(),
            amount,
        },
    )
    .unwrap()
}

/// A credit from its envelope; one that does not decode is a permanent failure.
fn decode_credit(env: &Envelope) -> Result<Credit, HandlerError> {
    env.decode()
        .map_err(|e| HandlerError::Permanent(e.to_string()))
}

/// Writes a credit to the ledger, in the consumer's transaction.
async fn credit_ledger(tx: &mut Transaction<'static, Any>, c: &Credit) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO ledger (account, amount) VALUES ($1, $2)")
        .bind(&c.account)
        .bind(c.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Applies credits to the ledger; fails while `failing` is set.
#[derive(Default)]
struct Ledger {
    failing: AtomicBool,
    calls: AtomicU32,
}

impl Handler for Ledger {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let c = decode_credit(env)?;
            if self.failing.load(Ordering::SeqCst) {
                return Err(HandlerError::Retryable("ledger is failing".into()));
            }
            credit_ledger(tx, &c).await
        }
        .boxed()
    }
}

async fn total(db: &Db) -> i64 {
    let rows: Vec<i64> = sqlx::query_scalar("SELECT amount FROM ledger")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    rows.into_iter().sum()
}

/// Lets the consumer work until its queue is empty (retries included), at most 10 s.
async fn drain(c: &Consumer, broker: &EmbeddedBroker) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        c.poll_once(Duration::from_millis(20)).await.unwrap();
        let backlog: u64 = broker
            .backlogs()
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum();
        if backlog == 0 {
            return;
        }
    }
    panic!("the consumer did not drain its queue");
}

#[tokio::test]
async fn published_messages_survive_a_restart_of_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.db");
    {
        let b = EmbeddedBroker::open(&path).await.unwrap();
        drop(b.subscribe("g", &["t"]).await.unwrap());
        b.publish("t", &[credit("a", 1), credit("b", 2), credit("a", 3)])
            .await
            .unwrap();
        // Leased but never acked: the subscriber "dies".
        let sub = b.subscribe("g", &["t"]).await.unwrap();
        assert_eq!(sub.next(10, Duration::ZERO).await.unwrap().len(), 2);
    }
    let b = EmbeddedBroker::open(&path).await.unwrap();
    let sub = b.subscribe("g", &["t"]).await.unwrap();
    assert_eq!(sub.backlog().await.unwrap().messages, 3);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = sub.next(10, Duration::from_millis(100)).await.unwrap();
        for d in &got {
            let env = Envelope::from_json(&d.payload).unwrap();
            seen.push(env.decode::<Credit>().unwrap().amount);
            sub.ack(std::slice::from_ref(d)).await.unwrap();
        }
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3]);
    let empty = sub.backlog().await.unwrap();
    assert_eq!(empty.messages, 0);
    assert_eq!(empty.oldest, Duration::ZERO);
}

#[tokio::test]
async fn every_group_gets_its_copy() {
    let e = env().await;
    let a = e.broker.subscribe("a", &["t"]).await.unwrap();
    let b = e.broker.subscribe("b", &["t", "u"]).await.unwrap();
    e.broker.publish("t", &[credit("x", 1)]).await.unwrap();
    e.broker.publish("u", &[credit("y", 1)]).await.unwrap();
    assert_eq!(a.next(10, Duration::ZERO).await.unwrap().len(), 1);
    assert_eq!(b.next(10, Duration::ZERO).await.unwrap().len(), 2);
}

#[tokio::test]
async fn one_key_is_delivered_in_order_even_across_retries() {
    let e = env().await;
    let sub = e.broker.subscribe("g", &["t"]).await.unwrap();
    e.broker
        .publish("t", &[credit("k1", 1), credit("k1", 2), credit("k2", 3)])
        .await
        .unwrap();
    let first = sub.next(10, Duration::ZERO).await.unwrap();
    let amounts = |ds: &[shopmesh_messaging::Delivery]| -> Vec<i64> {
        ds.iter()
            .map(|d| {
                Envelope::from_json(&d.payload)
                    .unwrap()
                    .decode::<Credit>()
                    .unwrap()
                    .amount
            })
            .collect()
    };
    // Only the head of each key: k1's second message waits for its first.
    assert_eq!(amounts(&first), vec![1, 3]);
    sub.nack(&first[0], Duration::ZERO).await.unwrap();
    sub.ack(&first[1..2]).await.unwrap();
    let again = sub.next(10, Duration::ZERO).await.unwrap();
    assert_eq!(amounts(&again), vec![1]);
    assert_eq!(again[0].attempt, 2);
    sub.ack(&again[..1]).await.unwrap();
    let last = sub.next(10, Duration::ZERO).await.unwrap();
    assert_eq!(amounts(&last), vec![2]);
}

#[tokio::test]
async fn duplicates_have_no_second_effect() {
    let e = env().await;
    let ledger = Arc::new(Ledger::default());
    let consumer = Consumer::new(
        ConsumerConfig::new("ledger", &["t"]),
        e.db.clone(),
        &e.broker,
        ledger.clone(),
    )
    .await
    .unwrap();
    let m = credit("acct", 10);
    // The same message three times (a relay that crashed before marking it sent, twice).
    e.broker
        .publish("t", &[m.clone(), m.clone()])
        .await
        .unwrap();
    e.broker
        .publish("t", std::slice::from_ref(&m))
        .await
        .unwrap();
    e.broker.publish("t", &[credit("acct", 5)]).await.unwrap();
    drain(&consumer, &e.broker).await;
    assert_eq!(total(&e.db).await, 15);
    assert_eq!(ledger.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_inbox_forgets_after_its_retention() {
    let e = env().await;
    let ledger = Arc::new(Ledger::default());
    let mut cfg = ConsumerConfig::new("ledger", &["t"]);
    cfg.inbox_retention = Duration::from_secs(3600);
    let consumer = Consumer::new(cfg.clone(), e.db.clone(), &e.broker, ledger.clone())
        .await
        .unwrap();
    e.broker.publish("t", &[credit("acct", 1)]).await.unwrap();
    drain(&consumer, &e.broker).await;
    let remembered = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM inbox")
            .fetch_one(&e.db.pool)
            .await
            .unwrap()
    };
    assert_eq!(consumer.prune_inbox().await.unwrap(), 0);
    assert_eq!(remembered().await, 1);
    cfg.inbox_retention = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let consumer = Consumer::new(cfg, e.db.clone(), &e.broker, ledger)
        .await
        .unwrap();
    assert_eq!(consumer.prune_inbox().await.unwrap(), 1);
    assert_eq!(remembered().await, 0);
}

#[tokio::test]
async fn failures_are_retried_then_dead_lettered_and_replay_works() {
    let e = env().await;
    let ledger = Arc::new(Ledger::default());
    ledger.failing.store(true, Ordering::SeqCst);
    let mut cfg = ConsumerConfig::new("ledger", &["t"]);
    cfg.max_attempts = 3;
    cfg.base_backoff = Duration::from_millis(5);
    cfg.max_backoff = Duration::from_millis(20);
    let consumer = Consumer::new(cfg, e.db.clone(), &e.broker, ledger.clone())
        .await
        .unwrap();
    e.broker.publish("t", &[credit("acct", 7)]).await.unwrap();
    drain(&consumer, &e.broker).await;
    // Each delivery calls the handler (a failing optimistic batch is run again with
    // savepoints, so a delivery may call it twice).
    assert!(ledger.calls.load(Ordering::SeqCst) >= 3);
    let dead = dlq::list(&e.db, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].reason.contains("ledger is failing"),
        "{}",
        dead[0].reason
    );
    assert_eq!(total(&e.db).await, 0);

    // Fixed: replay applies it once.
    ledger.failing.store(false, Ordering::SeqCst);
    dlq::replay(&e.db, &e.broker, &dead[0].id).await.unwrap();
    drain(&consumer, &e.broker).await;
    assert_eq!(total(&e.db).await, 7);
    assert!(dlq::list(&e.db, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letters_without_blocking_others() {
    let e = env().await;
    let ledger = Arc::new(Ledger::default());
    let consumer = Consumer::new(
        ConsumerConfig::new("ledger", &["t"]),
        e.db.clone(),
        &e.broker,
        ledger.clone(),
    )
    .await
    .unwrap();
    let mut unknown = credit("acct", 1);
    unknown.kind = "test.unknown".into();
    let mut bad_data = credit("acct", 1);
    bad_data.data = serde_json::json!({"amount": "lots"});
    e.broker
        .publish(
            "t",
            &[unknown, bad_data, credit("acct", 2), credit("other", 3)],
        )
        .await
        .unwrap();
    drain(&consumer, &e.broker).await;
    assert_eq!(total(&e.db).await, 5);
    let dead = dlq::list(&e.db, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.attempts == 1));
    assert_eq!(dlq::purge(&e.db, None).await.unwrap(), 2);
}

#[tokio::test]
async fn the_outbox_publishes_what_committed_and_nothing_else() {
    let e = env().await;
    let ledger = Arc::new(Ledger::default());
    let consumer = Consumer::new(
        ConsumerConfig::new("ledger", &["t"]),
        e.db.clone(),
        &e.broker,
        ledger.clone(),
    )
    .await
    .unwrap();
    let broker: Arc<dyn Broker> = Arc::new(e.broker.clone());
    let relay = Relay::new(e.db.clone(), broker);

    let mut tx = e.db.pool.begin().await.unwrap();
    outbox::stage(&mut tx, "t", &credit("acct", 100))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = e.db.pool.begin().await.unwrap();
    outbox::stage(&mut tx, "t", &credit("acct", 1))
        .await
        .unwrap();
    outbox::stage(&mut tx, "t", &credit("acct", 2))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(relay.pending().await.unwrap(), 2);
    assert_eq!(relay.relay_once().await.unwrap(), 2);
    assert_eq!(relay.pending().await.unwrap(), 0);
    drain(&consumer, &e.broker).await;
    assert_eq!(total(&e.db).await, 3);
}

/// Applies credits, each after a permit from `gate` (so a test can look at the consumer in
/// the middle of a batch); fails while `failing` is set.
struct Gated {
    entered: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
    failing: AtomicBool,
}

impl Handler for Gated {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            self.entered.notify_one();
            self.gate
                .acquire()
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?
                .forget();
            if self.failing.load(Ordering::SeqCst) {
                return Err(HandlerError::Retryable("the gate is failing".into()));
            }
            let c = decode_credit(env)?;
            credit_ledger(tx, &c).await
        }
        .boxed()
    }
}

fn in_flight(text: &str, consumer: &str) -> Option<f64> {
    let prefix = format!("messaging_in_flight{{consumer=\"{consumer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn consumers_and_relays_tell_what_they_hold_and_what_became_of_each_message() {
    let metrics = shopmesh_platform::telemetry::prometheus();
    let e = env().await;
    let gated = Arc::new(Gated {
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
        failing: AtomicBool::new(false),
    });
    type Seen = (String, &'static str, u32, Option<String>);
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    let observer = {
        let seen = seen.clone();
        Arc::new(move |h: &shopmesh_messaging::consumer::Handled<'_>| {
            assert_eq!(h.consumer, "held");
            seen.lock().unwrap().push((
                h.subject.unwrap_or_default().to_owned(),
                h.outcome.label(),
                h.attempt,
                h.reason.map(str::to_owned),
            ));
        })
    };
    let mut cfg = ConsumerConfig::new("held", &["t"]);
    cfg.base_backoff = Duration::from_millis(5);
    cfg.max_backoff = Duration::from_millis(10);
    let consumer = Arc::new(
        Consumer::new(cfg, e.db.clone(), &e.broker, gated.clone())
            .await
            .unwrap()
            .observe(observer),
    );

    // Staged in a transaction, published by the relay: its observer hears of each event.
    let published: Arc<std::sync::Mutex<Vec<(String, String, i64)>>> = Arc::default();
    let relay = Relay::new(e.db.clone(), Arc::new(e.broker.clone())).observe({
        let published = published.clone();
        Arc::new(move |p: &outbox::Published<'_>| {
            published.lock().unwrap().push((
                p.topic.to_owned(),
                p.envelope.subject.clone(),
                p.staged_at,
            ));
        })
    });
    let before = shopmesh_platform::now_millis();
    let mut tx = e.db.pool.begin().await.unwrap();
    for (account, amount) in [("a", 1), ("b", 2), ("c", 3)] {
        outbox::stage(&mut tx, "t", &credit(account, amount))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    {
        let published = published.lock().unwrap();
        let subjects: Vec<&str> = published.iter().map(|(_, s, _)| s.as_str()).collect();
        assert_eq!(subjects, ["a", "b", "c"]);
        assert!(published.iter().all(|(t, _, at)| t == "t" && *at >= before));
    }

    // In the middle of a batch, the consumer holds it all; after, nothing.
    let polling = {
        let c = consumer.clone();
        tokio::spawn(async move { c.poll_once(Duration::from_secs(5)).await.unwrap() })
    };
    gated.entered.notified().await;
    let held = in_flight(&metrics.render(), "held").expect("the gauge is published");
    assert!(held >= 1.0, "held {held}");
    gated.gate.add_permits(100);
    let taken = polling.await.unwrap();
    assert_eq!(held, taken as f64, "the gauge counted the batch");
    assert_eq!(in_flight(&metrics.render(), "held"), Some(0.0));
    drain(&consumer, &e.broker).await;
    {
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let expected: Vec<Seen> = ["a", "b", "c"]
            .iter()
            .map(|s| ((*s).to_owned(), "applied", 1, None))
            .collect();
        assert_eq!(seen, expected);
    }

    // A failing delivery is told as a retry, with its reason and its attempt.
    seen.lock().unwrap().clear();
    gated.failing.store(true, Ordering::SeqCst);
    e.broker.publish("t", &[credit("d", 4)]).await.unwrap();
    consumer.poll_once(Duration::from_secs(5)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (subject, outcome, attempt, reason) = &seen[0];
    assert_eq!((subject.as_str(), *outcome, *attempt), ("d", "retry", 1));
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("the gate is failing")),
        "{reason:?}"
    );
}

/// Shutdown cuts the wait for the next batch, never a batch taken: the batch being applied
/// when shutdown comes is committed and acknowledged before `run` returns (issue 20).
#[tokio::test]
async fn shutdown_settles_the_batch_in_hand() {
    let e = env().await;
    let handler = Arc::new(Gated {
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
        failing: AtomicBool::new(false),
    });
    let consumer = Consumer::new(
        ConsumerConfig::new("ledger", &["tests"]),
        e.db.clone(),
        &e.broker,
        handler.clone(),
    )
    .await
    .unwrap();
    e.broker
        .publish("tests", &[credit("a", 1), credit("b", 2), credit("c", 4)])
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    // The batch is in hand, its first message in the handler: stop now, then let it go on.
    tokio::time::timeout(Duration::from_secs(10), handler.entered.notified())
        .await
        .expect("the consumer took the batch");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    handler.gate.add_permits(100);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns after settling")
        .unwrap();
    assert_eq!(total(&e.db).await, 7, "every credit of the batch applied");
    let backlog: u64 = e
        .broker
        .backlogs()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(backlog, 0, "and acknowledged");
}
