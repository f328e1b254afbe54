//! Password hashing: argon2id with the crate's defaults (RFC 9106 second recommendation:
//! m = 19 MiB, t = 2, p = 1), run off the async runtime.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A hash to verify against when the email is unknown, so that both failures take the same
/// time and answer the same way.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_blocking("not-a-real-password-but-the-same-cost").unwrap_or_default());

fn hash_blocking(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn verify_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Passwords refused whatever their length (NIST SP 800-63B §5.1.1.2: check against
/// commonly used values, no composition rules). The most common ones of at least 8
/// characters in public breach corpora.
const COMMON: [&str; 24] = [
    "12345678",
    "123456789",
    "1234567890",
    "password",
    "password1",
    "password123",
    "qwertyuiop",
    "qwerty123",
    "11111111",
    "00000000",
    "iloveyou",
    "abc12345",
    "12341234",
    "1q2w3e4r",
    "1qaz2wsx",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "welcome1",
    "letmein1",
    "trustno1",
    "superman",
    "passw0rd",
];

/// Whether `password` may be used by the account `email`: not a common password, not one
/// character repeated, not the email or its local part.
pub fn acceptable(password: &str, email: &str) -> bool {
    let lower = password.to_lowercase();
    let local = email.split('@').next().unwrap_or_default();
    let mut chars = lower.chars();
    let first = chars.next();
    let common = COMMON.contains(&lower.as_str());
    let repeated = chars.all(|c| Some(c) == first);
    let personal = lower == email || (local.len() >= 4 && lower.contains(local));
    !(common || repeated || personal)
}

pub async fn hash(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || hash_blocking(&password).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// Verifies `password` against `hash`, or against a dummy hash when `hash` is `None`.
pub async fn verify(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || match hash {
        Some(h) => verify_blocking(&password, &h),
        None => {
            verify_blocking(&password, &DUMMY_HASH);
            false
        }
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::acceptable;

    #[test]
    fn password_rules() {
        assert!(acceptable("correct horse battery", "ada@example.com"));
        assert!(!acceptable("Password123", "ada@example.com"));
        assert!(!acceptable("aaaaaaaaaa", "ada@example.com"));
        assert!(!acceptable("lovelace2024", "lovelace@example.com"));
        assert!(!acceptable("ada@example.com", "ada@example.com"));
        assert!(
            acceptable("ada-is-great-2024", "ada@example.com"),
            "a short local part is fine"
        );
    }
}
