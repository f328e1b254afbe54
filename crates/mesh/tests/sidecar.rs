//! The sidecar over real sockets with real certificates: refusals (plain HTTP, another
//! CA, an expired certificate), the policy, certificate rotation under load, and an
//! instance killed under load.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shopmesh_mesh::ca::{Ca, leaf_paths};
use shopmesh_mesh::tls::Material;
use shopmesh_mesh::{Sidecar, SidecarConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A local service: answers with who called it (the trusted header), on which instance.
async fn backend(instance: &'static str) -> SocketAddr {
    use axum::routing::any;
    let app = axum::Router::new().fallback(any(
        move |headers: http::HeaderMap, uri: http::Uri| async move {
            let peer = headers
                .get("x-shopmesh-peer-service")
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .unwrap_or_default();
            let n = headers.get_all("x-shopmesh-peer-service").iter().count();
            let trace = headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .unwrap_or_default();
            format!("{instance} {peer} {n} {} {trace}", uri.path())
        },
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn issue(ca: &Ca, dir: &Path, service: &str) {
    ca.issue(service, Duration::from_secs(3600))
        .unwrap()
        .save(dir, service)
        .unwrap();
}

fn tls_yaml(dir: &Path, service: &str) -> String {
    let (cert, key) = leaf_paths(dir, service);
    format!(
        "tls: {{ ca_file: '{}', cert_file: '{}', key_file: '{}' }}\n",
        dir.join("ca.pem").display(),
        cert.display(),
        key.display()
    )
}

/// A sidecar for `service` with an inbound side in front of `local`.
async fn inbound_sidecar(dir: &Path, service: &str, local: SocketAddr, policy: &str) -> Sidecar {
    let yaml = format!(
        "service: {service}\ninbound: {{ listen: '127.0.0.1:0', local: 'http://{local}' }}\n{}{policy}",
        tls_yaml(dir, service)
    );
    Sidecar::start(SidecarConfig::from_yaml(&yaml).unwrap())
        .await
        .unwrap()
}

/// A sidecar for `service` with only an outbound side, towards `target`'s instances.
async fn outbound_sidecar(
    dir: &Path,
    service: &str,
    target: &str,
    instances: &[SocketAddr],
) -> (Sidecar, std::path::PathBuf) {
    let endpoints: Vec<String> = instances.iter().map(|a| format!("'https://{a}'")).collect();
    let yaml = format!(
        "service: {service}\noutbound: {{ listen: '127.0.0.1:0' }}\n{}targets:\n  - name: {target}\n    endpoints: [{}]\n    circuit_breaker: {{ consecutive_failures: 3, open_ms: 5000 }}\n",
        tls_yaml(dir, service),
        endpoints.join(", ")
    );
    let path = dir.join(format!("{service}-sidecar.yaml"));
    std::fs::write(&path, yaml).unwrap();
    (Sidecar::start_file(&path).await.unwrap(), path)
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A request from the local service to its sidecar's outbound side.
async fn call(
    c: &Client<HttpConnector, Empty<Bytes>>,
    outbound: SocketAddr,
    target: &str,
    method: http::Method,
    path: &str,
) -> Result<(u16, String, Option<String>), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{path}"))
        .header("host", target)
        .header("x-shopmesh-peer-service", "forged")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Empty::new())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ct,
    ))
}

struct Mesh {
    dir: tempfile::TempDir,
    ca: Ca,
}

fn mesh(services: &[&str]) -> Mesh {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(1).unwrap();
    ca.save(dir.path()).unwrap();
    for s in services {
        issue(&ca, dir.path(), s);
    }
    Mesh { dir, ca }
}

/// Speaks TLS to `addr` presenting `chain`/`key`, trusting the mesh CA, and sends one
/// HTTP/1.1 request; the answer's status, or why there was none.
async fn raw_mtls_get(
    addr: SocketAddr,
    ca_pem: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let material = Material {
        roots: Arc::new(roots),
        chain,
        key,
        service: "orders".into(),
    };
    let cfg = material.client_config("payments").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("payments").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get("/api/x")
        .header("host", "payments")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(res.status().as_u16())
}

fn read_chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn plain_http_to_an_inbound_sidecar_is_refused() {
    let m = mesh(&["payments"]);
    let local = backend("p1").await;
    let s = inbound_sidecar(m.dir.path(), "payments", local, "").await;
    let mut tcp = tokio::net::TcpStream::connect(s.inbound_addr.unwrap())
        .await
        .unwrap();
    tcp.write_all(b"GET /api/x HTTP/1.1\r\nHost: payments\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // And a TLS client without a certificate is refused too.
    let ca_pem = std::fs::read_to_string(m.dir.path().join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(read_chain(&ca_pem).remove(0)).unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.inbound_addr.unwrap())
        .await
        .unwrap();
    let outcome = async {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("payments").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(
            http::Request::get("/api/x")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
    }
    .await;
    assert!(outcome.is_err(), "no client certificate: {outcome:?}");
    s.shutdown();
}

#[tokio::test]
async fn a_certificate_of_another_ca_or_expired_is_refused() {
    let m = mesh(&["payments"]);
    let local = backend("p1").await;
    let s = inbound_sidecar(m.dir.path(), "payments", local, "").await;
    let addr = s.inbound_addr.unwrap();
    let ca_pem = m.ca.cert_pem.clone();
    // A genuine orders certificate: accepted (the control).
    let good = m.ca.issue("orders", Duration::from_secs(600)).unwrap();
    let status = raw_mtls_get(
        addr,
        &ca_pem,
        read_chain(&good.chain_pem),
        PrivateKeyDer::from_pem_slice(good.key_pem.as_bytes()).unwrap(),
    )
    .await;
    assert_eq!(status, Ok(200));
    // The same name from another CA.
    let other = Ca::generate(1).unwrap();
    let forged = other.issue("orders", Duration::from_secs(600)).unwrap();
    let status = raw_mtls_get(
        addr,
        &ca_pem,
        read_chain(&forged.chain_pem),
        PrivateKeyDer::from_pem_slice(forged.key_pem.as_bytes()).unwrap(),
    )
    .await;
    assert!(status.is_err(), "another CA's certificate: {status:?}");
    // Expired an hour ago.
    let old =
        m.ca.issue_at(
            "orders",
            time::OffsetDateTime::now_utc() - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
    let status = raw_mtls_get(
        addr,
        &ca_pem,
        read_chain(&old.chain_pem),
        PrivateKeyDer::from_pem_slice(old.key_pem.as_bytes()).unwrap(),
    )
    .await;
    assert!(status.is_err(), "an expired certificate: {status:?}");
    s.shutdown();
}

#[tokio::test]
async fn the_outbound_side_refuses_a_server_that_is_not_the_target() {
    // `users` answers on the address the orders sidecar believes is payments'.
    let m = mesh(&["orders", "users"]);
    let local = backend("u1").await;
    let users = inbound_sidecar(m.dir.path(), "users", local, "").await;
    let (orders, _) = outbound_sidecar(
        m.dir.path(),
        "orders",
        "payments",
        &[users.inbound_addr.unwrap()],
    )
    .await;
    let c = client();
    let (status, body, ct) = call(
        &c,
        orders.outbound_addr.unwrap(),
        "payments",
        http::Method::GET,
        "/api/x",
    )
    .await
    .unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
}

#[tokio::test]
async fn the_policy_allows_orders_and_denies_catalog() {
    let m = mesh(&["orders", "catalog", "payments"]);
    let local = backend("p1").await;
    let policy = "policy:\n  - from: orders\n    paths: [/api/payment-methods, /internal/]\n    methods: [GET, POST]\n";
    let payments = inbound_sidecar(m.dir.path(), "payments", local, policy).await;
    let addr = payments.inbound_addr.unwrap();
    let (orders, _) = outbound_sidecar(m.dir.path(), "orders", "payments", &[addr]).await;
    let (catalog, _) = outbound_sidecar(m.dir.path(), "catalog", "payments", &[addr]).await;
    let c = client();
    let ok = call(
        &c,
        orders.outbound_addr.unwrap(),
        "payments",
        http::Method::POST,
        "/api/payment-methods",
    )
    .await
    .unwrap();
    assert_eq!(ok.0, 200, "{}", ok.1);
    assert_eq!(
        ok.1,
        "p1 orders 1 /api/payment-methods 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "the verified caller, once (the forged copy is gone); the trace context carried across"
    );
    // A dot segment does not get around the policy.
    let sneaky = call(
        &c,
        orders.outbound_addr.unwrap(),
        "payments",
        http::Method::GET,
        "/api/payment-methods/../../admin",
    )
    .await
    .unwrap();
    assert_eq!(sneaky.0, 403, "{}", sneaky.1);
    let wrong_method = call(
        &c,
        orders.outbound_addr.unwrap(),
        "payments",
        http::Method::DELETE,
        "/api/payment-methods",
    )
    .await
    .unwrap();
    assert_eq!(wrong_method.0, 403);
    let denied = call(
        &c,
        catalog.outbound_addr.unwrap(),
        "payments",
        http::Method::GET,
        "/api/payment-methods",
    )
    .await
    .unwrap();
    assert_eq!(denied.0, 403, "{}", denied.1);
    assert_eq!(denied.2.as_deref(), Some("application/problem+json"));
    assert!(denied.1.contains("catalog"), "{}", denied.1);
    // Counted, with Istio's names.
    let metrics = shopmesh_platform::telemetry::render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_policy_denials_total")
                && l.contains("source_workload=\"catalog\"")
                && l.contains("destination_workload=\"payments\"")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"orders\"")
                && l.contains("response_code=\"200\"")),
        "{metrics}"
    );
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket"));
    // An unknown target is a problem, not a hang.
    let unknown = call(
        &c,
        orders.outbound_addr.unwrap(),
        "nowhere",
        http::Method::GET,
        "/x",
    )
    .await
    .unwrap();
    assert_eq!(unknown.0, 404);
}

/// `workers` tasks calling through `outbound` until `stop`; (ok, failed) counts.
fn load(
    outbound: SocketAddr,
    target: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..workers)
        .map(|_| {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    match call(&c, outbound, target, http::Method::GET, "/api/x").await {
                        Ok((200, _, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_nothing() {
    let m = mesh(&["orders", "payments"]);
    let local = backend("p1").await;
    let payments = inbound_sidecar(m.dir.path(), "payments", local, "").await;
    let (orders, _) = outbound_sidecar(
        m.dir.path(),
        "orders",
        "payments",
        &[payments.inbound_addr.unwrap()],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(orders.outbound_addr.unwrap(), "payments", 8, stop.clone());
    let first = std::fs::read(leaf_paths(m.dir.path(), "orders").0).unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        issue(&m.ca, m.dir.path(), "orders");
        issue(&m.ca, m.dir.path(), "payments");
        orders.reload().unwrap();
        payments.reload().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_ne!(
        first,
        std::fs::read(leaf_paths(m.dir.path(), "orders").0).unwrap()
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation: {ok} ok, {failed} failed");
    assert!(ok > 100, "{ok} requests only");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_watching_its_files_picks_up_a_new_certificate() {
    let m = mesh(&["orders", "payments"]);
    let local = backend("p1").await;
    let payments = inbound_sidecar(m.dir.path(), "payments", local, "").await;
    let (orders, _) = outbound_sidecar(
        m.dir.path(),
        "orders",
        "payments",
        &[payments.inbound_addr.unwrap()],
    )
    .await;
    orders.watch(Duration::from_millis(50));
    let before = shopmesh_platform::telemetry::render();
    let count = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("mesh_reloads_total") && l.contains("\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    issue(&m.ca, m.dir.path(), "orders");
    let mut reloaded = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if count(&shopmesh_platform::telemetry::render()) > count(&before) {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the file change was not picked up");
    let c = client();
    let r = call(
        &c,
        orders.outbound_addr.unwrap(),
        "payments",
        http::Method::GET,
        "/api/x",
    )
    .await
    .unwrap();
    assert_eq!(r.0, 200);
    orders.shutdown();
}

/// A service instance that can be killed abruptly: its accept loop and every one of its
/// connections end at once (sockets closed mid-request, nothing drained), as when the
/// process is killed; each request takes `delay` so that some are in flight at the kill.
struct KillableService {
    addr: SocketAddr,
    kill: tokio_util::sync::CancellationToken,
}

async fn killable_service(instance: &'static str, delay: Duration) -> KillableService {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let kill = tokio_util::sync::CancellationToken::new();
    let stop = kill.clone();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = stop.cancelled() => return,
                r = l.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(instance)),
                        ))
                    },
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    KillableService { addr, kill }
}

/// What is killed: the whole instance (its sidecar and its service, a pod or host lost),
/// or only the service process (its sidecar lives on and finds nothing on loopback).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    Instance,
    ServiceOnly,
}

/// One request of the load: when it started and ended (relative to the kill), its method,
/// and which instance answered (or why it failed).
struct Record {
    start: f64,
    end: f64,
    post: bool,
    outcome: Result<String, String>,
}

/// A request through the outbound sidecar with a small body (a POST is what a saga step
/// sends: not idempotent, so it may go elsewhere only when it surely was not delivered).
async fn call_with_body(
    c: &Client<HttpConnector, http_body_util::Full<Bytes>>,
    outbound: SocketAddr,
    target: &str,
    post: bool,
) -> Result<String, String> {
    let req = http::Request::builder()
        .method(if post {
            http::Method::POST
        } else {
            http::Method::GET
        })
        .uri(format!("http://{outbound}/api/payment-methods"))
        .header("host", target)
        .body(http_body_util::Full::new(Bytes::from_static(
            b"{\"amount\":1}",
        )))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{status} {body}"))
    }
}

/// The value of the gauge `name` for the series whose labels include all of `labels`.
fn gauge(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of the counter `name` over the series whose labels include all of `labels`.
fn counter_sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// How long after the kill the dead instance's sockets may still be being torn down (its
/// tasks end when next polled, later on a loaded machine; a killed process's kernel closes
/// them at once). Requests started later than this must all succeed: a failure then would
/// be the sidecar's, not the kill's (without the not-delivered retry, the half-open probes
/// failed POSTs at +1 s, +2 s, …).
const TEARDOWN: f64 = 0.25;

/// A caller's outbound sidecar, a target with two instances (each a service behind its own
/// inbound sidecar), steady load of GETs and POSTs, and one instance killed mid-load.
async fn kill_one_of_two_under_load(kill: Kill) {
    let (caller, target): (&str, &'static str) = match kill {
        Kill::Instance => ("orders-a", "payments-a"),
        Kill::ServiceOnly => ("orders-b", "payments-b"),
    };
    let m = mesh(&[caller, target]);
    let delay = Duration::from_millis(2);
    let s1 = killable_service("p1", delay).await;
    let s2 = killable_service("p2", delay).await;
    let p1 = inbound_sidecar(m.dir.path(), target, s1.addr, "").await;
    let p2 = inbound_sidecar(m.dir.path(), target, s2.addr, "").await;
    let p1_url = format!("https://{}", p1.inbound_addr.unwrap());
    let p2_url = format!("https://{}", p2.inbound_addr.unwrap());
    // Breaker: 3 consecutive failures open it for 1 s, then one probe; retries: the
    // gateway's defaults (1 more attempt, 20 % of requests, at least 10/s).
    let open_ms = 1000;
    let yaml = format!(
        "service: {caller}\noutbound: {{ listen: '127.0.0.1:0' }}\n{}targets:\n  - name: {target}\n    endpoints: ['{p1_url}', '{p2_url}']\n    circuit_breaker: {{ consecutive_failures: 3, open_ms: {open_ms} }}\n",
        tls_yaml(m.dir.path(), caller),
    );
    let orders = Sidecar::start(SidecarConfig::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let outbound = orders.outbound_addr.unwrap();

    let base = std::time::Instant::now();
    let records = Arc::new(std::sync::Mutex::new(Vec::<Record>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 8;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (records, stop) = (records.clone(), stop.clone());
            tokio::spawn(async move {
                let c = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let post = (w + n).is_multiple_of(2);
                    n += 1;
                    let start = base.elapsed().as_secs_f64();
                    let outcome = call_with_body(&c, outbound, target, post).await;
                    let end = base.elapsed().as_secs_f64();
                    records.lock().unwrap().push(Record {
                        start,
                        end,
                        post,
                        outcome,
                    });
                }
            })
        })
        .collect();
    // Load on both instances first (a shared machine may be slow to get going).
    let served = |who: &str| {
        records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.outcome.as_deref() == Ok(who))
            .count()
    };
    let warming = std::time::Instant::now();
    while served("p1") < 50 || served("p2") < 50 {
        assert!(
            warming.elapsed() < Duration::from_secs(30),
            "no steady load: p1 {}, p2 {}",
            served("p1"),
            served("p2")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let breaker = |text: &str| {
        gauge(
            text,
            "gateway_breaker_state",
            &[&format!("endpoint=\"{p1_url}\"")],
        )
    };
    assert_ne!(
        breaker(&shopmesh_platform::telemetry::render()),
        Some(1.0),
        "p1's breaker is open before the kill"
    );
    let killed = std::time::Instant::now();
    s1.kill.cancel();
    if kill == Kill::Instance {
        p1.shutdown();
    }
    let kill_t = killed.duration_since(base).as_secs_f64();
    // The breaker's move, watched from the metrics; the load goes on through two of its
    // half-open probes and until enough requests have started after the teardown.
    let mut opened_after = None;
    let started_after = |post: bool| {
        records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.start - kill_t > TEARDOWN && (r.post || !post))
            .count()
    };
    let mut polls = 0u32;
    loop {
        if opened_after.is_none() && breaker(&shopmesh_platform::telemetry::render()) == Some(1.0) {
            opened_after = Some(killed.elapsed().as_secs_f64());
        }
        polls += 1;
        let enough = killed.elapsed() >= Duration::from_millis(2 * open_ms + 600)
            && polls.is_multiple_of(20)
            && started_after(false) >= 300
            && started_after(true) >= 120;
        if enough || killed.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = shopmesh_platform::telemetry::render();
    let records = std::mem::take(&mut *records.lock().unwrap());
    let rel = |t: f64| t - kill_t;
    let served_by = |who: &str, r: &Record| r.outcome.as_deref() == Ok(who);
    let before: Vec<&Record> = records.iter().filter(|r| r.end < kill_t).collect();
    let (p1_before, p2_before) = (
        before.iter().filter(|r| served_by("p1", r)).count(),
        before.iter().filter(|r| served_by("p2", r)).count(),
    );
    let failed: Vec<&Record> = records.iter().filter(|r| r.outcome.is_err()).collect();
    let failed_get = failed.iter().filter(|r| !r.post).count();
    let failed_post = failed.iter().filter(|r| r.post).count();
    let after: Vec<&Record> = records.iter().filter(|r| rel(r.start) > TEARDOWN).collect();
    let last_p1 = records
        .iter()
        .filter(|r| served_by("p1", r))
        .map(|r| rel(r.end))
        .fold(f64::MIN, f64::max);
    let ms = |t: Option<f64>| t.map(|t| format!("{:.1} ms", t * 1e3));
    let latest_failed_start = ms(failed.iter().map(|r| rel(r.start)).reduce(f64::max));
    let last_failure_end = ms(failed.iter().map(|r| rel(r.end)).reduce(f64::max));
    eprintln!(
        "kill {kill:?}: {} requests ({} before the kill: p1 {p1_before}, p2 {p2_before}); \
         failed: {failed_get} GET, {failed_post} POST (latest started {latest_failed_start:?} after the kill, \
         last ended {last_failure_end:?} after); last p1 answer {:.1} ms after the kill; breaker open \
         after {:?} ms; {} requests started > {:.0} ms after the kill, all on p2: {}",
        records.len(),
        before.len(),
        last_p1 * 1e3,
        opened_after.map(|t| (t * 1e4).round() / 10.0),
        after.len(),
        TEARDOWN * 1e3,
        after.iter().all(|r| served_by("p2", r)),
    );
    for r in &failed {
        eprintln!(
            "  failed {} started {:+.1} ms: {:?}",
            if r.post { "POST" } else { "GET" },
            rel(r.start) * 1e3,
            r.outcome
        );
    }
    // Both instances carried the load before.
    assert!(
        p1_before >= 50 && p2_before >= 50,
        "p1 {p1_before}, p2 {p2_before}"
    );
    // A GET is retried on the survivor whatever happened to it: none fails.
    assert_eq!(failed_get, 0, "GETs failed");
    // Only POSTs already in flight on the killed instance may fail (at most one per worker),
    // and only those: none that started after the dead instance's teardown.
    assert!(failed_post <= workers, "{failed_post} POSTs failed");
    assert!(
        failed.iter().all(|r| rel(r.start) <= TEARDOWN),
        "a request started after the kill failed"
    );
    // After that bound every request succeeds, on the survivor, through the breaker's
    // half-open probes (a probe that finds p1 dead is sent on to p2).
    assert!(
        after.len() >= 300,
        "{} requests only after the kill",
        after.len()
    );
    assert!(
        after.iter().all(|r| served_by("p2", r)),
        "a request after the kill was not answered by p2"
    );
    assert!(
        after.iter().filter(|r| r.post).count() >= 120,
        "POSTs were sent after the kill"
    );
    // The breaker shows the move: open within the bound, and still open at the end (each
    // probe failed), never closed again.
    let opened_after = opened_after.expect("p1's breaker never opened");
    assert!(
        opened_after < open_ms as f64 / 1000.0,
        "the breaker opened {opened_after} s after the kill"
    );
    assert_eq!(breaker(&metrics), Some(1.0), "p1's breaker at the end");
    assert_ne!(
        gauge(
            &metrics,
            "gateway_breaker_state",
            &[&format!("endpoint=\"{p2_url}\"")]
        ),
        Some(1.0),
        "p2's breaker opened"
    );
    // The caller's sidecar counted what the callers saw.
    let src = format!("source_workload=\"{caller}\"");
    let dst = format!("destination_workload=\"{target}\"");
    let labels = ["reporter=\"source\"", src.as_str(), dst.as_str()];
    let ok_counted = counter_sum(
        &metrics,
        "istio_requests_total",
        &[&labels[..], &["response_code=\"200\""]].concat(),
    );
    let all_counted = counter_sum(&metrics, "istio_requests_total", &labels);
    let ok = records.iter().filter(|r| r.outcome.is_ok()).count() as u64;
    assert_eq!(ok_counted, ok, "200s counted");
    assert_eq!(
        all_counted - ok_counted,
        failed.len() as u64,
        "failures counted"
    );
    orders.shutdown();
    p2.shutdown();
    p1.shutdown();
    s2.kill.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_instances_under_load_moves_to_the_other() {
    kill_one_of_two_under_load(Kill::Instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_service_behind_one_of_two_sidecars_under_load_moves_to_the_other() {
    kill_one_of_two_under_load(Kill::ServiceOnly).await;
}
