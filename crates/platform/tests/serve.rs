//! The services' serving drains without losing a request, over real sockets: answers carry
//! `Connection: close` from not-ready on while new connections are still served, HTTP/2
//! gets GOAWAY, a connection accepted before the stop is served rather than reset, in-flight
//! requests finish, idle connections close after the linger, and the server returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use shopmesh_platform::health::Readiness;
use shopmesh_platform::serve::{LINGER, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    addr: SocketAddr,
    readiness: Readiness,
    stop: CancellationToken,
    served: JoinHandle<std::io::Result<()>>,
}

/// `/fast` answers at once, `/slow` after 400 ms.
async fn start(drain: Duration) -> Running {
    let routes = Router::new()
        .route("/fast", get(|| async { "fast" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "slow"
            }),
        );
    let app = shopmesh_platform::serve::stack("test", routes, 1024);
    let server = Server::bind("test", "127.0.0.1:0".parse().unwrap(), app)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (readiness, stop) = (Readiness::new(), CancellationToken::new());
    let served = tokio::spawn(server.run_with_readiness(readiness.clone(), stop.clone(), drain));
    Running {
        addr,
        readiness,
        stop,
        served,
    }
}

/// One HTTP/1.1 exchange on `conn`: the status, the `Connection` header (lower-cased, empty
/// when absent) and the body.
async fn exchange(conn: &mut BufReader<TcpStream>, path: &str) -> (u16, String, String) {
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
    let (mut connection, mut length) = (String::new(), 0usize);
    loop {
        line.clear();
        conn.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "connection" => connection = value.trim().to_ascii_lowercase(),
            "content-length" => length = value.trim().parse().unwrap(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await.unwrap();
    (status, connection, String::from_utf8(body).unwrap())
}

async fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

/// Whether the peer has closed `conn` (end of stream) within `within`.
async fn closed(conn: &mut BufReader<TcpStream>, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, conn.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn from_not_ready_answers_close_their_connection_and_new_ones_are_still_served() {
    let s = start(Duration::from_secs(5)).await;
    let mut kept = connect(s.addr).await;
    assert_eq!(
        exchange(&mut kept, "/fast").await,
        (200, String::new(), "fast".into())
    );
    // A request under way when the process turns not-ready: its answer closes.
    let mut busy = connect(s.addr).await;
    let slow = tokio::spawn(async move {
        let answer = exchange(&mut busy, "/slow").await;
        (answer, closed(&mut busy, Duration::from_secs(2)).await)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.readiness.drain();
    assert_eq!(
        exchange(&mut kept, "/fast").await,
        (200, "close".into(), "fast".into()),
        "a kept-alive connection's next answer says close"
    );
    assert!(closed(&mut kept, Duration::from_secs(2)).await);
    let ((status, connection, _), was_closed) = slow.await.unwrap();
    assert_eq!((status, connection.as_str()), (200, "close"));
    assert!(
        was_closed,
        "the in-flight request's connection closed after it"
    );
    // The pre-stop delay: new connections are still accepted and served, once each.
    for _ in 0..3 {
        let mut fresh = connect(s.addr).await;
        assert_eq!(
            exchange(&mut fresh, "/fast").await,
            (200, "close".into(), "fast".into())
        );
        assert!(closed(&mut fresh, Duration::from_secs(2)).await);
    }
    assert!(!s.served.is_finished());
    // Nothing open: the stop returns at once, without lingering.
    let t = Instant::now();
    s.stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), s.served)
        .await
        .expect("the server returns")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < LINGER, "no connection was left to linger for");
    assert!(TcpStream::connect(s.addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn at_the_stop_an_accepted_connection_is_served_in_flight_requests_finish_idle_ones_close() {
    let s = start(Duration::from_secs(5)).await;
    // Accepted but silent until after the stop (the client had connected just before).
    let mut silent = connect(s.addr).await;
    // Idle after one request.
    let mut idle = connect(s.addr).await;
    assert_eq!(exchange(&mut idle, "/fast").await.0, 200);
    // In flight at the stop.
    let mut busy = connect(s.addr).await;
    let slow = tokio::spawn(async move { exchange(&mut busy, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    s.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(s.addr).await.is_err(), "still accepting");
    assert_eq!(
        exchange(&mut silent, "/fast").await,
        (200, "close".into(), "fast".into()),
        "a connection accepted before the stop is served within the linger"
    );
    assert_eq!(
        slow.await.unwrap(),
        (200, "close".into(), "slow".into()),
        "the in-flight request is answered"
    );
    assert!(
        closed(&mut idle, LINGER + Duration::from_secs(1)).await,
        "the idle connection is closed after the linger"
    );
    assert!(t.elapsed() >= LINGER - Duration::from_millis(50));
    tokio::time::timeout(Duration::from_secs(2), s.served)
        .await
        .expect("the server returns once every connection ended")
        .unwrap()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "well within the drain"
    );
}

#[tokio::test]
async fn the_drain_timeout_bounds_the_wait_for_a_request_that_does_not_end() {
    let routes = Router::new().route(
        "/hang",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }),
    );
    let server = Server::bind("test", "127.0.0.1:0".parse().unwrap(), routes)
        .await
        .unwrap();
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let served = tokio::spawn(server.run(stop.clone(), Duration::from_millis(1500)));
    let mut hung = connect(addr).await;
    hung.get_mut()
        .write_all(b"GET /hang HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the server returns at the drain timeout")
        .unwrap()
        .unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2500),
        "returned after {took:?}"
    );
}

#[tokio::test]
async fn http2_connections_get_goaway_from_not_ready_and_their_streams_finish() {
    let s = start(Duration::from_secs(5)).await;
    let io = TokioIo::new(TcpStream::connect(s.addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let request = |path: &str| {
        http::Request::get(format!("http://{}{path}", s.addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let res = send.send_request(request("/fast")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key(http::header::CONNECTION));
    let in_flight = send.send_request(request("/slow"));
    let in_flight = tokio::spawn(async move {
        let res = in_flight.await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.readiness.drain();
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the stream under way finishes");
    assert_eq!((status.as_u16(), &body[..]), (200, &b"slow"[..]));
    // GOAWAY: the client's connection ends (cleanly) though the server still accepts.
    tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .expect("the HTTP/2 connection was told to go")
        .unwrap()
        .expect("and ended cleanly");
    assert!(!s.served.is_finished());
    let mut fresh = connect(s.addr).await;
    assert_eq!(exchange(&mut fresh, "/fast").await.0, 200);
    s.stop.cancel();
    tokio::time::timeout(Duration::from_secs(3), s.served)
        .await
        .expect("the server returns")
        .unwrap()
        .unwrap();
}
