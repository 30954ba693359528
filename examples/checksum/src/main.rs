//! SHA-256 of every regular file in a granted directory.
//!
//! Input: `{"dir": "/data", "recursive": false}` (both optional; `dir` defaults to `/data`).
//! Output, sorted by path (relative to `dir`, `/`-separated):
//!
//! ```json
//! {"dir": "/data",
//!  "files": [{"path": "a.txt", "bytes": 3, "sha256": "ba7816bf…"}],
//!  "total_bytes": 3,
//!  "truncated": false}
//! ```
//!
//! At most 10,000 files are hashed (and at most 100,000 directory entries looked at):
//! beyond that the output has `"truncated": true`. Symlinks and other non-regular files are
//! skipped. Without a grant for `dir` the handler fails with kind `not_granted`.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};

use bridge_guest::{fs, handler, info, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most files hashed in one run.
const MAX_FILES: usize = 10_000;
/// Most directory entries examined in one run (bounds the listing of huge trees).
const MAX_ENTRIES: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default = "default_dir")]
    dir: String,
    #[serde(default)]
    recursive: bool,
}

fn default_dir() -> String {
    "/data".into()
}

#[derive(Serialize)]
struct Output {
    dir: String,
    files: Vec<FileSum>,
    total_bytes: u64,
    truncated: bool,
}

#[derive(Serialize)]
struct FileSum {
    path: String,
    bytes: u64,
    sha256: String,
}

#[handler]
fn checksum(input: Input) -> Result<Output> {
    let root = PathBuf::from(&input.dir);
    let (mut paths, mut truncated) = list_files(&root, input.recursive)?;
    paths.sort();
    if paths.len() > MAX_FILES {
        paths.truncate(MAX_FILES);
        truncated = true;
    }

    let mut files = Vec::with_capacity(paths.len());
    let mut total_bytes = 0;
    for relative in paths {
        let (bytes, sha256) = hash_file(&root.join(&relative))?;
        total_bytes += bytes;
        files.push(FileSum {
            path: relative,
            bytes,
            sha256,
        });
    }
    info!(
        "hashed {} files, {total_bytes} bytes, in {}{}",
        files.len(),
        input.dir,
        if truncated { " (truncated)" } else { "" }
    );
    Ok(Output {
        dir: input.dir,
        files,
        total_bytes,
        truncated,
    })
}

/// The regular files under `root` as `/`-separated paths relative to it, and whether the
/// listing stopped at [`MAX_ENTRIES`]. Walks breadth-first without recursion.
fn list_files(root: &Path, recursive: bool) -> Result<(Vec<String>, bool)> {
    let mut files = Vec::new();
    let mut seen = 0usize;
    let mut pending = VecDeque::from([String::new()]);
    while let Some(prefix) = pending.pop_front() {
        let dir = if prefix.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&prefix)
        };
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Ok((files, true));
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            // `file_type` does not follow symlinks: links are skipped, never followed.
            let kind = entry
                .file_type()
                .map_err(|err| fs::error(entry.path(), "stat", err))?;
            if kind.is_file() {
                files.push(relative);
            } else if kind.is_dir() && recursive {
                pending.push_back(relative);
            }
        }
    }
    Ok((files, false))
}

/// Streams a file through SHA-256: its size and lower-case hex digest.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = fs::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|err| fs::error(path, "read", err))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((bytes, to_hex(&hasher.finalize())))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_sorted_regular_files() {
        let root = std::env::temp_dir().join(format!("checksum-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("b.txt"), "abc").unwrap();
        std::fs::write(root.join("a.txt"), "").unwrap();
        std::fs::write(root.join("sub/c.txt"), "abc").unwrap();
        let dir = root.to_string_lossy().into_owned();

        let flat = checksum(Input {
            dir: dir.clone(),
            recursive: false,
        })
        .unwrap();
        let paths: Vec<_> = flat.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "b.txt"]);
        assert_eq!(
            flat.files[0].sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            flat.files[1].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((flat.total_bytes, flat.truncated), (3, false));

        let deep = checksum(Input {
            dir,
            recursive: true,
        })
        .unwrap();
        let paths: Vec<_> = deep.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "b.txt", "sub/c.txt"]);
        assert_eq!(deep.total_bytes, 6);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unreachable_dir_is_an_error_naming_it() {
        let err = checksum(Input {
            dir: "/checksum-test-no-such-dir".into(),
            recursive: false,
        })
        .err()
        .unwrap();
        assert!(
            err.message().contains("/checksum-test-no-such-dir"),
            "{err:?}"
        );
    }
}
