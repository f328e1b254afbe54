//! No secret, token or personal data in the logs: a whole session (register, sign in,
//! refresh, profile with an address, an order with a card, logout) with every log line of
//! every service and the gateway captured at debug level, then searched for what must never
//! be there.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use shopmesh_test_support::TestShop;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_session_leaves_no_secret_or_personal_data_in_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let shop = TestShop::start().await;
    let email = "grace.hopper.logs@example.test";
    let password = "cobol-and-nanoseconds";
    let street = "7 Secret Lane";
    let card = "4242424242424242";
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": email, "password": password, "name": "Grace Hopper"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let pair: Value = shop
        .http
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let refresh1 = pair["refresh_token"].as_str().unwrap().to_owned();
    // A failed sign-in too: the attempted password must not be logged either.
    shop.http
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": "wrong-guess-logged?"}))
        .send()
        .await
        .unwrap();
    let pair2: Value = shop
        .http
        .post(shop.url("/api/auth/refresh"))
        .json(&json!({"refresh_token": refresh1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refresh2 = pair2["refresh_token"].as_str().unwrap().to_owned();
    let res = shop
        .http
        .patch(shop.url("/api/users/me"))
        .bearer_auth(&access)
        .json(
            &json!({"addresses": [{"recipient": "Grace Hopper", "line1": street,
            "city": "Arlington", "postal_code": "22201", "country": "US"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&access)
        .json(&json!({"items": [{"product_id": shop.product(2), "quantity": 1}], "card": card}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let order: Value = res.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    for _ in 0..100 {
        let o: Value = shop
            .get_json(&format!("/api/orders/{id}"), Some(&access))
            .await;
        if o["status"] != "PENDING" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    shop.http
        .post(shop.url("/api/auth/logout"))
        .json(&json!({"refresh_token": refresh2}))
        .send()
        .await
        .unwrap();
    shop.shutdown().await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.lines().count() > 20, "the logs were captured");
    let secrets = [
        ("email", email),
        ("name", "Grace Hopper"),
        ("password", password),
        ("attempted password", "wrong-guess-logged?"),
        ("street", street),
        ("card", card),
        ("access token", access.as_str()),
        ("refresh token", refresh1.as_str()),
        ("rotated refresh token", refresh2.as_str()),
    ];
    for (what, secret) in secrets {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("the {what} is in the logs: {line}");
        }
    }
}
