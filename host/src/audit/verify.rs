//! Checking the chain in the audit files (`bridge-daemon audit verify`) and reading its last
//! records (`audit tail`): read-only, beside a running daemon.

use std::path::Path;

use super::files::{list, read};
use super::record::{hash_line, Record, GENESIS};

/// A chain that checks out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid {
    pub records: u64,
    /// The first and last sequence numbers (`None`: no record).
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// The last record's hash (64 zeros when there is none).
    pub head: String,
    /// The last file ends in a torn line (an append cut short): its byte count.
    pub torn: Option<(String, usize)>,
}

impl std::fmt::Display for Valid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.first, self.last) {
            (Some(a), Some(b)) => {
                write!(
                    f,
                    "{} records, seq {a}..{b}, head {}",
                    self.records, self.head
                )?;
                if a > 1 {
                    write!(f, " (records before seq {a} were rotated away)")?;
                }
            }
            _ => write!(f, "0 records")?,
        }
        if let Some((file, n)) = &self.torn {
            write!(
                f,
                "; {file} ends in a torn line of {n} bytes (an append cut short; the agent \
                 sets it aside and writes the record again at its next start)"
            )?;
        }
        Ok(())
    }
}

/// The first bad record: `FILE:LINE (seq N): what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{}:{} (seq {seq}): {}", self.file, self.line, self.what),
            None => write!(f, "{}:{}: {}", self.file, self.line, self.what),
        }
    }
}

/// Checks every file of `dir` in sequence order: every line parses, the sequence numbers
/// follow each other (from each file's name on), each `prev` is the hash of the line before
/// (across files).
pub fn verify(dir: &Path) -> Result<Valid, Broken> {
    let files = list(dir).map_err(|e| Broken {
        file: dir.display().to_string(),
        line: 0,
        seq: None,
        what: format!("cannot list: {e}"),
    })?;
    let mut valid = Valid {
        records: 0,
        first: None,
        last: None,
        head: GENESIS.to_string(),
        torn: None,
    };
    let count = files.len();
    for (i, (first, path)) in files.into_iter().enumerate() {
        let name = path.display().to_string();
        let contents = read(&path).map_err(|e| Broken {
            file: name.clone(),
            line: 0,
            seq: None,
            what: format!("cannot read: {e}"),
        })?;
        if contents.lines.is_empty() && contents.torn.is_empty() && i + 1 < count {
            return Err(Broken {
                file: name,
                line: 0,
                seq: Some(first),
                what: "empty file before the last one".into(),
            });
        }
        for (n, line) in contents.lines.iter().enumerate() {
            let bad = |seq, what: String| Broken {
                file: name.clone(),
                line: n + 1,
                seq,
                what,
            };
            let record = Record::parse(line).map_err(|e| bad(None, e))?;
            let want = match valid.last {
                Some(last) => last + 1,
                None => first,
            };
            if n == 0 && record.seq != first {
                return Err(bad(
                    Some(record.seq),
                    format!("the file's name says its first record is seq {first}"),
                ));
            }
            if record.seq != want {
                return Err(bad(
                    Some(record.seq),
                    format!("expected seq {want} (a record is missing or out of order)"),
                ));
            }
            let expected_prev = match (valid.last, record.seq) {
                (None, 1) => GENESIS,
                // The first record kept after rotation: its predecessor is gone.
                (None, _) => record.prev.as_str(),
                (Some(_), _) => valid.head.as_str(),
            };
            if record.prev != expected_prev {
                return Err(bad(
                    Some(record.seq),
                    "prev is not the hash of the record before it (that record, or this \
                     one, was changed)"
                        .into(),
                ));
            }
            valid.first.get_or_insert(record.seq);
            valid.last = Some(record.seq);
            valid.records += 1;
            valid.head = hash_line(line);
        }
        if !contents.torn.is_empty() {
            if i + 1 < count {
                return Err(Broken {
                    file: name,
                    line: contents.lines.len() + 1,
                    seq: None,
                    what: format!(
                        "a torn line of {} bytes in a file that is not the last",
                        contents.torn.len()
                    ),
                });
            }
            valid.torn = Some((name, contents.torn.len()));
        }
    }
    Ok(valid)
}

/// The last `n` records' lines, oldest first (whole lines only), read from the newest files.
pub fn tail(dir: &Path, n: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for (_, path) in list(dir)?.into_iter().rev() {
        if lines.len() >= n {
            break;
        }
        let mut older = read(&path)?.lines;
        let keep = n - lines.len();
        if older.len() > keep {
            older.drain(..older.len() - keep);
        }
        older.append(&mut lines);
        lines = older;
    }
    Ok(lines)
}

/// The files' last record as a head (`None`: no record), read from the newest file alone.
pub fn files_head(dir: &Path) -> Option<super::record::Head> {
    let line = tail(dir, 1).ok()?.pop()?;
    let record = Record::parse(&line).ok()?;
    Some(super::record::head_after(record.seq, &line))
}

/// The hash of record `seq` as the files hold it (`None`: not there).
pub fn hash_of(dir: &Path, seq: u64) -> Option<String> {
    let files = list(dir).ok()?;
    let (first, path) = files.iter().rev().find(|(first, _)| *first <= seq)?;
    let contents = read(path).ok()?;
    let line = contents.lines.get(usize::try_from(seq - first).ok()?)?;
    let record = Record::parse(line).ok()?;
    (record.seq == seq).then(|| hash_line(line))
}
