use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::Price;

const COLUMNS: &str = "product_id, amount_minor, currency, updated_at";

fn from_row(row: &AnyRow) -> Result<Price, sqlx::Error> {
    Ok(Price {
        product_id: row.try_get("product_id")?,
        amount_minor: row.try_get("amount_minor")?,
        currency: row.try_get("currency")?,
        updated_at: shopmesh_platform::millis_to_rfc3339(row.try_get("updated_at")?),
    })
}

pub async fn get(db: &Db, product_id: &str) -> Result<Option<Price>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM prices WHERE product_id = $1"
    ))
    .bind(product_id)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// The prices of `ids`, in the order of `ids` (first occurrence), unknown ids left out.
pub async fn get_many(db: &Db, ids: &[String]) -> Result<Vec<Price>, sqlx::Error> {
    let select = format!("SELECT {COLUMNS} FROM prices WHERE product_id");
    shopmesh_platform::db::fetch_by_ids(db, &select, ids, from_row, |p| &p.product_id).await
}

/// Sets the price of a product, creating it if needed. Returns the stored price.
pub async fn upsert(
    db: &Db,
    product_id: &str,
    amount_minor: i64,
    currency: &str,
) -> Result<Price, sqlx::Error> {
    let sql = format!(
        "INSERT INTO prices ({COLUMNS}) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (product_id) DO UPDATE SET amount_minor = excluded.amount_minor, \
         currency = excluded.currency, updated_at = excluded.updated_at \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(product_id)
        .bind(amount_minor)
        .bind(currency)
        .bind(shopmesh_platform::now_millis())
        .fetch_one(&db.pool)
        .await?;
    from_row(&row)
}

/// Inserts `(product_id, amount_minor, currency)` prices, skipping products that already have
/// one. Returns how many were new.
pub async fn insert_many(db: &Db, prices: &[(String, i64, String)]) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    let now = shopmesh_platform::now_millis();
    let mut tx = db.pool.begin().await?;
    for chunk in prices.chunks(500) {
        let mut sql = format!("INSERT INTO prices ({COLUMNS}) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 4;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "({})",
                shopmesh_platform::db::placeholders(b + 1, 4)
            ));
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        let mut q = sqlx::query(&sql);
        for (product_id, amount_minor, currency) in chunk {
            q = q
                .bind(product_id.clone())
                .bind(*amount_minor)
                .bind(currency.clone())
                .bind(now);
        }
        inserted += q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM prices")
        .fetch_one(&db.pool)
        .await
}
