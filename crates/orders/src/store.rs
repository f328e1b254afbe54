use std::collections::HashMap;

use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use shopmesh_events::TOPIC_ORDERS;
use shopmesh_messaging::{Envelope, outbox};

use crate::model::{Order, OrderItem, Step};

const COLUMNS: &str = "id, user_id, status, status_reason, total_minor, currency, card_last4, \
                       created_at, updated_at, traceparent, timeline, shipping_address";

fn from_row(row: &AnyRow) -> Result<Order, sqlx::Error> {
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        status: row.try_get("status")?,
        reason: row.try_get("status_reason")?,
        items: Vec::new(),
        steps: parse_timeline(&row.try_get::<String, _>("timeline")?),
        total_minor: row.try_get("total_minor")?,
        currency: row.try_get("currency")?,
        card_last4: row.try_get("card_last4")?,
        shipping_address: row
            .try_get::<Option<String>, _>("shipping_address")?
            .and_then(|a| serde_json::from_str(&a).ok()),
        trace_id: row
            .try_get::<Option<String>, _>("traceparent")?
            .and_then(|t| t.split('-').nth(1).map(str::to_owned)),
        created_at: shopmesh_platform::millis_to_rfc3339(row.try_get("created_at")?),
        updated_at: shopmesh_platform::millis_to_rfc3339(row.try_get("updated_at")?),
    })
}

pub struct NewOrderRow<'a> {
    /// The `OrderPlaced` event, staged in the same transaction.
    pub placed: &'a Envelope,
    pub request_hash: &'a str,
    pub id: &'a str,
    pub user_id: &'a str,
    pub total_minor: i64,
    pub currency: &'a str,
    pub card_last4: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub items: &'a [OrderItem],
    /// The shipping address snapshot (JSON).
    pub shipping_address: Option<&'a str>,
}

/// Stores the order (PENDING), its lines, the first step of its timeline and its
/// `OrderPlaced` event in one transaction.
pub async fn insert(db: &Db, o: &NewOrderRow<'_>) -> Result<(), sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, status_reason, total_minor, currency, \
         card_last4, idempotency_key, created_at, updated_at, request_hash, traceparent, \
         timeline, shipping_address) \
         VALUES ($1, $2, 'PENDING', NULL, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11)",
    )
    .bind(o.id)
    .bind(o.user_id)
    .bind(o.total_minor)
    .bind(o.currency)
    .bind(o.card_last4)
    .bind(o.idempotency_key)
    .bind(now)
    .bind(o.request_hash)
    .bind(o.placed.traceparent.as_deref())
    .bind(step_line("placed", None))
    .bind(o.shipping_address)
    .execute(&mut *tx)
    .await?;
    for (i, item) in o.items.iter().enumerate() {
        sqlx::query(
            "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price_minor) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(o.id)
        .bind(i as i64)
        .bind(&item.product_id)
        .bind(item.quantity)
        .bind(item.unit_price_minor)
        .execute(&mut *tx)
        .await?;
    }
    outbox::stage(&mut tx, TOPIC_ORDERS, o.placed).await?;
    tx.commit().await
}

/// One timeline entry, as appended to `orders.timeline` (`timeline = timeline || $n`).
pub fn step_line(step: &str, detail: Option<&str>) -> String {
    let mut line = serde_json::json!({"step": step, "at": shopmesh_platform::now_millis()});
    if let Some(d) = detail {
        line["detail"] = d.into();
    }
    format!("{line}\n")
}

fn parse_timeline(raw: &str) -> Vec<Step> {
    #[derive(serde::Deserialize)]
    struct Line {
        step: String,
        at: i64,
        detail: Option<String>,
    }
    raw.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| Step {
            step: l.step,
            detail: l.detail,
            at: shopmesh_platform::millis_to_rfc3339(l.at),
        })
        .collect()
}

/// The fingerprint of the request behind an idempotency key.
pub async fn request_hash(
    db: &Db,
    user_id: &str,
    key: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT request_hash FROM orders WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(&db.pool)
    .await
    .map(Option::flatten)
}

/// The order if it belongs to `user_id`.
pub async fn get_owned(db: &Db, user_id: &str, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut orders = vec![from_row(&row)?];
    attach_items(db, &mut orders).await?;
    Ok(orders.pop())
}

pub async fn find_by_idempotency_key(
    db: &Db,
    user_id: &str,
    key: &str,
) -> Result<Option<Order>, sqlx::Error> {
    let id: Option<String> =
        sqlx::query_scalar("SELECT id FROM orders WHERE user_id = $1 AND idempotency_key = $2")
            .bind(user_id)
            .bind(key)
            .fetch_optional(&db.pool)
            .await?;
    match id {
        Some(id) => get_owned(db, user_id, &id).await,
        None => Ok(None),
    }
}

/// The user's orders, newest first, with their lines (two queries, no N+1).
pub async fn list_owned(
    db: &Db,
    user_id: &str,
    limit: i64,
    offset: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE user_id = $1 \
         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    ))
    .bind(user_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&db.pool)
    .await?;
    let mut orders = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    attach_items(db, &mut orders).await?;
    Ok(orders)
}

async fn attach_items(db: &Db, orders: &mut [Order]) -> Result<(), sqlx::Error> {
    if orders.is_empty() {
        return Ok(());
    }
    let placeholders = shopmesh_platform::db::placeholders(1, orders.len());
    let sql = format!(
        "SELECT order_id, product_id, quantity, unit_price_minor FROM order_items \
         WHERE order_id IN ({placeholders}) ORDER BY order_id, line_no"
    );
    let mut q = sqlx::query(&sql);
    for o in orders.iter() {
        q = q.bind(o.id.clone());
    }
    let mut by_order: HashMap<String, Vec<OrderItem>> = HashMap::new();
    for row in q.fetch_all(&db.pool).await? {
        let quantity: i64 = row.try_get("quantity")?;
        let unit: i64 = row.try_get("unit_price_minor")?;
        by_order
            .entry(row.try_get("order_id")?)
            .or_default()
            .push(OrderItem {
                product_id: row.try_get("product_id")?,
                quantity,
                unit_price_minor: unit,
                line_total_minor: quantity.saturating_mul(unit),
            });
    }
    for o in orders.iter_mut() {
        o.items = by_order.remove(&o.id).unwrap_or_default();
    }
    Ok(())
}
