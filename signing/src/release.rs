//! Release manifests: what an agent binary is (version, OS, architecture, size, SHA-256),
//! signed by a release key, so that version and architecture are authenticated along with the
//! bytes. The agent checks one before it updates itself, the launcher's root step again before
//! it installs the binary, and `install.sh` (with OpenSSL) before it installs anything.
//!
//! The format (`docs/updates.md`): ASCII text, `\n` line ends, at most [`MAX_MANIFEST_BYTES`],
//! the fields of its format in this order and no others. Format 1 describes the binary:
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
//! Format 2 describes the binary and the gzip archive it is served as:
//!
//! ```text
//! bridge-release 2
//! version 0.2.0
//! os linux
//! arch x86_64
//! size 60000000
//! sha256 <the binary's SHA-256>
//! archive gzip
//! archive_size 21000000
//! archive_sha256 <the archive's SHA-256>
//! key <the id of the signing key>
//! binary_signature <the signature of the format-1 manifest of the same binary>
//! signature <the signature of this manifest>
//! ```
//!
//! A signature covers [`RELEASE_SIGNED_PREFIX`] followed by every byte before the
//! `signature ` line. The prefix differs from a handler signature's, so neither can be
//! passed off as the other; the first line differs between the formats, so neither format's
//! signature passes as the other's. `binary_signature` lets whoever unpacked the archive hand
//! a format-1 manifest of the binary ([`SignedManifest::format1_text`]) to code that reads
//! only format 1 (an older launcher).
//!
//! An archive is bounded by its binary: `archive_size` is at most [`max_archive_size`] of
//! `size`, so a download is never larger than the binary it unpacks to, plus gzip's overhead.

use std::cmp::Ordering;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::keys::{KeyId, KeyPair, PublicKey};

/// What a release signature covers, before the manifest's signed lines.
pub const RELEASE_SIGNED_PREFIX: &[u8] = b"bridge.release.v1\0";
/// The first line of a format-1 manifest (the binary only).
pub const MANIFEST_HEADER: &str = "bridge-release 1";
/// The first line of a format-2 manifest (the binary and its gzip archive).
pub const MANIFEST_HEADER_V2: &str = "bridge-release 2";
/// The archive formats a format-2 manifest may name.
pub const ARCHIVE_GZIP: &str = "gzip";
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
    /// The gzip archive the binary is served as (format 2), or `None` (format 1: the binary
    /// itself is served).
    pub archive: Option<Archive>,
}

/// The gzip archive of a release binary, as a format-2 manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// The archive's size in bytes (at most [`max_archive_size`] of the binary's).
    pub size: u64,
    /// The archive's SHA-256, lowercase hex.
    pub sha256: String,
}

/// The largest gzip archive accepted for a binary of `size` bytes: the binary stored without
/// compression (5 bytes per 64 KiB block) plus the gzip header and trailer fits well within it.
pub fn max_archive_size(size: u64) -> u64 {
    size.saturating_add(size / 256).saturating_add(1024)
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
    /// Format 2: the signature of the format-1 manifest of the same binary.
    binary_signature: Option<[u8; 64]>,
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

/// The signed lines of the format-1 manifest of `m`'s binary (everything before
/// `signature `).
fn signed_lines(m: &Manifest) -> String {
    format!(
        "{MANIFEST_HEADER}\nversion {}\nos {}\narch {}\nsize {}\nsha256 {}\nkey {}\n",
        m.version, m.os, m.arch, m.size, m.sha256, m.key
    )
}

/// The signed lines of a format-2 manifest (everything before `signature `).
fn signed_lines_v2(m: &Manifest, archive: &Archive, binary_signature: &[u8; 64]) -> String {
    format!(
        "{MANIFEST_HEADER_V2}\nversion {}\nos {}\narch {}\nsize {}\nsha256 {}\narchive {ARCHIVE_GZIP}\narchive_size {}\narchive_sha256 {}\nkey {}\nbinary_signature {}\n",
        m.version,
        m.os,
        m.arch,
        m.size,
        m.sha256,
        archive.size,
        archive.sha256,
        m.key,
        STANDARD.encode(binary_signature)
    )
}

/// The bytes a release signature covers.
fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(RELEASE_SIGNED_PREFIX.len() + signed.len());
    message.extend_from_slice(RELEASE_SIGNED_PREFIX);
    message.extend_from_slice(signed);
    message
}

/// The fields of a manifest for `binary`, checked.
fn describe(
    version: &str,
    os: &str,
    arch: &str,
    binary: &[u8],
    key: &KeyPair,
) -> Result<Manifest, ReleaseError> {
    parse_version(version)?;
    check_word("os", os, 32)?;
    check_word("arch", arch, 32)?;
    Ok(Manifest {
        version: version.to_string(),
        os: os.to_string(),
        arch: arch.to_string(),
        size: binary.len() as u64,
        sha256: sha256_hex(binary),
        key: key.key_id(),
        archive: None,
    })
}

/// Signs a format-1 manifest for `binary`: the text of the manifest file.
pub fn sign_manifest(
    version: &str,
    os: &str,
    arch: &str,
    binary: &[u8],
    key: &KeyPair,
) -> Result<String, ReleaseError> {
    let manifest = describe(version, os, arch, binary, key)?;
    let signed = signed_lines(&manifest);
    let signature = key.sign(&signed_message(signed.as_bytes()));
    Ok(format!(
        "{signed}signature {}\n",
        STANDARD.encode(signature)
    ))
}

/// Signs a format-2 manifest for `binary` served as the gzip `archive`: the text of the
/// manifest file. That `archive` unpacks to `binary` is the caller's to know (the signer made
/// it); every reader checks it again as it unpacks.
pub fn sign_manifest_gzip(
    version: &str,
    os: &str,
    arch: &str,
    binary: &[u8],
    archive: &[u8],
    key: &KeyPair,
) -> Result<String, ReleaseError> {
    let manifest = describe(version, os, arch, binary, key)?;
    let archive = Archive {
        size: archive.len() as u64,
        sha256: sha256_hex(archive),
    };
    if archive.size > max_archive_size(manifest.size) {
        return Err(ReleaseError::Malformed(format!(
            "an archive of {} bytes for a binary of {}: the limit is {}",
            archive.size,
            manifest.size,
            max_archive_size(manifest.size)
        )));
    }
    let binary_signature: [u8; 64] = key.sign(&signed_message(signed_lines(&manifest).as_bytes()));
    let signed = signed_lines_v2(&manifest, &archive, &binary_signature);
    let signature = key.sign(&signed_message(signed.as_bytes()));
    Ok(format!(
        "{signed}signature {}\n",
        STANDARD.encode(signature)
    ))
}

/// A decimal number of bytes, as `size` and `archive_size` are written.
fn parse_size(field: &str, value: &str) -> Result<u64, ReleaseError> {
    let ok = !value.is_empty()
        && value.len() <= 20
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'));
    value.parse().ok().filter(|_| ok).ok_or_else(|| {
        ReleaseError::Malformed(format!("`{field}` must be a decimal number of bytes"))
    })
}

/// A SHA-256 as 64 lowercase hex characters.
fn check_sha256(field: &str, value: &str) -> Result<(), ReleaseError> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ReleaseError::Malformed(format!(
            "`{field}` must be 64 lowercase hex characters"
        )))
    }
}

/// A 64-byte Ed25519 signature in canonical standard base64.
fn parse_signature(field: &str, value: &str) -> Result<[u8; 64], ReleaseError> {
    let malformed = |why: &str| ReleaseError::Malformed(format!("`{field}` {why}"));
    let raw = STANDARD
        .decode(value)
        .map_err(|_| malformed("is not base64"))?;
    let signature: [u8; 64] = raw.try_into().map_err(|_| malformed("is not 64 bytes"))?;
    if STANDARD.encode(signature) != value {
        return Err(malformed("is not in canonical base64"));
    }
    Ok(signature)
}

/// The fields of a format-1 manifest, in order, after its first line.
const FIELDS_V1: &[&str] = &[
    "version",
    "os",
    "arch",
    "size",
    "sha256",
    "key",
    "signature",
];
/// The fields of a format-2 manifest, in order, after its first line.
const FIELDS_V2: &[&str] = &[
    "version",
    "os",
    "arch",
    "size",
    "sha256",
    "archive",
    "archive_size",
    "archive_sha256",
    "key",
    "binary_signature",
    "signature",
];

impl SignedManifest {
    /// Reads a manifest's text (format 1 or 2); checks its format only (see
    /// [`SignedManifest::verify`]).
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
        let fields = match lines[0] {
            MANIFEST_HEADER => FIELDS_V1,
            MANIFEST_HEADER_V2 => FIELDS_V2,
            other if other.starts_with("bridge-release ") => {
                return Err(ReleaseError::Malformed(format!(
                    "the first line names an unknown manifest format ({other:?}); this reader knows {MANIFEST_HEADER:?} and {MANIFEST_HEADER_V2:?}"
                )))
            }
            _ => {
                return Err(ReleaseError::Malformed(format!(
                    "the first line must be {MANIFEST_HEADER:?} or {MANIFEST_HEADER_V2:?}"
                )))
            }
        };
        let mut values = Vec::with_capacity(fields.len());
        for (i, field) in fields.iter().enumerate() {
            let Some(line) = lines.get(i + 1) else {
                return Err(ReleaseError::Malformed(format!(
                    "{} lines; a manifest of this format has {} (`{field}` is missing)",
                    lines.len(),
                    1 + fields.len()
                )));
            };
            let value = line
                .strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(' '));
            match value {
                Some(value) => values.push(value),
                None => {
                    let name = line.split(' ').next().unwrap_or_default();
                    let why = if fields.contains(&name) {
                        format!("line {} must be `{field} …`, not `{name} …`", i + 2)
                    } else {
                        format!(
                            "line {} must be `{field} …`; `{name}` is not a field of this format",
                            i + 2
                        )
                    };
                    return Err(ReleaseError::Malformed(why));
                }
            }
        }
        if lines.len() != 1 + fields.len() {
            return Err(ReleaseError::Malformed(format!(
                "{} lines; a manifest of this format has {}",
                lines.len(),
                1 + fields.len()
            )));
        }
        let field = |name: &str| values[fields.iter().position(|f| *f == name).unwrap()];
        let (version, os, arch) = (field("version"), field("os"), field("arch"));
        parse_version(version)?;
        check_word("os", os, 32)?;
        check_word("arch", arch, 32)?;
        let size = parse_size("size", field("size"))?;
        let sha256 = field("sha256");
        check_sha256("sha256", sha256)?;
        let key = field("key");
        let key_ok = key.len() == 32
            && key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let key: KeyId = key
            .parse()
            .ok()
            .filter(|_| key_ok)
            .ok_or_else(|| malformed("`key` must be a key id: 32 lowercase hex characters"))?;
        let signature = parse_signature("signature", field("signature"))?;
        let (archive, binary_signature) = if fields == FIELDS_V2 {
            if field("archive") != ARCHIVE_GZIP {
                return Err(ReleaseError::Malformed(format!(
                    "`archive` must be {ARCHIVE_GZIP:?}, the one archive format"
                )));
            }
            let archive_size = parse_size("archive_size", field("archive_size"))?;
            if archive_size > max_archive_size(size) {
                return Err(ReleaseError::Malformed(format!(
                    "`archive_size` {archive_size} is larger than any gzip archive of {size} bytes needs ({})",
                    max_archive_size(size)
                )));
            }
            let archive_sha256 = field("archive_sha256");
            check_sha256("archive_sha256", archive_sha256)?;
            let binary_signature = parse_signature("binary_signature", field("binary_signature"))?;
            (
                Some(Archive {
                    size: archive_size,
                    sha256: archive_sha256.to_string(),
                }),
                Some(binary_signature),
            )
        } else {
            (None, None)
        };
        let manifest = Manifest {
            version: version.to_string(),
            os: os.to_string(),
            arch: arch.to_string(),
            size,
            sha256: sha256.to_string(),
            key,
            archive,
        };
        let signed_len = text.len() - lines[fields.len()].len() - 1;
        Ok(SignedManifest {
            manifest,
            text: text.to_string(),
            signed_len,
            signature,
            binary_signature,
        })
    }

    /// The manifest's format: 1 (the binary) or 2 (the binary and its gzip archive).
    pub fn format(&self) -> u8 {
        if self.binary_signature.is_some() {
            2
        } else {
            1
        }
    }

    /// The format-1 manifest of the same binary: the text itself for format 1; for format 2,
    /// the version, OS, architecture, size, SHA-256 and key with `binary_signature` as its
    /// signature. It verifies when this manifest does ([`SignedManifest::verify`] checks both
    /// signatures), for code that reads only format 1.
    pub fn format1_text(&self) -> String {
        match &self.binary_signature {
            None => self.text.clone(),
            Some(sig) => format!(
                "{}signature {}\n",
                signed_lines(&self.manifest),
                STANDARD.encode(sig)
            ),
        }
    }

    /// What the manifest says (not yet verified: see [`SignedManifest::verify`]).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's text, as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Checks the signature under the one of `keys` the manifest names (format 2: both the
    /// manifest's and the binary's).
    pub fn verify(&self, keys: &[PublicKey]) -> Result<&Manifest, ReleaseError> {
        let key = keys
            .iter()
            .find(|k| k.key_id() == self.manifest.key)
            .ok_or_else(|| ReleaseError::UnknownKey(self.manifest.key.to_string()))?;
        let message = signed_message(&self.text.as_bytes()[..self.signed_len]);
        if !key.verify(&message, &self.signature) {
            return Err(ReleaseError::BadSignature);
        }
        if let Some(binary_signature) = &self.binary_signature {
            let format1 = signed_message(signed_lines(&self.manifest).as_bytes());
            if !key.verify(&format1, binary_signature) {
                return Err(ReleaseError::BadSignature);
            }
        }
        Ok(&self.manifest)
    }
}

impl Manifest {
    /// Whether `binary` is the release this manifest describes (size and SHA-256).
    pub fn matches(&self, binary: &[u8]) -> bool {
        binary.len() as u64 == self.size && sha256_hex(binary) == self.sha256
    }

    /// Whether `archive` is the gzip archive this manifest names (size and SHA-256); `false`
    /// for a format-1 manifest, which names none.
    pub fn archive_matches(&self, archive: &[u8]) -> bool {
        self.archive
            .as_ref()
            .is_some_and(|a| archive.len() as u64 == a.size && sha256_hex(archive) == a.sha256)
    }
}

#[cfg(test)]
mod tests;
