//! A cancellation that overtakes `OrderPlaced` (e.g. a timeout while `OrderPlaced` sat in the
//! dead letters, then a replay) must leave nothing authorized.

use shopmesh_events::{Line, OrderCancelled, OrderPlaced};
use shopmesh_messaging::{Envelope, Handler, outbox};
use shopmesh_platform::db::{Db, DbConfig};

async fn apply(db: &Db, env: &Envelope) {
    let mut tx = db.pool.begin().await.unwrap();
    shopmesh_payments::saga::PaymentsSaga::new(db.clone())
        .handle(&mut tx, env)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// A payments database of its own (SQLite, one connection as in the shop), with the outbox.
async fn payments_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(
        &DbConfig::Sqlite {
            path: dir.path().join("p.db"),
        },
        1,
        &shopmesh_payments::MIGRATOR,
    )
    .await
    .unwrap();
    outbox::install(&db).await.unwrap();
    (dir, db)
}

#[tokio::test]
async fn a_late_order_placed_after_its_cancellation_authorizes_nothing() {
    let (_dir, db) = payments_db().await;
    let cancelled = OrderCancelled {
        order_id: "o-1".into(),
        reason: "timeout".into(),
    };
    apply(&db, &Envelope::new("orders", "o-1", &cancelled).unwrap()).await;
    let placed = OrderPlaced {
        order_id: "o-1".into(),
        user_id: "u-1".into(),
        items: vec![Line {
            product_id: "p".into(),
            quantity: 1,
        }],
        amount_minor: 100,
        currency: "USD".into(),
        payment_method: "pm_test".into(),
    };
    apply(&db, &Envelope::new("orders", "o-1", &placed).unwrap()).await;
    let payments: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payments")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(payments, 0);
    let replies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(replies, 0);
}

#[tokio::test]
async fn orders_pay_with_vaulted_methods_of_their_own_user_only() {
    let (_dir, db) = payments_db().await;
    let vault = shopmesh_payments::vault::Vault::new(db.clone());
    let ok = vault.seal("u-1", "4242424242424242").await.unwrap().id;
    let no = vault.seal("u-1", "4000000000000002").await.unwrap().id;
    let place = |order: &str, user: &str, pm: &str| OrderPlaced {
        order_id: order.into(),
        user_id: user.into(),
        items: vec![Line {
            product_id: "p".into(),
            quantity: 1,
        }],
        amount_minor: 100,
        currency: "USD".into(),
        payment_method: pm.into(),
    };
    for (order, user, pm) in [
        ("o-ok", "u-1", ok.as_str()),
        ("o-no", "u-1", no.as_str()),
        ("o-other", "u-2", ok.as_str()),
        ("o-none", "u-1", "pm_missing"),
    ] {
        apply(
            &db,
            &Envelope::new("orders", order, &place(order, user, pm)).unwrap(),
        )
        .await;
    }
    let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT order_id, status, decline_code, card_last4 FROM payments ORDER BY order_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "o-no".into(),
                "DECLINED".into(),
                Some("card_declined".into()),
                "0002".into()
            ),
            (
                "o-none".into(),
                "DECLINED".into(),
                Some("invalid_payment_method".into()),
                "".into()
            ),
            ("o-ok".into(), "AUTHORIZED".into(), None, "4242".into()),
            (
                "o-other".into(),
                "DECLINED".into(),
                Some("invalid_payment_method".into()),
                "".into()
            ),
        ]
    );
}

/// The saga captures or voids a payment by its order id: that must be an index search, not
/// a scan of every payment (before `payments_order` it was, and the order flow slowed down
/// quadratically with the table).
#[tokio::test]
async fn settling_a_payment_by_its_order_uses_an_index() {
    let (_dir, db) = payments_db().await;
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "EXPLAIN QUERY PLAN UPDATE payments SET status = 'CAPTURED', updated_at = 1 \
         WHERE order_id = 'o-1' AND idempotency_key = 'saga:o-1' AND status = 'AUTHORIZED'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let detail: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
    assert!(
        detail
            .iter()
            .any(|d| d.contains("USING INDEX payments_order")),
        "{detail:?}"
    );
}
