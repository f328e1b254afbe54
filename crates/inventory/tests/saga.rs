//! A cancellation that overtakes `OrderPlaced` must leave nothing reserved.

use shopmesh_events::{Line, OrderCancelled, OrderPlaced};
use shopmesh_messaging::{Envelope, Handler, outbox};
use shopmesh_platform::db::{Db, DbConfig};

async fn apply(db: &Db, env: &Envelope) {
    let mut tx = db.pool.begin().await.unwrap();
    shopmesh_inventory::saga::InventorySaga
        .handle(&mut tx, env)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_late_order_placed_after_its_cancellation_reserves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(
        &DbConfig::Sqlite {
            path: dir.path().join("i.db"),
        },
        1,
        &shopmesh_inventory::MIGRATOR,
    )
    .await
    .unwrap();
    outbox::install(&db).await.unwrap();
    shopmesh_inventory::seed(&db, &[("p".into(), 10)])
        .await
        .unwrap();
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
            quantity: 3,
        }],
        amount_minor: 100,
        currency: "USD".into(),
        payment_method: "pm_test".into(),
    };
    apply(&db, &Envelope::new("orders", "o-1", &placed).unwrap()).await;
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM stock WHERE product_id = 'p'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reserved, 0);
}
