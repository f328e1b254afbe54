//! Gray releases, A/B tests and mirroring through the standalone gateway, against real
//! upstream servers: weighted splits, stickiness, rule precedence, weights changed by hot
//! reload under load, per-variant metrics, and a shadow that can neither slow nor fail the
//! client.

mod harness;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use futures::StreamExt;
use harness::{Gw, Upstream, body, proxy_config, sha256_hex};
use serde_json::Value;
use tokio::net::TcpListener;

fn split_config(stable: &Upstream, canary: &Upstream, w_stable: u32, w_canary: u32) -> String {
    format!(
        r#"
api_keys:
  keys:
    - {{ name: alice, sha256: "{a}" }}
    - {{ name: bob, sha256: "{b}" }}
clusters:
  - {{ name: v1, endpoints: ["{s}"] }}
  - {{ name: v2, endpoints: ["{c}"] }}
routes:
  - name: shop
    match: {{ prefix: / }}
    split:
      cookie: ab
      variants:
        - {{ name: stable, cluster: v1, weight: {w_stable} }}
        - {{ name: canary, cluster: v2, weight: {w_canary} }}
        - {{ name: b, cluster: v2, when: {{ headers: {{ x-variant: b }} }} }}
        - {{ name: beta, cluster: v2, when: {{ cookies: {{ beta: "1" }}, query: {{ beta: "yes" }} }} }}
"#,
        a = sha256_hex("alice-key"),
        b = sha256_hex("bob-key"),
        s = stable.url(),
        c = canary.url(),
    )
}

/// Which variant answered (the upstream echoes `x-shopmesh-variant`).
async fn variant_of(res: reqwest::Response) -> String {
    assert_eq!(res.status(), 200);
    body(res).await["variant"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn a_weighted_split_holds_its_weights_over_ten_thousand_requests() {
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let gw = Gw::start(&split_config(&stable, &canary, 95, 5)).await;
    let n = 10_000;
    let counts: HashMap<String, usize> = futures::stream::iter(0..n)
        .map(|_| async { variant_of(gw.get("/x").await).await })
        .buffer_unordered(32)
        .fold(HashMap::new(), |mut m, v| async move {
            *m.entry(v).or_default() += 1;
            m
        })
        .await;
    let canary_share = counts.get("canary").copied().unwrap_or(0) as f64 / n as f64;
    assert_eq!(
        counts.get("stable").copied().unwrap_or(0) + counts.get("canary").copied().unwrap_or(0),
        n,
        "{counts:?}"
    );
    assert!(
        (canary_share - 0.05).abs() <= 0.015,
        "canary share {canary_share} against a weight of 5%"
    );
    assert_eq!(canary.hits() + stable.hits(), n);
    gw.stop().await;
}

#[tokio::test]
async fn callers_stick_to_their_variant_by_cookie_or_identity() {
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let gw = Gw::start(&split_config(&stable, &canary, 50, 50)).await;
    // Anonymous: the first answer names the caller in a cookie.
    for _ in 0..10 {
        let res = gw.get("/x").await;
        let set = res
            .headers()
            .get("set-cookie")
            .expect("an anonymous caller gets a cookie")
            .to_str()
            .unwrap()
            .to_owned();
        assert!(set.starts_with("ab=") && set.contains("HttpOnly"), "{set}");
        let first = variant_of(res).await;
        let pair = set.split(';').next().unwrap().to_owned();
        for _ in 0..10 {
            let res = gw
                .http
                .get(format!("{}/x", gw.base))
                .header("cookie", &pair)
                .send()
                .await
                .unwrap();
            assert!(res.headers().get("set-cookie").is_none());
            assert_eq!(variant_of(res).await, first);
        }
    }
    // Authenticated: the caller's identity decides, with or without cookies.
    for key in ["alice-key", "bob-key"] {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            let mut req = gw
                .http
                .get(format!("{}/x", gw.base))
                .header("x-api-key", key);
            if i % 2 == 0 {
                req = req.header("cookie", format!("ab=other{i}"));
            }
            let res = req.send().await.unwrap();
            assert!(res.headers().get("set-cookie").is_none());
            seen.insert(variant_of(res).await);
        }
        assert_eq!(seen.len(), 1, "{key} moved between variants: {seen:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn rules_win_over_weights_and_the_first_matching_rule_wins() {
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let gw = Gw::start(&split_config(&stable, &canary, 100, 0)).await;
    let get = |headers: Vec<(&'static str, &'static str)>, path: &'static str| {
        let mut r = gw.http.get(format!("{}{path}", gw.base));
        for (k, v) in headers {
            r = r.header(k, v);
        }
        async move { variant_of(r.send().await.unwrap()).await }
    };
    assert_eq!(get(vec![], "/x").await, "stable");
    assert_eq!(get(vec![("x-variant", "b")], "/x").await, "b");
    assert_eq!(get(vec![("x-variant", "c")], "/x").await, "stable");
    // Every condition of a rule must hold: the cookie alone is not enough.
    assert_eq!(get(vec![("cookie", "beta=1")], "/x").await, "stable");
    assert_eq!(get(vec![("cookie", "beta=1")], "/x?beta=yes").await, "beta");
    // Both rules hold: the one listed first wins.
    assert_eq!(
        get(
            vec![("cookie", "beta=1"), ("x-variant", "b")],
            "/x?beta=yes"
        )
        .await,
        "b"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_cannot_name_its_variant_or_pass_for_a_shadow_copy() {
    let up = Upstream::start("up").await;
    let gw = Gw::start(&proxy_config(&up)).await;
    let res = gw
        .http
        .get(format!("{}/x", gw.base))
        .header("x-shopmesh-variant", "canary")
        .header("x-shopmesh-shadow", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(body(res).await["variant"].is_null());
    assert!(!up.seen.lock().unwrap()[0].shadow);
    // And a split's rule may not rely on such a header.
    let e = shopmesh_gateway::GatewayConfig::from_yaml(&format!(
        r#"
clusters:
  - {{ name: up, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ prefix: / }}
    split:
      variants:
        - {{ name: a, cluster: up, weight: 1 }}
        - {{ name: b, cluster: up, when: {{ headers: {{ X-Shopmesh-Variant: b }} }} }}
"#,
        up.url()
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("removed from every client request"), "{e}");
    gw.stop().await;
}

#[tokio::test]
async fn weights_change_by_reload_without_a_failed_request() {
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let gw = Arc::new(Gw::start(&split_config(&stable, &canary, 100, 0)).await);
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (gw, failures, done) = (gw.clone(), failures.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut sent = 0;
            while !done.load(Ordering::Relaxed) {
                match gw.http.get(format!("{}/x", gw.base)).send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent += 1;
            }
            sent
        }));
    }
    let mut version = gw.version().await;
    for (s, c) in [(95, 5), (50, 50), (0, 100)] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.rewrite(&split_config(&stable, &canary, s, c));
        version += 1;
        gw.wait_version(version).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for l in load {
        sent += l.await.unwrap();
    }
    assert!(sent > 100, "only {sent} requests during the reloads");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {sent}");
    assert!(canary.hits() > 0 && stable.hits() > 0);
    // All weight on the canary now.
    for _ in 0..50 {
        assert_eq!(variant_of(gw.get("/x").await).await, "canary");
    }
    Arc::try_unwrap(gw).ok().unwrap().stop().await;
}

#[tokio::test]
async fn each_variant_has_its_own_metrics() {
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let gw = Gw::start(&split_config(&stable, &canary, 50, 50)).await;
    for _ in 0..40 {
        gw.get("/x").await;
    }
    let text = gw.metrics().await;
    for v in ["stable", "canary"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("gateway_requests_total{")
                    && l.contains("route=\"shop\"")
                    && l.contains(&format!("variant=\"{v}\""))
                    && l.contains("status=\"200\"")
            })
            .unwrap_or_else(|| panic!("no request count for {v}:\n{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0.0, "{line}");
        assert!(
            text.contains(&format!(
                "gateway_request_duration_seconds_count{{route=\"shop\",variant=\"{v}\"}}"
            )),
            "no latency for {v}:\n{text}"
        );
    }
    gw.stop().await;
}

/// A shadow upstream: counts requests, keeps their bodies, answers after `delay` with
/// `status`.
#[derive(Clone)]
struct Shadow {
    hits: Arc<AtomicUsize>,
    marked: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    delay: Duration,
    status: u16,
}

async fn start_shadow(delay: Duration, status: u16) -> (Shadow, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Shadow {
        hits: Arc::default(),
        marked: Arc::default(),
        bodies: Arc::default(),
        delay,
        status,
    };
    let app = Router::new()
        .fallback(|State(s): State<Shadow>, req: Request| async move {
            s.hits.fetch_add(1, Ordering::SeqCst);
            if req.headers().get("x-shopmesh-shadow").is_some() {
                s.marked.fetch_add(1, Ordering::SeqCst);
            }
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            s.bodies.lock().unwrap().push(bytes.to_vec());
            tokio::time::sleep(s.delay).await;
            axum::http::StatusCode::from_u16(s.status).unwrap()
        })
        .with_state(s.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (s, format!("http://{addr}"))
}

fn mirror_config(up: &Upstream, shadow: &str, percent: f64, max_in_flight: usize) -> String {
    format!(
        r#"
clusters:
  - {{ name: live, endpoints: ["{u}"] }}
  - {{ name: shadow, endpoints: ["{shadow}"], retry: {{ attempts: 0 }} }}
routes:
  - name: mirrored
    match: {{ prefix: / }}
    cluster: live
    mirror: {{ cluster: shadow, percent: {percent}, max_in_flight: {max_in_flight} }}
"#,
        u = up.url(),
    )
}

#[tokio::test]
async fn a_mirror_gets_its_share_of_copies_bodies_included() {
    let up = Upstream::start("live").await;
    let (shadow, url) = start_shadow(Duration::ZERO, 200).await;
    let gw = Gw::start(&mirror_config(&up, &url, 50.0, 64)).await;
    let n = 1000;
    for i in 0..n {
        let res = gw
            .http
            .post(format!("{}/orders", gw.base))
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(body(res).await["upstream"], "live");
    }
    // Copies are sent in the background: wait for the last ones.
    let t = Instant::now();
    let mut last = usize::MAX;
    while t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = shadow.hits.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    let copies = shadow.hits.load(Ordering::SeqCst);
    assert_eq!(up.hits(), n, "every request reached the live upstream");
    assert!(
        (400..=600).contains(&copies),
        "{copies} copies of {n} at 50%"
    );
    assert_eq!(shadow.marked.load(Ordering::SeqCst), copies);
    let whole = shadow
        .bodies
        .lock()
        .unwrap()
        .iter()
        .all(|b| std::str::from_utf8(b).unwrap().starts_with("order "));
    assert!(whole, "bodies are copied whole");
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_or_failing_shadow_is_invisible_to_the_client_and_bounded() {
    let up = Upstream::start("live").await;
    // Slow and failing: answers 500 after 2 s.
    let (shadow, url) = start_shadow(Duration::from_secs(2), 500).await;
    let gw = Gw::start(&mirror_config(&up, &url, 100.0, 4)).await;
    let t = Instant::now();
    for _ in 0..50 {
        let res = gw.get("/page").await;
        assert_eq!(res.status(), 200);
        assert_eq!(body(res).await["upstream"], "live");
    }
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the client waited for the shadow: {:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        shadow.hits.load(Ordering::SeqCst),
        4,
        "at most max_in_flight copies are outstanding"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("gateway_mirror_skipped_total{route=\"mirrored\",reason=\"busy\"}"),
        "{metrics}"
    );
    // A shadow that is down changes nothing either.
    let dead = mirror_config(&up, "http://127.0.0.1:9", 100.0, 4);
    let v = gw.version().await;
    gw.rewrite(&dead);
    gw.wait_version(v + 1).await;
    for _ in 0..20 {
        assert_eq!(gw.get("/page").await.status(), 200);
    }
    let cfg: Value = gw.admin_json("/config").await;
    assert!(cfg["status"]["last_error"].is_null(), "{cfg}");
    gw.stop().await;
}
