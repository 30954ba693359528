//! The agent's durable task journal, behind the [`Journal`] facade: accepted tasks, their results
//! until the platform acknowledges them, installed handlers. How it works: `docs/journal.md`.
//!
//! In brief: a task is recorded (fsynced) before the agent answers `accepted`, marked running
//! before it runs, and its result kept until the platform acknowledges it. Every write goes to one
//! writer thread, which commits whatever is waiting as one batch (group commit); reads are served
//! from an in-memory index and redb read transactions, beside the writer.
//!
//! The files are layered (`cargo xtask deps` lists the edges): each uses only those before it in
//! this list, and this file's shared state and locks, so they read bottom-up.
//! `records` and `error` (what is handed out, what goes wrong), `early`; `schema` (the file, its
//! tables, encodings, sizes) and `migration` (format versions, at open); `log` (the write-ahead
//! log: frames, replay, settling); `index` (in memory);
//! `tables` (one write transaction's view); what each write does in it: `space` (making room),
//! `ops` (a task's acceptance, start, finish, ack, and its audit record), then `queue` (the
//! writes sent to the writer), `audit` (the audit chain's head, what the exporter reads),
//! `handlers`, `retention`; `reopen` (after an I/O failure); `writer` (group commit, which applies
//! them); and the facade: this file (open, accept, start, finish, ack), `read`, `recovery`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bridge_protocol::RunRequest;
use redb::Database;
use tokio::sync::oneshot;

use crate::audit::{Facts, Head};
use crate::outcome::RunResult;

mod audit;
mod early;
mod error;
mod handlers;
mod index;
mod log;
mod migration;
mod ops;
mod queue;
mod read;
mod records;
mod recovery;
mod reopen;
mod retention;
mod schema;
mod space;
mod tables;
#[cfg(test)]
mod testkit;
mod writer;

pub use audit::AuditFeed;
pub use early::EarlyResult;
pub use error::JournalError;
pub use log::{disk_bytes, log_path, settle};
pub use records::{Accept, HandlerRecord, TaskPhase, TaskRecord};
pub use recovery::Recovery;
pub use retention::PRUNE_EVERY;
pub use writer::{FLUSH_AFTER, HOLD, MAX_BATCH};

use error::Res;
use index::Index;
use migration::init_schema;
use queue::Op;
use schema::{open_db, prepare_path};
use writer::Writer;

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
    /// Whether results get audit records (default `true`; off only to measure what they
    /// cost: the agent always audits).
    pub audit: bool,
    /// Whether batches are committed through the write-ahead log `<path>.log` from the start
    /// (default `false`: the agent turns it on with [`Journal::use_log`] once its version is
    /// confirmed, since an older version does not read the log). Its capacity counts against
    /// `max_bytes` either way.
    pub log: bool,
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
            audit: true,
            log: false,
        }
    }
}

/// The journal: a cheap handle (clones share one database and one writer thread).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// What the facade and the writer thread share.
struct Shared {
    config: JournalConfig,
    /// `None` only while the writer reopens the database after an I/O failure (or if that
    /// failed). Used by `Journal::open` and then by the writer thread alone, which serves every
    /// read; compaction and reopening take the write lock.
    db: RwLock<Option<Database>>,
    index: Mutex<Index>,
    /// Batches and checkpoints committed since open (see [`Journal::commits`]).
    commits: AtomicU64,
    /// Told of each commit's latency and bytes, once set ([`Journal::observe`]).
    observer: std::sync::OnceLock<Arc<crate::observe::Observer>>,
    /// The audit chain's heads, and its waiters (the exporter).
    audit: Mutex<AuditHeads>,
    audit_changed: Condvar,
    /// Whether batches go through the write-ahead log ([`Journal::use_log`]).
    use_log: std::sync::atomic::AtomicBool,
    /// The write-ahead log (open once in use) and its generation.
    log: Mutex<LogState>,
    /// Tests: the next batch fails as a storage error would, after its writes are applied.
    #[cfg(test)]
    fail_next_batch: std::sync::atomic::AtomicBool,
}

/// The write-ahead log's state (see `log`).
#[derive(Default)]
struct LogState {
    /// Open once the log is in use.
    file: Option<log::Log>,
    /// Opening it failed: batches commit durably in redb.
    failed: bool,
    /// The generation the redb file holds all frames before (frames are written with it).
    generation: u64,
}

/// The audit chain's head as committed, and as made durable.
#[derive(Default)]
struct AuditHeads {
    /// The last record committed (perhaps without fsync: a crash may lose it).
    written: Head,
    /// The last record a durable commit holds.
    durable: Head,
    /// The journal is closing: the exporter stops.
    closed: bool,
    /// The lowest sequence number a waiter (`AuditFeed::wait_audit`) waits for the durable
    /// head to pass, if any waits for one: durable commits wake waiters only when one passes
    /// it, so a waiter lingering until a timeout (or the close) costs the commits nothing.
    waiting_past: Option<u64>,
}

impl AuditHeads {
    /// Every record written is durable; returns whether a waiter's wait is over (and clears
    /// the wait: the waiters still waiting register again).
    fn make_durable(&mut self) -> bool {
        if self.durable == self.written {
            return false;
        }
        self.durable = self.written.clone();
        match self.waiting_past {
            Some(seq) if self.durable.seq > seq => {
                self.waiting_past = None;
                true
            }
            _ => false,
        }
    }

    /// Whether a waiter for a durable head past `seq` waits on; registers it if so.
    fn wait_past(&mut self, seq: u64) -> bool {
        let waits = self.durable.seq <= seq && !self.closed;
        if waits && seq < u64::MAX {
            self.waiting_past = Some(self.waiting_past.map_or(seq, |w| w.min(seq)));
        }
        waits
    }
}

impl Shared {
    /// For a durable redb commit about to be made in `txn`: when the log holds frames, moves it
    /// to the next generation in the same transaction (the commit holds them all), returned to
    /// pass to [`Shared::checkpointed`] once committed. Every durable commit goes through here,
    /// so that no frame is ever applied over writes that came after it.
    fn stamp(&self, txn: &redb::WriteTransaction) -> Result<Option<u64>, error::Fail> {
        let state = lock(&self.log);
        match &state.file {
            Some(f) if f.has_frames() => {
                let next = state.generation + 1;
                log::set_generation(txn, next)?;
                Ok(Some(next))
            }
            _ => Ok(None),
        }
    }

    /// A durable commit stamped with `generation` succeeded: the log starts over.
    fn checkpointed(&self, generation: Option<u64>) {
        if let Some(generation) = generation {
            let mut state = lock(&self.log);
            state.generation = generation;
            if let Some(f) = state.file.as_mut() {
                f.restart();
            }
        }
    }

    /// A durable commit succeeded: every record written is durable.
    fn audit_durable(&self) {
        // Notified after the lock is released: a waiter woken while the writer holds it would
        // block on it at once, and the writer would then have to wake it a second time.
        let wake = lock(&self.audit).make_durable();
        if wake {
            self.audit_changed.notify_all();
        }
    }
}

/// Owned by every clone of a [`Journal`]: the queue to the writer and its thread. Dropping the
/// last clone closes the queue and waits for the writer to finish.
struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    /// The audit exporter's thread, stopped before the writer.
    exporter: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        lock(&self.shared.audit).closed = true;
        self.shared.audit_changed.notify_all();
        if let Some(exporter) = lock(&self.exporter).take() {
            if exporter.join().is_err() {
                tracing::error!("the audit exporter thread panicked");
            }
        }
        // Closing the channel lets the writer finish what is queued, then return.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the journal writer thread panicked");
            }
        }
    }
}

// The locks below are taken even when poisoned: a panic elsewhere must not stop the journal.

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

/// Creates an empty journal at `path`: written and made durable at `<path>.new` (a stale one,
/// left by an agent killed while creating it, is removed first), then renamed into place.
fn create(path: &std::path::Path) -> Result<(), JournalError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    let fresh = std::path::PathBuf::from(name);
    let io = |what: &str, p: &std::path::Path, e: std::io::Error| {
        JournalError::Io(format!("{what} {}: {e}", p.display()))
    };
    match std::fs::remove_file(&fresh) {
        Ok(()) => tracing::warn!(file = %fresh.display(), "removed a journal left half-created"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", &fresh, e)),
    }
    prepare_path(&fresh)?;
    let db = open_db(&fresh)?;
    init_schema(&db, &fresh)?;
    drop(db);
    std::fs::rename(&fresh, path).map_err(|e| io("renaming into place", path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing", dir, e))?;
    }
    Ok(())
}

impl Journal {
    /// Opens the journal at `config.path` (creating it, and its directory, when absent), loads
    /// its index, prunes, and starts the writer thread. Returns the unfinished tasks found.
    ///
    /// A file that is not a valid journal (corrupt, not a redb file, a newer format, locked by
    /// another process) is an error; it is never replaced. A new journal is created whole under
    /// another name and then renamed into place, so an agent killed while creating it leaves
    /// nothing at `config.path` to refuse at the next start.
    pub fn open(config: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        if !config.path.exists() {
            // A log without its redb file belongs to no journal this one continues.
            let log = log::log_path(&config.path);
            match std::fs::remove_file(&log) {
                Ok(()) => {
                    tracing::warn!(log = %log.display(), "removed a journal log left without its journal")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::Io(format!("removing {}: {e}", log.display()))),
            }
            create(&config.path)?;
        }
        prepare_path(&config.path)?;
        let db = open_db(&config.path)?;
        init_schema(&db, &config.path)?;
        // Whatever the log holds goes into the redb file first (durably), log in use or not.
        let (generation, _) = log::replay(&db, &config.path)?;
        let (mut index, next_seq) = Index::load(&db)?;
        let (head, audit_bytes) = audit::load(&db)?;
        index.bytes += audit_bytes;
        let config_log = config.log;
        let shared = Arc::new(Shared {
            config,
            db: RwLock::new(Some(db)),
            index: Mutex::new(index),
            commits: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
            audit: Mutex::new(AuditHeads {
                written: head.clone(),
                durable: head,
                closed: false,
                waiting_past: None,
            }),
            audit_changed: Condvar::new(),
            use_log: std::sync::atomic::AtomicBool::new(config_log),
            log: Mutex::new(LogState {
                generation,
                ..LogState::default()
            }),
            #[cfg(test)]
            fail_next_batch: Default::default(),
        });
        match retention::prune_now(&shared) {
            Ok(0) => {}
            Ok(n) => tracing::info!("pruned {n} old task records from the journal"),
            Err(e) => tracing::warn!("pruning the journal: {e}"),
        }
        let recovery = {
            let guard = read_lock(&shared.db);
            let db = guard.as_ref().expect("the database was just opened");
            Recovery::load(db, &lock(&shared.index))?
        };
        let writer = Writer::new(shared.clone(), next_seq);
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
                exporter: Mutex::new(None),
            }),
        };
        Ok((journal, recovery))
    }

    /// Tells `observer` of every commit from now on (its latency and the bytes it wrote). Only
    /// the first observer set is kept.
    pub fn observe(&self, observer: Arc<crate::observe::Observer>) {
        let _ = self.inner.shared.observer.set(observer);
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
        if let Some(record) = self.get(&request.task_id).await {
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
        self.finish_as(task_id, result, None, true).await
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
        self.finish_as(task_id, result, None, false).await
    }

    /// [`Journal::finish`] (`durable`) or [`Journal::finish_lazily`], with what the task ran
    /// for its audit record (the others audit what the task's request tells).
    pub async fn finish_audited(
        &self,
        task_id: &str,
        result: &RunResult,
        facts: Facts,
        durable: bool,
    ) -> Result<(), JournalError> {
        self.finish_as(task_id, result, Some(Box::new(facts)), durable)
            .await
    }

    async fn finish_as(
        &self,
        task_id: &str,
        result: &RunResult,
        facts: Option<Box<Facts>>,
        durable: bool,
    ) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Finish {
            task_id: task_id.to_string(),
            result: Box::new(result.clone()),
            durable,
            facts,
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
            let mut guard = lock(&self.inner.shared.index);
            let index = &mut *guard;
            for id in task_ids {
                if let Some((key, summary)) = index.tasks.get_key_value(id.as_str()) {
                    let (key, mut summary) = (key.clone(), *summary);
                    if summary.in_outbox() {
                        summary.acked = true;
                        index.set(key, summary);
                        forward.push(id.clone());
                    } else if summary.phase != TaskPhase::Done {
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

    /// How many batches the writer has committed since [`Journal::open`] (each at most one
    /// fsync: of the log's frame, or of a redb commit), and checkpoints: with group commit, far
    /// fewer than the writes asked for under load.
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// From now on, batches are committed through the write-ahead log (one sequential write and
    /// one `fdatasync` each, checkpointed into the redb file in the background): called once
    /// the running version is confirmed, since an older version does not read the log (a
    /// manual rollback [settles](settle) it first).
    pub fn use_log(&self) {
        if !self.inner.shared.use_log.swap(true, Ordering::SeqCst) {
            tracing::info!("the journal commits through its write-ahead log from now on");
        }
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

    #[test]
    fn a_journal_left_half_created_is_replaced_by_a_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = testkit::config(dir.path());
        let mut half = cfg.path.as_os_str().to_owned();
        half.push(".new");
        // What an agent killed while redb wrote the header leaves: not a redb file.
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        std::fs::write(&half, b"redb\x1a\x0a\xa9\x0d\x0a").unwrap();
        let (journal, _) = testkit::open(&cfg);
        drop(journal);
        assert!(!std::path::Path::new(&half).exists());
        assert_eq!(testkit::format_version(&cfg.path), 2);
        // And it opens again as it is.
        let _ = testkit::open(&cfg);
    }

    #[test]
    fn the_journal_is_shareable() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Journal>();
    }
}
