//! The agent's identity: its key pair and self-signed certificate, in the state directory.
//!
//! The **key** is the identity. It is created once (ECDSA P-256, by rcgen), stored as
//! `<state>/identity/agent.key` (PKCS#8 PEM, mode 0600, in a 0700 directory), and never replaced
//! by the agent: a damaged or unreadable key is an error that says so, because a new key would
//! be a new agent id and the platform would no longer recognise this host.
//!
//! The **agent id** is the SHA-256 of the key's SubjectPublicKeyInfo, in hex
//! ([`bridge_protocol::identity::spki_fingerprint`]): the same value the platform computes from
//! the TLS client certificate, stable across restarts, upgrades and reinstalls that keep the
//! state directory.
//!
//! The **certificate** is derived data: self-signed, valid for [`CERT_VALIDITY_DAYS`], stored as
//! `agent.crt` with its expiry (unix seconds) in `agent.crt.expiry`. It is re-issued with the
//! same key whenever it is missing, unreadable, or within [`RENEW_BEFORE_DAYS`] of expiry, so
//! renewal never changes the agent id.
//!
//! **Permissions are checked at every start**, as ssh does: the state directory and the identity
//! directory must be owned by the agent's user (the effective uid) and not writable by group or
//! others, and the key must be readable and writable by its owner only. Anything else refuses
//! to start with one line naming the file and the fix (`chmod 600 …`). Directories may be
//! readable by others: every file in them carries its own mode.
//!
//! The **compiled-module cache key** is derived from the agent key
//! ([`Identity::module_cache_key`]), so the daemon stores no cache key anywhere.
//!
//! **Enrollment** is recorded in `<state>/enrolled` (JSON: agent id, time, server; mode 0600) the
//! first time the platform welcomes a connection that presented the enrollment token. From then
//! on the agent neither reads nor sends the token ([`enrollment`], [`record_enrollment`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::owner::{self, Exposure};

/// How long a freshly issued agent certificate is valid.
pub const CERT_VALIDITY_DAYS: i64 = 365;
/// Re-issue the certificate when it expires within this many days.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// The agent's key, certificate and id.
pub struct Identity {
    /// hex SHA-256 of the public key (SubjectPublicKeyInfo DER).
    pub agent_id: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// When the certificate expires (unix seconds).
    pub cert_not_after: i64,
    key_pkcs8: Vec<u8>,
    /// Whether loading this identity created the key (first start).
    pub created: bool,
    /// Whether loading this identity re-issued the certificate.
    pub renewed: bool,
}

impl Identity {
    /// The private key, for the TLS client configuration.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The key of the compiled-module cache: HKDF-SHA256 of the agent key under a fixed label.
    /// Stable for this key, different for every agent, and never written anywhere.
    pub fn module_cache_key(&self) -> [u8; 32] {
        use ring::hkdf;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"bridge-daemon").extract(&self.key_pkcs8);
        let okm = prk
            .expand(&[b"compiled-module cache key v1"], hkdf::HKDF_SHA256)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut key = [0u8; 32];
        okm.fill(&mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }

    /// Whether the certificate should be re-issued now.
    pub fn needs_renewal(&self) -> bool {
        OffsetDateTime::now_utc().unix_timestamp() + RENEW_BEFORE_DAYS * 86_400
            >= self.cert_not_after
    }
}

/// Where the identity files live under a state directory.
pub fn identity_dir(state: &Path) -> PathBuf {
    state.join("identity")
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("identity files live in a directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Refuses `path` unless it is owned by the effective uid and, beyond `allowed`, has no
/// permission bit for group or others. The error is one line: the file, what is wrong, the fix.
fn check_owner_and_mode(path: &Path, what: &str, allowed: u32, fix: &str) -> Result<()> {
    let meta =
        fs::metadata(path).with_context(|| format!("examining {what} {}", path.display()))?;
    match owner::exposure(&meta, allowed) {
        Some(Exposure::Owner(uid)) => {
            let me = owner::euid();
            bail!(
                "{what} {} is owned by uid {uid}, but the agent runs as uid {me}; run the agent as its owner, or fix: chown {me} {}",
                path.display(),
                path.display()
            )
        }
        Some(Exposure::Mode(mode)) => bail!(
            "{what} {} is accessible to group or others (mode {mode:04o}); fix: {fix} {}",
            path.display(),
            path.display()
        ),
        None => Ok(()),
    }
}

/// Checks that nobody but the agent's user can change the state or read the agent key: the
/// state and identity directories owned by the effective uid and not writable by group or
/// others, the key (when it exists) owned by it with mode 0600 or stricter.
pub fn check_permissions(state: &Path) -> Result<()> {
    // Directories may be listed by others (each file has its own mode), never changed.
    let listable = 0o055;
    check_owner_and_mode(state, "the state directory", listable, "chmod 700")?;
    let dir = identity_dir(state);
    if dir.exists() {
        check_owner_and_mode(&dir, "the identity directory", listable, "chmod 700")?;
    }
    let key = dir.join("agent.key");
    if key.exists() {
        check_owner_and_mode(&key, "the agent key", 0, "chmod 600")?;
    }
    Ok(())
}

/// Loads the identity in `state`, creating the key on first start and (re-)issuing the
/// certificate when needed. Refuses state that others could read or change
/// ([`check_permissions`]).
pub fn load_or_create(state: &Path) -> Result<Identity> {
    check_permissions(state)?;
    let dir = identity_dir(state);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the identity directory {}", dir.display()))?;
    let key_path = dir.join("agent.key");
    let (key, created) = match fs::read_to_string(&key_path) {
        Ok(pem) => {
            let key = KeyPair::from_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "the agent key {} is damaged ({e}); refusing to replace it, because a new key is a new \
                     agent id. Restore the file from a backup, or delete the state directory to enroll as a new agent",
                    key_path.display()
                )
            })?;
            (key, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("generating the agent key")?;
            // create_new: never overwrite a key another process just wrote.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .with_context(|| format!("creating the agent key {}", key_path.display()))?;
            f.write_all(key.serialize_pem().as_bytes())?;
            f.sync_all()?;
            (key, true)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "reading the agent key {} (is the state directory readable?)",
                    key_path.display()
                )
            })
        }
    };
    let agent_id = bridge_protocol::identity::spki_fingerprint(&key.subject_public_key_info());

    let cert_path = dir.join("agent.crt");
    let expiry_path = dir.join("agent.crt.expiry");
    let existing = read_cert(&cert_path, &expiry_path, &agent_id);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (cert_der, not_after, renewed) = match existing {
        Some((der, not_after)) if now + RENEW_BEFORE_DAYS * 86_400 < not_after => {
            (der, not_after, false)
        }
        _ => {
            let (der, pem, not_after) = issue_cert(&key, &agent_id)?;
            write_private(&cert_path, pem.as_bytes())?;
            write_private(&expiry_path, format!("{not_after}\n").as_bytes())?;
            if !created {
                tracing::info!(agent_id = %agent_id, "re-issued the agent certificate (same key, same agent id)");
            }
            (der, not_after, !created)
        }
    };
    Ok(Identity {
        agent_id,
        cert_der,
        cert_not_after: not_after,
        key_pkcs8: key.serialize_der(),
        created,
        renewed,
    })
}

/// Reads the certificate and its recorded expiry; `None` if either is missing or unreadable.
/// Reads the certificate and its recorded expiry; `None` if either is missing or unreadable, or
/// if the certificate is not for this key (a key restored from a backup, or replaced): such a
/// certificate would make every TLS handshake fail, so it is re-issued instead.
fn read_cert(
    cert_path: &Path,
    expiry_path: &Path,
    agent_id: &str,
) -> Option<(CertificateDer<'static>, i64)> {
    use rustls::pki_types::pem::PemObject;
    let pem = fs::read(cert_path).ok()?;
    let der = CertificateDer::from_pem_slice(&pem).ok()?;
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    let cert_id =
        bridge_protocol::identity::spki_fingerprint(cert.subject_public_key_info().as_ref());
    if cert_id != agent_id {
        tracing::warn!(agent_id = %agent_id, "the agent certificate is for another key; re-issuing it");
        return None;
    }
    let not_after = fs::read_to_string(expiry_path).ok()?.trim().parse().ok()?;
    Some((der, not_after))
}

fn issue_cert(key: &KeyPair, agent_id: &str) -> Result<(CertificateDer<'static>, String, i64)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("bridge-agent {}", &agent_id[..16]),
    );
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CERT_VALIDITY_DAYS);
    let cert = params
        .self_signed(key)
        .context("issuing the agent certificate")?;
    let not_after = params.not_after.unix_timestamp();
    Ok((cert.der().clone(), cert.pem(), not_after))
}

/// Reads the agent id of an existing identity without creating or re-issuing anything: only
/// the key is read.
pub fn agent_id(state: &Path) -> Result<String> {
    let key_path = identity_dir(state).join("agent.key");
    let pem = match fs::read_to_string(&key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no agent identity in {} yet (it is created on first `bridge-daemon run`)",
            state.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the agent key {}", key_path.display()))
        }
    };
    let key = KeyPair::from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("the agent key {} is damaged ({e})", key_path.display()))?;
    Ok(bridge_protocol::identity::spki_fingerprint(
        &key.subject_public_key_info(),
    ))
}

/// The record that this agent is enrolled with its platform: `<state>/enrolled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The agent id the platform welcomed.
    pub agent_id: String,
    /// When (RFC 3339, UTC).
    pub enrolled_at: String,
    /// The platform's address at the time.
    pub server: String,
}

/// Where enrollment is recorded.
pub fn enrollment_file(state: &Path) -> PathBuf {
    state.join("enrolled")
}

/// The largest enrollment record read; a bigger file is not one.
const MAX_ENROLLMENT_BYTES: u64 = 4096;

/// This agent's enrollment record, if it has one. A record that is damaged or names another
/// agent id (a key restored from elsewhere) is ignored with a warning: the token is then used
/// again and the record rewritten at the next welcome.
pub fn enrollment(state: &Path, agent_id: &str) -> Option<Enrollment> {
    use std::io::Read;
    let path = enrollment_file(state);
    let mut text = String::new();
    let read =
        fs::File::open(&path).and_then(|f| f.take(MAX_ENROLLMENT_BYTES).read_to_string(&mut text));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the enrollment record: {e}");
            return None;
        }
    }
    match serde_json::from_str::<Enrollment>(&text) {
        Ok(e) if e.agent_id == agent_id => Some(e),
        Ok(e) => {
            tracing::warn!(path = %path.display(), recorded = %e.agent_id, agent_id, "the enrollment record is for another agent key; ignoring it");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "the enrollment record is damaged ({e}); ignoring it");
            None
        }
    }
}

/// Records that the platform at `server` welcomed `agent_id` (atomically, mode 0600).
pub fn record_enrollment(state: &Path, agent_id: &str, server: &str) -> Result<Enrollment> {
    let record = Enrollment {
        agent_id: agent_id.to_string(),
        enrolled_at: OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .context("formatting the enrollment time")?,
        server: server.to_string(),
    };
    let mut json = serde_json::to_vec_pretty(&record).context("encoding the enrollment record")?;
    json.push(b'\n');
    write_private(&enrollment_file(state), &json)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_is_stable_per_agent_and_differs_between_agents() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = load_or_create(a.path()).unwrap();
        let again = load_or_create(a.path()).unwrap();
        let other = load_or_create(b.path()).unwrap();
        assert_eq!(first.module_cache_key(), again.module_cache_key());
        assert_ne!(first.module_cache_key(), other.module_cache_key());
    }

    #[test]
    fn loose_permissions_refuse_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        load_or_create(tmp.path()).unwrap();
        let key = identity_dir(tmp.path()).join("agent.key");
        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_or_create(tmp.path()).err().unwrap().to_string();
            assert!(
                err.contains(&format!("chmod 600 {}", key.display())),
                "{err}"
            );
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        load_or_create(tmp.path()).unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o775)).unwrap();
        let err = load_or_create(tmp.path()).err().unwrap().to_string();
        assert!(
            err.contains(&format!("chmod 700 {}", tmp.path().display())),
            "{err}"
        );
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create(tmp.path()).unwrap();
    }

    #[test]
    fn enrollment_is_recorded_for_this_key_only() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(enrollment(tmp.path(), "a"), None);
        let rec = record_enrollment(tmp.path(), "a", "wss://p/agent").unwrap();
        assert_eq!(enrollment(tmp.path(), "a"), Some(rec));
        assert_eq!(enrollment(tmp.path(), "b"), None);
        let mode = fs::metadata(enrollment_file(tmp.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(enrollment_file(tmp.path()), "{").unwrap();
        assert_eq!(enrollment(tmp.path(), "a"), None);
    }

    #[test]
    fn the_id_is_stable_and_renewal_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let first = load_or_create(tmp.path()).unwrap();
        assert!(first.created && !first.renewed);
        assert_eq!(first.agent_id.len(), 64);
        let mode = fs::metadata(identity_dir(tmp.path()).join("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = load_or_create(tmp.path()).unwrap();
        assert_eq!(again.agent_id, first.agent_id);
        assert_eq!(agent_id(tmp.path()).unwrap(), first.agent_id);
        assert!(!again.created && !again.renewed);
        assert_eq!(again.cert_der, first.cert_der);

        // A certificate close to expiry is re-issued with the same key.
        let soon = OffsetDateTime::now_utc().unix_timestamp() + 86_400;
        fs::write(
            identity_dir(tmp.path()).join("agent.crt.expiry"),
            soon.to_string(),
        )
        .unwrap();
        let renewed = load_or_create(tmp.path()).unwrap();
        assert!(renewed.renewed);
        assert_eq!(renewed.agent_id, first.agent_id);
        assert_ne!(renewed.cert_der, first.cert_der);
        assert!(!renewed.needs_renewal());
    }

    #[test]
    fn a_certificate_for_another_key_is_reissued() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = load_or_create(a.path()).unwrap();
        load_or_create(b.path()).unwrap();
        // b's key with a's (still valid) certificate, as after restoring a key from a backup.
        for f in ["agent.crt", "agent.crt.expiry"] {
            fs::copy(
                identity_dir(a.path()).join(f),
                identity_dir(b.path()).join(f),
            )
            .unwrap();
        }
        let b_again = load_or_create(b.path()).unwrap();
        assert!(
            b_again.renewed,
            "the mismatched certificate must be re-issued"
        );
        assert_ne!(b_again.cert_der, first.cert_der);
        let cert = webpki::EndEntityCert::try_from(&b_again.cert_der).unwrap();
        let id =
            bridge_protocol::identity::spki_fingerprint(cert.subject_public_key_info().as_ref());
        assert_eq!(id, b_again.agent_id);
    }

    #[test]
    fn a_damaged_key_is_an_error_not_a_new_identity() {
        let tmp = tempfile::tempdir().unwrap();
        load_or_create(tmp.path()).unwrap();
        let key_path = identity_dir(tmp.path()).join("agent.key");
        fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_or_create(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("damaged"), "{err}");
        assert!(
            fs::read_to_string(&key_path).unwrap().contains("garbage"),
            "the damaged key was replaced"
        );
    }
}
