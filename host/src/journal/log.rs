//! The write-ahead log: `<journal>.log` beside the redb file. Once in use ([`Journal::use_log`]),
//! a batch is one frame appended (one `pwrite`) and one `fdatasync` of this file, and its redb
//! transaction commits without fsync; a checkpoint (a durable redb commit that moves the log to
//! the next generation) makes the frames written so far redundant, and the log starts over.
//!
//! The file is preallocated (zeros, synced once) to its capacity, 1/8 of the journal's
//! `max_bytes` within 64 KiB–4 MiB ([`capacity`]), so an append never changes its size; that capacity counts
//! against `max_bytes` (see [`db_limit`]). A frame is `BJL1`, the generation (u64), the payload's
//! length (u32), a CRC32 of those two and the payload (u32), all little-endian, then the
//! payload: the batch's writes to the journal's tables, as they were made (a redo record).
//! Table `log` holds the generation the redb file has absorbed up to: frames of an older one are
//! ignored. At open, the frames of the current generation are applied in order, up to the first
//! one torn, of another generation or failing its CRC, then checkpointed: applying them again
//! changes nothing (each write sets a key to the value it had after the batch).
//!
//! [`Journal::use_log`]: super::Journal::use_log

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use redb::{Database, TableDefinition, WriteTransaction};

use super::error::{db_error, Fail, JournalError, Res};

mod redo;
use redo::{apply, check};
pub(super) use redo::{Redo, SeqTable};

/// `"generation"` → the log generation the redb file holds every frame of (frames of this
/// generation come after it). A table older agents ignore.
pub(super) const LOG: TableDefinition<&str, u64> = TableDefinition::new("log");
const GENERATION: &str = "generation";

const MAGIC: &[u8; 4] = b"BJL1";
const HEADER: u64 = 20;
const MIN_CAPACITY: u64 = 64 << 10;
const MAX_CAPACITY: u64 = 4 << 20;

/// The log's path for the journal at `journal`: `<journal>.log`.
pub fn log_path(journal: &Path) -> PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

/// What the journal at `journal` takes on disk: its redb file and its log, as far as each
/// exists (symbolic links are not followed: the journal never makes one).
pub fn disk_bytes(journal: &Path) -> u64 {
    let size = |p: &Path| std::fs::symlink_metadata(p).map_or(0, |m| m.len());
    size(journal) + size(&log_path(journal))
}

/// The log's capacity for a journal of `max_bytes`: 1/8 of it, within 64 KiB–4 MiB (and 1/8
/// of it whatever that is for a journal under 512 KiB, which the log must not take whole).
pub(super) fn capacity(max_bytes: u64) -> u64 {
    (max_bytes / 8)
        .clamp(MIN_CAPACITY, MAX_CAPACITY)
        .min(max_bytes / 8)
}

/// What the redb file may hold for a journal of `max_bytes`: the rest is the log's.
pub(super) fn db_limit(max_bytes: u64) -> u64 {
    max_bytes.saturating_sub(capacity(max_bytes))
}

fn frame_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    h.update(payload);
    h.finalize()
}

/// The payloads of the frames of `generation` at the start of `file`, in order, and why the
/// reading stopped where it did, when that was not the end of the frames written.
fn read_frames(file: &File, generation: u64) -> std::io::Result<(Vec<Vec<u8>>, Option<String>)> {
    let len = file.metadata()?.len();
    let mut frames = Vec::new();
    let mut at = 0u64;
    let mut header = [0u8; HEADER as usize];
    loop {
        if at + HEADER > len {
            return Ok((frames, None));
        }
        file.read_exact_at(&mut header, at)?;
        if &header[..4] != MAGIC {
            // Zeros past the last frame: the end. Anything else is a torn or foreign frame.
            let why =
                (header.iter().any(|&b| b != 0)).then(|| format!("no frame magic at offset {at}"));
            return Ok((frames, why));
        }
        let gen = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        let n = u64::from(u32::from_le_bytes(
            header[12..16].try_into().expect("4 bytes"),
        ));
        let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
        if gen != generation {
            // A frame of an earlier generation, already checkpointed: the end.
            return Ok((frames, None));
        }
        if at + HEADER + n > len {
            return Ok((
                frames,
                Some(format!(
                    "the frame at offset {at} claims {n} bytes, past the end of the file"
                )),
            ));
        }
        let mut payload = vec![0u8; n as usize];
        file.read_exact_at(&mut payload, at + HEADER)?;
        if frame_crc(gen, &payload) != crc {
            return Ok((
                frames,
                Some(format!(
                    "the frame at offset {at} fails its CRC (torn write?)"
                )),
            ));
        }
        frames.push(payload);
        at += HEADER + n;
    }
}

/// The generation the redb file holds (0 before the log was first used).
pub(super) fn generation(db: &Database) -> Res<u64> {
    use redb::ReadableDatabase;
    let txn = db.begin_read().map_err(db_error)?;
    match txn.open_table(LOG) {
        Ok(t) => Ok(t
            .get(GENERATION)
            .map_err(db_error)?
            .map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(db_error(e)),
    }
}

/// Moves the log to `generation` in `txn` (a checkpoint, once it commits durably).
pub(super) fn set_generation(txn: &WriteTransaction, generation: u64) -> Result<(), Fail> {
    txn.open_table(LOG)?.insert(GENERATION, generation)?;
    Ok(())
}

/// Applies the frames of the current generation found in the log of the journal at
/// `journal_path` (if any) and checkpoints them, durably. Returns the generation now current
/// and how many frames were applied. A frame that is torn or fails its CRC ends the replay (with
/// a warning: only the last batch, never acknowledged, can be torn); a frame that passes its CRC
/// but does not decode is refused as an error.
pub(super) fn replay(db: &Database, journal_path: &Path) -> Res<(u64, usize)> {
    let generation = generation(db)?;
    let path = log_path(journal_path);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((generation, 0)),
        Err(e) => {
            return Err(JournalError::Io(format!(
                "opening the journal log {}: {e}",
                path.display()
            )))
        }
    };
    let io = |e: std::io::Error| {
        JournalError::Io(format!("reading the journal log {}: {e}", path.display()))
    };
    let (frames, why) = read_frames(&file, generation).map_err(io)?;
    if let Some(why) = why {
        tracing::warn!(log = %path.display(), frames = frames.len(), "the journal log's replay stops early: {why}");
    }
    if frames.is_empty() {
        return Ok((generation, 0));
    }
    for (i, frame) in frames.iter().enumerate() {
        if let Err(e) = check(frame) {
            return Err(JournalError::Io(format!(
                "the journal log {}: frame {i} of generation {generation} passes its CRC but \
                 does not decode ({e}); the files are left as they are",
                path.display()
            )));
        }
    }
    let next = generation + 1;
    let txn = db.begin_write().map_err(db_error)?;
    let applied = (|| {
        for frame in &frames {
            apply(&txn, frame)?;
        }
        set_generation(&txn, next)
    })();
    match applied {
        Ok(()) => txn.commit().map_err(db_error)?,
        Err(Fail::Alone(e)) => return Err(e),
        Err(Fail::Transaction(e)) => return Err(db_error(e)),
    }
    tracing::info!(log = %path.display(), frames = frames.len(), "replayed the journal log");
    Ok((next, frames.len()))
}

/// The log file, open for appends.
pub(super) struct Log {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// Where the next frame goes.
    at: u64,
    /// Frames written since the last `fdatasync`.
    unsynced: bool,
}

impl Log {
    /// Opens the log of the journal at `journal_path`, (re)creating it preallocated to
    /// `capacity` when it is absent or of another size. Its frames must have been replayed.
    pub(super) fn open(journal_path: &Path, capacity: u64) -> std::io::Result<Log> {
        let path = log_path(journal_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        if file.metadata()?.len() != capacity {
            file.set_len(0)?;
            // Written, not merely allocated: writing into allocated but unwritten blocks
            // changes the file's metadata, which `fdatasync` would then have to write too.
            let zeros = vec![0u8; 64 << 10];
            let mut at = 0;
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            file.sync_all()?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(Log {
            file,
            path,
            capacity,
            at: 0,
            unsynced: false,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a frame of `payload` bytes fits in what is left.
    pub(super) fn fits(&self, payload: usize) -> bool {
        self.at + HEADER + payload as u64 <= self.capacity
    }

    /// Whether frames were written since the last checkpoint.
    pub(super) fn has_frames(&self) -> bool {
        self.at > 0
    }

    pub(super) fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// The most payload one frame can hold.
    pub(super) fn max_payload(&self) -> usize {
        usize::try_from(self.capacity.saturating_sub(HEADER)).unwrap_or(usize::MAX)
    }

    /// Appends `redo`'s frame of `generation` (one `pwrite`; the caller checked that it
    /// [fits](Log::fits)); synced if `sync`.
    pub(super) fn append(
        &mut self,
        generation: u64,
        redo: &mut Redo,
        sync: bool,
    ) -> std::io::Result<()> {
        let len = u32::try_from(redo.payload().len())
            .map_err(|_| std::io::Error::other("a journal log frame over 4 GiB"))?;
        let crc = frame_crc(generation, redo.payload());
        let frame = &mut redo.frame;
        if frame.len() < HEADER as usize {
            return Err(std::io::Error::other(
                "a journal log frame without its header",
            ));
        }
        frame[..4].copy_from_slice(MAGIC);
        frame[4..12].copy_from_slice(&generation.to_le_bytes());
        frame[12..16].copy_from_slice(&len.to_le_bytes());
        frame[16..20].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(frame, self.at)?;
        self.at += frame.len() as u64;
        self.unsynced = true;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// `fdatasync`: every frame written is durable.
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// A checkpoint made every frame redundant: the next one goes at the start.
    pub(super) fn restart(&mut self) {
        self.at = 0;
        self.unsynced = false;
    }
}

/// Opens the journal at `journal_path` with this version (replaying its log into the redb file
/// and checkpointing it), then removes the log: the redb file alone holds every task, as an
/// agent that knows nothing of the log expects (`bridge-daemon rollback` does this before
/// switching to the previous release). A journal without a log is left as it is.
pub fn settle(journal_path: &Path) -> Result<usize, JournalError> {
    let log = log_path(journal_path);
    if !log.exists() {
        return Ok(0);
    }
    let db = super::schema::open_db(journal_path)?;
    let (_, frames) = replay(&db, journal_path)?;
    // Durable (replay's commit was), with the generation moved past every frame the file holds.
    drop(db);
    std::fs::remove_file(&log)
        .map_err(|e| JournalError::Io(format!("removing {}: {e}", log.display())))?;
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| JournalError::Io(format!("syncing {}: {e}", dir.display())))?;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::index::Index;
    use crate::journal::testkit::*;
    use crate::journal::{Accept, Journal, JournalConfig, TaskPhase};

    /// A journal whose batches go through the log from the start.
    fn logged(dir: &Path) -> JournalConfig {
        let mut cfg = config(dir);
        cfg.log = true;
        cfg
    }

    /// What a `kill -9` leaves: both files copied while the journal is open (the redb file as
    /// of its last durable commit, the log as written), into `to`.
    fn crash_copy(cfg: &JournalConfig, to: &Path) -> JournalConfig {
        let mut copy = cfg.clone();
        copy.path = to.join("journal.redb");
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(&cfg.path, &copy.path).unwrap();
        std::fs::copy(log_path(&cfg.path), log_path(&copy.path)).unwrap();
        copy
    }

    /// The tasks an agent that knows nothing of the log finds: the redb file's index alone.
    fn redb_alone(path: &Path) -> Vec<(String, TaskPhase)> {
        let db = crate::journal::schema::open_db(path).unwrap();
        let (index, _) = Index::load(&db).unwrap();
        let mut tasks: Vec<_> = index
            .tasks
            .iter()
            .map(|(id, m)| (m.seq, id.to_string(), m.phase))
            .collect();
        tasks.sort();
        tasks.into_iter().map(|(_, id, p)| (id, p)).collect()
    }

    async fn accept_some(j: &Journal, ids: &[&str]) {
        for id in ids {
            assert_eq!(j.accept(&request(id)).await.unwrap(), Accept::New);
        }
    }

    #[tokio::test]
    async fn tasks_in_the_log_survive_a_crash_and_replay_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = logged(&dir.path().join("live"));
        let (j, _) = open(&cfg);
        accept_some(&j, &["a", "b", "c"]).await;
        j.start("b").await.unwrap();
        j.finish("b", &result("b")).await.unwrap();
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        // The redb file alone (as of its last durable commit) does not hold them: between
        // checkpoints, the writer commits nothing to it.
        assert!(redb_alone(&crashed.path).is_empty());
        let generation_before = {
            let db = crate::journal::schema::open_db(&crashed.path).unwrap();
            generation(&db).unwrap()
        };
        // Replayed twice from the same generation: the same tables.
        let db = crate::journal::schema::open_db(&crashed.path).unwrap();
        let (next, frames) = replay(&db, &crashed.path).unwrap();
        assert_eq!(next, generation_before + 1);
        assert!(frames >= 3, "{frames} frames");
        let once = Index::load(&db).unwrap().0.tasks;
        let txn = db.begin_write().unwrap();
        set_generation(&txn, generation_before)
            .map_err(|_| ())
            .unwrap();
        txn.commit().unwrap();
        assert_eq!(replay(&db, &crashed.path).unwrap().1, frames);
        assert_eq!(Index::load(&db).unwrap().0.tasks, once);
        drop(db);
        let (j2, recovery) = open(&crashed);
        assert_eq!(ids(&recovery.queued), ["a", "c"]);
        assert_eq!(j2.unacked_ids(), ["b"]);
        assert_eq!(j2.get_blocking("b").unwrap().result, Some(result("b")));
        // Deduplicated after the crash.
        assert!(matches!(
            j2.accept(&request("a")).await.unwrap(),
            Accept::Seen(_)
        ));
        drop(j2);
        drop(j);
        // A clean close checkpoints: the redb file alone holds everything.
        assert_eq!(redb_alone(&cfg.path).len(), 3);
    }

    #[tokio::test]
    async fn a_torn_or_corrupt_last_frame_ends_the_replay() {
        for damage in ["torn", "crc"] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = logged(&dir.path().join("live"));
            let (j, _) = open(&cfg);
            accept_some(&j, &["a", "b"]).await;
            let before = std::fs::read(log_path(&cfg.path)).unwrap();
            accept_some(&j, &["c"]).await;
            let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
            drop(j);
            let log = log_path(&crashed.path);
            let mut bytes = std::fs::read(&log).unwrap();
            // Where the last frame starts: the first byte that differs.
            let start = (0..bytes.len()).find(|&i| bytes[i] != before[i]).unwrap();
            match damage {
                // Only its first half reached the disk.
                "torn" => {
                    let end = (start..bytes.len()).rev().find(|&i| bytes[i] != 0).unwrap();
                    let half = start + (end - start) / 2;
                    bytes[half..=end].fill(0);
                }
                _ => bytes[start + 30] ^= 0x55,
            }
            std::fs::write(&log, &bytes).unwrap();
            let (j2, recovery) = open(&crashed);
            assert_eq!(ids(&recovery.queued), ["a", "b"], "{damage}");
            assert!(j2.get_blocking("c").is_none(), "{damage}");
        }
    }

    #[tokio::test]
    async fn frames_of_another_generation_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        accept_some(&j, &["a"]).await;
        drop(j);
        // Well-formed frames, of generations before and after the file's.
        let mut log = Log::open(&cfg.path, capacity(cfg.max_bytes)).unwrap();
        let mut redo = Redo::start(Vec::new(), log.max_payload());
        redo.del(SeqTable::Entries, 0);
        log.append(7, &mut redo, true).unwrap();
        log.append(1, &mut redo, true).unwrap();
        drop(log);
        let (j, _) = open(&cfg);
        assert_eq!(j.get_blocking("a").unwrap().phase, TaskPhase::Queued);
    }

    #[tokio::test]
    async fn a_frame_that_passes_its_crc_but_does_not_decode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        drop(open(&cfg));
        let mut log = Log::open(&cfg.path, capacity(cfg.max_bytes)).unwrap();
        let mut redo = Redo::start(Vec::new(), log.max_payload());
        redo.frame.extend_from_slice(b"\x09\x01garbage");
        log.append(0, &mut redo, true).unwrap();
        drop(log);
        let before = std::fs::read(log_path(&cfg.path)).unwrap();
        let err = Journal::open(cfg.clone()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
        assert_eq!(std::fs::read(log_path(&cfg.path)).unwrap(), before);
    }

    #[tokio::test]
    async fn a_task_larger_than_the_log_is_checkpointed_and_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = logged(&dir.path().join("live"));
        cfg.max_bytes = 1 << 20;
        let (j, _) = open(&cfg);
        accept_some(&j, &["small"]).await;
        let before = j.commits();
        // 200 KiB of input through a log of 128 KiB: one checkpoint, no frame.
        let mut r = request("large");
        r.input = serde_json::json!("x".repeat(200 << 10));
        assert_eq!(j.accept(&r).await.unwrap(), Accept::New);
        assert_eq!(
            j.commits(),
            before + 2,
            "the batch's commit and a checkpoint"
        );
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        let (_, recovery) = open(&crashed);
        assert_eq!(ids(&recovery.queued), ["small", "large"]);
    }

    #[tokio::test]
    async fn a_full_log_checkpoints_and_the_cap_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = logged(&dir.path().join("live"));
        cfg.max_bytes = 1 << 20;
        let cap = capacity(cfg.max_bytes);
        assert_eq!(cap, 128 << 10);
        assert_eq!(db_limit(cfg.max_bytes), (1 << 20) - (128 << 10));
        let (j, _) = open(&cfg);
        let before = j.commits();
        // About 300 KiB of frames through a log of 128 KiB.
        let n = 300;
        for i in 0..n {
            let mut r = request(&format!("t{i}"));
            r.input = serde_json::json!("x".repeat(900));
            assert_eq!(j.accept(&r).await.unwrap(), Accept::New);
        }
        assert!(j.commits() > before + n, "no checkpoint");
        assert_eq!(std::fs::metadata(log_path(&cfg.path)).unwrap().len(), cap);
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        let (_, recovery) = open(&crashed);
        assert_eq!(recovery.queued.len(), n as usize);
    }

    #[tokio::test]
    async fn the_open_transaction_is_checkpointed_once_it_holds_enough() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = logged(&dir.path().join("live"));
        assert!(capacity(cfg.max_bytes) > 4 * crate::journal::writer::CHECKPOINT_BYTES);
        let (j, _) = open(&cfg);
        // Tasks of 16 KiB each, in a log with room for far more: the open transaction passes
        // `CHECKPOINT_BYTES` after about 16 of them, long before the log fills or the writer
        // idles for a second.
        let started = std::time::Instant::now();
        for i in 0..24 {
            let mut r = request(&format!("t{i}"));
            r.input = serde_json::json!("x".repeat(16 << 10));
            assert_eq!(j.accept(&r).await.unwrap(), Accept::New);
        }
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        assert!(started.elapsed() < crate::journal::writer::CHECKPOINT_IDLE);
        // The redb file alone holds those checkpointed; the log, the rest.
        let alone = redb_alone(&crashed.path).len();
        assert!((14..24).contains(&alone), "{alone} tasks checkpointed");
        let (_, recovery) = open(&crashed);
        assert_eq!(recovery.queued.len(), 24);
    }

    #[tokio::test]
    async fn a_log_left_without_its_journal_is_not_replayed_into_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = logged(&dir.path().join("live"));
        let (j, _) = open(&cfg);
        accept_some(&j, &["old"]).await;
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        drop(j);
        // The redb file moved aside, its log left behind.
        std::fs::remove_file(&crashed.path).unwrap();
        let (j, recovery) = open(&crashed);
        assert!(recovery.queued.is_empty());
        assert!(j.get_blocking("old").is_none());
    }

    #[tokio::test]
    async fn settling_leaves_the_redb_file_whole_for_an_older_version() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = logged(&dir.path().join("live"));
        let (j, _) = open(&cfg);
        accept_some(&j, &["a", "b", "c"]).await;
        j.finish("c", &result("c")).await.unwrap();
        let crashed = crash_copy(&cfg, &dir.path().join("crashed"));
        drop(j);
        assert!(settle(&crashed.path).unwrap() >= 4);
        assert!(!log_path(&crashed.path).exists());
        assert_eq!(
            redb_alone(&crashed.path),
            [
                ("a".to_string(), TaskPhase::Queued),
                ("b".to_string(), TaskPhase::Queued),
                ("c".to_string(), TaskPhase::Done)
            ]
        );
        // Nothing to settle a second time.
        assert_eq!(settle(&crashed.path).unwrap(), 0);
    }
}
