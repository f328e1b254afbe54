//! The user center's interface, for the services that read accounts (the shared data
//! pattern, "through its interface").
//!
//! [`Directory::get`] answers from a local cache, else asks the users service
//! (`GET /internal/users/{id}`). Every account change is published by the user center as a
//! `user.updated` event (through its transactional outbox); [`Invalidator`], run as a
//! consumer of those events, drops the cached copy, so a change is seen as soon as its event
//! arrives. The TTL bounds staleness if events stop arriving. A copy fetched before a change
//! but stored after its event is not kept: the event leaves the version it announced, and an
//! older copy is not cached over it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shopmesh_events::UserUpdated;
use shopmesh_messaging::{Envelope, Handler, HandlerError};
use shopmesh_platform::client::{CallError, RequestId, ServiceClient};
use sqlx::{Any, Transaction};

/// An account as other services see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub email: String,
    pub name: String,
    /// `customer` or `admin`.
    pub role: String,
    /// `active` or `disabled`.
    pub status: String,
    #[serde(default)]
    pub addresses: Vec<Address>,
    /// Increases with every change.
    pub version: i64,
}

impl Account {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}

/// A postal address of an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    #[serde(default)]
    pub label: Option<String>,
    pub recipient: String,
    pub line1: String,
    #[serde(default)]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Clone)]
enum Entry {
    Cached(Arc<Account>, Instant),
    /// Changed to this version: any copy older than it is stale.
    Changed(i64),
}

/// Where accounts are read.
enum Source {
    /// The users service's interface, through a cache invalidated by events.
    Interface(ServiceClient),
    /// The user center's published view, through a read-only connection: always current,
    /// at the price of a query on the shared store per lookup.
    Database(shopmesh_platform::db::Db),
}

/// Accounts by id.
pub struct Directory {
    source: Source,
    cache: quick_cache::sync::Cache<String, Entry>,
    ttl: Duration,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via = match &self.source {
            Source::Interface(_) => "interface",
            Source::Database(_) => "database",
        };
        f.debug_struct("Directory")
            .field("via", &via)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Directory {
    /// `users_url`: the users service's base URL. `ttl`: the longest a cached account is
    /// used without its event (events normally invalidate it first).
    pub fn new(users_url: impl Into<String>, ttl: Duration, capacity: usize) -> Self {
        Self::with_client(ServiceClient::new("users", users_url), ttl, capacity)
    }

    /// Like [`Directory::new`], through `client` (the users service directly, or through
    /// the mesh sidecar: [`ServiceClient::through`]).
    pub fn with_client(client: ServiceClient, ttl: Duration, capacity: usize) -> Self {
        Self {
            source: Source::Interface(client),
            cache: quick_cache::sync::Cache::new(capacity.max(16)),
            ttl,
        }
    }

    /// Reads the published `user_directory` view through `db`, a read-only connection to
    /// the user center's database ([`shopmesh_platform::db::Db::open_read_only`]).
    pub fn shared_database(db: shopmesh_platform::db::Db) -> Self {
        Self {
            source: Source::Database(db),
            cache: quick_cache::sync::Cache::new(16),
            ttl: Duration::ZERO,
        }
    }

    /// The account `id`, or `None` when there is none.
    pub async fn get(&self, id: &str, rid: &RequestId) -> Result<Option<Arc<Account>>, CallError> {
        let client = match &self.source {
            Source::Interface(c) => c,
            Source::Database(db) => return read_view(db, id).await,
        };
        let floor = match self.cache.get(id) {
            Some(Entry::Cached(a, at)) if at.elapsed() < self.ttl => {
                metrics::counter!("users_directory_lookups_total", "result" => "hit").increment(1);
                return Ok(Some(a));
            }
            Some(Entry::Changed(v)) => v,
            _ => i64::MIN,
        };
        metrics::counter!("users_directory_lookups_total", "result" => "miss").increment(1);
        let path = format!(
            "/internal/users/{}",
            percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
        );
        match client.get_json::<Account>(&path, rid).await {
            Ok(a) => {
                let a = Arc::new(a);
                // An event for a newer version, or a newer copy, may have come in while this
                // was in flight: an older copy never replaces them.
                let newer = match self.cache.get(id) {
                    Some(Entry::Changed(v)) => v > a.version,
                    Some(Entry::Cached(c, _)) => c.version > a.version,
                    None => false,
                };
                if a.version >= floor && !newer {
                    self.cache
                        .insert(id.to_owned(), Entry::Cached(a.clone(), Instant::now()));
                }
                Ok(Some(a))
            }
            Err(CallError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Drops the cached copy of `id`: it changed to `version`.
    pub fn invalidate(&self, id: &str, version: i64) {
        self.cache.insert(id.to_owned(), Entry::Changed(version));
    }
}

async fn read_view(
    db: &shopmesh_platform::db::Db,
    id: &str,
) -> Result<Option<Arc<Account>>, CallError> {
    use sqlx::Row;
    let unavailable = |e: &dyn std::fmt::Display| CallError::Unavailable {
        service: "users database",
        reason: e.to_string(),
    };
    let row = sqlx::query(
        "SELECT id, email, name, role, status, addresses, version FROM user_directory \
         WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .map_err(|e| unavailable(&e))?;
    metrics::counter!("users_directory_lookups_total", "result" => "database").increment(1);
    let Some(r) = row else { return Ok(None) };
    let get = |c: &str| r.try_get::<String, _>(c).map_err(|e| unavailable(&e));
    let addresses: Vec<Address> =
        serde_json::from_str(&get("addresses")?).map_err(|e| unavailable(&e))?;
    Ok(Some(Arc::new(Account {
        id: get("id")?,
        email: get("email")?,
        name: get("name")?,
        role: get("role")?,
        status: get("status")?,
        addresses,
        version: r.try_get("version").map_err(|e| unavailable(&e))?,
    })))
}

/// The consumer of `user.updated` that keeps a [`Directory`] fresh.
pub struct Invalidator(pub Arc<Directory>);

impl Handler for Invalidator {
    fn handle<'a>(
        &'a self,
        _tx: &'a mut Transaction<'static, Any>,
        env: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if !env.is::<UserUpdated>() {
                return Ok(());
            }
            let e: UserUpdated = env
                .decode()
                .map_err(|e| HandlerError::Permanent(e.to_string()))?;
            self.0.invalidate(&e.user_id, e.version);
            tracing::debug!(user_id = %e.user_id, version = e.version, "account copy dropped");
            Ok(())
        }
        .boxed()
    }
}
