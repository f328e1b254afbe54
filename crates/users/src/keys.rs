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
    pub async fn load_or_create(db: &Db) -> Result<Self, Error> {
        let rows = load(db).await?;
        let rows = if rows.is_empty() {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| Error::Key(e.to_string()))?;
            let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
            let kid = format!("ed-{}", uuid::Uuid::now_v7().simple());
            // Two instances starting together may both insert: both keys are published and
            // the newest signs, so either outcome is consistent.
            sqlx::query(
                "INSERT INTO signing_keys (kid, private_pem, public_x, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(kid)
            .bind(pem.to_string())
            .bind(x)
            .bind(shopmesh_platform::now_millis())
            .execute(&db.pool)
            .await?;
            load(db).await?
        } else {
            rows
        };
        let (kid, pem, _) = rows
            .first()
            .ok_or_else(|| Error::Key("no signing key after creating one".into()))?;
        let der = SigningKey::from_pkcs8_pem(pem)
            .and_then(|k| k.to_pkcs8_der())
            .map_err(|e| Error::Key(e.to_string()))?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        let jwks = Jwks {
            keys: rows
                .iter()
                .map(|(kid, _, x)| Jwk {
                    kty: "OKP",
                    crv: "Ed25519",
                    x: x.clone(),
                    kid: kid.clone(),
                    alg: "EdDSA",
                    use_: "sig",
                })
                .collect(),
        };
        Ok(Self {
            current: (kid.clone(), encoding),
            jwks,
        })
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

/// (kid, private pem, public x), newest first.
async fn load(db: &Db) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kid, private_pem, public_x FROM signing_keys ORDER BY created_at DESC, kid DESC",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}
