//! The JWT signature checks the gateway installs in `jsonwebtoken`: its RustCrypto provider,
//! except ES256, checked by `ring` (the crate rustls already brings).
//!
//! Profiled under load with the verified-token cache off, 76% of the gateway's CPU went to
//! the pure-Rust P-256 arithmetic (`p256`'s `fe_mul`, point doubling): about 310 µs per
//! token, where OpenSSL (HAProxy's `jwt_verify`) takes about 60 µs. `ring`'s P-256 is
//! assembly, as OpenSSL's is. Only uncompressed public points (what a JWK's `x`/`y` give)
//! go to `ring`; anything else stays with RustCrypto.

use std::sync::LazyLock;

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, rust_crypto};
use jsonwebtoken::{Algorithm, DecodingKey};

/// An ES256 public key, checked by `ring`.
struct RingEs256(ring::signature::UnparsedPublicKey<Vec<u8>>);

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingEs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        self.0
            .verify(msg, sig)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingEs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

fn verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if *alg == Algorithm::ES256
        && key.family() == jsonwebtoken::AlgorithmFamily::Ec
        && let jsonwebtoken::DecodingKeyKind::SecretOrDer(point) = key.kind()
        && point.len() == 65
        && point[0] == 0x04
    {
        return Ok(Box::new(RingEs256(
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point.clone(),
            ),
        )));
    }
    (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)
}

static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(|| CryptoProvider {
    signer_factory: rust_crypto::DEFAULT_PROVIDER.signer_factory,
    verifier_factory: verifier,
    jwk_utils: rust_crypto::DEFAULT_PROVIDER.jwk_utils.clone(),
});

/// Makes this provider the process's, unless `jsonwebtoken` was used before (then its
/// RustCrypto default stays: the same answers, ES256 slower).
pub(crate) fn install() {
    if CryptoProvider::install_default(&PROVIDER).is_err() {
        tracing::debug!("a JWT crypto provider was installed before the gateway's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, Validation};

    // A P-256 key (PKCS#8) and its public point, for the test only.
    fn keys() -> (EncodingKey, DecodingKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair as _;
        let point = pair.public_key().as_ref().to_vec();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        (
            EncodingKey::from_ec_der(pkcs8.as_ref()),
            DecodingKey::from_ec_components(&b64.encode(&point[1..33]), &b64.encode(&point[33..]))
                .unwrap(),
        )
    }

    #[test]
    fn es256_goes_to_ring_and_answers_as_rustcrypto_does() {
        install();
        let (enc, dec) = keys();
        let v = verifier(&Algorithm::ES256, &dec).unwrap();
        assert_eq!(v.algorithm(), Algorithm::ES256);
        let claims = serde_json::json!({"sub": "u", "exp": 4_000_000_000u64});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &enc).unwrap();
        let validation = Validation::new(Algorithm::ES256);
        let ok = jsonwebtoken::decode::<serde_json::Value>(&token, &dec, &validation).unwrap();
        assert_eq!(ok.claims["sub"], "u");
        // One bit of the signature changed: refused, by both providers.
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut bytes: Vec<u8> = sig.bytes().collect();
        bytes[5] = if bytes[5] == b'A' { b'B' } else { b'A' };
        let forged = format!("{head}.{}", String::from_utf8(bytes).unwrap());
        assert!(jsonwebtoken::decode::<serde_json::Value>(&forged, &dec, &validation).is_err());
        let (signing_input, raw) = token.rsplit_once('.').unwrap();
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .unwrap();
        let rc = (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, &dec).unwrap();
        assert!(
            jsonwebtoken::signature::Verifier::verify(&*rc, signing_input.as_bytes(), &raw).is_ok()
        );
        assert!(
            jsonwebtoken::signature::Verifier::verify(&*v, signing_input.as_bytes(), &raw).is_ok()
        );
        let mut bad = raw.clone();
        bad[10] ^= 1;
        assert!(
            jsonwebtoken::signature::Verifier::verify(&*rc, signing_input.as_bytes(), &bad)
                .is_err()
        );
        assert!(
            jsonwebtoken::signature::Verifier::verify(&*v, signing_input.as_bytes(), &bad).is_err()
        );
    }
}
