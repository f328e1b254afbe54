//! The order saga, orchestrated by the orders service. Its state lives on the order row
//! (`status`, `stock_state`, `payment_state`) and its timeline in `timeline`, appended by
//! the same statements.
//!
//! - `StockReserved` + `PaymentAuthorized` → `CONFIRMED`, publish `OrderConfirmed`
//!   (inventory commits the stock, payments captures).
//! - `StockRejected` → `CANCELLED` (`out_of_stock`); `PaymentDeclined` → `CANCELLED`
//!   (`payment_declined`); still `PENDING` past the deadline → `CANCELLED` (`timeout`). Each
//!   publishes `OrderCancelled`, and the participants compensate (release, void).
//!
//! The decision is a conditional update (`WHERE status = 'PENDING'`), so the consumer and the
//! timeout sweeper can race and exactly one of them decides. Participants handle an order's
//! messages in order, so a reply that arrives after the decision needs no extra step: its
//! participant will see `OrderCancelled` after its own action and undo it.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use shopmesh_events::{
    OrderCancelled, OrderConfirmed, PaymentAuthorized, PaymentDeclined, StockRejected,
    StockReserved, TOPIC_ORDERS,
};
use shopmesh_messaging::outbox::{self, Relay};
use shopmesh_messaging::{Envelope, Event, Handler, HandlerError};
use shopmesh_platform::db::Db;
use sqlx::{Any, Transaction};
use tokio_util::sync::CancellationToken;

use crate::store::step_line;

pub struct OrderSaga;

fn permanent(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Permanent(e.to_string())
}

/// Decides the order if it is still pending: sets the terminal status and stages the event.
/// Returns whether this call decided it.
async fn decide<E: Event>(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    status: &str,
    reason: Option<&str>,
    event: &E,
    traceparent: Option<String>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE orders SET status = $1, status_reason = $2, updated_at = $3, \
         timeline = timeline || $5 WHERE id = $4 AND status = 'PENDING'",
    )
    .bind(status)
    .bind(reason)
    .bind(shopmesh_platform::now_millis())
    .bind(order_id)
    .bind(step_line(
        if status == "CONFIRMED" {
            "confirmed"
        } else {
            "cancelled"
        },
        reason,
    ))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    let env = Envelope::new(crate::NAME, order_id, event)
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?
        .with_traceparent(traceparent);
    outbox::stage(tx, TOPIC_ORDERS, &env).await?;
    Ok(true)
}

async fn on_reply(tx: &mut Transaction<'static, Any>, env: &Envelope) -> Result<(), HandlerError> {
    let (order_id, column, value, step, detail) = if env.is::<StockReserved>() {
        let e: StockReserved = env.decode().map_err(permanent)?;
        (
            e.order_id,
            "stock_state",
            "RESERVED",
            "stock_reserved",
            None,
        )
    } else if env.is::<StockRejected>() {
        let e: StockRejected = env.decode().map_err(permanent)?;
        (
            e.order_id,
            "stock_state",
            "REJECTED",
            "stock_rejected",
            Some(e.reason),
        )
    } else if env.is::<PaymentAuthorized>() {
        let e: PaymentAuthorized = env.decode().map_err(permanent)?;
        (
            e.order_id,
            "payment_state",
            "AUTHORIZED",
            "payment_authorized",
            None,
        )
    } else if env.is::<PaymentDeclined>() {
        let e: PaymentDeclined = env.decode().map_err(permanent)?;
        (
            e.order_id,
            "payment_state",
            "DECLINED",
            "payment_declined",
            Some(e.reason),
        )
    } else {
        return Err(HandlerError::Permanent(format!(
            "unknown event type `{}`",
            env.kind
        )));
    };
    let state: Option<(String, String, String)> = sqlx::query_as(&format!(
        "UPDATE orders SET {column} = $1, updated_at = $2, timeline = timeline || $4 \
         WHERE id = $3 RETURNING status, stock_state, payment_state"
    ))
    .bind(value)
    .bind(shopmesh_platform::now_millis())
    .bind(&order_id)
    .bind(step_line(step, detail.as_deref()))
    .fetch_optional(&mut **tx)
    .await?;
    let Some((status, stock, payment)) = state else {
        return Err(HandlerError::Permanent(format!("no order `{order_id}`")));
    };
    if status != "PENDING" {
        return Ok(());
    }
    let tp = shopmesh_platform::otel::traceparent(&tracing::Span::current())
        .or_else(|| env.traceparent.clone());
    let cancel = |reason: &str| OrderCancelled {
        order_id: order_id.clone(),
        reason: reason.into(),
    };
    if stock == "REJECTED" {
        decide(
            tx,
            &order_id,
            "CANCELLED",
            Some("out_of_stock"),
            &cancel("out_of_stock"),
            tp,
        )
        .await?;
    } else if payment == "DECLINED" {
        let c = cancel("payment_declined");
        decide(tx, &order_id, "CANCELLED", Some("payment_declined"), &c, tp).await?;
    } else if stock == "RESERVED" && payment == "AUTHORIZED" {
        let c = OrderConfirmed {
            order_id: order_id.clone(),
        };
        decide(tx, &order_id, "CONFIRMED", None, &c, tp).await?;
    }
    Ok(())
}

impl Handler for OrderSaga {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        on_reply(tx, env).boxed()
    }
}

/// Cancels orders whose participants stayed silent past `deadline` (reason `timeout`).
pub struct TimeoutSweeper {
    pub db: Db,
    pub relay: Relay,
    pub deadline: Duration,
    pub every: Duration,
}

impl TimeoutSweeper {
    /// One pass; returns how many orders it cancelled.
    pub async fn sweep(&self) -> Result<usize, sqlx::Error> {
        let cutoff = shopmesh_platform::now_millis() - self.deadline.as_millis() as i64;
        let due: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, traceparent FROM orders WHERE status = 'PENDING' AND created_at < $1 \
             ORDER BY created_at LIMIT 100",
        )
        .bind(cutoff)
        .fetch_all(&self.db.pool)
        .await?;
        let mut cancelled = 0;
        for (id, tp) in due {
            let mut tx = self.db.pool.begin().await?;
            let ev = OrderCancelled {
                order_id: id.clone(),
                reason: "timeout".into(),
            };
            if decide(&mut tx, &id, "CANCELLED", Some("timeout"), &ev, tp).await? {
                cancelled += 1;
            }
            tx.commit().await?;
        }
        if cancelled > 0 {
            tracing::warn!(
                cancelled,
                "orders cancelled: participants silent past the deadline"
            );
            metrics::counter!("orders_saga_timeouts_total").increment(cancelled as u64);
            self.relay.notify();
        }
        Ok(cancelled)
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "timeout sweep failed");
            }
        }
    }
}
