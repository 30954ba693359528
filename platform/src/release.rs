//! Release files as `bridgectl` reads them: a signed manifest (`bridgectl release sign`'s
//! output) and the agent binary it describes, each read with a size bound.
//!
//! Guarantees: a manifest file is read only up to [`MAX_MANIFEST_BYTES`] (plus one byte to see
//! that it is longer); a binary only up to the size its manifest names, which is at most
//! [`MAX_BINARY`] (the bound the downloads use too); [`read_binary`] returns the bytes only if
//! their size and SHA-256 are the manifest's.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use bridge_signing::release::{Manifest, SignedManifest, MAX_MANIFEST_BYTES};

/// The largest agent binary read (for a release, and served as a download).
pub const MAX_BINARY: u64 = 1 << 30;

/// The suffix `bridgectl release sign` adds to the binary's path by default.
pub const MANIFEST_SUFFIX: &str = ".manifest";

/// Reads and parses (format only, no signature check) the manifest file at `path`: `Err` when
/// it cannot be read, `Ok(Err(why))` when it is not a manifest.
pub fn try_read_manifest(path: &Path) -> Result<Result<SignedManifest, String>> {
    use std::io::Read as _;
    let max = MAX_MANIFEST_BYTES as u64;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        return Ok(Err(format!(
            "{} is larger than {max} bytes: not a release manifest",
            path.display()
        )));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Err(format!(
            "{} is not a release manifest (not text)",
            path.display()
        )));
    };
    Ok(SignedManifest::parse(&text).map_err(|e| format!("{}: {e}", path.display())))
}

/// Like [`try_read_manifest`], with either failure as the error.
pub fn read_manifest(path: &Path) -> Result<SignedManifest> {
    try_read_manifest(path)?.map_err(|why| anyhow!(why))
}

/// The binary a manifest file describes by default: its path without [`MANIFEST_SUFFIX`].
pub fn default_binary(manifest: &Path) -> Result<PathBuf> {
    match manifest
        .to_str()
        .and_then(|m| m.strip_suffix(MANIFEST_SUFFIX))
    {
        Some(binary) if !binary.is_empty() && !binary.ends_with('/') => Ok(PathBuf::from(binary)),
        _ => bail!(
            "give the binary with --binary: {} does not end in {MANIFEST_SUFFIX}",
            manifest.display()
        ),
    }
}

/// Reads the binary at `path` if it is the one `manifest` describes (size, then SHA-256),
/// reading no more than the manifest's size plus one byte: `Err` when it cannot be read,
/// `Ok(Err(why))` when it does not match.
pub fn try_read_binary(manifest: &Manifest, path: &Path) -> Result<Result<Vec<u8>, String>> {
    if manifest.size > MAX_BINARY {
        bail!(
            "the manifest describes a binary of {} bytes; the limit is {MAX_BINARY}",
            manifest.size
        );
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mismatch = |what: String| {
        Ok(Err(format!(
            "{} does not match the manifest: {what}",
            path.display()
        )))
    };
    if meta.len() != manifest.size {
        return mismatch(format!(
            "it is {} bytes, the manifest says {}",
            meta.len(),
            manifest.size
        ));
    }
    let bytes = crate::files::read_at_most(path, manifest.size.saturating_add(1))?;
    if !manifest.matches(&bytes) {
        return mismatch(format!(
            "its size or SHA-256 is not the manifest's ({} bytes, SHA-256 {})",
            manifest.size, manifest.sha256
        ));
    }
    Ok(Ok(bytes))
}

/// Like [`try_read_binary`], with either failure as the error.
pub fn read_binary(manifest: &Manifest, path: &Path) -> Result<Vec<u8>> {
    try_read_binary(manifest, path)?.map_err(|why| anyhow!(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_binary_is_the_manifest_path_without_its_suffix() {
        assert_eq!(
            default_binary(Path::new("dist/bridge-daemon.manifest")).unwrap(),
            PathBuf::from("dist/bridge-daemon")
        );
        for bad in ["dist/bridge-daemon", ".manifest", "dist/.manifest"] {
            assert!(default_binary(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_manifest_file_is_read_up_to_its_bound_and_a_binary_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.manifest");
        std::fs::write(&big, vec![b'a'; MAX_MANIFEST_BYTES + 1]).unwrap();
        let why = try_read_manifest(&big).unwrap().unwrap_err();
        assert!(why.contains("larger than 4096 bytes"), "{why}");
        let key = bridge_signing::KeyPair::from_seed(&[9; 32]);
        let text = bridge_signing::release::sign_manifest("1.0.0", "linux", "x86_64", b"bin", &key)
            .unwrap();
        let mut manifest = SignedManifest::parse(&text).unwrap().manifest().clone();
        manifest.size = MAX_BINARY + 1;
        let binary = dir.path().join("bin");
        std::fs::write(&binary, b"bin").unwrap();
        let err = try_read_binary(&manifest, &binary).unwrap_err().to_string();
        assert!(err.contains("the limit is 1073741824"), "{err}");
        // One byte more than the manifest says is a mismatch, read no further.
        manifest.size = 2;
        let why = try_read_binary(&manifest, &binary).unwrap().unwrap_err();
        assert!(why.contains("it is 3 bytes, the manifest says 2"), "{why}");
    }
}
