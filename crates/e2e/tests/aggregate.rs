//! Composite endpoints (the aggregation pattern) in the standalone gateway, in front of real
//! backends started here whose latency, status and answers each test scripts: concurrency
//! and dependency order, partial answers, required failures, per-part timeouts, caching,
//! coalescing, batch enrichment of lists, and bad graphs refused at load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use shopmesh_gateway::GatewayConfig;
use shopmesh_gateway::server::Standalone;
use tokio::net::TcpListener;

/// What a backend answers on one path.
#[derive(Clone)]
struct Reply {
    delay_ms: u64,
    status: u16,
    body: Value,
    cache_control: Option<&'static str>,
    /// Sent instead of `body` (not JSON).
    text: Option<&'static str>,
}

impl Reply {
    fn json(body: Value) -> Self {
        Reply {
            delay_ms: 0,
            status: 200,
            body,
            cache_control: None,
            text: None,
        }
    }
    fn after(mut self, ms: u64) -> Self {
        self.delay_ms = ms;
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
}

/// One request a backend received: path, query, when it arrived and when it was answered
/// (relative to the backend's start), and the headers the tests look at.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    query: Option<String>,
    arrived: Duration,
    answered: Duration,
    tenant: Option<String>,
    user: Option<String>,
}

#[derive(Clone)]
struct Backend {
    addr: SocketAddr,
    t0: Instant,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = Backend {
            addr: listener.local_addr().unwrap(),
            t0: Instant::now(),
            replies: Arc::default(),
            hits: Arc::default(),
        };
        let app = Router::new()
            .fallback(|State(b): State<Backend>, req: Request| async move {
                let arrived = b.t0.elapsed();
                let path = req.uri().path().to_owned();
                let reply = b.replies.lock().unwrap().get(&path).cloned();
                let Some(reply) = reply else {
                    return (
                        StatusCode::NOT_FOUND,
                        [("content-type", "application/problem+json")],
                        json!({"status": 404, "detail": format!("nothing at {path}")}).to_string(),
                    )
                        .into_response();
                };
                tokio::time::sleep(Duration::from_millis(reply.delay_ms)).await;
                let h = req.headers();
                b.hits.lock().unwrap().push(Hit {
                    path,
                    query: req.uri().query().map(str::to_owned),
                    arrived,
                    answered: b.t0.elapsed(),
                    tenant: h.get("x-tenant").map(|v| v.to_str().unwrap().to_owned()),
                    user: h
                        .get("x-shopmesh-user-id")
                        .map(|v| v.to_str().unwrap().to_owned()),
                });
                let status = StatusCode::from_u16(reply.status).unwrap();
                let mut res = match reply.text {
                    Some(t) => (status, t).into_response(),
                    None => (status, axum::Json(reply.body)).into_response(),
                };
                if let Some(cc) = reply.cache_control {
                    res.headers_mut()
                        .insert("cache-control", cc.parse().unwrap());
                }
                res
            })
            .with_state(b.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        b
    }

    fn on(&self, path: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(path.to_owned(), reply);
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == path)
            .cloned()
            .collect()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

struct Gw {
    inner: Option<Standalone>,
    _dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
}

impl Gw {
    async fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(
            &path,
            format!("listen: 127.0.0.1:0\nadmin: {{ listen: null }}\n{yaml}"),
        )
        .unwrap();
        let inner = Standalone::start(path, Duration::from_millis(50))
            .await
            .expect("the gateway starts");
        Gw {
            base: format!("http://{}", inner.addr),
            inner: Some(inner),
            _dir: dir,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn get_parts(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("x-aggregate-parts", "true")
            .send()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(s) = self.inner.take() {
            s.shutdown().await;
        }
    }
}

fn complete(res: &reqwest::Response) -> &str {
    res.headers()
        .get("x-aggregate-complete")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("absent")
}

/// The product page of the issue: four backends, promotions depending on the product.
fn product_page(b: &Backend, extra: &str) -> String {
    format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{url}"] }}
routes:
  - name: page
    match: {{ template: "/products/{{id}}" }}
    aggregate:
      parts:
        - {{ name: product, cluster: be, path: "/catalog/{{path.id}}", timeout_ms: 2000 }}
        - {{ name: inventory, cluster: be, path: "/stock/{{path.id}}", required: false, timeout_ms: 300,
             fields: [available], fallback: {{ available: 0 }} }}
        - {{ name: price, cluster: be, path: "/price/{{path.id}}", required: false, timeout_ms: 2000 }}
        - {{ name: promotions, cluster: be, path: /promos, required: false, timeout_ms: 2000,
             query: {{ product_id: "{{path.id}}", category: "{{product.category}}" }},
             extract: items, fallback: [] }}
{extra}
"#,
        url = b.url()
    )
}

#[tokio::test]
async fn the_product_page_runs_independent_parts_together_and_dependent_ones_after() {
    let b = Backend::start().await;
    b.on(
        "/catalog/p1",
        Reply::json(json!({"id": "p1", "name": "Kettle", "category": "kitchen"})).after(150),
    );
    b.on(
        "/stock/p1",
        Reply::json(json!({"available": 7, "reserved": 1})).after(150),
    );
    b.on(
        "/price/p1",
        Reply::json(json!({"amount_minor": 1999})).after(150),
    );
    b.on(
        "/promos",
        Reply::json(json!({"items": [{"id": "promo1"}]})).after(150),
    );
    let gw = Gw::start(&product_page(&b, "")).await;

    let t = Instant::now();
    let res = gw.get_parts("/products/p1").await;
    let took = t.elapsed();
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "true");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["product"]["name"], "Kettle");
    assert_eq!(
        doc["inventory"],
        json!({"available": 7}),
        "fields keep only `available`"
    );
    assert_eq!(doc["price"]["amount_minor"], 1999);
    assert_eq!(doc["promotions"], json!([{"id": "promo1"}]));
    for part in ["product", "inventory", "price", "promotions"] {
        assert_eq!(doc["_parts"][part]["outcome"], "ok", "{doc}");
        assert_eq!(doc["_parts"][part]["status"], 200);
    }
    // Three parts at once, then promotions: two backend latencies, not four.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(550),
        "took {took:?}"
    );
    let product = &b.hits("/catalog/p1")[0];
    let stock = &b.hits("/stock/p1")[0];
    let price = &b.hits("/price/p1")[0];
    let promos = &b.hits("/promos")[0];
    let spread = |a: Duration, b: Duration| a.abs_diff(b);
    assert!(spread(product.arrived, stock.arrived) < Duration::from_millis(100));
    assert!(spread(product.arrived, price.arrived) < Duration::from_millis(100));
    assert!(
        promos.arrived >= product.answered,
        "promotions waits for the product's category"
    );
    let q = promos.query.as_deref().unwrap();
    assert!(
        q.contains("product_id=p1") && q.contains("category=kitchen"),
        "{q}"
    );

    // Without the header, no `_parts`.
    let doc: Value = gw.get("/products/p1").await.json().await.unwrap();
    assert!(doc.get("_parts").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn optional_parts_that_fail_give_their_fallback_and_flag_the_answer() {
    let b = Backend::start().await;
    b.on(
        "/catalog/p1",
        Reply::json(json!({"id": "p1", "category": "kitchen"})),
    );
    // inventory: slower than its 300 ms timeout; price: a server error; promotions: fine.
    b.on(
        "/stock/p1",
        Reply::json(json!({"available": 7})).after(1500),
    );
    b.on("/price/p1", Reply::json(json!({"error": "x"})).status(500));
    b.on("/promos", Reply::json(json!({"items": []})));
    // (The recorder first: the composite registers its counters when it is built.)
    let metrics = shopmesh_platform::telemetry::prometheus();
    let gw = Gw::start(&product_page(&b, "")).await;

    // Timeouts are counted apart from fallbacks (the console shows both): the slow part's
    // fallback is a timeout, the failing part's is not.
    let count = |name: &str, part: &str, outcome: Option<&str>| {
        let text = metrics.render();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains("route=\"page\"") && l.contains(&format!("part=\"{part}\"")))
            .filter(|l| outcome.is_none_or(|o| l.contains(&format!("outcome=\"{o}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let timeouts = "gateway_aggregate_part_timeouts_total";
    let parts = "gateway_aggregate_parts_total";
    let before = [
        count(timeouts, "inventory", None),
        count(timeouts, "price", None),
        count(parts, "price", Some("fallback")),
    ];

    let t = Instant::now();
    let res = gw.get_parts("/products/p1").await;
    let took = t.elapsed();
    assert!(count(timeouts, "inventory", None) >= before[0] + 1.0);
    assert_eq!(
        count(timeouts, "price", None),
        before[1],
        "a 500 is no timeout"
    );
    assert!(count(parts, "price", Some("fallback")) >= before[2] + 1.0);
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "false");
    assert_eq!(
        res.headers()["x-aggregate-failed"].to_str().unwrap(),
        "inventory,price"
    );
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["product"]["id"], "p1");
    assert_eq!(
        doc["inventory"],
        json!({"available": 0}),
        "the configured fallback"
    );
    assert_eq!(doc["price"], Value::Null, "the default fallback");
    assert_eq!(doc["promotions"], json!([]));
    assert_eq!(doc["_parts"]["inventory"]["outcome"], "fallback");
    assert_eq!(doc["_parts"]["inventory"]["error"], "timed out");
    assert_eq!(doc["_parts"]["price"]["status"], 500);
    assert_eq!(doc["_parts"]["price"]["error"], "answered 500");
    // The slow part cost its timeout, not its latency.
    assert!(took < Duration::from_millis(1000), "took {took:?}");

    // A backend that is not there at all is a fallback too.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let yaml = format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{}"] }}
  - {{ name: gone, endpoints: ["{dead_url}"] }}
routes:
  - name: page
    match: {{ template: "/p/{{id}}" }}
    aggregate:
      parts:
        - {{ name: product, cluster: be, path: "/catalog/{{path.id}}" }}
        - {{ name: reviews, cluster: gone, path: "/reviews/{{path.id}}", required: false, fallback: [] }}
"#,
        b.url()
    );
    let gw2 = Gw::start(&yaml).await;
    let res = gw2.get_parts("/p/p1").await;
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "false");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["reviews"], json!([]));
    assert_eq!(doc["_parts"]["reviews"]["error"], "unreachable");
    gw2.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_required_part_that_fails_fails_the_request_and_is_named() {
    let b = Backend::start().await;
    b.on("/stock/p1", Reply::json(json!({"available": 7})));
    b.on("/price/p1", Reply::json(json!({"amount_minor": 1})));
    b.on("/promos", Reply::json(json!({"items": []})));
    let gw = Gw::start(&product_page(&b, "")).await;

    // A server error: 502 naming the part.
    b.on("/catalog/p1", Reply::json(json!({})).status(503));
    let res = gw.get("/products/p1").await;
    assert_eq!(res.status(), 502);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["part"], "product");
    assert!(
        p["detail"].as_str().unwrap().contains("answered 503"),
        "{p}"
    );

    // The backend's client error passes through with its detail: an unknown product is a 404.
    let res = gw.get("/products/nope").await;
    assert_eq!(res.status(), 404);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["part"], "product");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("nothing at /catalog/nope"),
        "{p}"
    );
    assert!(
        b.hits("/promos").is_empty(),
        "promotions reads the product: it is never asked once the product has failed"
    );

    // Too slow: 504, after the part's timeout, not the backend's latency.
    b.on("/catalog/p1", Reply::json(json!({"id": "p1"})).after(5000));
    let t = Instant::now();
    let res = gw.get("/products/p1").await;
    assert_eq!(res.status(), 504);
    assert!(t.elapsed() < Duration::from_millis(3000));
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["part"], "product");

    // An answer that is not JSON: 502 when required, the fallback when not, whether the
    // part's answer is parsed (product: promotions reads it) or passed through (price).
    let mut text = Reply::json(json!(null));
    text.text = Some("<html>oops</html>");
    b.on("/catalog/p1", text.clone());
    let res = gw.get("/products/p1").await;
    assert_eq!(res.status(), 502);
    let p: Value = res.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("not JSON"), "{p}");
    b.on("/catalog/p1", Reply::json(json!({"id": "p1"})));
    b.on("/price/p1", text.clone());
    // The parts the 502 left in flight finish; a new request then makes its own calls.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = gw.get_parts("/products/p1").await;
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "false");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["_parts"]["price"]["error"], "the answer is not JSON");
    let mut truncated = Reply::json(json!(null));
    truncated.text = Some(r#"{"amount_minor": 1"#);
    b.on("/price/p1", truncated);
    let doc: Value = gw.get_parts("/products/p1").await.json().await.unwrap();
    assert_eq!(doc["_parts"]["price"]["error"], "the answer is not JSON");
    gw.stop().await;
}

#[tokio::test]
async fn the_composite_deadline_bounds_the_whole_request() {
    let b = Backend::start().await;
    b.on("/a", Reply::json(json!({"v": 1})).after(2000));
    b.on("/b", Reply::json(json!({"v": 2})));
    let yaml = format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ exact: /both }}
    timeout_ms: 200
    aggregate:
      parts:
        - {{ name: a, cluster: be, path: /a, timeout_ms: 5000, required: false }}
        - {{ name: b, cluster: be, path: /b }}
"#,
        b.url()
    );
    let gw = Gw::start(&yaml).await;
    let t = Instant::now();
    let res = gw.get_parts("/both").await;
    assert!(t.elapsed() < Duration::from_millis(1000));
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "false");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["b"]["v"], 2);
    assert_eq!(doc["a"], Value::Null);
    assert_eq!(
        doc["_parts"]["a"]["error"],
        "the composite's deadline passed"
    );
    gw.stop().await;
}

#[tokio::test]
async fn parts_are_cached_within_their_ttl_and_never_when_failed_or_forbidden() {
    let b = Backend::start().await;
    b.on("/cached", Reply::json(json!({"v": 1})));
    b.on("/flaky", Reply::json(json!({"v": 2})).status(500));
    let mut no_store = Reply::json(json!({"v": 3}));
    no_store.cache_control = Some("no-store");
    b.on("/nostore", no_store);
    let mut short = Reply::json(json!({"v": 4}));
    short.cache_control = Some("max-age=0");
    b.on("/short", short);
    let yaml = format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ exact: /c }}
    aggregate:
      parts:
        - {{ name: cached, cluster: be, path: /cached, cache: {{ ttl_ms: 400 }} }}
        - {{ name: flaky, cluster: be, path: /flaky, required: false, cache: {{ ttl_ms: 60000 }} }}
        - {{ name: nostore, cluster: be, path: /nostore, cache: {{ ttl_ms: 60000 }} }}
        - {{ name: short, cluster: be, path: /short, cache: {{ ttl_ms: 60000 }} }}
"#,
        b.url()
    );
    let gw = Gw::start(&yaml).await;

    let first = gw.get_parts("/c").await;
    assert_eq!(complete(&first), "false");
    let doc: Value = first.json().await.unwrap();
    assert_eq!(doc["_parts"]["cached"]["cache"], "miss");
    let doc: Value = gw.get_parts("/c").await.json().await.unwrap();
    assert_eq!(doc["cached"]["v"], 1);
    assert_eq!(doc["_parts"]["cached"]["cache"], "hit");
    assert_eq!(
        b.hits("/cached").len(),
        1,
        "the second request was served from the cache"
    );
    assert_eq!(b.hits("/flaky").len(), 2, "a failure is never cached");
    assert_eq!(
        b.hits("/nostore").len(),
        2,
        "Cache-Control: no-store is honoured"
    );
    assert_eq!(
        b.hits("/short").len(),
        2,
        "max-age=0 shortens the TTL to nothing"
    );

    // The partial answer was not cached as complete: once the backend recovers, the next
    // answer is complete.
    b.replies.lock().unwrap().get_mut("/flaky").unwrap().status = 200;
    let res = gw.get("/c").await;
    assert_eq!(complete(&res), "true");

    // After the TTL the backend is asked again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let doc: Value = gw.get_parts("/c").await.json().await.unwrap();
    assert_eq!(doc["_parts"]["cached"]["cache"], "miss");
    assert_eq!(b.hits("/cached").len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_backend_call() {
    let b = Backend::start().await;
    // Long enough for all twenty requests to arrive while the first calls are out.
    b.on("/slow/x", Reply::json(json!({"v": 1})).after(600));
    b.on("/slow/y", Reply::json(json!({"v": 2})).after(600));
    let yaml = format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ template: "/s/{{k}}" }}
    aggregate:
      parts:
        - {{ name: slow, cluster: be, path: "/slow/{{path.k}}" }}
"#,
        b.url()
    );
    let gw = Arc::new(Gw::start(&yaml).await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let gw = gw.clone();
        let key = if i % 2 == 0 { "x" } else { "y" };
        tasks.push(tokio::spawn(async move {
            let res = gw.get_parts(&format!("/s/{key}")).await;
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }));
    }
    let mut shared = 0;
    for t in tasks {
        let doc = t.await.unwrap();
        if doc["_parts"]["slow"]["cache"] == "shared" {
            shared += 1;
        }
    }
    assert_eq!(b.hits("/slow/x").len(), 1, "ten requests, one backend call");
    assert_eq!(
        b.hits("/slow/y").len(),
        1,
        "a different key is a different call"
    );
    assert_eq!(shared, 18);
    Arc::try_unwrap(gw).ok().unwrap().stop().await;
}

#[tokio::test]
async fn a_list_is_enriched_by_one_batch_call_per_backend() {
    let b = Backend::start().await;
    b.on(
        "/items",
        Reply::json(json!({"items": [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}, {"id": "c", "name": "C"}], "total": 3})),
    );
    b.on(
        "/prices",
        Reply::json(
            json!({"items": [{"product_id": "a", "amount": 1}, {"product_id": "c", "amount": 3}]}),
        ),
    );
    b.on(
        "/stock",
        Reply::json(json!({"items": [{"product_id": "a", "available": 5, "reserved": 0}, {"product_id": "b", "available": 0, "reserved": 2}, {"product_id": "c", "available": 1, "reserved": 0}]})),
    );
    let yaml = format!(
        r#"
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: list
    match: {{ exact: /list }}
    aggregate:
      parts:
        - {{ name: page, cluster: be, path: /items, forward_query: true, into: . }}
        - name: prices
          cluster: be
          path: /prices
          query: {{ ids: "{{page.items.*.id}}" }}
          required: false
          extract: items
          fields: [amount]
          enrich: {{ each: items, key: id, by: product_id, into: price }}
        - name: stock
          cluster: be
          path: /stock
          query: {{ ids: "{{page.items.*.id}}" }}
          required: false
          extract: items
          fields: [available]
          enrich: {{ each: items, key: id, by: product_id, into: stock }}
"#,
        b.url()
    );
    let gw = Gw::start(&yaml).await;
    let res = gw.get("/list?q=x&limit=3").await;
    assert_eq!(res.status(), 200);
    assert_eq!(complete(&res), "true");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["total"], 3);
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items[0]["price"]["amount"], 1);
    assert_eq!(
        items[1]["price"],
        Value::Null,
        "no price for b: the fallback"
    );
    assert_eq!(items[2]["price"]["amount"], 3);
    assert_eq!(items[1]["stock"]["available"], 0);
    assert!(items[0]["stock"].get("reserved").is_none());
    assert_eq!(b.hits("/items")[0].query.as_deref(), Some("q=x&limit=3"));
    let prices = b.hits("/prices");
    assert_eq!(prices.len(), 1, "one batch call for the whole page");
    assert_eq!(prices[0].query.as_deref(), Some("ids=a%2Cb%2Cc"));
    assert_eq!(b.hits("/stock").len(), 1);

    // An empty page needs no batch call and is complete.
    b.on("/items", Reply::json(json!({"items": [], "total": 0})));
    let res = gw.get_parts("/list").await;
    assert_eq!(complete(&res), "true");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["_parts"]["prices"]["outcome"], "skipped");
    assert_eq!(b.hits("/prices").len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn templates_read_headers_query_and_the_callers_identity() {
    let b = Backend::start().await;
    b.on("/t", Reply::json(json!({"ok": true})));
    b.on("/me", Reply::json(json!({"ok": true})));
    let key = "k-123";
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    };
    let yaml = format!(
        r#"
api_keys:
  keys: [{{ name: shop-app, sha256: "{digest}", roles: [reader] }}]
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ exact: /t }}
    auth: {{ required: true }}
    aggregate:
      parts:
        - name: t
          cluster: be
          path: /t
          query: {{ lang: "{{query.lang}}", who: "{{claims.sub}}", missing: "{{query.nope}}" }}
          headers: {{ x-tenant: "{{header.x-tenant}}" }}
        - {{ name: me, cluster: be, path: /me, forward_identity: true }}
"#,
        b.url()
    );
    let gw = Gw::start(&yaml).await;
    let res = gw.get("/t?lang=fr").await;
    assert_eq!(res.status(), 401, "the route's auth applies to composites");
    let res = gw
        .http
        .get(format!("{}/t?lang=fr%20CA", gw.base))
        .header("x-api-key", key)
        .header("x-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let hit = &b.hits("/t")[0];
    assert_eq!(
        hit.query.as_deref(),
        Some("lang=fr+CA&who=apikey%3Ashop-app")
    );
    assert_eq!(hit.tenant.as_deref(), Some("acme"));
    assert_eq!(
        hit.user, None,
        "identity only goes where forward_identity says"
    );
    assert_eq!(b.hits("/me")[0].user.as_deref(), Some("apikey:shop-app"));
    // POST is not a composite's business.
    let res = gw.http.post(format!("{}/t", gw.base)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    gw.stop().await;
}

#[test]
fn bad_graphs_and_templates_are_refused_when_the_config_loads() {
    let base = "clusters:\n  - { name: be, endpoints: [\"http://127.0.0.1:1\"] }\nroutes:\n  - name: r\n    match: { template: \"/p/{id}\" }\n    aggregate:\n      parts:\n";
    let cases = [
        (
            "        - { name: a, cluster: be, path: \"/a/{b.x}\" }\n        - { name: b, cluster: be, path: \"/b/{a.x}\" }\n",
            "the parts `a`, `b` depend on each other in a cycle",
        ),
        (
            "        - { name: a, cluster: be, path: \"/a/{c.x}\" }\n",
            "`c` is neither a part",
        ),
        (
            "        - { name: a, cluster: be, path: \"/a/{path.sku}\" }\n",
            "no parameter `sku`",
        ),
        (
            "        - { name: a, cluster: nope, path: /a }\n",
            "unknown cluster `nope`",
        ),
        (
            "        - { name: a, cluster: be, path: \"/a/{path.id\" }\n",
            "without `}`",
        ),
        (
            "        - { name: a, cluster: be, path: /a, into: x, enrich: { each: i, key: k, by: b, into: v } }\n",
            "exclude each other",
        ),
    ];
    for (parts, want) in cases {
        let e = GatewayConfig::from_yaml(&format!("{base}{parts}"))
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "want `{want}` in: {e}");
        assert!(e.contains("route `r`") || e.contains("`r`"), "{e}");
    }
    // A misspelt key is refused with its line and column.
    let e = GatewayConfig::from_yaml(&format!(
        "{base}        - name: a\n          cluster: be\n          path: /a\n          timeout: 5\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown field `timeout`") && e.contains("line 11 column 11"),
        "{e}"
    );
}

#[tokio::test]
async fn client_inputs_cannot_steer_parts_and_head_carries_the_length() {
    let b = Backend::start().await;
    b.on("/files/report", Reply::json(json!({"ok": true})));
    b.on("/mine", Reply::json(json!({"ok": true})));
    let key = "k-1";
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    };
    let yaml = format!(
        r#"
api_keys:
  keys: [{{ name: alice, sha256: "{digest}" }}]
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: files
    match: {{ exact: /f }}
    aggregate:
      parts:
        - {{ name: file, cluster: be, path: "/files/{{query.name}}" }}
  - name: mine
    match: {{ exact: /mine }}
    aggregate:
      parts:
        - {{ name: mine, cluster: be, path: /mine, forward_query: true, query: {{ owner: "{{claims.sub}}" }} }}
"#,
        b.url()
    );
    let gw = Gw::start(&yaml).await;
    // A dot segment from the client never reaches the backend's path: 400.
    for bad in ["..", "."] {
        let res = gw.get(&format!("/f?name={bad}")).await;
        assert_eq!(res.status(), 400, "{bad}");
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["part"], "file");
    }
    // `/` is a character of the value, not a separator.
    let res = gw.get("/f?name=../../admin").await;
    assert_eq!(res.status(), 404);
    let p: Value = res.json().await.unwrap();
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("nothing at /files/..%2F..%2Fadmin"),
        "{p}"
    );
    // A required input the request lacks: 400.
    assert_eq!(gw.get("/f").await.status(), 400);

    // HEAD: the length a GET would carry, no body.
    let get = gw.get("/f?name=report").await;
    let len = get.bytes().await.unwrap().len();
    let head = gw
        .http
        .head(format!("{}/f?name=report", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], len.to_string().as_str());
    assert!(head.bytes().await.unwrap().is_empty());

    // The configured `owner` wins over the client's, which is dropped.
    let res = gw
        .http
        .get(format!("{}/mine?owner=bob&page=2", gw.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        b.hits("/mine")[0].query.as_deref(),
        Some("page=2&owner=apikey%3Aalice")
    );
    // Anonymous: no claim, and the part fails rather than asking for everyone's data.
    let before = b.hits("/mine").len();
    assert_eq!(gw.get("/mine?owner=bob").await.status(), 502);
    assert_eq!(b.hits("/mine").len(), before);
    gw.stop().await;
}

#[tokio::test]
async fn answers_for_a_caller_are_cached_for_that_caller_only() {
    let b = Backend::start().await;
    b.on("/profile", Reply::json(json!({"v": 1})));
    b.on("/public", Reply::json(json!({"v": 2})));
    let keys = ["k-alice", "k-bob"];
    let entry = |name: &str, key: &str| {
        use sha2::Digest;
        format!(
            "{{ name: {name}, sha256: \"{}\" }}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    };
    let yaml = format!(
        r#"
api_keys:
  keys: [{}, {}]
clusters:
  - {{ name: be, endpoints: ["{}"] }}
routes:
  - name: r
    match: {{ exact: /me }}
    auth: {{ required: true }}
    aggregate:
      parts:
        - {{ name: profile, cluster: be, path: /profile, forward_identity: true, cache: {{ ttl_ms: 60000 }} }}
        - {{ name: public, cluster: be, path: /public, cache: {{ ttl_ms: 60000 }} }}
"#,
        entry("alice", keys[0]),
        entry("bob", keys[1]),
        b.url()
    );
    let gw = Gw::start(&yaml).await;
    async fn me(gw: &Gw, key: &str) -> Value {
        let res = gw
            .http
            .get(format!("{}/me", gw.base))
            .header("x-api-key", key)
            .header("x-aggregate-parts", "true")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    }
    assert_eq!(me(&gw, keys[0]).await["_parts"]["profile"]["cache"], "miss");
    let bob = me(&gw, keys[1]).await;
    assert_eq!(
        bob["_parts"]["profile"]["cache"], "miss",
        "bob never gets alice's answer"
    );
    assert_eq!(
        bob["_parts"]["public"]["cache"], "hit",
        "an answer for nobody in particular is shared"
    );
    assert_eq!(me(&gw, keys[0]).await["_parts"]["profile"]["cache"], "hit");
    let users: Vec<Option<String>> = b.hits("/profile").into_iter().map(|h| h.user).collect();
    assert_eq!(
        users,
        vec![
            Some("apikey:alice".to_owned()),
            Some("apikey:bob".to_owned())
        ]
    );
    assert_eq!(b.hits("/public").len(), 1);
    gw.stop().await;
}
