use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

#[derive(Clone, Default)]
struct Fake {
    observed: Arc<AtomicU64>,
}

impl Source for Fake {
    fn features(&self) -> Features {
        Features {
            gateway: true,
            ..Default::default()
        }
    }
    fn observe(&self) -> futures::future::BoxFuture<'_, Observation> {
        let n = self.observed.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Observation {
                health: vec![Health {
                    name: "<img src=x onerror=alert(1)>".into(),
                    status: if n.is_multiple_of(2) { "ok" } else { "down" },
                    detail: None,
                }],
                ..Default::default()
            }
        })
    }
    fn api(&self) -> Router {
        Router::new().route("/act", post(|| async { "done" }))
    }
}

fn app(options: Options) -> (Router, Console) {
    let console = Console::with_metrics(Fake::default(), String::new);
    (router(console.clone(), options), console)
}

fn req(method: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1:9901")
}

#[tokio::test]
async fn the_page_and_its_files_carry_a_strict_policy() {
    let (app, _) = app(Options::default());
    let mut paths = vec!["/console".to_owned()];
    paths.extend(assets::paths().map(|p| format!("/console/assets/{p}")));
    for path in paths {
        let res = app
            .clone()
            .oneshot(req("GET", &path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers();
        assert_eq!(
            h["content-security-policy"], CONTENT_SECURITY_POLICY,
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("innerHTML"), "{path} must not write markup");
        let foreign = text
            .replace("http://www.w3.org/2000/svg", "")
            .contains("://");
        assert!(!foreign, "{path} names another origin");
        if path == "/console" {
            assert!(!text.contains("<script>"), "no inline script");
            assert!(!text.contains("style="), "no inline style");
        }
    }
}

#[tokio::test]
async fn actions_need_the_console_header_and_this_origin() {
    let (app, _) = app(Options::default());
    let call = |r: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(r).await.unwrap().status().as_u16() }
    };
    // A form post from another site: no custom header, a foreign Origin.
    let form = req("POST", "/console/api/act")
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("a=1"))
        .unwrap();
    assert_eq!(call(form).await, 403);
    // The header alone does not do from another origin.
    let foreign = req("POST", "/console/api/act")
        .header("origin", "http://evil.example")
        .header(ACTION_HEADER, "1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(foreign).await, 403);
    let cross_site = req("POST", "/console/api/act")
        .header("sec-fetch-site", "cross-site")
        .header(ACTION_HEADER, "1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(cross_site).await, 403);
    let no_header = req("POST", "/console/api/act")
        .header("origin", "http://127.0.0.1:9901")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(no_header).await, 403);
    let ok = req("POST", "/console/api/act")
        .header("origin", "http://127.0.0.1:9901")
        .header("sec-fetch-site", "same-origin")
        .header(ACTION_HEADER, "1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(ok).await, 200);
}

#[tokio::test]
async fn without_a_token_only_plain_host_names_are_answered() {
    let (app, _) = app(Options::default());
    for (host, status) in [
        ("127.0.0.1:9901", 200),
        ("localhost:9901", 200),
        ("[::1]:9901", 200),
        ("evil.example:9901", 403),
    ] {
        let r = Request::get("/console")
            .header("host", host)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.clone().oneshot(r).await.unwrap().status(),
            status,
            "{host}"
        );
    }
    let (app, _) = self::app(Options {
        token_configured: Arc::new(|| true),
    });
    let r = Request::get("/console")
        .header("host", "admin.internal:9901")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(r).await.unwrap().status(), 200);
}

#[test]
fn tokens_are_read_from_bearer_and_basic_credentials() {
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
    assert_eq!(presented_token(&h).as_deref(), Some("s3cret"));
    // admin:s3cret
    h.insert(
        "authorization",
        HeaderValue::from_static("Basic YWRtaW46czNjcmV0"),
    );
    assert_eq!(presented_token(&h).as_deref(), Some("s3cret"));
    h.insert("authorization", HeaderValue::from_static("Basic !!"));
    assert_eq!(presented_token(&h), None);
}

async fn next_event(body: &mut Body) -> String {
    let mut text = String::new();
    while !text.contains("\n\n") {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    text
}

#[tokio::test]
async fn the_stream_starts_with_a_snapshot_and_ticks_only_while_watched() {
    let (app, console) = app(Options::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        console.observations(),
        0,
        "nothing runs while nobody watches"
    );
    let res = app
        .clone()
        .oneshot(req("GET", "/console/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let first = next_event(&mut body).await;
    assert!(first.contains("event: snapshot"), "{first}");
    assert!(first.contains("retry: 1000"), "{first}");
    assert!(first.contains("onerror=alert(1)"), "sent as data, as it is");
    assert_eq!(console.viewers(), 1);
    let mut saw_tick = false;
    let mut saw_health = false;
    for _ in 0..8 {
        let e = next_event(&mut body).await;
        saw_tick |= e.contains("event: tick");
        saw_health |= e.contains("event: health");
        if saw_tick && saw_health {
            break;
        }
    }
    assert!(
        saw_tick && saw_health,
        "ticks, and an event for the health change"
    );
    drop(body);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(console.viewers(), 0, "a closed page is counted out");
    // A reconnect says so and gets a fresh snapshot.
    let res = app
        .oneshot(
            req("GET", "/console/events")
                .header("last-event-id", "3")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = next_event(&mut body).await;
    assert!(first.contains("event: snapshot") && first.contains("\"resumed\":true"));
}

#[tokio::test]
async fn a_viewer_that_falls_behind_is_dropped() {
    let console = Console::with_metrics(Fake::default(), String::new);
    let (mut viewer, _) = console.join(false).await;
    for _ in 0..(VIEWER_BUFFER + 5) {
        console.sample().await;
    }
    // The receiver lagged: the stream ends there (the page reconnects from a snapshot),
    // and sampling never waited for it.
    assert!(matches!(
        viewer.rx.recv().await,
        Err(tokio::sync::broadcast::error::RecvError::Lagged(_))
    ));
}

struct Rotating(AtomicU64);

impl Source for Rotating {
    fn features(&self) -> Features {
        Features::default()
    }
    fn observe(&self) -> futures::future::BoxFuture<'_, Observation> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        let keys: &[&str] = match n {
            0 => &[],
            1 => &["k1"],
            2 => &["k1", "k2"],
            _ => &["k2"],
        };
        Box::pin(async move {
            Observation {
                gateway: Some(GatewayView {
                    signing_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
    }
    fn api(&self) -> Router {
        Router::new()
    }
}

#[tokio::test]
async fn key_rotations_reach_the_feed() {
    let console = Console::with_metrics(Rotating(AtomicU64::new(0)), String::new);
    for _ in 0..4 {
        console.sample().await;
    }
    let feed: Vec<String> = console
        .inner_feed()
        .into_iter()
        .filter(|e| e.kind == "key")
        .map(|e| e.title)
        .collect();
    // The first keys fetched are no rotation; a new one is, and so is a retired one.
    assert_eq!(feed, ["signing key k2 published", "signing key k1 retired"]);
}
