//! Identity at the gateway: spoofed identity headers, forged, tampered and expired tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shopmesh_test_support::{TestShop, expect_problem};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, exp: u64) -> Value {
    json!({"sub": sub, "iss": "shopmesh-users", "aud": "shopmesh", "iat": now(), "nbf": now(),
           "exp": exp, "jti": "x", "roles": ["admin"]})
}

async fn kid(shop: &TestShop) -> String {
    let jwks: Value = shop.get_json("/.well-known/jwks.json", None).await;
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    jwks["keys"][0]["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_a_service() {
    let shop = TestShop::start().await;
    let (victim, victim_token) = shop.user().await;
    let order = json!({"items": [{"product_id": shop.product(1), "quantity": 1}], "card": "4242424242424242"});
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&victim_token)
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let victims_order: Value = res.json().await.unwrap();

    // Without a token, the header alone gets nothing: the gateway strips it.
    let res = shop
        .http
        .get(shop.url("/api/orders"))
        .header("x-shopmesh-user-id", &victim)
        .send()
        .await
        .unwrap();
    expect_problem(res, 401).await;
    // Public route (users), no token: the service sees no identity either.
    let res = shop
        .http
        .get(shop.url("/api/users/me"))
        .header("x-shopmesh-user-id", &victim)
        .send()
        .await
        .unwrap();
    expect_problem(res, 401).await;
    // With the attacker's own valid token, the spoofed header is replaced by the real one.
    let (_, attacker) = shop.user().await;
    let res = shop
        .http
        .get(shop.url(&format!(
            "/api/orders/{}",
            victims_order["id"].as_str().unwrap()
        )))
        .bearer_auth(&attacker)
        .header("x-shopmesh-user-id", &victim)
        .header("X-Shopmesh-User-Id", &victim)
        .send()
        .await
        .unwrap();
    expect_problem(res, 404).await;
    // Roles cannot be spoofed either: creating a product needs admin.
    let res = shop
        .http
        .post(shop.url("/api/products"))
        .bearer_auth(&attacker)
        .header("x-shopmesh-user-roles", "admin")
        .json(&json!({"sku": "X-1", "name": "x", "category": "c"}))
        .send()
        .await
        .unwrap();
    expect_problem(res, 403).await;
}

#[tokio::test]
async fn tampered_and_forged_tokens_are_refused() {
    let shop = TestShop::start().await;
    let (user, token) = shop.user().await;
    let kid = kid(&shop).await;
    let get = |t: String| shop.http.get(shop.url("/api/orders")).bearer_auth(t).send();
    assert_eq!(get(token.clone()).await.unwrap().status(), 200);

    // Payload changed (another subject), signature kept.
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("someone-else");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    expect_problem(get(tampered).await.unwrap(), 401).await;
    // Signature changed.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[0] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    expect_problem(get(bad_sig).await.unwrap(), 401).await;
    // Garbage, wrong scheme, empty.
    expect_problem(get("not.a.jwt".into()).await.unwrap(), 401).await;
    let res = shop
        .http
        .get(shop.url("/api/orders"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    expect_problem(res, 401).await;

    // alg: none.
    let header =
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string());
    let body = URL_SAFE_NO_PAD.encode(claims(&user, now() + 600).to_string());
    expect_problem(get(format!("{header}.{body}.")).await.unwrap(), 401).await;

    // HS256 keyed with the public key (key confusion).
    let jwks: Value = shop.get_json("/.well-known/jwks.json", None).await;
    let x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.clone());
    let hs = jsonwebtoken::encode(
        &h,
        &claims(&user, now() + 600),
        &EncodingKey::from_secret(&x),
    )
    .unwrap();
    expect_problem(get(hs).await.unwrap(), 401).await;

    // Signed by an attacker's Ed25519 key under the real kid, and under an unknown kid.
    let attacker = SigningKey::generate(&mut rand::rngs::OsRng);
    let der = attacker.to_pkcs8_der().unwrap();
    let key = EncodingKey::from_ed_der(der.as_bytes());
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid);
    let forged = jsonwebtoken::encode(&h, &claims(&user, now() + 600), &key).unwrap();
    expect_problem(get(forged).await.unwrap(), 401).await;
    h.kid = Some("unknown-kid".into());
    let forged = jsonwebtoken::encode(&h, &claims(&user, now() + 600), &key).unwrap();
    expect_problem(get(forged).await.unwrap(), 401).await;

    // A bad token on a public route is refused too, rather than silently ignored.
    let res = shop.get("/api/products?limit=1", Some("not.a.jwt")).await;
    expect_problem(res, 401).await;
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let shop = TestShop::start_with(|c| {
        c.token_ttl = Duration::from_secs(1);
        c.jwt_leeway_secs = 0;
    })
    .await;
    let (_, token) = shop.user().await;
    let res = shop.get("/api/orders", Some(&token)).await;
    assert_eq!(res.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let res = shop.get("/api/orders", Some(&token)).await;
    let p = expect_problem(res, 401).await;
    assert!(p["detail"].as_str().unwrap().contains("expired"));
}
