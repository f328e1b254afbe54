//! Inventory's part in the order saga: reserve on `OrderPlaced`, commit on `OrderConfirmed`,
//! release on `OrderCancelled`. Each step runs in the consumer's transaction (inbox + effect
//! and reply in the outbox) and is idempotent on its own as well: a reservation row per order
//! records where it stands, so a replayed step changes nothing.

use futures::FutureExt;
use futures::future::BoxFuture;
use shopmesh_events::{
    Line, OrderCancelled, OrderConfirmed, OrderPlaced, StockRejected, StockReserved,
    TOPIC_INVENTORY,
};
use shopmesh_messaging::{Envelope, Event, Handler, HandlerError, outbox};
use sqlx::{Any, Transaction};

pub struct InventorySaga;

fn permanent(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Permanent(e.to_string())
}

/// Moves the order's reservation from `RESERVED` to `to` and returns its lines; `None` when
/// there is no reservation in that state (already committed or released: nothing to do).
async fn settle(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    to: &str,
) -> Result<Option<Vec<Line>>, HandlerError> {
    let items: Option<String> = sqlx::query_scalar(
        "UPDATE reservations SET status = $1, updated_at = $2 \
         WHERE order_id = $3 AND status = 'RESERVED' RETURNING items",
    )
    .bind(to)
    .bind(shopmesh_platform::now_millis())
    .bind(order_id)
    .fetch_optional(&mut **tx)
    .await?;
    items
        .map(|items| serde_json::from_str(&items).map_err(permanent))
        .transpose()
}

async fn reply<E: Event>(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    ev: &E,
    cause: &Envelope,
) -> Result<(), HandlerError> {
    let env = Envelope::caused_by("inventory", order_id, ev, cause).map_err(permanent)?;
    outbox::stage(tx, TOPIC_INVENTORY, &env).await?;
    Ok(())
}

async fn placed(tx: &mut Transaction<'static, Any>, env: &Envelope) -> Result<(), HandlerError> {
    let ev: OrderPlaced = env.decode().map_err(permanent)?;
    let now = shopmesh_platform::now_millis();
    // Claim the order first: a second attempt finds the row and stops here.
    let claimed = sqlx::query(
        "INSERT INTO reservations (order_id, status, items, created_at, updated_at) \
         VALUES ($1, 'RESERVED', $2, $3, $3) ON CONFLICT DO NOTHING",
    )
    .bind(&ev.order_id)
    .bind(serde_json::to_string(&ev.items).map_err(permanent)?)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        return Ok(());
    }
    let mut reserved: Vec<&Line> = Vec::new();
    let mut short = false;
    for line in &ev.items {
        let n = sqlx::query(
            "UPDATE stock SET reserved = reserved + $1, updated_at = $2 \
             WHERE product_id = $3 AND on_hand - reserved >= $1",
        )
        .bind(line.quantity)
        .bind(now)
        .bind(&line.product_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n == 0 {
            short = true;
            break;
        }
        reserved.push(line);
    }
    if !short {
        return reply(
            tx,
            &ev.order_id,
            &StockReserved {
                order_id: ev.order_id.clone(),
            },
            env,
        )
        .await;
    }
    // Undo the lines already reserved in this transaction, record the rejection.
    for line in reserved {
        sqlx::query("UPDATE stock SET reserved = reserved - $1 WHERE product_id = $2")
            .bind(line.quantity)
            .bind(&line.product_id)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("UPDATE reservations SET status = 'REJECTED', updated_at = $1 WHERE order_id = $2")
        .bind(now)
        .bind(&ev.order_id)
        .execute(&mut **tx)
        .await?;
    let r = StockRejected {
        order_id: ev.order_id.clone(),
        reason: "out_of_stock".into(),
    };
    reply(tx, &ev.order_id, &r, env).await
}

async fn confirmed(tx: &mut Transaction<'static, Any>, env: &Envelope) -> Result<(), HandlerError> {
    let ev: OrderConfirmed = env.decode().map_err(permanent)?;
    let Some(items) = settle(tx, &ev.order_id, "COMMITTED").await? else {
        return Ok(());
    };
    for line in &items {
        sqlx::query(
            "UPDATE stock SET on_hand = on_hand - $1, reserved = reserved - $1, updated_at = $2 \
             WHERE product_id = $3",
        )
        .bind(line.quantity)
        .bind(shopmesh_platform::now_millis())
        .bind(&line.product_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn cancelled(tx: &mut Transaction<'static, Any>, env: &Envelope) -> Result<(), HandlerError> {
    let ev: OrderCancelled = env.decode().map_err(permanent)?;
    let Some(items) = settle(tx, &ev.order_id, "RELEASED").await? else {
        // Cancelled before we reserved (e.g. timed out while `OrderPlaced` sat in the dead
        // letters): leave a marker so that a late `OrderPlaced` reserves nothing. (A
        // reservation already settled or rejected keeps its row: the insert does nothing.)
        sqlx::query(
            "INSERT INTO reservations (order_id, status, items, created_at, updated_at) \
             VALUES ($1, 'RELEASED', '[]', $2, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&ev.order_id)
        .bind(shopmesh_platform::now_millis())
        .execute(&mut **tx)
        .await?;
        return Ok(());
    };
    for line in &items {
        sqlx::query(
            "UPDATE stock SET reserved = reserved - $1, updated_at = $2 WHERE product_id = $3",
        )
        .bind(line.quantity)
        .bind(shopmesh_platform::now_millis())
        .bind(&line.product_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Handler for InventorySaga {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if env.is::<OrderPlaced>() {
                placed(tx, env).await
            } else if env.is::<OrderConfirmed>() {
                confirmed(tx, env).await
            } else if env.is::<OrderCancelled>() {
                cancelled(tx, env).await
            } else {
                Err(HandlerError::Permanent(format!(
                    "unknown event type `{}`",
                    env.kind
                )))
            }
        }
        .boxed()
    }
}
