//! Ed25519 signing keys, kept in the service's database so that tokens survive restarts and
//! every instance signs with the same key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use shopmesh_platform::db::Db;
use sqlx::Row;

use crate::Error;

pub struct SigningKeys {
    /// The key that signs new tokens.
    current: (String, EncodingKey),
    /// Every published public key (the current one included).
    jwks: Jwks,
    /// When this copy was read from the database.
    loaded_at: std::time::Instant,
    /// When a published key that does not sign yet starts signing.
    next_activation: Option<std::time::Instant>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Jwk {
    pub kty: &'static str,
    pub crv: &'static str,
    pub x: String,
    pub kid: String,
    pub alg: &'static str,
    #[serde(rename = "use")]
    pub use_: &'static str,
}

impl SigningKeys {
    /// The keys in the database; creates the first one on first start. `publish_for`: how
    /// long a replaced key stays published (its tokens' lifetime plus leeway).
    pub async fn load_or_create(db: &Db, publish_for: std::time::Duration) -> Result<Self, Error> {
        let now = shopmesh_platform::now_millis();
        let mut rows = load(db).await?;
        if !rows.iter().any(|r| r.activates_at <= now) {
            create(db, now).await?;
            rows = load(db).await?;
        }
        let publish_ms = i64::try_from(publish_for.as_millis()).unwrap_or(i64::MAX / 2);
        // Newest activation first: pending keys, then the one signing, then those replaced.
        let current = rows
            .iter()
            .position(|r| r.activates_at <= now)
            .ok_or_else(|| Error::Key("no active signing key after creating one".into()))?;
        let published: Vec<&KeyRow> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| *i <= current || now - rows[i - 1].activates_at < publish_ms)
            .map(|(_, r)| r)
            .collect();
        let signer = &rows[current];
        let der = SigningKey::from_pkcs8_pem(&signer.pem)
            .and_then(|k| k.to_pkcs8_der())
            .map_err(|e| Error::Key(e.to_string()))?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        let jwks = Jwks {
            keys: published
                .iter()
                .map(|r| Jwk {
                    kty: "OKP",
                    crv: "Ed25519",
                    x: r.x.clone(),
                    kid: r.kid.clone(),
                    alg: "EdDSA",
                    use_: "sig",
                })
                .collect(),
        };
        // Read again when a pending key takes over.
        let next_activation = rows[..current]
            .iter()
            .map(|r| r.activates_at)
            .min()
            .map(|at| std::time::Duration::from_millis(u64::try_from(at - now).unwrap_or(0)));
        Ok(Self {
            current: (signer.kid.clone(), encoding),
            jwks,
            loaded_at: std::time::Instant::now(),
            next_activation: next_activation.map(|d| std::time::Instant::now() + d),
        })
    }

    /// Whether this copy may be out of date: older than `max_age`, or a pending key has
    /// taken over since it was read.
    pub fn stale(&self, max_age: std::time::Duration) -> bool {
        self.loaded_at.elapsed() >= max_age
            || self
                .next_activation
                .is_some_and(|at| std::time::Instant::now() >= at)
    }

    /// The kid of the key that signs.
    pub fn current_kid(&self) -> &str {
        &self.current.0
    }

    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.current.0.clone());
        jsonwebtoken::encode(&header, claims, &self.current.1)
    }
}

struct KeyRow {
    kid: String,
    pem: String,
    x: String,
    activates_at: i64,
}

/// Creates a signing key that signs from `activates_at` (Unix milliseconds) on.
async fn create(db: &Db, activates_at: i64) -> Result<String, Error> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::Key(e.to_string()))?;
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    let kid = format!("ed-{}", uuid::Uuid::now_v7().simple());
    // Two instances starting together may both insert: both keys are published and the
    // newest signs, so either outcome is consistent.
    sqlx::query(
        "INSERT INTO signing_keys (kid, private_pem, public_x, created_at, activates_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&kid)
    .bind(pem.to_string())
    .bind(x)
    .bind(shopmesh_platform::now_millis())
    .bind(activates_at)
    .execute(&db.pool)
    .await?;
    Ok(kid)
}

/// Rotates: a new key, published at once, signs after `delay` (longer than the gateways'
/// JWKS refresh interval, so they all know it by then); the key it replaces stays published
/// while its tokens live. Returns the new kid and when it takes over (Unix milliseconds).
pub async fn rotate(db: &Db, delay: std::time::Duration) -> Result<(String, i64), Error> {
    let at =
        shopmesh_platform::now_millis() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
    Ok((create(db, at).await?, at))
}

/// Every key, newest activation first.
async fn load(db: &Db) -> Result<Vec<KeyRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kid, private_pem, public_x, activates_at FROM signing_keys \
         ORDER BY activates_at DESC, created_at DESC, kid DESC",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(KeyRow {
                kid: r.try_get(0)?,
                pem: r.try_get(1)?,
                x: r.try_get(2)?,
                activates_at: r.try_get(3)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shopmesh_platform::db::{Db, DbConfig};

    use super::*;

    async fn db(dir: &tempfile::TempDir) -> Db {
        let cfg = DbConfig::Sqlite {
            path: dir.path().join("users.db"),
        };
        Db::connect(&cfg, 1, &crate::MIGRATOR).await.unwrap()
    }

    fn kids(k: &SigningKeys) -> Vec<String> {
        k.jwks().keys.iter().map(|k| k.kid.clone()).collect()
    }

    #[tokio::test]
    async fn a_rotated_key_signs_after_its_activation_and_the_old_one_leaves_after_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let long = Duration::from_secs(3600);
        let first = SigningKeys::load_or_create(&db, long).await.unwrap();
        let old = first.current_kid().to_owned();
        assert_eq!(kids(&first), std::slice::from_ref(&old));

        // Pending: published, not signing yet.
        let (new, _) = rotate(&db, Duration::from_millis(300)).await.unwrap();
        let pending = SigningKeys::load_or_create(&db, long).await.unwrap();
        assert_eq!(pending.current_kid(), old);
        assert_eq!(kids(&pending), [new.clone(), old.clone()]);
        assert!(!pending.stale(Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(
            pending.stale(Duration::from_secs(60)),
            "the activation makes the copy stale"
        );

        // Active: the new key signs; the old one stays while its tokens can live…
        let active = SigningKeys::load_or_create(&db, long).await.unwrap();
        assert_eq!(active.current_kid(), new);
        assert_eq!(kids(&active), [new.clone(), old.clone()]);
        // …and is gone once they cannot.
        let later = SigningKeys::load_or_create(&db, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(kids(&later), [new]);
    }
}
