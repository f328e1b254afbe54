//! The shop through its gateway: browse, register, log in, order; errors as problem+json.

use serde_json::{Value, json};
use shopmesh_test_support::{ServiceName, TEST_PRODUCTS, TestShop, expect_problem};

#[tokio::test]
async fn browse_products() {
    let shop = TestShop::start().await;
    let res = shop.get("/api/products?limit=5", None).await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(page["total"], TEST_PRODUCTS);
    let id = items[0]["id"].as_str().unwrap();

    let one: Value = shop.get_json(&format!("/api/products/{id}"), None).await;
    assert_eq!(one["product"]["id"], id);
    assert!(one["product"]["sku"].as_str().unwrap().starts_with("SKU-"));

    // Search by category and text, pagination.
    let cat: Value = shop
        .get_json("/api/products?category=books&limit=100", None)
        .await;
    let books = cat["items"].as_array().unwrap();
    assert_eq!(books.len(), TEST_PRODUCTS / 20);
    assert!(books.iter().all(|p| p["category"] == "books"));
    let name = books[0]["name"]
        .as_str()
        .unwrap()
        .split(' ')
        .nth(2)
        .unwrap()
        .to_lowercase();
    let found: Value = shop
        .get_json(&format!("/api/products?q={name}&limit=100"), None)
        .await;
    assert!(found["total"].as_i64().unwrap() >= 1);
    assert!(found["items"].as_array().unwrap().iter().all(|p| {
        let hay = format!("{} {} {}", p["name"], p["description"], p["sku"]).to_lowercase();
        hay.contains(&name)
    }));
    let page2: Value = shop.get_json("/api/products?limit=5&offset=5", None).await;
    assert_ne!(page2["items"][0]["id"], items[0]["id"]);
    assert_eq!(page2["items"][0]["sku"], "SKU-000006");

    // Unknown product, bad paging.
    let p = expect_problem(shop.get("/api/products/nope", None).await, 404).await;
    assert!(p["detail"].as_str().unwrap().contains("nope"));
    expect_problem(shop.get("/api/products?limit=0", None).await, 422).await;
    expect_problem(shop.get("/api/products?limit=abc", None).await, 400).await;
}

/// The aggregation pattern's contract: the product page in one call, lists enriched.
#[tokio::test]
async fn the_product_page_and_lists_are_composed_by_the_gateway() {
    let shop = TestShop::start().await;
    // The first product has a promotion of its own (every 30th product does).
    let id = shop.product(1);
    let res = shop.get(&format!("/api/products/{id}"), None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-aggregate-complete"], "true");
    let page: Value = res.json().await.unwrap();
    assert_eq!(page["product"]["id"], id);
    let stock: Value = shop.get_json(&format!("/api/inventory/{id}"), None).await;
    assert_eq!(page["inventory"]["available"], stock["available"]);
    let price: Value = shop.get_json(&format!("/api/prices/{id}"), None).await;
    assert_eq!(page["price"]["amount_minor"], price["amount_minor"]);
    let category = page["product"]["category"].as_str().unwrap();
    let promos: Value = shop
        .get_json(
            &format!("/api/promotions?product_id={id}&category={category}&limit=100"),
            None,
        )
        .await;
    assert_eq!(page["promotions"], promos["items"]);
    assert!(!page["promotions"].as_array().unwrap().is_empty());

    // `_parts` on request: every part answered 200.
    let res = shop
        .http
        .get(shop.url(&format!("/api/products/{id}")))
        .header("x-aggregate-parts", "true")
        .send()
        .await
        .unwrap();
    let page: Value = res.json().await.unwrap();
    for part in ["product", "inventory", "price", "promotions"] {
        assert_eq!(page["_parts"][part]["status"], 200, "{part}: {page}");
    }

    // A list: every item carries its price and availability.
    let list: Value = shop.get_json("/api/products?limit=20", None).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    for item in items {
        assert!(
            item["price"]["amount_minor"].as_i64().unwrap() > 0,
            "{item}"
        );
        assert!(item["inventory"]["available"].is_i64(), "{item}");
    }
    let first = items[0]["id"].as_str().unwrap();
    let stock: Value = shop
        .get_json(&format!("/api/inventory/{first}"), None)
        .await;
    assert_eq!(items[0]["inventory"]["available"], stock["available"]);

    // Writes on those paths still reach the catalog (and its admin check).
    let res = shop
        .http
        .post(shop.url("/api/products"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn stock_prices_and_promotions_are_seeded_and_served() {
    let shop = TestShop::start().await;
    let id = shop.product(1);
    let stock: Value = shop.get_json(&format!("/api/inventory/{id}"), None).await;
    assert_eq!(
        stock["available"].as_i64().unwrap(),
        stock["on_hand"].as_i64().unwrap() - stock["reserved"].as_i64().unwrap()
    );
    let price: Value = shop.get_json(&format!("/api/prices/{id}"), None).await;
    assert_eq!(price["currency"], "USD");
    assert!(price["amount_minor"].as_i64().unwrap() > 0);
    let batch: Value = shop
        .get_json(
            &format!(
                "/api/prices?ids={},{},unknown",
                shop.product(1),
                shop.product(2)
            ),
            None,
        )
        .await;
    assert_eq!(batch["items"].as_array().unwrap().len(), 2);
    let promos: Value = shop
        .get_json("/api/promotions?active=false&limit=100", None)
        .await;
    // One per 30th product plus three per category.
    assert_eq!(promos["total"], TEST_PRODUCTS.div_ceil(30) as i64 + 60);
}

#[tokio::test]
async fn register_login_and_order() {
    let shop = TestShop::start().await;
    let email = format!("{}@example.test", uuid::Uuid::new_v4().simple());
    let reg = json!({"email": email, "password": "s3cret-enough", "name": "Ada"});
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let user: Value = res.json().await.unwrap();
    assert!(user.get("password_hash").is_none());
    let dup = shop
        .http
        .post(shop.url("/api/users"))
        .json(&reg)
        .send()
        .await
        .unwrap();
    expect_problem(dup, 409).await;
    let bad = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": "not-an-email", "password": "short", "name": ""}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(bad, 422).await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 3);

    // Login: right password → token; wrong password and unknown email → the same 401.
    let res = shop
        .http
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": "s3cret-enough"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let tok: Value = res.json().await.unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    assert!(tok["expires_in"].as_u64().unwrap() > 0);
    let token = tok["access_token"].as_str().unwrap().to_owned();
    let wrong = expect_problem(
        shop.http
            .post(shop.url("/api/auth/token"))
            .json(&json!({"email": email, "password": "nope-nope"}))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    let unknown = expect_problem(
        shop.http
            .post(shop.url("/api/auth/token"))
            .json(&json!({"email": "nobody@example.test", "password": "nope-nope"}))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert_eq!(wrong, unknown);

    // Profile.
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    assert_eq!(me["email"], email);
    let me: Value = shop
        .http
        .patch(shop.url("/api/users/me"))
        .bearer_auth(&token)
        .json(&json!({"name": "Ada L."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["name"], "Ada L.");

    // Order.
    let (p1, p2) = (shop.product(3), shop.product(4));
    let order = json!({"items": [{"product_id": p1, "quantity": 2}, {"product_id": p2, "quantity": 1}], "card": "4242424242424242"});
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let placed: Value = res.json().await.unwrap();
    assert_eq!(placed["status"], "PENDING");
    let prices: Value = shop
        .get_json(&format!("/api/prices?ids={p1},{p2}"), None)
        .await;
    let expected: i64 = prices["items"][0]["amount_minor"].as_i64().unwrap() * 2
        + prices["items"][1]["amount_minor"].as_i64().unwrap();
    assert_eq!(placed["total_minor"], expected);
    assert_eq!(placed["card_last4"], "4242");
    let id = placed["id"].as_str().unwrap();

    let got: Value = shop
        .get_json(&format!("/api/orders/{id}"), Some(&token))
        .await;
    assert_eq!(got["status"], "PENDING");
    assert_eq!(got["items"].as_array().unwrap().len(), 2);
    let mine: Value = shop.get_json("/api/orders", Some(&token)).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);

    // Someone else sees neither the order nor it in their list.
    let (_, other) = shop.user().await;
    expect_problem(
        shop.get(&format!("/api/orders/{id}"), Some(&other)).await,
        404,
    )
    .await;
    let theirs: Value = shop.get_json("/api/orders", Some(&other)).await;
    assert!(theirs["items"].as_array().unwrap().is_empty());

    // No token.
    expect_problem(shop.get("/api/orders", None).await, 401).await;
    expect_problem(
        shop.http
            .post(shop.url("/api/orders"))
            .json(&order)
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
}

#[tokio::test]
async fn order_validation() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let post = |body: String, ct: &'static str| {
        shop.http
            .post(shop.url("/api/orders"))
            .bearer_auth(&token)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    expect_problem(
        post("{\"items\": [".into(), "application/json")
            .await
            .unwrap(),
        400,
    )
    .await;
    expect_problem(post("{}".into(), "text/plain").await.unwrap(), 415).await;
    expect_problem(
        post("{\"items\": 3, \"card\": 1}".into(), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    let p1 = shop.product(1);
    let body = |items: Value, card: &str| json!({"items": items, "card": card}).to_string();
    expect_problem(
        post(body(json!([]), "4242424242424242"), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    expect_problem(
        post(
            body(
                json!([{"product_id": p1, "quantity": 0}]),
                "4242424242424242",
            ),
            "application/json",
        )
        .await
        .unwrap(),
        422,
    )
    .await;
    let p = expect_problem(
        post(
            body(
                json!([{"product_id": p1, "quantity": 1}]),
                "4242424242424241",
            ),
            "application/json",
        )
        .await
        .unwrap(),
        422,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "card");
    let p = expect_problem(
        post(
            body(
                json!([{"product_id": "no-such-product", "quantity": 1}]),
                "4242424242424242",
            ),
            "application/json",
        )
        .await
        .unwrap(),
        422,
    )
    .await;
    assert_eq!(p["unknown_products"][0], "no-such-product");
    expect_problem(
        post(
            body(
                json!([{"product_id": p1, "quantity": 1}, {"product_id": p1, "quantity": 2}]),
                "4242424242424242",
            ),
            "application/json",
        )
        .await
        .unwrap(),
        422,
    )
    .await;

    // Idempotency-Key: a retried request returns the original order.
    let good = body(
        json!([{"product_id": p1, "quantity": 1}]),
        "4242424242424242",
    );
    let send = || {
        shop.http
            .post(shop.url("/api/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", "k-1")
            .header("content-type", "application/json")
            .body(good.clone())
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    // The same key with another card is another request: 422.
    let other_card = body(
        json!([{"product_id": p1, "quantity": 1}]),
        "4000000000000002",
    );
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("idempotency-key", "k-1")
        .header("content-type", "application/json")
        .body(other_card)
        .send()
        .await
        .unwrap();
    expect_problem(res, 422).await;
    let mine: Value = shop.get_json("/api/orders", Some(&token)).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn payments_with_test_cards() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let authorize = |card: &str| {
        shop.http
            .post(shop.url("/api/payments"))
            .bearer_auth(&token)
            .json(
                &json!({"order_id": "o-1", "amount_minor": 1250, "currency": "USD", "card": card}),
            )
            .send()
    };
    let ok: Value = authorize("4242424242424242")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok["status"], "AUTHORIZED");
    let declined: Value = authorize("4000000000000002")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(declined["status"], "DECLINED");
    let id = ok["id"].as_str().unwrap();
    let act = |what: &str| {
        shop.http
            .post(shop.url(&format!("/api/payments/{id}/{what}")))
            .bearer_auth(&token)
            .send()
    };
    let captured: Value = act("capture").await.unwrap().json().await.unwrap();
    assert_eq!(captured["status"], "CAPTURED");
    expect_problem(act("void").await.unwrap(), 409).await;
    let refunded: Value = act("refund").await.unwrap().json().await.unwrap();
    assert_eq!(refunded["status"], "REFUNDED");
    expect_problem(
        shop.http
            .post(shop.url("/api/payments"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let shop = TestShop::start().await;
    expect_problem(shop.get("/nowhere", None).await, 404).await;
    expect_problem(shop.get("/api/productsx", None).await, 404).await;
    expect_problem(
        shop.http
            .delete(shop.url("/api/products"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
    expect_problem(shop.get("/api/products/1/2/3", None).await, 404).await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    // Over the gateway's 1 MiB limit: refused by the gateway from Content-Length.
    let huge = format!(
        "{{\"items\": [], \"card\": \"{}\"}}",
        "4".repeat(2 * 1024 * 1024)
    );
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_problem(res, 413).await;
    // Under the gateway's limit, over the service's 64 KiB: refused by the service.
    let big = format!(
        "{{\"items\": [], \"card\": \"{}\"}}",
        "4".repeat(100 * 1024)
    );
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    expect_problem(res, 413).await;
}

#[tokio::test]
async fn streamed_bodies_are_cut_at_the_gateway_limit() {
    // The gateway's limit below the service's, so the gateway is the one that cuts.
    let shop = TestShop::start_with(|c| c.max_body_bytes = 16 * 1024).await;
    let (_, token) = shop.user().await;
    // No Content-Length (chunked): the gateway counts while streaming and stops at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 8 * 1024])).collect();
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_problem(res, 413).await;
}

#[tokio::test]
async fn request_ids_are_kept_or_minted() {
    let shop = TestShop::start().await;
    let res = shop
        .http
        .get(shop.url("/api/products?limit=1"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-me-42");
    let res = shop.get("/api/products?limit=1", None).await;
    assert!(res.headers()["x-request-id"].len() >= 32);
    let res = shop
        .http
        .get(shop.url("/nowhere"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn metrics_and_openapi() {
    let shop = TestShop::start().await;
    shop.get("/api/products?limit=1", None).await;
    let res = shop
        .http
        .get(format!("{}/metrics", shop.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    assert!(text.contains("gateway_requests_total{"), "{text}");
    assert!(text.contains("http_server_requests_total{"), "{text}");
    assert!(
        text.contains("gateway_request_duration_seconds_bucket"),
        "{text}"
    );
    for name in ServiceName::ALL {
        let doc: Value = shop
            .http
            .get(shop.service_url(name, "/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{name}"
        );
        assert!(!doc["paths"].as_object().unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn a_restart_reuses_the_data() {
    let shop = TestShop::start().await;
    let email = format!("{}@example.test", uuid::Uuid::new_v4().simple());
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": email, "password": "persisted!", "name": "P"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = shop.login(&email, "persisted!").await;
    let shop = shop.restart().await;
    // The same signing key verifies the old token; the user and the catalog are still there.
    let me = shop.get("/api/users/me", Some(&token)).await;
    assert_eq!(me.status(), 200);
    shop.login(&email, "persisted!").await;
    let page: Value = shop.get_json("/api/products?limit=1", None).await;
    assert_eq!(page["total"], TEST_PRODUCTS);
    shop.shutdown().await;
}

/// `shopmesh up --mesh`: orders reaches pricing, payments and users only through the
/// sidecars (its clients address them by name, `http://pricing`, which nothing but its
/// outbound sidecar resolves), over mutual TLS; the inbound sidecars refuse plain HTTP.
#[tokio::test]
async fn orders_call_pricing_payments_and_users_through_the_mesh() {
    let shop = TestShop::start_with(|c| {
        c.mesh = c.broker_path.parent().map(|d| d.join("mesh"));
    })
    .await;
    let mesh = shop.system().mesh.as_ref().expect("the mesh runs");
    assert_eq!(mesh.inbound.len(), 3);
    let metrics_before = shop.metrics().await;

    let (_, token) = shop.user().await;
    let p1 = shop.product(5);
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"product_id": p1, "quantity": 2}], "card": "4242424242424242"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    let placed: Value = res.json().await.unwrap();
    let prices: Value = shop.get_json(&format!("/api/prices?ids={p1}"), None).await;
    assert_eq!(
        placed["total_minor"],
        prices["items"][0]["amount_minor"].as_i64().unwrap() * 2,
        "priced by pricing, through the mesh"
    );
    assert_eq!(
        placed["card_last4"], "4242",
        "the card went to payments' vault"
    );

    // Each hop was reported by both sidecars, with Istio's labels.
    let metrics = shop.metrics().await;
    let count = |text: &str, reporter: &str, to: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains("source_workload=\"orders\"")
                    && l.contains(&format!("destination_workload=\"{to}\""))
                    && (l.contains("response_code=\"200\"") || l.contains("response_code=\"201\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for to in ["pricing", "payments", "users"] {
        for reporter in ["source", "destination"] {
            assert!(
                count(&metrics, reporter, to) > count(&metrics_before, reporter, to),
                "no {reporter}-reported orders → {to} request"
            );
        }
    }

    // The inbound side speaks only mutual TLS.
    for (service, at) in &mesh.inbound {
        let plain = shop
            .http
            .get(format!("http://{at}/api/prices?ids={p1}"))
            .send()
            .await;
        match plain {
            Err(_) => {}
            Ok(r) => assert!(
                !r.status().is_success(),
                "{service}'s sidecar answered plain HTTP with {}",
                r.status()
            ),
        }
    }
    shop.shutdown().await;
}
