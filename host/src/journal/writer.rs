//! The writer thread and its group commit: it takes every write waiting, applies them in one
//! transaction, makes them durable once (with fsync unless none needs it) and only then answers
//! each caller.
//!
//! With the write-ahead log, a batch is durable once its frame is: its writes go into a redb
//! transaction the writer keeps open from one checkpoint to the next, committed (with fsync)
//! only at the checkpoint. The B-tree pages a batch changes are then copied once per
//! checkpoint, not once per batch, and only the writer sees its writes before the checkpoint:
//! it serves the reads ([`Read`]). Without the log, each batch commits on its own.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::error::{classify, split, Fail, JournalError};
use super::handlers::{put_handler_in, remove_handler_in};
use super::index::Change;
use super::ops::{accept_in, ack_in, audit_in, finish_in, start_in};
use super::queue::{Answer, Op, Read};
use super::records::Accept;
use super::reopen::reopen;
use super::retention::{prune_in, prune_now, PRUNE_EVERY};
use super::space::SpaceCheck;
use super::tables::Tables;
use super::{lock, log, now_ms, read_lock, Shared};
use crate::audit::Head;

/// The most operations the writer applies in one transaction.
pub const MAX_BATCH: usize = 1024;

/// How long writes committed without fsync (acknowledgements, results of tasks that ran) wait
/// for the next durable commit before the writer makes one of its own.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// How long writes that need no fsync (acknowledgements, results of tasks that ran) may wait
/// for a batch that commits anyway before they are committed on their own.
pub const HOLD: Duration = Duration::from_millis(2);

/// How long the writer waits, idle, before checkpointing the write-ahead log's frames into the
/// redb file.
pub const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// The values written into the open transaction after which the writer checkpoints (once the
/// batch is answered): past redb's write buffer (half its page cache), every batch would write
/// out and read back pages of a transaction that keeps growing.
pub const CHECKPOINT_BYTES: u64 = 256 << 10;

/// The writer thread's state.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The accept sequence number of the next new task.
    next_seq: u64,
    /// Tasks accepted since the last prune (pruning runs every `PRUNE_EVERY`).
    accepts_since_prune: usize,
    /// Whether new tasks may be recorded, checked for batches that accept some.
    space: SpaceCheck,
    /// An I/O failure left the database unusable: the next batch reopens it first.
    needs_reopen: bool,
    /// A commit made without fsync (or held acknowledgements) waits for a durable one.
    unflushed: bool,
    /// Writes that need no fsync (acknowledgements, lazy results) that came alone, applied
    /// with the next transaction.
    held: Vec<Op>,
    /// When the oldest held write arrived.
    held_since: Option<Instant>,
    /// The audit chain's head, as committed.
    chain: Head,
    /// The last log frame's buffer, reused for the next batch's.
    frame_buffer: Vec<u8>,
    /// With the log: the transaction holding every batch logged since the last checkpoint,
    /// committed by the next one.
    open: Option<Open>,
}

/// The transaction kept open between checkpoints, and the bytes of values written into it.
struct Open {
    txn: redb::WriteTransaction,
    bytes: u64,
}

impl Writer {
    /// A writer for a database just opened, whose next task gets `next_seq`.
    pub(super) fn new(shared: Arc<Shared>, next_seq: u64) -> Writer {
        let chain = lock(&shared.audit).written.clone();
        Writer {
            chain,
            shared,
            next_seq,
            accepts_since_prune: 0,
            space: SpaceCheck::default(),
            needs_reopen: false,
            unflushed: false,
            held: Vec::new(),
            held_since: None,
            frame_buffer: Vec::new(),
            open: None,
        }
    }

    /// The writer thread: waits for an operation, takes every one already waiting, commits
    /// them as one batch; returns once every [`Journal`](super::Journal) handle is dropped and
    /// the queue is empty, after a last durable commit.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            // `recv` fails only once every sender is gone and the queue is empty.
            let wait = match self.held_since {
                Some(since) => Some(HOLD.saturating_sub(since.elapsed())),
                None if self.unflushed => Some(FLUSH_AFTER),
                None => (self.log_has_frames() || self.open.is_some()).then_some(CHECKPOINT_IDLE),
            };
            let first = if let Some(wait) = wait {
                match rx.recv_timeout(wait) {
                    Ok(op) => op,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if self.held_since.is_some() {
                            self.commit_batch(Vec::new(), false);
                        } else if self.unflushed {
                            self.flush();
                        } else if let Err(e) = self.checkpoint() {
                            tracing::warn!("checkpointing the journal log: {e}");
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
            let mut writes = Vec::with_capacity(ops.len());
            let mut reads = Vec::new();
            for op in ops {
                match op {
                    Op::Read(read) => reads.push(read),
                    write => writes.push(write),
                }
            }
            // Writes that need no fsync, alone, wait for the next batch, at most [`HOLD`]: a
            // batch of their own would write the same B-tree pages the next task's writes again.
            if writes.iter().all(Op::needs_no_sync) {
                if !writes.is_empty() {
                    self.held.extend(writes);
                    self.held_since.get_or_insert_with(Instant::now);
                }
            } else {
                self.commit_batch(writes, false);
            }
            // Reads are served once the writes that came before them are applied.
            for read in reads {
                self.serve(read);
            }
        }
        // Writes committed without fsync become durable with the next durable commit: make one
        // before the database closes; and the log's frames go into the redb file.
        self.flush();
        if self.log_has_frames() || self.open.is_some() {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(
                    "checkpointing the journal log at close: {e} (replayed at the next open)"
                );
            }
        }
    }

    /// Serves a read in the open transaction, or else in a read transaction of its own.
    fn serve(&self, read: Read) {
        let guard = read_lock(&self.shared.db);
        read.serve(self.open.as_ref().map(|o| &o.txn), guard.as_ref());
    }

    /// Whether the log holds frames not yet checkpointed.
    fn log_has_frames(&self) -> bool {
        lock(&self.shared.log)
            .file
            .as_ref()
            .is_some_and(|f| f.has_frames())
    }

    /// Whether this batch goes through the log: in use, and open (opened here the first
    /// time). If so, the most payload a frame holds.
    fn log_ready(&self) -> Option<usize> {
        if !self.shared.use_log.load(Ordering::Relaxed) {
            return None;
        }
        let mut state = lock(&self.shared.log);
        if let Some(f) = &state.file {
            return Some(f.max_payload());
        }
        if state.failed {
            return None;
        }
        let capacity = log::capacity(self.shared.config.max_bytes);
        match log::Log::open(&self.shared.config.path, capacity) {
            Ok(f) => {
                tracing::info!(log = %f.path().display(), capacity, "the journal log is open");
                let max = f.max_payload();
                state.file = Some(f);
                Some(max)
            }
            Err(e) => {
                tracing::error!("opening the journal log: {e}; commits stay in the redb file");
                state.failed = true;
                None
            }
        }
    }

    /// Writes a committed batch's frame to the log (synced if `sync`); a frame that does not
    /// fit (or was not kept, being larger than the log), or a write that fails, is made
    /// durable by a checkpoint instead.
    fn log_batch(&mut self, redo: &mut log::Redo, sync: bool) -> Result<(), JournalError> {
        let written = {
            let mut state = lock(&self.shared.log);
            let generation = state.generation;
            match state.file.as_mut() {
                None => Err("the log is not open".to_string()),
                Some(_) if redo.overflowed => Err(String::new()),
                Some(f) if redo.payload().is_empty() => {
                    if sync {
                        f.sync().map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    }
                }
                Some(f) if f.fits(redo.payload().len()) => {
                    f.append(generation, redo, sync).map_err(|e| e.to_string())
                }
                Some(_) => Err(String::new()),
            }
        };
        match written {
            Ok(()) => Ok(()),
            Err(why) => {
                if !why.is_empty() {
                    tracing::warn!("writing the journal log: {why}; checkpointing instead");
                }
                self.checkpoint()
            }
        }
    }

    /// A checkpoint: a durable redb commit (of the open transaction, if there is one) that
    /// moves the log to its next generation (every write so far is then in the redb file,
    /// durably). If it fails, what the open transaction held is in the log alone: the next
    /// batch reopens the file, which replays the log.
    fn checkpoint(&mut self) -> Result<(), JournalError> {
        let open = self.open.take();
        let held_batches = open.is_some();
        let guard = read_lock(&self.shared.db);
        let Some(db) = guard.as_ref() else {
            self.needs_reopen |= held_batches;
            return Err(JournalError::Io("the journal database is closed".into()));
        };
        let started = Instant::now();
        let next = lock(&self.shared.log).generation + 1;
        let txn = match open {
            Some(open) => Ok(open.txn),
            None => db.begin_write().map_err(redb::Error::from),
        };
        let committed = txn.and_then(|txn| match log::set_generation(&txn, next) {
            Ok(()) => txn.commit().map_err(redb::Error::from),
            Err(Fail::Transaction(e)) => Err(e),
            Err(Fail::Alone(e)) => Err(redb::Error::Corrupted(e.to_string())),
        });
        drop(guard);
        match committed {
            Ok(()) => {
                self.observe_commit(started, 0);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.checkpointed(Some(next));
                self.unflushed = false;
                self.shared.audit_durable();
                Ok(())
            }
            Err(e) => {
                let (e, fatal) = classify(e);
                self.needs_reopen |= fatal || held_batches;
                Err(e)
            }
        }
    }

    /// A durable commit of the held acknowledgements, or an empty one: what earlier commits
    /// without fsync wrote reaches the disk.
    fn flush(&mut self) {
        if !self.held.is_empty() {
            return self.commit_batch(Vec::new(), true);
        }
        let synced = {
            let mut state = lock(&self.shared.log);
            match state.file.as_mut() {
                Some(f) if f.unsynced() => Some(f.sync()),
                _ => None,
            }
        };
        match synced {
            Some(Ok(())) => {
                self.unflushed = false;
                self.shared.audit_durable();
                return;
            }
            Some(Err(e)) => {
                tracing::warn!("syncing the journal log: {e}; checkpointing instead");
                if let Err(e) = self.checkpoint() {
                    tracing::warn!("the journal's flush checkpoint failed: {e}");
                }
                return;
            }
            None => {}
        }
        if self.open.is_some() {
            // Every batch in the open transaction is in the log, which is synced.
            self.unflushed = false;
            self.shared.audit_durable();
            return;
        }
        let guard = read_lock(&self.shared.db);
        let Some(db) = guard.as_ref() else {
            // Closed after an I/O failure: nothing left to flush; the next batch reopens it.
            self.unflushed = false;
            return;
        };
        let started = Instant::now();
        let committed = db.begin_write().map_err(redb::Error::from).and_then(|t| {
            let stamp = match self.shared.stamp(&t) {
                Ok(stamp) => stamp,
                Err(Fail::Transaction(e)) => return Err(e),
                Err(Fail::Alone(e)) => return Err(redb::Error::Corrupted(e.to_string())),
            };
            t.commit().map_err(redb::Error::from)?;
            Ok(stamp)
        });
        match committed {
            Ok(stamp) => {
                self.shared.checkpointed(stamp);
                self.observe_commit(started, 0);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.unflushed = false;
                self.shared.audit_durable();
            }
            Err(e) => tracing::warn!("the journal's flush commit failed: {e}"),
        }
    }

    /// Applies the held acknowledgements and `ops` in one transaction, commits (with fsync if
    /// `durable` or if an operation needs it), answers.
    fn commit_batch(&mut self, mut ops: Vec<Op>, durable: bool) {
        if !self.held.is_empty() {
            self.held_since = None;
            let mut held = std::mem::take(&mut self.held);
            held.append(&mut ops);
            ops = held;
        }
        if self.needs_reopen {
            // What the open transaction held is in the log, which the reopening replays.
            self.open = None;
            match reopen(&self.shared) {
                Ok(next_seq) => {
                    self.next_seq = self.next_seq.max(next_seq);
                    self.chain = lock(&self.shared.audit).written.clone();
                    self.needs_reopen = false;
                }
                Err(e) => {
                    tracing::error!("reopening the journal after an I/O failure: {e}");
                    for op in ops {
                        Answer::unapplied(op).send(Some(&e));
                    }
                    return;
                }
            }
        }
        let space = if ops.iter().any(|op| matches!(op, Op::Accept { .. })) {
            // Past twice its size limit, the file is pruned and compacted (after a checkpoint:
            // both need the open transaction committed); a prune restarts the count towards
            // the next periodic one.
            let mut space = std::mem::take(&mut self.space);
            let shared = self.shared.clone();
            let verdict = space.check(&shared, || {
                if self.open.is_some() {
                    self.checkpoint()?;
                }
                let n = prune_now(&shared)?;
                if n > 0 {
                    self.accepts_since_prune = 0;
                }
                Ok(n)
            });
            self.space = space;
            verdict
        } else {
            Ok(())
        };
        // Through the log: the batch goes into the open transaction, its frame is what is
        // durable.
        let frame_limit = self.log_ready();
        let via_log = frame_limit.is_some();
        if !via_log && self.open.is_some() {
            // The log stopped being usable: what the open transaction holds is committed first.
            if let Err(e) = self.checkpoint() {
                tracing::warn!("checkpointing the journal log: {e}");
            }
        }
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
        let lazy = !durable && ops.iter().all(Op::needs_no_sync);
        let started = Instant::now();
        let open = if via_log { self.open.take() } else { None };
        let (held_batches, held_bytes) = (open.is_some(), open.as_ref().map_or(0, |o| o.bytes));
        let txn = match open.map_or_else(|| db.begin_write(), |o| Ok(o.txn)) {
            Ok(mut txn) => {
                if lazy && !via_log {
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
        let mut written = 0;
        let mut ops = ops.into_iter();
        let mut chain = None;
        let mut redo = log::Redo::default();
        let mut pruned = false;
        match Tables::open(&txn, &shared.index, self.chain.clone()) {
            Ok(mut t) => {
                t.auditing = shared.config.audit;
                if let Some(limit) = frame_limit {
                    t.redo = log::Redo::start(std::mem::take(&mut self.frame_buffer), limit);
                }
                for op in ops.by_ref() {
                    let (answer, storage) = self.apply(&mut t, op, now, &space, &mut changes);
                    answers.push(answer);
                    if storage.is_some() {
                        failure = storage;
                        break;
                    }
                }
                if failure.is_none() && self.accepts_since_prune >= PRUNE_EVERY {
                    match prune_in(&mut t, &shared.config, now, &mut changes) {
                        Ok(_) => {
                            self.accepts_since_prune = 0;
                            pruned = true;
                        }
                        Err(Fail::Transaction(e)) => failure = Some(e),
                        Err(Fail::Alone(e)) => tracing::warn!("pruning the journal: {e}"),
                    }
                }
                written = t.written;
                redo = std::mem::take(&mut t.redo);
                chain = Some(t.chain.clone());
                if t.audit_added > 0 || t.audit_freed > 0 {
                    changes.push(Change::AuditBytes {
                        added: t.audit_added,
                        freed: t.audit_freed,
                    });
                }
            }
            Err(e) => failure = Some(e.into()),
        }
        #[cfg(test)]
        if failure.is_none() && shared.fail_next_batch.swap(false, Ordering::SeqCst) {
            failure = Some(redb::Error::Corrupted(
                "a failure injected by a test".into(),
            ));
        }
        answers.extend(ops.map(Answer::unapplied));
        pruned |= answers.iter().any(|a| matches!(a, Answer::Count(..)));
        // A durable commit without the log holds the log's frames too: it is a checkpoint.
        let stamp = match (&failure, lazy || via_log) {
            (None, false) => match shared.stamp(&txn) {
                Ok(stamp) => stamp,
                Err(Fail::Transaction(e)) => {
                    failure = Some(e);
                    None
                }
                Err(Fail::Alone(e)) => {
                    failure = Some(redb::Error::Corrupted(e.to_string()));
                    None
                }
            },
            _ => None,
        };
        let outcome = match failure {
            Some(e) => {
                let _ = txn.abort();
                // The batches logged before this one went with it: the log has them.
                self.needs_reopen |= held_batches;
                Err(e)
            }
            None if via_log => {
                self.open = Some(Open {
                    txn,
                    bytes: held_bytes + written,
                });
                Ok(())
            }
            None => txn.commit().map_err(redb::Error::from),
        };
        drop(guard);
        let outcome = match outcome {
            Ok(()) if via_log => {
                // The batch is durable once its frame is, or once checkpointed (after a prune,
                // rather than a frame of every removal).
                let logged = if pruned {
                    self.checkpoint()
                } else {
                    self.log_batch(&mut redo, !lazy)
                };
                self.frame_buffer = redo.into_buffer();
                // Neither logged nor checkpointed: reopening replays the log and reconciles the
                // file with the index.
                self.needs_reopen |= logged.is_err();
                logged.map_err(|e| redb::Error::Corrupted(e.to_string()))
            }
            Ok(()) => {
                self.shared.checkpointed(stamp);
                Ok(())
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                self.observe_commit(started, written);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.unflushed = lazy;
                self.apply_changes(changes);
                if let Some(chain) = chain {
                    self.chain = chain.clone();
                    lock(&self.shared.audit).written = chain;
                }
                if !lazy {
                    self.shared.audit_durable();
                }
                for answer in answers {
                    answer.send(None);
                }
                if self
                    .open
                    .as_ref()
                    .is_some_and(|o| o.bytes >= CHECKPOINT_BYTES)
                {
                    if let Err(e) = self.checkpoint() {
                        tracing::warn!("checkpointing the journal log: {e}");
                    }
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

    /// Applies one operation (what each kind does is in `ops`, `handlers`, `retention`);
    /// returns its answer, and the storage error that fails the whole transaction, if any.
    /// Tells the observer, if any, of a commit begun at `started` that wrote `bytes`.
    fn observe_commit(&self, started: Instant, bytes: u64) {
        if let Some(observer) = self.shared.observer.get() {
            observer.journal_commit(started.elapsed(), bytes);
        }
    }

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
                let accepted = accept_in(
                    t,
                    &request,
                    running,
                    early.as_ref(),
                    self.next_seq,
                    now,
                    space,
                    &self.shared.config,
                    changes,
                );
                if let Ok(Accept::New) = accepted {
                    self.next_seq += 1;
                    self.accepts_since_prune += 1;
                }
                let (r, e) = split(accepted);
                (Answer::Accept(reply, Box::new(r)), e)
            }
            Op::Start { task_id, reply } => {
                let (r, e) = split(start_in(t, &task_id, changes));
                (Answer::Unit(reply, r), e)
            }
            Op::Finish {
                task_id,
                result,
                facts,
                reply,
                ..
            } => {
                let (r, e) = split(finish_in(
                    t,
                    &task_id,
                    *result,
                    facts.as_deref(),
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
            Op::Audit {
                task_id,
                facts,
                result,
            } => {
                let max_bytes = self.shared.config.max_bytes;
                let (r, e) = split(audit_in(t, &task_id, &facts, &result, now, max_bytes));
                if let Err(err) = r {
                    tracing::warn!(task_id = %task_id, "auditing a refusal: {err}");
                }
                (Answer::Nothing, e)
            }
            Op::AuditSeed { head } => {
                if t.chain.seq == 0 {
                    t.chain = head;
                }
                (Answer::Nothing, None)
            }
            Op::AuditExported { through } => {
                let (r, e) = split(t.audit_exported(through));
                if let Err(err) = r {
                    tracing::warn!("removing exported audit records: {err}");
                }
                (Answer::Nothing, e)
            }
            Op::PutHandler { handler, reply } => {
                let (r, e) = split(put_handler_in(t, handler, changes));
                (Answer::Unit(reply, r), e)
            }
            Op::RemoveHandler { name, reply } => {
                let (r, e) = split(remove_handler_in(t, name, changes));
                (Answer::Bool(reply, r), e)
            }
            Op::Prune { reply } => {
                let (r, e) = split(prune_in(t, &self.shared.config, now, changes));
                (Answer::Count(reply, r), e)
            }
            // `run` serves reads after the batch; one that came here sees it as it stands.
            Op::Read(read) => {
                read.answer(&t.records, &t.results, &t.audit);
                (Answer::Nothing, None)
            }
        }
    }

    /// Brings the in-memory index up to date with a batch that committed.
    fn apply_changes(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            lock(&self.shared.index).apply(changes);
        }
    }
}

#[cfg(test)]
mod tests;
