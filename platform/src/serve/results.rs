//! Task results, stored by task id in the state directory so they survive a restart.
//!
//! Guarantees:
//!
//! * The first result received for a task id is the one kept ("first wins"); a later delivery
//!   of the same task id by the same agent (the agent resends its outbox until it is
//!   acknowledged, and answers a repeated `run` from its journal) only counts one more
//!   `deliveries`. A result for the task id from another agent is not recorded at all.
//! * A refusal the agent does not record ([`is_unrecorded_refusal`]: `rejected` with reason
//!   `busy`, `storage_full`, `storage_error`, `unknown_command` or `expired`; nothing ran) is not
//!   a task's result: the same task id may be sent again and run then. Such results are not
//!   stored (the caller checks; [`ResultStore::open`] skips any an older version logged).
//! * A result is written to the log (`results.jsonl` in the state directory, mode 0600) before
//!   [`ResultStore::record`] reports it stored, so the `ack` the platform sends afterwards never
//!   names a result a platform crash could lose. (The log is not `fsync`ed: a power loss of the
//!   platform's host may lose the last results; the agent's journal is the durable side.)
//! * The log is append-only, one JSON object per line: `{"stored": {...}}` for a first delivery,
//!   `{"delivered": "<task id>"}` for each repeat. It is read back whole when the server starts;
//!   a damaged line (a crash mid-write) is skipped with a warning.
//!
//! Not guaranteed: results are never deleted (this is a development server). Memory holds an
//! index (task id → agent, delivery count, where its line is in the log), not the results:
//! a result is read back from the log when asked for, so a server that stored millions of
//! them holds tens of bytes per result, not the results themselves.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context as _, Result};
use bridge_protocol::{RunResult, Status};
use bridge_signing::timefmt::format_rfc3339;
use serde::{Deserialize, Serialize};

use crate::timearg::now_unix;

/// The log, inside the state directory, that holds every stored result.
pub const RESULTS_LOG: &str = "results.jsonl";

/// The `reason`s of the `rejected` results the agent does not record: nothing ran, and the same
/// task id may be sent again later and run then (see `docs/protocol.md`).
pub const UNRECORDED_REFUSALS: &[&str] = bridge_protocol::UNRECORDED_REASONS;

/// Whether `result` is a refusal the agent does not record ([`UNRECORDED_REFUSALS`]): it is
/// handed to whoever waits for that run, but it is not the task's result.
pub fn is_unrecorded_refusal(result: &RunResult) -> bool {
    result.status == Status::Rejected
        && result
            .reason
            .as_deref()
            .is_some_and(|r| UNRECORDED_REFUSALS.contains(&r))
}

/// One stored result, as persisted and as the control interface's `result` command returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredResult {
    /// The platform's task id.
    pub task_id: String,
    /// The agent that sent it.
    pub agent: String,
    /// The first result received for this task id.
    pub result: RunResult,
    /// When that first result was received (RFC 3339, UTC).
    pub received_at: String,
    /// How many times the agent sent a result for this task id (1 = once, no resend).
    pub deliveries: u64,
}

/// One line of the log (built to be written at once, so the size difference is harmless).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum LogLine {
    /// A first delivery.
    Stored(StoredResult),
    /// One more delivery of a stored task id.
    Delivered(String),
}

/// What [`ResultStore::record`] did.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// The first delivery for the task id: stored.
    First {
        /// The stored result.
        stored: StoredResult,
        /// Whether it is on disk. False only when writing it failed: the result must then not
        /// be acknowledged, so the agent sends it again.
        durable: bool,
    },
    /// One more delivery by the agent whose result is stored: counted.
    Again(StoredResult),
    /// A result from another agent than the one whose result is stored for this task id:
    /// neither stored nor counted.
    Foreign(StoredResult),
}

impl Recorded {
    /// The stored result (the first one received, with the updated delivery count).
    pub fn stored(&self) -> &StoredResult {
        match self {
            Recorded::First { stored, .. }
            | Recorded::Again(stored)
            | Recorded::Foreign(stored) => stored,
        }
    }

    /// Whether what was received is safely recorded (or needs no recording), i.e. may be
    /// acknowledged.
    pub fn durable(&self) -> bool {
        match self {
            Recorded::First { durable, .. } => *durable,
            Recorded::Again(_) | Recorded::Foreign(_) => true,
        }
    }
}

/// Results by task id, in the log; an index of them in memory.
#[derive(Debug)]
pub struct ResultStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    log: File,
    /// The log's length: where the next line goes.
    end: u64,
    /// The log ends in the middle of a line (a crash, or a failed write): the next line starts
    /// with a newline.
    cut: bool,
    index: HashMap<String, Indexed>,
}

impl Inner {
    /// Appends one line with a single `write` (O_APPEND), so lines never interleave; returns
    /// where it starts and its length without the newline.
    fn append(&mut self, line: &LogLine) -> Result<(u64, usize)> {
        let mut text = Vec::with_capacity(512);
        let lead = u64::from(self.cut);
        if self.cut {
            text.push(b'\n');
        }
        serde_json::to_writer(&mut text, line).expect("log lines serialize");
        text.push(b'\n');
        match self.log.write_all(&text) {
            Ok(()) => {
                let offset = self.end + lead;
                self.end += text.len() as u64;
                self.cut = false;
                Ok((offset, text.len() - 1 - lead as usize))
            }
            Err(e) => {
                // Part of the line may have been written: learn where the log ends now, and
                // keep the next line off whatever was left.
                if let Ok(meta) = self.log.metadata() {
                    if meta.len() != self.end {
                        self.end = meta.len();
                        self.cut = true;
                    }
                }
                Err(anyhow::Error::new(e).context("appending to the results log"))
            }
        }
    }
}

/// What memory keeps of a stored result.
#[derive(Debug)]
struct Indexed {
    agent: String,
    deliveries: u64,
    /// Where its `stored` line is in the log (without the newline).
    offset: u64,
    len: usize,
}

/// Mode of the log file.
const FILE_MODE: u32 = 0o600;

impl ResultStore {
    /// Opens (creating if needed, mode 0600) `state_dir/results.jsonl` and reads it.
    pub fn open(state_dir: &Path) -> Result<ResultStore> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join(RESULTS_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut index: HashMap<String, Indexed> = HashMap::new();
        let mut reader = std::io::BufReader::new(
            File::open(&path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        let mut offset = 0u64;
        let mut line = String::new();
        let mut ends_clean = true;
        for n in 0.. {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if read == 0 {
                break;
            }
            let at = offset;
            offset += read as u64;
            ends_clean = line.ends_with('\n');
            let text = line.strip_suffix('\n').unwrap_or(&line);
            if text.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<LogLine>(text) {
                Ok(LogLine::Stored(s)) if is_unrecorded_refusal(&s.result) => {
                    tracing::debug!(
                        task_id = %s.task_id,
                        "{} line {}: skipped, a refusal the agent does not record",
                        path.display(),
                        n + 1
                    );
                }
                Ok(LogLine::Stored(s)) => {
                    index.entry(s.task_id).or_insert(Indexed {
                        agent: s.agent,
                        deliveries: s.deliveries,
                        offset: at,
                        len: text.len(),
                    });
                }
                Ok(LogLine::Delivered(task_id)) => {
                    if let Some(s) = index.get_mut(&task_id) {
                        s.deliveries += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "{} line {}: skipped, not a result record: {e}",
                        path.display(),
                        n + 1
                    )
                }
            }
        }
        Ok(ResultStore {
            path,
            inner: Mutex::new(Inner {
                log,
                end: offset,
                // A last line cut short by a crash ends without a newline: the next one must
                // not be glued to it.
                cut: !ends_clean,
                index,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored result of `task_id`, if any (read back from the log).
    pub fn get(&self, task_id: &str) -> Option<StoredResult> {
        let inner = self.lock();
        let entry = inner.index.get(task_id)?;
        match read_stored(&inner.log, entry) {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::error!(task_id, "cannot read the stored result back: {e:#}");
                None
            }
        }
    }

    /// Records one delivery of `result` for `task_id` from `agent`: stores it if it is the first,
    /// else counts the delivery if `agent` is the one whose result is stored, else ignores it.
    /// The record is written to the log before this returns. The caller keeps the refusals the
    /// agent does not record ([`is_unrecorded_refusal`]) out of here.
    pub fn record(&self, agent: &str, task_id: &str, result: RunResult) -> Recorded {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(entry) = inner.index.get_mut(task_id) {
            let foreign = entry.agent != agent;
            if !foreign {
                entry.deliveries += 1;
            }
            let stored = match read_stored(&inner.log, entry) {
                Ok(s) => s,
                Err(e) => {
                    // (Only if the log was damaged under us.) The agent resends the result it
                    // keeps, the first one: answer with what it sent.
                    tracing::error!(task_id, "cannot read the stored result back, answering with the one just received: {e:#}");
                    StoredResult {
                        task_id: task_id.to_string(),
                        agent: entry.agent.clone(),
                        result,
                        received_at: format_rfc3339(now_unix()),
                        deliveries: entry.deliveries,
                    }
                }
            };
            if foreign {
                return Recorded::Foreign(stored);
            }
            if let Err(e) = inner.append(&LogLine::Delivered(task_id.to_string())) {
                // The result itself is on disk; only the count is not.
                tracing::error!(task_id, "cannot record the delivery count: {e:#}");
            }
            return Recorded::Again(stored);
        }
        let stored = StoredResult {
            task_id: task_id.to_string(),
            agent: agent.to_string(),
            result,
            received_at: format_rfc3339(now_unix()),
            deliveries: 1,
        };
        let line = LogLine::Stored(stored);
        let appended = inner.append(&line);
        let LogLine::Stored(stored) = line else {
            unreachable!("built just above")
        };
        match appended {
            Ok((offset, len)) => {
                inner.index.insert(
                    task_id.to_string(),
                    Indexed {
                        agent: agent.to_string(),
                        deliveries: 1,
                        offset,
                        len,
                    },
                );
                Recorded::First {
                    stored,
                    durable: true,
                }
            }
            Err(e) => {
                tracing::error!(
                    task_id,
                    "cannot store the result (it will not be acknowledged): {e:#}"
                );
                Recorded::First {
                    stored,
                    durable: false,
                }
            }
        }
    }
}

/// Reads a stored result's line back from the log, with the deliveries counted since.
fn read_stored(log: &File, entry: &Indexed) -> Result<StoredResult> {
    let mut text = vec![0u8; entry.len];
    log.read_exact_at(&mut text, entry.offset)
        .context("reading the results log")?;
    match serde_json::from_slice(&text).context("a stored result in the results log")? {
        LogLine::Stored(stored) => Ok(StoredResult {
            deliveries: entry.deliveries,
            ..stored
        }),
        LogLine::Delivered(_) => anyhow::bail!("the results log changed under the index"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_protocol::Status;

    #[test]
    fn first_wins_counts_deliveries_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path()).unwrap();
        assert!(store.get("t/../1").is_none());
        let first = store.record("a", "t/../1", RunResult::refused(Status::Rejected, "one"));
        assert!(matches!(first, Recorded::First { durable: true, .. }));
        assert_eq!(first.stored().deliveries, 1);
        let again = store.record("a", "t/../1", RunResult::refused(Status::Trap, "two"));
        assert!(matches!(again, Recorded::Again(_)));
        assert_eq!(again.stored().deliveries, 2);
        assert_eq!(again.stored().result.status, Status::Rejected, "first wins");
        // Another agent's result for the task id: neither kept nor counted.
        let foreign = store.record("b", "t/../1", RunResult::refused(Status::Trap, "three"));
        assert!(matches!(foreign, Recorded::Foreign(_)) && foreign.durable());
        assert_eq!(foreign.stored().agent, "a");
        assert_eq!(store.get("t/../1").unwrap().deliveries, 2);

        let path = store.path();
        assert_eq!(path, dir.path().join(RESULTS_LOG));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let reopened = ResultStore::open(dir.path()).unwrap();
        let stored = reopened.get("t/../1").unwrap();
        assert_eq!(stored.deliveries, 2);
        assert_eq!(stored.agent, "a");
        assert_eq!(stored.result.error.as_deref(), Some("one"));
        assert!(stored.received_at.ends_with('Z'));
    }

    #[test]
    fn results_are_read_back_from_the_log_and_a_line_cut_short_costs_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path()).unwrap();
        for i in 0..50 {
            let mut r = RunResult::refused(Status::Ok, format!("result {i}"));
            r.stdout = "x".repeat(i * 37);
            store.record("a", &format!("t{i}"), r);
        }
        store.record("a", "t7", RunResult::refused(Status::Trap, "again"));
        for i in 0..50 {
            let stored = store.get(&format!("t{i}")).unwrap();
            assert_eq!(
                stored.result.error.as_deref(),
                Some(format!("result {i}").as_str())
            );
            assert_eq!(stored.result.stdout.len(), i * 37);
            assert_eq!(stored.deliveries, if i == 7 { 2 } else { 1 });
        }
        drop(store);
        // A crash in the middle of an append leaves half a line at the end of the log.
        let path = dir.path().join(RESULTS_LOG);
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        log.write_all(br#"{"stored": {"task_id": "half", "ag"#)
            .unwrap();
        drop(log);
        let store = ResultStore::open(dir.path()).unwrap();
        assert!(store.get("half").is_none());
        store.record(
            "a",
            "after",
            RunResult::refused(Status::Ok, "after the cut"),
        );
        assert_eq!(
            store.get("after").unwrap().result.error.as_deref(),
            Some("after the cut")
        );
        drop(store);
        // The result appended after the damaged line is not glued to it: it survives.
        let store = ResultStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get("after").unwrap().result.error.as_deref(),
            Some("after the cut")
        );
        assert_eq!(store.get("t7").unwrap().deliveries, 2);
        assert_eq!(store.get("t49").unwrap().result.stdout.len(), 49 * 37);
    }

    #[test]
    fn unrecorded_refusals_are_recognised_and_skipped_when_read_back() {
        let mut busy = RunResult::refused(Status::Rejected, "busy");
        busy.reason = Some("busy".into());
        assert!(is_unrecorded_refusal(&busy));
        let mut unsigned = RunResult::refused(Status::Rejected, "unsigned");
        unsigned.reason = Some("unsigned".into());
        assert!(!is_unrecorded_refusal(&unsigned));
        let mut cancelled = RunResult::refused(Status::Cancelled, "busy");
        cancelled.reason = Some("busy".into());
        assert!(!is_unrecorded_refusal(&cancelled));

        // An older version stored such refusals as results: they are not read back.
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path()).unwrap();
        store.record("a", "t1", busy);
        store.record("a", "t2", unsigned);
        drop(store);
        let reopened = ResultStore::open(dir.path()).unwrap();
        assert!(reopened.get("t1").is_none());
        assert!(reopened.get("t2").is_some());
    }
}
