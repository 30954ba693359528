//! Reading: lookups answered from the in-memory index, records read in redb read transactions
//! alongside the writer (one task, the unacknowledged results, a batch of them, counts).

use std::sync::Arc;

use redb::ReadableDatabase;

use super::error::{db_error, JournalError, Res};
use super::records::{TaskPhase, TaskRecord};
use super::schema::{assemble, Summary, RECORDS, RESULTS};
use super::{lock, read_lock, Journal};

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

    /// The records of `ids` that are still finished and unacknowledged, in order.
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
        self.read_tasks(&wanted)
            .into_iter()
            .flatten()
            .filter(|r| r.phase == TaskPhase::Done && !r.acked)
            .collect()
    }

    /// One task's record.
    pub fn get(&self, task_id: &str) -> Option<TaskRecord> {
        let wanted = {
            let index = lock(&self.inner.shared.index);
            let (id, summary) = index.tasks.get_key_value(task_id)?;
            [(id.clone(), *summary)]
        };
        self.read_tasks(&wanted).into_iter().next().flatten()
    }

    /// The records of `wanted`, read in one transaction and brought up to date with their
    /// entries (`None` for a missing or unreadable one).
    fn read_tasks(&self, wanted: &[(Arc<str>, Summary)]) -> Vec<Option<TaskRecord>> {
        let read = || -> Res<Vec<Option<TaskRecord>>> {
            let guard = read_lock(&self.inner.shared.db);
            let db = guard
                .as_ref()
                .ok_or_else(|| JournalError::Io("the journal database is closed".into()))?;
            let txn = db.begin_read().map_err(db_error)?;
            let records = txn.open_table(RECORDS).map_err(db_error)?;
            let results = txn.open_table(RESULTS).map_err(db_error)?;
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
        };
        match read() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("reading the journal: {e}");
                vec![None; wanted.len()]
            }
        }
    }

    /// `(records, unacknowledged results)`, for logs and status.
    pub fn counts(&self) -> (usize, usize) {
        let index = lock(&self.inner.shared.index);
        (index.tasks.len(), index.outbox.len())
    }
}
