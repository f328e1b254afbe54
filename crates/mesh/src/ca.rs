//! The mesh's certificate authority (rcgen, ECDSA P-256 on ring): a self-signed CA, and
//! short-lived leaf certificates whose only identity is the SPIFFE-style URI SAN
//! `spiffe://shopmesh/service/NAME`. Files in a directory: `ca.pem`, `ca-key.pem` (mode
//! 0600), and per service `NAME.pem` (the leaf then the CA), `NAME-key.pem` (0600).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::error::MeshError;

/// The trust domain of every mesh identity.
pub const TRUST_DOMAIN: &str = "shopmesh";

/// The SPIFFE id of a service.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/service/{service}")
}

/// The service named by a SPIFFE id of this trust domain.
pub fn service_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?
        .strip_prefix(TRUST_DOMAIN)?
        .strip_prefix("/service/")
        .filter(|s| valid_service_name(s))
}

/// Lower-case ASCII letters, digits and `-`, 1 to 63 characters, starting with a letter.
pub fn valid_service_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Paths of the CA's files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

/// Paths of a service's certificate chain and key in `dir`.
pub fn leaf_paths(dir: &Path, service: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{service}.pem")),
        dir.join(format!("{service}-key.pem")),
    )
}

/// A CA in memory: its certificate (PEM) and key (PEM).
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A newly issued leaf.
pub struct Leaf {
    /// The leaf certificate followed by the CA's.
    pub chain_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

impl Ca {
    /// A new CA valid for `days` days (from an hour ago, for clock skew).
    pub fn generate(days: u32) -> Result<Self, MeshError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "shopmesh");
        dn.push(DnType::CommonName, "shopmesh mesh CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, MeshError> {
        let (cert, key) = ca_paths(dir);
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|error| io(p, error));
        Ok(Self {
            cert_pem: read(&cert)?,
            key_pem: read(&key)?,
        })
    }

    /// Writes `ca.pem` and `ca-key.pem` into `dir` (created if missing); refuses to
    /// overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<(), MeshError> {
        std::fs::create_dir_all(dir).map_err(|error| io(dir, error))?;
        let (cert, key) = ca_paths(dir);
        if key.exists() {
            return Err(MeshError::CaExists(key));
        }
        write_secret(&key, &self.key_pem)?;
        std::fs::write(&cert, &self.cert_pem).map_err(|error| io(&cert, error))
    }

    /// Issues a leaf for `service`, valid from `not_before` for `ttl`: URI SAN
    /// `spiffe://shopmesh/service/NAME`, usable as TLS client and server.
    pub fn issue_at(
        &self,
        service: &str,
        not_before: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Leaf, MeshError> {
        if !valid_service_name(service) {
            return Err(MeshError::ServiceName(service.to_owned()));
        }
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|error| MeshError::CaMaterial {
            what: "CA key",
            error,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(|error| {
            MeshError::CaMaterial {
                what: "CA certificate",
                error,
            }
        })?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "shopmesh");
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(spiffe_id(service).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_before + ttl;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }

    /// Issues a leaf valid from five minutes ago (clock skew) for `ttl`.
    pub fn issue(&self, service: &str, ttl: Duration) -> Result<Leaf, MeshError> {
        let skew = Duration::from_secs(300);
        self.issue_at(service, OffsetDateTime::now_utc() - skew, ttl + skew)
    }
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME-key.pem` into `dir`, each by a rename so that a sidecar
    /// reloading meanwhile reads either the old file or the new one, never half of one.
    /// The key is renamed in first; a reload that sees a new key with the old certificate
    /// fails to build and keeps serving with what it had, and the next one succeeds.
    pub fn save(&self, dir: &Path, service: &str) -> Result<(PathBuf, PathBuf), MeshError> {
        let (cert, key) = leaf_paths(dir, service);
        write_secret(&key, &self.key_pem)?;
        write_atomic(&cert, self.chain_pem.as_bytes(), None)?;
        Ok((cert, key))
    }
}

fn io(path: &Path, error: std::io::Error) -> MeshError {
    MeshError::Io {
        path: path.to_owned(),
        error,
    }
}

fn write_secret(path: &Path, text: &str) -> Result<(), MeshError> {
    write_atomic(path, text.as_bytes(), Some(0o600))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), MeshError> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(mode.unwrap_or(0o644));
    let _ = mode;
    let ctx = |error| io(path, error);
    let mut f = opts.open(&tmp).map_err(ctx)?;
    f.write_all(bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)
}

/// The SPIFFE ids (URI SANs starting with `spiffe://`) of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                Some((*u).to_owned())
            }
            _ => None,
        })
        .collect()
}

/// The mesh service a certificate names: its one SPIFFE id of this trust domain (a
/// certificate with several is refused, as SPIFFE requires exactly one).
pub fn service_of_cert(der: &[u8]) -> Option<String> {
    let ids = uri_sans(der);
    match ids.as_slice() {
        [one] => service_of(one).map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn names_and_ids() {
        assert_eq!(spiffe_id("orders"), "spiffe://shopmesh/service/orders");
        assert_eq!(
            service_of("spiffe://shopmesh/service/orders"),
            Some("orders")
        );
        assert_eq!(service_of("spiffe://other/service/orders"), None);
        assert_eq!(service_of("spiffe://shopmesh/service/Orders"), None);
        assert_eq!(service_of("spiffe://shopmesh/service/a/b"), None);
        assert!(!valid_service_name(""));
        assert!(!valid_service_name("9lives"));
        assert!(valid_service_name("users-v2"));
    }

    #[test]
    fn a_leaf_carries_its_spiffe_id_and_chains_to_the_ca() {
        let ca = Ca::generate(365).unwrap();
        let leaf = ca.issue("orders", Duration::from_secs(3600)).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chain.len(), 2, "the leaf, then the CA");
        assert_eq!(
            uri_sans(&chain[0]),
            vec!["spiffe://shopmesh/service/orders"]
        );
        assert_eq!(service_of_cert(&chain[0]).as_deref(), Some("orders"));
        let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, ca_x) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
        assert_eq!(x.issuer(), ca_x.subject());
        assert!(ca_x.is_ca());
        assert!(!x.is_ca());
        x.verify_signature(Some(ca_x.public_key()))
            .expect("signed by the CA");
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life, 3600 + 300, "the TTL plus the skew allowance");
        assert!(ca.issue("Not A Name", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn files_round_trip_and_a_ca_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(1).unwrap();
        ca.save(dir.path()).unwrap();
        assert!(Ca::generate(1).unwrap().save(dir.path()).is_err());
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_pem, ca.cert_pem);
        let (cert, key) = loaded
            .issue("payments", Duration::from_secs(60))
            .unwrap()
            .save(dir.path(), "payments")
            .unwrap();
        assert!(cert.ends_with("payments.pem") && key.ends_with("payments-key.pem"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(ca_paths(dir.path()).1)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
