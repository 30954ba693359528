//! The audit files: `audit-<first seq, 20 digits>.jsonl` in the audit directory, read back
//! whole lines at a time, with a torn last line (an append cut short) told apart.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::record::MAX_LINE_BYTES;

/// The largest `max_file_bytes` allowed.
pub const MAX_FILE_BYTES_LIMIT: u64 = 1 << 30;

/// The most bytes of one file read back: a file stays within `max_file_bytes` (at most
/// [`MAX_FILE_BYTES_LIMIT`]) unless it holds one record larger than that.
const MAX_READ_BYTES: u64 = MAX_FILE_BYTES_LIMIT + MAX_LINE_BYTES as u64 + 1;

/// The file whose first record is `first`.
pub fn file_name(first: u64) -> String {
    format!("audit-{first:020}.jsonl")
}

/// The first sequence number a file name says, if it is an audit file's name.
pub fn first_seq(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The audit files in `dir`, in sequence order (none when `dir` does not exist).
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(first) = entry.file_name().to_str().and_then(first_seq) {
            files.push((first, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// A file's contents: its whole lines (without their `\n`), and the bytes after the last
/// `\n` (a torn append) if any.
pub struct Contents {
    pub lines: Vec<Vec<u8>>,
    pub torn: Vec<u8>,
    /// The length of the whole lines, `\n` included: where a torn tail starts.
    pub whole_bytes: u64,
}

/// Reads a file (no link followed), at most `MAX_READ_BYTES`.
pub fn read(path: &Path) -> std::io::Result<Contents> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_READ_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_READ_BYTES {
        return Err(std::io::Error::other(format!(
            "{} is larger than {MAX_READ_BYTES} bytes",
            path.display()
        )));
    }
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = bytes.split_off(whole);
    let lines = bytes
        .split(|&b| b == b'\n')
        .take(bytes.iter().filter(|&&b| b == b'\n').count())
        .map(<[u8]>::to_vec)
        .collect();
    Ok(Contents {
        lines,
        torn,
        whole_bytes: whole as u64,
    })
}
