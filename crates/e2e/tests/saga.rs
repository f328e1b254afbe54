//! The order saga end to end: placed → reserved + authorized → confirmed, or compensated.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shopmesh_test_support::{ServiceName, TestShop, expect_problem};

async fn place(shop: &TestShop, token: &str, product: &str, quantity: i64, card: &str) -> String {
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(token)
        .json(&json!({"items": [{"product_id": product, "quantity": quantity}], "card": card}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let o: Value = res.json().await.unwrap();
    o["id"].as_str().unwrap().to_owned()
}

/// Polls the order until it leaves PENDING (at most 10 s).
async fn settled(shop: &TestShop, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o: Value = shop
            .get_json(&format!("/api/orders/{id}"), Some(token))
            .await;
        if o["status"] != "PENDING" {
            return o;
        }
        assert!(Instant::now() < deadline, "order {id} still pending: {o}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dead letters, from the admin API.
async fn dead_letters(shop: &TestShop) -> Value {
    shop.http
        .get(format!("{}/dlq", shop.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn stock(shop: &TestShop, product: &str) -> Value {
    shop.get_json(&format!("/api/inventory/{product}"), None)
        .await
}

async fn payments(shop: &TestShop, token: &str, order: &str) -> Vec<Value> {
    let v: Value = shop
        .get_json(&format!("/api/payments?order_id={order}"), Some(token))
        .await;
    v["items"].as_array().unwrap().clone()
}

fn steps(o: &Value) -> Vec<String> {
    o["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap().to_owned())
        .collect()
}

/// A product with at least `n` available.
async fn product_with(shop: &TestShop, n: i64) -> (String, Value) {
    for i in 1..=60 {
        let p = shop.product(i);
        let s = stock(shop, &p).await;
        if s["available"].as_i64().unwrap() >= n {
            return (p, s);
        }
    }
    panic!("no product with {n} available");
}

#[tokio::test]
async fn a_paid_order_for_available_stock_is_confirmed() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let (p, before) = product_with(&shop, 2).await;
    let started = Instant::now();
    let id = place(&shop, &token, &p, 2, "4242424242424242").await;
    let o = settled(&shop, &token, &id).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(o.get("reason").is_none());
    let s = steps(&o);
    assert_eq!(s.first().unwrap(), "placed");
    assert_eq!(s.last().unwrap(), "confirmed");
    assert!(
        s.contains(&"stock_reserved".into()) && s.contains(&"payment_authorized".into()),
        "{s:?}"
    );
    // The stock leaves the shelf and the reservation goes, asynchronously after the decision.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = stock(&shop, &p).await;
        if after["on_hand"].as_i64().unwrap() == before["on_hand"].as_i64().unwrap() - 2 {
            assert_eq!(after["reserved"], before["reserved"]);
            break;
        }
        assert!(Instant::now() < deadline, "stock not committed: {after}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Capture follows the confirmation asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pays = payments(&shop, &token, &id).await;
        assert_eq!(pays.len(), 1);
        if pays[0]["status"] == "CAPTURED" {
            assert_eq!(pays[0]["captured_minor"], o["total_minor"]);
            break;
        }
        assert!(Instant::now() < deadline, "payment not captured: {pays:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_declined_card_cancels_and_releases_the_stock() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let (p, before) = product_with(&shop, 1).await;
    let id = place(&shop, &token, &p, 1, "4000000000000002").await;
    let o = settled(&shop, &token, &id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "payment_declined");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stock(&shop, &p).await["available"] != before["available"] {
        assert!(Instant::now() < deadline, "stock not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stock(&shop, &p).await["on_hand"], before["on_hand"]);
    assert_eq!(payments(&shop, &token, &id).await[0]["status"], "DECLINED");
}

#[tokio::test]
async fn too_many_units_cancel_as_out_of_stock_and_void_the_payment() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let p = shop.product(1);
    let before = stock(&shop, &p).await;
    let too_many = (before["available"].as_i64().unwrap() + 1).min(1000);
    assert!(too_many > before["available"].as_i64().unwrap());
    let id = place(&shop, &token, &p, too_many, "4242424242424242").await;
    let o = settled(&shop, &token, &id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "out_of_stock");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pays = payments(&shop, &token, &id).await;
        if pays.len() == 1 && pays[0]["status"] == "VOIDED" {
            break;
        }
        assert!(Instant::now() < deadline, "payment not voided: {pays:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stock(&shop, &p).await, before);
}

#[tokio::test]
async fn a_silent_participant_times_the_order_out_and_compensates() {
    let shop = TestShop::start_with(|c| {
        c.silent = vec![ServiceName::Payments];
        c.saga_deadline = Duration::from_millis(800);
    })
    .await;
    let (_, token) = shop.user().await;
    let (p, before) = product_with(&shop, 1).await;
    let id = place(&shop, &token, &p, 1, "4242424242424242").await;
    let o = settled(&shop, &token, &id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "timeout");
    // Inventory reserved, then released on the cancellation.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stock(&shop, &p).await != before {
        assert!(Instant::now() < deadline, "stock not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_message_delivered_twice_still_adds_up() {
    let shop = TestShop::start_with(|c| c.duplicate_deliveries = true).await;
    let (_, token) = shop.user().await;
    let (p, before) = product_with(&shop, 6).await;
    let mut ids = Vec::new();
    for card in [
        "4242424242424242",
        "4000000000000002",
        "4242424242424242",
        "4242424242424242",
    ] {
        ids.push((place(&shop, &token, &p, 2, card).await, card));
    }
    ids.push((
        place(&shop, &token, &p, 1000, "4242424242424242").await,
        "oos",
    ));
    let mut confirmed = 0;
    for (id, card) in &ids {
        let o = settled(&shop, &token, id).await;
        match *card {
            "4242424242424242" => {
                assert_eq!(o["status"], "CONFIRMED", "{o}");
                confirmed += 1;
            }
            "4000000000000002" => assert_eq!(o["reason"], "payment_declined"),
            _ => assert_eq!(o["reason"], "out_of_stock"),
        }
        // One payment per order, never two.
        assert_eq!(payments(&shop, &token, id).await.len(), 1);
    }
    // Stock moved exactly once per confirmed order; all reservations settled.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = stock(&shop, &p).await;
        if after["reserved"] == before["reserved"] {
            assert_eq!(
                after["on_hand"].as_i64().unwrap(),
                before["on_hand"].as_i64().unwrap() - 2 * confirmed
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reservations not settled: {after}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idempotency_key_is_bound_to_its_request() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let post = |qty: i64| {
        shop.http
            .post(shop.url("/api/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", "same-key")
            .json(&json!({"items": [{"product_id": shop.product(2), "quantity": qty}], "card": "4242424242424242"}))
            .send()
    };
    assert_eq!(post(1).await.unwrap().status(), 202);
    assert_eq!(post(1).await.unwrap().status(), 200);
    expect_problem(post(2).await.unwrap(), 422).await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_handled_over_the_admin_api() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    // A message no consumer understands, staged the way orders stages its events.
    let db = shopmesh_platform::db::Db::open(&shop.storage.storage.for_service("orders"), 1)
        .await
        .unwrap();
    let poison = json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "test",
        "type": "shop.order.unheard_of", "time": "2026-01-01T00:00:00Z", "subject": "poison",
        "datacontenttype": "application/json", "data": {}});
    sqlx::query(
        "INSERT INTO outbox (id, topic, envelope, created_at) VALUES ($1, 'orders', $2, 0)",
    )
    .bind("00000000-poison")
    .bind(poison.to_string())
    .execute(&db.pool)
    .await
    .unwrap();

    // Inventory and payments both park it, and keep working.
    let (p, _) = product_with(&shop, 1).await;
    let id = place(&shop, &token, &p, 1, "4242424242424242").await;
    assert_eq!(settled(&shop, &token, &id).await["status"], "CONFIRMED");
    let deadline = Instant::now() + Duration::from_secs(5);
    let letters = loop {
        let v = dead_letters(&shop).await;
        if v.as_array().unwrap().len() == 2 {
            break v;
        }
        assert!(Instant::now() < deadline, "dead letters: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut services: Vec<&str> = letters
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["service"].as_str().unwrap())
        .collect();
    services.sort();
    assert_eq!(services, ["inventory", "payments"]);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown event type")
    );
    let first = letters[0]["id"].as_str().unwrap();

    let one: Value = shop
        .http
        .get(format!("{}/dlq/{first}", shop.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], first);
    expect_problem(
        shop.http
            .get(format!("{}/dlq/nope", shop.admin))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    // Replay: it is handled again (and, still poison, parked again under a new id).
    let res = shop
        .http
        .post(format!("{}/dlq/{first}/replay", shop.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    expect_problem(
        shop.http
            .get(format!("{}/dlq/{first}", shop.admin))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = dead_letters(&shop).await;
        if v.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replayed message not parked again: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Purge.
    let v = dead_letters(&shop).await;
    for l in v.as_array().unwrap() {
        let res = shop
            .http
            .delete(format!("{}/dlq/{}", shop.admin, l["id"].as_str().unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204);
    }
    let v = dead_letters(&shop).await;
    assert!(v.as_array().unwrap().is_empty());
}

#[tokio::test]
async fn the_saga_carries_the_request_trace() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"items": [{"product_id": shop.product(5), "quantity": 1}], "card": "4242424242424242"}))
        .send()
        .await
        .unwrap();
    let placed: Value = res.json().await.unwrap();
    assert_eq!(placed["trace_id"], trace);
    let o = settled(&shop, &token, placed["id"].as_str().unwrap()).await;
    assert_eq!(o["trace_id"], trace);
    // Without one, the gateway starts a trace.
    let id = place(&shop, &token, &shop.product(5), 1, "4242424242424242").await;
    let o = settled(&shop, &token, &id).await;
    let t = o["trace_id"].as_str().unwrap();
    assert!(t.len() == 32 && t != trace, "{t}");
}

#[tokio::test]
async fn card_numbers_are_vaulted_and_stored_nowhere_else() {
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let ok = place(&shop, &token, &shop.product(7), 1, "4242 4242 4242 4242").await;
    let declined = place(&shop, &token, &shop.product(7), 1, "4000000000000002").await;
    assert_eq!(settled(&shop, &token, &ok).await["status"], "CONFIRMED");
    let d = settled(&shop, &token, &declined).await;
    assert_eq!(d["reason"], "payment_declined");
    assert_eq!(d["card_last4"], "0002");

    // A card vaulted first, then an order that names it.
    let res = shop
        .http
        .post(shop.url("/api/payment-methods"))
        .bearer_auth(&token)
        .json(&json!({"card": "5555555555554444"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let pm: Value = res.json().await.unwrap();
    assert_eq!(pm["card_last4"], "4444");
    assert_eq!(pm["card_brand"], "mastercard");
    let pm_id = pm["id"].as_str().unwrap();
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"product_id": shop.product(7), "quantity": 1}], "payment_method": pm_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let o: Value = res.json().await.unwrap();
    assert_eq!(o["card_last4"], "4444");
    let o = settled(&shop, &token, o["id"].as_str().unwrap()).await;
    assert_eq!(o["status"], "CONFIRMED");

    // Someone else's method, both or neither means of payment: 422.
    let (_, other) = shop.user().await;
    for body in [
        json!({"items": [{"product_id": shop.product(7), "quantity": 1}], "payment_method": pm_id}),
        json!({"items": [{"product_id": shop.product(7), "quantity": 1}], "payment_method": pm_id, "card": "4242424242424242"}),
        json!({"items": [{"product_id": shop.product(7), "quantity": 1}]}),
    ] {
        let res = shop
            .http
            .post(shop.url("/api/orders"))
            .bearer_auth(&other)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_problem(res, 422).await;
    }

    // The numbers are in no file: not the services' databases (on SQLite), not the broker's.
    let mut files = 0;
    for entry in std::fs::read_dir(shop.storage.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            files += 1;
            for pan in ["4242424242424242", "4000000000000002", "5555555555554444"] {
                assert!(
                    !bytes.windows(pan.len()).any(|w| w == pan.as_bytes()),
                    "{pan} found in {}",
                    path.display()
                );
            }
        }
    }
    if shop.storage.broker == shopmesh_test_support::BrokerUrl::Embedded {
        assert!(files >= 2, "the broker's files at least");
    }
}
