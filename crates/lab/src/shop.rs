//! The shops the experiments run against: `shopmesh up`'s system ([`shopmesh_shop::System`])
//! on ephemeral loopback ports, over SQLite in a temporary directory or a fresh set of
//! PostgreSQL schemas, on the embedded broker or a real one under a namespace of its own;
//! plus extra gateways built from the shop's own gateway configuration with some upstreams
//! replaced (a delaying relay in front of one service, an extra route).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use shopmesh_gateway::{Gateway, GatewayConfig};
use shopmesh_platform::db::{Db, Storage};
use shopmesh_shop::{ServiceName, System, SystemConfig, UsersVia};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::LabError;

/// What kind of shop an experiment needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShopSpec {
    /// How the orders service reads accounts (the shared data pattern's two ways).
    pub users_via: UsersVia,
    /// Every message delivered twice.
    pub duplicate_deliveries: bool,
}

impl ShopSpec {
    /// The shop as `shopmesh up` runs it.
    pub const MAIN: ShopSpec = ShopSpec {
        users_via: UsersVia::Interface,
        duplicate_deliveries: false,
    };
    /// Orders read accounts from the user center's published view.
    pub const SHARED_VIEW: ShopSpec = ShopSpec {
        users_via: UsersVia::Database,
        duplicate_deliveries: false,
    };
    /// The broker delivers every message twice.
    pub const DUPLICATES: ShopSpec = ShopSpec {
        users_via: UsersVia::Interface,
        duplicate_deliveries: true,
    };
}

/// Where the shops keep their data.
#[derive(Debug, Clone, Default)]
pub struct Backend {
    /// A `postgres://` URL; SQLite in a temporary directory when absent.
    pub database: Option<String>,
    /// A broker URL (`amqp://`, `nats://`, `kafka://`); the embedded broker when absent.
    pub broker: Option<String>,
}

impl Backend {
    pub fn storage_name(&self) -> &'static str {
        if self.database.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    }

    pub fn broker_name(&self) -> String {
        match &self.broker {
            None => "embedded".into(),
            Some(url) => url.split("://").next().unwrap_or("broker").to_owned(),
        }
    }

    /// The broker under a fresh namespace (its queues expire once unused).
    fn broker_url(&self, ns: &str) -> Result<shopmesh_messaging::BrokerUrl, LabError> {
        match self.broker_arg(ns) {
            None => Ok(shopmesh_messaging::BrokerUrl::Embedded),
            Some(url) => url
                .parse()
                .map_err(|e| LabError::Usage(format!("--broker: {e}"))),
        }
    }

    /// The URL of a real broker under the namespace `ns`; `None` for the embedded broker.
    pub fn broker_arg(&self, ns: &str) -> Option<String> {
        match &self.broker {
            None => None,
            Some(url) if url == "embedded" => None,
            Some(url) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                // Kafka: a short session lets a fresh shop's consumer groups form quickly.
                let extra = if url.starts_with("kafka") {
                    "&session.timeout.ms=2000&heartbeat.interval.ms=500"
                } else {
                    ""
                };
                Some(format!("{url}{sep}namespace={ns}&expires=120{extra}"))
            }
        }
    }

    /// Where a shop under the namespace `ns` keeps its data: fresh PostgreSQL schemas, or
    /// SQLite files in `data_dir`.
    pub fn storage(&self, ns: &str, data_dir: &std::path::Path) -> Storage {
        match &self.database {
            Some(url) => Storage::Postgres {
                url: url.clone(),
                schema_prefix: format!("{ns}_"),
            },
            None => Storage::Sqlite {
                data_dir: data_dir.to_owned(),
            },
        }
    }
}

/// A fresh namespace for a shop's schemas and queues.
pub fn namespace() -> String {
    format!("lab{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Drops a shop's PostgreSQL schemas (nothing for SQLite: its directory goes with it).
pub async fn drop_schemas(storage: &Storage) {
    if let Storage::Postgres { schema_prefix, .. } = storage
        && let Ok(db) = Db::open(&storage.for_service("users"), 1).await
    {
        for name in ServiceName::ALL {
            let drop = format!("DROP SCHEMA IF EXISTS \"{schema_prefix}{name}\" CASCADE");
            let _ = sqlx::query(&drop).execute(&db.pool).await;
        }
    }
}

/// A seeded product, as the lab knows it from the deterministic catalog.
#[derive(Debug, Clone)]
pub struct Product {
    pub id: String,
    pub category: String,
    pub on_hand: i64,
}

/// The first `n` products of the deterministic catalog a shop seeds.
pub fn seeded(n: usize) -> Vec<Product> {
    shopmesh_shop::seed::products(n)
        .into_iter()
        .map(|p| Product {
            id: p.product.id,
            category: p.product.category,
            on_hand: p.on_hand,
        })
        .collect()
}

/// A running shop.
pub struct LabShop {
    pub system: System,
    pub cfg: SystemConfig,
    /// The gateway's base URL.
    pub base: String,
    pub http: reqwest::Client,
    pub products: Vec<Product>,
    storage: Storage,
    _dir: TempDir,
}

/// Sign-in attempts the lab's shops allow per minute: the lab is many callers on one address.
const LAB_LOGIN_LIMITS: (u32, u32) = (1_000, 100_000);

/// The password of every account the lab registers.
pub const PASSWORD: &str = "correct horse battery staple";

/// A reqwest client for loopback measurements: no proxy from the environment, bounded time.
pub fn client() -> Result<reqwest::Client, LabError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

impl LabShop {
    pub async fn start(
        spec: ShopSpec,
        backend: &Backend,
        products: usize,
    ) -> Result<LabShop, LabError> {
        let dir = tempfile::tempdir()?;
        let ns = namespace();
        let storage = backend.storage(&ns, dir.path());
        let mut cfg = SystemConfig::new(storage.clone(), dir.path());
        cfg.port = 0;
        cfg.admin_port = 0;
        cfg.seed_products = products;
        cfg.drain = Duration::from_secs(2);
        cfg.broker = backend.broker_url(&ns)?;
        cfg.users_via = spec.users_via;
        cfg.duplicate_deliveries = spec.duplicate_deliveries;
        cfg.login_limits = LAB_LOGIN_LIMITS;
        let system = System::start(cfg.clone()).await?;
        let base = format!("http://{}", system.gateway);
        let products = seeded(products);
        Ok(LabShop {
            system,
            cfg,
            base,
            http: client()?,
            products,
            storage,
            _dir: dir,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn service(&self, name: ServiceName) -> SocketAddr {
        self.system.service_addr(name)
    }

    /// Registers an account and signs in: (user id, access token).
    pub async fn user(&self) -> Result<(String, String), LabError> {
        let (email, id) = self.register().await?;
        let token = self
            .sign_in(&email)
            .await?
            .ok_or_else(|| LabError::Shop("sign-in refused".into()))?;
        Ok((id, token))
    }

    /// Registers an account: (email, user id).
    pub async fn register(&self) -> Result<(String, String), LabError> {
        register_at(&self.http, &self.base).await
    }

    /// A sign-in's access token, `None` when refused.
    pub async fn sign_in(&self, email: &str) -> Result<Option<String>, LabError> {
        sign_in_at(&self.http, &self.base, email).await
    }

    /// A connection pool of its own to a service's database (for audits: totals, states).
    pub async fn db(&self, name: ServiceName) -> Result<Db, LabError> {
        Ok(Db::open(&self.storage.for_service(name.as_str()), 2).await?)
    }

    /// A read-only pool of `connections` on the user center's published view, as another
    /// service reading the shared database opens it.
    pub async fn users_view(&self, connections: u32) -> Result<Db, LabError> {
        Ok(Db::open_read_only(
            &self.storage.for_service(ServiceName::Users.as_str()),
            connections,
            shopmesh_shop::DIRECTORY_READER,
        )
        .await?)
    }

    /// Another gateway in front of this shop's services, from the shop's own gateway
    /// configuration with `adjust` applied (upstreams replaced, routes added).
    pub async fn gateway_with(
        &self,
        adjust: impl FnOnce(&mut GatewayConfig),
    ) -> Result<ExtraGateway, LabError> {
        let mut g = shopmesh_shop::gateway_config(&self.cfg, |n| self.service(n));
        adjust(&mut g);
        ExtraGateway::start(g).await
    }

    /// Stops the shop; its PostgreSQL schemas are dropped, its temporary directory removed.
    pub async fn stop(self) {
        self.system.shutdown().await;
        drop_schemas(&self.storage).await;
    }
}

/// Registers an account through the gateway at `base`: (email, user id).
pub async fn register_at(http: &reqwest::Client, base: &str) -> Result<(String, String), LabError> {
    let email = format!("{}@lab.example", uuid::Uuid::new_v4().simple());
    let res = http
        .post(format!("{base}/api/users"))
        .json(&json!({"email": email, "password": PASSWORD, "name": "Lab"}))
        .send()
        .await?;
    if res.status() != 201 {
        return Err(LabError::Shop(format!(
            "registration answered {}",
            res.status()
        )));
    }
    let user: Value = res.json().await?;
    let id = user["id"]
        .as_str()
        .ok_or_else(|| LabError::Shop("registration without an id".into()))?;
    Ok((email, id.to_owned()))
}

/// A sign-in's access token through the gateway at `base`, `None` when refused.
pub async fn sign_in_at(
    http: &reqwest::Client,
    base: &str,
    email: &str,
) -> Result<Option<String>, LabError> {
    let res = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await?;
    if res.status() != 200 {
        return Ok(None);
    }
    let token: Value = res.json().await?;
    Ok(token["access_token"].as_str().map(str::to_owned))
}

/// Points a cluster of `g` at `to` instead (e.g. a relay).
pub fn redirect(g: &mut GatewayConfig, cluster: &str, to: SocketAddr) {
    for c in g.clusters.iter_mut().filter(|c| c.name == cluster) {
        c.endpoints = vec![format!("http://{to}")];
    }
}

/// A gateway the lab started; stops when [`ExtraGateway::stop`] is called or it is dropped.
pub struct ExtraGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ExtraGateway {
    pub async fn start(mut cfg: GatewayConfig) -> Result<ExtraGateway, LabError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        cfg.listen = addr;
        cfg.admin.listen = None;
        let gateway = Gateway::new(cfg)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(shopmesh_gateway::server::serve(
            listener,
            gateway.clone(),
            stop.clone(),
            Duration::from_secs(1),
        ));
        Ok(ExtraGateway {
            addr,
            gateway,
            stop,
            task: Some(task),
        })
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ExtraGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The shops of a run, started when first needed and stopped after the last experiment that
/// needs them.
pub struct Shops {
    backend: Backend,
    products: usize,
    running: Vec<(ShopSpec, LabShop)>,
}

impl Shops {
    pub fn new(backend: Backend, products: usize) -> Self {
        Self {
            backend,
            products,
            running: Vec::new(),
        }
    }

    pub async fn get(&mut self, spec: ShopSpec) -> Result<&LabShop, LabError> {
        if !self.running.iter().any(|(s, _)| *s == spec) {
            let shop = LabShop::start(spec, &self.backend, self.products).await?;
            self.running.push((spec, shop));
        }
        self.running(spec)
    }

    /// Starts every shop of `specs` (so that an experiment can hold several at once).
    pub async fn start_all(&mut self, specs: &[ShopSpec]) -> Result<(), LabError> {
        for s in specs {
            self.get(*s).await?;
        }
        Ok(())
    }

    /// A running shop (after [`Shops::start_all`]).
    pub fn running(&self, spec: ShopSpec) -> Result<&LabShop, LabError> {
        self.running
            .iter()
            .find(|(s, _)| *s == spec)
            .map(|(_, shop)| shop)
            .ok_or_else(|| LabError::Shop("the experiment's shop is not running".into()))
    }

    pub async fn stop(&mut self, spec: ShopSpec) {
        if let Some(i) = self.running.iter().position(|(s, _)| *s == spec) {
            self.running.remove(i).1.stop().await;
        }
    }

    pub async fn stop_all(&mut self) {
        for (_, shop) in self.running.drain(..) {
            shop.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the outage experiments rely on: a stopped service refuses connections, comes
    /// back on the same port, and the shop still shuts down after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_stops_and_starts_again_on_its_port() {
        let shop = LabShop::start(ShopSpec::MAIN, &Backend::default(), 0)
            .await
            .unwrap();
        let addr = shop.service(ServiceName::Catalog);
        let health = format!("http://{addr}/openapi.json");
        assert_eq!(shop.http.get(&health).send().await.unwrap().status(), 200);

        assert!(shop.system.stop_service(ServiceName::Catalog).await);
        assert!(!shop.system.stop_service(ServiceName::Catalog).await);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        // The others still serve.
        let users = format!("http://{}/openapi.json", shop.service(ServiceName::Users));
        assert_eq!(shop.http.get(&users).send().await.unwrap().status(), 200);

        shop.system
            .restart_service(ServiceName::Catalog)
            .await
            .unwrap();
        assert_eq!(shop.service(ServiceName::Catalog), addr);
        let fresh = client().unwrap();
        assert_eq!(fresh.get(&health).send().await.unwrap().status(), 200);
        tokio::time::timeout(Duration::from_secs(20), shop.stop())
            .await
            .expect("the shop stops with a restarted service");
    }
}
