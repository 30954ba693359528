//! The file's format version, checked at open: a new file gets the current tables, a version 1
//! file (tables keyed by task id) is migrated in one transaction, a newer one is refused.

use std::path::Path;

use redb::{Database, ReadableTable, WriteTransaction};

use super::error::{db_error, Fail, JournalError, Res};
use super::schema::{
    create_tables, decode, encode, Entry, Summary, ENTRIES, META, RECORDS, SCHEMA_VERSION,
};

/// Brings the file to the current format at open, in one transaction: creates the tables if
/// needed, checks the format version, migrates a version 1 file; refuses a newer one.
pub(super) fn init_schema(db: &Database, path: &Path) -> Res<()> {
    let txn = db.begin_write().map_err(db_error)?;
    let mut migrated = None;
    {
        let mut meta = txn.open_table(META).map_err(db_error)?;
        let version = meta.get("schema").map_err(db_error)?.map(|v| v.value());
        match version {
            None => {}
            Some(1) => {
                migrated = Some(migrate_v1(&txn).map_err(|e| match e {
                    Fail::Alone(e) => e,
                    Fail::Transaction(e) => db_error(e),
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
        create_tables(&txn).map_err(db_error)?;
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

/// The tables of format version 1, keyed by task id (random, from the platform: every write
/// landed on a different B-tree page). Read only to migrate.
mod v1 {
    use redb::TableDefinition;

    /// Task id → [`TaskRecord`](crate::journal::TaskRecord).
    pub const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
    /// Task id → [`Summary`](crate::journal::schema::Summary).
    pub const INDEX: TableDefinition<&str, &[u8]> = TableDefinition::new("task_index");
}

/// Moves every task of a version 1 file (tables keyed by task id) into the tables keyed by
/// accept sequence number, in the caller's transaction, and drops the old tables. Returns how
/// many tasks moved.
pub(super) fn migrate_v1(txn: &WriteTransaction) -> Result<usize, Fail> {
    let mut moved = 0;
    {
        let tasks = txn.open_table(v1::TASKS)?;
        let index = txn.open_table(v1::INDEX)?;
        let mut records = txn.open_table(RECORDS)?;
        let mut entries = txn.open_table(ENTRIES)?;
        for item in index.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let summary: Summary = decode("index entry", id, v.value()).map_err(Fail::Alone)?;
            let Some(record) = tasks.get(id)? else {
                return Err(Fail::Alone(JournalError::Io(format!(
                    "migrating the journal: task {id:?} is indexed but has no record"
                ))));
            };
            if entries.get(summary.seq)?.is_some() {
                return Err(Fail::Alone(JournalError::Io(format!(
                    "migrating the journal: two tasks have sequence number {}",
                    summary.seq
                ))));
            }
            let entry = encode("index entry", id, &Entry::of(id, &summary)).map_err(Fail::Alone)?;
            records.insert(summary.seq, record.value())?;
            entries.insert(summary.seq, entry.as_slice())?;
            moved += 1;
        }
    }
    txn.delete_table(v1::TASKS)?;
    txn.delete_table(v1::INDEX)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::schema::HANDLERS;
    use crate::journal::testkit::*;
    use crate::journal::{now_ms, Accept, Journal, TaskPhase, TaskRecord};
    use redb::ReadableDatabase;

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
        let acked = j.get_blocking("zz-acked").unwrap();
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
}
