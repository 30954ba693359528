//! The redo records of a frame's payload: the batch's writes to the journal's tables, as the
//! transaction makes them ([`Redo`]), checked ([`check`]) and applied ([`apply`]) at replay.

use redb::WriteTransaction;

use super::HEADER;
use crate::journal::error::{Fail, JournalError};
use crate::journal::schema::{AUDIT, ENTRIES, HANDLERS, RECORDS, RESULTS};

/// The tables a redo record writes to.
const T_RECORDS: u8 = 1;
const T_RESULTS: u8 = 2;
const T_ENTRIES: u8 = 3;
const T_HANDLERS: u8 = 4;
const T_AUDIT: u8 = 5;
const PUT: u8 = 1;
const DEL: u8 = 2;

/// The writes of one transaction, as a frame (recorded only while the log is in use): room
/// for the frame's header, then the payload. A batch whose payload outgrows `limit` (what one
/// frame of the log can hold) stops recording and drops what it had: it is made durable by a
/// checkpoint instead, so a batch of large results is never held twice in memory.
#[derive(Default)]
pub(in crate::journal) struct Redo {
    on: bool,
    pub(super) frame: Vec<u8>,
    limit: usize,
    /// The payload outgrew `limit`: nothing was kept.
    pub(in crate::journal) overflowed: bool,
}

/// A table keyed by sequence number.
#[derive(Clone, Copy)]
pub(in crate::journal) enum SeqTable {
    Records,
    Results,
    Entries,
    Audit,
}

impl SeqTable {
    fn tag(self) -> u8 {
        match self {
            SeqTable::Records => T_RECORDS,
            SeqTable::Results => T_RESULTS,
            SeqTable::Entries => T_ENTRIES,
            SeqTable::Audit => T_AUDIT,
        }
    }
}

/// Frame buffers up to this capacity are kept for the next batch; larger ones are freed.
const KEEP_BUFFER: usize = 64 << 10;

impl Redo {
    /// Recording into `buffer` (a previous frame's, reused), a payload of at most `limit`
    /// bytes.
    pub(in crate::journal) fn start(mut buffer: Vec<u8>, limit: usize) -> Redo {
        buffer.clear();
        buffer.resize(HEADER as usize, 0);
        Redo {
            on: true,
            frame: buffer,
            limit,
            overflowed: false,
        }
    }

    /// The payload recorded so far.
    pub(in crate::journal) fn payload(&self) -> &[u8] {
        self.frame.get(HEADER as usize..).unwrap_or_default()
    }

    /// The buffer, to start the next batch's frame in, if it is small enough to keep.
    pub(in crate::journal) fn into_buffer(self) -> Vec<u8> {
        if self.frame.capacity() <= KEEP_BUFFER {
            self.frame
        } else {
            Vec::new()
        }
    }

    /// Whether `n` more payload bytes are to be recorded: no once the payload would outgrow
    /// the limit (what was recorded is dropped then).
    fn room(&mut self, n: usize) -> bool {
        if !self.on {
            return false;
        }
        if self.frame.len() - HEADER as usize + n > self.limit {
            self.on = false;
            self.overflowed = true;
            self.frame = Vec::new();
            return false;
        }
        true
    }

    fn value(&mut self, v: &[u8]) {
        self.frame
            .extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.frame.extend_from_slice(v);
    }

    pub(in crate::journal) fn put(&mut self, table: SeqTable, key: u64, value: &[u8]) {
        if self.room(2 + 8 + 4 + value.len()) {
            self.frame.extend_from_slice(&[table.tag(), PUT]);
            self.frame.extend_from_slice(&key.to_le_bytes());
            self.value(value);
        }
    }

    pub(in crate::journal) fn del(&mut self, table: SeqTable, key: u64) {
        if self.room(2 + 8) {
            self.frame.extend_from_slice(&[table.tag(), DEL]);
            self.frame.extend_from_slice(&key.to_le_bytes());
        }
    }

    pub(in crate::journal) fn put_name(&mut self, name: &str, value: &[u8]) {
        if self.room(2 + 4 + name.len() + 4 + value.len()) {
            self.frame.extend_from_slice(&[T_HANDLERS, PUT]);
            self.value(name.as_bytes());
            self.value(value);
        }
    }

    pub(in crate::journal) fn del_name(&mut self, name: &str) {
        if self.room(2 + 4 + name.len()) {
            self.frame.extend_from_slice(&[T_HANDLERS, DEL]);
            self.value(name.as_bytes());
        }
    }
}

/// Reads a frame payload's fields, refusing anything out of bounds.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a redo record is cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn value(&mut self) -> Result<&'a [u8], String> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        self.take(n as usize)
    }
}

/// Checks that `payload` is a well-formed list of redo records (nothing is written).
pub(super) fn check(payload: &[u8]) -> Result<(), String> {
    let mut c = Cursor(payload);
    while !c.0.is_empty() {
        let head = c.take(2)?;
        match (head[0], head[1]) {
            (T_HANDLERS, PUT) => {
                std::str::from_utf8(c.value()?).map_err(|_| "a handler name is not UTF-8")?;
                c.value()?;
            }
            (T_HANDLERS, DEL) => {
                std::str::from_utf8(c.value()?).map_err(|_| "a handler name is not UTF-8")?;
            }
            (T_RECORDS | T_RESULTS | T_ENTRIES | T_AUDIT, PUT) => {
                c.u64()?;
                c.value()?;
            }
            (T_RECORDS | T_RESULTS | T_ENTRIES | T_AUDIT, DEL) => {
                c.u64()?;
            }
            (t, op) => {
                return Err(format!(
                    "an unknown redo record (table {t}, operation {op})"
                ))
            }
        }
    }
    Ok(())
}

/// Applies a frame's payload (checked with [`check`] first) in `txn`.
pub(super) fn apply(txn: &WriteTransaction, payload: &[u8]) -> Result<(), Fail> {
    let mut records = txn.open_table(RECORDS)?;
    let mut results = txn.open_table(RESULTS)?;
    let mut entries = txn.open_table(ENTRIES)?;
    let mut handlers = txn.open_table(HANDLERS)?;
    let mut audit = txn.open_table(AUDIT)?;
    let bad = |e: String| Fail::Alone(JournalError::Io(e));
    let mut c = Cursor(payload);
    while !c.0.is_empty() {
        let head = c.take(2).map_err(bad)?;
        if head[0] == T_HANDLERS {
            let name = std::str::from_utf8(c.value().map_err(bad)?)
                .map_err(|_| bad("a handler name is not UTF-8".into()))?;
            if head[1] == PUT {
                handlers.insert(name, c.value().map_err(bad)?)?;
            } else {
                handlers.remove(name)?;
            }
            continue;
        }
        let table = match head[0] {
            T_RECORDS => &mut records,
            T_RESULTS => &mut results,
            T_ENTRIES => &mut entries,
            T_AUDIT => &mut audit,
            t => return Err(bad(format!("an unknown redo table {t}"))),
        };
        let key = c.u64().map_err(bad)?;
        match head[1] {
            PUT => {
                table.insert(key, c.value().map_err(bad)?)?;
            }
            DEL => {
                table.remove(key)?;
            }
            op => return Err(bad(format!("an unknown redo operation {op}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_buffer_is_kept_for_the_next_batch_only_up_to_its_bound() {
        let mut small = Redo::start(Vec::new(), usize::MAX);
        small.put(SeqTable::Records, 1, &[1; 1000]);
        assert!(small.into_buffer().capacity() >= 1000, "kept");
        let mut large = Redo::start(Vec::new(), usize::MAX);
        large.put(SeqTable::Records, 1, &vec![1; KEEP_BUFFER + 1]);
        assert_eq!(large.into_buffer().capacity(), 0, "freed past KEEP_BUFFER");
    }

    #[test]
    fn a_batch_larger_than_a_frame_stops_recording_and_keeps_nothing() {
        let mut redo = Redo::start(Vec::with_capacity(64), 100);
        redo.put(SeqTable::Records, 1, &[7; 50]);
        assert_eq!(redo.payload().len(), 2 + 8 + 4 + 50);
        assert!(!redo.overflowed);
        redo.put(SeqTable::Results, 1, &[7; 50]);
        assert!(redo.overflowed);
        assert!(redo.payload().is_empty());
        assert_eq!(redo.frame.capacity(), 0, "what was recorded is freed");
        // Nothing is recorded after that, however small.
        redo.del(SeqTable::Entries, 2);
        assert!(redo.payload().is_empty());
    }
}
