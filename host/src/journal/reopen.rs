//! Reopening after an I/O failure (redb refuses all further work on the open database): the
//! file is opened again, repaired by redb, and reconciled with what callers were told.

use std::collections::HashMap;
use std::sync::Arc;

use redb::ReadableTable;

use super::error::{db_error, Fail, Res};
use super::index::Index;
use super::ops::ack_in;
use super::records::TaskPhase;
use super::schema::{decode, open_db, Entry, Summary};
use super::tables::Tables;
use super::{lock, write_lock, Shared};

/// Closes the database after an I/O failure, opens it again (redb repairs it), and reconciles
/// the file with what callers were told: records of accepts whose commit reported an error are
/// removed, acknowledgements lost with a batch are written again. Returns the next sequence
/// number the file leaves free.
pub(super) fn reopen(shared: &Shared) -> Res<u64> {
    let mut guard = write_lock(&shared.db);
    if let Some(old) = guard.take() {
        drop(old);
    }
    let db = open_db(&shared.config.path)?;
    // What commits without fsync left only in the log goes back in first.
    let (generation, _) = super::log::replay(&db, &shared.config.path)?;
    {
        let mut state = lock(&shared.log);
        state.generation = generation;
        if let Some(f) = state.file.as_mut() {
            f.restart();
        }
    }
    let known: HashMap<Arc<str>, Summary> = lock(&shared.index).tasks.clone();
    let reconciled = (|| -> Result<(), Fail> {
        let txn = db.begin_write()?;
        {
            let chain = lock(&shared.audit).written.clone();
            let mut t = Tables::open(&txn, &shared.index, chain)?;
            let mut on_disk = Vec::new();
            for item in t.entries.iter()? {
                let (k, v) = item?;
                let seq = k.value();
                let entry: Entry =
                    decode("index entry", &seq.to_string(), v.value()).map_err(Fail::Alone)?;
                let summary = entry.summary(seq);
                on_disk.push((entry.id.into_owned(), summary));
            }
            for (id, summary) in on_disk {
                // Not known under this number: an acceptance whose commit reported an
                // error (perhaps of a task pruned earlier in the same batch).
                match known.get(id.as_str()).filter(|k| k.seq == summary.seq) {
                    None => {
                        tracing::warn!(task_id = %id, "dropping a task whose acceptance failed");
                        t.remove(summary.seq, summary.bytes)?;
                    }
                    Some(k) if k.acked && !summary.acked && summary.phase == TaskPhase::Done => {
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
        Ok(()) => match Index::load(&db) {
            Ok((mut index, next_seq)) => {
                // The audit chain as the file holds it (what was committed without fsync
                // may be gone).
                let (head, bytes) = super::audit::load(&db)?;
                index.bytes += bytes;
                *lock(&shared.index) = index;
                let mut heads = lock(&shared.audit);
                heads.written = head.clone();
                heads.durable = head;
                tracing::info!("the journal was reopened after an I/O failure");
                Ok(next_seq)
            }
            Err(e) => Err(e),
        },
        Err(Fail::Alone(e)) => Err(e),
        Err(Fail::Transaction(e)) => Err(db_error(e)),
    };
    *guard = Some(db);
    result
}
