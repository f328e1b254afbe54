//! A service that credits accounts from events, end to end on the embedded broker:
//! business write + event in one transaction (outbox), relay, idempotent consumer (inbox).
//!
//! `cargo run -p shopmesh-messaging --example ledger`

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shopmesh_messaging::embedded::EmbeddedBroker;
use shopmesh_messaging::outbox::{self, Relay};
use shopmesh_messaging::{
    Broker, Consumer, ConsumerConfig, Envelope, Event, Handler, HandlerError,
};
use shopmesh_platform::db::{Db, DbConfig};
use sqlx::{Any, Transaction};
use tokio_util::sync::CancellationToken;

#[derive(Serialize, Deserialize)]
struct Deposited {
    account: String,
    amount: i64,
}
impl Event for Deposited {
    const TYPE: &'static str = "example.deposited";
}

struct Balances;

impl Handler for Balances {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            let d: Deposited = env
                .decode()
                .map_err(|e| HandlerError::Permanent(e.to_string()))?;
            sqlx::query(
                "INSERT INTO balances (account, amount) VALUES ($1, $2) \
                 ON CONFLICT (account) DO UPDATE SET amount = balances.amount + excluded.amount",
            )
            .bind(&d.account)
            .bind(d.amount)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }
        .boxed()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let broker = EmbeddedBroker::open(&dir.path().join("broker.db")).await?;
    let db = Db::open(
        &DbConfig::Sqlite {
            path: dir.path().join("ledger.db"),
        },
        4,
    )
    .await?;
    outbox::install(&db).await?;
    sqlx::query("CREATE TABLE balances (account TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&db.pool)
        .await?;

    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(
        ConsumerConfig::new("balances", &["deposits"]),
        db.clone(),
        &broker,
        Arc::new(Balances),
    )
    .await?;
    tokio::spawn(consumer.run(shutdown.clone()));
    let relay = Relay::new(db.clone(), Arc::new(broker.clone()) as Arc<dyn Broker>);
    tokio::spawn(relay.clone().run(shutdown.clone()));

    for amount in [10, 20, 12] {
        let mut tx = db.pool.begin().await?;
        // ... the business write would go here, on `tx` ...
        let ev = Envelope::new(
            "example",
            "alice",
            &Deposited {
                account: "alice".into(),
                amount,
            },
        )?;
        outbox::stage(&mut tx, "deposits", &ev).await?;
        tx.commit().await?;
        relay.notify();
    }
    for _ in 0..50 {
        let b: Option<i64> =
            sqlx::query_scalar("SELECT amount FROM balances WHERE account = 'alice'")
                .fetch_optional(&db.pool)
                .await?;
        if b == Some(42) {
            println!("alice has 42");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    Ok(())
}
