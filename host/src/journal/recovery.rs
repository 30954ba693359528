//! What `Journal::open` found unfinished: tasks accepted and never started (to run), and tasks
//! that were running when the agent stopped.

use std::sync::Arc;

use redb::{Database, ReadableDatabase};

use super::error::{db_error, JournalError, Res};
use super::index::Index;
use super::records::{TaskPhase, TaskRecord};
use super::schema::{decode, Summary, RECORDS};

/// What [`Journal::open`](super::Journal::open) found unfinished, each list in accept order.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Recorded as queued: accepted and never started. To be run.
    pub queued: Vec<TaskRecord>,
    /// Recorded as running: the agent stopped while the task ran.
    pub running: Vec<TaskRecord>,
}

impl Recovery {
    /// The full records of the unfinished tasks, in accept order.
    pub(super) fn load(db: &Database, index: &Index) -> Res<Recovery> {
        let mut unfinished: Vec<(&Summary, &Arc<str>)> = index
            .tasks
            .iter()
            .filter(|(_, m)| m.phase != TaskPhase::Done)
            .map(|(id, m)| (m, id))
            .collect();
        unfinished.sort_unstable_by_key(|(m, _)| m.seq);
        let txn = db.begin_read().map_err(db_error)?;
        let records = txn.open_table(RECORDS).map_err(db_error)?;
        let mut recovery = Recovery::default();
        for (summary, id) in unfinished {
            let Some(v) = records.get(summary.seq).map_err(db_error)? else {
                return Err(JournalError::Io(format!(
                    "task {id:?} is indexed but has no record"
                )));
            };
            let mut record: TaskRecord = decode("task", id, v.value())?;
            summary.overlay(&mut record);
            match record.phase {
                TaskPhase::Queued => recovery.queued.push(record),
                TaskPhase::Running => recovery.running.push(record),
                TaskPhase::Done => {}
            }
        }
        Ok(recovery)
    }
}
