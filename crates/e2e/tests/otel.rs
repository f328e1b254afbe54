//! OpenTelemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one order's trace (the
//! gateway's span, the services' request spans and the saga's message spans) reaches an
//! OTLP/HTTP collector under the client's trace id. The collector here is a real HTTP
//! server that keeps what it is sent.
//!
//! Its own test binary: the tracing subscriber is process-global.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use shopmesh_test_support::TestShop;

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_exported_trace() {
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(r): State<Arc<Mutex<Vec<u8>>>>, body: Bytes| async move {
                    r.lock().unwrap().extend_from_slice(&body);
                    ""
                },
            ),
        )
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // SAFETY: set before any other thread of this test binary reads the environment.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"));
        std::env::set_var("OTEL_SERVICE_NAME", "shopmesh-test");
    }
    let guard = shopmesh_platform::telemetry::init_tracing(Default::default());
    assert!(shopmesh_platform::otel::active());

    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .json(&json!({"items": [{"product_id": shop.product(3), "quantity": 1}], "card": "4242424242424242"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let placed: Value = res.json().await.unwrap();
    assert_eq!(
        placed["trace_id"], trace,
        "the trace continues from the client's"
    );
    let id = placed["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = shop
            .get_json(&format!("/api/orders/{id}"), Some(&token))
            .await;
        if o["status"] == "CONFIRMED" {
            break;
        }
        assert!(Instant::now() < deadline, "{o}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        guard.otel.as_ref().unwrap().flush();
        let body = received.lock().unwrap().clone();
        let spans_in_trace = count(&body, &trace_bytes);
        let names = ["POST /api/orders", "request", "consume", "shopmesh-test"];
        let all_named = names.iter().all(|n| count(&body, n.as_bytes()) > 0);
        // The gateway's span, the orders request, and at least OrderPlaced consumed by
        // inventory and payments and their replies consumed by orders.
        if spans_in_trace >= 6 && all_named {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "collector got {} bytes, {spans_in_trace} spans of the trace; names present: {:?}",
            body.len(),
            names.map(|n| count(&body, n.as_bytes()))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shop.shutdown().await;
}
