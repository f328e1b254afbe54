//! The mesh crate's one error type: each variant names the file, setting, target or
//! address it concerns. The underlying error is kept in the variant and written into the
//! message (one line, as the sidecar logs it), not chained again as its `source`.

use std::path::PathBuf;

use rustls::pki_types::pem;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `Ca::save` where a CA already is: it is never overwritten.
    #[error("{} exists: a CA is already there (remove it to start over)", .0.display())]
    CaExists(PathBuf),
    #[error("`{0}` is not a service name (lower-case letters, digits, `-`)")]
    ServiceName(String),
    /// The CA's own key or certificate cannot be used (`what`: `CA key`, `CA certificate`).
    #[error("{what}: {error}")]
    CaMaterial {
        what: &'static str,
        error: rcgen::Error,
    },
    /// Generating a key or a certificate.
    #[error(transparent)]
    Certificate(#[from] rcgen::Error),
    /// The sidecar's configuration: syntax or shape (the message has the line and column).
    #[error("{0}")]
    Parse(String),
    /// The sidecar's configuration: a value refused.
    #[error("{0}")]
    Invalid(String),
    /// An error in the configuration file `path`.
    #[error("{path}: {error}")]
    InFile { path: String, error: Box<MeshError> },
    /// A PEM file that cannot be read or parsed.
    #[error("`{path}`: {error}")]
    Pem { path: String, error: pem::Error },
    #[error("`{0}`: no certificate in it")]
    NoCertificate(String),
    #[error("tls.ca_file `{path}`: {error}")]
    CaFile { path: String, error: rustls::Error },
    #[error("tls.key_file `{path}`: {error}")]
    KeyFile { path: String, error: pem::Error },
    #[error("tls.cert_file `{0}`: no single spiffe://shopmesh/service/NAME SAN")]
    NoIdentity(String),
    /// The certificate names another service than the sidecar's.
    #[error("tls.cert_file `{path}` is {named}'s certificate, not {service}'s")]
    WrongIdentity {
        path: String,
        named: String,
        service: String,
    },
    #[error("tls: the key does not fit the certificate: {0}")]
    KeyMismatch(rustls::Error),
    #[error("tls: {0}")]
    Tls(rustls::Error),
    #[error("tls: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// A target's cluster (its endpoints, breaker and retry settings) cannot be built.
    #[error("target `{target}`: {reason}")]
    Target { target: String, reason: String },
    #[error("bind {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("a reload cannot change the service ({from} to {to})")]
    ServiceChanged { from: String, to: String },
}
