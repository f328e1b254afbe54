//! The shop as one system: the seven services, each on its own loopback port with its own
//! storage, and the gateway in front of them reaching them over real HTTP.
//!
//! [`System::start`] is what `shopmesh up` runs and what the end-to-end tests start;
//! [`services::build`] is what `shopmesh service NAME` runs for one service alone.

pub mod admin;
pub mod console;
pub mod dlq;
pub mod journal;
pub mod mesh;
pub mod seed;
pub mod services;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shopmesh_gateway::config::{ClusterConfig, JwtConfig, RouteConfig};
use shopmesh_gateway::{Gateway, GatewayConfig};
use shopmesh_platform::db::{DbError, Storage};
use shopmesh_platform::serve::Server;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use services::{ServiceName, UsersVia};
pub use shopmesh_users::{DIRECTORY_READER, Settings as UserSettings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{service}: {reason}")]
    Service {
        service: &'static str,
        reason: String,
    },
    #[error("gateway configuration: {0}")]
    Gateway(#[from] shopmesh_gateway::config::ConfigError),
    #[error("seeding failed: {0}")]
    Seed(#[from] sqlx_error::SeedError),
}

mod sqlx_error {
    /// Seeding failure (kept opaque: it only ever ends start-up with a message).
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct SeedError(pub String);
}
pub use sqlx_error::SeedError;

/// How long the saga waits for a participant before cancelling (`timeout`). Long enough that
/// a backlog after a burst is not mistaken for a silent participant.
pub const DEFAULT_SAGA_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SystemConfig {
    pub host: IpAddr,
    /// Gateway port (0 = any free port).
    pub port: u16,
    /// Admin/metrics port (0 = any free port).
    pub admin_port: u16,
    /// The token every admin path but `/healthz` and `/readyz` asks for (the console's
    /// included). `None`: the admin port is open to whoever reaches it.
    pub admin_token: Option<String>,
    pub storage: Storage,
    /// Products to seed on first start (0 = none).
    pub seed_products: usize,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain: Duration,
    /// Lifetime of access tokens.
    pub token_ttl: Duration,
    /// Clock skew the gateway tolerates on token `exp`/`nbf`.
    pub jwt_leeway_secs: u64,
    /// How often the gateway fetches the disabled accounts (the longest a disabled user's
    /// access token keeps working).
    pub revocations_poll_ms: u64,
    /// Bootstrap administrators: these emails get the admin role (at start-up, or when they
    /// register).
    pub admin_emails: Vec<String>,
    /// How often the gateway fetches the JWKS in any case.
    pub jwks_refresh_ms: u64,
    /// How the orders service reads accounts: the user center's interface or its database.
    pub users_via: services::UsersVia,
    /// Sign-in attempts allowed per account and per client address, per minute.
    pub login_limits: (u32, u32),
    /// After a key rotation, how long the new key is published before it signs (must exceed
    /// `jwks_refresh_ms`).
    pub key_activation: Duration,
    /// Largest request body the gateway forwards.
    pub max_body_bytes: u64,
    /// The message broker (embedded by default).
    pub broker: shopmesh_messaging::BrokerUrl,
    /// The embedded broker's file.
    pub broker_path: PathBuf,
    /// Deliver every message twice (tests the consumers' idempotency).
    pub duplicate_deliveries: bool,
    /// A saga participant silent this long cancels the order (`timeout`).
    pub saga_deadline: Duration,
    /// Services whose consumer does not run (fault injection: a silent participant).
    pub silent: Vec<ServiceName>,
    /// Calls between services through mesh sidecars over mutual TLS ([`mesh`]), the mesh
    /// CA and certificates in this directory. `None`: services call each other directly.
    pub mesh: Option<PathBuf>,
    /// Further instances of pricing or payments (`(service, n)`: n more), mesh only: each
    /// on the same storage and broker, with its own server, background work and inbound
    /// sidecar on a runtime of its own (as a process of its own would be; see
    /// [`System::kill_replica`]); orders' outbound sidecar balances over all instances. The
    /// gateway reaches the first instance only.
    pub replicas: Vec<(ServiceName, usize)>,
}

impl SystemConfig {
    pub fn new(storage: Storage, data_dir: &std::path::Path) -> Self {
        Self {
            broker: shopmesh_messaging::BrokerUrl::Embedded,
            broker_path: data_dir.join("broker.db"),
            duplicate_deliveries: false,
            saga_deadline: DEFAULT_SAGA_DEADLINE,
            silent: Vec::new(),
            mesh: None,
            replicas: Vec::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            admin_port: 9901,
            admin_token: None,
            storage,
            seed_products: seed::DEFAULT_PRODUCTS,
            drain: Duration::from_secs(10),
            token_ttl: Duration::from_secs(15 * 60),
            jwt_leeway_secs: 30,
            revocations_poll_ms: 2_000,
            admin_emails: Vec::new(),
            jwks_refresh_ms: 30_000,
            users_via: services::UsersVia::Interface,
            login_limits: (
                shopmesh_users::throttle::ACCOUNT_PER_MINUTE,
                shopmesh_users::throttle::IP_PER_MINUTE,
            ),
            key_activation: Duration::from_secs(60),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// A running system. Dropping it does not stop it: call [`System::shutdown`].
pub struct System {
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub services: Vec<(ServiceName, SocketAddr)>,
    /// `/readyz` on the admin port: every service's storage answers, and no shutdown began.
    pub readiness: shopmesh_platform::health::Readiness,
    /// Stopped in order, each drained before the next stops: the gateway and the admin
    /// API (the way in), then the services (finishing what the gateway forwarded, calls
    /// between services included), then relays, consumers and the sweeper.
    stages: [(CancellationToken, JoinSet<()>); 3],
    /// The sidecars, when calls between services go through the mesh.
    pub mesh: Option<mesh::Mesh>,
    /// Each service as started, stoppable on its own ([`System::stop_service`]); a
    /// service's first instance comes before its replicas.
    units: tokio::sync::Mutex<Vec<Unit>>,
    respawn: Respawn,
    /// The replicas' runtimes ([`SystemConfig::replicas`]), in the order they were asked for.
    replicas: tokio::sync::Mutex<Vec<ReplicaRuntime>>,
}

/// The runtime of one replica, on a thread of its own: dropped (every task of the replica,
/// its sidecar's included, dropped with it, sockets closed, nothing drained) when `end` is
/// sent or dropped.
struct ReplicaRuntime {
    service: ServiceName,
    handle: tokio::runtime::Handle,
    end: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicaRuntime {
    fn start(service: ServiceName, n: usize) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{service}-{n}"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = ended.await;
                });
                drop(rt);
            })?;
        Ok(Self {
            service,
            handle,
            end: Some(end),
            thread: Some(thread),
        })
    }

    /// Drops the runtime and waits until it is gone. False when it already was.
    async fn kill(&mut self) -> bool {
        let (Some(end), Some(thread)) = (self.end.take(), self.thread.take()) else {
            return false;
        };
        let _ = end.send(());
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        true
    }
}

/// What opening a service again takes ([`System::restart_service`]).
struct Respawn {
    storage: Storage,
    deps: services::Deps,
    users: shopmesh_users::Settings,
    messaging: services::Messaging,
    drain: Duration,
    /// The stages' tokens: a restarted service still stops with the system.
    services: CancellationToken,
    work: CancellationToken,
}

/// One service of the system, and its server and background work while they run.
struct Unit {
    name: ServiceName,
    addr: SocketAddr,
    running: Option<Running>,
}

/// A running service's tokens (children of the stages') and receivers that close once its
/// server, and every background task, have ended.
struct Running {
    server: CancellationToken,
    work: CancellationToken,
    server_done: tokio::sync::mpsc::Receiver<()>,
    work_done: tokio::sync::mpsc::Receiver<()>,
}

type Job = futures::future::BoxFuture<'static, ()>;

/// A built service's server and background tasks as futures to spawn, each ending when its
/// token (a child of `services` or of `work`) is cancelled.
fn launch(
    b: services::Built,
    listener: TcpListener,
    drain: Duration,
    services: &CancellationToken,
    work: &CancellationToken,
) -> (Running, Job, Vec<Job>) {
    use futures::FutureExt;
    let (server, work) = (services.child_token(), work.child_token());
    let (server_tx, server_done) = tokio::sync::mpsc::channel::<()>(1);
    let (work_tx, work_done) = tokio::sync::mpsc::channel::<()>(1);
    let tasks = b
        .tasks
        .into_iter()
        .map(|task| {
            let (job, tx) = (task(work.clone()), work_tx.clone());
            async move {
                job.await;
                drop(tx);
            }
            .boxed()
        })
        .collect();
    let s = Server {
        name: b.name.as_str(),
        listener,
        router: b.router,
    };
    let token = server.clone();
    let serve = async move {
        if let Err(e) = s.run(token, drain).await {
            tracing::error!(error = %e, "service server failed");
        }
        drop(server_tx);
    }
    .boxed();
    (
        Running {
            server,
            work,
            server_done,
            work_done,
        },
        serve,
        tasks,
    )
}

pub use shopmesh_messaging::BrokerUrl;

/// The shop's composite endpoints, in the gateway's configuration language.
pub const COMPOSITES: &str = include_str!("composites.yaml");

/// The gateway configuration `shopmesh up` generates: one cluster per service, one route
/// per public path prefix.
pub fn gateway_config(
    cfg: &SystemConfig,
    addr: impl Fn(ServiceName) -> SocketAddr,
) -> GatewayConfig {
    use ServiceName::*;
    let clusters = ServiceName::ALL
        .iter()
        .map(|s| {
            let mut c = ClusterConfig::new(s.as_str(), vec![format!("http://{}", addr(*s))]);
            c.openapi = Some("/openapi.json".into());
            c
        })
        .collect();
    let r = |name: &str, prefix: &str, svc: ServiceName, required: bool| {
        let mut route = RouteConfig::prefix(name, prefix, svc.as_str());
        route.auth.required = required;
        route
    };
    // The composite endpoints come first: they answer GET and HEAD; anything else on those
    // paths goes on to the plain routes.
    let mut routes: Vec<RouteConfig> = GatewayConfig::fragment(COMPOSITES)
        .expect("the shop's composite endpoints parse (checked by a test)");
    routes.extend([
        r("products", "/api/products", Catalog, false),
        r("inventory", "/api/inventory", Inventory, false),
        r("prices", "/api/prices", Pricing, false),
        r("promotions", "/api/promotions", Promotions, false),
        r("users", "/api/users", Users, false),
        r("auth", "/api/auth", Users, false),
        r("jwks", "/.well-known/jwks.json", Users, false),
        r("orders", "/api/orders", Orders, true),
        r("payments", "/api/payments", Payments, true),
        r("payment-methods", "/api/payment-methods", Payments, true),
    ]);
    for (name, prefix) in [
        ("admin-users", "/api/admin/users"),
        ("admin-keys", "/api/admin/keys"),
    ] {
        let mut admin = r(name, prefix, Users, true);
        admin.auth.roles = vec!["admin".into()];
        routes.push(admin);
    }
    let mut g = GatewayConfig::new(clusters, routes);
    g.openapi = Some(shopmesh_gateway::config::OpenApiConfig {
        title: "shopmesh".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: Some(
            "The shop's public API, as the gateway serves it: products (composite pages and \
             lists), stock, prices, promotions, accounts and sign-in, orders and payments. \
             Errors are RFC 9457 problem+json."
                .into(),
        ),
        ..Default::default()
    });
    g.listen = SocketAddr::new(cfg.host, cfg.port);
    // The shop's admin API (its own port) carries the gateway's admin routes.
    g.admin.listen = None;
    g.limits.max_body_bytes = cfg.max_body_bytes;
    g.jwt = Some(JwtConfig {
        jwks_url: format!("http://{}/.well-known/jwks.json", addr(Users)),
        issuer: shopmesh_users::ISSUER.into(),
        audience: shopmesh_users::AUDIENCE.into(),
        leeway_secs: cfg.jwt_leeway_secs,
        min_refetch_secs: 10,
        revocations_url: Some(format!("http://{}/internal/revocations", addr(Users))),
        revocations_poll_ms: cfg.revocations_poll_ms,
        jwks_refresh_ms: cfg.jwks_refresh_ms,
        cache: true,
    });
    g
}

impl System {
    pub async fn start(cfg: SystemConfig) -> Result<System, Error> {
        let loopback = |port| SocketAddr::new(cfg.host, port);
        // Bind everything first so every address is known before anything serves.
        let gateway_listener = TcpListener::bind(loopback(cfg.port)).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("gateway: cannot listen on {}: {e}", loopback(cfg.port)),
            )
        })?;
        let admin_listener = TcpListener::bind(loopback(cfg.admin_port))
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("admin: cannot listen on {}: {e}", loopback(cfg.admin_port)),
                )
            })?;
        let mut listeners = Vec::new();
        for name in ServiceName::ALL {
            let l = TcpListener::bind(SocketAddr::new(cfg.host, 0)).await?;
            listeners.push((name, l));
        }
        let addrs: Vec<(ServiceName, SocketAddr)> = listeners
            .iter()
            .map(|(n, l)| Ok((*n, l.local_addr()?)))
            .collect::<Result<_, std::io::Error>>()?;
        let addr_of = |n: ServiceName| {
            addrs
                .iter()
                .find(|(m, _)| *m == n)
                .map(|(_, a)| *a)
                .expect("every service has an address")
        };
        // The replicas' runtimes and listeners, before the mesh that fronts them.
        let mut replicas = Vec::new();
        let mut replica_listeners = Vec::new();
        for &(service, n) in &cfg.replicas {
            if n == 0 {
                continue;
            }
            if cfg.mesh.is_none()
                || !matches!(service, ServiceName::Pricing | ServiceName::Payments)
            {
                return Err(Error::Service {
                    service: service.as_str(),
                    reason: "replicas are for pricing and payments behind the mesh".into(),
                });
            }
            for i in 0..n {
                let l = std::net::TcpListener::bind(SocketAddr::new(cfg.host, 0))?;
                l.set_nonblocking(true)?;
                replicas.push(ReplicaRuntime::start(service, i + 1)?);
                replica_listeners.push(l);
            }
        }
        let mesh = match &cfg.mesh {
            Some(dir) => {
                let fronted = replicas
                    .iter()
                    .zip(&replica_listeners)
                    .map(|(r, l)| {
                        Ok(mesh::Replica {
                            service: r.service,
                            local: l.local_addr()?,
                            runtime: r.handle.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, std::io::Error>>()?;
                Some(mesh::Mesh::start(dir.clone(), cfg.host, addr_of, &fronted).await?)
            }
            None => None,
        };
        let deps = services::Deps {
            pricing_url: format!("http://{}", addr_of(ServiceName::Pricing)),
            payments_url: format!("http://{}", addr_of(ServiceName::Payments)),
            users_url: format!("http://{}", addr_of(ServiceName::Users)),
            users_via: cfg.users_via,
            sidecar: mesh.as_ref().map(|m| m.outbound.clone()),
        };

        let broker_error = |e: shopmesh_messaging::BrokerError| Error::Service {
            service: "broker",
            reason: e.to_string(),
        };
        let mut broker = shopmesh_messaging::connect(&cfg.broker, &cfg.broker_path)
            .await
            .map_err(broker_error)?;
        if cfg.duplicate_deliveries {
            broker = Arc::new(shopmesh_messaging::broker::Duplicating(broker));
        }
        services::declare(broker.as_ref()).await?;
        let journal = journal::Journal::new();
        let messaging = services::Messaging {
            broker: broker.clone(),
            saga_deadline: cfg.saga_deadline,
            silent: cfg.silent.clone(),
            journal: Some(journal.clone()),
        };
        let users = shopmesh_users::Settings {
            access_ttl: cfg.token_ttl,
            admins: cfg.admin_emails.clone(),
            key_activation: cfg.key_activation,
            login_limits: cfg.login_limits,
            ..Default::default()
        };
        // Connect, migrate and build all services concurrently.
        let built = futures::future::try_join_all(
            ServiceName::ALL
                .iter()
                .map(|n| services::open(*n, &cfg.storage, &deps, &users, &messaging)),
        )
        .await?;
        if cfg.seed_products > 0 {
            let dbs = |n: ServiceName| {
                built
                    .iter()
                    .find(|b| b.name == n)
                    .map(|b| b.db.clone())
                    .expect("every service is built")
            };
            seed::seed(
                &seed::Dbs {
                    catalog: dbs(ServiceName::Catalog),
                    inventory: dbs(ServiceName::Inventory),
                    pricing: dbs(ServiceName::Pricing),
                    promotions: dbs(ServiceName::Promotions),
                },
                cfg.seed_products,
            )
            .await?;
        }

        let dead_letters = dlq::DeadLetters::new(
            built
                .iter()
                .filter(|b| dlq::CONSUMING.contains(&b.name))
                .map(|b| (b.name, b.db.clone()))
                .collect(),
            broker,
        )
        .with_journal(journal.clone());
        // Ready while every service's storage answers (and until shutdown begins).
        let readiness = shopmesh_platform::health::Readiness::new();
        for b in &built {
            readiness.add_storage_check(format!("{}.storage", b.name.as_str()), b.db.clone());
        }
        let all_dbs: Vec<(ServiceName, shopmesh_platform::db::Db)> =
            built.iter().map(|b| (b.name, b.db.clone())).collect();
        let (front, services, work) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let (mut front_tasks, mut service_tasks, mut work_tasks) =
            (JoinSet::new(), JoinSet::new(), JoinSet::new());
        let mut units = Vec::new();
        for (b, (_, listener)) in built.into_iter().zip(listeners) {
            let (name, addr) = (b.name, listener.local_addr()?);
            let (running, serve, tasks) = launch(b, listener, cfg.drain, &services, &work);
            service_tasks.spawn(serve);
            for task in tasks {
                work_tasks.spawn(task);
            }
            units.push(Unit {
                name,
                addr,
                running: Some(running),
            });
        }
        // Each replica opened (after its first instance migrated the storage) and run on its
        // own runtime.
        for (r, l) in replicas.iter().zip(replica_listeners) {
            let name = r.service;
            let (storage, deps, users, m) = (
                cfg.storage.clone(),
                deps.clone(),
                users.clone(),
                messaging.clone(),
            );
            let b = r
                .handle
                .spawn(async move { services::open(name, &storage, &deps, &users, &m).await })
                .await
                .map_err(|e| Error::Service {
                    service: name.as_str(),
                    reason: e.to_string(),
                })??;
            let listener = {
                let _on = r.handle.enter();
                TcpListener::from_std(l)?
            };
            let addr = listener.local_addr()?;
            let (running, serve, tasks) = launch(b, listener, cfg.drain, &services, &work);
            r.handle.spawn(serve);
            for task in tasks {
                r.handle.spawn(task);
            }
            units.push(Unit {
                name,
                addr,
                running: Some(running),
            });
        }

        let gateway = Gateway::new(gateway_config(&cfg, addr_of))?;
        let gateway_addr = gateway_listener.local_addr()?;
        // From not-ready (SIGTERM, the pre-stop delay) its HTTP/1 answers carry
        // `Connection: close`, as `shopmesh gateway`'s do.
        front_tasks.spawn(shopmesh_gateway::server::serve_with_readiness(
            gateway_listener,
            gateway.clone(),
            readiness.clone(),
            front.clone(),
            cfg.drain,
        ));

        let admin = Server {
            name: "admin",
            listener: admin_listener,
            router: admin::router(
                dead_letters.clone(),
                gateway.clone(),
                cfg.admin_token.clone(),
                shopmesh_console::Console::new(console::ShopSource::new(
                    gateway.clone(),
                    dead_letters,
                    readiness.clone(),
                    all_dbs,
                    cfg.broker.kind().to_owned(),
                    journal,
                )),
            )
            .merge(readiness.router()),
        };
        let admin_addr = admin.local_addr();
        let (token, drain, ready) = (front.clone(), Duration::from_secs(1), readiness.clone());
        front_tasks.spawn(async move {
            let _ = admin.run_with_readiness(ready, token, drain).await;
        });

        Ok(System {
            gateway: gateway_addr,
            admin: admin_addr,
            services: addrs,
            readiness,
            respawn: Respawn {
                storage: cfg.storage.clone(),
                deps,
                users,
                messaging,
                drain: cfg.drain,
                services: services.clone(),
                work: work.clone(),
            },
            units: tokio::sync::Mutex::new(units),
            replicas: tokio::sync::Mutex::new(replicas),
            stages: [
                (front, front_tasks),
                (services, service_tasks),
                (work, work_tasks),
            ],
            mesh,
        })
    }

    /// Stops one service (fault injection): its server stops accepting and lets in-flight
    /// requests finish, then its relay and consumers stop; what it would consume waits on
    /// the broker. Its port is left free for [`System::restart_service`]. False when it was
    /// not running.
    pub async fn stop_service(&self, name: ServiceName) -> bool {
        let mut units = self.units.lock().await;
        let Some(mut r) = units
            .iter_mut()
            .find(|u| u.name == name)
            .and_then(|u| u.running.take())
        else {
            return false;
        };
        r.server.cancel();
        r.server_done.recv().await;
        r.work.cancel();
        r.work_done.recv().await;
        true
    }

    /// Starts a service stopped by [`System::stop_service`] again, on the same port, with
    /// the same storage, broker and settings (its storage opened and its app built anew, as
    /// a restarted process would). Nothing is done when it runs.
    pub async fn restart_service(&self, name: ServiceName) -> Result<(), Error> {
        let mut units = self.units.lock().await;
        let Some(unit) = units.iter_mut().find(|u| u.name == name) else {
            return Ok(());
        };
        let r = &self.respawn;
        if unit.running.is_some() || r.services.is_cancelled() {
            return Ok(());
        }
        let listener = TcpListener::bind(unit.addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{name}: cannot listen on {} again: {e}", unit.addr),
            )
        })?;
        let b = services::open(name, &r.storage, &r.deps, &r.users, &r.messaging).await?;
        let (running, serve, tasks) = launch(b, listener, r.drain, &r.services, &r.work);
        tokio::spawn(serve);
        for task in tasks {
            tokio::spawn(task);
        }
        unit.running = Some(running);
        Ok(())
    }

    /// Kills replica `n` (1-based, in [`SystemConfig::replicas`]'s order) of `service`
    /// abruptly, as `kill -9` would its process: its runtime is dropped, and with it its
    /// server, every connection (mid-request or not), its relay and consumer and its inbound
    /// sidecar; nothing is drained. What it had leased from the broker comes back when the
    /// lease runs out; what it had not committed is rolled back. False when there is no such
    /// replica or it is dead already.
    pub async fn kill_replica(&self, service: ServiceName, n: usize) -> bool {
        let mut replicas = self.replicas.lock().await;
        match replicas
            .iter_mut()
            .filter(|r| r.service == service)
            .nth(n.wrapping_sub(1))
        {
            Some(r) => r.kill().await,
            None => false,
        }
    }

    pub fn service_addr(&self, name: ServiceName) -> SocketAddr {
        self.services
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .expect("every service runs")
    }

    /// Stops accepting, lets in-flight requests finish, waits for every server: the
    /// gateway first, then the services, then the background work (each stage drained
    /// before the next is told).
    pub async fn shutdown(self) {
        self.readiness.drain();
        let mut units = self.units.into_inner();
        for (stage, (token, mut tasks)) in self.stages.into_iter().enumerate() {
            token.cancel();
            while tasks.join_next().await.is_some() {}
            // A restarted service's server and work run outside the stages' sets.
            for r in units.iter_mut().filter_map(|u| u.running.as_mut()) {
                match stage {
                    1 => r.server_done.recv().await,
                    2 => r.work_done.recv().await,
                    _ => None,
                };
            }
        }
        if let Some(mesh) = self.mesh {
            mesh.shutdown().await;
        }
        // Their servers and work have ended with the stages; their runtimes go now.
        for r in self.replicas.into_inner().iter_mut() {
            r.kill().await;
        }
    }
}
