//! What the gateway carries and what it refuses, over real sockets: HTTP/2 and HTTP/1.1
//! over TLS (ALPN, a certificate renewed by reload), h2c, gRPC-style trailers through an
//! HTTP/2 upstream, WebSocket upgrades, a large streamed upload in bounded memory, and the
//! limits against abuse (slow-loris, idle and oversized-header clients, smuggling, body
//! size, the connection cap).

mod harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use harness::{Gw, Upstream, proxy_config};
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

/// TLS from `cert.pem` and `cert.key` next to the configuration file.
const TLS: &str = "tls: { cert_file: cert.pem, key_file: cert.key }\n";

/// Puts test certificate `leaf` where [`TLS`] points, as a renewal would (write, rename).
fn install_certificate(dir: &std::path::Path, leaf: &str) {
    for ext in ["pem", "key"] {
        let tmp = dir.join(format!("new.{ext}"));
        std::fs::copy(fixture(&format!("{leaf}.{ext}")), &tmp).unwrap();
        std::fs::rename(tmp, dir.join(format!("cert.{ext}"))).unwrap();
    }
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
    let dir = tempfile::tempdir().unwrap();
    install_certificate(dir.path(), "leaf1");
    let gw = Gw::start_in(dir, &format!("{TLS}{}", proxy_config(&up))).await;
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

    // A certificate renewed in place (the configuration unchanged): new connections get
    // it; the open HTTP/2 connection keeps working.
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
    install_certificate(gw.dir.path(), "leaf2");
    gw.wait_version(v + 1).await;
    assert_eq!(presented(&tls_connect(addr, &[b"h2"]).await), leaf("leaf2"));
    let req = http::Request::get("https://localhost/still")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);

    // A certificate file that is gone is refused; the current one keeps serving. So is a
    // reload that would serve this port in the clear.
    for (yaml, why) in [
        (
            format!(
                "tls: {{ cert_file: nonexistent.pem, key_file: cert.key }}\n{}",
                proxy_config(&up)
            ),
            "nonexistent",
        ),
        (proxy_config(&up), "restart"),
    ] {
        gw.rewrite(&yaml);
        let mut status = serde_json::Value::Null;
        for _ in 0..100 {
            status = gw.admin_json("/config").await;
            if status["status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(why))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            status["status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(why)),
            "{status}"
        );
        assert_eq!(gw.version().await, v + 1);
        assert_eq!(presented(&tls_connect(addr, &[b"h2"]).await), leaf("leaf2"));
    }
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

/// An upstream that switches to whatever protocol it is asked for (or `h2c` unasked) and
/// records every request head it reads.
async fn yes_to_any_upgrade() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let proto = head
                    .lines()
                    .find_map(|l| l.strip_prefix("upgrade: "))
                    .unwrap_or("h2c")
                    .to_owned();
                seen.lock().unwrap().push(head);
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {proto}\r\n\r\n")
                            .as_bytes(),
                    )
                    .await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    (format!("http://{addr}"), heads)
}

#[tokio::test]
async fn a_websocket_echoes_through_the_gateway_and_auth_still_applies() {
    use tokio_tungstenite::tungstenite::Message;
    let url = websocket_echo_upstream().await;
    let plain = Upstream::start("plain").await;
    let (yes, heads) = yes_to_any_upgrade().await;
    let gw = Gw::start(&format!(
        r#"
api_keys:
  keys: [{{ name: k, sha256: "{}" }}]
limits: {{ websocket_idle_timeout_ms: 1000 }}
clusters:
  - {{ name: ws, endpoints: ["{url}"] }}
  - {{ name: http, endpoints: ["{http}"] }}
  - {{ name: yes, endpoints: ["{yes}"] }}
routes:
  - {{ name: yes, match: {{ prefix: /yes }}, cluster: yes, websocket: true }}
  - {{ name: private, match: {{ prefix: /private }}, cluster: ws, auth: {{ required: true }}, websocket: true }}
  - {{ name: ws, match: {{ prefix: /ws }}, cluster: ws, websocket: true }}
  - {{ name: plain, match: {{ prefix: / }}, cluster: http }}
"#,
        harness::sha256_hex("secret"),
        http = plain.url(),
        yes = yes,
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

    // A route that does not allow WebSockets forwards the request as a plain GET.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{addr}/other"), tcp)
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => assert_eq!(res.status(), 200),
        e => panic!("expected a plain answer, got {e}"),
    }
    // Other upgrades (h2c, with its settings) are never passed on, even where WebSockets
    // are allowed.
    for request in [
        &b"GET /yes/1 HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAA\r\n\r\n"[..],
        &b"GET /yes/2 HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAA\r\n\r\n"[..],
        &b"POST /yes/3 HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\n\r\n"[..],
    ] {
        let res = raw(addr, request, Duration::from_secs(1)).await;
        // The upstream's unasked switch is refused.
        assert!(res.starts_with("HTTP/1.1 502"), "{res}");
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3);
    for head in heads {
        assert!(
            !head.contains("upgrade") && !head.contains("http2-settings"),
            "an upgrade reached the upstream: {head}"
        );
    }

    // A WebSocket with nothing moving is closed after the idle timeout.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws/idle"), tcp)
        .await
        .unwrap();
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the idle WebSocket is still open: {end:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
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
    // One answer only, whatever the connection carried.
    let one_answer = |request: &'static [u8]| async move {
        let res = raw(addr, request, Duration::from_secs(3)).await;
        assert_eq!(
            res.matches("HTTP/1.1 ").count(),
            1,
            "one answer only: {res}"
        );
        res
    };
    let res = one_answer(
        b"POST /cl-te HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(res.contains("connection: close"), "{res}");
    // TE.CL: the other order, and an obfuscated encoding, which is refused.
    one_answer(
        b"POST /te-cl HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
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
    let ws_url = websocket_echo_upstream().await;
    let gw = Gw::start(&format!(
        r#"
workers: 1
limits: {{ max_connections: 2, header_read_timeout_ms: 30000 }}
clusters:
  - {{ name: up, endpoints: ["{}"] }}
  - {{ name: ws, endpoints: ["{ws_url}"] }}
routes:
  - {{ name: ws, match: {{ prefix: /ws }}, cluster: ws, websocket: true }}
  - {{ name: all, match: {{ prefix: / }}, cluster: up }}
"#,
        up.url()
    ))
    .await;
    let addr = addr_of(&gw);
    let request = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n";
    // One slot: a kept-alive connection. The other: an open WebSocket.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(request).await.unwrap();
    let mut b = [0u8; 12];
    kept.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"HTTP/1.1 200");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
        .await
        .unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut b = [0u8; 12];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut b))
            .await
            .is_err(),
        "a third connection was served beyond the cap of 2"
    );
    // Closing the WebSocket frees its slot.
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut b))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(&b, b"HTTP/1.1 200");
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_client_gets_no_more_streams_than_the_limit() {
    // An upstream that counts the requests it holds at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let (n, p) = (now.clone(), peak.clone());
    let app = axum::Router::new().fallback(move || {
        let (n, p) = (n.clone(), p.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            p.fetch_max(n.fetch_add(1, SeqCst) + 1, SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            n.fetch_sub(1, SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = Gw::start(&format!(
        r#"
limits: {{ max_concurrent_streams: 2 }}
clusters:
  - {{ name: slow, endpoints: ["http://{addr}"] }}
routes:
  - {{ name: all, match: {{ prefix: / }}, cluster: slow }}
"#
    ))
    .await;
    let tcp = TcpStream::connect(addr_of(&gw)).await.unwrap();
    let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let gw_addr = addr_of(&gw);
    let get = |mut h2: hyper::client::conn::http2::SendRequest<Empty<Bytes>>, i: usize| async move {
        h2.ready().await.unwrap();
        let req = http::Request::get(format!("http://{gw_addr}/s/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        h2.send_request(req).await.unwrap().status()
    };
    // One exchange first: the client then knows the server's SETTINGS.
    assert_eq!(get(h2.clone(), 0).await, 200);
    peak.store(0, std::sync::atomic::Ordering::SeqCst);
    let t = Instant::now();
    let statuses = futures::future::join_all((1..=6).map(|i| get(h2.clone(), i))).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "requests of one connection upstream at once"
    );
    // Six requests, two at a time, 150 ms each.
    assert!(
        t.elapsed() >= Duration::from_millis(440),
        "{:?}",
        t.elapsed()
    );
    gw.stop().await;
}
