//! Payments' part in the order saga: authorize on `OrderPlaced`, capture on
//! `OrderConfirmed`, void on `OrderCancelled`. The saga's payment for an order carries the
//! idempotency key `saga:<order id>`, so each step finds it and changes it at most once.

use futures::FutureExt;
use futures::future::BoxFuture;
use shopmesh_events::{
    OrderCancelled, OrderConfirmed, OrderPlaced, PaymentAuthorized, PaymentDeclined, TOPIC_PAYMENTS,
};
use shopmesh_messaging::{Envelope, Event, Handler, HandlerError, outbox};
use sqlx::{Any, Transaction};

use crate::model::Status;
use crate::store;

pub struct PaymentsSaga {
    vault: crate::vault::Vault,
}

impl PaymentsSaga {
    pub fn new(db: shopmesh_platform::db::Db) -> Self {
        Self {
            vault: crate::vault::Vault::new(db),
        }
    }
}

fn permanent(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Permanent(e.to_string())
}

fn key(order_id: &str) -> String {
    format!("saga:{order_id}")
}

async fn reply<E: Event>(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    ev: &E,
    cause: &Envelope,
) -> Result<(), HandlerError> {
    let env = Envelope::caused_by("payments", order_id, ev, cause).map_err(permanent)?;
    outbox::stage(tx, TOPIC_PAYMENTS, &env).await?;
    Ok(())
}

async fn placed(
    vault: &crate::vault::Vault,
    tx: &mut Transaction<'static, Any>,
    env: &Envelope,
) -> Result<(), HandlerError> {
    let ev: OrderPlaced = env.decode().map_err(permanent)?;
    let key = key(&ev.order_id);
    // The order carries a vaulted payment method, never a card number.
    let method = vault
        .open_with(&mut **tx, &ev.user_id, &ev.payment_method)
        .await?;
    let (status, decline, brand, last4) = match &method {
        Some((m, verdict)) => match verdict.strip_prefix("decline:") {
            None => (
                Status::Authorized,
                None,
                m.card_brand.as_str(),
                m.card_last4.as_str(),
            ),
            Some(code) => (
                Status::Declined,
                Some(code),
                m.card_brand.as_str(),
                m.card_last4.as_str(),
            ),
        },
        None => (
            Status::Declined,
            Some("invalid_payment_method"),
            "unknown",
            "",
        ),
    };
    let id = uuid::Uuid::now_v7().to_string();
    // A second attempt hits the (user, idempotency key) constraint and stops here; an order
    // the saga already cancelled (a late `OrderPlaced`) inserts nothing either.
    let inserted = store::insert_unless_cancelled(
        &mut **tx,
        &store::NewRecord {
            id: &id,
            order_id: &ev.order_id,
            user_id: &ev.user_id,
            amount_minor: ev.amount_minor,
            currency: &ev.currency,
            card_brand: brand,
            card_last4: last4,
            status,
            decline_code: decline,
            idempotency_key: Some(&key),
            now: shopmesh_platform::now_millis(),
        },
    )
    .await?;
    if !inserted {
        return Ok(());
    }
    match decline {
        None => {
            let r = PaymentAuthorized {
                order_id: ev.order_id.clone(),
                payment_id: id,
            };
            reply(tx, &ev.order_id, &r, env).await
        }
        Some(code) => {
            let r = PaymentDeclined {
                order_id: ev.order_id.clone(),
                reason: code.into(),
            };
            reply(tx, &ev.order_id, &r, env).await
        }
    }
}

/// Moves the saga's AUTHORIZED payment of `order_id` on; a no-op in any other state.
async fn settle(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    to: Status,
) -> Result<(), HandlerError> {
    let captured = if to == Status::Captured {
        "amount_minor"
    } else {
        "captured_minor"
    };
    sqlx::query(&format!(
        "UPDATE payments SET status = $1, captured_minor = {captured}, updated_at = $2 \
         WHERE order_id = $3 AND idempotency_key = $4 AND status = 'AUTHORIZED'"
    ))
    .bind(to.as_str())
    .bind(shopmesh_platform::now_millis())
    .bind(order_id)
    .bind(key(order_id))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Handler for PaymentsSaga {
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if env.is::<OrderPlaced>() {
                placed(&self.vault, tx, env).await
            } else if env.is::<OrderConfirmed>() {
                let ev: OrderConfirmed = env.decode().map_err(permanent)?;
                settle(tx, &ev.order_id, Status::Captured).await
            } else if env.is::<OrderCancelled>() {
                let ev: OrderCancelled = env.decode().map_err(permanent)?;
                // Remember the cancellation, so that a late `OrderPlaced` authorizes nothing.
                sqlx::query(
                    "INSERT INTO saga_cancellations (order_id, cancelled_at) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(&ev.order_id)
                .bind(shopmesh_platform::now_millis())
                .execute(&mut **tx)
                .await?;
                settle(tx, &ev.order_id, Status::Voided).await
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
