//! Crashes lose no order and double no charge: the real `shopmesh up` process is aborted
//! (as by `kill -9`) at the worst moments — events committed but not published, published
//! but not marked sent, effects committed but not acked — again and again while orders
//! come in; then it restarts cleanly and every order must reach a terminal state with stock
//! and payments adding up exactly.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shopmesh_test_support::free_port;

const FAILPOINTS: &str =
    "relay.before_publish=0.03,relay.after_publish=0.05,consumer.after_commit=0.05";

struct Shop {
    child: Child,
    base: String,
}

fn start(dir: &Path, port: u16, admin: u16, failpoints: Option<&str>) -> Shop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shopmesh"));
    cmd.args(["up", "--seed-products", "40", "--port", &port.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    match failpoints {
        Some(f) => cmd.env("SHOPMESH_FAILPOINTS", f),
        None => cmd.env_remove("SHOPMESH_FAILPOINTS"),
    };
    Shop {
        child: cmd.spawn().unwrap(),
        base: format!("http://127.0.0.1:{port}"),
    }
}

impl Shop {
    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn ready(&mut self, http: &reqwest::Client) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !self.alive() {
                return false;
            }
            if let Ok(r) = http
                .get(format!("{}/api/products?limit=1", self.base))
                .send()
                .await
                && r.status() == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("shopmesh did not become ready");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn json(http: &reqwest::Client, url: String, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_lose_no_order_and_double_no_charge() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // A clean first start: seed, register, pick products with stock.
    let mut shop = start(dir.path(), port, admin, None);
    assert!(shop.ready(&http).await);
    let base = shop.base.clone();
    let res = http
        .post(format!("{base}/api/users"))
        .json(&json!({"email": "crash@example.test", "password": "kill-nine-proof", "name": "C"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let tok: Value = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"email": "crash@example.test", "password": "kill-nine-proof"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = tok["access_token"].as_str().unwrap().to_owned();
    let page: Value = json(&http, format!("{base}/api/products?limit=40"), &token).await;
    let mut products = Vec::new();
    for p in page["items"].as_array().unwrap() {
        let id = p["id"].as_str().unwrap().to_owned();
        let s = json(&http, format!("{base}/api/inventory/{id}"), &token).await;
        if s["available"].as_i64().unwrap() >= 50 {
            products.push((id, s));
        }
        if products.len() == 4 {
            break;
        }
    }
    assert_eq!(products.len(), 4);
    shop.kill();

    // Orders under crashes: restart whenever a failpoint aborts the process.
    let mut shop = start(dir.path(), port, admin, Some(FAILPOINTS));
    let mut crashes = 0;
    let mut accepted = Vec::new();
    let mut i = 0;
    while i < 80 || crashes == 0 {
        if !shop.alive() || !shop.ready(&http).await {
            crashes += 1;
            assert!(crashes < 200, "too many crashes");
            shop = start(dir.path(), port, admin, Some(FAILPOINTS));
            continue;
        }
        let (product, _) = &products[i % products.len()];
        let card = if i % 5 == 4 {
            "4000000000000002"
        } else {
            "4242424242424242"
        };
        let quantity = if i % 11 == 10 {
            1000
        } else {
            1 + (i % 3) as i64
        };
        let sent = http
            .post(format!("{base}/api/orders"))
            .bearer_auth(&token)
            .json(&json!({"items": [{"product_id": product, "quantity": quantity}], "card": card}))
            .send()
            .await;
        if let Ok(r) = sent
            && r.status() == 202
        {
            let o: Value = r.json().await.unwrap();
            accepted.push(o["id"].as_str().unwrap().to_owned());
        }
        i += 1;
        if i > 400 {
            break;
        }
    }
    assert!(crashes > 0, "no failpoint fired");
    drop(shop);

    // A clean restart finishes everything.
    let mut shop = start(dir.path(), port, admin, None);
    assert!(shop.ready(&http).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let orders = loop {
        let list = json(&http, format!("{base}/api/orders?limit=100"), &token).await;
        let mut all = list["items"].as_array().unwrap().clone();
        let more = json(
            &http,
            format!("{base}/api/orders?limit=100&offset=100"),
            &token,
        )
        .await;
        all.extend(more["items"].as_array().unwrap().iter().cloned());
        if all.iter().all(|o| o["status"] != "PENDING") {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "orders still pending after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every accepted order is there (orders whose answer was lost in a crash may be too).
    for id in &accepted {
        assert!(
            orders.iter().any(|o| o["id"] == *id),
            "accepted order {id} lost"
        );
    }

    // Payments: exactly one per order, captured iff confirmed. Captures and stock commits
    // follow the decision asynchronously: wait for them to settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    'settle: loop {
        let mut settled = true;
        for o in &orders {
            let pays = json(
                &http,
                format!("{base}/api/payments?order_id={}", o["id"].as_str().unwrap()),
                &token,
            )
            .await;
            let pays = pays["items"].as_array().unwrap();
            assert!(
                pays.len() <= 1,
                "order {} charged {} times",
                o["id"],
                pays.len()
            );
            let want = if o["status"] == "CONFIRMED" {
                "CAPTURED"
            } else {
                "DECLINED|VOIDED"
            };
            if pays.len() != 1 || !want.split('|').any(|w| pays[0]["status"] == w) {
                settled = false;
                break;
            }
            if o["status"] == "CONFIRMED" {
                assert_eq!(pays[0]["captured_minor"], o["total_minor"]);
            }
        }
        let mut stock_ok = true;
        for (id, before) in &products {
            let after = json(&http, format!("{base}/api/inventory/{id}"), &token).await;
            let sold: i64 = orders
                .iter()
                .filter(|o| o["status"] == "CONFIRMED")
                .flat_map(|o| o["items"].as_array().unwrap().clone())
                .filter(|l| l["product_id"] == *id)
                .map(|l| l["quantity"].as_i64().unwrap())
                .sum();
            let expected_on_hand = before["on_hand"].as_i64().unwrap() - sold;
            assert!(
                after["on_hand"].as_i64().unwrap() >= expected_on_hand,
                "stock taken twice: {after}"
            );
            if after["on_hand"].as_i64().unwrap() != expected_on_hand
                || after["reserved"] != before["reserved"]
            {
                stock_ok = false;
            }
        }
        if settled && stock_ok {
            break 'settle;
        }
        assert!(
            Instant::now() < deadline,
            "payments or stock did not settle"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    assert!(confirmed > 0);
    eprintln!(
        "{} orders ({} acknowledged), {confirmed} confirmed, {crashes} crashes",
        orders.len(),
        accepted.len()
    );
}
