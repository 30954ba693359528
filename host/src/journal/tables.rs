//! The journal's tables inside one write transaction: a task's entry and record as the
//! transaction sees them, the writes, and the bytes each write adds or frees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redb::{ReadableTable, Table, TableError, WriteTransaction};

use super::error::{Fail, JournalError};
use super::index::Index;
use super::lock;
use super::log::{Redo, SeqTable};
use super::records::TaskRecord;
use super::schema::{
    assemble, decode, encode, stored_size, Entry, Summary, AUDIT, ENTRIES, ENTRY_BYTES, HANDLERS,
    RECORDS, RESULTS,
};
use crate::audit::{head_after, Facts, Head, Record};
use crate::outcome::RunResult;

/// The journal file's tables, open in a write transaction.
pub(super) struct Tables<'t> {
    pub(super) records: Table<'t, u64, &'static [u8]>,
    pub(super) results: Table<'t, u64, &'static [u8]>,
    pub(super) entries: Table<'t, u64, &'static [u8]>,
    pub(super) handlers: Table<'t, &'static str, &'static [u8]>,
    pub(super) audit: Table<'t, u64, &'static [u8]>,
    /// The audit chain's head with this transaction's records.
    pub(super) chain: Head,
    /// Whether results get audit records ([`JournalConfig::audit`]).
    ///
    /// [`JournalConfig::audit`]: super::JournalConfig::audit
    pub(super) auditing: bool,
    /// Bytes this transaction's audit records added and freed (also in `added`, `freed`).
    pub(super) audit_added: u64,
    pub(super) audit_freed: u64,
    /// The index: the tasks committed before this transaction.
    pub(super) index: &'t Mutex<Index>,
    /// The sequence numbers of tasks accepted in this transaction.
    pub(super) fresh: HashMap<Arc<str>, u64>,
    /// Bytes this transaction added to and freed from the index's [`Index::bytes`].
    pub(super) added: u64,
    pub(super) freed: u64,
    /// Tasks evicted in this transaction (the index still lists them as evictable).
    pub(super) evicted: std::collections::HashSet<u64>,
    /// Bytes of values this transaction wrote (records, results, entries, handlers), for the
    /// metrics.
    pub(super) written: u64,
    /// The writes, as the log's frame (recorded while the log is in use).
    pub(super) redo: Redo,
}

impl<'t> Tables<'t> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        index: &'t Mutex<Index>,
        chain: Head,
    ) -> Result<Tables<'t>, TableError> {
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            results: txn.open_table(RESULTS)?,
            entries: txn.open_table(ENTRIES)?,
            handlers: txn.open_table(HANDLERS)?,
            audit: txn.open_table(AUDIT)?,
            chain,
            auditing: true,
            audit_added: 0,
            audit_freed: 0,
            index,
            fresh: HashMap::new(),
            added: 0,
            freed: 0,
            evicted: Default::default(),
            written: 0,
            redo: Redo::default(),
        })
    }

    /// The table written as `which`.
    fn table(&mut self, which: SeqTable) -> &mut Table<'t, u64, &'static [u8]> {
        match which {
            SeqTable::Records => &mut self.records,
            SeqTable::Results => &mut self.results,
            SeqTable::Entries => &mut self.entries,
            SeqTable::Audit => &mut self.audit,
        }
    }

    /// Every write to a table keyed by sequence number goes through here (and into the redo
    /// record).
    pub(super) fn put(&mut self, which: SeqTable, key: u64, value: &[u8]) -> Result<(), Fail> {
        self.table(which).insert(key, value)?;
        self.redo.put(which, key, value);
        Ok(())
    }

    pub(super) fn del(&mut self, which: SeqTable, key: u64) -> Result<(), Fail> {
        self.table(which).remove(key)?;
        self.redo.del(which, key);
        Ok(())
    }

    pub(super) fn put_handler(&mut self, name: &str, value: &[u8]) -> Result<(), Fail> {
        self.handlers.insert(name, value)?;
        self.redo.put_name(name, value);
        Ok(())
    }

    /// Whether there was one.
    pub(super) fn del_handler(&mut self, name: &str) -> Result<bool, Fail> {
        let removed = self.handlers.remove(name)?.is_some();
        self.redo.del_name(name);
        Ok(removed)
    }

    /// What the journal holds with this transaction's writes.
    pub(super) fn bytes_held(&self) -> u64 {
        (lock(self.index).bytes + self.added).saturating_sub(self.freed)
    }

    /// A task's entry, this transaction's writes included (`None`: not recorded, or removed).
    pub(super) fn entry(&self, id: &str) -> Result<Option<Summary>, Fail> {
        let seq = match self.fresh.get(id) {
            Some(&seq) => seq,
            None => match lock(self.index).tasks.get(id) {
                Some(m) => m.seq,
                None => return Ok(None),
            },
        };
        let Some(v) = self.entries.get(seq)? else {
            return Ok(None);
        };
        let entry: Entry = decode("index entry", id, v.value()).map_err(Fail::Alone)?;
        if entry.id != id {
            return Err(Fail::Alone(JournalError::Io(format!(
                "index entry {seq} is task {:?}, not {id:?}",
                entry.id
            ))));
        }
        let mut summary = entry.summary(seq);
        if summary.bytes == 0 {
            // Written before sizes were kept: the size measured at open.
            summary.bytes = lock(self.index).tasks.get(id).map_or(0, |m| m.bytes);
        }
        Ok(Some(summary))
    }

    /// A task's record and entry, this transaction's writes included.
    pub(super) fn load(&self, id: &str) -> Result<Option<(TaskRecord, Summary)>, Fail> {
        let Some(summary) = self.entry(id)? else {
            return Ok(None);
        };
        let Some(v) = self.records.get(summary.seq)? else {
            return Err(Fail::Alone(JournalError::Io(format!(
                "task {id:?} has an index entry but no record"
            ))));
        };
        let finished = self.results.get(summary.seq)?;
        let record = assemble(
            id,
            &summary,
            v.value(),
            finished.as_ref().map(|f| f.value()),
        )
        .map_err(Fail::Alone)?;
        Ok(Some((record, summary)))
    }

    /// Writes a task's record (as accepted, already encoded) and its entry; counts the bytes
    /// into `summary` (a new task's, which holds nothing yet).
    pub(super) fn store(
        &mut self,
        id: &str,
        record: &[u8],
        summary: &mut Summary,
    ) -> Result<(), Fail> {
        self.put(SeqTable::Records, summary.seq, record)?;
        self.written += record.len() as u64;
        summary.bytes = stored_size(record.len()) + id.len() as u64 + ENTRY_BYTES;
        self.added += summary.bytes;
        self.store_entry(id, summary)
    }

    /// Writes a task's result (already encoded, see [`encode_result`]) and its entry, marked
    /// done; counts the bytes into `summary`.
    ///
    /// [`encode_result`]: super::schema::encode_result
    pub(super) fn store_result(
        &mut self,
        id: &str,
        finished: &[u8],
        summary: &mut Summary,
    ) -> Result<(), Fail> {
        self.put(SeqTable::Results, summary.seq, finished)?;
        self.written += finished.len() as u64;
        summary.bytes += stored_size(finished.len());
        self.added += stored_size(finished.len());
        self.store_entry(id, summary)
    }

    /// A task's values went from `before` to `after` bytes.
    pub(super) fn count_change(&mut self, before: u64, after: u64) {
        if after >= before {
            self.added += after - before;
        } else {
            self.freed += before - after;
        }
    }

    /// Writes a task's entry alone (a start, an acknowledgement).
    pub(super) fn store_entry(&mut self, id: &str, summary: &Summary) -> Result<(), Fail> {
        let e = encode("index entry", id, &Entry::of(id, summary)).map_err(Fail::Alone)?;
        self.put(SeqTable::Entries, summary.seq, e.as_slice())?;
        self.written += e.len() as u64;
        Ok(())
    }

    /// Appends the audit record of task `id`'s result to the chain (counted in the bytes the
    /// journal holds until it is exported).
    pub(super) fn audit(
        &mut self,
        id: &str,
        facts: &Facts,
        result: &RunResult,
        now: u64,
    ) -> Result<(), Fail> {
        if !self.auditing {
            return Ok(());
        }
        let record = Record::of(&self.chain, now, id, facts, result);
        let line = record.line();
        self.put(SeqTable::Audit, record.seq, line.as_slice())?;
        self.added += stored_size(line.len());
        self.audit_added += stored_size(line.len());
        self.chain = head_after(record.seq, &line);
        Ok(())
    }

    /// Removes the audit records through `through` (exported), but the chain's last one.
    pub(super) fn audit_exported(&mut self, through: u64) -> Result<(), Fail> {
        let through = through.min(self.chain.seq.saturating_sub(1));
        // One pass over the range, every record in it removed ([`Tables::remove_sorted`]).
        let mut gone = Vec::new();
        self.audit.retain_in(..=through, |seq, line| {
            gone.push((seq, stored_size(line.len())));
            false
        })?;
        for (seq, bytes) in gone {
            self.redo.del(SeqTable::Audit, seq);
            self.freed += bytes;
            self.audit_freed += bytes;
        }
        Ok(())
    }

    pub(super) fn remove(&mut self, seq: u64, bytes: u64) -> Result<(), Fail> {
        self.freed += bytes;
        self.del(SeqTable::Records, seq)?;
        self.del(SeqTable::Results, seq)?;
        self.del(SeqTable::Entries, seq)?;
        Ok(())
    }

    /// Removes many tasks as [`Tables::remove`] does, `seqs` sorted ascending and `bytes` their
    /// stored size together: one pass over each table's range from the first to the last
    /// instead of a descent from the root and a rebuilt path for every key (pruning removes the
    /// oldest tasks, a thousand at a time, and they sit side by side).
    pub(super) fn remove_sorted(&mut self, seqs: &[u64], bytes: u64) -> Result<(), Fail> {
        debug_assert!(seqs.is_sorted());
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            return Ok(());
        };
        self.freed += bytes;
        for which in [SeqTable::Records, SeqTable::Results, SeqTable::Entries] {
            self.table(which)
                .retain_in(first..=last, |seq, _| seqs.binary_search(&seq).is_err())?;
            for &seq in seqs {
                self.redo.del(which, seq);
            }
        }
        Ok(())
    }
}
