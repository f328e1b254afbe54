//! Test helpers shared by the test suites.
//!
//! The backend comes from `SHOPMESH_TEST_DATABASE`: unset → SQLite in a temporary directory;
//! a `postgres://` URL → that database, with a fresh schema prefix per test so tests never
//! see each other's data. When PostgreSQL is asked for and cannot be reached, the test fails:
//! it never falls back to SQLite.
//!
//! The broker comes from `SHOPMESH_TEST_BROKER`: unset → the embedded broker in the test's
//! directory; an `amqp://`, `nats://` or `kafka://` URL → that broker, under a namespace of
//! the test's own (its queues and consumers expire once unused; Kafka topics stay until the
//! broker is reset), so tests never see each other's messages. An unreachable broker fails
//! the test.
//!
//! `SHOPMESH_TEST_MESH=1`: every call between services goes through mesh sidecars over
//! mutual TLS (`shopmesh up --mesh`), the CA and certificates in the test's directory.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use shopmesh_platform::db::Storage;
use shopmesh_shop::System;
use tempfile::TempDir;

pub use shopmesh_shop::seed::product_id;
pub use shopmesh_shop::{BrokerUrl, ServiceName, SystemConfig, UsersVia};

/// Products every test shop is seeded with.
pub const TEST_PRODUCTS: usize = 60;

/// Where a test keeps its data; kept alive as long as the shop.
pub struct TestStorage {
    pub storage: Storage,
    /// SQLite files (if SQLite) and the embedded broker's file.
    pub dir: TempDir,
    /// The broker, with the test's namespace: the same across restarts.
    pub broker: shopmesh_shop::BrokerUrl,
}

/// A port on 127.0.0.1 free now and never handed out before in this process. Ports are
/// chosen before their process binds them, so the kernel may offer one again meanwhile (an
/// HA test's service once got as its admin port another service's port, chosen earlier and
/// bound since, and that service's `/readyz` answered for it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether `SHOPMESH_TEST_MESH` asks for the mesh (`1` or `true`).
pub fn test_mesh() -> bool {
    matches!(
        std::env::var("SHOPMESH_TEST_MESH").as_deref(),
        Ok("1") | Ok("true")
    )
}

/// The broker `SHOPMESH_TEST_BROKER` names, under a fresh namespace.
pub fn test_broker() -> shopmesh_shop::BrokerUrl {
    match std::env::var("SHOPMESH_TEST_BROKER") {
        Ok(url) if !url.is_empty() && url != "embedded" => {
            let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let sep = if url.contains('?') { '&' } else { '?' };
            // Light, short-lived topology: classic queues (RabbitMQ), gone a minute after
            // the test stops using them.
            // Kafka (Tansu): a consumer group's join is answered after half the session
            // timeout, so a short one lets a fresh shop's consumers start within a second.
            let extra = if url.starts_with("amqp") {
                "&queue_type=classic"
            } else if url.starts_with("kafka") {
                "&session.timeout.ms=2000&heartbeat.interval.ms=500"
            } else {
                ""
            };
            format!("{url}{sep}namespace={ns}&partitions=4&expires=60{extra}")
                .parse()
                .expect("SHOPMESH_TEST_BROKER must be embedded, amqp://…, nats://… or kafka://…")
        }
        _ => shopmesh_shop::BrokerUrl::Embedded,
    }
}

impl TestStorage {
    pub fn new() -> Self {
        match std::env::var("SHOPMESH_TEST_DATABASE") {
            Ok(url) if !url.is_empty() => {
                let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                assert!(
                    url.starts_with("postgres"),
                    "SHOPMESH_TEST_DATABASE must be a postgres:// URL"
                );
                TestStorage {
                    storage: Storage::Postgres {
                        url,
                        schema_prefix: prefix,
                    },
                    dir: tempfile::tempdir().expect("temporary directory"),
                    broker: test_broker(),
                }
            }
            _ => {
                let dir = tempfile::tempdir().expect("temporary directory");
                TestStorage {
                    storage: Storage::Sqlite {
                        data_dir: PathBuf::from(dir.path()),
                    },
                    dir,
                    broker: test_broker(),
                }
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.storage, Storage::Postgres { .. })
    }
}

impl Default for TestStorage {
    fn default() -> Self {
        Self::new()
    }
}

/// The whole shop on ephemeral loopback ports.
pub struct TestShop {
    pub system: Option<System>,
    pub storage: TestStorage,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
}

impl TestShop {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a shop after letting the test adjust the configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut SystemConfig)) -> Self {
        Self::start_on(TestStorage::new(), adjust).await
    }

    pub async fn start_on(storage: TestStorage, adjust: impl FnOnce(&mut SystemConfig)) -> Self {
        let mut cfg = SystemConfig::new(storage.storage.clone(), storage.dir.path());
        cfg.port = 0;
        cfg.admin_port = 0;
        cfg.seed_products = TEST_PRODUCTS;
        cfg.drain = Duration::from_secs(5);
        cfg.broker = storage.broker.clone();
        if test_mesh() {
            cfg.mesh = Some(storage.dir.path().join("mesh"));
        }
        adjust(&mut cfg);
        let system = System::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("the test shop did not start: {e}"));
        let base = format!("http://{}", system.gateway);
        let admin = format!("http://{}", system.admin);
        TestShop {
            system: Some(system),
            storage,
            base,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
        }
    }

    /// Stops the shop and starts it again on the same storage.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// Stops the shop and starts it again on the same data with another configuration.
    pub async fn restart_with(mut self, adjust: impl FnOnce(&mut SystemConfig)) -> Self {
        if let Some(s) = self.system.take() {
            s.shutdown().await;
        }
        let storage = std::mem::take(&mut self.storage);
        Self::start_on(storage, adjust).await
    }

    /// Registers `email` and restarts the shop with it as a bootstrap administrator
    /// (`--admin-email`), with `adjust` applied: returns the shop and the admin's token.
    pub async fn with_admin(
        self,
        email: &str,
        adjust: impl Fn(&mut SystemConfig),
    ) -> (Self, String) {
        let res = self
            .http
            .post(self.url("/api/users"))
            .json(&json!({"email": email, "password": "correct horse battery", "name": "Admin"}))
            .send()
            .await
            .expect("register");
        assert_eq!(res.status(), 201, "register the admin");
        let owned = email.to_owned();
        let shop = self
            .restart_with(move |cfg| {
                adjust(cfg);
                cfg.admin_emails = vec![owned];
            })
            .await;
        let token = shop.login(email, "correct horse battery").await;
        (shop, token)
    }

    pub fn system(&self) -> &System {
        self.system.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path` through the gateway, with a bearer token if given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("GET through the gateway")
    }

    /// `GET path` through the gateway, its body as JSON.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> Value {
        self.get(path, token)
            .await
            .json()
            .await
            .expect("a JSON body")
    }

    /// The admin port's Prometheus text (every service's metrics and the sidecars').
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("the admin port answers /metrics")
            .text()
            .await
            .expect("a text body")
    }

    /// Base URL of one service, bypassing the gateway.
    pub fn service_url(&self, name: ServiceName, path: &str) -> String {
        format!("http://{}{path}", self.system().service_addr(name))
    }

    /// The id of the `n`-th seeded product (1-based).
    pub fn product(&self, n: usize) -> String {
        product_id(&format!("SKU-{n:06}"))
    }

    /// Registers a new user and logs in: (user id, access token).
    pub async fn user(&self) -> (String, String) {
        let email = format!("{}@example.test", uuid::Uuid::new_v4().simple());
        let res = self
            .http
            .post(self.url("/api/users"))
            .json(&json!({"email": email, "password": "correct horse battery", "name": "Test"}))
            .send()
            .await
            .expect("register");
        assert_eq!(res.status(), 201, "register");
        let user: Value = res.json().await.expect("user json");
        let token = self.login(&email, "correct horse battery").await;
        (user["id"].as_str().expect("id").to_owned(), token)
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let res = self
            .http
            .post(self.url("/api/auth/token"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login");
        assert_eq!(res.status(), 200, "login");
        let body: Value = res.json().await.expect("token json");
        body["access_token"].as_str().expect("token").to_owned()
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.system.take() {
            s.shutdown().await;
        }
    }
}

/// Asserts a problem+json answer with `status`, returning the problem document.
pub async fn expect_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type");
    let body: Value = res.json().await.expect("problem json");
    assert_eq!(body["status"], status, "status member");
    assert!(body["title"].is_string(), "title member");
    body
}
