//! The audit chain's records in the journal: the head at open, and what the exporter reads
//! (records made durable) and tells the writer it exported. The records are made by the
//! writer, in the transaction that records each result (`Tables::audit`).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::error::{db_error, Res};
use super::queue::{Op, Read};
use super::schema::{stored_size, AUDIT};
use super::{lock, Journal, Shared};
use crate::audit::{head_after, Facts, Head};
use crate::outcome::RunResult;

/// The chain's head (the table's last record) and the bytes the table holds.
pub(super) fn load(db: &Database) -> Res<(Head, u64)> {
    let txn = db.begin_read().map_err(db_error)?;
    let table = txn.open_table(AUDIT).map_err(db_error)?;
    let mut bytes = 0;
    for item in table.iter().map_err(db_error)? {
        let (_, v) = item.map_err(db_error)?;
        bytes += stored_size(v.value().len());
    }
    let head = match table.last().map_err(db_error)? {
        Some((k, v)) => head_after(k.value(), v.value()),
        None => Head::default(),
    };
    Ok((head, bytes))
}

impl Journal {
    /// Records the audit record of a refusal the journal does not otherwise record (busy,
    /// updating, storage full…): written with the next batch, no one waits.
    pub fn audit_refusal(&self, task_id: &str, facts: Facts, result: &RunResult) {
        let op = Op::Audit {
            task_id: task_id.to_string(),
            facts: Box::new(facts),
            result: Box::new(result.clone()),
        };
        if let Err(e) = self.send(op) {
            tracing::warn!(task_id = %task_id, "auditing a refusal: {e}");
        }
    }

    /// The exporter's view of the audit records: see [`AuditFeed`]. Its thread, if one is
    /// [attached](Journal::attach_exporter), is stopped before the journal closes.
    pub fn audit_feed(&self) -> Res<AuditFeed> {
        Ok(AuditFeed {
            shared: self.inner.shared.clone(),
            tx: self.inner.tx.clone().ok_or_else(super::stopped)?,
        })
    }

    /// Hands the journal the exporter's thread: stopped (told through
    /// [`AuditFeed::closed`]) and joined when the last clone of the journal is dropped, before
    /// the writer stops.
    pub fn attach_exporter(&self, thread: std::thread::JoinHandle<()>) {
        *lock(&self.inner.exporter) = Some(thread);
    }

    /// The audit chain's last durable record (what the platform may be told).
    pub fn audit_head(&self) -> Head {
        lock(&self.inner.shared.audit).durable.clone()
    }

    /// The line of audit record `seq` if the journal still holds it (durable or not).
    pub fn audit_line(&self, seq: u64) -> Option<Vec<u8>> {
        let tx = self.inner.tx.as_ref()?;
        let lines = read_audit(tx, seq.checked_sub(1)?, seq, 1).ok()?;
        lines.into_iter().next().map(|(_, line)| line)
    }
}

/// The audit records after `after` through `through`, at most `max`, read by the writer (see
/// [`Read`]).
fn read_audit(
    tx: &mpsc::Sender<Op>,
    after: u64,
    through: u64,
    max: usize,
) -> Res<Vec<(u64, Vec<u8>)>> {
    let (reply, rx) = mpsc::channel();
    tx.send(Op::Read(Read::Audit {
        after,
        through,
        max,
        reply,
    }))
    .map_err(|_| super::stopped())?;
    rx.recv().map_err(|_| super::stopped())?
}

/// What the audit exporter's thread holds: the durable records, and the writer's queue to say
/// which were exported. It holds no [`Journal`], so the journal closes when its last clone is
/// dropped (after stopping the exporter).
pub struct AuditFeed {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

impl crate::audit::AuditSource for AuditFeed {
    fn wait(&self, seq: u64, timeout: Duration) {
        self.wait_audit(seq, timeout);
    }

    fn lines(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, String> {
        self.audit_lines(after, max).map_err(|e| e.to_string())
    }

    fn exported(&self, through: u64) {
        self.audit_exported(through)
    }

    fn closed(&self) -> bool {
        AuditFeed::closed(self)
    }

    fn head(&self) -> Head {
        AuditFeed::head(self)
    }

    fn seed(&self, head: Head) {
        if let Err(e) = self.tx.send(Op::AuditSeed { head }) {
            tracing::warn!("continuing the audit chain: {e}");
        }
    }
}

impl AuditFeed {
    /// Waits at most `timeout` for a durable head past `seq` (with `u64::MAX`: for the
    /// timeout, or until the journal closes; commits do not wake such a wait); returns the
    /// durable head.
    pub fn wait_audit(&self, seq: u64, timeout: Duration) -> Head {
        let shared = &self.shared;
        let heads = lock(&shared.audit);
        let (heads, _) = shared
            .audit_changed
            .wait_timeout_while(heads, timeout, |h| h.wait_past(seq))
            .unwrap_or_else(|e| e.into_inner());
        heads.durable.clone()
    }

    /// The durable audit records after `after`, in order, at most `max` of them.
    pub fn audit_lines(&self, after: u64, max: usize) -> Res<Vec<(u64, Vec<u8>)>> {
        let through = lock(&self.shared.audit).durable.seq;
        if through <= after {
            return Ok(Vec::new());
        }
        read_audit(&self.tx, after, through, max)
    }

    /// The audit records through `through` are in the audit files: the writer removes them
    /// (but the chain's last one) with its next batch.
    pub fn audit_exported(&self, through: u64) {
        if let Err(e) = self.tx.send(Op::AuditExported { through }) {
            tracing::warn!("removing exported audit records: {e}");
        }
    }

    /// The journal is closing: the exporter stops.
    pub fn closed(&self) -> bool {
        lock(&self.shared.audit).closed
    }

    /// The audit chain's last durable record.
    pub fn head(&self) -> Head {
        lock(&self.shared.audit).durable.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::audit::{hash_line, Facts, Record, GENESIS};
    use crate::journal::testkit::*;
    use crate::journal::{EarlyResult, JournalError};

    /// A head at `seq`.
    fn at(seq: u64) -> crate::audit::Head {
        crate::audit::Head {
            seq,
            hash: format!("{seq}"),
        }
    }

    #[test]
    fn a_durable_commit_wakes_only_a_waiter_whose_wait_it_ends() {
        let mut heads = crate::journal::AuditHeads {
            written: at(2),
            ..Default::default()
        };
        // Nobody waits: no wake-up, though the head moves.
        assert!(!heads.make_durable());
        assert_eq!(heads.durable.seq, 2);
        // Lingering until a timeout registers nothing.
        assert!(heads.wait_past(u64::MAX));
        assert_eq!(heads.waiting_past, None);
        // Two waiters: the lowest is what a commit must pass.
        assert!(heads.wait_past(5));
        assert!(heads.wait_past(3));
        assert!(!heads.wait_past(1), "past 1 already: no wait");
        assert_eq!(heads.waiting_past, Some(3));
        heads.written = at(3);
        assert!(!heads.make_durable(), "3 is not past 3");
        heads.written = at(4);
        assert!(heads.make_durable());
        assert_eq!(heads.waiting_past, None);
        // The waiter past 5 waits on and registers again; nothing new: no wake-up.
        assert!(heads.wait_past(5));
        assert!(!heads.make_durable());
        heads.closed = true;
        assert!(!heads.wait_past(5), "a closing journal ends every wait");
    }

    /// The lines the journal's audit table holds from `after` on (durable ones).
    fn lines(j: &crate::journal::Journal, after: u64) -> Vec<Record> {
        let feed = j.audit_feed().unwrap();
        feed.audit_lines(after, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, l)| Record::parse(&l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn every_recorded_result_gets_a_chained_record_in_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        assert_eq!(j.audit_head().seq, 0);
        assert_eq!(j.audit_head().hash, GENESIS);
        j.accept(&request("a")).await.unwrap();
        j.finish("a", &result("a")).await.unwrap();
        // Durable at once: its head is reported.
        assert_eq!(j.audit_head().seq, 1);
        let facts = Facts {
            kind: Some("shell"),
            command: Some("du".into()),
            program: Some("/usr/bin/du".into()),
            argv: Some(vec!["/usr/bin/du".into()]),
            env: vec!["LANG".into()],
            ..Facts::default()
        };
        j.accept_running(&request("b")).await.unwrap();
        j.finish_audited("b", &result("b"), facts.clone(), false)
            .await
            .unwrap();
        // Written without fsync: not reported before the flush that follows.
        let head = j
            .audit_feed()
            .unwrap()
            .wait_audit(1, Duration::from_secs(10));
        assert_eq!(head.seq, 2);
        // A result written with its acceptance.
        let early = EarlyResult::audited(facts.clone());
        assert!(early.offer(result("c")).is_none());
        j.accept_running_with(&request("c"), early.clone())
            .await
            .unwrap();
        assert!(early.take().unwrap().1, "written with the acceptance");
        // A refusal not otherwise recorded.
        let refused = crate::outcome::RunResult::refused(crate::outcome::Status::Rejected, "busy");
        j.audit_refusal("d", Facts::default(), &refused);
        let head = j
            .audit_feed()
            .unwrap()
            .wait_audit(3, Duration::from_secs(10));
        assert_eq!(head.seq, 4);
        // The first result wins: no second record.
        j.finish("a", &result("again")).await.unwrap();
        assert_eq!(j.audit_head().seq, 4);

        let records = lines(&j, 0);
        let ids: Vec<_> = records.iter().map(|r| r.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(
            records[0].command.as_deref(),
            Some("hello"),
            "from the request"
        );
        assert_eq!(records[1].argv, facts.argv);
        assert_eq!(records[1].env, ["LANG"]);
        assert_eq!(records[2].kind.as_deref(), Some("shell"));
        assert_eq!(records[3].event, "refused");
        assert_eq!(records[0].event, "ended");
        let feed = j.audit_feed().unwrap();
        let raw = feed.audit_lines(0, 10).unwrap();
        for w in raw.windows(2) {
            assert_eq!(Record::parse(&w[1].1).unwrap().prev, hash_line(&w[0].1));
        }
        assert_eq!(j.audit_head().hash, hash_line(&raw[3].1));
        drop(feed);
        drop(j);

        // The chain goes on after a reopen; exported records go, but the head stays.
        let (j, _) = open(&cfg);
        assert_eq!(j.audit_head().seq, 4);
        j.audit_feed().unwrap().audit_exported(4);
        j.accept(&request("e")).await.unwrap();
        j.finish("e", &result("e")).await.unwrap();
        let records = lines(&j, 0);
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5],
            "the exported ones are removed but the last"
        );
        assert_eq!(
            records[1].prev,
            j.audit_line(4).map(|l| hash_line(&l)).unwrap()
        );
    }

    #[tokio::test]
    async fn unexported_records_count_in_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 64 << 10;
        cfg.min_free_bytes = 0;
        let (j, _) = open(&cfg);
        // Tasks finished and acknowledged (their results evictable, their records pruned at
        // most by count): only the audit records, never exported, fill the journal.
        let mut refused = None;
        for i in 0..10_000 {
            let id = format!("t{i:05}-{}", "x".repeat(200));
            match j.accept(&request(&id)).await {
                Ok(_) => {}
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
            j.finish(&id, &result("r")).await.unwrap();
            j.ack(std::slice::from_ref(&id));
        }
        let (i, e) = refused.expect("the journal must refuse new tasks at its byte limit");
        assert!(matches!(e, JournalError::StorageFull(_)), "{e}");
        assert!(i > 10, "refused after {i} tasks");
        // Refusals are audited up to the limit itself, not past it (each record is about
        // 400 bytes: the 1/8 of the limit new tasks leave holds a few dozen).
        let before = j.audit_head().seq;
        let r = crate::outcome::RunResult::refused(crate::outcome::Status::Rejected, "busy");
        for _ in 0..1000 {
            j.audit_refusal("x", Facts::default(), &r);
        }
        j.accept(&request("y")).await.unwrap_err();
        let audited = j.audit_head().seq - before;
        assert!(audited < 100, "{audited} refusals audited past the limit");
        // Once exported, the room comes back.
        j.audit_feed().unwrap().audit_exported(u64::MAX);
        let id = "after-export";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match j.accept(&request(id)).await {
                Ok(_) => break,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
            tokio::task::yield_now().await;
        }
    }
}
