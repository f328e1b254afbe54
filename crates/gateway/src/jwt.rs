//! Bearer-token verification against a JWKS.
//!
//! Keys are cached by `kid`. A token signed with an unknown `kid` triggers one refetch, at
//! most once per `min_refetch_secs`, so a flood of forged `kid`s cannot hammer the identity
//! provider. The algorithm comes from the key, never from the token: `alg: none`, HS/RS
//! confusion and any mismatch between the token's `alg` and its key's are refused.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::JwtConfig;
use crate::wire::HttpClient;

/// The identity a verified token carries.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    pub roles: Vec<String>,
    /// OAuth scopes from the `scope` claim (space-separated).
    pub scopes: Vec<String>,
    /// Every claim of the token (composite endpoints read them in templates).
    pub claims: std::sync::Arc<serde_json::Map<String, serde_json::Value>>,
    /// `iat`, in Unix seconds (0 when absent).
    pub issued_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted")]
    Algorithm,
    #[error("token signed with an unknown key")]
    UnknownKey,
    #[error("token expired")]
    Expired,
    #[error("token not valid: {0}")]
    Invalid(String),
    #[error("identity provider keys unavailable: {0}")]
    KeysUnavailable(String),
    #[error("token revoked (account disabled)")]
    Revoked,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scope: Option<String>,
    exp: u64,
    #[serde(default)]
    iat: u64,
}

struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    cfg: JwtConfig,
    /// Tokens already verified, with when to stop trusting the result (the token's `exp`,
    /// at most [`CACHE_TTL`] away). Bounded; the same token string always carries the same
    /// claims, so a hit is as good as a verification. `None` when `cache: false`.
    verified: Option<quick_cache::sync::Cache<String, (Identity, Instant)>>,
    client: HttpClient,
    keys: RwLock<HashMap<String, Key>>,
    /// When the last fetch was tried, and whether it worked.
    last_fetch: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// Subjects whose tokens issued at or before a time (Unix seconds) are refused.
    revoked: RwLock<HashMap<String, u64>>,
    any_revoked: std::sync::atomic::AtomicBool,
}

#[derive(Deserialize)]
struct RevocationList {
    revoked: Vec<RevokedSubject>,
}

#[derive(Deserialize)]
struct RevokedSubject {
    sub: String,
    since: u64,
}

/// Most revoked subjects accepted from one list.
const MAX_REVOKED: usize = 1_000_000;

/// Longest time a verification result is reused.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most verification results kept.
const CACHE_ENTRIES: usize = 10_000;

/// Quiet period after a failed fetch: short, but a down identity provider is not hammered.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl JwtVerifier {
    /// The key ids of the JWKS as last fetched (sorted).
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    pub fn new(cfg: JwtConfig, client: HttpClient) -> Self {
        crate::jwt_crypto::install();
        Self {
            verified: cfg
                .cache
                .then(|| quick_cache::sync::Cache::new(CACHE_ENTRIES)),
            cfg,
            client,
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            revoked: RwLock::new(HashMap::new()),
            any_revoked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Refuses the identity of a revoked subject's token.
    fn check_revoked(&self, id: &Identity) -> Result<(), AuthError> {
        if !self.any_revoked.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        match revoked.get(&id.subject) {
            Some(&since) if id.issued_at <= since => Err(AuthError::Revoked),
            _ => Ok(()),
        }
    }

    /// Fetches the revocation list once and replaces the one in use. On failure the last
    /// list stays (an outage of the identity provider does not re-enable anyone).
    pub async fn poll_revocations(&self, url: &str) -> Result<usize, String> {
        let body = self.get(url, 64 * 1024 * 1024).await?;
        let list: RevocationList = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let map: HashMap<String, u64> = list
            .revoked
            .into_iter()
            .take(MAX_REVOKED)
            .map(|r| (r.sub, r.since))
            .collect();
        let n = map.len();
        self.any_revoked
            .store(n > 0, std::sync::atomic::Ordering::Relaxed);
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(n)
    }

    /// Verifies a bearer token: from the verified-token cache when it holds the token, by
    /// its signature and claims otherwise (always, with `cache: false`).
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Some(verified) = &self.verified else {
            let (id, _) = self.verify_signature(token).await?;
            self.check_revoked(&id)?;
            return Ok(id);
        };
        if let Some((id, until)) = verified.get(token)
            && Instant::now() < until
        {
            self.check_revoked(&id)?;
            return Ok(id);
        }
        let (id, exp) = self.verify_signature(token).await?;
        self.check_revoked(&id)?;
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ttl = Duration::from_secs(exp.saturating_sub(now_unix)).min(CACHE_TTL);
        if !ttl.is_zero() {
            verified.insert(token.to_owned(), (id.clone(), Instant::now() + ttl));
        }
        Ok(id)
    }

    async fn verify_signature(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let kid = header.kid.ok_or(AuthError::Malformed)?;
        if !self.has_key(&kid) {
            self.refresh().await?;
        }
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.get(&kid).ok_or(AuthError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(AuthError::Algorithm);
        }
        let mut v = Validation::new(key.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.cfg.leeway_secs;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &v)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match e.kind() {
                        K::ExpiredSignature => AuthError::Expired,
                        K::InvalidAlgorithm => AuthError::Algorithm,
                        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                            AuthError::Malformed
                        }
                        other => AuthError::Invalid(format!("{other:?}")),
                    }
                })?;
        let all = data.claims;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(all.clone()))
            .map_err(|_| AuthError::Malformed)?;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty subject".into()));
        }
        let exp = claims.exp;
        Ok((
            Identity {
                subject: claims.sub,
                // Roles travel comma-separated upstream: one holding a comma would become two.
                roles: claims
                    .roles
                    .into_iter()
                    .filter(|r| !r.is_empty() && !r.contains(','))
                    .collect(),
                scopes: claims
                    .scope
                    .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default(),
                claims: std::sync::Arc::new(all),
                issued_at: claims.iat,
            },
            exp,
        ))
    }

    fn has_key(&self, kid: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(kid)
    }

    /// Refetches the JWKS unless it was fetched less than `min_refetch_secs` ago.
    async fn refresh(&self) -> Result<(), AuthError> {
        self.fetch_keys(false).await
    }

    /// The periodic refresh: fetches the JWKS whatever the unknown-`kid` rate limit says,
    /// so keys published ahead of use (a rotation) are known before their first token.
    pub async fn refresh_scheduled(&self) -> Result<(), AuthError> {
        self.fetch_keys(true).await
    }

    async fn fetch_keys(&self, scheduled: bool) -> Result<(), AuthError> {
        let mut last = self.last_fetch.lock().await;
        if let Some((t, ok)) = *last
            && !scheduled
        {
            let quiet = if ok {
                Duration::from_secs(self.cfg.min_refetch_secs)
            } else {
                RETRY_AFTER_FAILURE
            };
            if t.elapsed() < quiet {
                return if ok {
                    Ok(())
                } else {
                    Err(AuthError::KeysUnavailable("recent fetch failed".into()))
                };
            }
        }
        // One deadline for the whole fetch, body included: a trickling JWKS cannot hold the
        // refresh lock (and every unknown-`kid` request behind it).
        let fetched = match tokio::time::timeout(Duration::from_secs(5), self.fetch()).await {
            Ok(r) => r,
            Err(_) => Err("timed out".to_string()),
        };
        match fetched {
            Ok(keys) => {
                *last = Some((Instant::now(), true));
                tracing::info!(keys = keys.len(), "JWKS refreshed");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
                Ok(())
            }
            Err(e) => {
                *last = Some((Instant::now(), false));
                tracing::warn!(error = %e, "JWKS fetch failed");
                Err(AuthError::KeysUnavailable(e))
            }
        }
    }

    /// GETs a JSON document of at most `limit` bytes from the identity provider, body
    /// included within one 5 s deadline.
    async fn get(&self, url: &str, limit: usize) -> Result<bytes::Bytes, String> {
        crate::wire::get_bounded(&self.client, url, limit, Duration::from_secs(5)).await
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, String> {
        let body = self.get(&self.cfg.jwks_url, 256 * 1024).await?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) => {
                    // Guard the verifier: an Ed25519 public key is exactly 32 bytes.
                    match URL_SAFE_NO_PAD.decode(&p.x) {
                        Ok(x) if x.len() == 32 => Algorithm::EdDSA,
                        _ => continue,
                    }
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                // Symmetric keys are never accepted from a JWKS (no HS/RS confusion).
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, Key { alg, key });
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    /// A P-256 key for tests only (PKCS#8 DER, base64), and its public point.
    const TEST_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgxqqse0W9m4j8mb4+\
        Yu01mqTgY4RQXnHNFRogtn0vJqShRANCAARkvKqkjuC/xF8p3TvdLJYHyjnQPrjG\
        jWeUri2XXRFnA8WXbNR4Vwt4Cy1x35s5oJs4bCUypa/eBRMhjRZ0xpGe";
    const TEST_X: &str = "ZLyqpI7gv8RfKd073SyWB8o50D64xo1nlK4tl10RZwM";
    const TEST_Y: &str = "xZds1HhXC3gLLXHfmzmgmzhsJTKlr94FEyGNFnTGkZ4";

    fn es256_jwks() -> serde_json::Value {
        json!({"keys": [{"kty": "EC", "crv": "P-256", "x": TEST_X, "y": TEST_Y,
            "kid": "k1", "alg": "ES256", "use": "sig"}]})
    }

    fn es256_token() -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = json!({"sub": "ada", "iss": "test", "aud": "test", "iat": now,
            "exp": now + 3600, "roles": ["customer"]});
        let der = base64::engine::general_purpose::STANDARD
            .decode(TEST_KEY)
            .unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// A JWKS endpoint on a real socket whose document the test can replace.
    async fn jwks_server(doc: Arc<Mutex<serde_json::Value>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let doc = doc.lock().unwrap().clone();
                async move { axum::Json(doc) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/jwks")
    }

    fn verifier(jwks_url: String, cache: bool) -> JwtVerifier {
        JwtVerifier::new(
            JwtConfig {
                jwks_url,
                issuer: "test".into(),
                audience: "test".into(),
                leeway_secs: 0,
                min_refetch_secs: 3600,
                revocations_url: None,
                revocations_poll_ms: 2000,
                jwks_refresh_ms: 60_000,
                cache,
            },
            crate::runtime::jwks_client(),
        )
    }

    /// With `cache: false` every request's signature is checked against the keys of the
    /// moment: once its key is withdrawn from the JWKS, a token verified a moment ago is
    /// refused. With the cache on, the same token is still accepted from the cache.
    #[tokio::test]
    async fn the_cache_off_checks_every_token_against_the_current_keys() {
        let token = es256_token();
        for cache in [true, false] {
            let doc = Arc::new(Mutex::new(es256_jwks()));
            let v = verifier(jwks_server(doc.clone()).await, cache);
            let id = v.verify(&token).await.unwrap();
            assert_eq!(id.subject, "ada");
            assert_eq!(id.roles, ["customer"]);

            *doc.lock().unwrap() = json!({"keys": []});
            v.refresh_scheduled().await.unwrap();
            assert!(v.key_ids().is_empty());

            let again = v.verify(&token).await;
            if cache {
                assert_eq!(again.unwrap().subject, "ada", "the cache answers");
            } else {
                assert!(
                    matches!(again, Err(AuthError::UnknownKey)),
                    "cache off: the signature is checked again, {again:?}"
                );
            }
        }
    }

    /// A forged ES256 signature is refused whether the cache is on or off, and a refusal is
    /// never remembered as a success.
    #[tokio::test]
    async fn a_bad_es256_signature_is_refused_with_the_cache_on_or_off() {
        let token = es256_token();
        let (rest, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 1;
        let forged = format!("{rest}.{}", URL_SAFE_NO_PAD.encode(raw));
        for cache in [true, false] {
            let doc = Arc::new(Mutex::new(es256_jwks()));
            let v = verifier(jwks_server(doc).await, cache);
            for _ in 0..2 {
                assert!(v.verify(&forged).await.is_err(), "cache={cache}");
            }
            assert!(v.verify(&token).await.is_ok(), "cache={cache}");
        }
    }
}
