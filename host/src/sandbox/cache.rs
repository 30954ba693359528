//! The on-disk cache of compiled modules.
//!
//! Compiling a module with Cranelift costs tens of milliseconds; loading a precompiled artifact
//! costs a fraction of one. Artifacts are stored under `<dir>/<engine fingerprint>/<sha256>.cwasm`,
//! keyed by the SHA-256 of the module bytes and by the engine's compatibility fingerprint (wasmtime
//! version and every setting that changes generated code), so an artifact from another build or
//! another configuration is never even looked at.
//!
//! [`wasmtime::Module::deserialize`] trusts its input: it maps the bytes as executable code. So
//! each file carries an HMAC-SHA256 tag (ring) under a random key private to this cache
//! (`<dir>/cache.key`, mode 0600), over the fingerprint, the module hash and the artifact. A file
//! that is truncated, flipped, stale, or copied from another agent fails the tag check and is
//! deleted and recompiled — never deserialized. Files are written atomically (temp file + rename)
//! with mode 0600 in a 0700 directory.
//!
//! What this does not protect against: someone who can read the key file (the agent's own user or
//! root) can forge entries; such a user can already replace the agent binary.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ring::hmac;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

const MAGIC: &[u8; 8] = b"BRCWASM1";
const TAG_LEN: usize = 32;

/// Why an artifact on disk was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discarded {
    /// Shorter than a header, or a header for another module or engine.
    Malformed,
    /// The HMAC tag does not match: corrupted, tampered with, or from another cache.
    BadTag,
    /// The tag matched but wasmtime refused the artifact.
    Incompatible(String),
}

/// What a cache lookup found.
pub enum Lookup {
    /// A verified artifact, deserialized.
    Hit(Module),
    /// Nothing stored for this hash.
    Miss,
    /// Something was stored but could not be trusted or used; it has been deleted.
    Discarded(Discarded),
}

/// A directory of precompiled artifacts for one engine configuration.
pub struct DiskCache {
    dir: PathBuf,
    fingerprint: [u8; 32],
    key: hmac::Key,
}

/// A stable SHA-256 of the engine's compatibility hash: feeds `Hash` output into SHA-256.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        unreachable!("only finalized through Sha256")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The engine's compatibility fingerprint: equal only for engines whose artifacts are
/// interchangeable.
pub fn engine_fingerprint(engine: &Engine) -> [u8; 32] {
    use std::hash::Hash;
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.0.finalize().into()
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `root` for `engine`.
    pub fn open(root: &Path, engine: &Engine) -> Result<DiskCache> {
        let fingerprint = engine_fingerprint(engine);
        let dir = root.join(hex::encode(&fingerprint[..8]));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating module cache directory {}", dir.display()))?;
        let key = load_or_create_key(&root.join("cache.key"))?;
        Ok(DiskCache {
            dir,
            fingerprint,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// The directory artifacts for this engine live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file an artifact for `sha256` is stored in.
    pub fn path_for(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.cwasm", hex::encode(sha256)))
    }

    /// The header that follows the tag: magic, engine fingerprint, module hash.
    fn header(&self, sha256: &[u8; 32]) -> Vec<u8> {
        [MAGIC.as_slice(), &self.fingerprint, sha256].concat()
    }

    /// Looks up the artifact for `sha256`. Anything that fails verification is deleted.
    pub fn load(&self, engine: &Engine, sha256: &[u8; 32]) -> Lookup {
        let path = self.path_for(sha256);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "module cache entry unreadable");
                return Lookup::Miss;
            }
        };
        let verdict = self.check(sha256, &bytes).and_then(|artifact| {
            // SAFETY: `artifact` was produced by `Module::serialize` for an engine with this
            // fingerprint and has not changed since: its HMAC tag, under a key only this cache
            // holds, matches. That is the precondition `deserialize` documents.
            unsafe { Module::deserialize(engine, artifact) }
                .map_err(|e| Discarded::Incompatible(format!("{e:#}")))
        });
        match verdict {
            Ok(module) => Lookup::Hit(module),
            Err(why) => {
                tracing::warn!(path = %path.display(), reason = ?why, "discarding module cache entry; it will be recompiled");
                let _ = fs::remove_file(&path);
                Lookup::Discarded(why)
            }
        }
    }

    /// File layout: `tag (32) | magic (8) | fingerprint (32) | module sha256 (32) | artifact`, where
    /// `tag = HMAC-SHA256(key, everything after the tag)`: one contiguous, keyed-checked message.
    fn check<'a>(&self, sha256: &[u8; 32], bytes: &'a [u8]) -> Result<&'a [u8], Discarded> {
        let header = self.header(sha256);
        if bytes.len() < TAG_LEN + header.len() {
            return Err(Discarded::Malformed);
        }
        let (tag, signed) = bytes.split_at(TAG_LEN);
        hmac::verify(&self.key, signed, tag).map_err(|_| Discarded::BadTag)?;
        // Authentic, but is it the entry we asked for (not another hash's file renamed)?
        if !signed.starts_with(&header) {
            return Err(Discarded::Malformed);
        }
        Ok(&signed[header.len()..])
    }

    /// Stores the artifact of `module` (compiled from bytes hashing to `sha256`), atomically.
    pub fn store(&self, sha256: &[u8; 32], module: &Module) -> Result<()> {
        let artifact = module
            .serialize()
            .map_err(anyhow::Error::from)
            .context("serializing compiled module")?;
        let mut signed = self.header(sha256);
        signed.extend_from_slice(&artifact);
        let tag = hmac::sign(&self.key, &signed);
        // NamedTempFile is created 0600 in the cache directory; rename makes it appear whole.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .context("creating module cache temp file")?;
        tmp.write_all(tag.as_ref())?;
        tmp.write_all(&signed)?;
        tmp.as_file().sync_all()?;
        let path = self.path_for(sha256);
        tmp.persist(&path)
            .with_context(|| format!("writing module cache entry {}", path.display()))?;
        Ok(())
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    match fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(_) => {
            // A damaged key only costs recompiles: every entry under it fails its tag check.
            tracing::warn!(path = %path.display(), "module cache key is damaged; replacing it (cached artifacts will be recompiled)");
            fs::remove_file(path)
                .with_context(|| format!("removing damaged cache key {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading module cache key {}", path.display()))
        }
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    // Write it whole under a temporary name, then link it into place without clobbering: a
    // concurrent agent that won the race has written its key, which we then read instead.
    let dir = path.parent().expect("the key lives in the cache directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating module cache key {}", path.display()))?;
    tmp.write_all(&key)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = fs::read(path)
                .with_context(|| format!("reading module cache key {}", path.display()))?;
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                anyhow::anyhow!(
                    "the module cache key {} has the wrong length",
                    path.display()
                )
            })
        }
        Err(e) => {
            Err(e.error).with_context(|| format!("creating module cache key {}", path.display()))
        }
    }
}
