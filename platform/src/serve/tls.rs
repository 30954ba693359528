//! The server's TLS identity and how agents authenticate.
//!
//! Guarantees:
//!
//! * The server key (`server.key`, ECDSA P-256, PKCS#8 PEM, mode 0600) is created once in the
//!   state directory and reused on every start, so the **server pin** (the SHA-256 of its
//!   SubjectPublicKeyInfo, see [`bridge_protocol::identity`]) never changes for a state
//!   directory. The self-signed certificate `server.crt` is re-issued (same key, same pin) only
//!   when it is missing, does not match the key, or does not cover a requested host name.
//! * Every TLS connection is asked for a client certificate ([`AgentCertVerifier`]); one that
//!   presents it proves at the handshake that it holds the certificate's private key. The
//!   certificate is optional at the TLS layer so that installers (curl, wget) can fetch the
//!   downloads on the same port; a connection without one never reaches the agent WebSocket
//!   (see [`super::downloads`]). No chain or CA is checked: the **agent id** is the fingerprint of the certificate's public key
//!   ([`agent_id_of`]), and whether that id is allowed in is the registry's decision.
//! * Only the ring crypto provider is used; TLS 1.2 and 1.3.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bridge_protocol::identity::spki_fingerprint;
use rcgen::PublicKeyData as _;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::files::{write_atomic, write_key_file, PRIVATE_KEY_MODE};

/// File name of the server's private key in the state directory.
pub const KEY_FILE: &str = "server.key";
/// File name of the server's certificate in the state directory.
pub const CERT_FILE: &str = "server.crt";
/// Names every server certificate covers, before any `--hostname`.
pub const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];
/// How long a newly issued server certificate is valid.
pub const CERT_VALIDITY: Duration = Duration::from_secs(3653 * 86_400);

/// The server's key and certificate, loaded or created in the state directory.
#[derive(Debug)]
pub struct ServerIdentity {
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: PrivateKeyDer<'static>,
    /// The server pin: lowercase hex SHA-256 of the key's SubjectPublicKeyInfo.
    pub pin: String,
    /// Absolute path of `server.crt` (for clients that prefer a CA file to a pin).
    pub cert_path: PathBuf,
}

impl ServerIdentity {
    /// Loads the identity from `state_dir`, creating the key and/or certificate as needed (see
    /// the module documentation). `hostnames` are extra DNS names or IP addresses to cover.
    pub fn load_or_create(state_dir: &Path, hostnames: &[String]) -> Result<ServerIdentity> {
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|s| s.to_string()).collect();
        for h in hostnames {
            ServerName::try_from(h.as_str())
                .map_err(|_| anyhow!("--hostname {h:?} is not a DNS name or IP address"))?;
            if !names.contains(h) {
                names.push(h.clone());
            }
        }

        let key = if key_path.exists() {
            let pem = fs::read_to_string(&key_path)
                .with_context(|| format!("cannot read {}", key_path.display()))?;
            if let Some(w) = crate::files::loose_key_permissions(&key_path) {
                tracing::warn!("{w}");
            }
            rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a usable private key", key_path.display()))?
        } else {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("cannot generate the server key")?;
            write_key_file(
                &key_path,
                key.serialize_pem().as_bytes(),
                PRIVATE_KEY_MODE,
                false,
            )?;
            tracing::info!(path = %key_path.display(), "created the server key");
            key
        };
        let spki = key.subject_public_key_info();
        let pin = spki_fingerprint(&spki);

        let existing = match fs::read(&cert_path) {
            Ok(pem) => Some(
                CertificateDer::from_pem_slice(&pem)
                    .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", cert_path.display()))
            }
        };
        let reusable = existing.filter(|der| match cert_problem(der, &spki, &names) {
            None => true,
            Some(why) => {
                tracing::info!(path = %cert_path.display(), "re-issuing the server certificate: {why}");
                false
            }
        });
        let cert_der = match reusable {
            Some(der) => der,
            None => {
                let cert = issue_certificate(&key, &names)?;
                write_atomic(&cert_path, cert.pem().as_bytes(), Some(0o644))?;
                cert.der().clone()
            }
        };
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow!("cannot use the server key: {e}"))?;
        let cert_path = fs::canonicalize(&cert_path)
            .with_context(|| format!("cannot resolve {}", cert_path.display()))?;
        Ok(ServerIdentity {
            cert_der,
            key_der,
            pin,
            cert_path,
        })
    }

    /// A rustls server configuration presenting this identity and asking for agent certificates.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AgentCertVerifier::new(&provider));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("cannot configure TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert_der.clone()], self.key_der.clone_key())
            .context("cannot use the server certificate")?;
        Ok(config)
    }
}

/// Why an existing certificate cannot be reused, or `None` if it can.
fn cert_problem(der: &CertificateDer<'_>, spki: &[u8], names: &[String]) -> Option<String> {
    let cert = match webpki::EndEntityCert::try_from(der) {
        Ok(c) => c,
        Err(e) => return Some(format!("it does not parse ({e})")),
    };
    if cert.subject_public_key_info().as_ref() != spki {
        return Some("it is not for the server key".into());
    }
    for name in names {
        let Ok(server_name) = ServerName::try_from(name.as_str()) else {
            continue;
        };
        if cert.verify_is_valid_for_subject_name(&server_name).is_err() {
            return Some(format!("it does not cover {name}"));
        }
    }
    None
}

/// Issues a self-signed certificate for `key` covering `names`, valid from yesterday for
/// [`CERT_VALIDITY`].
fn issue_certificate(key: &rcgen::KeyPair, names: &[String]) -> Result<rcgen::Certificate> {
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).context("invalid certificate names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bridge development platform");
    let today = bridge_signing::timefmt::format_rfc3339(crate::timearg::now_unix());
    let ymd: Vec<&str> = today.get(..10).unwrap_or("").split('-').collect();
    let [y, m, d] = ymd.as_slice() else {
        bail!("cannot read today's date from {today:?}");
    };
    let (y, m, d) = (y.parse()?, m.parse()?, d.parse()?);
    params.not_before = rcgen::date_time_ymd(y, m, d) - Duration::from_secs(86_400);
    params.not_after = params.not_before + CERT_VALIDITY;
    params
        .self_signed(key)
        .context("cannot sign the server certificate")
}

/// The agent id of a client certificate: the fingerprint of its SubjectPublicKeyInfo.
pub fn agent_id_of(cert: &CertificateDer<'_>) -> Result<String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| anyhow!("the client certificate does not parse: {e}"))?;
    Ok(spki_fingerprint(parsed.subject_public_key_info().as_ref()))
}

/// Mode of the state directory.
pub const STATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` (mode 0700) if it does not exist; an existing one must be a directory (not a
/// symbolic link) owned by this process's effective user, and is tightened to mode 0700. The
/// state directory holds the server key and the control socket.
pub fn ensure_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(STATE_DIR_MODE))
                .with_context(|| format!("cannot set the permissions of {}", dir.display()))?;
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    };
    if meta.file_type().is_symlink() {
        bail!(
            "the state directory {} is a symbolic link: give the directory it points to",
            dir.display()
        );
    }
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let euid = super::control::effective_uid();
    if meta.uid() != euid {
        bail!(
            "the state directory {} belongs to uid {}, not to this user (uid {euid}): whoever owns it could read the server key and reach the control socket; use a directory of your own",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o7777 != STATE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(STATE_DIR_MODE))
            .with_context(|| format!("cannot set the permissions of {}", dir.display()))?;
        tracing::warn!(
            "the state directory {} had mode {:o}; set it to {STATE_DIR_MODE:o}",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Asks for a client certificate and accepts any that parses, without a chain.
///
/// rustls still checks the handshake signature (through [`Self::verify_tls12_signature`] /
/// [`Self::verify_tls13_signature`]), which proves the client holds the certificate's key;
/// that proof is what an agent id rests on.
#[derive(Debug)]
pub struct AgentCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AgentCertVerifier {
    /// A verifier using `provider`'s signature algorithms.
    pub fn new(provider: &CryptoProvider) -> AgentCertVerifier {
        AgentCertVerifier {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Optional here; the agent endpoint refuses connections without one (`serve::downloads`).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerIdentity::load_or_create(dir.path(), &[]).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(first.pin.len(), 64);
        assert_eq!(agent_id_of(&first.cert_der).unwrap(), first.pin);
        let again = ServerIdentity::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(again.pin, first.pin);
        assert_eq!(again.cert_der, first.cert_der);
        // A new host name re-issues the certificate, with the same key.
        let more =
            ServerIdentity::load_or_create(dir.path(), &["bridge.example".to_string()]).unwrap();
        assert_eq!(more.pin, first.pin);
        assert_ne!(more.cert_der, first.cert_der);
        assert!(ServerIdentity::load_or_create(dir.path(), &["not a name".to_string()]).is_err());
        more.server_config().unwrap();
    }
}
