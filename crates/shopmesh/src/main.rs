//! `shopmesh`: a thin command over the library crates.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod alloc;
mod bench;
mod mesh;

/// mimalloc: the proxy's per-request allocations (headers, bodies, log lines) cost about a
/// sixth of its CPU under glibc's allocator; mimalloc's per-thread heaps halve that.
#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use shopmesh_platform::db::Storage;
use shopmesh_platform::health;
use shopmesh_platform::serve::Server;
use shopmesh_platform::telemetry::{self, LogFormat};
use shopmesh_shop::dlq::DeadLetters;
use shopmesh_shop::services::{self, Deps, ServiceName};
use shopmesh_shop::{System, SystemConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "shopmesh",
    version,
    about = "Microservice patterns in one real shop"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text, env = "SHOPMESH_LOG_FORMAT")]
    log_format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Via {
    Interface,
    Database,
}

impl From<Via> for shopmesh_shop::UsersVia {
    fn from(v: Via) -> Self {
        match v {
            Via::Interface => shopmesh_shop::UsersVia::Interface,
            Via::Database => shopmesh_shop::UsersVia::Database,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole shop in one process: seven services and the gateway.
    Up(UpArgs),
    /// Run one service alone (for separate processes).
    Service(ServiceArgs),
    /// Run the gateway alone in front of any HTTP services, from a YAML configuration.
    Gateway(GatewayArgs),
    /// Inspect and act on the dead letters of the saga's consumers.
    Dlq(DlqArgs),
    /// Seed the catalog-side services' databases with products (for separate processes;
    /// `up` seeds by itself).
    Seed(SeedArgs),
    /// Print the shop's gateway configuration for services run as separate processes
    /// (YAML, for `shopmesh gateway --config`).
    GatewayConfig(GatewayConfigArgs),
    /// Helpers for the benchmarks under `bench/`.
    Bench(bench::BenchArgs),
    /// The service mesh's identities: `mesh ca init`, `mesh cert issue`.
    Mesh(mesh::MeshArgs),
    /// Run a service mesh sidecar beside one service instance (mutual TLS, policy).
    Sidecar(mesh::SidecarArgs),
    /// The pattern lab: the design document's claims about aggregation, shared data, proxies
    /// and asynchronous messaging, measured on a shop of its own (ephemeral ports); prints
    /// claim · experiment · figure · verdict and writes an HTML report and the JSON of every
    /// figure.
    Lab(LabArgs),
}

#[derive(Args)]
struct LabArgs {
    /// A short run: under three minutes on two cores.
    #[arg(long)]
    quick: bool,
    /// The smallest run whose figures still decide (the end-to-end test's).
    #[arg(long, hide = true, conflicts_with = "quick")]
    smoke: bool,
    /// Only these patterns: aggregation, shared-data, proxy, messaging (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<shopmesh_lab::Group>,
    /// PostgreSQL URL: the lab's shops get fresh schemas there, dropped afterwards. SQLite in
    /// a temporary directory by default.
    #[arg(long)]
    database: Option<String>,
    /// `amqp://…`, `nats://…` or `kafka://…`, under a fresh namespace; the embedded broker by
    /// default.
    #[arg(long)]
    broker: Option<String>,
    /// The HTML report (self-contained: inline CSS and SVG charts, no script).
    #[arg(long, default_value = "lab.html")]
    report: PathBuf,
    /// The JSON of every figure and verdict.
    #[arg(long, default_value = "lab.json")]
    json: PathBuf,
    /// Orders per second before and after the burst (the burst is ten times it); by default
    /// the scale's. A faster machine needs more to show a backlog.
    #[arg(long)]
    steady_rate: Option<f64>,
}

#[derive(Args)]
struct GatewayArgs {
    /// The YAML configuration (reloaded on change and on SIGHUP).
    #[arg(
        long,
        env = "SHOPMESH_GATEWAY_CONFIG",
        required_unless_present = "schema"
    )]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 1 with the reason when not.
    #[arg(long)]
    check: bool,
    /// Print the configuration's JSON Schema and exit.
    #[arg(long, conflicts_with = "check")]
    schema: bool,
    /// Print the public API's OpenAPI document and exit (the clusters' own documents are
    /// fetched from their endpoints, which must be up).
    #[arg(long, conflicts_with_all = ["check", "schema"])]
    openapi: bool,
    /// With --openapi: `3.1` (as served) or `3.0` (for generators that read only 3.0).
    #[arg(long, default_value = "3.1", value_parser = ["3.0", "3.1"], requires = "openapi")]
    openapi_version: String,
    /// How often the configuration file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_poll_ms: u64,
    /// On SIGTERM, how long to keep serving after turning not-ready (`/readyz` 503) before
    /// stopping accepting and draining, so that balancers stop sending first.
    #[arg(long, env = "SHOPMESH_PRESTOP_DELAY_MS", default_value_t = 0)]
    prestop_delay_ms: u64,
    /// Replaces the configuration's `admin.listen`: several instances on one host share
    /// the proxy's address (SO_REUSEPORT) but each needs its own admin port.
    #[arg(long, env = "SHOPMESH_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Write this process's id here once it serves (rewritten by the new process of an
    /// upgrade: SIGUSR2 starts the binary now at this one's path with the listening
    /// sockets handed over, and this one drains once the new one serves).
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

#[derive(Args)]
struct SeedArgs {
    /// Products to seed (services that already have them are left alone).
    #[arg(default_value_t = shopmesh_shop::seed::DEFAULT_PRODUCTS)]
    products: usize,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args)]
struct GatewayConfigArgs {
    /// Address the gateway listens on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the services run: one `NAME=HOST:PORT` per service that is not on
    /// 127.0.0.1 at its default port (catalog 7001, inventory 7002, pricing 7003,
    /// promotions 7004, users 7005, orders 7006, payments 7007).
    #[arg(long = "service", value_parser = parse_service_addr)]
    services: Vec<(ServiceName, SocketAddr)>,
}

fn parse_service_addr(s: &str) -> Result<(ServiceName, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=HOST:PORT, got `{s}`"))?;
    let name: ServiceName = name.parse()?;
    let addr = addr
        .parse()
        .map_err(|e| format!("`{addr}` is not HOST:PORT: {e}"))?;
    Ok((name, addr))
}

#[derive(Args)]
struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters (oldest first).
    List {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show one dead letter in full.
    Show { id: String },
    /// Republish a dead letter's message to its topic (its consumer handles it again).
    Replay { id: String },
    /// Delete one dead letter, or all of them with --all.
    Purge {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

#[derive(Args)]
struct StorageArgs {
    /// PostgreSQL URL (one schema per service). Default: SQLite files under --data-dir.
    #[arg(long, env = "SHOPMESH_DATABASE")]
    database: Option<String>,
    /// Prefix of the services' PostgreSQL schemas (`{prefix}catalog`, …), to keep several
    /// shops in one database.
    #[arg(long, env = "SHOPMESH_SCHEMA_PREFIX", default_value = "")]
    schema_prefix: String,
    /// Directory of the SQLite files (and of the embedded broker's file).
    #[arg(long, env = "SHOPMESH_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The message broker: `embedded` (a file in --data-dir), `amqp://user:pass@host:5672`
    /// (RabbitMQ), `nats://host:4222` (NATS JetStream) or `kafka://host:9092` (Kafka); the
    /// query may add `partitions=N` and `namespace=NAME`.
    #[arg(long, env = "SHOPMESH_BROKER", default_value = "embedded")]
    broker: shopmesh_messaging::BrokerUrl,
}

impl StorageArgs {
    async fn broker(&self) -> anyhow::Result<Arc<dyn shopmesh_messaging::Broker>> {
        Ok(shopmesh_messaging::connect(&self.broker, &self.data_dir.join("broker.db")).await?)
    }

    fn storage(&self) -> anyhow::Result<Storage> {
        let mut storage = Storage::from_args(self.database.as_deref(), self.data_dir.clone())?;
        if let Storage::Postgres { schema_prefix, .. } = &mut storage {
            let ok = self
                .schema_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            anyhow::ensure!(
                ok && self.schema_prefix.len() <= 32,
                "--schema-prefix: at most 32 lower-case letters, digits or `_`"
            );
            schema_prefix.clone_from(&self.schema_prefix);
        }
        Ok(storage)
    }
}

#[derive(Args)]
struct UpArgs {
    /// Address every listener binds to.
    #[arg(long, env = "SHOPMESH_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Gateway port.
    #[arg(long, env = "SHOPMESH_PORT", default_value_t = 8080)]
    port: u16,
    /// Admin and metrics port.
    #[arg(long, env = "SHOPMESH_ADMIN_PORT", default_value_t = 9901)]
    admin_port: u16,
    /// A token the admin port asks for (`Authorization: Bearer TOKEN`, or as the password of
    /// Basic credentials, which a browser asks for on the console): every path but
    /// `/healthz` and `/readyz`. Without one the admin port is open to whoever reaches it.
    #[arg(long, env = "SHOPMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Products to seed on first start (0: none).
    #[arg(long, env = "SHOPMESH_SEED_PRODUCTS", default_value_t = shopmesh_shop::seed::DEFAULT_PRODUCTS)]
    seed_products: usize,
    /// Bootstrap administrators: these emails get the admin role, at start-up if they have
    /// an account, otherwise when they register. Repeat, or separate with commas.
    #[arg(
        long = "admin-email",
        env = "SHOPMESH_ADMIN_EMAILS",
        value_delimiter = ','
    )]
    admin_emails: Vec<String>,
    /// How orders read accounts: the user center's interface (cached, invalidated by
    /// events) or its published view in its database (read-only).
    #[arg(long, env = "SHOPMESH_USERS_VIA", value_enum, default_value_t = Via::Interface)]
    users_via: Via,
    /// Sign-in attempts allowed per account per minute (throttling).
    #[arg(long, env = "SHOPMESH_LOGIN_PER_ACCOUNT", default_value_t = 10)]
    login_per_account: u32,
    /// Sign-in attempts allowed per client address per minute (throttling).
    #[arg(long, env = "SHOPMESH_LOGIN_PER_IP", default_value_t = 60)]
    login_per_ip: u32,
    /// On SIGTERM, how long to keep serving after turning not-ready (`/readyz` 503) before
    /// stopping accepting and draining, so that balancers stop sending first.
    #[arg(long, env = "SHOPMESH_PRESTOP_DELAY_MS", default_value_t = 0)]
    prestop_delay_ms: u64,
    /// Calls between services go through mesh sidecars over mutual TLS (a CA and
    /// certificates are made under the data directory's `mesh/`).
    #[arg(long, env = "SHOPMESH_MESH")]
    mesh: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args)]
struct ServiceArgs {
    /// catalog, inventory, pricing, promotions, users, orders or payments.
    name: ServiceName,
    #[arg(long, env = "SHOPMESH_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, env = "SHOPMESH_PORT")]
    port: u16,
    /// Admin and metrics port (none if absent).
    #[arg(long, env = "SHOPMESH_ADMIN_PORT")]
    admin_port: Option<u16>,
    /// On SIGTERM, how long to keep serving after turning not-ready (`/readyz` 503) before
    /// stopping accepting and draining, so that balancers stop sending first.
    #[arg(long, env = "SHOPMESH_PRESTOP_DELAY_MS", default_value_t = 0)]
    prestop_delay_ms: u64,
    /// Base URL of the pricing service (orders only).
    #[arg(
        long,
        env = "SHOPMESH_PRICING_URL",
        default_value = "http://127.0.0.1:7003"
    )]
    pricing_url: String,
    /// Base URL of the payments service (orders only: its card vault).
    #[arg(
        long,
        env = "SHOPMESH_PAYMENTS_URL",
        default_value = "http://127.0.0.1:7007"
    )]
    payments_url: String,
    /// Base URL of the users service (orders only: the user center's interface).
    #[arg(
        long,
        env = "SHOPMESH_USERS_URL",
        default_value = "http://127.0.0.1:7005"
    )]
    users_url: String,
    /// Bootstrap administrators (users only); see `up --help`.
    #[arg(
        long = "admin-email",
        env = "SHOPMESH_ADMIN_EMAILS",
        value_delimiter = ','
    )]
    admin_emails: Vec<String>,
    /// How orders read accounts: the user center's interface (cached, invalidated by
    /// events) or its published view in its database (read-only).
    #[arg(long, env = "SHOPMESH_USERS_VIA", value_enum, default_value_t = Via::Interface)]
    users_via: Via,
    /// orders only: its mesh sidecar's outbound address (`http://127.0.0.1:15001`); pricing,
    /// payments and users are then called through it by name, and the URLs above are
    /// unused (`shopmesh sidecar` with the targets' inbound sidecars).
    #[arg(long, env = "SHOPMESH_SIDECAR")]
    sidecar: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The lab's output is its table and progress bars: its shops log only when asked to.
    let quiet = matches!(cli.command, Command::Lab(_)) && std::env::var_os("RUST_LOG").is_none();
    // Inside the runtime: the span exporter (when configured) runs its requests on it.
    let _log_guard = (!quiet).then(|| {
        let _rt = runtime.enter();
        telemetry::init_tracing(match cli.log_format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        })
    });
    runtime.block_on(async move {
        match cli.command {
            Command::Up(a) => up(a).await,
            Command::Service(a) => service(a).await,
            Command::Dlq(a) => dlq(a).await,
            Command::Seed(a) => {
                let storage = a.storage.storage()?;
                shopmesh_shop::seed::seed_storage(&storage, a.products).await?;
                println!("seeded {} products ({})", a.products, storage.describe());
                Ok(())
            }
            Command::GatewayConfig(a) => {
                let mut cfg = SystemConfig::new(
                    shopmesh_platform::db::Storage::Sqlite {
                        data_dir: PathBuf::from("unused"),
                    },
                    std::path::Path::new("unused"),
                );
                cfg.host = a.listen.ip();
                cfg.port = a.listen.port();
                let g = shopmesh_shop::gateway_config(&cfg, |n| {
                    a.services
                        .iter()
                        .find(|(m, _)| *m == n)
                        .map(|(_, addr)| *addr)
                        .unwrap_or_else(|| {
                            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), n.default_port())
                        })
                });
                // JSON is YAML; the gateway reads it as its configuration.
                print_document(&serde_json::to_string_pretty(&g)?)?;
                Ok(())
            }
            Command::Gateway(a) => gateway(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Mesh(a) => mesh::run(a),
            Command::Sidecar(a) => mesh::sidecar(a).await,
            Command::Lab(a) => lab(a).await,
        }
    })
}

async fn lab(a: LabArgs) -> anyhow::Result<()> {
    // The URL checked as every command checks it, before the run starts (the lab keeps its
    // SQLite files in temporary directories of its own).
    shopmesh_platform::db::Storage::from_args(a.database.as_deref(), PathBuf::new())?;
    let mut scale = if a.smoke {
        shopmesh_lab::Scale::smoke()
    } else if a.quick {
        shopmesh_lab::Scale::quick()
    } else {
        shopmesh_lab::Scale::full()
    };
    if let Some(rate) = a.steady_rate {
        anyhow::ensure!(
            rate > 0.0 && rate <= 1000.0,
            "--steady-rate: 0 to 1000 orders per second"
        );
        scale.steady_rate = rate;
    }
    let opts = shopmesh_lab::Options {
        scale,
        only: a.only,
        backend: shopmesh_lab::Backend {
            database: a.database,
            broker: a.broker,
        },
        progress: true,
        // The crash experiment runs this executable as `shopmesh up` and kills it.
        shopmesh: std::env::current_exe().ok(),
    };
    let report = shopmesh_lab::run(&opts).await?;
    // The files first: a reader of the table that stops early (`| head`) loses nothing.
    std::fs::write(&a.json, report.to_json()?)
        .with_context(|| format!("cannot write {}", a.json.display()))?;
    std::fs::write(&a.report, shopmesh_lab::html::render(&report)?)
        .with_context(|| format!("cannot write {}", a.report.display()))?;
    print_document(&format!(
        "{}\n{} experiments in {:.0} s; report {}, figures {}",
        report.table(),
        report.findings.len(),
        report.seconds,
        a.report.display(),
        a.json.display()
    ))
}

async fn up(a: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let _ = telemetry::prometheus();
    let storage = a.storage.storage()?;
    let mut cfg = SystemConfig::new(storage.clone(), &a.storage.data_dir);
    cfg.host = a.host;
    cfg.port = a.port;
    cfg.admin_port = a.admin_port;
    cfg.admin_token = a.admin_token.filter(|t| !t.is_empty());
    cfg.seed_products = a.seed_products;
    cfg.admin_emails = a.admin_emails;
    cfg.users_via = a.users_via.into();
    cfg.login_limits = (a.login_per_account, a.login_per_ip);
    cfg.broker = a.storage.broker.clone();
    cfg.mesh = a.mesh.then(|| a.storage.data_dir.join("mesh"));
    let system = System::start(cfg).await?;
    println!(
        "shopmesh is up ({}, {} broker)",
        storage.describe(),
        a.storage.broker.kind()
    );
    println!("  gateway    http://{}", system.gateway);
    println!("  admin      http://{}/metrics", system.admin);
    println!("  console    http://{}/console", system.admin);
    for (name, addr) in &system.services {
        println!("  {:<11}http://{addr}", name.as_str());
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    shutdown_signal().await;
    health::prestop(&system.readiness, Duration::from_millis(a.prestop_delay_ms)).await;
    tracing::info!("shutting down: finishing in-flight requests");
    system.shutdown().await;
    Ok(())
}

async fn service(a: ServiceArgs) -> anyhow::Result<()> {
    let _ = telemetry::prometheus();
    let storage = a.storage.storage()?;
    // Separate processes share the embedded broker's file (SQLite handles the locking), or
    // a real broker.
    let broker = a.storage.broker().await?;
    services::declare(broker.as_ref()).await?;
    let messaging = services::Messaging {
        broker,
        saga_deadline: shopmesh_shop::DEFAULT_SAGA_DEADLINE,
        silent: Vec::new(),
        journal: None,
    };
    let mut built = services::open(
        a.name,
        &storage,
        &Deps {
            pricing_url: a.pricing_url.clone(),
            payments_url: a.payments_url.clone(),
            users_url: a.users_url.clone(),
            users_via: a.users_via.into(),
            sidecar: a.sidecar.clone(),
        },
        &shopmesh_shop::UserSettings {
            admins: a.admin_emails.clone(),
            ..Default::default()
        },
        &messaging,
    )
    .await?;
    // SO_REUSEPORT, as the gateway's listeners: a replacement can start on the same port
    // beside this process before it stops (a rolling restart on one host).
    let addr = SocketAddr::new(a.host, a.port);
    let listener = shopmesh_gateway::server::reuseport_listeners(addr, 1)
        .and_then(|mut l| tokio::net::TcpListener::from_std(l.remove(0)))
        .with_context(|| format!("{}: cannot listen on {addr}", a.name))?;
    let server = Server {
        name: a.name.as_str(),
        listener,
        router: built.router,
    };
    println!("{} listening on http://{}", a.name, server.local_addr());
    // Ready while its storage answers, until SIGTERM.
    let readiness = health::Readiness::new();
    readiness.add_storage_check("storage", built.db.clone());
    // Stopped in order: the service's server (drained: not-ready, the pre-stop delay with
    // `Connection: close` on answers, in-flight requests finished), then the relays,
    // consumers and sweeper (the relay publishes what the last requests staged), then the
    // admin port (`/readyz` says 503 until the end).
    let (serving, working, admin_token) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let drain = Duration::from_secs(10);
    let served = tokio::spawn(server.run_with_readiness(readiness.clone(), serving.clone(), drain));
    let mut work = tokio::task::JoinSet::new();
    for task in built.tasks.drain(..) {
        work.spawn(task(working.clone()));
    }
    let mut admin_served = None;
    if let Some(port) = a.admin_port {
        let admin = Server::bind(
            "admin",
            SocketAddr::new(a.host, port),
            telemetry::admin_router().merge(readiness.router()),
        )
        .await?;
        println!("admin listening on http://{}/metrics", admin.local_addr());
        // Its answers close their connections from not-ready on too, so that an idle probe
        // connection does not hold the exit for the linger.
        admin_served = Some(tokio::spawn(admin.run_with_readiness(
            readiness.clone(),
            admin_token.clone(),
            Duration::from_secs(1),
        )));
    }
    shutdown_signal().await;
    health::prestop(&readiness, Duration::from_millis(a.prestop_delay_ms)).await;
    tracing::info!("shutting down: finishing in-flight requests");
    serving.cancel();
    served.await??;
    working.cancel();
    while let Some(r) = work.join_next().await {
        r?;
    }
    admin_token.cancel();
    if let Some(admin) = admin_served {
        admin.await??;
    }
    Ok(())
}

async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    use shopmesh_gateway::GatewayConfig;
    if a.schema {
        print_document(&GatewayConfig::json_schema())?;
        return Ok(());
    }
    let Some(path) = a.config else {
        anyhow::bail!("--config FILE is required");
    };
    if a.openapi {
        let cfg = GatewayConfig::from_file(&path)
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let client = shopmesh_gateway::runtime::jwks_client();
        let docs = shopmesh_gateway::openapi::fetch_documents(&cfg, &client).await?;
        let mut doc = shopmesh_gateway::openapi::build(&cfg, &docs);
        if a.openapi_version == "3.0" {
            shopmesh_gateway::openapi::to_openapi_30(&mut doc);
        }
        print_document(&serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    if a.check {
        let checked = GatewayConfig::from_file(&path).and_then(|cfg| {
            // The certificate and key are loaded too, as a start would.
            if let Some(tls) = &cfg.tls {
                shopmesh_gateway::tls::acceptor(tls)
                    .map_err(shopmesh_gateway::config::ConfigError::Invalid)?;
            }
            Ok(cfg)
        });
        return match checked {
            Ok(cfg) => {
                println!(
                    "{}: valid ({} routes, {} clusters)",
                    path.display(),
                    cfg.routes.len(),
                    cfg.clusters.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: invalid: {e}", path.display());
                std::process::exit(1);
            }
        };
    }
    let _ = telemetry::prometheus();
    // The path this process was started from, read now: once an upgrade has replaced the
    // file, /proc/self/exe names the deleted one.
    let exe = std::env::current_exe();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut signals = GatewaySignals::new()?;
    let gw = shopmesh_gateway::server::Standalone::start_with(
        path.clone(),
        shopmesh_gateway::server::StartOptions {
            poll: Duration::from_millis(a.reload_poll_ms.max(50)),
            admin_listen: a.admin_listen,
            inherited: shopmesh_gateway::server::handover::Inherited::from_env(),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("shopmesh gateway listening on http://{}", gw.addr);
    if let Some(admin) = gw.admin {
        println!("  admin    http://{admin}/clusters");
        println!("  console  http://{admin}/console");
    }
    if let Some(p) = &a.pid_file {
        write_pid_file(p)?;
    }
    gw.announce_ready();
    let upgraded = loop {
        match signals.next().await {
            GatewaySignal::Stop => break false,
            GatewaySignal::Upgrade => {
                let exe = match &exe {
                    Ok(exe) => exe,
                    Err(e) => {
                        tracing::error!(error = %e, "upgrade impossible: this binary's path is unknown");
                        continue;
                    }
                };
                match gw.upgrade(exe, &args, Duration::from_secs(60)).await {
                    Ok(pid) => {
                        tracing::info!(pid, "upgraded: the new process serves; draining");
                        break true;
                    }
                    Err(e) => tracing::error!(error = %e, "upgrade failed; serving on"),
                }
            }
        }
    };
    if upgraded {
        // No pre-stop delay: the listening sockets are the new process's too, nothing
        // has to stop sending here.
        gw.readiness.drain();
    } else {
        health::prestop(&gw.readiness, Duration::from_millis(a.prestop_delay_ms)).await;
    }
    tracing::info!("shutting down: finishing in-flight requests");
    gw.shutdown().await;
    if !upgraded && let Some(p) = &a.pid_file {
        // Only this process's own id: after an upgrade the file is the new one's.
        if std::fs::read_to_string(p).is_ok_and(|s| s.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// Writes this process's id to `path`, replacing it at once (no reader sees half a file).
fn write_pid_file(path: &std::path::Path) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the pid file {}", path.display()))
}

enum GatewaySignal {
    /// SIGTERM or Ctrl-C: drain and exit.
    Stop,
    /// SIGUSR2: upgrade to the binary at this one's path.
    Upgrade,
}

/// The gateway's signal streams, installed once: a signal that arrives between two waits
/// is not lost.
struct GatewaySignals {
    term: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl GatewaySignals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("SIGTERM")?,
            usr2: signal(SignalKind::user_defined2()).context("SIGUSR2")?,
        })
    }

    async fn next(&mut self) -> GatewaySignal {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => GatewaySignal::Stop,
            _ = self.term.recv() => GatewaySignal::Stop,
            _ = self.usr2.recv() => GatewaySignal::Upgrade,
        }
    }
}

async fn dlq(a: DlqArgs) -> anyhow::Result<()> {
    let storage = a.storage.storage()?;
    let letters = DeadLetters::open(&storage, a.storage.broker().await?).await?;
    match a.action {
        DlqAction::List { limit } => {
            let all = letters.list(limit).await?;
            if all.is_empty() {
                println!("no dead letters");
            }
            for e in all {
                let d = e.letter;
                println!(
                    "{}  {:<10} {:<12} {:<10} attempts={} {}  {}",
                    d.id, e.service, d.consumer, d.topic, d.attempts, d.failed_at, d.reason
                );
            }
        }
        DlqAction::Show { id } => {
            let e = letters.get(&id).await?;
            let mut v = serde_json::to_value(&e)?;
            if let Ok(payload) = serde_json::from_str::<serde_json::Value>(&e.letter.payload) {
                v["payload"] = payload;
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        DlqAction::Replay { id } => {
            let e = letters.replay(&id).await?;
            println!("replayed {} to `{}`", e.letter.id, e.letter.topic);
        }
        DlqAction::Purge { id, all } => {
            let n = match (id, all) {
                (Some(id), _) => letters.purge(Some(&id)).await?,
                (None, true) => letters.purge(None).await?,
                (None, false) => anyhow::bail!("give a dead letter id, or --all"),
            };
            println!("purged {n}");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Prints a document meant for a pipe or a file. A reader that stops early (`| head`) ends
/// the output quietly instead of panicking on the closed pipe.
fn print_document(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
