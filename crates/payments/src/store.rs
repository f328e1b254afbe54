use std::sync::LazyLock;

use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::{Change, Payment, Status};

const COLUMNS: &str = "id, order_id, amount_minor, currency, status, decline_code, card_brand, \
                       card_last4, captured_minor, refunded_minor, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Payment, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Payment {
        id: row.try_get("id")?,
        order_id: row.try_get("order_id")?,
        amount_minor: row.try_get("amount_minor")?,
        currency: row.try_get("currency")?,
        status: Status::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown payment status `{status}`").into())
        })?,
        decline_code: row.try_get("decline_code")?,
        card_brand: row.try_get("card_brand")?,
        card_last4: row.try_get("card_last4")?,
        captured_minor: row.try_get("captured_minor")?,
        refunded_minor: row.try_get("refunded_minor")?,
        created_at: shopmesh_platform::millis_to_rfc3339(row.try_get("created_at")?),
        updated_at: shopmesh_platform::millis_to_rfc3339(row.try_get("updated_at")?),
    })
}

/// A payment to record. The card number itself is never stored: only brand and last 4.
pub struct NewRecord<'a> {
    pub id: &'a str,
    pub order_id: &'a str,
    pub user_id: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub card_brand: &'a str,
    pub card_last4: &'a str,
    pub status: Status,
    pub decline_code: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub now: i64,
}

const INSERT: &str = "INSERT INTO payments (id, order_id, user_id, amount_minor, currency, \
    card_brand, card_last4, status, decline_code, captured_minor, refunded_minor, \
    idempotency_key, created_at, updated_at)";
const VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, $10, $11, $11";
const ON_CONFLICT: &str = "ON CONFLICT (user_id, idempotency_key) DO NOTHING";

/// Inserts a payment unless `(user_id, idempotency_key)` already exists; returns whether it
/// was inserted.
pub async fn insert_new<'e, E>(ex: E, r: &NewRecord<'_>) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("{INSERT} VALUES ({VALUES}) {ON_CONFLICT}"));
    insert(ex, &SQL, r).await
}

/// As [`insert_new`], and not at all when the saga has recorded the order as cancelled (a
/// late `OrderPlaced` authorizes nothing): the check and the insert in one statement.
pub async fn insert_unless_cancelled<'e, E>(ex: E, r: &NewRecord<'_>) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{INSERT} SELECT {VALUES} WHERE NOT EXISTS \
             (SELECT 1 FROM saga_cancellations WHERE order_id = $2) {ON_CONFLICT}"
        )
    });
    insert(ex, &SQL, r).await
}

async fn insert<'e, E>(ex: E, sql: &str, r: &NewRecord<'_>) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(sql)
        .bind(r.id)
        .bind(r.order_id)
        .bind(r.user_id)
        .bind(r.amount_minor)
        .bind(r.currency)
        .bind(r.card_brand)
        .bind(r.card_last4)
        .bind(r.status.as_str())
        .bind(r.decline_code)
        .bind(r.idempotency_key)
        .bind(r.now)
        .execute(ex)
        .await
        .map(|r| r.rows_affected() == 1)
}

/// One of `user_id`'s payments.
pub async fn get(db: &Db, user_id: &str, id: &str) -> Result<Option<Payment>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM payments WHERE id = $1 AND user_id = $2"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// The payment `user_id` created with this idempotency key, if any.
pub async fn get_by_idempotency_key(
    db: &Db,
    user_id: &str,
    key: &str,
) -> Result<Option<Payment>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM payments WHERE user_id = $1 AND idempotency_key = $2"
    ))
    .bind(user_id)
    .bind(key)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// `user_id`'s payments (optionally of one order), newest first.
pub async fn list(
    db: &Db,
    user_id: &str,
    order_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Payment>, sqlx::Error> {
    let rows = match order_id {
        Some(order_id) => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM payments WHERE user_id = $1 AND order_id = $2 \
                 ORDER BY created_at DESC, id DESC LIMIT $3"
            ))
            .bind(user_id)
            .bind(order_id)
            .bind(limit)
            .fetch_all(&db.pool)
            .await?
        }
        None => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM payments WHERE user_id = $1 \
                 ORDER BY created_at DESC, id DESC LIMIT $2"
            ))
            .bind(user_id)
            .bind(limit)
            .fetch_all(&db.pool)
            .await?
        }
    };
    rows.iter().map(from_row).collect()
}

/// Applies `change` to `current` only if the row still is exactly in the state `current` was
/// read in (compare-and-set). False when it was changed meanwhile (or is gone).
pub async fn apply(
    db: &Db,
    user_id: &str,
    current: &Payment,
    change: &Change,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE payments SET status = $1, captured_minor = $2, refunded_minor = $3, \
         updated_at = $4 \
         WHERE id = $5 AND user_id = $6 AND status = $7 AND captured_minor = $8 \
         AND refunded_minor = $9",
    )
    .bind(change.status.as_str())
    .bind(change.captured_minor)
    .bind(change.refunded_minor)
    .bind(now)
    .bind(current.id.as_str())
    .bind(user_id)
    .bind(current.status.as_str())
    .bind(current.captured_minor)
    .bind(current.refunded_minor)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
