//! The on-disk cache of compiled modules.
//!
//! Compiling a module with Cranelift costs tens of milliseconds; loading a precompiled artifact
//! costs a fraction of one. Artifacts are stored under `<dir>/<engine fingerprint>/<sha256>.cwasm`,
//! keyed by the SHA-256 of the module bytes and by the engine's compatibility fingerprint (wasmtime
//! version and every setting that changes generated code), so an artifact from another build or
//! another configuration is never even looked at.
//!
//! [`wasmtime::Module::deserialize`] trusts its input: it maps the bytes as executable code. So
//! each file carries an HMAC-SHA256 tag (ring) over the fingerprint, the module hash and the
//! artifact, under a key that is **never in the cache directory**: the daemon derives it from its
//! identity key ([`CacheDir::with_key`]); `bridge-daemon call`, which has no identity, keeps a
//! random key in a file beside the cache directory, `<dir>.key` ([`CacheDir::with_key_file`]). A
//! file that is truncated, flipped, stale, planted, or copied from another agent fails the tag
//! check and is deleted and recompiled — never deserialized.
//!
//! The cache is used only if nobody else can write it: the cache directory, the fingerprint
//! directory and the key file must be owned by the agent's user (the effective uid), must not be
//! symbolic links, and the directories must not be writable by group or others; the key file must
//! be readable and writable by its owner only. Anything else disables the disk cache with a
//! warning naming the path and the reason (modules are then compiled in memory; nothing else
//! changes). Directories the agent creates are 0700, an existing directory it owns is tightened to
//! 0700, and files are written atomically (temp file + rename) with mode 0600.
//!
//! What this does not protect against: the agent's own user or root, who can read the key (or
//! the identity key it is derived from) and forge entries; such a user can already replace the
//! agent binary.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ring::hmac;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use crate::owner::{self, Exposure};

const MAGIC: &[u8; 8] = b"BRCWASM1";
const TAG_LEN: usize = 32;
const KEY_LEN: usize = 32;

/// Where a disk cache lives and where its HMAC key comes from.
#[derive(Clone)]
pub struct CacheDir {
    root: PathBuf,
    key: KeySource,
}

#[derive(Clone)]
enum KeySource {
    /// A random key kept in `<root>.key`, beside the cache directory.
    FileBeside,
    /// A key the caller derived from a secret it holds (the daemon: its identity key).
    Given([u8; KEY_LEN]),
}

impl CacheDir {
    /// The cache in `root`, keyed by a random key in the file `<root>.key` next to it (created on
    /// first use). For `bridge-daemon call`, which has no identity to derive a key from.
    pub fn with_key_file(root: impl Into<PathBuf>) -> CacheDir {
        CacheDir {
            root: root.into(),
            key: KeySource::FileBeside,
        }
    }

    /// The cache in `root`, keyed by `key` (no key file at all).
    pub fn with_key(root: impl Into<PathBuf>, key: [u8; KEY_LEN]) -> CacheDir {
        CacheDir {
            root: root.into(),
            key: KeySource::Given(key),
        }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The key file, for a cache keyed by one: `<root>.key`.
    pub fn key_file(&self) -> Result<Option<PathBuf>> {
        match self.key {
            KeySource::Given(_) => Ok(None),
            KeySource::FileBeside => key_file_beside(&self.root).map(Some),
        }
    }
}

impl std::fmt::Debug for CacheDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            KeySource::FileBeside => "<root>.key",
            KeySource::Given(_) => "derived",
        };
        f.debug_struct("CacheDir")
            .field("root", &self.root)
            .field("key", &key)
            .finish()
    }
}

/// `<root>.key`: the key file beside the cache directory `root`.
fn key_file_beside(root: &Path) -> Result<PathBuf> {
    let name = root.file_name().with_context(|| {
        format!(
            "the module cache directory {} has no name to put its key file beside",
            root.display()
        )
    })?;
    let mut file = name.to_os_string();
    file.push(".key");
    Ok(root.with_file_name(file))
}

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

/// Opens `path` without following a final symbolic link.
fn open_nofollow(path: &Path, directory: bool) -> std::io::Result<File> {
    let mut flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
}

/// Whether `path` is a symbolic link (what an `O_NOFOLLOW` open refused: `ELOOP`, or
/// `ENOTDIR` with `O_DIRECTORY`).
fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Creates `dir` with mode 0700 if it is missing (its parents with the usual mode).
fn create_private_dir(dir: &Path, parents: bool) -> Result<()> {
    if parents {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// Checks a directory the cache trusts: a directory (not a symbolic link), owned by the
/// effective uid, not writable by group or others. One readable or searchable by them is
/// tightened to 0700. Checked and changed through one descriptor, so nothing can be swapped in
/// between.
fn check_private_dir(dir: &Path, what: &str) -> Result<()> {
    let file = open_nofollow(dir, true).map_err(|e| {
        if is_symlink(dir) {
            anyhow::anyhow!("{what} {} is a symbolic link", dir.display())
        } else {
            anyhow::anyhow!("cannot open {what} {}: {e}", dir.display())
        }
    })?;
    let meta = file
        .metadata()
        .with_context(|| format!("examining {what} {}", dir.display()))?;
    match owner::exposure(&meta, 0o055) {
        Some(Exposure::Owner(uid)) => bail!(
            "{what} {} is owned by uid {uid}, not by the agent's user (uid {})",
            dir.display(),
            owner::euid()
        ),
        Some(Exposure::Mode(mode)) => bail!(
            "{what} {} is writable by group or others (mode {mode:04o})",
            dir.display()
        ),
        None => {}
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {what} {} to mode 0700", dir.display()))?;
        tracing::info!(path = %dir.display(), was = %format!("{mode:04o}"), "restricted the module cache directory to mode 0700");
    }
    Ok(())
}

/// Why a key file cannot be trusted, if it cannot: it must be a regular file owned by the
/// effective uid that nobody else can read or write.
fn check_key_file(path: &Path, meta: &fs::Metadata) -> Result<()> {
    if !meta.is_file() {
        bail!(
            "the module cache key {} is not a regular file",
            path.display()
        );
    }
    match owner::exposure(meta, 0) {
        Some(Exposure::Owner(uid)) => bail!(
            "the module cache key {} is owned by uid {uid}, not by the agent's user (uid {})",
            path.display(),
            owner::euid()
        ),
        Some(Exposure::Mode(mode)) => bail!(
            "the module cache key {} is accessible to group or others (mode {mode:04o})",
            path.display()
        ),
        None => Ok(()),
    }
}

impl DiskCache {
    /// Opens the cache `location` for `engine`, or says why it must not be used. Creates the
    /// directories (0700) and the key file (0600) when missing.
    pub fn open(location: &CacheDir, engine: &Engine) -> Result<DiskCache> {
        let root = location.root();
        create_private_dir(root, true)
            .with_context(|| format!("creating the module cache directory {}", root.display()))?;
        check_private_dir(root, "the module cache directory")?;
        let fingerprint = engine_fingerprint(engine);
        let dir = root.join(hex::encode(&fingerprint[..8]));
        create_private_dir(&dir, false)?;
        check_private_dir(&dir, "the module cache directory")?;
        let key = match &location.key {
            KeySource::Given(key) => *key,
            KeySource::FileBeside => load_or_create_key(&key_file_beside(root)?)?,
        };
        Ok(DiskCache {
            dir,
            fingerprint,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// [`DiskCache::open`], with a cache that must not be used logged as a warning (naming the
    /// path and why) and left out: modules are then compiled in memory.
    pub fn open_or_warn(location: &CacheDir, engine: &Engine) -> Option<DiskCache> {
        match DiskCache::open(location, engine) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(
                    "module disk cache disabled: {e:#}; modules are compiled in memory (fix the ownership or mode, or choose another directory)"
                );
                None
            }
        }
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
        let read = open_nofollow(&path, false).and_then(|mut f| {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map(|_| bytes)
        });
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "module cache entry unreadable; discarding it");
                let _ = fs::remove_file(&path);
                return Lookup::Discarded(Discarded::Malformed);
            }
        };
        let verdict = self.check(sha256, &bytes).and_then(|artifact| {
            // SAFETY: `artifact` was produced by `Module::serialize` for an engine with this
            // fingerprint and has not changed since: its HMAC tag, under a key that only this
            // agent holds and that is never stored in the cache, matches. That is the
            // precondition `deserialize` documents.
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

/// Reads the key file at `path` if it exists and can be trusted: `Ok(None)` when it is missing
/// or damaged (wrong length; removed then), an error when it belongs to someone else, is
/// accessible to others, or is a symbolic link.
fn read_key(path: &Path) -> Result<Option<[u8; KEY_LEN]>> {
    let mut file = match open_nofollow(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) if is_symlink(path) => {
            bail!("the module cache key {} is a symbolic link", path.display())
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading module cache key {}", path.display()))
        }
    };
    let meta = file
        .metadata()
        .with_context(|| format!("examining module cache key {}", path.display()))?;
    check_key_file(path, &meta)?;
    let mut bytes = Vec::with_capacity(KEY_LEN);
    (&mut file)
        .take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading module cache key {}", path.display()))?;
    match <[u8; KEY_LEN]>::try_from(bytes.as_slice()) {
        Ok(key) => Ok(Some(key)),
        Err(_) => {
            // A damaged key only costs recompiles: every entry under it fails its tag check.
            tracing::warn!(path = %path.display(), "module cache key is damaged; replacing it (cached artifacts will be recompiled)");
            fs::remove_file(path)
                .with_context(|| format!("removing damaged cache key {}", path.display()))?;
            Ok(None)
        }
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; KEY_LEN]> {
    if let Some(key) = read_key(path)? {
        return Ok(key);
    }
    let mut key = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    // Write it whole under a temporary name (0600), then link it into place without clobbering:
    // a concurrent process that won the race has written its key, which we then read instead.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating module cache key {}", path.display()))?;
    tmp.write_all(&key)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => read_key(path)?
            .with_context(|| {
                format!(
                    "the module cache key {} has the wrong length",
                    path.display()
                )
            }),
        Err(e) => {
            Err(e.error).with_context(|| format!("creating module cache key {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    #[test]
    fn the_key_file_lives_beside_the_cache() {
        assert_eq!(
            key_file_beside(Path::new("/var/cache/bridge")).unwrap(),
            Path::new("/var/cache/bridge.key")
        );
        assert_eq!(
            key_file_beside(Path::new("cache/")).unwrap(),
            Path::new("cache.key")
        );
        assert!(key_file_beside(Path::new("/")).is_err());

        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("c");
        DiskCache::open(&CacheDir::with_key_file(&root), &engine()).unwrap();
        let key = tmp.path().join("c.key");
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::read_dir(&root).unwrap().count(),
            1,
            "only the fingerprint directory"
        );
    }

    #[test]
    fn a_given_key_writes_no_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("c");
        DiskCache::open(&CacheDir::with_key(&root, [7; 32]), &engine()).unwrap();
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c"]);
        let debug = format!("{:?}", CacheDir::with_key(&root, [7; 32]));
        assert!(!debug.contains("7,"), "the key leaks into Debug: {debug}");
    }

    #[test]
    fn loose_or_linked_locations_are_refused_and_owned_ones_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("c");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        DiskCache::open(&CacheDir::with_key_file(&root), &engine()).unwrap();
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);

        for mode in [0o770, 0o707, 0o777] {
            fs::set_permissions(&root, fs::Permissions::from_mode(mode)).unwrap();
            let err = DiskCache::open(&CacheDir::with_key_file(&root), &engine())
                .err()
                .unwrap();
            assert!(
                format!("{err:#}").contains("writable by group or others"),
                "{err:#}"
            );
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();

        let fp = fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        fs::set_permissions(&fp, fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&CacheDir::with_key_file(&root), &engine())
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains(&fp.display().to_string()),
            "{err:#}"
        );
        fs::set_permissions(&fp, fs::Permissions::from_mode(0o700)).unwrap();

        let key = tmp.path().join("c.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = DiskCache::open(&CacheDir::with_key_file(&root), &engine())
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("accessible to group or others"),
            "{err:#}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let err = DiskCache::open(&CacheDir::with_key(&link, [1; 32]), &engine())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");

        fs::rename(&key, tmp.path().join("real.key")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real.key"), &key).unwrap();
        let err = DiskCache::open(&CacheDir::with_key_file(&root), &engine())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
    }
}
