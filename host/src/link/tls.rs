//! TLS for the platform link: how the agent verifies the platform, and presents itself.
//!
//! The platform is verified in one of these ways (the config decides):
//! - **pins**: a set of SHA-256 fingerprints of the server's public key (MeshCentral's ServerID
//!   idea, but a set, so the platform can rotate keys). The server's key must match one of them;
//!   names and dates are not consulted, as with SSH host keys. A mismatch is refused and logged
//!   with the expected and the presented fingerprints.
//! - **a CA file**: the server's chain must validate to one of the PEM certificates in it, for the
//!   host name in the URL (standard WebPKI checks). Combined with pins, both must pass.
//! - otherwise **the system's trust store** (rustls-native-certs), with WebPKI checks.
//!
//! Handshake signatures are always verified (ring), whatever the mode: a pin proves nothing
//! unless the server also proves it holds the pinned key.
//!
//! The agent authenticates itself with its self-signed client certificate ([`crate::identity`]);
//! the TLS handshake proves it holds the key, and the platform derives the agent id from it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
};

use crate::identity::Identity;

/// How the agent decides it is talking to its platform.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTrust {
    /// Accepted server key fingerprints (canonical lowercase hex); empty: no pinning.
    pub pins: Vec<String>,
    /// A PEM file of CA certificates to validate the server's chain against.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The ring crypto provider: the project's one crypto backend.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a server was refused by pin; kept typed so the link can log both fingerprints.
#[derive(Debug, thiserror::Error)]
#[error("the server's key {presented} matches none of the pinned fingerprints {expected:?}")]
pub struct PinMismatch {
    /// The fingerprint of the key the server presented.
    pub presented: String,
    /// The pins the agent accepts.
    pub expected: Vec<String>,
}

#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<String>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| TlsError::General(format!("cannot parse the server certificate: {e}")))?;
        let presented =
            bridge_protocol::identity::spki_fingerprint(cert.subject_public_key_info().as_ref());
        if !self.pins.contains(&presented) {
            let mismatch = PinMismatch {
                presented,
                expected: self.pins.clone(),
            };
            tracing::warn!(presented = %mismatch.presented, expected = ?mismatch.expected, "server pin mismatch: refusing the platform");
            return Err(TlsError::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch))),
            ));
        }
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
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

fn roots_from_file(path: &std::path::Path) -> Result<RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the CA file {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the CA file {}", path.display()))?;
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {} is not a usable CA", path.display()))?;
    }
    if roots.is_empty() {
        bail!("the CA file {} holds no certificates", path.display());
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore> {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::debug!(error = %e, "while loading the system trust store");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        bail!("the system trust store has no certificates; give the platform's --server-pin or --ca-file");
    }
    Ok(roots)
}

/// Builds the TLS client configuration: server verification per `trust`, client cert `identity`.
pub fn client_config(trust: &ServerTrust, identity: &Identity) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let webpki = |roots: RootCertStore| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("building the certificate verifier")
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (&trust.pins[..], &trust.ca_file) {
        ([], None) => webpki(system_roots()?)?,
        ([], Some(ca)) => webpki(roots_from_file(ca)?)?,
        (pins, ca) => Arc::new(PinnedVerifier {
            pins: pins.to_vec(),
            chain: ca
                .as_ref()
                .map(|ca| roots_from_file(ca).and_then(webpki))
                .transpose()?,
            provider: provider.clone(),
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert_der.clone()], identity.private_key())
        .context("using the agent certificate for TLS")?;
    Ok(Arc::new(config))
}

/// Finds a [`PinMismatch`] inside a connection error, if that is what refused the server.
pub fn pin_mismatch<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(m) = e.downcast_ref::<PinMismatch>() {
            return Some(m);
        }
        if let Some(TlsError::InvalidCertificate(rustls::CertificateError::Other(other))) =
            e.downcast_ref::<TlsError>()
        {
            if let Some(m) = other.0.downcast_ref::<PinMismatch>() {
                return Some(m);
            }
        }
        // tokio-rustls reports TLS errors as io::Error, whose `source()` skips the wrapped error.
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}
