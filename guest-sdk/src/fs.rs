//! Files in granted directories, with errors a platform can act on.
//!
//! A handler sees no filesystem unless its policy grants directories; each grant preopens a
//! host directory at a guest path such as `/data`, read-only unless granted writable.
//! These wrappers call `std::fs` and turn its errors into an [`Error`] whose message names
//! the path:
//!
//! | failure | kind |
//! | --- | --- |
//! | the path is in no granted directory (WASI reports "not found" for it) | `not_granted` |
//! | the grant does not permit it: a write to a read-only grant, a path or symlink that leads out of the grant | `not_granted` |
//! | the path is inside a granted directory but does not exist | `not_found` |
//! | anything else (not a directory, not UTF-8, …) | `io` |
//!
//! ```no_run
//! use bridge_guest::{fs, Result};
//!
//! fn load() -> Result<String> {
//!     // Err(kind "not_granted", "… /data must be granted to the handler …") without a grant
//!     fs::read_to_string("/data/config.toml")
//! }
//! ```
//!
//! To map the error of a `std::fs` call of your own, use [`error`].

use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, KIND_IO, KIND_NOT_FOUND, KIND_NOT_GRANTED};

/// Reads a whole file into bytes (`std::fs::read`).
///
/// ```no_run
/// let bytes = bridge_guest::fs::read("/data/image.png")?;
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).map_err(|err| error(path, "read", err))
}

/// Reads a whole UTF-8 file into a string (`std::fs::read_to_string`).
///
/// ```no_run
/// let text = bridge_guest::fs::read_to_string("/data/notes.txt")?;
/// bridge_guest::info!("{} lines", text.lines().count());
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn read_to_string(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|err| error(path, "read", err))
}

/// Opens a file for reading (`std::fs::File::open`), e.g. to stream it line by line.
///
/// ```no_run
/// use std::io::{BufRead, BufReader};
///
/// let file = bridge_guest::fs::open("/logs/syslog")?;
/// for line in BufReader::new(file).lines() {
///     let line = line?;
///     # let _ = line;
/// }
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn open(path: impl AsRef<Path>) -> Result<std::fs::File> {
    let path = path.as_ref();
    std::fs::File::open(path).map_err(|err| error(path, "open", err))
}

/// Writes a whole file, creating or truncating it (`std::fs::write`). Needs a writable
/// grant.
///
/// ```no_run
/// bridge_guest::fs::write("/out/report.json", b"{}")?;
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, contents).map_err(|err| error(path, "write", err))
}

/// Queries metadata, following symlinks (`std::fs::metadata`).
///
/// ```no_run
/// let size = bridge_guest::fs::metadata("/data/big.bin")?.len();
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn metadata(path: impl AsRef<Path>) -> Result<std::fs::Metadata> {
    let path = path.as_ref();
    std::fs::metadata(path).map_err(|err| error(path, "stat", err))
}

/// Lists a directory (`std::fs::read_dir`). Entries come in the order the host returns
/// them; sort them if the output should be deterministic.
///
/// ```no_run
/// let mut names = Vec::new();
/// for entry in bridge_guest::fs::read_dir("/data")? {
///     names.push(entry?.file_name().to_string_lossy().into_owned());
/// }
/// names.sort();
/// # Ok::<(), bridge_guest::Error>(())
/// ```
pub fn read_dir(path: impl AsRef<Path>) -> Result<ReadDir> {
    let path = path.as_ref();
    let inner = std::fs::read_dir(path).map_err(|err| error(path, "list", err))?;
    Ok(ReadDir {
        inner,
        path: path.to_path_buf(),
    })
}

/// The iterator [`read_dir`] returns: `std::fs::DirEntry`s, with errors mapped like the
/// other functions of this module.
///
/// ```no_run
/// let dir: bridge_guest::fs::ReadDir = bridge_guest::fs::read_dir("/data")?;
/// let count = dir.filter_map(|entry| entry.ok()).count();
/// # Ok::<(), bridge_guest::Error>(())
/// ```
#[derive(Debug)]
pub struct ReadDir {
    inner: std::fs::ReadDir,
    path: PathBuf,
}

impl Iterator for ReadDir {
    type Item = Result<std::fs::DirEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner
            .next()
            .map(|entry| entry.map_err(|err| error(&self.path, "list", err)))
    }
}

/// How an I/O error on a path is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// The sandbox (or the grant's permissions) forbids it.
    NotPermitted,
    /// "No such file or directory", which WASI also reports for paths outside every grant.
    NotFound,
    /// Anything else.
    Other,
}

/// WASI preview 1's `ENOTCAPABLE`: the descriptor lacks the rights for the operation.
const WASI_ENOTCAPABLE: i32 = 76;

fn classify(err: &io::Error) -> Class {
    match err.kind() {
        io::ErrorKind::NotFound => Class::NotFound,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Class::NotPermitted,
        _ if cfg!(target_os = "wasi") && err.raw_os_error() == Some(WASI_ENOTCAPABLE) => {
            Class::NotPermitted
        }
        _ => Class::Other,
    }
}

/// Whether some ancestor directory of `path` is reachable, i.e. `path` lies inside a
/// granted directory. In WASI, a path under no preopened directory is "not found", so a
/// missing file is told apart from a missing grant by looking for its parents.
fn inside_a_grant(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .filter(|dir| !dir.as_os_str().is_empty())
        .any(|dir| std::fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false))
}

/// Turns an I/O error on `path` into an [`Error`] of kind `not_granted`, `not_found` or
/// `io`, with a message naming the path and the operation (`"read"`, `"open"`, …). Use it
/// for `std::fs` calls the module does not wrap.
///
/// ```
/// use std::io;
/// use bridge_guest::fs;
///
/// let err = fs::error("/data/x", "create", io::Error::from(io::ErrorKind::PermissionDenied));
/// assert_eq!(err.kind(), "not_granted");
/// assert!(err.message().contains("/data/x"));
///
/// // e.g. std::fs::create_dir("/out/sub").map_err(|e| fs::error("/out/sub", "create", e))?;
/// ```
pub fn error(path: impl AsRef<Path>, operation: &str, err: io::Error) -> Error {
    let path = path.as_ref();
    let class = classify(&err);
    let found_parent = class == Class::NotFound && inside_a_grant(path);
    describe(path, operation, &err, class, found_parent)
}

fn describe(
    path: &Path,
    operation: &str,
    err: &io::Error,
    class: Class,
    inside_a_grant: bool,
) -> Error {
    let shown = path.display();
    match class {
        Class::NotFound if inside_a_grant => Error::with_kind(
            KIND_NOT_FOUND,
            format!("cannot {operation} {shown}: no such file or directory"),
        ),
        Class::NotFound => Error::with_kind(
            KIND_NOT_GRANTED,
            format!(
                "cannot {operation} {shown}: it is not in any directory granted to this handler; \
                 the directory must be granted to the handler by its policy"
            ),
        ),
        Class::NotPermitted => Error::with_kind(
            KIND_NOT_GRANTED,
            format!(
                "cannot {operation} {shown}: not permitted ({err}); the directory must be granted \
                 to the handler by its policy (writable, to change files), and paths may not lead \
                 outside it"
            ),
        ),
        Class::Other => Error::with_kind(KIND_IO, format!("cannot {operation} {shown}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let c = |kind| classify(&io::Error::from(kind));
        assert_eq!(c(io::ErrorKind::NotFound), Class::NotFound);
        assert_eq!(c(io::ErrorKind::PermissionDenied), Class::NotPermitted);
        assert_eq!(c(io::ErrorKind::ReadOnlyFilesystem), Class::NotPermitted);
        assert_eq!(c(io::ErrorKind::InvalidData), Class::Other);
    }

    #[test]
    fn messages_name_the_path_and_the_grant() {
        let p = Path::new("/data/missing.txt");
        let nf = io::Error::from(io::ErrorKind::NotFound);

        let e = describe(p, "read", &nf, Class::NotFound, true);
        assert_eq!(e.kind(), "not_found");
        assert_eq!(
            e.message(),
            "cannot read /data/missing.txt: no such file or directory"
        );

        let e = describe(p, "read", &nf, Class::NotFound, false);
        assert_eq!(e.kind(), "not_granted");
        assert!(e.message().contains("/data/missing.txt"), "{}", e.message());
        assert!(e.message().contains("must be granted"), "{}", e.message());
        assert_eq!(e.exit_code(), 1);

        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let e = describe(p, "write", &denied, Class::NotPermitted, true);
        assert_eq!(e.kind(), "not_granted");
        assert!(e
            .message()
            .starts_with("cannot write /data/missing.txt: not permitted"));
        assert!(e.message().contains("must be granted"));

        let other = io::Error::other("stream did not contain valid UTF-8");
        let e = describe(p, "read", &other, Class::Other, true);
        assert_eq!(e.kind(), "io");
        assert_eq!(
            e.message(),
            "cannot read /data/missing.txt: stream did not contain valid UTF-8"
        );
    }

    #[test]
    fn real_files() {
        let dir = std::env::temp_dir().join(format!("bridge-guest-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.txt");
        write(&file, "abc").unwrap();
        assert_eq!(read(&file).unwrap(), b"abc");
        assert_eq!(read_to_string(&file).unwrap(), "abc");
        assert_eq!(metadata(&file).unwrap().len(), 3);
        let names: Vec<_> = read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);

        // A missing file whose directory exists is "not_found"…
        let e = read(dir.join("nope.txt")).unwrap_err();
        assert_eq!(e.kind(), "not_found", "{e:?}");
        // …and one whose every ancestor but the root is missing too is "not_granted" (on
        // WASI even the root is missing unless granted).
        let e = open("/bridge-guest-surely-missing/x/y.txt").unwrap_err();
        if cfg!(target_os = "wasi") {
            assert_eq!(e.kind(), "not_granted", "{e:?}");
        } else {
            assert_eq!(e.kind(), "not_found", "{e:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
