//! `shopmesh bench backend`: stand-in backends for the benchmarks under `bench/`. Each
//! listener answers the shop's read paths with small fixed JSON documents after an injected
//! delay, so a benchmark measures the gateway, not a database.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Serve stand-in JSON backends (products, inventory, prices, promotions).
    Backend(BackendArgs),
    /// The user center's figures: token verifications per second at the gateway's
    /// verifier, account lookups through the interface (cache hit, miss) and the shared
    /// database, and each way's consistency window. Runs the shop in-process on SQLite.
    Identity(IdentityArgs),
    /// The broker adapter's raw rate: messages published in batches (as the outbox relay
    /// does) and consumed and acknowledged (as a consumer does), with publish→consume
    /// latency. No database involved.
    Broker(BrokerArgs),
    /// The floor of the gateway's stack: a reverse proxy with nothing but hyper and tokio
    /// (one current-thread runtime per worker on a shared port, as the gateway runs, and
    /// hyper-util's pooled client). No routing, no auth, no limits, no metrics, no log. The
    /// gateway cannot be faster than this; `bench/proxy-vs-peers.sh` prints it beside nginx.
    BareProxy(BareProxyArgs),
}

#[derive(Args)]
struct BareProxyArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// The one upstream, `host:port` (plain HTTP/1.1).
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Args)]
struct BrokerArgs {
    /// `embedded`, `amqp://…`, `nats://…` or `kafka://…` (a throwaway namespace is added).
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// Messages to send.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Messages per publish.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Distinct keys (subjects) the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
}

#[derive(Args)]
struct IdentityArgs {
    /// Distinct tokens to verify (and lookups to make).
    #[arg(long, default_value_t = 5000)]
    n: usize,
}

#[derive(Args)]
struct BackendArgs {
    /// Addresses to listen on (one backend each); repeat the flag.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchCommand::Backend(b) => backend(b).await,
        BenchCommand::Identity(i) => identity(i).await,
        BenchCommand::Broker(b) => broker(b).await,
        BenchCommand::BareProxy(b) => bare_proxy(b),
    }
}

/// Blocks the calling thread until the workers stop.
fn bare_proxy(a: BareProxyArgs) -> anyhow::Result<()> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream: hyper::http::uri::Authority = a.upstream.to_string().parse()?;
    let mut threads = Vec::new();
    // Listening as the gateway's workers do.
    let listeners = shopmesh_gateway::server::reuseport_listeners(a.listen, a.workers)?;
    for (i, listener) in listeners.into_iter().enumerate() {
        let upstream = upstream.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("bare-{i}"))
                .spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let client: Client<_, hyper::body::Incoming> =
                            Client::builder(TokioExecutor::new()).build_http();
                        loop {
                            let (stream, _) = listener.accept().await?;
                            let _ = stream.set_nodelay(true);
                            let (client, upstream) = (client.clone(), upstream.clone());
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(
                                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                                        let (client, upstream) = (client.clone(), upstream.clone());
                                        async move {
                                            // As the gateway does: the parts, no parsing.
                                            let path = req.uri().path_and_query().cloned();
                                            *req.uri_mut() = hyper::Uri::builder()
                                                .scheme("http")
                                                .authority(upstream)
                                                .path_and_query(path.unwrap_or_else(|| {
                                                    hyper::http::uri::PathAndQuery::from_static("/")
                                                }))
                                                .build()?;
                                            anyhow::Ok(client.request(req).await?)
                                        }
                                    },
                                );
                                let _ = hyper_util::server::conn::auto::Builder::new(
                                    TokioExecutor::new(),
                                )
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            });
                        }
                    })
                })?,
        );
    }
    println!("bare proxy ready");
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}

async fn backend(a: BackendArgs) -> anyhow::Result<()> {
    let delay = Duration::from_millis(a.delay_ms);
    let app = Router::new()
        .route("/api/products/{id}", get(product))
        .route("/api/inventory/{id}", get(stock))
        .route("/api/prices/{id}", get(price))
        .route("/api/promotions", get(promotions))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(delay);
    let mut tasks = tokio::task::JoinSet::new();
    for addr in a.listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let app = app.clone();
        tasks.spawn(async move { axum::serve(listener, app).await });
    }
    println!("bench backends ready");
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Waits `d` precisely: tokio's timer rounds up to its next millisecond tick, which would
/// add up to a millisecond to every "20 ms" answer; a blocking-pool sleep does not.
async fn pause(d: Duration) {
    if !d.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
    }
}

async fn product(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({
        "id": id, "sku": "SKU-000001", "name": "Acme Sturdy Kettle",
        "description": "A sturdy kettle from Acme, in red.", "category": "kitchen",
        "attributes": {"brand": "Acme", "color": "red", "weight_g": 1200},
        "created_at": "2026-11-27T00:00:00Z"
    }))
}

async fn stock(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({"product_id": id, "on_hand": 120, "reserved": 3, "available": 117}))
}

async fn price(State(d): State<Duration>, Path(id): Path<String>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({
        "product_id": id, "amount_minor": 4999, "currency": "EUR",
        "updated_at": "2026-11-27T00:00:00Z"
    }))
}

async fn promotions(State(d): State<Duration>) -> impl IntoResponse {
    pause(d).await;
    axum::Json(json!({"items": [{
        "id": "promo-1", "name": "Kitchen week", "kind": "percent", "value": 10,
        "category": "kitchen", "active": true
    }], "total": 1, "limit": 20, "offset": 0}))
}

fn pct(mut v: Vec<std::time::Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

async fn identity(a: IdentityArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use shopmesh_gateway::config::JwtConfig;
    use shopmesh_gateway::jwt::JwtVerifier;

    // 1. Token verification at the gateway's verifier: distinct tokens (a signature check
    // each) and one token again and again (the verified-token cache).
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA", "use": "sig"}]});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let jwks_addr = listener.local_addr()?;
    tokio::spawn(async move {
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let j = jwks.clone();
                async move { axum::Json(j) }
            }),
        );
        let _ = axum::serve(listener, app).await;
    });
    let der = key.to_pkcs8_der().map_err(|e| anyhow::anyhow!("{e}"))?;
    let enc = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let tokens: Vec<String> = (0..a.n)
        .map(|i| {
            let claims = json!({"sub": format!("user-{i}"), "iss": "bench", "aud": "bench",
                "iat": now, "exp": now + 3600, "roles": ["customer"]});
            jsonwebtoken::encode(&header, &claims, &enc)
        })
        .collect::<Result<_, _>>()?;
    let verifier = JwtVerifier::new(
        JwtConfig {
            jwks_url: format!("http://{jwks_addr}/jwks"),
            issuer: "bench".into(),
            audience: "bench".into(),
            leeway_secs: 30,
            min_refetch_secs: 10,
            revocations_url: None,
            revocations_poll_ms: 2000,
            jwks_refresh_ms: 60_000,
            cache: true,
        },
        shopmesh_gateway::runtime::jwks_client(),
    );
    verifier.verify(&tokens[0]).await?;
    let t = Instant::now();
    for tok in &tokens[1..] {
        verifier.verify(tok).await?;
    }
    let distinct = (tokens.len() - 1) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..a.n {
        verifier.verify(&tokens[0]).await?;
    }
    let cached = a.n as f64 / t.elapsed().as_secs_f64();
    println!("token verification at the gateway's verifier (EdDSA, one core):");
    println!("  distinct tokens (signature checked)   {distinct:>10.0} verifications/s");
    println!("  the same token (verified-token cache) {cached:>10.0} verifications/s");

    // 2. Account lookups and consistency windows, each way, on a real shop.
    for via in [
        shopmesh_shop::UsersVia::Interface,
        shopmesh_shop::UsersVia::Database,
    ] {
        lookups(via, a.n.min(2000)).await?;
    }
    Ok(())
}

async fn lookups(via: shopmesh_shop::UsersVia, n: usize) -> anyhow::Result<()> {
    use std::time::Instant;

    use shopmesh_platform::client::RequestId;
    use shopmesh_platform::db::{Db, Storage};
    use shopmesh_shop::{ServiceName, System, SystemConfig};
    use shopmesh_users_client::Directory;

    let dir = tempfile::tempdir()?;
    let storage = Storage::Sqlite {
        data_dir: dir.path().to_owned(),
    };
    let mut cfg = SystemConfig::new(storage.clone(), dir.path());
    cfg.port = 0;
    cfg.admin_port = 0;
    cfg.seed_products = 5;
    cfg.users_via = via;
    let system = System::start(cfg).await?;
    let base = format!("http://{}", system.gateway);
    let http = reqwest::Client::new();
    let email = "bench@example.test";
    http.post(format!("{base}/api/users"))
        .json(&json!({"email": email, "password": "correct horse battery", "name": "Bench"}))
        .send()
        .await?
        .error_for_status()?;
    let tok: serde_json::Value = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await?
        .json()
        .await?;
    let token = tok["access_token"].as_str().unwrap_or_default().to_owned();
    let me: serde_json::Value = http
        .get(format!("{base}/api/users/me"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let id = me["id"].as_str().unwrap_or_default().to_owned();
    let rid = RequestId::default();
    let label = match via {
        shopmesh_shop::UsersVia::Interface => "interface",
        shopmesh_shop::UsersVia::Database => "shared database",
    };
    println!("account lookups, {label} ({n} sequential lookups):");
    match via {
        shopmesh_shop::UsersVia::Interface => {
            let users = format!("http://{}", system.service_addr(ServiceName::Users));
            let d = Directory::new(users, std::time::Duration::from_secs(60), 1000);
            let mut miss = Vec::with_capacity(n);
            let mut hit = Vec::with_capacity(n);
            for _ in 0..n {
                d.invalidate(&id, i64::MIN);
                let t = Instant::now();
                d.get(&id, &rid).await?;
                miss.push(t.elapsed());
                let t = Instant::now();
                d.get(&id, &rid).await?;
                hit.push(t.elapsed());
            }
            println!(
                "  cache miss (HTTP to the users service)  p50 {:>7.3} ms  p99 {:>7.3} ms",
                pct(miss.clone(), 50.0),
                pct(miss, 99.0)
            );
            println!(
                "  cache hit                               p50 {:>7.3} ms  p99 {:>7.3} ms",
                pct(hit.clone(), 50.0),
                pct(hit, 99.0)
            );
        }
        shopmesh_shop::UsersVia::Database => {
            let db = Db::open_read_only(
                &storage.for_service("users"),
                1,
                shopmesh_shop::DIRECTORY_READER,
            )
            .await?;
            let d = Directory::shared_database(db);
            let mut read = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                d.get(&id, &rid).await?;
                read.push(t.elapsed());
            }
            println!(
                "  read of the published view              p50 {:>7.3} ms  p99 {:>7.3} ms",
                pct(read.clone(), 50.0),
                pct(read, 99.0)
            );
        }
    }
    // The consistency window: a profile change until the orders service ships to it.
    let product = shopmesh_shop::seed::product_id("SKU-000001");
    let mut windows = Vec::new();
    for round in 0..20 {
        let city = format!("City {round}");
        http.patch(format!("{base}/api/users/me"))
            .bearer_auth(&token)
            .json(
                &json!({"addresses": [{"recipient": "B", "line1": "1 Main St", "city": city,
                "postal_code": "1000", "country": "BE"}]}),
            )
            .send()
            .await?
            .error_for_status()?;
        let t = Instant::now();
        loop {
            let o: serde_json::Value = http
                .post(format!("{base}/api/orders"))
                .bearer_auth(&token)
                .json(&json!({"items": [{"product_id": product, "quantity": 1}],
                    "card": "4242424242424242"}))
                .send()
                .await?
                .json()
                .await?;
            if o["shipping_address"]["city"] == city.as_str() {
                break;
            }
            if t.elapsed() > std::time::Duration::from_secs(10) {
                anyhow::bail!("the change was not seen within 10 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        windows.push(t.elapsed());
    }
    println!(
        "  consistency window (profile change → an order ships there) p50 {:>7.1} ms  max {:>7.1} ms",
        pct(windows.clone(), 50.0),
        pct(windows, 100.0)
    );
    system.shutdown().await;
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    sent_us: i64,
}

impl shopmesh_messaging::Event for Ping {
    const TYPE: &'static str = "bench.ping";
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

async fn broker(a: BrokerArgs) -> anyhow::Result<()> {
    use shopmesh_messaging::{BrokerUrl, Envelope};
    let dir = tempfile::tempdir()?;
    let stamp = now_us();
    let url: BrokerUrl = if a.broker == "embedded" {
        BrokerUrl::Embedded
    } else {
        let sep = if a.broker.contains('?') { '&' } else { '?' };
        format!("{}{sep}namespace=bench{stamp}&expires=300", a.broker).parse()?
    };
    let b = shopmesh_messaging::connect(&url, &dir.path().join("broker.db")).await?;
    let sub = b.subscribe("bench", &["bench"]).await?;
    // One message through first, so that the rate is the steady one (a Kafka consumer group
    // takes seconds to join).
    b.publish(
        "bench",
        &[Envelope::new(
            "bench",
            "warm-up",
            &Ping { sent_us: now_us() },
        )?],
    )
    .await?;
    let ds = sub.next(1, Duration::from_secs(30)).await?;
    if ds.is_empty() {
        anyhow::bail!("the warm-up message did not come within 30 s");
    }
    sub.ack(&ds).await?;
    let n = a.messages;
    let consumer = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let ds = sub.next(256, Duration::from_secs(10)).await?;
            if ds.is_empty() {
                anyhow::bail!("no message for 10 s after {} of {n}", lat.len());
            }
            let now = now_us();
            for d in &ds {
                let env = Envelope::from_json(&d.payload)?;
                let p: Ping = env.decode()?;
                lat.push(Duration::from_micros((now - p.sent_us).max(0) as u64));
            }
            sub.ack(&ds).await?;
        }
        anyhow::Ok(lat)
    });
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Envelope> = (sent..(sent + a.batch).min(n))
            .map(|i| {
                Envelope::new(
                    "bench",
                    &format!("k{}", i % a.keys.max(1)),
                    &Ping { sent_us: now_us() },
                )
            })
            .collect::<Result<_, _>>()?;
        b.publish("bench", &batch).await?;
        sent += batch.len();
    }
    let published = started.elapsed();
    let lat = consumer.await??;
    let total = started.elapsed();
    println!(
        "broker: {} publish {:.0} msgs/s, publish->consume {:.0} msgs/s over {n} messages ({} keys, batches of {}), latency p50={:.1}ms p99={:.1}ms",
        url.kind(),
        n as f64 / published.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        a.keys,
        a.batch,
        pct(lat.clone(), 50.0),
        pct(lat, 99.0),
    );
    Ok(())
}
