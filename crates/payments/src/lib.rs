//! Payments service: card payments of the caller, recorded with a state machine
//! (`AUTHORIZED` → `CAPTURED` → partly or fully `REFUNDED`, `AUTHORIZED` → `VOIDED`;
//! `DECLINED` is final). Cards are simulated by the usual test numbers; only the brand and
//! the last four digits of a card are ever stored.
//!
//! Same layout as every shopmesh service: `model.rs` (API types and the pure payment logic),
//! `store.rs` (SQL), `api.rs` (handlers and the OpenAPI document), `error.rs` (domain
//! errors), `migrations/`.

pub mod api;
pub mod error;
pub mod model;
pub mod saga;
pub mod store;
pub mod vault;

use shopmesh_platform::db::Db;

pub const NAME: &str = "payments";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Shared state of the handlers.
#[derive(Clone)]
pub struct State {
    pub db: Db,
    pub vault: std::sync::Arc<vault::Vault>,
}

/// The service's complete HTTP application (routes + the common stack).
pub fn app(db: Db) -> axum::Router {
    let vault = std::sync::Arc::new(vault::Vault::new(db.clone()));
    shopmesh_platform::serve::stack(
        NAME,
        api::routes(State { db, vault }),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use shopmesh_platform::db::{Db, DbConfig};
    use tower::ServiceExt;

    #[derive(Clone)]
    struct Service {
        app: axum::Router,
        _dir: std::sync::Arc<tempfile::TempDir>,
    }

    async fn service() -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DbConfig::Sqlite {
            path: dir.path().join("payments.db"),
        };
        let db = Db::connect(&cfg, 4, &super::MIGRATOR)
            .await
            .expect("connect");
        Service {
            app: super::app(db),
            _dir: std::sync::Arc::new(dir),
        }
    }

    impl Service {
        async fn call(
            &self,
            method: Method,
            uri: &str,
            user: Option<&str>,
            headers: &[(&str, &str)],
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(user) = user {
                req = req.header(shopmesh_platform::USER_ID_HEADER, user);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = match body {
                Some(b) => req
                    .header("content-type", "application/json")
                    .body(Body::from(b.to_string())),
                None => req.body(Body::empty()),
            }
            .expect("request");
            let res = self.app.clone().oneshot(req).await.expect("response");
            let status = res.status();
            let bytes = res.into_body().collect().await.expect("body").to_bytes();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, value)
        }

        async fn pay(&self, user: &str, card: &str, key: Option<&str>) -> (StatusCode, Value) {
            let headers: Vec<(&str, &str)> =
                key.map(|k| ("idempotency-key", k)).into_iter().collect();
            self.call(
                Method::POST,
                "/api/payments",
                Some(user),
                &headers,
                Some(json!({"order_id": "o1", "amount_minor": 1000, "currency": "EUR", "card": card})),
            )
            .await
        }
    }

    #[tokio::test]
    async fn lifecycle() {
        let s = service().await;
        let (st, _) = s.call(Method::GET, "/api/payments", None, &[], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);

        let (st, p) = s.pay("alice", "4242 4242 4242 4242", None).await;
        assert_eq!(st, StatusCode::CREATED, "{p}");
        assert_eq!(p["status"], "AUTHORIZED");
        assert_eq!(p["card_brand"], "visa");
        assert_eq!(p["card_last4"], "4242");
        assert!(p.get("decline_code").is_none());
        assert!(p.get("user_id").is_none());
        let id = p["id"].as_str().expect("id").to_owned();

        let (st, _) = s
            .call(
                Method::GET,
                &format!("/api/payments/{id}"),
                Some("bob"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = s
            .call(
                Method::POST,
                &format!("/api/payments/{id}/capture"),
                Some("bob"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);

        let (st, p) = s
            .call(
                Method::POST,
                &format!("/api/payments/{id}/capture"),
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(p["status"], "CAPTURED");
        assert_eq!(p["captured_minor"], 1000);

        let (st, p) = s
            .call(
                Method::POST,
                &format!("/api/payments/{id}/capture"),
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert_eq!(p["current_status"], "CAPTURED");
        let (st, _) = s
            .call(
                Method::POST,
                &format!("/api/payments/{id}/void"),
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);

        let refund = format!("/api/payments/{id}/refund");
        let (st, p) = s
            .call(
                Method::POST,
                &refund,
                Some("alice"),
                &[],
                Some(json!({"amount_minor": 1001})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        let (st, p) = s
            .call(
                Method::POST,
                &refund,
                Some("alice"),
                &[],
                Some(json!({"amount_minor": 0})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        let (st, p) = s
            .call(
                Method::POST,
                &refund,
                Some("alice"),
                &[],
                Some(json!({"amount_minor": 400})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(p["status"], "CAPTURED");
        assert_eq!(p["refunded_minor"], 400);
        let (st, p) = s
            .call(Method::POST, &refund, Some("alice"), &[], None)
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(p["status"], "REFUNDED");
        assert_eq!(p["refunded_minor"], 1000);
        let (st, p) = s
            .call(Method::POST, &refund, Some("alice"), &[], None)
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert_eq!(p["current_status"], "REFUNDED");

        let (st, p) = s.pay("alice", "4000000000009995", None).await;
        assert_eq!(st, StatusCode::CREATED);
        assert_eq!(p["status"], "DECLINED");
        assert_eq!(p["decline_code"], "insufficient_funds");
        let declined = p["id"].as_str().expect("id").to_owned();
        let (st, _) = s
            .call(
                Method::POST,
                &format!("/api/payments/{declined}/capture"),
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT);

        let (st, p) = s.pay("alice", "5555555555554444", None).await;
        assert_eq!(st, StatusCode::CREATED);
        let voided = p["id"].as_str().expect("id").to_owned();
        let (st, p) = s
            .call(
                Method::POST,
                &format!("/api/payments/{voided}/void"),
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(p["status"], "VOIDED");
        assert_eq!(p["card_brand"], "mastercard");

        let (st, list) = s
            .call(Method::GET, "/api/payments", Some("alice"), &[], None)
            .await;
        assert_eq!(st, StatusCode::OK);
        let ids: Vec<&str> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|p| p["id"].as_str())
            .collect();
        assert_eq!(ids, vec![voided.as_str(), declined.as_str(), id.as_str()]);
        let (_, list) = s
            .call(
                Method::GET,
                "/api/payments?order_id=nope",
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(list["items"], json!([]));
        let (_, list) = s
            .call(
                Method::GET,
                "/api/payments?order_id=o1",
                Some("alice"),
                &[],
                None,
            )
            .await;
        assert_eq!(list["items"].as_array().map(Vec::len), Some(3));
        let (_, list) = s
            .call(Method::GET, "/api/payments", Some("bob"), &[], None)
            .await;
        assert_eq!(list["items"], json!([]));
    }

    #[tokio::test]
    async fn validation_and_idempotency() {
        let s = service().await;
        let (st, p) = s
            .call(
                Method::POST,
                "/api/payments",
                Some("alice"),
                &[],
                Some(json!({"order_id": " ", "amount_minor": 0, "currency": "eur", "card": "4242424242424241"})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        let fields: Vec<&str> = p["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .filter_map(|e| e["field"].as_str())
            .collect();
        assert_eq!(fields, vec!["order_id", "amount_minor", "currency", "card"]);
        let long = "k".repeat(201);
        let (st, _) = s.pay("alice", "4242424242424242", Some(&long)).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);

        let (st, first) = s.pay("alice", "4242424242424242", Some("k1")).await;
        assert_eq!(st, StatusCode::CREATED);
        let (st, again) = s.pay("alice", "4242424242424242", Some("k1")).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(first["id"], again["id"]);
        let (st, other) = s.pay("bob", "4242424242424242", Some("k1")).await;
        assert_eq!(st, StatusCode::CREATED);
        assert_ne!(first["id"], other["id"]);
        let (_, list) = s
            .call(Method::GET, "/api/payments", Some("alice"), &[], None)
            .await;
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));

        let (st, doc) = s.call(Method::GET, "/openapi.json", None, &[], None).await;
        assert_eq!(st, StatusCode::OK);
        assert!(doc["paths"]["/api/payments/{id}/refund"].is_object());
    }

    /// Runs `n` copies of `f()` in parallel tasks.
    async fn concurrently<T, Fut>(n: usize, f: impl Fn() -> Fut) -> Vec<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            set.spawn(f());
        }
        set.join_all().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_captures_and_idempotent_creates() {
        let s = service().await;
        let (_, p) = s.pay("alice", "4242424242424242", None).await;
        let uri = format!("/api/payments/{}/capture", p["id"].as_str().expect("id"));
        let results = concurrently(8, || {
            let (s, uri) = (s.clone(), uri.clone());
            async move { s.call(Method::POST, &uri, Some("alice"), &[], None).await.0 }
        })
        .await;
        assert_eq!(
            results.iter().filter(|st| **st == StatusCode::OK).count(),
            1
        );
        assert!(
            results
                .iter()
                .all(|st| *st == StatusCode::OK || *st == StatusCode::CONFLICT)
        );

        let results = concurrently(8, || {
            let s = s.clone();
            async move {
                let (st, p) = s.pay("carol", "4242424242424242", Some("race")).await;
                (st, p["id"].clone())
            }
        })
        .await;
        assert_eq!(
            results
                .iter()
                .filter(|(st, _)| *st == StatusCode::CREATED)
                .count(),
            1,
            "{results:?}"
        );
        assert!(results.iter().all(|(_, id)| *id == results[0].1));
        let (_, list) = s
            .call(Method::GET, "/api/payments", Some("carol"), &[], None)
            .await;
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    }
}
