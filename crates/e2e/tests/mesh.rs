//! The shop with `--mesh` when an instance dies: pricing and payments each run two
//! instances behind their own inbound sidecars, orders' outbound sidecar balancing over
//! them; one of each is killed abruptly while orders come in, and the order saga loses
//! nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shopmesh_test_support::{ServiceName, TestShop};
use sqlx::Row;

const WORKERS: usize = 6;
const ORDERS_PER_WORKER: usize = 50;
/// Orders accepted before the kill.
const KILL_AFTER: usize = 100;
/// How long after the kill returned (the replica's runtime gone, its sockets closed) a
/// call may still meet what it left: a connection the outbound sidecar had kept and not yet
/// seen closed. A failure of an attempt started later is the mesh's.
const TEARDOWN: Duration = Duration::from_millis(500);

/// How an order names its means of payment, and so what orders calls on payments.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pay {
    /// A card number: orders vaults it (`POST /api/payment-methods`, not idempotent).
    Card,
    /// A vaulted method (`GET /api/payment-methods/{id}`).
    Method,
    /// A vaulted method the card network declines: a legitimate cancel.
    Declined,
}

/// One attempt to place an order: when it started and ended (from the test's start), and
/// the answer (the order's id, and whether it was a replay of an earlier attempt's order)
/// or why it failed.
struct Attempt {
    start: Duration,
    end: Duration,
    outcome: Result<(String, bool), String>,
}

/// One order as the client placed it: its key, its kind, its attempts (the same key each
/// time), and the id it was finally given.
struct Placed {
    key: String,
    pay: Pay,
    attempts: Vec<Attempt>,
    id: Option<String>,
}

/// An order as the orders database holds it: id, status, reason, idempotency key.
type OrderRow = (String, String, Option<String>, Option<String>);

/// A user with a card vaulted that authorizes and one that is declined.
async fn customer(shop: &TestShop) -> (String, String, String) {
    let (_, token) = shop.user().await;
    let mut methods = Vec::new();
    for card in ["4242424242424242", "4000000000000002"] {
        let res = shop
            .http
            .post(shop.url("/api/payment-methods"))
            .bearer_auth(&token)
            .json(&json!({ "card": card }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "vault a card");
        let m: Value = res.json().await.unwrap();
        methods.push(m["id"].as_str().unwrap().to_owned());
    }
    let declined = methods.pop().unwrap();
    (token, methods.pop().unwrap(), declined)
}

/// Places one order, sending it again with the same `Idempotency-Key` after a failure (a
/// 5xx or no answer), as a client of the API should; up to 5 attempts.
async fn place(
    shop: &TestShop,
    token: &str,
    body: &Value,
    key: &str,
    base: Instant,
) -> (Vec<Attempt>, Option<String>) {
    let mut attempts = Vec::new();
    for _ in 0..5 {
        let start = base.elapsed();
        let res = shop
            .http
            .post(shop.url("/api/orders"))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await;
        let outcome = match res {
            Ok(r) if r.status() == 202 || r.status() == 200 => {
                let replayed = r.status() == 200;
                let o: Value = r.json().await.unwrap();
                Ok((o["id"].as_str().unwrap().to_owned(), replayed))
            }
            Ok(r) if r.status().is_server_error() => Err(format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Ok(r) => panic!(
                "order {key} refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => Err(e.to_string()),
        };
        let id = outcome.as_ref().ok().map(|(id, _)| id.clone());
        attempts.push(Attempt {
            start,
            end: base.elapsed(),
            outcome,
        });
        if id.is_some() {
            return (attempts, id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (attempts, None)
}

/// The value of the gauge `name` for the series whose labels include all of `labels`.
fn gauge(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_pricing_and_payments_instances_under_load_loses_no_order() {
    let shop = Arc::new(
        TestShop::start_with(|cfg| {
            cfg.mesh = Some(cfg.broker_path.with_file_name("mesh"));
            cfg.replicas = vec![(ServiceName::Pricing, 1), (ServiceName::Payments, 1)];
        })
        .await,
    );
    // The killed instances' sidecars, as orders' outbound sidecar names them.
    let mesh = shop.system().mesh.as_ref().expect("the mesh runs");
    let second = |s: ServiceName| {
        let all: Vec<_> = mesh.inbound.iter().filter(|(t, _)| *t == s).collect();
        assert_eq!(all.len(), 2, "{s}: two instances behind the mesh");
        format!("endpoint=\"https://{}\"", all[1].1)
    };
    let killed_endpoints = [second(ServiceName::Pricing), second(ServiceName::Payments)];

    let mut customers = Vec::new();
    for _ in 0..WORKERS {
        customers.push(customer(&shop).await);
    }
    let base = Instant::now();
    let placed = Arc::new(Mutex::new(Vec::<Placed>::new()));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = customers
        .into_iter()
        .enumerate()
        .map(|(w, (token, method, declined))| {
            let (shop, placed, accepted) = (shop.clone(), placed.clone(), accepted.clone());
            tokio::spawn(async move {
                for k in 0..ORDERS_PER_WORKER {
                    let pay = match k % 10 {
                        0 | 5 => Pay::Card,
                        3 => Pay::Declined,
                        _ => Pay::Method,
                    };
                    let product = shop.product((k * 7 + w) % 60 + 1);
                    let mut body = json!({"items": [{"product_id": product, "quantity": 1}]});
                    match pay {
                        Pay::Card => body["card"] = json!("4242424242424242"),
                        Pay::Method => body["payment_method"] = json!(method),
                        Pay::Declined => body["payment_method"] = json!(declined),
                    }
                    let key = format!("w{w}-o{k}-{}", uuid::Uuid::new_v4().simple());
                    let (attempts, id) = place(&shop, &token, &body, &key, base).await;
                    if id.is_some() {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    placed.lock().unwrap().push(Placed {
                        key,
                        pay,
                        attempts,
                        id,
                    });
                }
            })
        })
        .collect();

    // Kill both replicas part-way through, then watch their breakers open.
    while accepted.load(std::sync::atomic::Ordering::Relaxed) < KILL_AFTER {
        assert!(base.elapsed() < Duration::from_secs(60), "no steady load");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kill_started = base.elapsed();
    let system = shop.system();
    let (pricing, payments) = tokio::join!(
        system.kill_replica(ServiceName::Pricing, 1),
        system.kill_replica(ServiceName::Payments, 1)
    );
    assert!(pricing && payments, "both replicas were running");
    let killed = base.elapsed();
    let mut opened: [Option<Duration>; 2] = [None, None];
    while opened.iter().any(Option::is_none) && base.elapsed() < killed + Duration::from_secs(10) {
        let metrics = shop.metrics().await;
        for (o, e) in opened.iter_mut().zip(&killed_endpoints) {
            if o.is_none() && gauge(&metrics, "gateway_breaker_state", &[e]) == Some(1.0) {
                *o = Some(base.elapsed() - kill_started);
            }
        }
        if workers.iter().all(|w| w.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let load_ended = base.elapsed();
    let placed = std::mem::take(&mut *placed.lock().unwrap());

    // Every order settles: none pending once the saga had time (a lease the dead payments
    // consumer held comes back after 30 s; the saga's deadline is 60 s).
    let orders_db = shopmesh_platform::db::Db::open(&shop.storage.storage.for_service("orders"), 1)
        .await
        .unwrap();
    let payments_db =
        shopmesh_platform::db::Db::open(&shop.storage.storage.for_service("payments"), 1)
            .await
            .unwrap();
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    let orders = loop {
        let rows = sqlx::query("SELECT id, status, status_reason, idempotency_key FROM orders")
            .fetch_all(&orders_db.pool)
            .await
            .unwrap();
        let orders: Vec<OrderRow> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let pending = orders.iter().filter(|o| o.1 == "PENDING").count();
        if pending == 0 {
            break orders;
        }
        assert!(
            Instant::now() < settle_deadline,
            "{pending} orders still pending"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settled = base.elapsed();
    // And each payment reaches its end: captured for a confirmed order, declined or voided
    // for a cancelled one.
    let payments = loop {
        let rows =
            sqlx::query("SELECT order_id, status, captured_minor, amount_minor FROM payments")
                .fetch_all(&payments_db.pool)
                .await
                .unwrap();
        let payments: Vec<(String, String, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let confirmed = orders.iter().filter(|o| o.1 == "CONFIRMED").count();
        let captured = payments.iter().filter(|p| p.1 == "CAPTURED").count();
        if captured >= confirmed {
            break payments;
        }
        assert!(
            Instant::now() < settle_deadline,
            "{captured} payments captured for {confirmed} confirmed orders"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The figures.
    let by_key: HashMap<&str, &OrderRow> = orders
        .iter()
        .filter_map(|o| Some((o.3.as_deref()?, o)))
        .collect();
    let status_of = |id: &str| orders.iter().find(|o| o.0 == id);
    let accepted: Vec<&Placed> = placed.iter().filter(|p| p.id.is_some()).collect();
    let never: Vec<&Placed> = placed.iter().filter(|p| p.id.is_none()).collect();
    let confirmed = orders.iter().filter(|o| o.1 == "CONFIRMED").count();
    let cancelled = |reason: &str| {
        orders
            .iter()
            .filter(|o| o.1 == "CANCELLED" && o.2.as_deref() == Some(reason))
            .count()
    };
    let failed: Vec<(&Placed, &Attempt)> = placed
        .iter()
        .flat_map(|p| {
            p.attempts
                .iter()
                .filter(|a| a.outcome.is_err())
                .map(move |a| (p, a))
        })
        .collect();
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for p in &payments {
        *per_order.entry(p.0.as_str()).or_default() += 1;
    }
    let charged_twice = per_order.values().filter(|n| **n > 1).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{} orders sent by {WORKERS} workers in {:.1} s; replicas killed at +{:.0} ms (kill took \
         {:.1} ms) after {KILL_AFTER} accepted; breaker of the killed pricing instance open \
         {:?} ms after the kill, of the killed payments instance {:?} ms; all settled {:.1} s \
         after the load ended",
        placed.len(),
        ms(load_ended) / 1e3,
        ms(kill_started),
        ms(killed - kill_started),
        opened[0].map(|d| ms(d).round()),
        opened[1].map(|d| ms(d).round()),
        (settled - load_ended).as_secs_f64(),
    );
    println!(
        "accepted {} ({} only on a retry with the same key), never accepted {}; in the orders \
         database {}: confirmed {confirmed}, cancelled {} (payment_declined {}, out_of_stock \
         {}, timeout {}); payments {} for {} orders, charged twice {charged_twice}",
        accepted.len(),
        accepted.iter().filter(|p| p.attempts.len() > 1).count(),
        never.len(),
        orders.len(),
        orders.iter().filter(|o| o.1 == "CANCELLED").count(),
        cancelled("payment_declined"),
        cancelled("out_of_stock"),
        cancelled("timeout"),
        payments.len(),
        per_order.len(),
    );
    // A failed attempt whose key's next answer is a replay had placed the order: the client
    // was told of a failure for an accepted order.
    let failed_but_accepted = placed
        .iter()
        .filter(|p| {
            p.attempts.len() > 1
                && p.attempts
                    .iter()
                    .any(|a| matches!(a.outcome, Ok((_, true))))
        })
        .count();
    println!(
        "attempts failed at the client: {} ({} of orders that had been accepted; the others' \
         orders were placed by the same key's next attempt, a fresh 202)",
        failed.len(),
        failed_but_accepted
    );
    for (p, a) in &failed {
        println!(
            "  {:?} order {} attempt started {:+.1} ms from the kill, ended {:+.1} ms: {:?}",
            p.pay,
            p.key,
            ms(a.start) - ms(killed),
            ms(a.end) - ms(killed),
            a.outcome
        );
    }

    // None lost: each order the client was given exists once, under its key, with the id
    // the client was given; and the database holds no order the client was not given.
    assert!(never.is_empty(), "{} orders never accepted", never.len());
    assert_eq!(failed_but_accepted, 0, "failures told of accepted orders");
    for p in &accepted {
        let o = by_key
            .get(p.key.as_str())
            .unwrap_or_else(|| panic!("order {} lost", p.key));
        assert_eq!(Some(&o.0), p.id.as_ref(), "order {}: another id", p.key);
    }
    assert_eq!(
        orders.len(),
        accepted.len(),
        "orders the client was not given"
    );
    // None stuck, each settled as it should: the declined card's orders cancelled for it
    // (or for the stock, when inventory answered first), the others confirmed unless out of
    // stock; the saga's deadline cancelled nothing.
    for p in &accepted {
        let o = status_of(p.id.as_deref().unwrap()).unwrap();
        match (p.pay, o.1.as_str(), o.2.as_deref()) {
            (Pay::Declined, "CANCELLED", Some("payment_declined")) => {}
            (Pay::Card | Pay::Method, "CONFIRMED", None) => {}
            (_, "CANCELLED", Some("out_of_stock")) => {}
            other => panic!("order {} ({:?}): {other:?}", p.key, p.pay),
        }
    }
    assert!(
        confirmed >= accepted.len() / 2,
        "only {confirmed} confirmed"
    );
    // None charged twice; each confirmed order's payment captured in full.
    assert_eq!(charged_twice, 0, "orders charged twice");
    for o in orders.iter().filter(|o| o.1 == "CONFIRMED") {
        let p: Vec<_> = payments.iter().filter(|p| p.0 == o.0).collect();
        assert!(
            p.len() == 1 && p[0].1 == "CAPTURED" && p[0].2 == p[0].3,
            "order {}: {p:?}",
            o.0
        );
    }
    // The mesh moved to the survivors: a call that is safe to repeat (prices, a vaulted
    // method) never failed, being sent to the other instance; only the vaulting of a card
    // (a POST) under way on the killed instance may have, at most one per worker, and no
    // attempt started after the dead instance's teardown.
    assert!(
        failed.iter().all(|(p, _)| p.pay == Pay::Card),
        "an order whose calls are all safe to repeat failed"
    );
    assert!(failed.len() <= WORKERS, "{} attempts failed", failed.len());
    assert!(
        failed.iter().all(|(_, a)| a.start <= killed + TEARDOWN),
        "an attempt started after the teardown failed"
    );
    // The killed instances were being called: their breakers opened (within the bound of
    // five consecutive failures, well before the load ended).
    assert!(
        opened.iter().all(Option::is_some),
        "a killed instance's breaker never opened"
    );
    match Arc::try_unwrap(shop) {
        Ok(shop) => shop.shutdown().await,
        Err(_) => panic!("the shop is still shared"),
    }
}

#[tokio::test]
async fn replicas_run_only_behind_the_mesh_and_stop_with_the_shop() {
    use shopmesh_test_support::{SystemConfig, TestStorage};
    let storage = TestStorage::new();
    let config = |mesh: bool, service: ServiceName| {
        let mut cfg = SystemConfig::new(storage.storage.clone(), storage.dir.path());
        (cfg.port, cfg.admin_port, cfg.seed_products) = (0, 0, 0);
        cfg.broker = storage.broker.clone();
        cfg.mesh = mesh.then(|| storage.dir.path().join("mesh"));
        cfg.replicas = vec![(service, 1)];
        cfg
    };
    for (mesh, service) in [(false, ServiceName::Payments), (true, ServiceName::Orders)] {
        let refused = shopmesh_shop::System::start(config(mesh, service)).await;
        assert!(refused.is_err(), "replicas of {service} with mesh {mesh}");
    }
    // With the replicas alive, an order goes through and the shop stops as usual.
    let shop = TestShop::start_with(|cfg| {
        cfg.mesh = Some(cfg.broker_path.with_file_name("mesh"));
        cfg.replicas = vec![(ServiceName::Pricing, 2), (ServiceName::Payments, 1)];
    })
    .await;
    assert_eq!(
        shop.system().mesh.as_ref().unwrap().inbound.len(),
        3 + 2 + 1,
        "an inbound sidecar per instance"
    );
    let (token, method, _) = customer(&shop).await;
    let body = json!({"items": [{"product_id": shop.product(1), "quantity": 1}], "payment_method": method});
    let (_, id) = place(&shop, &token, &body, "only", Instant::now()).await;
    assert!(id.is_some(), "the order was accepted");
    tokio::time::timeout(Duration::from_secs(20), shop.shutdown())
        .await
        .expect("the shop stops with its replicas");
}
