//! The shop deployed for real: every service its own `shopmesh service NAME` process on
//! PostgreSQL and a real broker, `shopmesh gateway` in front with the configuration
//! `shopmesh gateway-config` writes. `#[ignore]`d: they need `SHOPMESH_TEST_DATABASE`
//! (postgres://…) and `SHOPMESH_TEST_BROKER` (amqp://…, nats://… or kafka://…), and fail
//! without them.
//! Each test has its own schemas, broker namespace and ports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shopmesh_test_support::free_port;

const SERVICES: [&str; 7] = [
    "catalog",
    "inventory",
    "pricing",
    "promotions",
    "users",
    "orders",
    "payments",
];

fn required(var: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty() && v != "embedded")
        .unwrap_or_else(|| panic!("{var} must name the server this test runs on"))
}

struct Cluster {
    dir: tempfile::TempDir,
    database: String,
    prefix: String,
    broker: String,
    ports: HashMap<&'static str, u16>,
    gateway_port: u16,
    procs: std::sync::Mutex<HashMap<&'static str, Child>>,
    http: reqwest::Client,
}

impl Cluster {
    fn command(&self, name: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shopmesh"));
        cmd.env("RUST_LOG", "warn")
            .env_remove("SHOPMESH_FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    fn storage_args(&self) -> Vec<String> {
        vec![
            "--database".into(),
            self.database.clone(),
            "--schema-prefix".into(),
            self.prefix.clone(),
            "--broker".into(),
            self.broker.clone(),
        ]
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[name])
    }

    fn start_service(&self, name: &'static str) {
        let mut cmd = self.command(name);
        cmd.args(["service", name, "--port", &self.ports[name].to_string()])
            .args(["--pricing-url", &self.url("pricing")])
            .args(["--payments-url", &self.url("payments")])
            .args(["--users-url", &self.url("users")])
            .args(self.storage_args());
        self.procs
            .lock()
            .unwrap()
            .insert(name, cmd.spawn().unwrap());
    }

    fn kill(&self, name: &str) {
        let child = self.procs.lock().unwrap().remove(name);
        if let Some(mut c) = child {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    async fn start() -> Cluster {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let broker = required("SHOPMESH_TEST_BROKER");
        let sep = if broker.contains('?') { '&' } else { '?' };
        let c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            database: required("SHOPMESH_TEST_DATABASE"),
            prefix: format!("p{id}_"),
            // Classic queues on RabbitMQ: a quorum queue per partition, times seven processes
            // starting at once, is more than a 2-core CI machine's RabbitMQ does quickly.
            // The contract suite covers both queue types.
            broker: format!(
                "{broker}{sep}namespace=p{id}&partitions=8&expires=120{}",
                if broker.starts_with("amqp") {
                    "&queue_type=classic"
                } else {
                    ""
                }
            ),
            ports: SERVICES.iter().map(|s| (*s, free_port())).collect(),
            gateway_port: free_port(),
            procs: Default::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        let seeded = c
            .command("seed")
            .args(["seed", "40"])
            .args(c.storage_args())
            .status()
            .unwrap();
        assert!(seeded.success(), "shopmesh seed failed");
        for s in SERVICES {
            c.start_service(s);
        }
        // The gateway last, once the identity provider it fetches keys from answers.
        for s in SERVICES {
            c.wait_healthy(&c.url(s), "/openapi.json").await;
        }
        let config = c.dir.path().join("gateway.yaml");
        let mut gc = Command::new(env!("CARGO_BIN_EXE_shopmesh"));
        gc.arg("gateway-config")
            .args(["--listen", &format!("127.0.0.1:{}", c.gateway_port)]);
        for s in SERVICES {
            gc.args(["--service", &format!("{s}=127.0.0.1:{}", c.ports[s])]);
        }
        let out = gc.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&config, &out.stdout).unwrap();
        let gw = c
            .command("gateway")
            .arg("gateway")
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap();
        c.procs.lock().unwrap().insert("gateway", gw);
        c.wait_healthy(&c.base(), "/api/products?limit=1").await;
        c
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    async fn wait_healthy(&self, base: &str, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{base}{path}")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{base} never became healthy (logs in {})",
                dump(&self.log())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn token(&self, email: &str) -> String {
        let base = self.base();
        let res = self
            .http
            .post(format!("{base}/api/users"))
            .json(&json!({"email": email, "password": "separate processes", "name": "P"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let tok: Value = self
            .http
            .post(format!("{base}/api/auth/token"))
            .json(&json!({"email": email, "password": "separate processes"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tok["access_token"].as_str().unwrap().to_owned()
    }

    /// GETs through the gateway. A 503 is retried for a while: after a service restarts,
    /// the gateway keeps it out of rotation until its ejection ends.
    async fn get(&self, path: &str, token: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let r = self
                .http
                .get(format!("{}{path}", self.base()))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            if status == 503 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(status, 200, "GET {path}: {body}");
            return serde_json::from_str(&body).unwrap();
        }
    }

    /// Products with at least `min` units in stock, and their stock.
    async fn products(&self, token: &str, n: usize, min: i64) -> Vec<(String, i64)> {
        let page = self.get("/api/products?limit=40", token).await;
        let mut out = Vec::new();
        for p in page["items"].as_array().unwrap() {
            let id = p["id"].as_str().unwrap().to_owned();
            let s = self.get(&format!("/api/inventory/{id}"), token).await;
            let available = s["available"].as_i64().unwrap();
            if available >= min {
                out.push((id, available));
            }
            if out.len() == n {
                break;
            }
        }
        assert_eq!(out.len(), n, "not enough stock seeded");
        out
    }

    async fn place(&self, token: &str, product: &str, quantity: i64, card: &str) -> Option<String> {
        let r = self
            .http
            .post(format!("{}/api/orders", self.base()))
            .bearer_auth(token)
            .json(&json!({"items": [{"product_id": product, "quantity": quantity}], "card": card}))
            .send()
            .await
            .ok()?;
        if r.status() != 202 {
            return None;
        }
        let o: Value = r.json().await.ok()?;
        o["id"].as_str().map(str::to_owned)
    }

    async fn settled(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = self.get(&format!("/api/orders/{id}"), token).await;
            if o["status"] != "PENDING" {
                return o;
            }
            assert!(Instant::now() < deadline, "order {id} still pending: {o}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, mut c) in procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn dump(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            out.push_str(&format!(
                "\n--- {}\n{}",
                e.path().display(),
                tail.join("\n")
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and RabbitMQ, NATS or Kafka: SHOPMESH_TEST_DATABASE, SHOPMESH_TEST_BROKER"]
async fn the_saga_outcomes_as_separate_processes() {
    let c = Cluster::start().await;
    let token = c.token("procs@example.test").await;
    let products = c.products(&token, 1, 10).await;
    let (p, before) = &products[0];

    let ok = c.place(&token, p, 2, "4242424242424242").await.unwrap();
    let declined = c.place(&token, p, 1, "4000000000000002").await.unwrap();
    assert!(*before < 1000, "an order takes at most 1000 units");
    let short = c
        .place(&token, p, before + 1, "4242424242424242")
        .await
        .unwrap();
    let o = c.settled(&token, &ok).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    let o = c.settled(&token, &declined).await;
    assert_eq!(o["status"], "CANCELLED", "{o}");
    assert_eq!(o["reason"], "payment_declined", "{o}");
    let o = c.settled(&token, &short).await;
    assert_eq!(o["status"], "CANCELLED", "{o}");
    assert_eq!(o["reason"], "out_of_stock", "{o}");

    // Stock moves by the confirmed order only, once the commits have gone through.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.get(&format!("/api/inventory/{p}"), &token).await;
        if s["available"].as_i64() == Some(before - 2) && s["reserved"].as_i64() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "stock: {s}, before {before}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and RabbitMQ, NATS or Kafka: SHOPMESH_TEST_DATABASE, SHOPMESH_TEST_BROKER"]
async fn a_service_killed_mid_burst_loses_nothing() {
    let c = Cluster::start().await;
    let token = c.token("burst@example.test").await;
    let products = c.products(&token, 3, 100).await;
    let mut accepted: Vec<String> = Vec::new();
    for victim in ["inventory", "payments", "orders"] {
        // A burst, and in the middle of it one service dies (SIGKILL) with work in flight
        // and comes back.
        let sends = (0..40).map(|i| {
            let (p, _) = &products[i % products.len()];
            let card = if i % 7 == 6 {
                "4000000000000002"
            } else {
                "4242424242424242"
            };
            let c = &c;
            let token = &token;
            async move {
                tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                c.place(token, p, 1 + (i % 2) as i64, card).await
            }
        });
        let crash = async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            c.kill(victim);
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.start_service(victim);
            c.wait_healthy(&c.url(victim), "/openapi.json").await;
        };
        let (ids, ()) = tokio::join!(futures::future::join_all(sends), crash);
        accepted.extend(ids.into_iter().flatten());
    }
    // Orders are refused while orders (or the card vault in payments) is down.
    assert!(
        accepted.len() >= 30,
        "only {} orders accepted",
        accepted.len()
    );

    // Every order there is (an order whose answer was lost when orders died counts too)
    // reaches a final state.
    let deadline = Instant::now() + Duration::from_secs(90);
    let orders = loop {
        let mut all = Vec::new();
        for offset in (0..).step_by(100) {
            let page = c
                .get(&format!("/api/orders?limit=100&offset={offset}"), &token)
                .await;
            let items = page["items"].as_array().unwrap().clone();
            let n = items.len();
            all.extend(items);
            if n < 100 {
                break;
            }
        }
        if all.iter().all(|o| o["status"] != "PENDING") {
            break all;
        }
        assert!(Instant::now() < deadline, "orders still pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for id in &accepted {
        assert!(
            orders.iter().any(|o| o["id"] == *id),
            "accepted order {id} lost"
        );
    }
    let confirmed: Vec<&Value> = orders
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .collect();
    assert!(!confirmed.is_empty());

    // Exact totals: every confirmed unit left the stock and nothing else did; one payment per
    // order, captured for the confirmed ones.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut exact = true;
        for (id, before) in &products {
            let sold: i64 = confirmed
                .iter()
                .flat_map(|o| o["items"].as_array().unwrap().clone())
                .filter(|l| l["product_id"] == *id)
                .map(|l| l["quantity"].as_i64().unwrap())
                .sum();
            let s = c.get(&format!("/api/inventory/{id}"), &token).await;
            if s["available"].as_i64() != Some(before - sold) || s["reserved"].as_i64() != Some(0) {
                exact = false;
            }
        }
        let mut captured = 0;
        for o in &orders {
            let id = o["id"].as_str().unwrap();
            let pays = c.get(&format!("/api/payments?order_id={id}"), &token).await;
            let pays = pays["items"].as_array().unwrap();
            assert!(pays.len() <= 1, "order {id} charged {} times", pays.len());
            captured += pays.iter().filter(|p| p["status"] == "CAPTURED").count();
        }
        if exact && captured == confirmed.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "totals do not add up (captured {captured} of {})",
            confirmed.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
