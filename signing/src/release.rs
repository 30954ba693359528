//! Release manifests: what an agent binary is (version, OS, architecture, size, SHA-256),
//! signed by a release key, so that version and architecture are authenticated along with the
//! bytes. The agent checks one before it updates itself, the launcher's root step again before
//! it installs the binary, and `install.sh` (with OpenSSL) before it installs anything.
//!
//! The format (`docs/updates.md`): ASCII text, `\n` line ends, at most [`MAX_MANIFEST_BYTES`],
//! these fields in this order and no others:
//!
//! ```text
//! bridge-release 1
//! version 0.2.0
//! os linux
//! arch x86_64
//! size 60000000
//! sha256 <64 lowercase hex: the binary's SHA-256>
//! key <32 lowercase hex: the id of the signing key>
//! signature <standard base64 of the 64-byte Ed25519 signature>
//! ```
//!
//! The signature covers [`RELEASE_SIGNED_PREFIX`] followed by every byte before the
//! `signature ` line. The prefix differs from a handler signature's, so neither can be
//! passed off as the other.

use std::cmp::Ordering;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::keys::{KeyId, KeyPair, PublicKey};

/// What a release signature covers, before the manifest's signed lines.
pub const RELEASE_SIGNED_PREFIX: &[u8] = b"bridge.release.v1\0";
/// The first line of a manifest.
pub const MANIFEST_HEADER: &str = "bridge-release 1";
/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4096;
/// The longest version accepted, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;

/// What a manifest says about a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The release's version (semantic versioning).
    pub version: String,
    /// The OS it is for (`linux`).
    pub os: String,
    /// The architecture it is for, as `uname -m` prints it (`x86_64`, `aarch64`…).
    pub arch: String,
    /// The binary's size in bytes.
    pub size: u64,
    /// The binary's SHA-256, lowercase hex.
    pub sha256: String,
    /// The id of the key that signed it.
    pub key: KeyId,
}

/// Why a manifest was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The text is not a manifest of this format.
    #[error("malformed release manifest: {0}")]
    Malformed(String),
    /// No release key has the id the manifest names.
    #[error("the release manifest is signed by key {0}, which is not a trusted release key")]
    UnknownKey(String),
    /// The signature does not verify under the key the manifest names.
    #[error("the release manifest's signature does not verify")]
    BadSignature,
}

/// A manifest as read: its fields, its signed bytes and its signature.
#[derive(Clone)]
pub struct SignedManifest {
    manifest: Manifest,
    text: String,
    signed_len: usize,
    signature: [u8; 64],
}

impl fmt::Debug for SignedManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedManifest")
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of `bytes`, lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(crate::envelope::sha256(bytes))
}

fn check_word(field: &str, value: &str, max: usize) -> Result<(), ReleaseError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(ReleaseError::Malformed(format!(
            "`{field}` must be 1 to {max} letters, digits or . _ - +"
        )))
    }
}

fn parse_version(version: &str) -> Result<semver::Version, ReleaseError> {
    check_word("version", version, MAX_VERSION_BYTES)?;
    semver::Version::parse(version).map_err(|e| {
        ReleaseError::Malformed(format!(
            "version {version:?} is not a semantic version: {e}"
        ))
    })
}

/// Orders two versions by semantic-versioning precedence.
pub fn compare_versions(a: &str, b: &str) -> Result<Ordering, ReleaseError> {
    Ok(parse_version(a)?.cmp_precedence(&parse_version(b)?))
}

/// The signed lines of a manifest (everything before `signature `).
fn signed_lines(m: &Manifest) -> String {
    format!(
        "{MANIFEST_HEADER}\nversion {}\nos {}\narch {}\nsize {}\nsha256 {}\nkey {}\n",
        m.version, m.os, m.arch, m.size, m.sha256, m.key
    )
}

/// The bytes a release signature covers.
fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(RELEASE_SIGNED_PREFIX.len() + signed.len());
    message.extend_from_slice(RELEASE_SIGNED_PREFIX);
    message.extend_from_slice(signed);
    message
}

/// Signs a manifest for `binary`: the text of the manifest file.
pub fn sign_manifest(
    version: &str,
    os: &str,
    arch: &str,
    binary: &[u8],
    key: &KeyPair,
) -> Result<String, ReleaseError> {
    parse_version(version)?;
    check_word("os", os, 32)?;
    check_word("arch", arch, 32)?;
    let manifest = Manifest {
        version: version.to_string(),
        os: os.to_string(),
        arch: arch.to_string(),
        size: binary.len() as u64,
        sha256: sha256_hex(binary),
        key: key.key_id(),
    };
    let signed = signed_lines(&manifest);
    let signature = key.sign(&signed_message(signed.as_bytes()));
    Ok(format!(
        "{signed}signature {}\n",
        STANDARD.encode(signature)
    ))
}

impl SignedManifest {
    /// Reads a manifest's text; checks its format only (see [`SignedManifest::verify`]).
    pub fn parse(text: &str) -> Result<SignedManifest, ReleaseError> {
        let malformed = |m: &str| ReleaseError::Malformed(m.to_string());
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::Malformed(format!(
                "{} bytes; the limit is {MAX_MANIFEST_BYTES}",
                text.len()
            )));
        }
        if !text.is_ascii() {
            return Err(malformed("not ASCII"));
        }
        if !text.ends_with('\n') {
            return Err(malformed("the last line does not end with a newline"));
        }
        let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
        const FIELDS: [&str; 7] = [
            "version",
            "os",
            "arch",
            "size",
            "sha256",
            "key",
            "signature",
        ];
        if lines.len() != 1 + FIELDS.len() {
            return Err(ReleaseError::Malformed(format!(
                "{} lines; a manifest has {}",
                lines.len(),
                1 + FIELDS.len()
            )));
        }
        if lines[0] != MANIFEST_HEADER {
            return Err(ReleaseError::Malformed(format!(
                "the first line must be {MANIFEST_HEADER:?}"
            )));
        }
        let mut values = [""; 7];
        for (i, field) in FIELDS.iter().enumerate() {
            let line = lines[i + 1];
            values[i] = line
                .strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(' '))
                .ok_or_else(|| {
                    ReleaseError::Malformed(format!("line {} must be `{field} …`", i + 2))
                })?;
        }
        let [version, os, arch, size, sha256, key, signature] = values;
        parse_version(version)?;
        check_word("os", os, 32)?;
        check_word("arch", arch, 32)?;
        let size_ok = !size.is_empty()
            && size.len() <= 20
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        let size: u64 = size
            .parse()
            .ok()
            .filter(|_| size_ok)
            .ok_or_else(|| malformed("`size` must be a decimal number of bytes"))?;
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(malformed("`sha256` must be 64 lowercase hex characters"));
        }
        let key_ok = key.len() == 32
            && key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let key: KeyId = key
            .parse()
            .ok()
            .filter(|_| key_ok)
            .ok_or_else(|| malformed("`key` must be a key id: 32 lowercase hex characters"))?;
        let raw = STANDARD
            .decode(signature)
            .map_err(|_| malformed("`signature` is not base64"))?;
        let signature: [u8; 64] = raw
            .try_into()
            .map_err(|_| malformed("`signature` is not 64 bytes"))?;
        let manifest = Manifest {
            version: version.to_string(),
            os: os.to_string(),
            arch: arch.to_string(),
            size,
            sha256: sha256.to_string(),
            key,
        };
        let signed_len = text.len() - lines[FIELDS.len()].len() - 1;
        if STANDARD.encode(signature) != *lines[FIELDS.len()].trim_start_matches("signature ") {
            return Err(malformed("`signature` is not in canonical base64"));
        }
        Ok(SignedManifest {
            manifest,
            text: text.to_string(),
            signed_len,
            signature,
        })
    }

    /// What the manifest says (not yet verified: see [`SignedManifest::verify`]).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's text, as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Checks the signature under the one of `keys` the manifest names.
    pub fn verify(&self, keys: &[PublicKey]) -> Result<&Manifest, ReleaseError> {
        let key = keys
            .iter()
            .find(|k| k.key_id() == self.manifest.key)
            .ok_or_else(|| ReleaseError::UnknownKey(self.manifest.key.to_string()))?;
        let message = signed_message(&self.text.as_bytes()[..self.signed_len]);
        if key.verify(&message, &self.signature) {
            Ok(&self.manifest)
        } else {
            Err(ReleaseError::BadSignature)
        }
    }
}

impl Manifest {
    /// Whether `binary` is the release this manifest describes (size and SHA-256).
    pub fn matches(&self, binary: &[u8]) -> bool {
        binary.len() as u64 == self.size && sha256_hex(binary) == self.sha256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyPair {
        KeyPair::from_seed(&[n; 32])
    }

    #[test]
    fn a_signed_manifest_verifies_under_its_key_and_describes_the_binary() {
        let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8);
        assert_eq!(lines[0], "bridge-release 1");
        assert_eq!(lines[4], "size 6");
        let parsed = SignedManifest::parse(&text).unwrap();
        let m = parsed
            .verify(&[key(2).public_key(), key(1).public_key()])
            .unwrap();
        assert_eq!(m.version, "1.2.3");
        assert_eq!((m.os.as_str(), m.arch.as_str()), ("linux", "x86_64"));
        assert!(m.matches(b"binary"));
        assert!(!m.matches(b"binarz"));
        assert!(!m.matches(b"binar"));
        assert_eq!(parsed.text(), text);
    }

    #[test]
    fn the_signature_covers_the_prefix_and_every_signed_line() {
        let k = key(1);
        let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &k).unwrap();
        let (signed, sig_line) = text.split_at(text.find("signature ").unwrap());
        let sig = STANDARD
            .decode(sig_line.trim_end().trim_start_matches("signature "))
            .unwrap();
        let sig: [u8; 64] = sig.try_into().unwrap();
        let mut message = b"bridge.release.v1\0".to_vec();
        message.extend_from_slice(signed.as_bytes());
        assert!(k.public_key().verify(&message, &sig));
        // A handler signature's prefix over the same lines is a different message.
        assert!(!k.public_key().verify(signed.as_bytes(), &sig));
    }

    #[test]
    fn an_unknown_key_and_a_changed_field_are_told_apart() {
        let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
        let parsed = SignedManifest::parse(&text).unwrap();
        assert!(matches!(
            parsed.verify(&[key(2).public_key()]),
            Err(ReleaseError::UnknownKey(_))
        ));
        for (from, to) in [
            ("version 1.2.3", "version 9.2.3"),
            ("arch x86_64", "arch aarch64"),
            ("size 6", "size 7"),
        ] {
            let tampered = text.replace(from, to);
            let parsed = SignedManifest::parse(&tampered).unwrap();
            assert_eq!(
                parsed.verify(&[key(1).public_key()]),
                Err(ReleaseError::BadSignature),
                "{to}"
            );
        }
    }

    #[test]
    fn malformed_manifests_are_refused_with_the_reason() {
        let good = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (
                good.replace("bridge-release 1", "bridge-release 2"),
                "first line",
            ),
            (good.trim_end().to_string(), "newline"),
            (good.replace("os linux\n", ""), "lines"),
            (
                good.replace("os linux\narch x86_64", "arch x86_64\nos linux"),
                "line 3",
            ),
            (good.replace("size 6", "size 06"), "size"),
            (good.replace("size 6", "size -6"), "size"),
            (good.replace("version 1.2.3", "version 1.2"), "semantic"),
            (good.replace("version 1.2.3", "version 1.2.3 "), "version"),
            (good.replace("sha256 ", "sha256 A"), "sha256"),
            (good.replace("\nkey ", "\nkey x"), "key"),
            (good.replace("signature ", "signature !"), "base64"),
            (format!("{good}extra 1\n"), "lines"),
            (good.replace("linux", "l\u{e9}nux"), "ASCII"),
            ("x".repeat(5000), "limit"),
        ];
        for (text, why) in cases {
            match SignedManifest::parse(&text) {
                Err(ReleaseError::Malformed(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn versions_compare_by_semver_precedence() {
        assert_eq!(compare_versions("0.2.0", "0.10.0").unwrap(), Ordering::Less);
        assert_eq!(
            compare_versions("1.0.0", "1.0.0-rc.1").unwrap(),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions("1.0.0+b1", "1.0.0+b2").unwrap(),
            Ordering::Equal
        );
        assert!(compare_versions("1", "1.0.0").is_err());
    }
}
