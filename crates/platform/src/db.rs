//! Storage: sqlx on SQLite by default (one file per service under the data dir, WAL) or on
//! PostgreSQL (one schema per service in the given database). Services write portable SQL
//! (TEXT, BIGINT, `$n` placeholders, `ON CONFLICT`) and run it through [`sqlx::Any`], so one
//! code path and one test suite cover both backends.

use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Connection, Executor};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Where all services keep their data: either SQLite files under `data_dir`, or a PostgreSQL
/// database in which each service gets its own schema.
#[derive(Debug, Clone)]
pub enum Storage {
    Sqlite { data_dir: PathBuf },
    Postgres { url: String, schema_prefix: String },
}

impl Storage {
    /// `database` is a `postgres://` URL, or `None` for SQLite under `data_dir`.
    pub fn from_args(database: Option<&str>, data_dir: PathBuf) -> Result<Self, DbError> {
        match database {
            None => Ok(Storage::Sqlite { data_dir }),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Storage::Postgres {
                    url: url.to_owned(),
                    schema_prefix: String::new(),
                })
            }
            Some(url) if url.starts_with("sqlite:") => Err(DbError::Config(format!(
                "use --data-dir for SQLite instead of `{url}`"
            ))),
            Some(_) => Err(DbError::Config(
                "--database must be a postgres:// URL (SQLite is the default)".into(),
            )),
        }
    }

    /// The database of one service.
    pub fn for_service(&self, service: &str) -> DbConfig {
        match self {
            Storage::Sqlite { data_dir } => DbConfig::Sqlite {
                path: data_dir.join(format!("{service}.db")),
            },
            Storage::Postgres { url, schema_prefix } => DbConfig::Postgres {
                url: url.clone(),
                schema: format!("{schema_prefix}{service}"),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Storage::Sqlite { data_dir } => format!("SQLite under {}", data_dir.display()),
            Storage::Postgres { schema_prefix, .. } => {
                format!("PostgreSQL, schemas {schema_prefix}<service>")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum DbConfig {
    Sqlite { path: PathBuf },
    Postgres { url: String, schema: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A service's connection pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

/// Pool settings shared by every pool: `setup` runs on each new connection.
fn pool_options(max_connections: u32, setup: String) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            Box::pin(async move {
                conn.execute(setup.as_str()).await?;
                Ok(())
            })
        })
}

impl Db {
    /// Connects (creating the SQLite file or the PostgreSQL schema if needed) and runs the
    /// service's migrations.
    pub async fn connect(
        cfg: &DbConfig,
        max_connections: u32,
        migrator: &Migrator,
    ) -> Result<Self, DbError> {
        let db = Self::open(cfg, max_connections).await?;
        migrator.run(&db.pool).await?;
        Ok(db)
    }

    /// Connects (creating the SQLite file or the PostgreSQL schema if needed), no migrations.
    pub async fn open(cfg: &DbConfig, max_connections: u32) -> Result<Self, DbError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);

        let db = match cfg {
            DbConfig::Sqlite { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                let url = format!("sqlite://{}?mode=rwc", path.display());
                let opts: AnyConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| DbError::Config(e.to_string()))?;
                let pool = pool_options(
                    max_connections,
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;"
                        .into(),
                )
                .connect_with(opts)
                .await
                .map_err(DbError::Connect)?;
                Db {
                    pool,
                    backend: Backend::Sqlite,
                }
            }
            DbConfig::Postgres { url, schema } => {
                if schema.is_empty()
                    || !schema
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(DbError::Config(format!("invalid schema name `{schema}`")));
                }
                let opts: AnyConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| DbError::Config(e.to_string()))?;
                let mut conn = sqlx::AnyConnection::connect_with(&opts)
                    .await
                    .map_err(DbError::Connect)?;
                if let Err(e) = conn
                    .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                    .await
                {
                    // Two processes creating the same schema race on the catalog; the loser
                    // sees a unique violation and the schema exists, which is all we need.
                    tracing::debug!(error = %e, "create schema raced");
                }
                let _ = conn.close().await;
                let pool =
                    pool_options(max_connections, format!("SET search_path TO \"{schema}\""))
                        .connect_with(opts)
                        .await
                        .map_err(DbError::Connect)?;
                Db {
                    pool,
                    backend: Backend::Postgres,
                }
            }
        };
        Ok(db)
    }

    /// A read-only connection pool to another service's published data (the shared data
    /// pattern). SQLite: the file opened read-only (`mode=ro`, `query_only`). PostgreSQL:
    /// every session switches to `reader_role` (which should hold SELECT on the published
    /// view alone) and makes its transactions read-only. Connections are made on first use
    /// (the owner may still be migrating when the reader starts).
    pub async fn open_read_only(
        cfg: &DbConfig,
        max_connections: u32,
        reader_role: &str,
    ) -> Result<Self, DbError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        match cfg {
            DbConfig::Sqlite { path } => {
                let url = format!("sqlite://{}?mode=ro", path.display());
                let opts: AnyConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| DbError::Config(e.to_string()))?;
                let pool = pool_options(
                    max_connections,
                    "PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;".into(),
                )
                .connect_lazy_with(opts);
                Ok(Db {
                    pool,
                    backend: Backend::Sqlite,
                })
            }
            DbConfig::Postgres { url, schema } => {
                let ident_ok = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                };
                if !ident_ok(schema) || !ident_ok(reader_role) {
                    return Err(DbError::Config(format!(
                        "invalid schema `{schema}` or role `{reader_role}`"
                    )));
                }
                let opts: AnyConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| DbError::Config(e.to_string()))?;
                let setup = format!(
                    "SET search_path TO \"{schema}\"; SET ROLE \"{reader_role}\"; \
                     SET default_transaction_read_only = on"
                );
                let pool = pool_options(max_connections, setup).connect_lazy_with(opts);
                Ok(Db {
                    pool,
                    backend: Backend::Postgres,
                })
            }
        }
    }

    /// Readiness probe.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// `$first,$first+1,…` for `n` bind parameters (an `IN (…)` list or a `VALUES` row).
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rows of `select` (a query ending in `WHERE <column>`) whose column is one of `ids`, in
/// the order of `ids` (first occurrence), unknown ids left out: one query for a whole batch.
pub async fn fetch_by_ids<T>(
    db: &Db,
    select: &str,
    ids: &[String],
    from_row: impl Fn(&sqlx::any::AnyRow) -> Result<T, sqlx::Error>,
    key: impl Fn(&T) -> &str,
) -> Result<Vec<T>, sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&String> = ids.iter().filter(|id| seen.insert(*id)).collect();
    if unique.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!("{select} IN ({})", placeholders(1, unique.len()));
    let mut q = sqlx::query(&sql);
    for id in unique {
        q = q.bind(id.as_str());
    }
    let mut found = std::collections::HashMap::new();
    for row in q.fetch_all(&db.pool).await? {
        let item = from_row(&row)?;
        found.insert(key(&item).to_owned(), item);
    }
    Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
}

/// True when `e` is a unique-constraint violation (on either backend).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.is_unique_violation(),
        _ => false,
    }
}

/// `LIKE` pattern matching `needle` anywhere, with `%`, `_` and `\` escaped (use with
/// `ESCAPE '\'`).
/// One page of `SELECT {select} FROM {from}` filtered by `clauses` (ANDed, their `$n`
/// numbered after `binds`), ordered by `order_by`, at `(limit, offset)`, and the total
/// matching the filter.
/// `select`, `from`, `clauses` and `order_by` are the caller's SQL; only `binds` come from
/// requests.
pub async fn filtered_page(
    db: &Db,
    select: &str,
    from: &str,
    clauses: &[String],
    binds: Vec<String>,
    order_by: &str,
    (limit, offset): (i64, i64),
) -> Result<(Vec<sqlx::any::AnyRow>, i64), sqlx::Error> {
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let count_sql = format!("SELECT COUNT(*) FROM {from} {where_sql}");
    let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
    for b in &binds {
        count = count.bind(b.clone());
    }
    let total = count.fetch_one(&db.pool).await?;
    let n = binds.len();
    let page_sql = format!(
        "SELECT {select} FROM {from} {where_sql} ORDER BY {order_by} LIMIT ${} OFFSET ${}",
        n + 1,
        n + 2
    );
    let mut page = sqlx::query(&page_sql);
    for b in binds {
        page = page.bind(b);
    }
    let rows = page.bind(limit).bind(offset).fetch_all(&db.pool).await?;
    Ok((rows, total))
}

pub fn like_contains(needle: &str) -> String {
    let mut s = String::with_capacity(needle.len() + 2);
    s.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('%');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders() {
        assert_eq!(super::placeholders(1, 3), "$1,$2,$3");
        assert_eq!(super::placeholders(5, 1), "$5");
        assert_eq!(super::placeholders(1, 0), "");
    }
}
