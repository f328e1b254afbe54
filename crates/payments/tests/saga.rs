//! A cancellation that overtakes `OrderPlaced` (e.g. a timeout while `OrderPlaced` sat in the
//! dead letters, then a replay) must leave nothing authorized.

use shopmesh_events::{Line, OrderCancelled, OrderPlaced};
use shopmesh_messaging::{Envelope, Handler, outbox};
use shopmesh_platform::db::{Db, DbConfig};

async fn apply(db: &Db, env: &Envelope) {
    let mut tx = db.pool.begin().await.unwrap();
    shopmesh_payments::saga::PaymentsSaga
        .handle(&mut tx, env)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_late_order_placed_after_its_cancellation_authorizes_nothing() {
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
        card: "4242424242424242".into(),
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
