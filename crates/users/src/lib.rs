//! User center: the one source of truth for users and identity.
//!
//! Registration and login (argon2id, throttled per account and per address), short-lived
//! JWT access tokens signed with Ed25519 (`EdDSA`, with `kid`), refresh tokens rotated on
//! every use with reuse detection, logout, the public keys as a JWKS at
//! `/.well-known/jwks.json`, and the caller's own profile with addresses, updated under
//! optimistic concurrency (`ETag` / `If-Match`). Same layout as every shopmesh service.

pub mod api;
pub mod keys;
pub mod model;
pub mod password;
pub mod store;
pub mod throttle;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use shopmesh_platform::db::Db;

pub const NAME: &str = "users";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The PostgreSQL role other services read the published `user_directory` view as (the
/// shared-database way of sharing): SELECT on that view, nothing else.
pub const DIRECTORY_READER: &str = "shopmesh_directory_reader";

/// Issuer (`iss`) of the access tokens.
pub const ISSUER: &str = "shopmesh-users";
/// Audience (`aud`) of the access tokens.
pub const AUDIENCE: &str = "shopmesh";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("signing key: {0}")]
    Key(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Creates the directory reader role (once per cluster) and lets it read the published view
/// of this schema, and nothing else.
async fn grant_directory_reader(db: &Db) -> Result<(), sqlx::Error> {
    let create = format!(
        "DO $$ BEGIN CREATE ROLE {DIRECTORY_READER} NOLOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    );
    sqlx::query(&create).execute(&db.pool).await?;
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&db.pool)
        .await?;
    for grant in [
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO {DIRECTORY_READER}"),
        format!("GRANT SELECT ON \"{schema}\".user_directory TO {DIRECTORY_READER}"),
        // Lets a non-superuser service login `SET ROLE` to it.
        format!("GRANT {DIRECTORY_READER} TO CURRENT_USER"),
    ] {
        sqlx::query(&grant).execute(&db.pool).await?;
    }
    Ok(())
}

/// Stages the `user.updated` event of an account changed in `tx`.
pub async fn stage_updated(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    user_id: &str,
) -> Result<(), sqlx::Error> {
    let Some((version, status)) = store::version_in(tx, user_id).await? else {
        return Ok(());
    };
    let event = shopmesh_events::UserUpdated {
        user_id: user_id.to_owned(),
        version,
        status,
    };
    let env = shopmesh_messaging::Envelope::new(NAME, user_id, &event)
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    shopmesh_messaging::outbox::stage(tx, shopmesh_events::TOPIC_USERS, &env).await
}

/// Token settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (each use issues a successor with a fresh lifetime).
    pub refresh_ttl: Duration,
    /// Bootstrap administrators (normalised emails): made admins at start-up if they have an
    /// account, and when they register.
    pub admins: Vec<String>,
    /// After a rotation, how long the new key is published before it signs: longer than
    /// the gateways' JWKS refresh interval.
    pub key_activation: Duration,
    /// Sign-in attempts allowed per account and per client address, per minute.
    pub login_limits: (u32, u32),
}

impl Settings {
    /// How long a retired signing key stays in the JWKS: its tokens' lifetime, plus the
    /// gateway's clock leeway and a margin.
    pub fn key_publish_for(&self) -> Duration {
        self.access_ttl + Duration::from_secs(120)
    }
}

/// How old the in-memory copy of the signing keys may get before it is read again (another
/// instance may have rotated them).
const KEYS_MAX_AGE: Duration = Duration::from_secs(30);

impl State {
    /// The signing keys, read again from the database when this copy is old.
    pub async fn keys(&self) -> Arc<keys::SigningKeys> {
        let current = self.keys.load_full();
        if !current.stale(KEYS_MAX_AGE) {
            return current;
        }
        self.reload_keys().await.unwrap_or(current)
    }

    /// Reads the signing keys again (after a rotation).
    pub async fn reload_keys(&self) -> Option<Arc<keys::SigningKeys>> {
        match keys::SigningKeys::load_or_create(&self.db, self.settings.key_publish_for()).await {
            Ok(k) => {
                let k = Arc::new(k);
                self.keys.store(k.clone());
                Some(k)
            }
            Err(e) => {
                tracing::warn!(error = %e, "signing keys could not be reloaded; the last ones stay");
                None
            }
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            admins: Vec::new(),
            key_activation: Duration::from_secs(90),
            login_limits: (throttle::ACCOUNT_PER_MINUTE, throttle::IP_PER_MINUTE),
        }
    }
}

#[derive(Clone)]
pub struct State {
    pub db: Db,
    keys: Arc<arc_swap::ArcSwap<keys::SigningKeys>>,
    pub settings: Arc<Settings>,
    pub throttle: Arc<throttle::LoginThrottle>,
    /// Publishes the staged `user.updated` events.
    pub relay: shopmesh_messaging::outbox::Relay,
}

/// The service's HTTP application. Loads (or on first start creates) the signing key.
pub async fn app(
    db: Db,
    settings: Settings,
    relay: shopmesh_messaging::outbox::Relay,
) -> Result<axum::Router, Error> {
    let keys = Arc::new(arc_swap::ArcSwap::from_pointee(
        keys::SigningKeys::load_or_create(&db, settings.key_publish_for()).await?,
    ));
    let mut settings = settings;
    settings.admins = settings
        .admins
        .iter()
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty())
        .collect();
    if db.backend == shopmesh_platform::db::Backend::Postgres {
        grant_directory_reader(&db).await?;
    }
    let promoted = store::promote(&db, &settings.admins).await?;
    if promoted > 0 {
        tracing::info!(promoted, "bootstrap administrators promoted");
    }
    let state = State {
        db,
        keys,
        throttle: Arc::new(throttle::LoginThrottle::new(
            settings.login_limits.0,
            settings.login_limits.1,
        )),
        settings: Arc::new(settings),
        relay,
    };
    Ok(shopmesh_platform::serve::stack(
        NAME,
        api::routes(state),
        shopmesh_platform::serve::DEFAULT_BODY_LIMIT,
    ))
}
