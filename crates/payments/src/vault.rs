//! The card vault: a card becomes a payment method id, `pm_<payload>.<mac>`, where the
//! payload holds the owner, the brand, the last four digits and the (simulated) card
//! network's standing answer for the card, and the MAC (HMAC-SHA256 under a key kept in the
//! payments database) makes it unforgeable. The number itself is kept nowhere; vaulting
//! writes nothing, so it costs the order path no database write.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use shopmesh_platform::db::Db;
use sqlx::{Any, Executor};
use tokio::sync::OnceCell;

use crate::model::PaymentMethod;

const KEY_ID: i64 = 1;

#[derive(Serialize, Deserialize)]
struct Sealed {
    /// Owner.
    u: String,
    /// Brand.
    b: String,
    /// Last four digits.
    l: String,
    /// The network's answer: `authorize` or `decline:<code>`.
    v: String,
    /// Sealed at (Unix ms).
    t: i64,
}

/// One per payments service instance; the key is loaded (or created) on first use.
pub struct Vault {
    db: Db,
    key: OnceCell<[u8; 32]>,
}

fn decode_key(secret: &str) -> Option<[u8; 32]> {
    <[u8; 32] as hex::FromHex>::from_hex(secret).ok()
}

impl Vault {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            key: OnceCell::new(),
        }
    }

    /// The key, created by the first instance that needs one (every instance agrees).
    async fn key(&self) -> Result<&[u8; 32], sqlx::Error> {
        self.key
            .get_or_try_init(|| async {
                let secret = hex::encode(rand::random::<[u8; 32]>());
                sqlx::query(
                    "INSERT INTO vault_keys (id, secret, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(KEY_ID)
                .bind(&secret)
                .bind(shopmesh_platform::now_millis())
                .execute(&self.db.pool)
                .await?;
                let stored: String =
                    sqlx::query_scalar("SELECT secret FROM vault_keys WHERE id = $1")
                        .bind(KEY_ID)
                        .fetch_one(&self.db.pool)
                        .await?;
                decode_key(&stored).ok_or_else(|| sqlx::Error::Decode("malformed vault key".into()))
            })
            .await
    }

    /// The key read through `ex` (inside a transaction that holds the only connection);
    /// `None` when no card was ever vaulted, so no id can be valid.
    async fn key_with<'e, E>(&self, ex: E) -> Result<Option<[u8; 32]>, sqlx::Error>
    where
        E: Executor<'e, Database = Any>,
    {
        if let Some(k) = self.key.get() {
            return Ok(Some(*k));
        }
        let stored: Option<String> =
            sqlx::query_scalar("SELECT secret FROM vault_keys WHERE id = $1")
                .bind(KEY_ID)
                .fetch_optional(ex)
                .await?;
        let key = stored.as_deref().and_then(decode_key);
        if let Some(k) = key {
            let _ = self.key.set(k);
        }
        Ok(key)
    }

    fn mac(key: &[u8; 32], payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key size");
        mac.update(b"pm_");
        mac.update(payload.as_bytes());
        mac
    }

    /// Seals a card for `user_id`. `card` is a normalised, valid number.
    pub async fn seal(&self, user_id: &str, card: &str) -> Result<PaymentMethod, sqlx::Error> {
        let key = self.key().await?;
        let now = shopmesh_platform::now_millis();
        let sealed = Sealed {
            u: user_id.to_owned(),
            b: crate::model::card_brand(card).to_owned(),
            l: crate::model::card_last4(card).to_owned(),
            v: crate::model::network_verdict(card),
            t: now,
        };
        let payload = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&sealed).map_err(|e| sqlx::Error::Encode(e.into()))?);
        let tag = URL_SAFE_NO_PAD.encode(Self::mac(key, &payload).finalize().into_bytes());
        Ok(PaymentMethod {
            id: format!("pm_{payload}.{tag}"),
            card_brand: sealed.b,
            card_last4: sealed.l,
            created_at: shopmesh_platform::millis_to_rfc3339(now),
        })
    }

    fn unseal(key: &[u8; 32], user_id: &str, id: &str) -> Option<(PaymentMethod, String)> {
        let (payload, tag) = id.strip_prefix("pm_")?.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        Self::mac(key, payload).verify_slice(&tag).ok()?;
        let sealed: Sealed = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        (sealed.u == user_id).then(|| {
            (
                PaymentMethod {
                    id: id.to_owned(),
                    card_brand: sealed.b,
                    card_last4: sealed.l,
                    created_at: shopmesh_platform::millis_to_rfc3339(sealed.t),
                },
                sealed.v,
            )
        })
    }

    /// The method `id` of `user_id` with the network's answer, if it is genuine and theirs.
    pub async fn open(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<(PaymentMethod, String)>, sqlx::Error> {
        let key = self.key().await?;
        Ok(Self::unseal(key, user_id, id))
    }

    /// [`Self::open`] inside a transaction.
    pub async fn open_with<'e, E>(
        &self,
        ex: E,
        user_id: &str,
        id: &str,
    ) -> Result<Option<(PaymentMethod, String)>, sqlx::Error>
    where
        E: Executor<'e, Database = Any>,
    {
        Ok(self
            .key_with(ex)
            .await?
            .and_then(|k| Self::unseal(&k, user_id, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unforgeable_and_personal() {
        let key = [7u8; 32];
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Sealed {
                u: "u-1".into(),
                b: "visa".into(),
                l: "4242".into(),
                v: "authorize".into(),
                t: 0,
            })
            .unwrap(),
        );
        let tag = URL_SAFE_NO_PAD.encode(Vault::mac(&key, &payload).finalize().into_bytes());
        let id = format!("pm_{payload}.{tag}");
        let (m, v) = Vault::unseal(&key, "u-1", &id).unwrap();
        assert_eq!((m.card_last4.as_str(), v.as_str()), ("4242", "authorize"));
        assert!(Vault::unseal(&key, "u-2", &id).is_none(), "another user's");
        assert!(
            Vault::unseal(&[8u8; 32], "u-1", &id).is_none(),
            "another key"
        );
        // A payload changed to say `authorize` for a declined card: the tag no longer fits.
        let mut forged = payload.clone().into_bytes();
        forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(Vault::unseal(&key, "u-1", &format!("pm_{forged}.{tag}")).is_none());
        assert!(Vault::unseal(&key, "u-1", "pm_garbage").is_none());
        assert!(Vault::unseal(&key, "u-1", "").is_none());
    }
}
