//! The writes queued to the writer thread (`Op`), each with the channel its caller waits on,
//! and the answer each gets once its batch commits or fails (`Answer`); and the reads it serves
//! (`Read`): between checkpoints only its open transaction holds what it wrote.

use std::sync::{mpsc, Arc};

use bridge_protocol::RunRequest;
use tokio::sync::oneshot;

use crate::audit::Facts;
use crate::outcome::RunResult;

use super::early::EarlyResult;
use super::error::{JournalError, Res};
use super::records::{Accept, HandlerRecord, TaskRecord};
use super::schema::Summary;

/// A write queued to the writer, with the channel its answer goes to (an acknowledgement has
/// none: no one waits for it).
pub(super) enum Op {
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
        /// What the task ran, for its audit record (`None`: what its request tells).
        facts: Option<Box<Facts>>,
        reply: oneshot::Sender<Res<()>>,
    },
    Ack {
        task_ids: Vec<String>,
    },
    /// The audit record of a refusal that is not otherwise recorded (no one waits).
    Audit {
        task_id: String,
        facts: Box<Facts>,
        result: Box<RunResult>,
    },
    /// The audit records through this sequence number are in the audit files: removed from
    /// the journal (but the chain's last one).
    AuditExported {
        through: u64,
    },
    /// The journal holds no audit record: its chain goes on from this head (the audit files').
    AuditSeed {
        head: crate::audit::Head,
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
    /// Not a write: served once the writes queued before it are applied.
    Read(Read),
}

/// An audit record's sequence number and line.
pub(super) type AuditLine = (u64, Vec<u8>);

/// A read the writer serves, in its open transaction if it has one (the writes logged since
/// the last checkpoint are there and nowhere else in redb), else in a read transaction.
pub(super) enum Read {
    /// The records of these tasks, brought up to date with their entries (`None` for a missing
    /// or unreadable one).
    Tasks {
        wanted: Vec<(Arc<str>, Summary)>,
        reply: Reply<Vec<Option<TaskRecord>>>,
    },
    /// The audit records after `after` through `through`, in order, at most `max`.
    Audit {
        after: u64,
        through: u64,
        max: usize,
        reply: mpsc::Sender<Res<Vec<AuditLine>>>,
    },
}

/// Where a read's answer goes: to a thread that blocks on it, or to a task that awaits it
/// (which then leaves its async worker free while the writer finishes a commit or a
/// checkpoint before it gets to the read).
pub(super) enum Reply<T> {
    Blocking(mpsc::Sender<T>),
    Awaited(oneshot::Sender<T>),
}

impl<T> Reply<T> {
    /// Answers; nothing happens if the asker has gone.
    pub(super) fn send(self, answer: T) {
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Awaited(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

impl Op {
    /// Whether this write may wait for the next durable commit rather than reach the disk at
    /// once (no fsync of its own): an acknowledgement, a result not asked to be durable, an
    /// audit record of a refusal, the removal of exported audit records. The writer holds such
    /// writes for the next batch and commits a batch of them alone without fsync (why a crash
    /// may lose them: `Writer::commit_batch`).
    pub(super) fn needs_no_sync(&self) -> bool {
        matches!(
            self,
            Op::Ack { .. }
                | Op::Finish { durable: false, .. }
                | Op::Audit { .. }
                | Op::AuditExported { .. }
        )
    }
}

/// An operation's reply channel with the answer it gets if its batch commits.
pub(super) enum Answer {
    Accept(oneshot::Sender<Res<Accept>>, Box<Res<Accept>>),
    Unit(oneshot::Sender<Res<()>>, Res<()>),
    Bool(oneshot::Sender<Res<bool>>, Res<bool>),
    Count(mpsc::Sender<Res<usize>>, Res<usize>),
    Nothing,
}

impl Answer {
    /// The answer of an operation that was not applied (its batch failed first).
    pub(super) fn unapplied(op: Op) -> Answer {
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
            Op::Ack { .. }
            | Op::Audit { .. }
            | Op::AuditExported { .. }
            | Op::AuditSeed { .. }
            | Op::Read(_) => Answer::Nothing,
        }
    }

    /// Sends the answer, or `failure` (the batch's) instead.
    pub(super) fn send(self, failure: Option<&JournalError>) {
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
