//! The in-memory index: every task's entry (phase, acknowledgement, size) by task id, the outbox
//! and the evictable results in accept order, the bytes held, and the installed handlers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::error::{db_error, Res};
use super::records::HandlerRecord;
use super::schema::{
    decode, stored_size, Entry, Summary, ENTRIES, ENTRY_BYTES, HANDLERS, RECORDS, RESULTS,
};

/// The summary of every committed record (plus acknowledgements not yet written), and the
/// installed handlers (looked up for every task that names a command).
#[derive(Default)]
pub(super) struct Index {
    pub(super) tasks: HashMap<Arc<str>, Summary>,
    /// Done and not acknowledged, by accept order.
    pub(super) outbox: BTreeMap<u64, Arc<str>>,
    /// Acknowledged with an output still held, by accept order: what is evicted first when
    /// the journal needs room.
    pub(super) evictable: BTreeMap<u64, Arc<str>>,
    /// The sum of every task's [`Summary::bytes`]: what the journal holds, measured against
    /// [`JournalConfig::max_bytes`](super::JournalConfig::max_bytes).
    pub(super) bytes: u64,
    pub(super) handlers: BTreeMap<String, HandlerRecord>,
}

impl Index {
    pub(super) fn set(&mut self, id: Arc<str>, summary: Summary) {
        if let Some(old) = self.tasks.insert(id.clone(), summary) {
            self.outbox.remove(&old.seq);
            self.evictable.remove(&old.seq);
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        self.bytes += summary.bytes;
        if summary.in_outbox() {
            self.outbox.insert(summary.seq, id);
        } else if summary.evictable() {
            self.evictable.insert(summary.seq, id);
        }
    }

    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.tasks.remove(id) {
            self.outbox.remove(&old.seq);
            self.evictable.remove(&old.seq);
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
    }
}

impl Index {
    /// Applies what a committed batch changed, in order.
    pub(super) fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Set(id, summary) => self.set(id, summary),
                Change::Remove(id) => self.remove(&id),
                Change::PutHandler(h) => {
                    self.handlers.insert(h.name.clone(), h);
                }
                Change::RemoveHandler(name) => {
                    self.handlers.remove(&name);
                }
                Change::AuditBytes { added, freed } => {
                    self.bytes = (self.bytes + added).saturating_sub(freed);
                }
            }
        }
    }

    /// The index of every record and the installed handlers, read from the file, and the next
    /// sequence number.
    pub(super) fn load(db: &Database) -> Res<(Index, u64)> {
        let txn = db.begin_read().map_err(db_error)?;
        let mut index = Index::default();
        for item in txn
            .open_table(HANDLERS)
            .map_err(db_error)?
            .iter()
            .map_err(db_error)?
        {
            let (k, v) = item.map_err(db_error)?;
            match decode::<HandlerRecord>("handler", k.value(), v.value()) {
                Ok(h) => {
                    index.handlers.insert(h.name.clone(), h);
                }
                // Left in the file, unusable: the platform sees it missing and can install it
                // again.
                Err(e) => tracing::error!("{e}"),
            }
        }
        let entries = txn.open_table(ENTRIES).map_err(db_error)?;
        let records = txn.open_table(RECORDS).map_err(db_error)?;
        let results = txn.open_table(RESULTS).map_err(db_error)?;
        let mut next_seq = 0;
        for item in entries.iter().map_err(db_error)? {
            let (k, v) = item.map_err(db_error)?;
            let seq = k.value();
            let entry: Entry = decode("index entry", &seq.to_string(), v.value())?;
            next_seq = seq + 1;
            let mut summary = entry.summary(seq);
            if summary.bytes == 0 {
                // Written before sizes were kept: measured once, here.
                let len = |v: Option<redb::AccessGuard<'_, &[u8]>>| {
                    v.map_or(0, |v| stored_size(v.value().len()))
                };
                summary.bytes = len(records.get(seq).map_err(db_error)?)
                    + len(results.get(seq).map_err(db_error)?)
                    + entry.id.len() as u64
                    + ENTRY_BYTES;
            }
            index.set(Arc::from(entry.id.as_ref()), summary);
        }
        Ok((index, next_seq))
    }
}

/// What a committed batch changes in the index, in order.
pub(super) enum Change {
    Set(Arc<str>, Summary),
    Remove(Arc<str>),
    PutHandler(HandlerRecord),
    RemoveHandler(String),
    /// Audit records written and exported: the bytes they add to and free from the file.
    AuditBytes {
        added: u64,
        freed: u64,
    },
}
