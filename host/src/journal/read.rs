//! Reading: lookups answered from the in-memory index, records read by the writer (one task,
//! the unacknowledged results, a batch of them, counts): between checkpoints, what it wrote is
//! in its open transaction only.

use std::sync::{mpsc, Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use tokio::sync::oneshot;

use super::error::{db_error, JournalError, Res};
use super::queue::{Op, Read, Reply};
use super::records::{TaskPhase, TaskRecord};
use super::schema::{assemble, Summary, AUDIT, RECORDS, RESULTS};
use super::{lock, Journal};

impl Journal {
    /// Every finished and unacknowledged record, in accept order: the results to send again
    /// after a reconnect.
    pub fn unacked(&self) -> Vec<TaskRecord> {
        let ids = self.unacked_ids();
        self.unacked_of(&ids)
    }

    /// The task ids of [`Journal::unacked`], in the same order, without reading the records
    /// (a backlog can then be read a few at a time).
    pub fn unacked_ids(&self) -> Vec<String> {
        lock(&self.inner.shared.index)
            .outbox
            .values()
            .map(|id| id.to_string())
            .collect()
    }

    /// How many of `ids`, in order, hold at most `bytes` together as stored (at least one, if
    /// there is one): a batch of results to read at once.
    pub fn batch_within<'a>(&self, ids: impl Iterator<Item = &'a String>, bytes: u64) -> usize {
        let index = lock(&self.inner.shared.index);
        let mut total = 0;
        let mut n = 0;
        for id in ids {
            total += index.tasks.get(id.as_str()).map_or(0, |m| m.bytes);
            if n > 0 && total > bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// The records of `ids` that are still finished and unacknowledged, in order. Blocks until
    /// the writer gets to it (see [`Journal::get`]).
    pub fn unacked_of(&self, ids: &[String]) -> Vec<TaskRecord> {
        if ids.is_empty() {
            return Vec::new();
        }
        let wanted: Vec<(Arc<str>, Summary)> = {
            let index = lock(&self.inner.shared.index);
            ids.iter()
                .filter_map(|id| index.tasks.get_key_value(id.as_str()))
                .filter(|(_, m)| m.in_outbox())
                .map(|(id, m)| (id.clone(), *m))
                .collect()
        };
        self.read_tasks_blocking(wanted)
            .into_iter()
            .flatten()
            .filter(|r| r.phase == TaskPhase::Done && !r.acked)
            .collect()
    }

    /// One task's record. An id the journal does not have is answered at once from its index;
    /// a record is read by the writer, after the writes queued before it, so this waits for
    /// the commit or checkpoint it is in the middle of.
    pub async fn get(&self, task_id: &str) -> Option<TaskRecord> {
        let wanted = self.wanted(task_id)?;
        let (reply, rx) = oneshot::channel();
        self.ask(wanted, Reply::Awaited(reply))?;
        rx.await.ok()?.pop().flatten()
    }

    /// [`Journal::get`] for a caller that is not async (or holds a lock it cannot await
    /// under): blocks the thread until the writer answers.
    pub fn get_blocking(&self, task_id: &str) -> Option<TaskRecord> {
        let wanted = self.wanted(task_id)?;
        self.read_tasks_blocking(wanted).pop().flatten()
    }

    /// The index entry of `task_id`, as the writer's read asks for it.
    fn wanted(&self, task_id: &str) -> Option<Vec<(Arc<str>, Summary)>> {
        let index = lock(&self.inner.shared.index);
        let (id, summary) = index.tasks.get_key_value(task_id)?;
        Some(vec![(id.clone(), *summary)])
    }

    /// The records of `wanted`, read by the writer (see [`Read`]) and brought up to date with
    /// their entries (`None` for a missing or unreadable one). Blocks until the writer gets to
    /// it (after the writes queued before).
    fn read_tasks_blocking(&self, wanted: Vec<(Arc<str>, Summary)>) -> Vec<Option<TaskRecord>> {
        let n = wanted.len();
        let (reply, rx) = mpsc::channel();
        if self.ask(wanted, Reply::Blocking(reply)).is_none() {
            return vec![None; n];
        }
        rx.recv().unwrap_or_else(|_| vec![None; n])
    }

    /// Queues the read of `wanted` for the writer; `None` if it has stopped.
    fn ask(
        &self,
        wanted: Vec<(Arc<str>, Summary)>,
        reply: Reply<Vec<Option<TaskRecord>>>,
    ) -> Option<()> {
        self.send(Op::Read(Read::Tasks { wanted, reply })).ok()
    }

    /// `(records, unacknowledged results)`, for logs and status.
    pub fn counts(&self) -> (usize, usize) {
        let index = lock(&self.inner.shared.index);
        (index.tasks.len(), index.outbox.len())
    }
}

/// The records of `wanted` in these tables (an open transaction's or a read transaction's),
/// brought up to date with their entries (`None` for a missing or unreadable one).
fn tasks_in<R>(
    records: &R,
    results: &R,
    wanted: &[(Arc<str>, Summary)],
) -> Res<Vec<Option<TaskRecord>>>
where
    R: ReadableTable<u64, &'static [u8]>,
{
    let mut out = Vec::with_capacity(wanted.len());
    for (id, summary) in wanted {
        let record = match records.get(summary.seq).map_err(db_error)? {
            Some(v) => match assemble(
                id,
                summary,
                v.value(),
                results
                    .get(summary.seq)
                    .map_err(db_error)?
                    .as_ref()
                    .map(|f| f.value()),
            ) {
                // The index may lag a commit for a moment, never lead to another task.
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
}

/// The audit records after `after` through `through` in this table, in order, at most `max`.
fn audit_lines_in<R>(audit: &R, after: u64, through: u64, max: usize) -> Res<Vec<(u64, Vec<u8>)>>
where
    R: ReadableTable<u64, &'static [u8]>,
{
    let mut lines = Vec::new();
    if through <= after {
        return Ok(lines);
    }
    for item in audit.range(after + 1..=through).map_err(db_error)? {
        let (k, v) = item.map_err(db_error)?;
        lines.push((k.value(), v.value().to_vec()));
        if lines.len() >= max {
            break;
        }
    }
    Ok(lines)
}

impl Read {
    /// Answers from these tables (an open write transaction's or a read transaction's).
    pub(super) fn answer<R>(self, records: &R, results: &R, audit: &R)
    where
        R: ReadableTable<u64, &'static [u8]>,
    {
        match self {
            Read::Tasks { wanted, reply } => {
                let records = tasks_in(records, results, &wanted).unwrap_or_else(|e| {
                    tracing::error!("reading the journal: {e}");
                    vec![None; wanted.len()]
                });
                reply.send(records);
            }
            Read::Audit {
                after,
                through,
                max,
                reply,
            } => {
                let _ = reply.send(audit_lines_in(audit, after, through, max));
            }
        }
    }

    /// Answers that the read failed.
    fn fail(self, e: JournalError) {
        match self {
            Read::Tasks { wanted, reply } => {
                tracing::error!("reading the journal: {e}");
                reply.send(vec![None; wanted.len()]);
            }
            Read::Audit { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Answers in `open` (the writer's open transaction) if there is one, else in a read
    /// transaction of `db`.
    pub(super) fn serve(self, open: Option<&redb::WriteTransaction>, db: Option<&Database>) {
        match (open, db) {
            (Some(txn), _) => self.answer_in(tables(|d| txn.open_table(d))),
            (None, Some(db)) => match db.begin_read() {
                Ok(txn) => self.answer_in(tables(|d| txn.open_table(d))),
                Err(e) => self.fail(db_error(e)),
            },
            (None, None) => self.fail(JournalError::Io("the journal database is closed".into())),
        }
    }

    fn answer_in<R>(self, tables: Res<[R; 3]>)
    where
        R: ReadableTable<u64, &'static [u8]>,
    {
        match tables {
            Ok([records, results, audit]) => self.answer(&records, &results, &audit),
            Err(e) => self.fail(e),
        }
    }
}

/// The tables a [`Read`] reads (records, results, audit), opened with `open`.
fn tables<T>(
    open: impl Fn(TableDefinition<'static, u64, &'static [u8]>) -> Result<T, TableError>,
) -> Res<[T; 3]> {
    Ok([
        open(RECORDS).map_err(db_error)?,
        open(RESULTS).map_err(db_error)?,
        open(AUDIT).map_err(db_error)?,
    ])
}
