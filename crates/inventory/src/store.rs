use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::StockLevel;

const COLUMNS: &str = "product_id, on_hand, reserved";

fn from_row(row: &AnyRow) -> Result<StockLevel, sqlx::Error> {
    let on_hand: i64 = row.try_get("on_hand")?;
    let reserved: i64 = row.try_get("reserved")?;
    Ok(StockLevel {
        product_id: row.try_get("product_id")?,
        on_hand,
        reserved,
        available: on_hand - reserved,
    })
}

pub async fn get(db: &Db, product_id: &str) -> Result<Option<StockLevel>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM stock WHERE product_id = $1"
    ))
    .bind(product_id)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// The stock levels of `ids`, in the order of `ids` (first occurrence), unknown ids left out.
pub async fn get_many(db: &Db, ids: &[String]) -> Result<Vec<StockLevel>, sqlx::Error> {
    let select = format!("SELECT {COLUMNS} FROM stock WHERE product_id");
    shopmesh_platform::db::fetch_by_ids(db, &select, ids, from_row, |s| &s.product_id).await
}

pub enum SetOutcome {
    /// The new stock level.
    Set(StockLevel),
    /// Refused: `on_hand` would fall below what is reserved. Carries the current level.
    BelowReserved(StockLevel),
}

/// Sets the units on hand (creating the stock level if needed), unless that would put them
/// below the units reserved. The check and the write are one statement, so a concurrent
/// reservation cannot slip in between.
pub async fn set_on_hand(
    db: &Db,
    product_id: &str,
    on_hand: i64,
) -> Result<Option<SetOutcome>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO stock (product_id, on_hand, reserved, updated_at) VALUES ($1, $2, 0, $3) \
         ON CONFLICT (product_id) DO UPDATE SET on_hand = excluded.on_hand, \
         updated_at = excluded.updated_at WHERE stock.reserved <= excluded.on_hand \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(product_id)
        .bind(on_hand)
        .bind(shopmesh_platform::now_millis())
        .fetch_optional(&db.pool)
        .await?;
    match row {
        Some(row) => Ok(Some(SetOutcome::Set(from_row(&row)?))),
        None => Ok(get(db, product_id).await?.map(SetOutcome::BelowReserved)),
    }
}

/// Inserts `(product_id, on_hand)` levels with nothing reserved, skipping products that already
/// have one. Returns how many were new.
pub async fn insert_many(db: &Db, levels: &[(String, i64)]) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    let now = shopmesh_platform::now_millis();
    let mut tx = db.pool.begin().await?;
    for chunk in levels.chunks(500) {
        let mut sql =
            String::from("INSERT INTO stock (product_id, on_hand, reserved, updated_at) VALUES ");
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
        for (product_id, on_hand) in chunk {
            q = q
                .bind(product_id.clone())
                .bind(*on_hand)
                .bind(0_i64)
                .bind(now);
        }
        inserted += q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM stock")
        .fetch_one(&db.pool)
        .await
}
