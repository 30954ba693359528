//! Retention: finished and acknowledged records pruned by age and by count, at open, every
//! `PRUNE_EVERY` acceptances and on demand; queued, running and unacknowledged ones never.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use super::error::{db_error, Fail, JournalError, Res};
use super::index::Change;
use super::queue::Op;
use super::records::TaskPhase;
use super::tables::Tables;
use super::{lock, now_ms, read_lock, stopped, Journal, JournalConfig, Shared};

/// The writer prunes after this many accepted tasks (and at open).
pub const PRUNE_EVERY: usize = 1000;

/// Removes finished and acknowledged records per the retention settings of `config`, in the
/// caller's transaction.
pub(super) fn prune_in(
    t: &mut Tables<'_>,
    config: &JournalConfig,
    now: u64,
    changes: &mut Vec<Change>,
) -> Result<usize, Fail> {
    let retention_ms = u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX);
    // The index may lag this batch's own writes; it never shows a record as finished and
    // acknowledged that is not (on disk, or about to be in this very transaction).
    let mut finished: Vec<(u64, Arc<str>, u64)> = lock(t.index)
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
    let bytes = {
        let index = lock(t.index);
        doomed
            .iter()
            .map(|(_, id)| index.tasks.get(id).map_or(0, |m| m.bytes))
            .sum()
    };
    let mut seqs: Vec<u64> = doomed.iter().map(|(seq, _)| *seq).collect();
    // Expired tasks first, then the oldest kept ones past `max_records`: not one ascending run.
    seqs.sort_unstable();
    t.remove_sorted(&seqs, bytes)?;
    let n = doomed.len();
    changes.extend(doomed.into_iter().map(|(_, id)| Change::Remove(id)));
    Ok(n)
}

/// Prunes in a transaction of its own (on the writer thread, or at open before it starts), and
/// updates the index; how many records were removed.
pub(super) fn prune_now(shared: &Shared) -> Res<usize> {
    let guard = read_lock(&shared.db);
    let db = guard
        .as_ref()
        .ok_or_else(|| JournalError::Io("the journal database is closed".into()))?;
    let txn = db.begin_write().map_err(db_error)?;
    let mut changes = Vec::new();
    let n = {
        let chain = lock(&shared.audit).written.clone();
        let mut t = Tables::open(&txn, &shared.index, chain).map_err(db_error)?;
        match prune_in(&mut t, &shared.config, now_ms(), &mut changes) {
            Ok(n) => n,
            Err(Fail::Alone(e)) => return Err(e),
            Err(Fail::Transaction(e)) => return Err(db_error(e)),
        }
    };
    if n == 0 {
        let _ = txn.abort();
        return Ok(0);
    }
    let stamp = match shared.stamp(&txn) {
        Ok(stamp) => stamp,
        Err(Fail::Alone(e)) => return Err(e),
        Err(Fail::Transaction(e)) => return Err(db_error(e)),
    };
    txn.commit().map_err(db_error)?;
    shared.checkpointed(stamp);
    drop(guard);
    shared.commits.fetch_add(1, Ordering::Relaxed);
    lock(&shared.index).apply(changes);
    Ok(n)
}

impl Journal {
    /// Prunes finished and acknowledged records older than [`JournalConfig::retention`] and,
    /// oldest first, beyond [`JournalConfig::max_records`]; never a queued, running or
    /// unacknowledged one. Returns how many were removed. The writer also prunes on its own
    /// (at open and every [`PRUNE_EVERY`] accepted tasks).
    ///
    /// Blocks the calling thread until the writer has committed (about one commit).
    ///
    /// [`JournalConfig::retention`]: super::JournalConfig::retention
    /// [`JournalConfig::max_records`]: super::JournalConfig::max_records
    pub fn prune(&self) -> Result<usize, JournalError> {
        let (reply, rx) = mpsc::channel();
        self.send(Op::Prune { reply })?;
        rx.recv().map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::testkit::*;
    use crate::journal::Accept;
    use std::time::Duration;

    /// A journal's configuration in `dir` under which a prune removes every finished,
    /// acknowledged record, however recent.
    fn no_retention(dir: &std::path::Path) -> crate::journal::JournalConfig {
        let mut cfg = config(dir);
        cfg.retention = Duration::ZERO;
        cfg
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
        let cfg = no_retention(dir.path());
        let (j, _) = open(&cfg);
        populate(&j).await;
        assert_eq!(j.counts(), (10, 3));
        assert_eq!(j.prune().unwrap(), 5);
        assert_eq!(j.counts(), (5, 3));
        for id in ["q", "r", "u0", "u1", "u2"] {
            assert!(j.get_blocking(id).is_some(), "{id} was pruned");
        }
        assert!(j.get_blocking("a0").is_none());
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
    async fn prune_keeps_the_tasks_between_the_ones_it_removes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = no_retention(dir.path());
        let (j, _) = open(&cfg);
        // Accepted in this order: each unacked or unfinished task sits between two pruned ones.
        for (i, id) in ["a0", "u0", "a1", "q", "a2", "r", "a3"]
            .into_iter()
            .enumerate()
        {
            j.accept(&request(id)).await.unwrap();
            if id.starts_with('r') {
                j.start(id).await.unwrap();
            }
            if id.starts_with(['a', 'u']) {
                j.finish(id, &result(id)).await.unwrap();
            }
            if id.starts_with('a') {
                j.ack(&[id.to_string()]);
            }
            assert_eq!(j.counts().0, i + 1);
        }
        assert_eq!(j.prune().unwrap(), 4);
        for (id, kept) in [
            ("u0", true),
            ("q", true),
            ("r", true),
            ("a0", false),
            ("a3", false),
        ] {
            assert_eq!(j.get_blocking(id).is_some(), kept, "{id}");
        }
        drop(j);
        let (j, recovery) = open(&cfg);
        assert_eq!(j.counts(), (3, 1));
        assert_eq!(j.get_blocking("u0").unwrap().result.unwrap(), result("u0"));
        assert_eq!(recovery.queued.len(), 1);
        assert_eq!(recovery.running.len(), 1);
        for id in ["a0", "a1", "a2", "a3"] {
            assert!(
                j.get_blocking(id).is_none(),
                "{id} came back after a reopen"
            );
        }
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
            .filter(|id| j.get_blocking(id).is_some())
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
}
