use serde_json::{Map, Value};
use shopmesh_platform::db::{Db, like_contains};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::Product;

const COLUMNS: &str = "id, sku, name, description, category, attributes, created_at";

fn from_row(row: &AnyRow) -> Result<Product, sqlx::Error> {
    let attributes: String = row.try_get("attributes")?;
    Ok(Product {
        id: row.try_get("id")?,
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        category: row.try_get("category")?,
        attributes: serde_json::from_str::<Map<String, Value>>(&attributes).unwrap_or_default(),
        created_at: shopmesh_platform::millis_to_rfc3339(row.try_get("created_at")?),
    })
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM products WHERE id = $1"))
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

pub struct Filter<'a> {
    pub q: Option<&'a str>,
    pub category: Option<&'a str>,
}

/// One page of products ordered by sku, and the total matching the filter.
pub async fn list(
    db: &Db,
    filter: &Filter<'_>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Product>, i64), sqlx::Error> {
    let mut clauses = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    if let Some(q) = filter.q {
        binds.push(like_contains(&q.to_lowercase()));
        let n = binds.len();
        clauses.push(format!(
            "(LOWER(name) LIKE ${n} ESCAPE '\\' OR LOWER(description) LIKE ${n} ESCAPE '\\' \
             OR LOWER(sku) LIKE ${n} ESCAPE '\\')"
        ));
    }
    if let Some(c) = filter.category {
        binds.push(c.to_owned());
        clauses.push(format!("category = ${}", binds.len()));
    }
    let (rows, total) = shopmesh_platform::db::filtered_page(
        db,
        COLUMNS,
        "products",
        &clauses,
        binds,
        "sku",
        (limit, offset),
    )
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    Ok((items, total))
}

/// Inserts products, skipping ids or skus that already exist. Returns how many were new.
pub async fn insert_many(db: &Db, products: &[Product]) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    let mut tx = db.pool.begin().await?;
    for chunk in products.chunks(500) {
        let mut sql = format!("INSERT INTO products ({COLUMNS}) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "({})",
                shopmesh_platform::db::placeholders(b + 1, 7)
            ));
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        let mut q = sqlx::query(&sql);
        for p in chunk {
            q = q
                .bind(p.id.clone())
                .bind(p.sku.clone())
                .bind(p.name.clone())
                .bind(p.description.clone())
                .bind(p.category.clone())
                .bind(Value::Object(p.attributes.clone()).to_string())
                .bind(shopmesh_platform::now_millis());
        }
        inserted += q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

pub async fn count(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM products")
        .fetch_one(&db.pool)
        .await
}
