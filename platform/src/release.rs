//! Release files as `bridgectl` reads them: a signed manifest (`bridgectl release sign`'s
//! output), the agent binary it describes and, for a format-2 manifest, the binary's gzip
//! archive (`BINARY.gz`), each read with a size bound.
//!
//! Guarantees: a manifest file is read only up to [`MAX_MANIFEST_BYTES`] (plus one byte to see
//! that it is longer); a binary only up to the size its manifest names, which is at most
//! [`MAX_BINARY`] (the bound the downloads use too), an archive only up to the size its
//! manifest names; [`read_binary`] and [`read_archive`] return the bytes only if their size and
//! SHA-256 are the manifest's, and [`gunzip_matches`] unpacks an archive no further than one
//! byte past the binary's size.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use bridge_signing::release::{Manifest, SignedManifest, MAX_MANIFEST_BYTES};

/// The largest agent binary read (for a release, and served as a download).
pub const MAX_BINARY: u64 = 1 << 30;

/// The suffix `bridgectl release sign` adds to the binary's path by default.
pub const MANIFEST_SUFFIX: &str = ".manifest";
/// The suffix of the binary's gzip archive, beside it (format 2).
pub const ARCHIVE_SUFFIX: &str = ".gz";

/// The gzip archive of `binary`, as `bridgectl release sign` writes it: `BINARY.gz`.
pub fn archive_path(binary: &Path) -> PathBuf {
    let mut s = binary.as_os_str().to_os_string();
    s.push(ARCHIVE_SUFFIX);
    PathBuf::from(s)
}

/// `binary` gzip-compressed at the best compression (what a format-2 release serves).
pub fn gzip(binary: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(binary.len() / 2),
        flate2::Compression::best(),
    );
    e.write_all(binary).expect("writing to memory");
    e.finish().expect("writing to memory")
}

/// Whether the gzip `archive` unpacks to the binary `manifest` describes (size and SHA-256),
/// decompressing at most one byte more than its size.
pub fn gunzip_matches(manifest: &Manifest, archive: &[u8]) -> bool {
    use std::io::Read as _;
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(archive).take(manifest.size.saturating_add(1));
    decoder.read_to_end(&mut out).is_ok() && manifest.matches(&out)
}

/// Reads the gzip archive at `path` if it is the one `manifest` names (size, then SHA-256),
/// reading no more than its size plus one byte: `Err` when it cannot be read or the manifest
/// names no archive (format 1), `Ok(Err(why))` when it does not match.
pub fn try_read_archive(manifest: &Manifest, path: &Path) -> Result<Result<Vec<u8>, String>> {
    let Some(archive) = &manifest.archive else {
        bail!("the manifest is of format 1: it names no archive");
    };
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() != archive.size {
        return Ok(Err(format!(
            "{} does not match the manifest: it is {} bytes, the manifest's archive_size is {}",
            path.display(),
            meta.len(),
            archive.size
        )));
    }
    let bytes = crate::files::read_at_most(path, archive.size.saturating_add(1))?;
    if !manifest.archive_matches(&bytes) {
        return Ok(Err(format!(
            "{} does not match the manifest: its size or SHA-256 is not the manifest's archive ({} bytes, SHA-256 {})",
            path.display(),
            archive.size,
            archive.sha256
        )));
    }
    Ok(Ok(bytes))
}

/// Like [`try_read_archive`], with either failure as the error.
pub fn read_archive(manifest: &Manifest, path: &Path) -> Result<Vec<u8>> {
    try_read_archive(manifest, path)?.map_err(|why| anyhow!(why))
}

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
    fn an_archive_is_read_when_it_is_the_manifests_and_unpacks_to_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let key = bridge_signing::KeyPair::from_seed(&[9; 32]);
        let binary = b"the agent binary, the agent binary, the agent binary".to_vec();
        let archive = gzip(&binary);
        let text = bridge_signing::release::sign_manifest_gzip(
            "1.0.0", "linux", "x86_64", &binary, &archive, &key,
        )
        .unwrap();
        let manifest = SignedManifest::parse(&text).unwrap().manifest().clone();
        let bin_path = dir.path().join("bridge-daemon");
        let gz = archive_path(&bin_path);
        assert_eq!(gz, dir.path().join("bridge-daemon.gz"));
        std::fs::write(&gz, &archive).unwrap();
        assert_eq!(read_archive(&manifest, &gz).unwrap(), archive);
        assert!(gunzip_matches(&manifest, &archive));
        // One byte changed, one byte more: refused with the reason.
        let mut flipped = archive.clone();
        flipped[12] ^= 1;
        std::fs::write(&gz, &flipped).unwrap();
        let why = try_read_archive(&manifest, &gz).unwrap().unwrap_err();
        assert!(
            why.contains("SHA-256 is not the manifest's archive"),
            "{why}"
        );
        std::fs::write(&gz, [&archive[..], b"x"].concat()).unwrap();
        let why = try_read_archive(&manifest, &gz).unwrap().unwrap_err();
        assert!(why.contains("archive_size is"), "{why}");
        // An archive of more than the binary, of another binary, or not gzip.
        let mut longer = binary.clone();
        longer.push(b'!');
        assert!(!gunzip_matches(&manifest, &gzip(&longer)));
        assert!(!gunzip_matches(&manifest, &gzip(b"another binary")));
        assert!(!gunzip_matches(&manifest, &archive[..archive.len() - 3]));
        // A format-1 manifest names no archive.
        let v1 = bridge_signing::release::sign_manifest("1.0.0", "linux", "x86_64", &binary, &key)
            .unwrap();
        let v1 = SignedManifest::parse(&v1).unwrap().manifest().clone();
        assert!(read_archive(&v1, &gz).is_err());
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
