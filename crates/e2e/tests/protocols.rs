//! What the gateway carries and what it refuses, over real sockets: HTTP/2 and HTTP/1.1
//! over TLS (ALPN, a certificate renewed by reload), h2c, gRPC-style trailers through an
//! HTTP/2 upstream, WebSocket upgrades, a large streamed upload in bounded memory, and the
//! limits against abuse (slow-loris, idle and oversized-header clients, smuggling, body
//! size, the connection cap).

mod harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use harness::{Gw, Upstream};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn addr_of(gw: &Gw) -> SocketAddr {
    gw.base.trim_start_matches("http://").parse().unwrap()
}

fn tls_config(leaf: &str) -> String {
    format!(
        "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        fixture(&format!("{leaf}.pem")),
        fixture(&format!("{leaf}.key"))
    )
}

fn proxy_config(up: &Upstream) -> String {
    format!(
        r#"
clusters:
  - {{ name: up, endpoints: ["{}"] }}
routes:
  - {{ name: all, match: {{ prefix: / }}, cluster: up }}
"#,
        up.url()
    )
}

/// A TLS client trusting only the test CA, offering `alpn`.
fn tls_connector(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls_connector(alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake succeeds against the test CA")
}

async fn json_of(res: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn tls_with_alpn_serves_http2_and_http1_and_renews_its_certificate_on_reload() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&format!("{}{}", tls_config("leaf1"), proxy_config(&up))).await;
    let addr = addr_of(&gw);

    // HTTP/2 over TLS.
    let tls = tls_connect(addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("https://localhost/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = h2.send_request(req).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), 200);
        let body = json_of(res).await;
        assert_eq!(body["path"], format!("/h2/{i}"));
        assert_eq!(
            body["proto"], "https",
            "the upstream learns the client used TLS"
        );
    }

    // HTTP/1.1 over TLS.
    let tls = tls_connect(addr, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/h1")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = h1.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_11);
    assert_eq!(json_of(res).await["path"], "/h1");

    // Plain HTTP on a TLS listener gets nowhere.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // A renewed certificate: new connections get it after the reload; the open HTTP/2
    // connection keeps working.
    let presented = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let leaf = |n: &str| {
        CertificateDer::from_pem_file(fixture(&format!("{n}.pem")))
            .unwrap()
            .to_vec()
    };
    assert_eq!(presented(&tls_connect(addr, &[b"h2"]).await), leaf("leaf1"));
    let v = gw.version().await;
    gw.rewrite(&format!("{}{}", tls_config("leaf2"), proxy_config(&up)));
    gw.wait_version(v + 1).await;
    assert_eq!(presented(&tls_connect(addr, &[b"h2"]).await), leaf("leaf2"));
    let req = http::Request::get("https://localhost/still")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);

    // A certificate file that is gone is refused; the current one keeps serving.
    gw.rewrite(&format!(
        "tls: {{ cert_file: \"/nonexistent.pem\", key_file: \"{}\" }}\n{}",
        fixture("leaf2.key"),
        proxy_config(&up)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.version().await, v + 1);
    let status = gw.admin_json("/config").await;
    assert!(
        status["status"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("nonexistent")),
        "{status}"
    );
    assert_eq!(presented(&tls_connect(addr, &[b"h2"]).await), leaf("leaf2"));
    gw.stop().await;
}

/// An HTTP/2 (h2c) upstream answering like a gRPC server: it echoes the request body and
/// ends with `grpc-status` trailers. It records the `te` header it got.
async fn grpc_like_upstream() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let te_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let te = te_seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let te = te.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let te = te.clone();
                        async move {
                            assert_eq!(req.version(), http::Version::HTTP_2);
                            te.lock().unwrap().push(
                                req.headers()
                                    .get("te")
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default(),
                            );
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            trailers.insert("grpc-message", path.parse().unwrap());
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(Frame::data(body)),
                                Ok(Frame::trailers(trailers)),
                            ];
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(futures::stream::iter(frames)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), te_seen)
}

#[tokio::test]
async fn grpc_passes_through_an_h2c_upstream_with_its_trailers() {
    let (url, te_seen) = grpc_like_upstream().await;
    let gw = Gw::start(&format!(
        r#"
clusters:
  - {{ name: grpc, endpoints: ["{url}"], protocol: h2c }}
routes:
  - {{ name: grpc, match: {{ prefix: /shop.Orders/ }}, cluster: grpc }}
"#
    ))
    .await;
    // The client speaks h2c (prior knowledge) to the gateway, as gRPC clients do.
    let tcp = TcpStream::connect(addr_of(&gw)).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A gRPC message: compressed flag, 4-byte length, payload.
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let mut streams = Vec::new();
    for _ in 0..10 {
        let req = http::Request::post(format!("http://{}/shop.Orders/Place", addr_of(&gw)))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(message.clone()))
            .unwrap();
        streams.push(h2.send_request(req));
    }
    for s in futures::future::join_all(streams).await {
        let res = s.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("the trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "/shop.Orders/Place");
        assert_eq!(collected.to_bytes(), message);
    }
    assert!(
        te_seen.lock().unwrap().iter().all(|t| t == "trailers"),
        "`te: trailers` reaches the upstream: {:?}",
        te_seen.lock().unwrap()
    );
    gw.stop().await;
}

async fn websocket_echo_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_websocket_echoes_through_the_gateway_and_auth_still_applies() {
    use tokio_tungstenite::tungstenite::Message;
    let url = websocket_echo_upstream().await;
    let gw = Gw::start(&format!(
        r#"
api_keys:
  keys: [{{ name: k, sha256: "{}" }}]
clusters:
  - {{ name: ws, endpoints: ["{url}"] }}
routes:
  - {{ name: private, match: {{ prefix: /private }}, cluster: ws, auth: {{ required: true }} }}
  - {{ name: ws, match: {{ prefix: /ws }}, cluster: ws }}
"#,
        harness::sha256_hex("secret")
    ))
    .await;
    let addr = addr_of(&gw);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, res) = tokio_tungstenite::client_async(format!("ws://{addr}/ws/echo"), tcp)
        .await
        .expect("the upgrade passes through");
    assert_eq!(res.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().to_vec(), big);
    ws.close(None).await.unwrap();

    // The route's authentication applies to upgrades too.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{addr}/private/echo"), tcp)
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => assert_eq!(res.status(), 401),
        e => panic!("expected a 401 answer, got {e}"),
    }
    gw.stop().await;
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_large_upload_streams_through_in_bounded_memory() {
    // An upstream that counts what it receives and keeps none of it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let mut stream = req.into_body().into_data_stream();
        let mut n: u64 = 0;
        while let Some(chunk) = stream.next().await {
            n += chunk.unwrap().len() as u64;
        }
        n.to_string()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = Gw::start(&format!(
        r#"
clusters:
  - {{ name: store, endpoints: ["http://{addr}"] }}
routes:
  - {{ name: upload, match: {{ prefix: /upload }}, cluster: store, max_body_bytes: 4294967296, timeout_ms: 300000 }}
  - {{ name: small, match: {{ prefix: / }}, cluster: store, max_body_bytes: 10 }}
"#
    ))
    .await;
    // Another route keeps its own, small, limit.
    let res = gw
        .http
        .post(format!("{}/form", gw.base))
        .body("12345678901")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    const TOTAL: u64 = 1024 * 1024 * 1024;
    let chunk = Bytes::from(vec![0x5a; 1024 * 1024]);
    let chunks = (TOTAL / chunk.len() as u64) as usize;
    let before = rss();
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let stream =
        futures::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let t = Instant::now();
    let res = gw
        .http
        .post(format!("{}/upload", gw.base))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), TOTAL.to_string());
    sampler.abort();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "1 GiB streamed in {:?}; resident memory grew by {} MiB at most",
        t.elapsed(),
        grew / (1024 * 1024)
    );
    // Streamed, the growth is a few MiB (the allocator sometimes keeps ~100 MiB of
    // freed buffers); held whole, it would be the full GiB.
    assert!(
        grew < 256 * 1024 * 1024,
        "memory grew by {grew} bytes while streaming {TOTAL}"
    );
    gw.stop().await;
}

/// Sends `request` raw and reads what comes back until the gateway closes the connection
/// or `wait` passes.
async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn abusive_clients_are_refused_or_cut() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&format!(
        "limits: {{ header_read_timeout_ms: 1000, max_headers: 50, max_header_bytes: 16384, max_connections: 64 }}\n{}",
        proxy_config(&up)
    ))
    .await;
    let addr = addr_of(&gw);

    // Smuggling, CL.TE: a request that declares both lengths is read one way only
    // (chunked, RFC 9112 §6.3), re-framed before it goes upstream, and its connection is
    // closed after the answer, so the bytes hidden behind its body are never read as a
    // request.
    let res = raw(
        addr,
        b"POST /cl-te HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        res.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {res}"
    );
    assert!(res.contains("connection: close"), "{res}");
    // TE.CL: the other order, and an obfuscated encoding, which is refused.
    let res = raw(
        addr,
        b"POST /te-cl HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        res.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {res}"
    );
    let res = raw(
        addr,
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    // Two different lengths.
    let res = raw(
        addr,
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        Duration::from_secs(3),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert!(
        !up.paths().iter().any(|p| p == "/smuggled" || p == "/x"),
        "nothing smuggled or refused reached the upstream: {:?}",
        up.paths()
    );

    // Oversized heads: one huge header, or too many.
    let huge = format!(
        "GET /x HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let res = raw(addr, huge.as_bytes(), Duration::from_secs(3)).await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");
    let mut many = String::from("GET /x HTTP/1.1\r\nhost: x\r\n");
    for i in 0..60 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let res = raw(addr, many.as_bytes(), Duration::from_secs(3)).await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");

    // Slow-loris: a head trickled one byte at a time is cut at the header timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut cut = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"x").await.is_err() {
            cut = true;
            break;
        }
        let mut b = [0u8; 256];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "a slow-loris client was still connected after 4 s");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );

    // Idle: a kept-alive connection with no next request is closed after the timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "an idle connection was kept for 5 s");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_connection_cap_holds_further_clients_until_a_slot_frees() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&format!(
        "workers: 1\nlimits: {{ max_connections: 2, header_read_timeout_ms: 30000 }}\n{}",
        proxy_config(&up)
    ))
    .await;
    let addr = addr_of(&gw);
    let request = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut b = [0u8; 12];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut b = [0u8; 12];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut b))
            .await
            .is_err(),
        "a third connection was served beyond the cap of 2"
    );
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut b))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(&b, b"HTTP/1.1 200");
    gw.stop().await;
}
