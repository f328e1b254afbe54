//! Mutual TLS between sidecars (rustls on ring, the gateway's provider): the inbound side
//! asks every client for a certificate chaining to the mesh CA (`WebPkiClientVerifier`);
//! the outbound side presents its own and accepts a server only if its certificate chains
//! to the mesh CA and names exactly the SPIFFE id of the service it meant to call.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::ca::{service_of_cert, spiffe_id};
use crate::config::MeshTls;
use crate::error::MeshError;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one generation of the sidecar's TLS is built from: read from the files at once.
pub struct Material {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The service the certificate names (must be the sidecar's own).
    pub service: String,
}

impl Material {
    pub fn load(cfg: &MeshTls, service: &str) -> Result<Self, MeshError> {
        let certs = |path: &str| -> Result<Vec<CertificateDer<'static>>, MeshError> {
            let v = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|error| MeshError::Pem {
                    path: path.to_owned(),
                    error,
                })?;
            if v.is_empty() {
                return Err(MeshError::NoCertificate(path.to_owned()));
            }
            Ok(v)
        };
        let mut roots = RootCertStore::empty();
        for c in certs(&cfg.ca_file)? {
            roots.add(c).map_err(|error| MeshError::CaFile {
                path: cfg.ca_file.clone(),
                error,
            })?;
        }
        let chain = certs(&cfg.cert_file)?;
        let key =
            PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|error| MeshError::KeyFile {
                path: cfg.key_file.clone(),
                error,
            })?;
        let named = service_of_cert(&chain[0])
            .ok_or_else(|| MeshError::NoIdentity(cfg.cert_file.clone()))?;
        if named != service {
            return Err(MeshError::WrongIdentity {
                path: cfg.cert_file.clone(),
                named,
                service: service.to_owned(),
            });
        }
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
            service: named,
        })
    }

    /// The inbound side: client certificates required, chained to the mesh CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, MeshError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(MeshError::Verifier)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(MeshError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(MeshError::KeyMismatch)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The outbound side towards `target`: presents this sidecar's certificate and accepts
    /// only `spiffe://shopmesh/service/<target>`.
    pub fn client_config(&self, target: &str) -> Result<Arc<rustls::ClientConfig>, MeshError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected: target.to_owned(),
            provider: provider(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(MeshError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(MeshError::KeyMismatch)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The chain is verified by rustls' own WebPKI path building (`verify_server_cert_signed_
/// by_trust_anchor`: signatures, validity, EKU serverAuth); the name checked is the
/// SPIFFE id, not the DNS name or address dialled.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match service_of_cert(end_entity) {
            Some(s) if s == self.expected => Ok(ServerCertVerified::assertion()),
            other => {
                tracing::warn!(expected = %spiffe_id(&self.expected), presented = ?other, "mesh peer is not the service dialled");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
