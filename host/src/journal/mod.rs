//! The agent's durable task journal: "nothing is lost".
//!
//! A task the agent accepted gets exactly one result back to the platform, across disconnects
//! and agent restarts (including `SIGKILL` and power loss). The journal is what makes that true:
//!
//! - **Accept before acknowledging.** [`Journal::accept`] records the task (phase
//!   [`TaskPhase::Queued`]) and returns only once the record is committed and fsynced; only
//!   then does the agent answer `accepted`. A task id already recorded is answered
//!   [`Accept::Seen`] with the stored record, and nothing is written: the journal is also the
//!   agent's dedup memory (for as long as records are retained, see below).
//! - **Start before executing.** [`Journal::start`] durably marks the task
//!   [`TaskPhase::Running`] before anything of it executes, so that after a crash the agent
//!   knows the task may have had effects.
//! - **Durable outbox.** [`Journal::finish`] durably stores the result ([`TaskPhase::Done`],
//!   not acknowledged); the agent sends it meanwhile (see `Agent::finish` for why a result sent
//!   before its commit completes is still reported exactly once). [`Journal::unacked`] lists every such result, in
//!   accept order, to be sent again after each reconnect, until the platform's `ack`
//!   ([`Journal::ack`]). The first result of a task wins; a second `finish` changes nothing.
//! - **Installed handlers** are kept here too ([`Journal::put_handler`]…), so they survive
//!   restarts.
//!
//! ## Recovery
//!
//! [`Journal::open`] returns a [`Recovery`]: the tasks recorded as `Queued` (accepted, never
//! started: they are to be run) and those recorded as `Running` (the agent stopped while they
//! ran: the agent reports them `interrupted`, or runs them again when they are idempotent).
//! Finished results that were not acknowledged need no recovery: they are in
//! [`Journal::unacked`].
//!
//! ## Storage and group commit
//!
//! The journal is one [redb] file (`<state>/journal.redb`, mode 0600 in a 0700 directory).
//! Values are JSON. Tasks are keyed by their accept sequence number, so that the tasks in
//! flight, which are the ones written, share the last pages of each B-tree (task ids come from
//! the platform and are random: keyed by id, every write landed on a different page, to be read
//! and written back on its own). Table `records` maps the number to the task's [`TaskRecord`]
//! as accepted, `results` to its result once it finishes, and `entries` to a small entry (task
//! id, phase, acked, finish time), which is all a start or an acknowledgement writes, and which
//! is loaded in memory at open (so lookups by task id need no read). No write copies what an
//! earlier one wrote: a finish does not rewrite the request. Table
//! `handlers` maps a command name to its [`HandlerRecord`]. A file of format version 1 (tables
//! keyed by task id) is migrated at open, in one transaction. A file that does not open (not a
//! redb file, failed integrity check, held by another process, a newer format) is an error: it
//! is never replaced.
//!
//! Commits are durable (redb's `Immediate` durability: the data is fsynced before the commit
//! returns), and one fsync per write could not sustain thousands of tasks a second with three
//! writes each. So all writes go through one thread, `bridge-journal`, which practices **group
//! commit**: it waits for one operation, takes every operation already waiting (up to
//! [`MAX_BATCH`]), applies them all in one write transaction, commits once, and only then
//! answers each caller. A caller waits for at most about one commit; under load the cost of a
//! commit is shared by every task in the batch. Two kinds of write need no fsync of their own:
//! acknowledgements (one lost in a crash only means that result is sent again) and results of
//! tasks that ran ([`Journal::finish_lazily`]). A batch of nothing else is held, at most
//! [`HOLD`], for the next batch, which commits anyway (under load, the next acceptance): a
//! transaction of its own would copy the same B-tree pages again. Held too long, it is
//! committed without fsync, and a durable commit follows within [`FLUSH_AFTER`] (or at close). If the commit fails, every operation in the
//! batch gets the error; an operation that fails on its own (an unknown task id) fails alone.
//! After an I/O failure redb refuses all further work on the open database, so the writer
//! closes and reopens it (redb repairs it), and discards records of tasks whose acceptance was
//! never confirmed to a caller.
//!
//! Reads of records ([`Journal::get`], [`Journal::unacked`]) use redb read transactions,
//! concurrently with the writer, plus an in-memory index of every record's summary (which also
//! answers [`Journal::counts`] and the fast path of a repeated task id). The installed handlers
//! are kept in memory as well ([`Journal::handler`] is asked for every task naming a command),
//! updated when a commit that changes them succeeds.
//! Acknowledgements are applied to that index at once and written in the next batch, without
//! anyone waiting for them: an acknowledgement lost in a crash only means a result is sent
//! once more, which the platform ignores.
//!
//! The last [`Journal`] clone to be dropped stops the writer thread after it has written every
//! operation already sent (acknowledgements included), and closes the database.
//!
//! ## Retention and limits
//!
//! Finished and acknowledged records are pruned when older than [`JournalConfig::retention`]
//! and, beyond [`JournalConfig::max_records`] of them, oldest first; queued, running and
//! unacknowledged records are never pruned. Pruning runs at open, every [`PRUNE_EVERY`]
//! accepted tasks, and on demand ([`Journal::prune`]). A pruned task id is forgotten: the same
//! id would be accepted again as new.
//!
//! What the journal holds (every task's record, result and entry, as encoded) is kept within
//! [`JournalConfig::max_bytes`] as it is written. A write that would pass it first **evicts**
//! acknowledged results, oldest first: their output (`output`, `stdout`, `stderr`) and their
//! request's input are dropped, and what deduplication needs stays (the task id, the status,
//! exit code and error, marked `evicted`); a repeated task id is then answered with that. So
//! acknowledged results never stand in the way of new work, whatever their size. Results the
//! platform has not acknowledged are never evicted: when they alone fill the journal,
//! [`Journal::accept`] refuses new tasks with [`JournalError::StorageFull`] until the platform
//! acknowledges some, and a task that finishes then keeps its result without its output (the
//! result is owed; its output cannot be had). Sizes are counted as the file stores them (a large
//! value takes a power of two of pages); the file, which also keeps pages for copy-on-write,
//! stays within about twice `max_bytes`, and past twice `max_bytes` it is compacted (at most
//! every 5 s: compacting holds off readers and the writer).
//!
//! [`Journal::accept`] also refuses new tasks when the filesystem holding the journal has less
//! than [`JournalConfig::min_free_bytes`] available. These checks happen before anything is
//! written, so that records already kept are never put at risk; a write that still fails for
//! lack of space is reported as `StorageFull` too. Starting, finishing and acknowledging
//! recorded tasks is never refused.
//!
//! [redb]: https://docs.rs/redb

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bridge_protocol::RunRequest;
use redb::{
    Database, ReadableDatabase, ReadableTable, Table, TableDefinition, TableError, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::outcome::RunResult;

/// The most operations the writer applies in one transaction.
pub const MAX_BATCH: usize = 1024;

/// The writer prunes after this many accepted tasks (and at open).
pub const PRUNE_EVERY: usize = 1000;

/// While the file is over twice [`JournalConfig::max_bytes`], how long after compacting it the
/// writer compacts it again.
const SIZE_RECHECK: Duration = Duration::from_secs(5);

/// How long a free-space measurement stands.
const SPACE_RECHECK: Duration = Duration::from_millis(250);

/// How long writes committed without fsync (acknowledgements, results of tasks that ran) wait
/// for the next durable commit before the writer makes one of its own.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// A verdict taken less than `ttl` ago, to reuse instead of measuring again.
fn held(
    verdict: &Option<(Instant, Result<(), String>)>,
    ttl: Duration,
) -> Option<Result<(), String>> {
    verdict
        .as_ref()
        .filter(|(at, _)| at.elapsed() < ttl)
        .map(|(_, v)| v.clone())
}

/// The file format version, stored in table `meta`. Version 1 keyed the task tables by task
/// id; a file in that format is migrated at open (see [`migrate_v1`]).
const SCHEMA_VERSION: u64 = 2;

/// redb's page cache; the journal is read little (records are mostly written once).
const CACHE_BYTES: usize = 1 << 20;

/// Accept sequence number → the task's [`TaskRecord`], as accepted (no result). Its `phase`
/// and `acked` may lag its entry's, which are authoritative. (A record migrated from version 1
/// may hold its result.)
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Accept sequence number → [`Finished`]: the task's result, written when it finishes.
const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
/// Accept sequence number → [`Entry`]: the task id and where the task is. Loaded in memory at
/// open.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const HANDLERS: TableDefinition<&str, &[u8]> = TableDefinition::new("handlers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Where the journal lives and how much it may keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// The redb file, e.g. `<state>/journal.redb`.
    pub path: PathBuf,
    /// Finished and acknowledged records older than this are pruned (default 7 days).
    pub retention: Duration,
    /// Beyond this many finished and acknowledged records, the oldest are pruned (default
    /// 20 000).
    pub max_records: usize,
    /// [`Journal::accept`] refuses new tasks when the filesystem holding `path` has less space
    /// available (to unprivileged users) than this (default 64 MiB).
    pub min_free_bytes: u64,
    /// What the journal may hold, in bytes (default 256 MiB): beyond it, acknowledged results
    /// lose their output, oldest first, and with none left to evict new tasks are refused.
    pub max_bytes: u64,
}

impl JournalConfig {
    /// The defaults (7 days, 20 000 records, 64 MiB free, 256 MiB file) for a journal at
    /// `path`.
    pub fn new(path: PathBuf) -> JournalConfig {
        JournalConfig {
            path,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_records: 20_000,
            min_free_bytes: 64 << 20,
            max_bytes: 256 << 20,
        }
    }
}

/// Where a recorded task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskPhase {
    /// Accepted, not started.
    Queued,
    /// Started: it may have had effects.
    Running,
    /// Finished: the result is stored.
    Done,
}

/// Everything the journal keeps about one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The full request (its `id`, the `run` message id, is what the result answers).
    pub request: RunRequest,
    /// Where the task is.
    pub phase: TaskPhase,
    /// The result, once [`TaskPhase::Done`].
    pub result: Option<RunResult>,
    /// The platform acknowledged the result.
    pub acked: bool,
    /// When the task was accepted (unix milliseconds).
    pub accepted_at_ms: u64,
    /// When the result was stored (unix milliseconds).
    pub finished_at_ms: Option<u64>,
}

/// An installed handler: a signed module bound to a command name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerRecord {
    /// The command name.
    pub name: String,
    /// SHA-256 (hex) of the module.
    pub module_sha256: String,
    /// The detached signature (base64), when the module has no embedded one.
    pub signature: Option<String>,
    /// When it was installed (RFC 3339, UTC).
    pub installed_at: String,
    /// The signing key's fingerprint, when known.
    pub key: Option<String>,
}

/// What [`Journal::accept`] did.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per task; unboxed for callers' ease
pub enum Accept {
    /// The task is now recorded (durably), in phase [`TaskPhase::Queued`].
    New,
    /// The task id was already recorded: here is its record. Nothing was written.
    Seen(TaskRecord),
}

/// The result of a task that runs while its acceptance is being written (see
/// [`Journal::accept_running_with`]): offered by the run if it ends first, looked at once by
/// the writer when it records the acceptance.
#[derive(Clone, Default)]
pub struct EarlyResult(Arc<Mutex<Early>>);

#[derive(Default)]
struct Early {
    result: Option<RunResult>,
    /// The writer recorded the acceptance: an offer now comes too late.
    looked: bool,
    /// The writer wrote `result` with the acceptance.
    written: bool,
}

impl EarlyResult {
    /// Offers the finished run's result, to be written with the acceptance. Gives it back
    /// (`Some`) if the writer already recorded the acceptance without it: it is then stored
    /// as usual.
    pub fn offer(&self, result: RunResult) -> Option<RunResult> {
        let mut slot = lock(&self.0);
        if slot.looked {
            return Some(result);
        }
        slot.result = Some(result);
        None
    }

    /// Once the acceptance is committed ([`Accept::New`]): the offered result, if any, and
    /// whether it was written with the acceptance.
    pub fn take(&self) -> Option<(RunResult, bool)> {
        let mut slot = lock(&self.0);
        let written = slot.written;
        slot.result.take().map(|r| (r, written))
    }
}

/// Why the journal could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Not enough space: the filesystem is (nearly) full or the journal reached its size limit.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// Any other failure (redb, I/O, an unknown task id…), with its message.
    #[error("journal: {0}")]
    Io(String),
}

/// What [`Journal::open`] found unfinished, each list in accept order.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Recorded as queued: accepted and never started. To be run.
    pub queued: Vec<TaskRecord>,
    /// Recorded as running: the agent stopped while the task ran.
    pub running: Vec<TaskRecord>,
}

/// The journal: a cheap handle (clones share one database and one writer thread).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// The tables of format version 1, keyed by task id (random, from the platform: every write
/// landed on a different B-tree page). Read only to migrate.
mod v1 {
    use redb::TableDefinition;

    /// Task id → [`super::TaskRecord`].
    pub const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
    /// Task id → [`super::Meta`].
    pub const INDEX: TableDefinition<&str, &[u8]> = TableDefinition::new("task_index");
}

/// Where a task is: its entry in table `entries` (keyed by `seq`), and in the in-memory mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// Accept order.
    seq: u64,
    phase: TaskPhase,
    acked: bool,
    finished_at_ms: Option<u64>,
    /// What the task's values (record, result, entry) take in the file, as written (0 when
    /// read from a format version 1 entry, which did not have it: measured at open).
    #[serde(default)]
    bytes: u64,
    /// The result's output was dropped (evicted once acknowledged, or never stored for lack
    /// of room), and the record's input with it.
    #[serde(default)]
    evicted: bool,
}

impl Meta {
    fn of(seq: u64, record: &TaskRecord) -> Meta {
        Meta {
            seq,
            phase: record.phase,
            acked: record.acked,
            finished_at_ms: record.finished_at_ms,
            bytes: 0,
            evicted: false,
        }
    }

    fn in_outbox(&self) -> bool {
        self.phase == TaskPhase::Done && !self.acked
    }

    /// Acknowledged, with an output that can still be evicted to make room.
    fn evictable(&self) -> bool {
        self.phase == TaskPhase::Done && self.acked && !self.evicted
    }

    /// Brings a record read from table `records` up to date: starts and acknowledgements
    /// are written to the entry alone. Both only move forward, so the later of the two wins.
    fn overlay(&self, record: &mut TaskRecord) {
        record.phase = record.phase.max(self.phase);
        record.acked |= self.acked;
    }
}

/// A value of table `results`.
#[derive(Serialize, Deserialize)]
struct Finished<R> {
    finished_at_ms: u64,
    result: R,
}

/// A value of table `results`, encoded.
fn encode_result(id: &str, finished_at_ms: u64, result: &RunResult) -> Res<Vec<u8>> {
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
fn assemble(
    id: &str,
    meta: &Meta,
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
    meta.overlay(&mut r);
    Ok(r)
}

/// A value of table `entries`: a [`Meta`] without its `seq` (the key), with the task id.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    id: Cow<'a, str>,
    phase: TaskPhase,
    acked: bool,
    finished_at_ms: Option<u64>,
    /// 0 in entries written before sizes were kept: measured at open.
    #[serde(default)]
    bytes: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    evicted: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl<'a> Entry<'a> {
    fn of(id: &'a str, meta: &Meta) -> Entry<'a> {
        Entry {
            id: Cow::Borrowed(id),
            phase: meta.phase,
            acked: meta.acked,
            finished_at_ms: meta.finished_at_ms,
            bytes: meta.bytes,
            evicted: meta.evicted,
        }
    }

    fn meta(&self, seq: u64) -> Meta {
        Meta {
            seq,
            phase: self.phase,
            acked: self.acked,
            finished_at_ms: self.finished_at_ms,
            bytes: self.bytes,
            evicted: self.evicted,
        }
    }
}

/// What an entry takes beside the id: the encoded fields, rounded up.
const ENTRY_BYTES: u64 = 128;

/// What a value of `len` bytes takes in the file: small values share B-tree pages, a large one
/// gets a region of its own, a power of two of pages.
fn stored(len: usize) -> u64 {
    const PAGE: usize = 4096;
    if len <= PAGE / 2 {
        len as u64
    } else {
        (len + 64).next_power_of_two().max(PAGE) as u64
    }
}

/// The summary of every committed record (plus acknowledgements not yet written), and the
/// installed handlers (looked up for every task that names a command).
#[derive(Default)]
struct Mirror {
    tasks: HashMap<Arc<str>, Meta>,
    /// Done and not acknowledged, by accept order.
    outbox: BTreeMap<u64, Arc<str>>,
    /// Acknowledged with an output still held, by accept order: what is evicted first when
    /// the journal needs room.
    evictable: BTreeMap<u64, Arc<str>>,
    /// The sum of every task's [`Meta::bytes`]: what the journal holds, measured against
    /// [`JournalConfig::max_bytes`].
    bytes: u64,
    handlers: BTreeMap<String, HandlerRecord>,
}

impl Mirror {
    fn set(&mut self, id: Arc<str>, meta: Meta) {
        if let Some(old) = self.tasks.insert(id.clone(), meta) {
            self.outbox.remove(&old.seq);
            self.evictable.remove(&old.seq);
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        self.bytes += meta.bytes;
        if meta.in_outbox() {
            self.outbox.insert(meta.seq, id);
        } else if meta.evictable() {
            self.evictable.insert(meta.seq, id);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.tasks.remove(id) {
            self.outbox.remove(&old.seq);
            self.evictable.remove(&old.seq);
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
    }
}

/// What a committed batch changes in the mirror, in order.
enum Change {
    Set(Arc<str>, Meta),
    Remove(Arc<str>),
    PutHandler(HandlerRecord),
    RemoveHandler(String),
}

struct Shared {
    config: JournalConfig,
    /// `None` only while the writer reopens the database after an I/O failure (or if that
    /// failed). Readers hold the read lock for the whole of their read transaction, so that
    /// the writer, holding the write lock, knows none is alive (compaction, reopening).
    db: RwLock<Option<Database>>,
    mirror: Mutex<Mirror>,
    commits: AtomicU64,
}

struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued, then return.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the journal writer thread panicked");
            }
        }
    }
}

type Res<T> = Result<T, JournalError>;

enum Op {
    Accept {
        request: Box<RunRequest>,
        running: bool,
        /// Where the task's result may be by the time the acceptance is written.
        early: Option<EarlyResult>,
        reply: oneshot::Sender<Res<Accept>>,
    },
    Start {
        task_id: String,
        reply: oneshot::Sender<Res<()>>,
    },
    Finish {
        task_id: String,
        result: Box<RunResult>,
        /// Commit with fsync before answering (otherwise with the next durable commit).
        durable: bool,
        reply: oneshot::Sender<Res<()>>,
    },
    Ack {
        task_ids: Vec<String>,
    },
    PutHandler {
        handler: HandlerRecord,
        reply: oneshot::Sender<Res<()>>,
    },
    RemoveHandler {
        name: String,
        reply: oneshot::Sender<Res<bool>>,
    },
    Prune {
        reply: mpsc::Sender<Res<usize>>,
    },
}

/// An operation's reply channel with the answer it gets if its batch commits.
enum Answer {
    Accept(oneshot::Sender<Res<Accept>>, Box<Res<Accept>>),
    Unit(oneshot::Sender<Res<()>>, Res<()>),
    Bool(oneshot::Sender<Res<bool>>, Res<bool>),
    Count(mpsc::Sender<Res<usize>>, Res<usize>),
    Nothing,
}

impl Answer {
    /// The answer of an operation that was not applied (its batch failed first).
    fn unapplied(op: Op) -> Answer {
        fn e<T>() -> Res<T> {
            Err(JournalError::Io("the batch was abandoned".into()))
        }
        match op {
            Op::Accept { reply, .. } => Answer::Accept(reply, Box::new(e())),
            Op::Start { reply, .. } | Op::Finish { reply, .. } | Op::PutHandler { reply, .. } => {
                Answer::Unit(reply, e())
            }
            Op::RemoveHandler { reply, .. } => Answer::Bool(reply, e()),
            Op::Prune { reply } => Answer::Count(reply, e()),
            Op::Ack { .. } => Answer::Nothing,
        }
    }

    /// Sends the answer, or `failure` (the batch's) instead.
    fn send(self, failure: Option<&JournalError>) {
        fn pick<T>(r: Res<T>, failure: Option<&JournalError>) -> Res<T> {
            match failure {
                Some(e) => Err(e.clone()),
                None => r,
            }
        }
        // A caller that stopped waiting is no one's concern.
        match self {
            Answer::Accept(tx, r) => {
                let _ = tx.send(pick(*r, failure));
            }
            Answer::Unit(tx, r) => {
                let _ = tx.send(pick(r, failure));
            }
            Answer::Bool(tx, r) => {
                let _ = tx.send(pick(r, failure));
            }
            Answer::Count(tx, r) => {
                let _ = tx.send(pick(r, failure));
            }
            Answer::Nothing => {}
        }
    }
}

/// How an operation inside a transaction failed: alone (`Logic`), or taking the whole
/// transaction with it (`Storage`).
enum Fail {
    Logic(JournalError),
    Storage(redb::Error),
}

macro_rules! storage_fail {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Fail {
                Fail::Storage(e.into())
            }
        }
    )*};
}
storage_fail!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

/// Splits an operation's outcome into its answer and the transaction's failure, if any.
fn split<T>(r: Result<T, Fail>) -> (Res<T>, Option<redb::Error>) {
    match r {
        Ok(v) => (Ok(v), None),
        Err(Fail::Logic(e)) => (Err(e), None),
        Err(Fail::Storage(e)) => (Err(JournalError::Io(e.to_string())), Some(e)),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether an I/O error means "no space" (ENOSPC, EDQUOT, EFBIG).
fn io_is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
        )
}

/// A redb error as a [`JournalError`], and whether the database must be reopened (redb fails
/// every later operation after an I/O error).
fn classify(e: redb::Error) -> (JournalError, bool) {
    match e {
        redb::Error::Io(io) => {
            let msg = io.to_string();
            if io_is_full(&io) {
                (JournalError::StorageFull(msg), true)
            } else {
                (JournalError::Io(msg), true)
            }
        }
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
            (JournalError::Io(e.to_string()), true)
        }
        other => (JournalError::Io(other.to_string()), false),
    }
}

fn db_error(e: impl Into<redb::Error>) -> JournalError {
    classify(e.into()).0
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Res<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| JournalError::Io(format!("the stored {what} {key:?} does not decode: {e}")))
}

fn encode<T: Serialize>(what: &str, key: &str, value: &T) -> Res<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| JournalError::Io(format!("the {what} {key:?} does not encode: {e}")))
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statvfs` is plain old data (all-zero is a valid value), `c` is a valid
    // NUL-terminated string and `st` a valid out pointer for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

/// The journal file's tables, open in a write transaction.
struct Tables<'t> {
    records: Table<'t, u64, &'static [u8]>,
    results: Table<'t, u64, &'static [u8]>,
    entries: Table<'t, u64, &'static [u8]>,
    handlers: Table<'t, &'static str, &'static [u8]>,
    /// The sequence numbers of tasks committed before this transaction.
    mirror: &'t Mutex<Mirror>,
    /// The sequence numbers of tasks accepted in this transaction.
    fresh: HashMap<Arc<str>, u64>,
    /// Bytes this transaction added to and freed from the mirror's [`Mirror::bytes`].
    added: u64,
    freed: u64,
    /// Tasks evicted in this transaction (the mirror still lists them as evictable).
    evicted: std::collections::HashSet<u64>,
}

impl<'t> Tables<'t> {
    fn open(
        txn: &'t WriteTransaction,
        mirror: &'t Mutex<Mirror>,
    ) -> Result<Tables<'t>, TableError> {
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            results: txn.open_table(RESULTS)?,
            entries: txn.open_table(ENTRIES)?,
            handlers: txn.open_table(HANDLERS)?,
            mirror,
            fresh: HashMap::new(),
            added: 0,
            freed: 0,
            evicted: Default::default(),
        })
    }

    /// What the journal holds with this transaction's writes.
    fn held(&self) -> u64 {
        (lock(self.mirror).bytes + self.added).saturating_sub(self.freed)
    }

    /// A task's entry, this transaction's writes included (`None`: not recorded, or removed).
    fn entry(&self, id: &str) -> Result<Option<Meta>, Fail> {
        let seq = match self.fresh.get(id) {
            Some(&seq) => seq,
            None => match lock(self.mirror).tasks.get(id) {
                Some(m) => m.seq,
                None => return Ok(None),
            },
        };
        let Some(v) = self.entries.get(seq)? else {
            return Ok(None);
        };
        let entry: Entry = decode("index entry", id, v.value()).map_err(Fail::Logic)?;
        if entry.id != id {
            return Err(Fail::Logic(JournalError::Io(format!(
                "index entry {seq} is task {:?}, not {id:?}",
                entry.id
            ))));
        }
        let mut meta = entry.meta(seq);
        if meta.bytes == 0 {
            // Written before sizes were kept: the size measured at open.
            meta.bytes = lock(self.mirror).tasks.get(id).map_or(0, |m| m.bytes);
        }
        Ok(Some(meta))
    }

    /// A task's record and entry, this transaction's writes included.
    fn load(&self, id: &str) -> Result<Option<(TaskRecord, Meta)>, Fail> {
        let Some(meta) = self.entry(id)? else {
            return Ok(None);
        };
        let Some(v) = self.records.get(meta.seq)? else {
            return Err(Fail::Logic(JournalError::Io(format!(
                "task {id:?} has an index entry but no record"
            ))));
        };
        let finished = self.results.get(meta.seq)?;
        let record = assemble(id, &meta, v.value(), finished.as_ref().map(|f| f.value()))
            .map_err(Fail::Logic)?;
        Ok(Some((record, meta)))
    }

    /// Writes a task's record (as accepted, already encoded) and its entry; counts the bytes
    /// into `meta` (a new task's, which holds nothing yet).
    fn store(&mut self, id: &str, record: &[u8], meta: &mut Meta) -> Result<(), Fail> {
        self.records.insert(meta.seq, record)?;
        meta.bytes = stored(record.len()) + id.len() as u64 + ENTRY_BYTES;
        self.added += meta.bytes;
        self.store_entry(id, meta)
    }

    /// Writes a task's result (already encoded, see [`encode_result`]) and its entry, marked
    /// done; counts the bytes into `meta`.
    fn store_result(&mut self, id: &str, finished: &[u8], meta: &mut Meta) -> Result<(), Fail> {
        self.results.insert(meta.seq, finished)?;
        meta.bytes += stored(finished.len());
        self.added += stored(finished.len());
        self.store_entry(id, meta)
    }

    /// Drops the output of an acknowledged task (its result's output, its request's input):
    /// what deduplication needs stays (the task id, the status, the exit code, the error).
    fn evict(&mut self, id: &str, changes: &mut Vec<Change>) -> Result<(), Fail> {
        let Some((mut stub, meta)) = self.load(id)? else {
            return Ok(());
        };
        if !meta.evictable() || !self.evicted.insert(meta.seq) {
            return Ok(());
        }
        let result = stub.result.take();
        stub.request.input = serde_json::Value::Null;
        stub.request.args.clear();
        stub.request.signature = None;
        let r = encode("task", id, &stub).map_err(Fail::Logic)?;
        self.records.insert(meta.seq, r.as_slice())?;
        let mut bytes = stored(r.len()) + id.len() as u64 + ENTRY_BYTES;
        if let Some(result) = result {
            let finished_at = meta.finished_at_ms.unwrap_or_default();
            let f =
                encode_result(id, finished_at, &result.without_output()).map_err(Fail::Logic)?;
            self.results.insert(meta.seq, f.as_slice())?;
            bytes += stored(f.len());
        }
        self.count_change(meta.bytes, bytes);
        let meta = Meta {
            bytes,
            evicted: true,
            ..meta
        };
        self.store_entry(id, &meta)?;
        changes.push(Change::Set(Arc::from(id), meta));
        Ok(())
    }

    /// A task's values went from `before` to `after` bytes.
    fn count_change(&mut self, before: u64, after: u64) {
        if after >= before {
            self.added += after - before;
        } else {
            self.freed += before - after;
        }
    }

    /// Writes a task's entry alone (a start, an acknowledgement).
    fn store_entry(&mut self, id: &str, meta: &Meta) -> Result<(), Fail> {
        let e = encode("index entry", id, &Entry::of(id, meta)).map_err(Fail::Logic)?;
        self.entries.insert(meta.seq, e.as_slice())?;
        Ok(())
    }

    fn remove(&mut self, seq: u64, bytes: u64) -> Result<(), Fail> {
        self.freed += bytes;
        self.records.remove(seq)?;
        self.results.remove(seq)?;
        self.entries.remove(seq)?;
        Ok(())
    }
}

/// The database, opened (or created in an empty file) with an integrity check. Never replaces
/// a file it cannot open.
fn open_db(path: &Path) -> Res<Database> {
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

/// Creates the tables if needed and checks the schema version; migrates a version 1 file.
fn init_schema(db: &Database, path: &Path) -> Res<()> {
    let txn = db.begin_write().map_err(db_error)?;
    let mut migrated = None;
    {
        let mut meta = txn.open_table(META).map_err(db_error)?;
        let version = meta.get("schema").map_err(db_error)?.map(|v| v.value());
        match version {
            None => {}
            Some(1) => {
                migrated = Some(migrate_v1(&txn).map_err(|e| match e {
                    Fail::Logic(e) => e,
                    Fail::Storage(e) => db_error(e),
                })?)
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(JournalError::Io(format!(
                    "the journal {} has format version {v}; this agent reads versions 1 and \
                     {SCHEMA_VERSION}",
                    path.display()
                )))
            }
        }
        if version != Some(SCHEMA_VERSION) {
            meta.insert("schema", SCHEMA_VERSION).map_err(db_error)?;
        }
        Tables::open(&txn, &Mutex::default()).map_err(db_error)?;
    }
    txn.commit().map_err(db_error)?;
    if let Some(n) = migrated {
        tracing::info!(
            "migrated the journal {} from format version 1 to {SCHEMA_VERSION} ({n} task records)",
            path.display()
        );
    }
    Ok(())
}

/// Moves every task of a version 1 file (tables keyed by task id) into the tables keyed by
/// accept sequence number, in the caller's transaction, and drops the old tables. Returns how
/// many tasks moved.
fn migrate_v1(txn: &WriteTransaction) -> Result<usize, Fail> {
    let mut moved = 0;
    {
        let tasks = txn.open_table(v1::TASKS)?;
        let index = txn.open_table(v1::INDEX)?;
        let mut records = txn.open_table(RECORDS)?;
        let mut entries = txn.open_table(ENTRIES)?;
        for item in index.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let meta: Meta = decode("index entry", id, v.value()).map_err(Fail::Logic)?;
            let Some(record) = tasks.get(id)? else {
                return Err(Fail::Logic(JournalError::Io(format!(
                    "migrating the journal: task {id:?} is indexed but has no record"
                ))));
            };
            if entries.get(meta.seq)?.is_some() {
                return Err(Fail::Logic(JournalError::Io(format!(
                    "migrating the journal: two tasks have sequence number {}",
                    meta.seq
                ))));
            }
            let entry = encode("index entry", id, &Entry::of(id, &meta)).map_err(Fail::Logic)?;
            records.insert(meta.seq, record.value())?;
            entries.insert(meta.seq, entry.as_slice())?;
            moved += 1;
        }
    }
    txn.delete_table(v1::TASKS)?;
    txn.delete_table(v1::INDEX)?;
    Ok(moved)
}

/// The index of every record and the installed handlers, and the next sequence number.
fn load_index(db: &Database) -> Res<(Mirror, u64)> {
    let txn = db.begin_read().map_err(db_error)?;
    let mut mirror = Mirror::default();
    for item in txn
        .open_table(HANDLERS)
        .map_err(db_error)?
        .iter()
        .map_err(db_error)?
    {
        let (k, v) = item.map_err(db_error)?;
        match decode::<HandlerRecord>("handler", k.value(), v.value()) {
            Ok(h) => {
                mirror.handlers.insert(h.name.clone(), h);
            }
            // Left in the file, unusable: the platform sees it missing and can install it again.
            Err(e) => tracing::error!("{e}"),
        }
    }
    let entries = txn.open_table(ENTRIES).map_err(db_error)?;
    let records = txn.open_table(RECORDS).map_err(db_error)?;
    let results = txn.open_table(RESULTS).map_err(db_error)?;
    let mut next_seq = 0;
    for item in entries.iter().map_err(db_error)? {
        let (k, v) = item.map_err(db_error)?;
        let seq = k.value();
        let entry: Entry = decode("index entry", &seq.to_string(), v.value())?;
        next_seq = seq + 1;
        let mut meta = entry.meta(seq);
        if meta.bytes == 0 {
            // Written before sizes were kept: measured once, here.
            let len =
                |v: Option<redb::AccessGuard<'_, &[u8]>>| v.map_or(0, |v| stored(v.value().len()));
            meta.bytes = len(records.get(seq).map_err(db_error)?)
                + len(results.get(seq).map_err(db_error)?)
                + entry.id.len() as u64
                + ENTRY_BYTES;
        }
        mirror.set(Arc::from(entry.id.as_ref()), meta);
    }
    Ok((mirror, next_seq))
}

/// The full records of the unfinished tasks, in accept order.
fn load_recovery(db: &Database, mirror: &Mirror) -> Res<Recovery> {
    let mut unfinished: Vec<(&Meta, &Arc<str>)> = mirror
        .tasks
        .iter()
        .filter(|(_, m)| m.phase != TaskPhase::Done)
        .map(|(id, m)| (m, id))
        .collect();
    unfinished.sort_unstable_by_key(|(m, _)| m.seq);
    let txn = db.begin_read().map_err(db_error)?;
    let records = txn.open_table(RECORDS).map_err(db_error)?;
    let mut recovery = Recovery::default();
    for (meta, id) in unfinished {
        let Some(v) = records.get(meta.seq).map_err(db_error)? else {
            return Err(JournalError::Io(format!(
                "task {id:?} is indexed but has no record"
            )));
        };
        let mut record: TaskRecord = decode("task", id, v.value())?;
        meta.overlay(&mut record);
        match record.phase {
            TaskPhase::Queued => recovery.queued.push(record),
            TaskPhase::Running => recovery.running.push(record),
            TaskPhase::Done => {}
        }
    }
    Ok(recovery)
}

/// How long writes that need no fsync (acknowledgements, results of tasks that ran) may wait
/// for a batch that commits anyway before they are committed on their own.
pub const HOLD: Duration = Duration::from_millis(2);

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    next_seq: u64,
    accepts_since_prune: usize,
    /// While the file is over `max_bytes`: when it was last checked, and the verdict.
    size_verdict: Option<(Instant, Result<(), String>)>,
    /// The last free-space and size verdict, reused for [`SPACE_RECHECK`].
    space_verdict: Option<(Instant, Result<(), String>)>,
    needs_reopen: bool,
    /// A commit made without fsync (or held acknowledgements) waits for a durable one.
    unflushed: bool,
    /// Acknowledgements received alone, applied with the next transaction.
    held: Vec<Op>,
    /// When the oldest held write arrived.
    held_since: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            // `recv` fails only once every sender is gone and the queue is empty.
            let wait = match self.held_since {
                Some(since) => Some(HOLD.saturating_sub(since.elapsed())),
                None => self.unflushed.then_some(FLUSH_AFTER),
            };
            let first = if let Some(wait) = wait {
                match rx.recv_timeout(wait) {
                    Ok(op) => op,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if self.held_since.is_some() {
                            self.process(Vec::new(), false);
                        } else {
                            self.flush();
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                }
            };
            let mut ops = vec![first];
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            // Writes that need no fsync, alone, wait for the next batch, at most [`HOLD`]: a
            // transaction of their own would copy the same B-tree pages the next task's
            // transaction copies again.
            if ops
                .iter()
                .all(|op| matches!(op, Op::Ack { .. } | Op::Finish { durable: false, .. }))
            {
                self.held.extend(ops);
                self.held_since.get_or_insert_with(Instant::now);
                continue;
            }
            self.process(ops, false);
        }
        // Writes committed without fsync become durable with the next durable commit: make one
        // before the database closes.
        self.flush();
    }

    /// A durable commit of the held acknowledgements, or an empty one: what earlier commits
    /// without fsync wrote reaches the disk.
    fn flush(&mut self) {
        if !self.held.is_empty() {
            return self.process(Vec::new(), true);
        }
        let guard = read_lock(&self.shared.db);
        let Some(db) = guard.as_ref() else {
            // Closed after an I/O failure: nothing left to flush; the next batch reopens it.
            self.unflushed = false;
            return;
        };
        let committed = db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|t| t.commit().map_err(redb::Error::from));
        match committed {
            Ok(()) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.unflushed = false;
            }
            Err(e) => tracing::warn!("the journal's flush commit failed: {e}"),
        }
    }

    /// Applies the held acknowledgements and `ops` in one transaction, commits (with fsync if
    /// `durable` or if an operation needs it), answers.
    fn process(&mut self, mut ops: Vec<Op>, durable: bool) {
        if !self.held.is_empty() {
            self.held_since = None;
            let mut held = std::mem::take(&mut self.held);
            held.append(&mut ops);
            ops = held;
        }
        if self.needs_reopen {
            if let Err(e) = self.reopen() {
                tracing::error!("reopening the journal after an I/O failure: {e}");
                for op in ops {
                    Answer::unapplied(op).send(Some(&e));
                }
                return;
            }
        }
        let space = if ops.iter().any(|op| matches!(op, Op::Accept { .. })) {
            self.check_space()
        } else {
            Ok(())
        };
        let now = now_ms();
        let shared = self.shared.clone();
        let guard = read_lock(&shared.db);
        let Some(db) = guard.as_ref() else {
            let e = JournalError::Io("the journal database is closed after an I/O failure".into());
            self.needs_reopen = true;
            for op in ops {
                Answer::unapplied(op).send(Some(&e));
            }
            return;
        };
        // Some writes need not reach the disk at once; they become durable with the next
        // durable commit, at most [`FLUSH_AFTER`] later:
        // - an acknowledgement lost in a crash only makes the agent send that result again,
        //   which the platform expects;
        // - a result lost in a crash leaves its task recorded as running, which the restarted
        //   agent reports `interrupted`; the result itself was sent as it was written, and the
        //   platform keeps the first result it gets for a task.
        let lazy = !durable
            && ops
                .iter()
                .all(|op| matches!(op, Op::Ack { .. } | Op::Finish { durable: false, .. }));
        let txn = match db.begin_write() {
            Ok(mut txn) => {
                if lazy {
                    let _ = txn.set_durability(redb::Durability::None);
                }
                txn
            }
            Err(e) => {
                let (e, fatal) = classify(e.into());
                self.needs_reopen |= fatal;
                for op in ops {
                    Answer::unapplied(op).send(Some(&e));
                }
                return;
            }
        };
        let mut answers = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        let mut failure: Option<redb::Error> = None;
        let mut ops = ops.into_iter();
        match Tables::open(&txn, &shared.mirror) {
            Ok(mut t) => {
                for op in ops.by_ref() {
                    let (answer, storage) = self.apply(&mut t, op, now, &space, &mut changes);
                    answers.push(answer);
                    if storage.is_some() {
                        failure = storage;
                        break;
                    }
                }
                if failure.is_none() && self.accepts_since_prune >= PRUNE_EVERY {
                    match self.prune_in(&mut t, now, &mut changes) {
                        Ok(_) => self.accepts_since_prune = 0,
                        Err(Fail::Storage(e)) => failure = Some(e),
                        Err(Fail::Logic(e)) => tracing::warn!("pruning the journal: {e}"),
                    }
                }
            }
            Err(e) => failure = Some(e.into()),
        }
        answers.extend(ops.map(Answer::unapplied));
        let outcome = match failure {
            Some(e) => {
                let _ = txn.abort();
                Err(e)
            }
            None => txn.commit().map_err(redb::Error::from),
        };
        drop(guard);
        match outcome {
            Ok(()) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.unflushed = lazy;
                self.apply_changes(changes);
                for answer in answers {
                    answer.send(None);
                }
            }
            Err(e) => {
                let (e, fatal) = classify(e);
                tracing::error!("a journal write failed: {e}");
                self.needs_reopen |= fatal;
                for answer in answers {
                    answer.send(Some(&e));
                }
            }
        }
    }

    fn apply_changes(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut mirror = lock(&self.shared.mirror);
        for change in changes {
            match change {
                Change::Set(id, meta) => mirror.set(id, meta),
                Change::Remove(id) => mirror.remove(&id),
                Change::PutHandler(h) => {
                    mirror.handlers.insert(h.name.clone(), h);
                }
                Change::RemoveHandler(name) => {
                    mirror.handlers.remove(&name);
                }
            }
        }
    }

    /// Applies one operation; returns its answer, and the storage error that fails the whole
    /// transaction, if any.
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        op: Op,
        now: u64,
        space: &Result<(), String>,
        changes: &mut Vec<Change>,
    ) -> (Answer, Option<redb::Error>) {
        match op {
            Op::Accept {
                request,
                running,
                early,
                reply,
            } => {
                let (r, e) = split(self.accept_in(
                    t,
                    &request,
                    running,
                    early.as_ref(),
                    now,
                    space,
                    changes,
                ));
                (Answer::Accept(reply, Box::new(r)), e)
            }
            Op::Start { task_id, reply } => {
                let (r, e) = split(start_in(t, &task_id, changes));
                (Answer::Unit(reply, r), e)
            }
            Op::Finish {
                task_id,
                result,
                reply,
                ..
            } => {
                let (r, e) = split(finish_in(
                    t,
                    &task_id,
                    *result,
                    now,
                    self.shared.config.max_bytes,
                    changes,
                ));
                (Answer::Unit(reply, r), e)
            }
            Op::Ack { task_ids } => {
                let (r, e) = split(ack_in(t, &task_ids, changes));
                if let Err(err) = r {
                    tracing::warn!("recording acknowledgements: {err}");
                }
                (Answer::Nothing, e)
            }
            Op::PutHandler { handler, reply } => {
                let r = encode("handler", &handler.name, &handler)
                    .map_err(Fail::Logic)
                    .and_then(|bytes| {
                        t.handlers.insert(handler.name.as_str(), bytes.as_slice())?;
                        Ok(())
                    });
                if r.is_ok() {
                    changes.push(Change::PutHandler(handler));
                }
                let (r, e) = split(r);
                (Answer::Unit(reply, r), e)
            }
            Op::RemoveHandler { name, reply } => {
                let r = t
                    .handlers
                    .remove(name.as_str())
                    .map(|old| old.is_some())
                    .map_err(Fail::from);
                if r.is_ok() {
                    changes.push(Change::RemoveHandler(name));
                }
                let (r, e) = split(r);
                (Answer::Bool(reply, r), e)
            }
            Op::Prune { reply } => {
                let (r, e) = split(self.prune_in(t, now, changes));
                (Answer::Count(reply, r), e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_in(
        &mut self,
        t: &mut Tables<'_>,
        request: &RunRequest,
        running: bool,
        early: Option<&EarlyResult>,
        now: u64,
        space: &Result<(), String>,
        changes: &mut Vec<Change>,
    ) -> Result<Accept, Fail> {
        let id = request.task_id.as_str();
        // Authoritative: sees this batch's writes too.
        if let Some((record, _)) = t.load(id)? {
            return Ok(Accept::Seen(record));
        }
        if let Err(why) = space {
            return Err(Fail::Logic(JournalError::StorageFull(why.clone())));
        }
        let record = TaskRecord {
            request: request.clone(),
            phase: if running {
                TaskPhase::Running
            } else {
                TaskPhase::Queued
            },
            result: None,
            acked: false,
            accepted_at_ms: now,
            finished_at_ms: None,
        };
        let mut meta = Meta::of(self.next_seq, &record);
        let encoded = encode("task", id, &record).map_err(Fail::Logic)?;
        let need = stored(encoded.len()) + id.len() as u64 + ENTRY_BYTES;
        // New work is taken up to 7/8 of the limit: the rest is for the results of the tasks
        // already accepted (one that still does not fit is kept without its output).
        let max_bytes = self.shared.config.max_bytes;
        let max_bytes = max_bytes - max_bytes / 8;
        if !make_room(t, max_bytes, need, changes)? {
            return Err(Fail::Logic(JournalError::StorageFull(format!(
                "the journal {} holds {} bytes, most of them results the platform has not \
                 acknowledged yet; new tasks are taken up to {max_bytes} bytes (7/8 of its limit)",
                self.shared.config.path.display(),
                t.held()
            ))));
        }
        match early.map(|e| lock(&e.0)) {
            Some(mut slot) => {
                // Looked at once: a result offered later goes the usual way (`finish`).
                slot.looked = true;
                let result = match &slot.result {
                    Some(result) => Some(encode_result(id, now, result).map_err(Fail::Logic)?),
                    None => None,
                };
                // Written with the acceptance only if it fits; otherwise it goes the usual way.
                let fits = match &result {
                    Some(f) => make_room(t, max_bytes, need + stored(f.len()), changes)?,
                    None => false,
                };
                t.store(id, &encoded, &mut meta)?;
                if let (Some(f), true) = (result, fits) {
                    meta.phase = TaskPhase::Done;
                    meta.finished_at_ms = Some(now);
                    t.store_result(id, &f, &mut meta)?;
                    slot.written = true;
                }
            }
            None => t.store(id, &encoded, &mut meta)?,
        }
        self.next_seq += 1;
        self.accepts_since_prune += 1;
        let id: Arc<str> = Arc::from(id);
        t.fresh.insert(id.clone(), meta.seq);
        changes.push(Change::Set(id, meta));
        Ok(Accept::New)
    }

    /// Removes finished and acknowledged records per the retention settings.
    fn prune_in(
        &self,
        t: &mut Tables<'_>,
        now: u64,
        changes: &mut Vec<Change>,
    ) -> Result<usize, Fail> {
        let config = &self.shared.config;
        let retention_ms = u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX);
        // The mirror may lag this batch's own writes; it never shows a record as finished and
        // acknowledged that is not (on disk, or about to be in this very transaction).
        let mut finished: Vec<(u64, Arc<str>, u64)> = lock(t.mirror)
            .tasks
            .iter()
            .filter(|(_, m)| m.phase == TaskPhase::Done && m.acked)
            .map(|(id, m)| (m.seq, id.clone(), m.finished_at_ms.unwrap_or(0)))
            .collect();
        finished.sort_unstable_by_key(|f| f.0);
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for (seq, id, finished_at) in finished {
            if now.saturating_sub(finished_at) >= retention_ms {
                doomed.push((seq, id));
            } else {
                kept.push((seq, id));
            }
        }
        if kept.len() > config.max_records {
            let excess = kept.len() - config.max_records;
            doomed.extend(kept.drain(..excess));
        }
        for (seq, id) in &doomed {
            let bytes = lock(t.mirror).tasks.get(id).map_or(0, |m| m.bytes);
            t.remove(*seq, bytes)?;
        }
        let n = doomed.len();
        changes.extend(doomed.into_iter().map(|(_, id)| Change::Remove(id)));
        Ok(n)
    }

    /// Prunes in a transaction of its own.
    fn prune_now(&mut self) -> Res<usize> {
        let shared = self.shared.clone();
        let guard = read_lock(&shared.db);
        let db = guard
            .as_ref()
            .ok_or_else(|| JournalError::Io("the journal database is closed".into()))?;
        let txn = db.begin_write().map_err(db_error)?;
        let mut changes = Vec::new();
        let n = {
            let mut t = Tables::open(&txn, &shared.mirror).map_err(db_error)?;
            match self.prune_in(&mut t, now_ms(), &mut changes) {
                Ok(n) => n,
                Err(Fail::Logic(e)) => return Err(e),
                Err(Fail::Storage(e)) => return Err(db_error(e)),
            }
        };
        if n == 0 {
            let _ = txn.abort();
            return Ok(0);
        }
        txn.commit().map_err(db_error)?;
        drop(guard);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.apply_changes(changes);
        self.accepts_since_prune = 0;
        Ok(n)
    }

    /// Whether new tasks may be recorded: enough free space, and a file within its limit
    /// (pruning and compacting it first when it is not).
    fn check_space(&mut self) -> Result<(), String> {
        // Measuring costs two system calls per batch; a verdict holds briefly (a disk that
        // fills meanwhile fails the write itself, which is reported as storage full too).
        if let Some(verdict) = held(&self.space_verdict, SPACE_RECHECK) {
            return verdict;
        }
        let verdict = self.measure_space();
        self.space_verdict = Some((Instant::now(), verdict.clone()));
        verdict
    }

    fn measure_space(&mut self) -> Result<(), String> {
        let config = &self.shared.config;
        match free_bytes(&config.path) {
            Ok(free) if free < config.min_free_bytes => {
                return Err(format!(
                    "{free} bytes available on the filesystem holding {}, below the minimum of {}",
                    config.path.display(),
                    config.min_free_bytes
                ))
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "measuring the free space for {}: {e}",
                config.path.display()
            ),
        }
        // What the journal holds is bounded by `max_bytes` as it is written (`make_room`); the
        // file itself keeps the pages it once needed. Past the limit, it is compacted now and
        // then (redb reuses freed pages meanwhile), never a reason to refuse work.
        let len = file_len(&config.path);
        if len <= config.max_bytes.saturating_mul(2) {
            self.size_verdict = None;
            return Ok(());
        }
        if held(&self.size_verdict, SIZE_RECHECK).is_none() {
            let verdict = self.shrink();
            if let Err(why) = &verdict {
                tracing::debug!("{why}");
            }
            self.size_verdict = Some((Instant::now(), verdict));
        }
        Ok(())
    }

    /// Prunes and compacts the file; whether it is now within `max_bytes`.
    fn shrink(&mut self) -> Result<(), String> {
        if let Err(e) = self.prune_now() {
            tracing::warn!("pruning the journal: {e}");
        }
        {
            // No read transaction is alive while this is held (readers hold the read lock).
            let mut guard = write_lock(&self.shared.db);
            if let Some(db) = guard.as_mut() {
                for _ in 0..8 {
                    match db.compact() {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!("compacting the journal: {e}");
                            break;
                        }
                    }
                }
            }
        }
        let config = &self.shared.config;
        let len = file_len(&config.path);
        if len <= config.max_bytes {
            Ok(())
        } else {
            Err(format!(
                "the journal {} is {len} bytes after pruning, above its limit of {} bytes",
                config.path.display(),
                config.max_bytes
            ))
        }
    }

    /// Closes the database after an I/O failure, opens it again (redb repairs it), and
    /// reconciles the file with what callers were told: records of accepts whose commit
    /// reported an error are removed, acknowledgements lost with a batch are written again.
    fn reopen(&mut self) -> Res<()> {
        let shared = self.shared.clone();
        let mut guard = write_lock(&shared.db);
        if let Some(old) = guard.take() {
            drop(old);
        }
        let db = open_db(&shared.config.path)?;
        let known: HashMap<Arc<str>, Meta> = lock(&shared.mirror).tasks.clone();
        let reconciled = (|| -> Result<(), Fail> {
            let txn = db.begin_write()?;
            {
                let mut t = Tables::open(&txn, &shared.mirror)?;
                let mut on_disk = Vec::new();
                for item in t.entries.iter()? {
                    let (k, v) = item?;
                    let seq = k.value();
                    let entry: Entry =
                        decode("index entry", &seq.to_string(), v.value()).map_err(Fail::Logic)?;
                    let meta = entry.meta(seq);
                    on_disk.push((entry.id.into_owned(), meta));
                }
                for (id, meta) in on_disk {
                    // Not known under this number: an acceptance whose commit reported an
                    // error (perhaps of a task pruned earlier in the same batch).
                    match known.get(id.as_str()).filter(|k| k.seq == meta.seq) {
                        None => {
                            tracing::warn!(task_id = %id, "dropping a task whose acceptance failed");
                            t.remove(meta.seq, meta.bytes)?;
                        }
                        Some(k) if k.acked && !meta.acked && meta.phase == TaskPhase::Done => {
                            ack_in(&mut t, std::slice::from_ref(&id), &mut Vec::new())?;
                        }
                        Some(_) => {}
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        let result = match reconciled {
            Ok(()) => match load_index(&db) {
                Ok((mirror, next_seq)) => {
                    *lock(&shared.mirror) = mirror;
                    self.next_seq = self.next_seq.max(next_seq);
                    self.needs_reopen = false;
                    tracing::info!("the journal was reopened after an I/O failure");
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Err(Fail::Logic(e)) => Err(e),
            Err(Fail::Storage(e)) => Err(db_error(e)),
        };
        *guard = Some(db);
        result
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Whether `need` more bytes fit within `max_bytes`, after evicting the output of acknowledged
/// results, oldest first, if they do not. Only acknowledged results are evicted: what the
/// platform has not stored yet is never touched.
fn make_room(
    t: &mut Tables<'_>,
    max_bytes: u64,
    need: u64,
    changes: &mut Vec<Change>,
) -> Result<bool, Fail> {
    /// Candidates read from the mirror at a time (its lock is not held while evicting).
    const BATCH: usize = 64;
    let mut after = 0;
    loop {
        if t.held().saturating_add(need) <= max_bytes {
            return Ok(true);
        }
        let candidates: Vec<(u64, Arc<str>)> = lock(t.mirror)
            .evictable
            .range(after..)
            .filter(|(seq, _)| !t.evicted.contains(seq))
            .take(BATCH)
            .map(|(seq, id)| (*seq, id.clone()))
            .collect();
        let Some(last) = candidates.last().map(|c| c.0) else {
            return Ok(false);
        };
        after = last + 1;
        for (_, id) in candidates {
            t.evict(&id, changes)?;
            if t.held().saturating_add(need) <= max_bytes {
                return Ok(true);
            }
        }
    }
}

fn start_in(t: &mut Tables<'_>, id: &str, changes: &mut Vec<Change>) -> Result<(), Fail> {
    let Some(mut meta) = t.entry(id)? else {
        return Err(Fail::Logic(JournalError::Io(format!(
            "cannot start task {id:?}: it is not recorded"
        ))));
    };
    if meta.phase != TaskPhase::Queued {
        // Running already (a recovered task run again), or Done: nothing to change.
        return Ok(());
    }
    meta.phase = TaskPhase::Running;
    t.store_entry(id, &meta)?;
    changes.push(Change::Set(Arc::from(id), meta));
    Ok(())
}

fn finish_in(
    t: &mut Tables<'_>,
    id: &str,
    result: RunResult,
    now: u64,
    max_bytes: u64,
    changes: &mut Vec<Change>,
) -> Result<(), Fail> {
    let Some(meta) = t.entry(id)? else {
        return Err(Fail::Logic(JournalError::Io(format!(
            "cannot store the result of task {id:?}: it is not recorded"
        ))));
    };
    if meta.phase == TaskPhase::Done {
        // The first result wins.
        return Ok(());
    }
    let mut meta = Meta {
        phase: TaskPhase::Done,
        acked: false,
        finished_at_ms: Some(now),
        ..meta
    };
    let mut f = encode_result(id, now, &result).map_err(Fail::Logic)?;
    if !make_room(t, max_bytes, stored(f.len()), changes)? {
        // The result must be kept (it is owed to the platform), its output need not: the
        // status, exit code and error fit whatever happens.
        tracing::warn!(task_id = %id, bytes = f.len(), "the journal has no room for this result's output; keeping the result without it");
        f = encode_result(id, now, &result.without_output()).map_err(Fail::Logic)?;
        meta.evicted = true;
    }
    t.store_result(id, &f, &mut meta)?;
    changes.push(Change::Set(Arc::from(id), meta));
    Ok(())
}

fn ack_in(t: &mut Tables<'_>, ids: &[String], changes: &mut Vec<Change>) -> Result<(), Fail> {
    for id in ids {
        let Some(mut meta) = t.entry(id)? else {
            continue;
        };
        if !meta.in_outbox() {
            continue;
        }
        meta.acked = true;
        t.store_entry(id, &meta)?;
        changes.push(Change::Set(Arc::from(id.as_str()), meta));
    }
    Ok(())
}

/// Creates the directory (0700) and the file (0600) if they do not exist; tightens the file's
/// mode if it is wider.
fn prepare_path(path: &Path) -> Res<()> {
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

impl Journal {
    /// Opens the journal at `config.path` (creating it, and its directory, when absent), loads
    /// its index, prunes, and starts the writer thread. Returns the unfinished tasks found.
    ///
    /// A file that is not a valid journal (corrupt, not a redb file, a newer format, locked by
    /// another process) is an error; it is never replaced.
    pub fn open(config: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        prepare_path(&config.path)?;
        let db = open_db(&config.path)?;
        init_schema(&db, &config.path)?;
        let (mirror, next_seq) = load_index(&db)?;
        let shared = Arc::new(Shared {
            config,
            db: RwLock::new(Some(db)),
            mirror: Mutex::new(mirror),
            commits: AtomicU64::new(0),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            next_seq,
            accepts_since_prune: 0,
            size_verdict: None,
            space_verdict: None,
            needs_reopen: false,
            unflushed: false,
            held: Vec::new(),
            held_since: None,
        };
        match writer.prune_now() {
            Ok(0) => {}
            Ok(n) => tracing::info!("pruned {n} old task records from the journal"),
            Err(e) => tracing::warn!("pruning the journal: {e}"),
        }
        let recovery = {
            let guard = read_lock(&shared.db);
            let db = guard.as_ref().expect("the database was just opened");
            load_recovery(db, &lock(&shared.mirror))?
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bridge-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| JournalError::Io(format!("starting the journal writer thread: {e}")))?;
        let journal = Journal {
            inner: Arc::new(Inner {
                shared,
                tx: Some(tx),
                thread: Some(thread),
            }),
        };
        Ok((journal, recovery))
    }

    fn send(&self, op: Op) -> Res<()> {
        let tx = self.inner.tx.as_ref().ok_or_else(stopped)?;
        tx.send(op).map_err(|_| stopped())
    }

    async fn call<T>(&self, op: Op, rx: oneshot::Receiver<Res<T>>) -> Res<T> {
        self.send(op)?;
        rx.await.map_err(|_| stopped())?
    }

    /// Durably records a new task, in phase [`TaskPhase::Queued`]: the record is committed
    /// (fsynced) before this returns [`Accept::New`]. A task id already recorded returns
    /// [`Accept::Seen`] with its record, and writes nothing.
    ///
    /// Refuses with [`JournalError::StorageFull`] when the filesystem has less than
    /// [`JournalConfig::min_free_bytes`] available, when the file exceeds
    /// [`JournalConfig::max_bytes`] even after pruning, or when the write fails for lack of
    /// space. Refusing never touches the records already kept.
    pub async fn accept(&self, request: &RunRequest) -> Result<Accept, JournalError> {
        self.accept_as(request, false, None).await
    }

    /// [`Journal::accept`] for a task that starts at once (a slot is free): recorded directly in
    /// [`TaskPhase::Running`], in the same commit, so it needs no [`Journal::start`].
    pub async fn accept_running(&self, request: &RunRequest) -> Result<Accept, JournalError> {
        self.accept_as(request, true, None).await
    }

    /// [`Journal::accept_running`] for a task that runs while its acceptance is being written:
    /// if its result was [offered](EarlyResult::offer) by the time the writer gets to the
    /// acceptance, the result is written in the same commit (durably, with the acceptance),
    /// and [`EarlyResult::take`] hands it back once this returns [`Accept::New`]; the task
    /// needs no [`Journal::finish`] then.
    pub async fn accept_running_with(
        &self,
        request: &RunRequest,
        early: EarlyResult,
    ) -> Result<Accept, JournalError> {
        self.accept_as(request, true, Some(early)).await
    }

    async fn accept_as(
        &self,
        request: &RunRequest,
        running: bool,
        early: Option<EarlyResult>,
    ) -> Result<Accept, JournalError> {
        // Fast path: a known id needs no writer (and must not write). An unreadable record
        // falls through to the writer, which decides from the file itself.
        if let Some(record) = self.get(&request.task_id) {
            return Ok(Accept::Seen(record));
        }
        let (reply, rx) = oneshot::channel();
        let op = Op::Accept {
            request: Box::new(request.clone()),
            running,
            early,
            reply,
        };
        self.call(op, rx).await
    }

    /// Durably marks a task [`TaskPhase::Running`] (committed before this returns); called
    /// right before it executes. A task already running (recovered, run again) or done is left
    /// as it is. An unknown task id is an error.
    pub async fn start(&self, task_id: &str) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Start {
            task_id: task_id.to_string(),
            reply,
        };
        self.call(op, rx).await
    }

    /// Durably stores a task's result ([`TaskPhase::Done`], not acknowledged), committed before
    /// this returns. A task already done keeps its first result (and this returns `Ok`). An
    /// unknown task id is an error.
    pub async fn finish(&self, task_id: &str, result: &RunResult) -> Result<(), JournalError> {
        self.finish_as(task_id, result, true).await
    }

    /// Stores a task's result like [`Journal::finish`], but without fsync: it is written with
    /// the next batch that commits anyway (a new task's acceptance, usually), or on its own
    /// after at most [`HOLD`], and reaches the disk with the next durable commit, at most
    /// [`FLUSH_AFTER`] after that. Visible to readers once this returns. For a task recorded as
    /// running: if the agent dies before the flush, the task is found running and reported
    /// `interrupted`, so the loss is one of detail, not of a result.
    pub async fn finish_lazily(
        &self,
        task_id: &str,
        result: &RunResult,
    ) -> Result<(), JournalError> {
        self.finish_as(task_id, result, false).await
    }

    async fn finish_as(
        &self,
        task_id: &str,
        result: &RunResult,
        durable: bool,
    ) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Finish {
            task_id: task_id.to_string(),
            result: Box::new(result.clone()),
            durable,
            reply,
        };
        self.call(op, rx).await
    }

    /// Marks results acknowledged by the platform. Takes effect at once for
    /// [`Journal::unacked`], [`Journal::get`] and [`Journal::counts`]; written with the next
    /// batch, without waiting (a lost acknowledgement only means a result is sent again).
    /// Unknown task ids, and tasks without a result yet, are ignored.
    pub fn ack(&self, task_ids: &[String]) {
        let mut forward = Vec::new();
        {
            let mut guard = lock(&self.inner.shared.mirror);
            let mirror = &mut *guard;
            for id in task_ids {
                if let Some((key, meta)) = mirror.tasks.get_key_value(id.as_str()) {
                    let (key, mut meta) = (key.clone(), *meta);
                    if meta.in_outbox() {
                        meta.acked = true;
                        mirror.set(key, meta);
                        forward.push(id.clone());
                    } else if meta.phase != TaskPhase::Done {
                        // The result was sent while its commit is still queued: the writer
                        // applies this after it (operations are applied in order), and
                        // `ack_in` checks the record itself.
                        forward.push(id.clone());
                    }
                }
            }
        }
        if !forward.is_empty() {
            if let Err(e) = self.send(Op::Ack { task_ids: forward }) {
                tracing::warn!("recording acknowledgements: {e}");
            }
        }
    }

    /// Every finished and unacknowledged record, in accept order: the results to send again
    /// after a reconnect.
    pub fn unacked(&self) -> Vec<TaskRecord> {
        let ids = self.unacked_ids();
        self.unacked_of(&ids)
    }

    /// The task ids of [`Journal::unacked`], in the same order, without reading the records
    /// (a backlog can then be read a few at a time).
    pub fn unacked_ids(&self) -> Vec<String> {
        lock(&self.inner.shared.mirror)
            .outbox
            .values()
            .map(|id| id.to_string())
            .collect()
    }

    /// How many of `ids`, in order, hold at most `bytes` together as stored (at least one, if
    /// there is one): a batch of results to read at once.
    pub fn batch_within<'a>(&self, ids: impl Iterator<Item = &'a String>, bytes: u64) -> usize {
        let mirror = lock(&self.inner.shared.mirror);
        let mut total = 0;
        let mut n = 0;
        for id in ids {
            total += mirror.tasks.get(id.as_str()).map_or(0, |m| m.bytes);
            if n > 0 && total > bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// The records of `ids` that are still finished and unacknowledged, in order.
    pub fn unacked_of(&self, ids: &[String]) -> Vec<TaskRecord> {
        if ids.is_empty() {
            return Vec::new();
        }
        let wanted: Vec<(Arc<str>, Meta)> = {
            let mirror = lock(&self.inner.shared.mirror);
            ids.iter()
                .filter_map(|id| mirror.tasks.get_key_value(id.as_str()))
                .filter(|(_, m)| m.in_outbox())
                .map(|(id, m)| (id.clone(), *m))
                .collect()
        };
        self.read_tasks(&wanted)
            .into_iter()
            .flatten()
            .filter(|r| r.phase == TaskPhase::Done && !r.acked)
            .collect()
    }

    /// One task's record.
    pub fn get(&self, task_id: &str) -> Option<TaskRecord> {
        let wanted = {
            let mirror = lock(&self.inner.shared.mirror);
            let (id, meta) = mirror.tasks.get_key_value(task_id)?;
            [(id.clone(), *meta)]
        };
        self.read_tasks(&wanted).into_iter().next().flatten()
    }

    /// The records of `wanted`, read in one transaction and brought up to date with their
    /// entries (`None` for a missing or unreadable one).
    fn read_tasks(&self, wanted: &[(Arc<str>, Meta)]) -> Vec<Option<TaskRecord>> {
        let read = || -> Res<Vec<Option<TaskRecord>>> {
            let guard = read_lock(&self.inner.shared.db);
            let db = guard
                .as_ref()
                .ok_or_else(|| JournalError::Io("the journal database is closed".into()))?;
            let txn = db.begin_read().map_err(db_error)?;
            let records = txn.open_table(RECORDS).map_err(db_error)?;
            let results = txn.open_table(RESULTS).map_err(db_error)?;
            let mut out = Vec::with_capacity(wanted.len());
            for (id, meta) in wanted {
                let record = match records.get(meta.seq).map_err(db_error)? {
                    Some(v) => match assemble(
                        id,
                        meta,
                        v.value(),
                        results
                            .get(meta.seq)
                            .map_err(db_error)?
                            .as_ref()
                            .map(|f| f.value()),
                    ) {
                        // The mirror may lag a commit for a moment, never lead to another task.
                        Ok(r) if r.request.task_id == **id => Some(r),
                        Ok(_) => None,
                        Err(e) => {
                            tracing::error!("{e}");
                            None
                        }
                    },
                    None => None,
                };
                out.push(record);
            }
            Ok(out)
        };
        match read() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("reading the journal: {e}");
                vec![None; wanted.len()]
            }
        }
    }

    /// Records (or replaces) an installed handler; committed before this returns.
    pub async fn put_handler(&self, h: HandlerRecord) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::PutHandler { handler: h, reply }, rx).await
    }

    /// Removes an installed handler; committed before this returns. `false` if there was none
    /// of that name.
    pub async fn remove_handler(&self, name: &str) -> Result<bool, JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::RemoveHandler {
            name: name.to_string(),
            reply,
        };
        self.call(op, rx).await
    }

    /// Every installed handler, sorted by name.
    pub fn handlers(&self) -> Vec<HandlerRecord> {
        lock(&self.inner.shared.mirror)
            .handlers
            .values()
            .cloned()
            .collect()
    }

    /// One installed handler.
    pub fn handler(&self, name: &str) -> Option<HandlerRecord> {
        lock(&self.inner.shared.mirror).handlers.get(name).cloned()
    }

    /// Prunes finished and acknowledged records older than [`JournalConfig::retention`] and,
    /// oldest first, beyond [`JournalConfig::max_records`]; never a queued, running or
    /// unacknowledged one. Returns how many were removed. The writer also prunes on its own
    /// (at open and every [`PRUNE_EVERY`] accepted tasks).
    ///
    /// Blocks the calling thread until the writer has committed (about one commit).
    pub fn prune(&self) -> Result<usize, JournalError> {
        let (reply, rx) = mpsc::channel();
        self.send(Op::Prune { reply })?;
        rx.recv().map_err(|_| stopped())?
    }

    /// `(records, unacknowledged results)`, for logs and status.
    pub fn counts(&self) -> (usize, usize) {
        let mirror = lock(&self.inner.shared.mirror);
        (mirror.tasks.len(), mirror.outbox.len())
    }

    /// How many write transactions the writer has committed since [`Journal::open`] (each
    /// one fsync): with group commit, far fewer than the writes asked for under load.
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// The configuration the journal was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.inner.shared.config
    }
}

fn stopped() -> JournalError {
    JournalError::Io("the journal writer has stopped".into())
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (records, unacked) = self.counts();
        f.debug_struct("Journal")
            .field("path", &self.inner.shared.config.path)
            .field("records", &records)
            .field("unacked", &unacked)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Status;

    fn request(task_id: &str) -> RunRequest {
        RunRequest {
            id: format!("msg-{task_id}"),
            task_id: task_id.to_string(),
            command: Some("hello".into()),
            input: serde_json::json!({"n": 1}),
            ..Default::default()
        }
    }

    fn result(text: &str) -> RunResult {
        let mut r = RunResult::refused(Status::Ok, text);
        r.exit_code = Some(0);
        r.stdout = text.to_string();
        r
    }

    fn config(dir: &Path) -> JournalConfig {
        JournalConfig::new(dir.join("state").join("journal.redb"))
    }

    fn open(config: &JournalConfig) -> (Journal, Recovery) {
        Journal::open(config.clone()).expect("open the journal")
    }

    /// The format version recorded in the journal file at `path`.
    fn format_version(path: &Path) -> u64 {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let version = meta.get("schema").unwrap().unwrap().value();
        version
    }

    /// The task ids of `records`, in order.
    fn ids(records: &[TaskRecord]) -> Vec<String> {
        records.iter().map(|r| r.request.task_id.clone()).collect()
    }

    #[tokio::test]
    async fn accept_dedups_and_everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, recovery) = open(&cfg);
        assert!(recovery.queued.is_empty() && recovery.running.is_empty());

        for id in ["queued", "running", "done", "acked"] {
            assert_eq!(j.accept(&request(id)).await.unwrap(), Accept::New);
        }
        // A second accept of the same id: the first record, unchanged, and nothing written.
        let commits = j.commits();
        let mut again = request("queued");
        again.id = "another-message".into();
        again.input = serde_json::json!("different");
        match j.accept(&again).await.unwrap() {
            Accept::Seen(record) => {
                assert_eq!(record.request, request("queued"));
                assert_eq!(record.phase, TaskPhase::Queued);
                assert!(record.result.is_none());
            }
            Accept::New => panic!("a known task id was accepted again"),
        }
        assert_eq!(j.commits(), commits, "a known task id must not write");
        assert_eq!(j.get("queued").unwrap().request, request("queued"));

        j.start("running").await.unwrap();
        for id in ["done", "acked"] {
            j.start(id).await.unwrap();
            j.finish(id, &result(id)).await.unwrap();
        }
        j.ack(&[
            "acked".to_string(),
            "unknown".to_string(),
            "queued".to_string(),
        ]);
        assert_eq!(j.counts(), (4, 1));
        assert!(j.start("unknown").await.is_err());
        assert!(j.finish("unknown", &result("x")).await.is_err());
        drop(j);

        let (j, recovery) = open(&cfg);
        assert_eq!(ids(&recovery.queued), ["queued"]);
        assert_eq!(ids(&recovery.running), ["running"]);
        assert_eq!(recovery.running[0].phase, TaskPhase::Running);
        let unacked = j.unacked();
        assert_eq!(ids(&unacked), ["done"]);
        assert_eq!(unacked[0].result, Some(result("done")));
        assert!(!unacked[0].acked);
        assert!(unacked[0].finished_at_ms.is_some());
        let acked = j.get("acked").unwrap();
        assert!(acked.acked);
        assert_eq!(acked.phase, TaskPhase::Done);
        assert_eq!(j.get("queued").unwrap().phase, TaskPhase::Queued);
        assert!(j.get("unknown").is_none());
        assert_eq!(j.counts(), (4, 1));
        // Still deduplicated after the restart.
        assert!(matches!(
            j.accept(&request("done")).await.unwrap(),
            Accept::Seen(r) if r.result == Some(result("done"))
        ));
    }

    #[tokio::test]
    async fn a_lazy_result_is_visible_at_once_and_flushed_soon_after() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept_running(&request("t")).await.unwrap();
        let before = j.commits();
        j.finish_lazily("t", &result("done")).await.unwrap();
        // Committed (without fsync, after waiting `HOLD` for company): readers see it at once.
        assert_eq!(j.commits(), before + 1);
        assert_eq!(j.get("t").unwrap().result, Some(result("done")));
        assert_eq!(j.get("t").unwrap().phase, TaskPhase::Done);
        // With nothing else to write, the writer makes a durable commit of its own.
        let deadline = std::time::Instant::now() + FLUSH_AFTER * 20;
        while j.commits() < before + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no flush within {:?}",
                FLUSH_AFTER * 20
            );
            tokio::time::sleep(FLUSH_AFTER / 4).await;
        }
        // And no more: an idle writer does not commit again.
        tokio::time::sleep(FLUSH_AFTER * 3).await;
        assert_eq!(j.commits(), before + 2);
        drop(j);
        let (j, recovery) = open(&cfg);
        assert_eq!(j.get("t").unwrap().result, Some(result("done")));
        assert!(recovery.running.is_empty(), "{:?}", recovery.running.len());
    }

    #[tokio::test]
    async fn a_result_offered_before_the_acceptance_is_written_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let before = j.commits();
        let early = EarlyResult::default();
        assert!(early.offer(result("early")).is_none(), "offered in time");
        let accepted = j.accept_running_with(&request("t"), early.clone()).await;
        assert_eq!(accepted.unwrap(), Accept::New);
        // One commit for the acceptance and the result, and the result handed back to send.
        assert_eq!(j.commits(), before + 1);
        assert_eq!(early.take(), Some((result("early"), true)));
        let record = j.get("t").unwrap();
        assert_eq!(record.phase, TaskPhase::Done);
        assert_eq!(record.result, Some(result("early")));
        assert!(record.finished_at_ms.is_some());
        // In the outbox until the platform acknowledges it, and durable: it survives a reopen
        // as a finished task (not one to report interrupted).
        assert_eq!(ids(&j.unacked()), ["t"]);
        drop(j);
        let (j, recovery) = open(&cfg);
        assert_eq!(j.get("t").unwrap().result, Some(result("early")));
        assert!(recovery.running.is_empty(), "{:?}", recovery.running.len());
        assert_eq!(ids(&j.unacked()), ["t"]);
        // A second delivery of the task is answered from the record, and nothing is written.
        let again = EarlyResult::default();
        assert!(again.offer(result("second run")).is_none());
        match j.accept_running_with(&request("t"), again.clone()).await {
            Ok(Accept::Seen(r)) => assert_eq!(r.result, Some(result("early"))),
            other => panic!("expected Seen, got {other:?}"),
        }
        assert_eq!(again.take(), Some((result("second run"), false)));
    }

    #[tokio::test]
    async fn a_result_offered_after_the_acceptance_is_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let early = EarlyResult::default();
        let accepted = j.accept_running_with(&request("t"), early.clone()).await;
        assert_eq!(accepted.unwrap(), Accept::New);
        assert_eq!(j.get("t").unwrap().phase, TaskPhase::Running);
        // Too late to ride the acceptance: given back, to be stored with `finish`.
        assert_eq!(early.offer(result("late")), Some(result("late")));
        assert_eq!(early.take(), None);
        j.finish_lazily("t", &result("late")).await.unwrap();
        assert_eq!(j.get("t").unwrap().result, Some(result("late")));
    }

    #[tokio::test]
    async fn a_lazy_result_rides_the_next_acceptance_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept_running(&request("a")).await.unwrap();
        let before = j.commits();
        let (ra, rb, qb) = (result("a"), result("b"), request("b"));
        let (finished, accepted) = tokio::join!(j.finish_lazily("a", &ra), j.accept_running(&qb));
        finished.unwrap();
        assert_eq!(accepted.unwrap(), Accept::New);
        assert_eq!(j.commits(), before + 1, "one commit for both");
        assert_eq!(j.get("a").unwrap().phase, TaskPhase::Done);
        // That commit was durable: no flush follows.
        tokio::time::sleep(FLUSH_AFTER * 3).await;
        assert_eq!(j.commits(), before + 1);
        // An acknowledgement sent after the result is applied after it, even while both wait.
        let (finished, ()) = tokio::join!(j.finish_lazily("b", &rb), async {
            j.ack(&["b".to_string()])
        });
        finished.unwrap();
        assert!(j.get("b").unwrap().acked);
        assert_eq!(j.counts(), (2, 1));
        drop(j);
        let (j, _) = open(&cfg);
        assert!(j.get("b").unwrap().acked);
        assert_eq!(j.unacked_ids(), ["a"]);
    }

    #[tokio::test]
    async fn the_first_result_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept(&request("t")).await.unwrap();
        j.start("t").await.unwrap();
        j.finish("t", &result("first")).await.unwrap();
        j.finish("t", &result("second")).await.unwrap();
        // A late start does not move it back either.
        j.start("t").await.unwrap();
        let record = j.get("t").unwrap();
        assert_eq!(record.result, Some(result("first")));
        assert_eq!(record.phase, TaskPhase::Done);
        drop(j);
        let (j, _) = open(&cfg);
        assert_eq!(j.get("t").unwrap().result, Some(result("first")));
    }

    #[tokio::test]
    async fn acks_empty_the_outbox_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let ids: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
        for id in &ids {
            j.accept(&request(id)).await.unwrap();
            j.finish(id, &result(id)).await.unwrap();
        }
        let order: Vec<String> = j.unacked().into_iter().map(|r| r.request.task_id).collect();
        assert_eq!(order, ids, "unacked() is in accept order");
        j.ack(&ids);
        assert!(j.unacked().is_empty());
        assert_eq!(j.counts(), (5, 0));
        assert!(j.get("t0").unwrap().acked);
        // Dropped right away: the pending acknowledgement is written before the writer stops.
        drop(j);
        let (j, _) = open(&cfg);
        assert!(j.unacked().is_empty());
        assert_eq!(j.counts(), (5, 0));
    }

    #[tokio::test]
    async fn handlers_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let handler = |name: &str| HandlerRecord {
            name: name.to_string(),
            module_sha256: "ab".repeat(32),
            signature: Some("c2ln".into()),
            installed_at: "2024-01-01T00:00:00Z".into(),
            key: Some("sha256:00".into()),
        };
        j.put_handler(handler("zeta")).await.unwrap();
        j.put_handler(handler("alpha")).await.unwrap();
        j.put_handler(handler("mid")).await.unwrap();
        let mut replaced = handler("mid");
        replaced.module_sha256 = "cd".repeat(32);
        j.put_handler(replaced.clone()).await.unwrap();
        let names = |j: &Journal| j.handlers().into_iter().map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(names(&j), ["alpha", "mid", "zeta"]);
        assert_eq!(j.handler("mid"), Some(replaced.clone()));
        assert!(j.remove_handler("zeta").await.unwrap());
        assert!(!j.remove_handler("zeta").await.unwrap());
        assert!(j.handler("zeta").is_none());
        drop(j);
        let (j, _) = open(&cfg);
        assert_eq!(names(&j), ["alpha", "mid"]);
        assert_eq!(j.handler("mid"), Some(replaced));
        assert_eq!(j.handler("alpha"), Some(handler("alpha")));
    }

    /// Records in every state: q (queued), r (running), u0..u2 (done, unacked), a0..a4 (done,
    /// acked, oldest first).
    async fn populate(j: &Journal) {
        j.accept(&request("q")).await.unwrap();
        j.accept(&request("r")).await.unwrap();
        j.start("r").await.unwrap();
        for i in 0..3 {
            let id = format!("u{i}");
            j.accept(&request(&id)).await.unwrap();
            j.finish(&id, &result(&id)).await.unwrap();
        }
        for i in 0..5 {
            let id = format!("a{i}");
            j.accept(&request(&id)).await.unwrap();
            j.finish(&id, &result(&id)).await.unwrap();
            j.ack(&[id]);
        }
    }

    #[tokio::test]
    async fn prune_removes_only_finished_acked_records_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.retention = Duration::ZERO;
        let (j, _) = open(&cfg);
        populate(&j).await;
        assert_eq!(j.counts(), (10, 3));
        assert_eq!(j.prune().unwrap(), 5);
        assert_eq!(j.counts(), (5, 3));
        for id in ["q", "r", "u0", "u1", "u2"] {
            assert!(j.get(id).is_some(), "{id} was pruned");
        }
        assert!(j.get("a0").is_none());
        assert_eq!(j.prune().unwrap(), 0);
        // A pruned id is forgotten.
        assert_eq!(j.accept(&request("a0")).await.unwrap(), Accept::New);
        drop(j);
        let (j, recovery) = open(&cfg);
        assert_eq!(j.counts(), (6, 3));
        assert_eq!(recovery.queued.len(), 2);
        assert_eq!(recovery.running.len(), 1);
    }

    #[tokio::test]
    async fn prune_keeps_at_most_max_records_finished_acked_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_records = 2;
        let (j, _) = open(&cfg);
        populate(&j).await;
        assert_eq!(j.prune().unwrap(), 3);
        let mut left: Vec<String> = ["q", "r", "u0", "u1", "u2", "a0", "a1", "a2", "a3", "a4"]
            .into_iter()
            .filter(|id| j.get(id).is_some())
            .map(String::from)
            .collect();
        left.sort();
        assert_eq!(left, ["a3", "a4", "q", "r", "u0", "u1", "u2"]);
        assert_eq!(j.unacked().len(), 3);
        drop(j);
        // Open prunes too: with a generous limit, nothing more goes.
        let (j, _) = open(&cfg);
        assert_eq!(j.counts(), (7, 3));
    }

    /// Opens a journal holding a finished result and a queued task, reopens it with `tweak`
    /// (a configuration that leaves no room) and checks what is refused and what is not.
    /// `output_kept`: whether a task that finishes while the journal is full keeps its output
    /// (a full filesystem: yes, a write that succeeds is whole; a journal at its size limit with
    /// nothing acknowledged to evict: no, the result is kept without it).
    async fn storage_full_case(tweak: fn(&mut JournalConfig), output_kept: bool) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept(&request("kept")).await.unwrap();
        j.finish("kept", &result("kept")).await.unwrap();
        j.accept(&request("queued")).await.unwrap();
        drop(j);

        let mut full = cfg.clone();
        tweak(&mut full);
        let (j, recovery) = open(&full);
        assert_eq!(recovery.queued.len(), 1);
        match j.accept(&request("new")).await {
            Err(JournalError::StorageFull(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected StorageFull, got {other:?}"),
        }
        // Known ids are still answered, and recorded tasks still progress.
        assert!(matches!(
            j.accept(&request("kept")).await.unwrap(),
            Accept::Seen(_)
        ));
        j.start("queued").await.unwrap();
        j.finish("queued", &result("queued")).await.unwrap();
        assert!(j.get("new").is_none());
        assert_eq!(j.unacked().len(), 2);
        assert_eq!(j.get("kept").unwrap().result, Some(result("kept")));
        drop(j);

        // Back to normal limits: nothing was lost, and the refused id can come again.
        let (j, _) = open(&cfg);
        assert_eq!(j.counts(), (2, 2));
        assert_eq!(j.get("kept").unwrap().result, Some(result("kept")));
        let queued = if output_kept {
            result("queued")
        } else {
            result("queued").without_output()
        };
        assert_eq!(j.get("queued").unwrap().result, Some(queued));
        assert_eq!(j.accept(&request("new")).await.unwrap(), Accept::New);
    }

    #[tokio::test]
    async fn storage_full_when_the_filesystem_is_nearly_full() {
        storage_full_case(|c| c.min_free_bytes = u64::MAX / 2, true).await;
    }

    #[tokio::test]
    async fn storage_full_when_unacknowledged_results_fill_it() {
        storage_full_case(|c| c.max_bytes = 1, false).await;
    }

    fn big_result(text: &str, bytes: usize) -> RunResult {
        let mut r = result(text);
        r.stdout = "x".repeat(bytes);
        r.output = serde_json::json!({"text": text});
        r
    }

    /// Accepts, runs and (if `ack`) acknowledges `n` tasks named `{prefix}{i}`, each with a
    /// result of about `bytes`.
    async fn fill(j: &Journal, prefix: &str, n: usize, bytes: usize, ack: bool) {
        for i in 0..n {
            let id = format!("{prefix}{i}");
            assert_eq!(j.accept(&request(&id)).await.unwrap(), Accept::New, "{id}");
            j.start(&id).await.unwrap();
            j.finish(&id, &big_result(&id, bytes)).await.unwrap();
            if ack {
                j.ack(std::slice::from_ref(&id));
            }
        }
    }

    #[tokio::test]
    async fn acknowledged_results_are_evicted_oldest_first_and_never_block_new_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 1 << 20;
        let (j, _) = open(&cfg);
        // Ten times the limit in acknowledged results of 64 KiB.
        fill(&j, "t", 160, 64 << 10, true).await;
        let held = lock(&j.inner.shared.mirror).bytes;
        assert!(held <= cfg.max_bytes, "the journal holds {held} bytes");
        // The oldest lost their output, and only that; the newest are whole.
        let old = j.get("t0").unwrap();
        let r = old.result.unwrap();
        assert!(r.evicted);
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (Status::Ok, Some(0), Some("t0"))
        );
        assert!(r.stdout.is_empty() && r.output.is_null());
        assert!(old.request.input.is_null());
        assert_eq!(
            j.get("t159").unwrap().result,
            Some(big_result("t159", 64 << 10))
        );
        // Every id is still known: none runs twice.
        for i in 0..160 {
            assert!(matches!(
                j.accept(&request(&format!("t{i}"))).await.unwrap(),
                Accept::Seen(_)
            ));
        }
        drop(j);
        // The evictions are durable, and the sizes are known again after a restart.
        let (j, _) = open(&cfg);
        assert!(j.get("t0").unwrap().result.unwrap().evicted);
        let reopened = lock(&j.inner.shared.mirror).bytes;
        assert_eq!(reopened, held);
        fill(&j, "u", 40, 64 << 10, true).await;
        assert!(lock(&j.inner.shared.mirror).bytes <= cfg.max_bytes);
    }

    #[tokio::test]
    async fn unacknowledged_results_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 1 << 20;
        let (j, _) = open(&cfg);
        fill(&j, "acked", 4, 64 << 10, true).await;
        // Unacknowledged results up to the limit: the acknowledged ones make room first.
        let mut refused_at = None;
        for i in 0..40 {
            let id = format!("owed{i}");
            match j.accept(&request(&id)).await {
                Ok(Accept::New) => {
                    j.start(&id).await.unwrap();
                    j.finish(&id, &big_result(&id, 64 << 10)).await.unwrap();
                }
                Err(JournalError::StorageFull(msg)) => {
                    assert!(msg.contains("not acknowledged"), "{msg}");
                    refused_at = Some(i);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let refused_at = refused_at.expect("the journal filled up");
        assert!(j.get("acked0").unwrap().result.unwrap().evicted);
        for i in 0..refused_at {
            let r = j.get(&format!("owed{i}")).unwrap().result.unwrap();
            assert!(!r.evicted, "owed{i} lost its output");
        }
        assert_eq!(j.unacked().len(), refused_at);
        // Once the platform acknowledges them, there is room again.
        let owed: Vec<String> = (0..refused_at).map(|i| format!("owed{i}")).collect();
        j.ack(&owed);
        assert_eq!(j.accept(&request("after")).await.unwrap(), Accept::New);
    }

    #[tokio::test]
    async fn the_file_stays_near_its_limit_however_many_results_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 16 << 20;
        let (j, _) = open(&cfg);
        // 100 MiB of acknowledged results through a journal of 16 MiB.
        fill(&j, "t", 400, 256 << 10, true).await;
        // What the file keeps beyond its limit is compacted away with the next acceptance.
        tokio::time::sleep(SPACE_RECHECK).await;
        j.accept(&request("next")).await.unwrap();
        drop(j);
        let len = file_len(&cfg.path);
        // Pages freed by evictions are reused; redb's copy-on-write and its regions for large
        // values keep the file within about twice what it holds.
        assert!(
            len <= 5 * cfg.max_bytes / 2,
            "the file is {len} bytes for a limit of {}",
            cfg.max_bytes
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_accepts_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let before = j.commits();
        let mut tasks = Vec::new();
        for worker in 0..100 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    let id = format!("w{worker}-{i}");
                    assert_eq!(j.accept(&request(&id)).await.unwrap(), Accept::New);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let commits = j.commits() - before;
        assert_eq!(j.counts(), (2000, 0));
        assert!(commits < 2000, "{commits} commits for 2000 accepts");
        drop(j);
        let (_, recovery) = open(&cfg);
        assert_eq!(recovery.queued.len(), 2000);
    }

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

    /// Writes a journal in format version 1 (tables keyed by task id), as agents before
    /// version 2 did: `(task id, seq, phase, acked)`; done tasks get a result.
    fn write_v1(path: &Path, tasks: &[(&str, u64, TaskPhase, bool)]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META).unwrap().insert("schema", 1).unwrap();
            let mut records = txn.open_table(v1::TASKS).unwrap();
            let mut index = txn.open_table(v1::INDEX).unwrap();
            for &(id, seq, phase, acked) in tasks {
                let record = TaskRecord {
                    request: request(id),
                    phase,
                    result: (phase == TaskPhase::Done).then(|| result(id)),
                    acked,
                    // Recent: pruning at open must keep them.
                    accepted_at_ms: now_ms() - 1000 + seq,
                    finished_at_ms: (phase == TaskPhase::Done).then(|| now_ms() - 500 + seq),
                };
                // A version 1 index entry: these four fields, nothing else.
                let m = serde_json::to_vec(&serde_json::json!({
                    "seq": seq,
                    "phase": phase,
                    "acked": acked,
                    "finished_at_ms": record.finished_at_ms,
                }))
                .unwrap();
                let r = serde_json::to_vec(&record).unwrap();
                records.insert(id, r.as_slice()).unwrap();
                index.insert(id, m.as_slice()).unwrap();
            }
            txn.open_table(HANDLERS).unwrap();
        }
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn a_version_1_journal_is_migrated_with_every_task() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        // Ids in an order unlike their sequence numbers, as random ids are.
        write_v1(
            &cfg.path,
            &[
                ("zz-acked", 0, TaskPhase::Done, true),
                ("yy-unacked", 1, TaskPhase::Done, false),
                ("mm-running", 2, TaskPhase::Running, false),
                ("bb-queued", 3, TaskPhase::Queued, false),
                ("aa-unacked", 4, TaskPhase::Done, false),
            ],
        );
        let (j, recovery) = open(&cfg);
        assert_eq!(ids(&recovery.queued), ["bb-queued"]);
        assert_eq!(ids(&recovery.running), ["mm-running"]);
        // In accept order, not id order.
        assert_eq!(ids(&j.unacked()), ["yy-unacked", "aa-unacked"]);
        let acked = j.get("zz-acked").unwrap();
        assert!(acked.acked && acked.phase == TaskPhase::Done);
        assert_eq!(acked.result, Some(result("zz-acked")));
        assert!(acked.accepted_at_ms > now_ms() - 60_000);
        assert_eq!(j.counts(), (5, 2));
        // Still deduplicated; a new task comes after every migrated one.
        assert!(matches!(
            j.accept(&request("aa-unacked")).await.unwrap(),
            Accept::Seen(r) if r.result == Some(result("aa-unacked"))
        ));
        j.accept(&request("new")).await.unwrap();
        j.start("new").await.unwrap();
        j.finish("new", &result("new")).await.unwrap();
        j.ack(&["yy-unacked".to_string()]);
        drop(j);

        let (j, _) = open(&cfg);
        assert_eq!(ids(&j.unacked()), ["aa-unacked", "new"]);
        assert_eq!(j.counts(), (6, 2));
        drop(j);
        // The old tables are gone and the format is recorded.
        assert_eq!(format_version(&cfg.path), SCHEMA_VERSION);
        let db = Database::open(&cfg.path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(v1::TASKS).is_err());
        assert!(txn.open_table(v1::INDEX).is_err());
    }

    #[test]
    fn a_journal_of_a_newer_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        {
            let db = Database::create(&cfg.path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("schema", 99).unwrap();
            txn.commit().unwrap();
        }
        let err = Journal::open(cfg.clone()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("format version 99"), "{err}");
        assert_eq!(format_version(&cfg.path), 99);
    }

    #[test]
    fn the_journal_is_shareable() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Journal>();
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
