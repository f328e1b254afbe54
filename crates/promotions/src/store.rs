use shopmesh_platform::db::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::{Promotion, PromotionKind, PromotionSeed, is_active};

const COLUMNS: &str = "id, name, description, kind, value, currency, product_id, category, \
                       starts_at, ends_at, created_at";

/// A row as a promotion, `active` as of `now` (millis).
fn from_row(row: &AnyRow, now: i64) -> Result<Promotion, sqlx::Error> {
    let kind: String = row.try_get("kind")?;
    let kind = PromotionKind::parse(&kind).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "kind".into(),
        source: format!("unknown promotion kind `{kind}`").into(),
    })?;
    let starts_at: i64 = row.try_get("starts_at")?;
    let ends_at: i64 = row.try_get("ends_at")?;
    Ok(Promotion {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        kind,
        value: row.try_get("value")?,
        currency: row.try_get("currency")?,
        product_id: row.try_get("product_id")?,
        category: row.try_get("category")?,
        starts_at: shopmesh_platform::millis_to_rfc3339(starts_at),
        ends_at: shopmesh_platform::millis_to_rfc3339(ends_at),
        active: is_active(starts_at, ends_at, now),
    })
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Promotion>, sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    sqlx::query(&format!("SELECT {COLUMNS} FROM promotions WHERE id = $1"))
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .as_ref()
        .map(|r| from_row(r, now))
        .transpose()
}

pub struct Filter<'a> {
    pub product_id: Option<&'a str>,
    pub category: Option<&'a str>,
    /// Only promotions running at this instant (millis), when set.
    pub active_at: Option<i64>,
}

enum Arg {
    Text(String),
    Int(i64),
}

/// One page of promotions ordered by start then id, and the total matching the filter.
/// `product_id` and `category` are OR-combined: "promotions of this product or its category".
pub async fn list(
    db: &Db,
    filter: &Filter<'_>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Promotion>, i64), sqlx::Error> {
    let now = shopmesh_platform::now_millis();
    let mut clauses = Vec::new();
    let mut args: Vec<Arg> = Vec::new();
    let mut targets = Vec::new();
    if let Some(p) = filter.product_id {
        args.push(Arg::Text(p.to_owned()));
        targets.push(format!("product_id = ${}", args.len()));
    }
    if let Some(c) = filter.category {
        args.push(Arg::Text(c.to_owned()));
        targets.push(format!("category = ${}", args.len()));
    }
    if !targets.is_empty() {
        clauses.push(format!("({})", targets.join(" OR ")));
    }
    if let Some(at) = filter.active_at {
        args.push(Arg::Int(at));
        let n = args.len();
        clauses.push(format!("starts_at <= ${n} AND ends_at > ${n}"));
    }
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let count_sql = format!("SELECT COUNT(*) FROM promotions {where_sql}");
    let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
    for a in &args {
        count = match a {
            Arg::Text(t) => count.bind(t.clone()),
            Arg::Int(i) => count.bind(*i),
        };
    }
    let total = count.fetch_one(&db.pool).await?;

    let n = args.len();
    let page_sql = format!(
        "SELECT {COLUMNS} FROM promotions {where_sql} ORDER BY starts_at, id LIMIT ${} OFFSET ${}",
        n + 1,
        n + 2
    );
    let mut page = sqlx::query(&page_sql);
    for a in args {
        page = match a {
            Arg::Text(t) => page.bind(t),
            Arg::Int(i) => page.bind(i),
        };
    }
    let rows = page.bind(limit).bind(offset).fetch_all(&db.pool).await?;
    let items = rows
        .iter()
        .map(|r| from_row(r, now))
        .collect::<Result<_, _>>()?;
    Ok((items, total))
}

/// Inserts promotions, skipping ids that already exist. Returns how many were new.
pub async fn insert_many(db: &Db, promos: &[PromotionSeed]) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    let now = shopmesh_platform::now_millis();
    let mut tx = db.pool.begin().await?;
    for chunk in promos.chunks(500) {
        let mut sql = format!("INSERT INTO promotions ({COLUMNS}) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 11;
            if i > 0 {
                sql.push(',');
            }
            let row = shopmesh_platform::db::placeholders(b + 1, 11);
            sql.push_str(&format!("({row})"));
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        let mut q = sqlx::query(&sql);
        for p in chunk {
            q = q
                .bind(p.id.clone())
                .bind(p.name.clone())
                .bind(p.description.clone())
                .bind(p.kind.as_str())
                .bind(p.value)
                .bind(p.currency.clone())
                .bind(p.product_id.clone())
                .bind(p.category.clone())
                .bind(p.starts_at)
                .bind(p.ends_at)
                .bind(now);
        }
        inserted += q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM promotions")
        .fetch_one(&db.pool)
        .await
}
