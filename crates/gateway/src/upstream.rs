//! HTTP/1 connections to one endpoint, kept per worker thread: a request (proxied, or a
//! composite's part call) takes an idle connection of its own worker (no lock another
//! worker contends for, no endpoint key hashed per request, as a shared client pool does),
//! is sent over it, and the connection goes back once the answer has been read to its end
//! ([`KeepAtEnd`]).
//!
//! A kept connection the endpoint has closed meanwhile is found out when it is taken
//! (closed, or not ready) or when the request fails on it. The request then goes once more
//! over a new connection when it was never written (as hyper-util's pool retries), or when
//! the connection ended before any answer and the caller can build the request again (an
//! idempotent request without a body: the endpoint closing a kept connection just as the
//! request went out). Any other failure is the caller's to count and retry.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, Uri, header};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::wire::Body;
use crate::worker::{MAX_WORKERS, worker_index};

/// How connections to a cluster's endpoints are kept.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// An idle connection older than this is closed rather than used.
    pub idle: Duration,
    /// Idle connections kept per endpoint and worker.
    pub max_idle: usize,
}

#[derive(Debug)]
struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

/// One endpoint's idle connections, one list per worker thread (index 0: the main runtime).
#[derive(Debug)]
pub struct Kept {
    /// Where new connections go (`http://host:port`).
    target: Uri,
    /// The `Host` a request without one is given: the host, and the port unless it is 80
    /// (never the authority's user information).
    host: Option<HeaderValue>,
    per_worker: [Mutex<Vec<Idle>>; MAX_WORKERS + 1],
}

/// Why a call got no answer.
#[derive(Debug)]
pub enum Error {
    /// No connection could be made in time.
    Connect,
    /// The connection failed while the request was out (or its body failed).
    Request(hyper::Error),
}

/// A connection that carried a request; [`Conn::keep`] gives it back once its answer has
/// been read whole (dropped otherwise, which closes it).
pub struct Conn {
    tx: SendRequest<Body>,
}

impl Kept {
    pub fn new(authority: &http::uri::Authority) -> Self {
        let host = match authority.port_u16() {
            Some(port) if port != 80 => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        Self {
            target: Uri::builder()
                .scheme("http")
                .authority(host.as_str())
                .path_and_query("/")
                .build()
                .unwrap_or_default(),
            host: HeaderValue::from_str(&host).ok(),
            per_worker: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
    }

    fn list(&self) -> &Mutex<Vec<Idle>> {
        &self.per_worker[worker_index().min(MAX_WORKERS)]
    }

    /// Sends `req` (origin-form; given this endpoint's `Host` when it has none) over a
    /// kept connection of this worker, or a new one made by `connector`. `again` builds the
    /// request once more if a kept connection ends under it before any answer (`None`: it
    /// cannot be).
    pub async fn send(
        &self,
        connector: &HttpConnector,
        s: &Settings,
        req: Request<Body>,
        again: impl FnOnce() -> Option<Request<Body>>,
    ) -> Result<(Response<Incoming>, Conn), Error> {
        let with_host = |mut req: Request<Body>| {
            if !req.headers().contains_key(header::HOST)
                && let Some(v) = &self.host
            {
                req.headers_mut().insert(header::HOST, v.clone());
            }
            req
        };
        let mut req = with_host(req);
        if let Some(mut tx) = self.take(s) {
            match tx.try_send_request(req).await {
                Ok(res) => return Ok((res, Conn { tx })),
                Err(mut e) => {
                    let again = if e.error().is_incomplete_message() {
                        Some(again)
                    } else {
                        None
                    };
                    match e.take_message().or_else(|| again.and_then(|a| a())) {
                        Some(r) => req = with_host(r),
                        None => return Err(Error::Request(e.into_error())),
                    }
                }
            }
        }
        let mut tx = self.connect(connector).await?;
        match tx.send_request(req).await {
            Ok(res) => Ok((res, Conn { tx })),
            Err(e) => Err(Error::Request(e)),
        }
    }

    /// This worker's most recently kept connection that is ready now. Never waits: one
    /// not ready yet (its connection has not yet seen the last answer off, or is still
    /// sending a request body the endpoint answered before reading) stays for later, until
    /// it is ready, closed, or idle too long.
    fn take(&self, s: &Settings) -> Option<SendRequest<Body>> {
        let mut list = self.list().lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        list.retain(|c| now.duration_since(c.since) < s.idle && !c.tx.is_closed());
        let i = list.iter().rposition(|c| c.tx.is_ready())?;
        Some(list.remove(i).tx)
    }

    /// Keeps `conn` for the next call on this worker (closes it when enough are kept).
    pub fn keep(&self, conn: Conn, s: &Settings) {
        if conn.tx.is_closed() {
            return;
        }
        let mut list = self.list().lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < s.max_idle {
            list.push(Idle {
                tx: conn.tx,
                since: Instant::now(),
            });
        }
    }
}

impl Kept {
    /// A new connection, made as the cluster's pooled client makes them (its connect
    /// timeout, both address families tried, no delay), driven by this worker's runtime.
    async fn connect(&self, connector: &HttpConnector) -> Result<SendRequest<Body>, Error> {
        let io = connector
            .clone()
            .call(self.target.clone())
            .await
            .map_err(|_| Error::Connect)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| Error::Connect)?;
        // A WebSocket's answer hands the connection over to its tunnel.
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(tx)
    }
}

/// An answer's body that gives its connection back to `kept` once read to its end (a body
/// dropped before that closes the connection with it).
pub struct KeepAtEnd {
    body: Incoming,
    give_back: Option<(Conn, Arc<Kept>, Settings)>,
}

impl KeepAtEnd {
    pub fn new(body: Incoming, conn: Conn, kept: Arc<Kept>, s: Settings) -> Self {
        let mut this = Self {
            body,
            give_back: Some((conn, kept, s)),
        };
        if this.body.is_end_stream() {
            this.done();
        }
        this
    }

    fn done(&mut self) {
        if let Some((conn, kept, s)) = self.give_back.take() {
            kept.keep(conn, &s);
        }
    }
}

impl http_body::Body for KeepAtEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done(),
            // After its trailers a body is over, whatever it says (a server does not poll
            // further).
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || self.body.is_end_stream() => {
                self.done()
            }
            // A failed body: its connection goes with it.
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::wire::empty;

    /// A backend that counts the connections it accepts; `keep_alive: false` closes each
    /// connection after its answer, as an endpoint that drops idle connections does.
    async fn backend(keep_alive: bool) -> (http::uri::Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let host = req.headers().get(header::HOST).cloned();
                        let body = format!("{} {:?}", req.uri(), host);
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn settings(idle_ms: u64, max_idle: usize) -> Settings {
        Settings {
            idle: Duration::from_millis(idle_ms),
            max_idle,
        }
    }

    fn connector() -> HttpConnector {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(Duration::from_secs(1)));
        c
    }

    async fn call(kept: &Kept, s: &Settings) -> String {
        let build = || {
            let mut req = Request::new(empty());
            *req.uri_mut() = "/p?x=1".parse().unwrap();
            req
        };
        let (res, conn) = kept
            .send(&connector(), s, build(), || Some(build()))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        kept.keep(conn, s);
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_kept_and_reused_with_origin_form_and_host() {
        let (authority, accepted) = backend(true).await;
        let kept = Kept::new(&authority);
        let s = settings(60_000, 4);
        for _ in 0..5 {
            let answer = call(&kept, &s).await;
            assert_eq!(answer, format!("/p?x=1 Some({:?})", authority.as_str()));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for five calls"
        );
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_replaced_without_a_failure() {
        let (authority, accepted) = backend(false).await;
        let kept = Kept::new(&authority);
        let s = settings(60_000, 4);
        for _ in 0..5 {
            call(&kept, &s).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            5,
            "each call on a new connection"
        );
    }

    #[tokio::test]
    async fn a_kept_connection_that_fails_under_the_request_is_retried_on_a_new_one() {
        // Each connection answers its first request and closes, unanswered, on its second:
        // the client learns only by sending that its kept connection is gone.
        let (authority, accepted) =
            scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"").await;
        let kept = Kept::new(&authority);
        let s = settings(60_000, 4);
        for _ in 0..3 {
            assert_eq!(call(&kept, &s).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_bounded() {
        let (authority, accepted) = backend(true).await;
        let kept = Kept::new(&authority);
        let s = settings(100, 4);
        call(&kept, &s).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        call(&kept, &s).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "an expired connection is not used"
        );

        // Three calls at once need three connections; only two are kept.
        let s = settings(60_000, 2);
        let (authority, accepted) = backend(true).await;
        let kept = Kept::new(&authority);
        let build = || {
            let mut req = Request::new(empty());
            *req.uri_mut() = "/p".parse().unwrap();
            req
        };
        let c = connector();
        let (a, b, c) = tokio::join!(
            kept.send(&c, &s, build(), || None),
            kept.send(&c, &s, build(), || None),
            kept.send(&c, &s, build(), || None)
        );
        for (res, conn) in [a.unwrap(), b.unwrap(), c.unwrap()] {
            res.into_body().collect().await.unwrap();
            kept.keep(conn, &s);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(kept.list().lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_streamed_answer_gives_its_connection_back_only_at_its_end() {
        let (authority, accepted) = backend(true).await;
        let kept = Arc::new(Kept::new(&authority));
        let s = settings(60_000, 4);
        let get = || {
            let mut req = Request::new(empty());
            *req.uri_mut() = "/p".parse().unwrap();
            req
        };
        let kept_now = || kept.list().lock().unwrap().len();
        // Read to its end: kept, and the next request uses it.
        for _ in 0..3 {
            let (res, conn) = kept.send(&connector(), &s, get(), || None).await.unwrap();
            let body = KeepAtEnd::new(res.into_body(), conn, kept.clone(), s);
            assert_eq!(kept_now(), 0, "not before the answer is read");
            body.collect().await.unwrap();
            assert_eq!(kept_now(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Dropped unread: closed with it, and the next request needs a new connection.
        let (res, conn) = kept.send(&connector(), &s, get(), || None).await.unwrap();
        drop(KeepAtEnd::new(res.into_body(), conn, kept.clone(), s));
        assert_eq!(kept_now(), 0);
        let (res, conn) = kept.send(&connector(), &s, get(), || None).await.unwrap();
        KeepAtEnd::new(res.into_body(), conn, kept.clone(), s)
            .collect()
            .await
            .unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_still_sending_a_body_is_not_waited_for() {
        // The endpoint answers as soon as it has the request's head, and never reads the
        // body, which never ends: the connection is kept, but never ready again.
        let (authority, accepted) =
            scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"").await;
        struct Endless;
        impl http_body::Body for Endless {
            type Data = Bytes;
            type Error = crate::wire::BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Poll::Pending
            }
        }
        let kept = Kept::new(&authority);
        let s = settings(60_000, 4);
        let mut post = Request::new(Endless.boxed());
        *post.method_mut() = http::Method::POST;
        *post.uri_mut() = "/slow".parse().unwrap();
        let (res, conn) = kept.send(&connector(), &s, post, || None).await.unwrap();
        res.into_body().collect().await.unwrap();
        kept.keep(conn, &s);
        let next = tokio::time::timeout(
            Duration::from_secs(2),
            kept.send(&connector(), &s, Request::new(empty()), || None),
        )
        .await
        .expect("the next request is not held up by the busy connection");
        next.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_host_is_the_authority_without_user_information_or_port_80() {
        let host = |a: &str| Kept::new(&a.parse().unwrap()).host.unwrap();
        assert_eq!(host("user:secret@svc:80"), "svc");
        assert_eq!(host("svc"), "svc");
        assert_eq!(host("svc:8080"), "svc:8080");
        assert_eq!(host("[::1]:9000"), "[::1]:9000");
    }

    /// A server that answers each connection's first request with `first` and its second
    /// with `second` (then closes).
    async fn scripted(
        first: &'static [u8],
        second: &'static [u8],
    ) -> (http::uri::Authority, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    for answer in [first, second] {
                        let _ = stream.read(&mut buf).await;
                        let _ = stream.write_all(answer).await;
                    }
                });
            }
        });
        (authority, accepted)
    }

    #[tokio::test]
    async fn a_kept_connection_that_answers_nonsense_is_not_asked_again() {
        let (authority, accepted) = scripted(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"NONSENSE\r\n\r\n",
        )
        .await;
        let kept = Kept::new(&authority);
        let s = settings(60_000, 4);
        assert_eq!(call(&kept, &s).await, "ok");
        let again = || Some(Request::new(empty()));
        let r = kept
            .send(&connector(), &s, Request::new(empty()), again)
            .await;
        assert!(
            matches!(r, Err(Error::Request(_))),
            "the endpoint's error is the caller's"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "not sent again by the pool"
        );
    }

    #[tokio::test]
    async fn an_answer_with_trailers_gives_its_connection_back_at_them() {
        let (authority, _) = scripted(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n",
            b"",
        )
        .await;
        let kept = Arc::new(Kept::new(&authority));
        let s = settings(60_000, 4);
        let mut req = Request::new(empty());
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
        let (res, conn) = kept.send(&connector(), &s, req, || None).await.unwrap();
        let mut body = KeepAtEnd::new(res.into_body(), conn, kept.clone(), s);
        // Read as a server relays it: up to the trailers, and no further.
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            if frame.is_trailers() {
                break;
            }
        }
        assert_eq!(kept.list().lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: http::uri::Authority =
            listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let kept = Kept::new(&authority);
        let r = kept
            .send(
                &connector(),
                &settings(1000, 1),
                Request::new(empty()),
                || None,
            )
            .await;
        assert!(matches!(r, Err(Error::Connect)));
    }
}
