//! The journal's file: created private, opened with an integrity check and never replaced; its
//! redb tables, the format version, how values are encoded in them and what they take in it.

use std::borrow::Cow;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use redb::{Database, TableDefinition, TableError, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::outcome::RunResult;

use super::error::{io_is_full, JournalError, Res};
use super::records::{TaskPhase, TaskRecord};

/// The file format version, stored in table `meta`. Version 1 keyed the task tables by task
/// id; a file in that format is migrated at open (see `migration`).
pub(super) const SCHEMA_VERSION: u64 = 2;

/// redb's page cache; the journal is read little (records are mostly written once).
const CACHE_BYTES: usize = 1 << 20;

/// Accept sequence number → the task's [`TaskRecord`], as accepted (no result). Its `phase`
/// and `acked` may lag its entry's, which are authoritative. (A record migrated from version 1
/// may hold its result.)
pub(super) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Accept sequence number → [`Finished`]: the task's result, written when it finishes.
pub(super) const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
/// Accept sequence number → [`Entry`]: the task id and where the task is. Loaded in memory at
/// open.
pub(super) const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
pub(super) const HANDLERS: TableDefinition<&str, &[u8]> = TableDefinition::new("handlers");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Audit sequence number → the record's line: the audit chain's records not yet exported to
/// the audit files, and always the last one (the chain's head). A table older agents ignore.
pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Creates the task and handler tables of this format version, those not there yet.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), TableError> {
    txn.open_table(RECORDS)?;
    txn.open_table(RESULTS)?;
    txn.open_table(ENTRIES)?;
    txn.open_table(HANDLERS)?;
    txn.open_table(AUDIT)?;
    Ok(())
}

/// What an entry takes beside the id: the encoded fields, rounded up.
pub(super) const ENTRY_BYTES: u64 = 128;

/// What a value of `len` bytes takes in the file: small values share B-tree pages, a large one
/// gets a region of its own, a power of two of pages.
pub(super) fn stored_size(len: usize) -> u64 {
    const PAGE: usize = 4096;
    if len <= PAGE / 2 {
        len as u64
    } else {
        (len + 64).next_power_of_two().max(PAGE) as u64
    }
}

/// A value of table `results`.
#[derive(Serialize, Deserialize)]
pub(super) struct Finished<R> {
    pub(super) finished_at_ms: u64,
    pub(super) result: R,
}

/// A value of table `results`, encoded.
pub(super) fn encode_result(id: &str, finished_at_ms: u64, result: &RunResult) -> Res<Vec<u8>> {
    encode(
        "result",
        id,
        &Finished {
            finished_at_ms,
            result,
        },
    )
}

/// A task as stored: its record, its result if it has one in table `results`, brought up to
/// date with its entry.
pub(super) fn assemble(
    id: &str,
    summary: &Summary,
    record: &[u8],
    finished: Option<&[u8]>,
) -> Result<TaskRecord, JournalError> {
    let mut r: TaskRecord = decode("task", id, record)?;
    if let Some(bytes) = finished {
        let f: Finished<RunResult> = decode("result", id, bytes)?;
        r.result = Some(f.result);
        r.finished_at_ms = Some(f.finished_at_ms);
        r.phase = TaskPhase::Done;
    }
    summary.overlay(&mut r);
    Ok(r)
}

/// Where a task is: its entry in table `entries` (keyed by `seq`, stored as an [`Entry`]), and
/// in the in-memory index. Format version 1 stored it as such, as JSON, in its `task_index`
/// table (see `migration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Summary {
    /// Accept order.
    pub(super) seq: u64,
    pub(super) phase: TaskPhase,
    pub(super) acked: bool,
    pub(super) finished_at_ms: Option<u64>,
    /// What the task's values (record, result, entry) take in the file, as written (0 when
    /// read from a format version 1 entry, which did not have it: measured at open).
    #[serde(default)]
    pub(super) bytes: u64,
    /// The result's output was dropped (evicted once acknowledged, or never stored for lack
    /// of room), and the record's input with it.
    #[serde(default)]
    pub(super) evicted: bool,
}

impl Summary {
    /// The summary of a record about to be written (its size is counted as it is).
    pub(super) fn of(seq: u64, record: &TaskRecord) -> Summary {
        Summary {
            seq,
            phase: record.phase,
            acked: record.acked,
            finished_at_ms: record.finished_at_ms,
            bytes: 0,
            evicted: false,
        }
    }

    /// Finished and not acknowledged: a result owed to the platform.
    pub(super) fn in_outbox(&self) -> bool {
        self.phase == TaskPhase::Done && !self.acked
    }

    /// Acknowledged, with an output that can still be evicted to make room.
    pub(super) fn evictable(&self) -> bool {
        self.phase == TaskPhase::Done && self.acked && !self.evicted
    }

    /// Brings a record read from table `records` up to date: starts and acknowledgements
    /// are written to the entry alone. Both only move forward, so the later of the two wins.
    pub(super) fn overlay(&self, record: &mut TaskRecord) {
        record.phase = record.phase.max(self.phase);
        record.acked |= self.acked;
    }
}

/// A value of table `entries`: a [`Summary`] without its `seq` (the key), with the task id.
#[derive(Serialize, Deserialize)]
pub(super) struct Entry<'a> {
    pub(super) id: Cow<'a, str>,
    pub(super) phase: TaskPhase,
    pub(super) acked: bool,
    pub(super) finished_at_ms: Option<u64>,
    /// 0 in entries written before sizes were kept: measured at open.
    #[serde(default)]
    pub(super) bytes: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) evicted: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl<'a> Entry<'a> {
    pub(super) fn of(id: &'a str, summary: &Summary) -> Entry<'a> {
        Entry {
            id: Cow::Borrowed(id),
            phase: summary.phase,
            acked: summary.acked,
            finished_at_ms: summary.finished_at_ms,
            bytes: summary.bytes,
            evicted: summary.evicted,
        }
    }

    pub(super) fn summary(&self, seq: u64) -> Summary {
        Summary {
            seq,
            phase: self.phase,
            acked: self.acked,
            finished_at_ms: self.finished_at_ms,
            bytes: self.bytes,
            evicted: self.evicted,
        }
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    key: &str,
    bytes: &[u8],
) -> Res<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| JournalError::Io(format!("the stored {what} {key:?} does not decode: {e}")))
}

pub(super) fn encode<T: Serialize>(what: &str, key: &str, value: &T) -> Res<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| JournalError::Io(format!("the {what} {key:?} does not encode: {e}")))
}

/// The database, opened (or created in an empty file) with an integrity check. Never replaces
/// a file it cannot open.
pub(super) fn open_db(path: &Path) -> Res<Database> {
    let opened = std::panic::catch_unwind(|| {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(JournalError::Io(format!(
            "cannot open the journal {}: {e} (the file is left as it is; move it aside to start \
             with an empty journal, losing its records)",
            path.display()
        ))),
        Err(_) => Err(JournalError::Io(format!(
            "cannot open the journal {}: redb panicked reading it (corrupt file?); the file is \
             left as it is",
            path.display()
        ))),
    }
}

/// Creates the directory (0700) and the file (0600) if they do not exist; tightens the file's
/// mode if it is wider.
pub(super) fn prepare_path(path: &Path) -> Res<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| JournalError::Io(format!("creating {}: {e}", dir.display())))?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::metadata(path)
                .map_err(|e| JournalError::Io(format!("reading {}: {e}", path.display())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| JournalError::Io(format!("restricting {} to 0600: {e}", path.display())),
                )?;
            }
            Ok(())
        }
        Err(e) if io_is_full(&e) => Err(JournalError::StorageFull(format!(
            "creating {}: {e}",
            path.display()
        ))),
        Err(e) => Err(JournalError::Io(format!(
            "creating {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::testkit::*;
    use crate::journal::Journal;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_corrupt_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(&cfg.path, &garbage).unwrap();
        let err = Journal::open(cfg.clone()).map(|_| ()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot open the journal"), "{msg}");
        assert!(msg.contains(&cfg.path.display().to_string()), "{msg}");
        assert_eq!(std::fs::read(&cfg.path).unwrap(), garbage);
    }

    #[test]
    fn the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        drop(j);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cfg.path), 0o600);
        assert_eq!(mode(cfg.path.parent().unwrap()), 0o700);
    }
}
