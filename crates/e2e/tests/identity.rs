//! The user center as an identity provider, through the gateway: refresh tokens rotated on
//! every use with reuse detection, logout, optimistic concurrency on the profile (`ETag`,
//! `If-Match`), addresses, login throttling, and the JWKS.

use serde_json::{Value, json};
use shopmesh_test_support::{TestShop, expect_problem};

async fn register(shop: &TestShop) -> String {
    let email = format!("{}@example.test", uuid::Uuid::new_v4().simple());
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": email, "password": "correct horse battery", "name": "Ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    email
}

async fn sign_in(shop: &TestShop, email: &str) -> Value {
    let res = shop
        .http
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn access(shop: &TestShop, email: &str) -> String {
    sign_in(shop, email).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn refresh(shop: &TestShop, token: &Value) -> reqwest::Response {
    shop.http
        .post(shop.url("/api/auth/refresh"))
        .json(&json!({"refresh_token": token}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_session() {
    let shop = TestShop::start().await;
    let email = register(&shop).await;
    let first = sign_in(&shop, &email).await;
    assert!(first["refresh_token"].as_str().unwrap().len() >= 40);
    assert!(first["refresh_expires_in"].as_u64().unwrap() > 3600);

    // Rotation: a new pair, and the new access token works.
    let res = refresh(&shop, &first["refresh_token"]).await;
    assert_eq!(res.status(), 200);
    let second: Value = res.json().await.unwrap();
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let me = shop
        .get("/api/users/me", second["access_token"].as_str())
        .await;
    assert_eq!(me.status(), 200);
    let third: Value = refresh(&shop, &second["refresh_token"])
        .await
        .json()
        .await
        .unwrap();

    // The first token again: reuse. 401, and the whole family is revoked, including the
    // newest token, which an attacker holding the copy might otherwise keep using.
    let p = expect_problem(refresh(&shop, &first["refresh_token"]).await, 401).await;
    assert!(
        p["detail"].as_str().unwrap().contains("already used"),
        "{p}"
    );
    expect_problem(refresh(&shop, &third["refresh_token"]).await, 401).await;

    // Another sign-in is another family, untouched by that revocation.
    let other = sign_in(&shop, &email).await;
    let res = refresh(&shop, &other["refresh_token"]).await;
    assert_eq!(res.status(), 200);
    let after: Value = res.json().await.unwrap();

    // Logout ends that session.
    let res = shop
        .http
        .post(shop.url("/api/auth/logout"))
        .json(&json!({"refresh_token": after["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    expect_problem(refresh(&shop, &after["refresh_token"]).await, 401).await;

    // Garbage, empty and oversized tokens are plain 401s.
    for bad in [json!("nope"), json!(""), json!("x".repeat(10_000))] {
        expect_problem(refresh(&shop, &bad).await, 401).await;
    }
    let res = shop
        .http
        .post(shop.url("/api/auth/refresh"))
        .json(&json!({"token": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    shop.shutdown().await;
}

#[tokio::test]
async fn concurrent_refreshes_with_one_token_cannot_both_win() {
    let shop = TestShop::start().await;
    let email = register(&shop).await;
    let pair = sign_in(&shop, &email).await;
    let token = pair["refresh_token"].clone();
    let (a, b) = tokio::join!(refresh(&shop, &token), refresh(&shop, &token));
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    // One successor; the loser is a reuse (and revokes the family, the winner's new token
    // with it: the client raced itself and must sign in again).
    assert_eq!(
        statuses,
        [200, 401],
        "one token, one successor, never a 500"
    );
    shop.shutdown().await;
}

#[tokio::test]
async fn the_profile_is_updated_under_if_match() {
    let shop = TestShop::start().await;
    let email = register(&shop).await;
    let token = access(&shop, &email).await;
    let res = shop.get("/api/users/me", Some(&token)).await;
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["addresses"], json!([]));

    let patch = |body: Value, if_match: Option<&str>| {
        let mut req = shop
            .http
            .patch(shop.url("/api/users/me"))
            .bearer_auth(&token)
            .json(&body);
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        req.send()
    };
    let home = json!({"label": "home", "recipient": "Ada Lovelace", "line1": "12 St James's Square",
                      "city": "London", "postal_code": "SW1Y 4JH", "country": "GB"});
    let res = patch(json!({"addresses": [home]}), Some(&etag))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let new_etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_etag, etag);
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["addresses"][0]["city"], "London");
    assert_eq!(me["name"], "Ada", "absent fields stay");

    // Read your writes.
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    assert_eq!(me["addresses"][0]["postal_code"], "SW1Y 4JH");

    // The stale ETag: 412, nothing changed.
    let p = expect_problem(
        patch(json!({"name": "Someone else"}), Some(&etag))
            .await
            .unwrap(),
        412,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("changed"));
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    assert_eq!(me["name"], "Ada");
    // A weak tag never matches; `*` always does; no If-Match is an unconditional write.
    let weak = format!("W/{new_etag}");
    expect_problem(patch(json!({"name": "B"}), Some(&weak)).await.unwrap(), 412).await;
    assert_eq!(
        patch(json!({"name": "C"}), Some("*"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        patch(json!({"name": "D"}), None).await.unwrap().status(),
        200
    );

    // Bad addresses: every problem named.
    let bad =
        json!({"recipient": "", "line1": "x", "city": "y", "postal_code": "z", "country": "gb"});
    let p = expect_problem(patch(json!({"addresses": [bad]}), None).await.unwrap(), 422).await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["addresses[0].recipient", "addresses[0].country"]);
    let eleven = vec![home; 11];
    expect_problem(
        patch(json!({"addresses": eleven}), None).await.unwrap(),
        422,
    )
    .await;
    shop.shutdown().await;
}

#[tokio::test]
async fn sign_in_is_throttled_per_account_alike_for_unknown_emails() {
    let shop = TestShop::start().await;
    let email = register(&shop).await;
    let attempt = |email: String, password: &'static str| {
        shop.http
            .post(shop.url("/api/auth/token"))
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    for target in [email.clone(), "nobody-here@example.test".to_owned()] {
        let mut statuses = Vec::new();
        for _ in 0..12 {
            statuses.push(
                attempt(target.clone(), "wrong password")
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
        assert_eq!(statuses[10..], [429, 429], "{statuses:?}");
    }
    // The throttled answer says when to retry; even the right password waits.
    let res = attempt(email.clone(), "correct horse battery")
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Another account is not affected.
    let other = register(&shop).await;
    assert_eq!(sign_in(&shop, &other).await["token_type"], "Bearer");
    shop.shutdown().await;
}

#[tokio::test]
async fn every_published_key_has_a_kid() {
    let shop = TestShop::start().await;
    let jwks: Value = shop.get_json("/.well-known/jwks.json", None).await;
    let keys = jwks["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k["kid"].as_str().is_some_and(|k| !k.is_empty()))
    );
    shop.shutdown().await;
}

#[tokio::test]
async fn admins_list_disable_and_promote_and_a_disabled_users_tokens_stop_at_the_gateway() {
    let poll = |cfg: &mut shopmesh_test_support::SystemConfig| cfg.revocations_poll_ms = 200;
    let shop = TestShop::start_with(poll).await;
    // A configured email registering gets no privilege (emails are not verified): it
    // becomes admin when the shop starts with it as a bootstrap administrator.
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": "root@example.test", "password": "correct horse battery", "name": "Root"}))
        .send()
        .await
        .unwrap();
    let root: Value = res.json().await.unwrap();
    assert_eq!(root["role"], "customer");
    let shop = shop
        .restart_with(|cfg| {
            poll(cfg);
            cfg.admin_emails = vec!["Root@Example.test".into()];
        })
        .await;
    let admin = access(&shop, "root@example.test").await;
    let root: Value = shop.get_json("/api/users/me", Some(&admin)).await;
    assert_eq!(root["role"], "admin");

    let email = register(&shop).await;
    let user_pair = sign_in(&shop, &email).await;
    let user = user_pair["access_token"].as_str().unwrap().to_owned();
    let me: Value = shop.get_json("/api/users/me", Some(&user)).await;
    let id = me["id"].as_str().unwrap().to_owned();

    // Customers are kept out by the gateway's route (roles: [admin]).
    expect_problem(shop.get("/api/admin/users", Some(&user)).await, 403).await;
    expect_problem(shop.get("/api/admin/users", None).await, 401).await;

    // Search.
    let page: Value = shop
        .get_json(
            &format!("/api/admin/users?q={}", &email[..10]),
            Some(&admin),
        )
        .await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], id.as_str());
    let admins: Value = shop
        .get_json("/api/admin/users?role=admin", Some(&admin))
        .await;
    assert_eq!(admins["total"], 1);
    expect_problem(
        shop.get("/api/admin/users?role=root", Some(&admin)).await,
        422,
    )
    .await;

    let administer = |target: String, body: Value| {
        shop.http
            .patch(shop.url(&format!("/api/admin/users/{target}")))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    // Disable: the user's access token stops working at the gateway within the poll
    // interval (200 ms here), their session cannot be refreshed, they cannot sign in.
    let res = administer(id.clone(), json!({"status": "disabled"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let disabled_at = std::time::Instant::now();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "disabled");
    loop {
        let res = shop.get("/api/users/me", Some(&user)).await;
        if res.status() == 401 {
            let p: Value = res.json().await.unwrap();
            assert_eq!(p["detail"], "the access token was revoked; sign in again");
            break;
        }
        assert!(
            disabled_at.elapsed() < std::time::Duration::from_secs(3),
            "the disabled user's token still works after 3 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(disabled_at.elapsed() < std::time::Duration::from_secs(2));
    expect_problem(refresh(&shop, &user_pair["refresh_token"]).await, 401).await;
    let res = shop
        .http
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Enable and promote: they sign in again, as an admin.
    let res = administer(id.clone(), json!({"status": "active", "role": "admin"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Re-enabling reaches the gateway within the poll interval too; the tokens issued
    // before the disabling stay refused for as long as they could live.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let p = expect_problem(shop.get("/api/users/me", Some(&user)).await, 401).await;
    assert_eq!(p["detail"], "the access token was revoked; sign in again");
    let token = access(&shop, &email).await;
    assert_eq!(
        shop.get("/api/admin/users", Some(&token)).await.status(),
        200
    );

    // What admins cannot do.
    let root_id = root["id"].as_str().unwrap().to_owned();
    expect_problem(
        administer(root_id, json!({"status": "disabled"}))
            .await
            .unwrap(),
        409,
    )
    .await;
    expect_problem(
        administer(id.clone(), json!({"role": "god"}))
            .await
            .unwrap(),
        422,
    )
    .await;
    expect_problem(
        administer("nope".into(), json!({"role": "admin"}))
            .await
            .unwrap(),
        404,
    )
    .await;
    expect_problem(administer(id, json!({"email": "x"})).await.unwrap(), 422).await;
    shop.shutdown().await;
}

fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_key_rotation_keeps_tokens_in_flight_working() {
    let fast = |cfg: &mut shopmesh_test_support::SystemConfig| {
        cfg.key_activation = std::time::Duration::from_millis(1000);
        cfg.jwks_refresh_ms = 200;
    };
    let (shop, admin) = TestShop::start_with(fast)
        .await
        .with_admin("keys@example.test", fast)
        .await;
    let email = register(&shop).await;
    // Two tokens under the old key: one the gateway has seen, one it has not.
    let seen = access(&shop, &email).await;
    let unseen = access(&shop, &email).await;
    assert_eq!(shop.get("/api/users/me", Some(&seen)).await.status(), 200);

    let res = shop
        .http
        .post(shop.url("/api/admin/keys/rotate"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_kid, kid(&seen));

    // The new key is published at once but does not sign yet.
    let before = access(&shop, &email).await;
    assert_eq!(kid(&before), kid(&seen));
    let jwks: Value = shop.get_json("/.well-known/jwks.json", None).await;
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == new_kid.as_str())
    );
    // Once it takes over, new tokens carry its kid; the old key stays published.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let fresh = access(&shop, &email).await;
    assert_eq!(kid(&fresh), new_kid);
    let jwks: Value = shop.get_json("/.well-known/jwks.json", None).await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&new_kid.as_str()) && kids.contains(&kid(&seen).as_str()),
        "{kids:?}"
    );

    // All of them work at the gateway, which fetched the new key before it signed.
    for t in [&seen, &unseen, &before, &fresh] {
        assert_eq!(shop.get("/api/users/me", Some(t)).await.status(), 200);
    }
    // Customers cannot rotate.
    let res = shop
        .http
        .post(shop.url("/api/admin/keys/rotate"))
        .bearer_auth(&fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    shop.shutdown().await;
}

/// The shared data pattern through the user center's interface: orders read the account
/// (cached, invalidated by `user.updated` events) to refuse disabled accounts and to
/// snapshot the shipping address.
#[tokio::test]
async fn orders_read_accounts_through_the_user_centers_interface() {
    use shopmesh_test_support::ServiceName;
    let (shop, admin) = TestShop::start()
        .await
        .with_admin("ops@example.test", |_| {})
        .await;
    let email = register(&shop).await;
    let token = access(&shop, &email).await;
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    let user_id = me["id"].as_str().unwrap().to_owned();
    let address = |city: &str| json!({"recipient": "Ada", "line1": "1 Main St", "city": city, "postal_code": "1000", "country": "BE"});
    let set_addresses = |list: Value| {
        shop.http
            .patch(shop.url("/api/users/me"))
            .bearer_auth(&token)
            .json(&json!({"addresses": list}))
            .send()
    };
    let product = shop.product(7);
    let order = |ship_to: Option<usize>| {
        let mut body =
            json!({"items": [{"product_id": product, "quantity": 1}], "card": "4242424242424242"});
        if let Some(i) = ship_to {
            body["ship_to"] = json!(i);
        }
        shop.http
            .post(shop.url("/api/orders"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    // No address yet: the order has none.
    let res = order(None).await.unwrap();
    assert_eq!(res.status(), 202);
    let o: Value = res.json().await.unwrap();
    assert!(o.get("shipping_address").is_none(), "{o}");

    // An address: the next order ships there (the directory's copy was dropped by the
    // `user.updated` event). Measure how long the change takes to be seen.
    assert_eq!(
        set_addresses(json!([address("Brussels")]))
            .await
            .unwrap()
            .status(),
        200
    );
    let changed = std::time::Instant::now();
    let first = loop {
        let o: Value = order(None).await.unwrap().json().await.unwrap();
        if o["shipping_address"]["city"] == "Brussels" {
            break o;
        }
        assert!(
            changed.elapsed() < std::time::Duration::from_secs(5),
            "the change was never seen: {o}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    eprintln!(
        "consistency window (profile change → seen by orders): {:?}",
        changed.elapsed()
    );

    // Another change: new orders see it; the order already placed keeps its snapshot.
    set_addresses(json!([address("Ghent"), address("Liège")]))
        .await
        .unwrap();
    let changed = std::time::Instant::now();
    loop {
        let o: Value = order(Some(1)).await.unwrap().json().await.unwrap();
        if o["shipping_address"]["city"] == "Liège" {
            break;
        }
        assert!(changed.elapsed() < std::time::Duration::from_secs(5), "{o}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let id = first["id"].as_str().unwrap();
    let placed: Value = shop
        .get_json(&format!("/api/orders/{id}"), Some(&token))
        .await;
    assert_eq!(placed["shipping_address"]["city"], "Brussels");
    let p = expect_problem(order(Some(5)).await.unwrap(), 422).await;
    assert_eq!(p["errors"][0]["field"], "ship_to");

    // Disabled: the orders service itself refuses (asked directly, past the gateway's own
    // check), once the event has reached it.
    let res = shop
        .http
        .patch(shop.url(&format!("/api/admin/users/{user_id}")))
        .bearer_auth(&admin)
        .json(&json!({"status": "disabled"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let disabled = std::time::Instant::now();
    loop {
        let res = shop
            .http
            .post(shop.service_url(ServiceName::Orders, "/api/orders"))
            .header("x-shopmesh-user-id", &user_id)
            .header("x-shopmesh-user-roles", "customer")
            .json(&json!({"items": [{"product_id": product, "quantity": 1}], "card": "4242424242424242"}))
            .send()
            .await
            .unwrap();
        if res.status() == 403 {
            let p: Value = res.json().await.unwrap();
            assert_eq!(p["detail"], "the account is disabled");
            break;
        }
        assert_eq!(res.status(), 202);
        assert!(disabled.elapsed() < std::time::Duration::from_secs(5));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    shop.shutdown().await;
}

/// The shared data pattern through the user center's database: its published view, read
/// through a read-only connection (a read-only role on PostgreSQL) that cannot write.
#[tokio::test]
async fn the_shared_database_way_reads_the_published_view_and_cannot_write() {
    use shopmesh_platform::db::Db;
    let shop =
        TestShop::start_with(|cfg| cfg.users_via = shopmesh_test_support::UsersVia::Database).await;
    let email = register(&shop).await;
    let token = access(&shop, &email).await;
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    let id = me["id"].as_str().unwrap().to_owned();

    let reader = Db::open_read_only(
        &shop.storage.storage.for_service("users"),
        1,
        shopmesh_users::DIRECTORY_READER,
    )
    .await
    .unwrap();
    let found: Option<String> =
        sqlx::query_scalar("SELECT email FROM user_directory WHERE id = $1")
            .bind(&id)
            .fetch_optional(&reader.pool)
            .await
            .unwrap();
    assert_eq!(found.as_deref(), Some(email.as_str()));
    // No write gets through: not to the view, not to the tables.
    for write in [
        "UPDATE users SET role = 'admin'",
        "UPDATE user_directory SET role = 'admin'",
        "DELETE FROM users",
        "INSERT INTO refresh_tokens (id, family, user_id, created_at, expires_at) VALUES ('x', 'x', 'x', 0, 0)",
    ] {
        let e = sqlx::query(write).execute(&reader.pool).await;
        assert!(e.is_err(), "{write} went through");
    }
    if shop.storage.is_postgres() {
        // The role sees the view alone, not the user center's tables.
        let e = match sqlx::query("SELECT password_hash FROM users")
            .fetch_all(&reader.pool)
            .await
        {
            Ok(_) => panic!("the reader read the users table"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("permission denied"), "{e}");
    }
    let me_again: Value = shop.get_json("/api/users/me", Some(&token)).await;
    assert_eq!(me_again["role"], "customer");

    // Orders read the view: a change is seen by the very next order, no event to wait for.
    let res = shop
        .http
        .patch(shop.url("/api/users/me"))
        .bearer_auth(&token)
        .json(&json!({"addresses": [{"recipient": "Ada", "line1": "1 Main St", "city": "Namur", "postal_code": "5000", "country": "BE"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"product_id": shop.product(9), "quantity": 1}], "card": "4242424242424242"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let o: Value = res.json().await.unwrap();
    assert_eq!(o["shipping_address"]["city"], "Namur");
    shop.shutdown().await;
}

/// An unknown email and a wrong password get the same answer after the same work (a hash
/// verification either way), so neither the body nor the time tells which emails exist.
#[tokio::test]
async fn sign_in_failures_take_comparable_time_whatever_the_email() {
    let shop = TestShop::start().await;
    let email = register(&shop).await;
    async fn timed(shop: &TestShop, email: &str) -> (std::time::Duration, Value) {
        let t = std::time::Instant::now();
        let res = shop
            .http
            .post(shop.url("/api/auth/token"))
            .json(&json!({"email": email, "password": "not the password"}))
            .send()
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(res.status(), 401);
        (took, res.json().await.unwrap())
    }
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..5 {
        let (t, a) = timed(&shop, &email).await;
        known.push(t);
        let (u, b) = timed(&shop, &format!("nobody-{i}@example.test")).await;
        unknown.push(u);
        assert_eq!(a, b, "the same answer");
    }
    known.sort();
    unknown.sort();
    let ratio = known[2].as_secs_f64() / unknown[2].as_secs_f64();
    assert!(
        (0.5..2.0).contains(&ratio),
        "median wrong password {:?} vs unknown email {:?}",
        known[2],
        unknown[2]
    );
    // And a password too easy to guess is refused at registration.
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": "easy@example.test", "password": "password123", "name": "E"}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(res, 422).await;
    assert_eq!(p["errors"][0]["field"], "password");
    shop.shutdown().await;
}
