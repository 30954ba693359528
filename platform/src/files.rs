//! File handling for bridgectl: reading with context, creating key files with the right
//! permissions, and atomic replacement of outputs.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Mode of private key files.
pub const PRIVATE_KEY_MODE: u32 = 0o600;
/// Mode of public key files.
pub const PUBLIC_KEY_MODE: u32 = 0o644;
/// Mode of new signed modules and signature files.
pub const OUTPUT_MODE: u32 = 0o644;

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads a whole file of at most `max` bytes, naming it in the error (a larger file is an
/// error, and no more than `max + 1` bytes of it are read).
pub fn read_at_most(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(bytes)
}

/// Reads a whole text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a new key file with exactly `mode`.
///
/// Without `force` the file is created with `O_CREAT|O_EXCL` (so an existing file, or one
/// created concurrently, is never overwritten) and `mode` from the start, so its content is
/// never readable by anyone else even briefly. With `force`, the content is written to a
/// temporary file of mode `mode` in the same directory, which then replaces `path` atomically;
/// an existing file's permissions are never carried over (so never widened).
pub fn write_key_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    if force {
        return write_atomic(path, contents, Some(mode));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists (use --force to overwrite it)",
                    path.display()
                )
            } else {
                format!("cannot create {}", path.display())
            }
        })?;
    // The umask may have narrowed `mode`; widen back to exactly `mode` only for public files.
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    }
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces `path` atomically with `contents`: writes a temporary file in the same directory,
/// syncs it, and renames it over `path`. Its mode is `mode` if given, else that of the file it
/// replaces, else [`OUTPUT_MODE`].
pub fn write_atomic(path: &Path, contents: &[u8], mode: Option<u32>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mode = mode.unwrap_or_else(|| {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(OUTPUT_MODE)
    });
    let mut tmp = tempfile::Builder::new()
        .prefix(".bridgectl-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode & 0o700))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write a temporary file in {}", dir.display()))?;
    // Widen to the final mode only once the content is complete.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions in {}", dir.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Replaces the state file `DIR/NAME.json` whole with `value` as pretty JSON and a newline:
/// writes `DIR/.NAME.tmp` (mode 0600), syncs it, renames it over the file and syncs `dir`, so
/// a crash leaves the old state or the new one, never a mix. The temporary file is removed
/// when a step fails.
pub fn write_state_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<()> {
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut text = serde_json::to_vec_pretty(value).expect("states serialize");
    text.push(b'\n');
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// `text` cut to at most `max` bytes (at a character boundary).
pub fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The public key file beside private key `key`: `KEY.pub`.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// Where `bridgectl sign` writes by default: `DIR/STEM.signed.wasm` for `DIR/STEM.wasm`
/// (`MODULE.signed.wasm` if the name does not end in `.wasm`), or `MODULE.sig` (i.e.
/// `STEM.wasm.sig`) for a detached signature.
pub fn default_output(module: &Path, detached: bool) -> PathBuf {
    let mut s = module.as_os_str().to_os_string();
    if detached {
        s.push(".sig");
        return PathBuf::from(s);
    }
    let text = module.to_string_lossy();
    match text.strip_suffix(".wasm") {
        Some(stem) if module.to_str().is_some() && !stem.ends_with('/') && !stem.is_empty() => {
            PathBuf::from(format!("{stem}.signed.wasm"))
        }
        _ => {
            s.push(".signed.wasm");
            PathBuf::from(s)
        }
    }
}

/// A warning if private key file `path` is readable or writable by group or others.
pub fn loose_key_permissions(path: &Path) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "bridgectl: warning: private key {} has mode {mode:04o}: it should be readable by its owner only (chmod 600)",
            path.display()
        )
    })
}

/// Fails unless `path` is an existing regular file (for clearer errors than `read`'s).
pub fn require_file(path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => bail!("{} is not a regular file", path.display()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_outputs() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            default_output(&p("a/hello.wasm"), false),
            p("a/hello.signed.wasm")
        );
        assert_eq!(default_output(&p("hello.wasm"), true), p("hello.wasm.sig"));
        assert_eq!(
            default_output(&p("hello.bin"), false),
            p("hello.bin.signed.wasm")
        );
        assert_eq!(default_output(&p(".wasm"), false), p(".wasm.signed.wasm"));
        assert_eq!(public_key_path(&p("k/release.key")), p("k/release.key.pub"));
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_key_file(&path, b"one", PRIVATE_KEY_MODE, false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let err = write_key_file(&path, b"two", PRIVATE_KEY_MODE, false).unwrap_err();
        assert!(format!("{err:#}").contains("--force"));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // Forced over a widened file: the result is 0600 again.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_key_file(&path, b"two", PRIVATE_KEY_MODE, true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert!(loose_key_permissions(&path).is_none());
        let public = dir.path().join("k.pub");
        write_key_file(&public, b"pub", PUBLIC_KEY_MODE, false).unwrap();
        assert_eq!(mode(&public), 0o644);
        assert!(loose_key_permissions(&public).is_some());
    }

    #[test]
    fn atomic_keeps_existing_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.wasm");
        write_atomic(&path, b"a", None).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"b", None).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read(&path).unwrap(), b"b");
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
