//! Space: keeping what the journal holds within `max_bytes` by evicting acknowledged output,
//! oldest first; the free-space check and the compaction that keep the file near its limit.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{Fail, Res};
use super::index::Change;
use super::log::{db_limit, SeqTable};
use super::schema::{encode, encode_result, stored_size, Summary, ENTRY_BYTES};
use super::tables::Tables;
use super::{lock, write_lock, Shared};

/// While the file is over twice `max_bytes`, how long after compacting it the writer compacts it
/// again.
const SIZE_RECHECK: Duration = Duration::from_secs(5);

/// How long a free-space measurement stands.
pub(super) const SPACE_RECHECK: Duration = Duration::from_millis(250);

/// A verdict taken less than `ttl` ago, to reuse instead of measuring again.
fn recent(
    verdict: &Option<(Instant, Result<(), String>)>,
    ttl: Duration,
) -> Option<Result<(), String>> {
    verdict
        .as_ref()
        .filter(|(at, _)| at.elapsed() < ttl)
        .map(|(_, v)| v.clone())
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statvfs` is plain old data (all-zero is a valid value), `c` is a valid
    // NUL-terminated string and `st` a valid out pointer for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

impl Tables<'_> {
    /// Drops the output of an acknowledged task (its result's output, its request's input):
    /// what deduplication needs stays (the task id, the status, the exit code, the error).
    pub(super) fn evict(&mut self, id: &str, changes: &mut Vec<Change>) -> Result<(), Fail> {
        let Some((mut stub, summary)) = self.load(id)? else {
            return Ok(());
        };
        if !summary.evictable() || !self.evicted.insert(summary.seq) {
            return Ok(());
        }
        let result = stub.result.take();
        stub.request.input = serde_json::Value::Null;
        stub.request.args.clear();
        stub.request.signature = None;
        let r = encode("task", id, &stub).map_err(Fail::Alone)?;
        self.put(SeqTable::Records, summary.seq, r.as_slice())?;
        self.written += r.len() as u64;
        let mut bytes = stored_size(r.len()) + id.len() as u64 + ENTRY_BYTES;
        if let Some(result) = result {
            let finished_at = summary.finished_at_ms.unwrap_or_default();
            let f =
                encode_result(id, finished_at, &result.without_output()).map_err(Fail::Alone)?;
            self.put(SeqTable::Results, summary.seq, f.as_slice())?;
            self.written += f.len() as u64;
            bytes += stored_size(f.len());
        }
        self.count_change(summary.bytes, bytes);
        let summary = Summary {
            bytes,
            evicted: true,
            ..summary
        };
        self.store_entry(id, &summary)?;
        changes.push(Change::Set(Arc::from(id), summary));
        Ok(())
    }
}

/// The writer's check that new tasks may be recorded, with its last verdicts (measuring costs
/// system calls, compacting holds off readers and the writer: neither is done for every batch).
#[derive(Default)]
pub(super) struct SpaceCheck {
    /// The last free-space and size verdict, reused for a while (`SPACE_RECHECK`).
    space_verdict: Option<(Instant, Result<(), String>)>,
    /// While the file is over twice `max_bytes`: when it was last compacted, and the verdict.
    size_verdict: Option<(Instant, Result<(), String>)>,
}

impl SpaceCheck {
    /// Whether new tasks may be recorded: enough free space, and a file within its limit
    /// (pruned with `prune` and compacted first when it is not).
    pub(super) fn check(
        &mut self,
        shared: &Shared,
        prune: impl FnOnce() -> Res<usize>,
    ) -> Result<(), String> {
        // Measuring costs two system calls per batch; a verdict holds briefly (a disk that
        // fills meanwhile fails the write itself, which is reported as storage full too).
        if let Some(verdict) = recent(&self.space_verdict, SPACE_RECHECK) {
            return verdict;
        }
        let verdict = self.measure(shared, prune);
        self.space_verdict = Some((Instant::now(), verdict.clone()));
        verdict
    }

    fn measure(
        &mut self,
        shared: &Shared,
        prune: impl FnOnce() -> Res<usize>,
    ) -> Result<(), String> {
        let config = &shared.config;
        match free_bytes(&config.path) {
            Ok(free) if free < config.min_free_bytes => {
                return Err(format!(
                    "{free} bytes available on the filesystem holding {}, below the minimum of {}",
                    config.path.display(),
                    config.min_free_bytes
                ))
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "measuring the free space for {}: {e}",
                config.path.display()
            ),
        }
        // What the journal holds is bounded by `max_bytes` as it is written (`make_room`); the
        // file itself keeps the pages it once needed. Past the limit, it is compacted now and
        // then (redb reuses freed pages meanwhile), never a reason to refuse work.
        let len = file_len(&config.path);
        if len <= db_limit(config.max_bytes).saturating_mul(2) {
            self.size_verdict = None;
            return Ok(());
        }
        if recent(&self.size_verdict, SIZE_RECHECK).is_none() {
            let verdict = prune_and_compact(shared, prune);
            if let Err(why) = &verdict {
                tracing::debug!("{why}");
            }
            self.size_verdict = Some((Instant::now(), verdict));
        }
        Ok(())
    }
}

/// Prunes (with `prune`) and compacts the file; whether it is now within `max_bytes`.
fn prune_and_compact(shared: &Shared, prune: impl FnOnce() -> Res<usize>) -> Result<(), String> {
    if let Err(e) = prune() {
        tracing::warn!("pruning the journal: {e}");
    }
    {
        // No read transaction is alive while this is held (readers hold the read lock).
        let mut guard = write_lock(&shared.db);
        if let Some(db) = guard.as_mut() {
            for _ in 0..8 {
                match db.compact() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!("compacting the journal: {e}");
                        break;
                    }
                }
            }
        }
    }
    let config = &shared.config;
    let len = file_len(&config.path);
    if len <= db_limit(config.max_bytes) {
        Ok(())
    } else {
        Err(format!(
            "the journal {} is {len} bytes after pruning, above its limit of {} bytes",
            config.path.display(),
            db_limit(config.max_bytes)
        ))
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Whether `need` more bytes fit within `max_bytes`, after evicting the output of acknowledged
/// results, oldest first, if they do not. Only acknowledged results are evicted: what the
/// platform has not stored yet is never touched.
pub(super) fn make_room(
    t: &mut Tables<'_>,
    max_bytes: u64,
    need: u64,
    changes: &mut Vec<Change>,
) -> Result<bool, Fail> {
    /// Candidates read from the index at a time (its lock is not held while evicting).
    const BATCH: usize = 64;
    let mut after = 0;
    loop {
        if t.bytes_held().saturating_add(need) <= max_bytes {
            return Ok(true);
        }
        let candidates: Vec<(u64, Arc<str>)> = lock(t.index)
            .evictable
            .range(after..)
            .filter(|(seq, _)| !t.evicted.contains(seq))
            .take(BATCH)
            .map(|(seq, id)| (*seq, id.clone()))
            .collect();
        let Some(last) = candidates.last().map(|c| c.0) else {
            return Ok(false);
        };
        after = last + 1;
        for (_, id) in candidates {
            t.evict(&id, changes)?;
            if t.bytes_held().saturating_add(need) <= max_bytes {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::testkit::*;
    use crate::journal::{Accept, Journal, JournalConfig, JournalError};
    use crate::outcome::{RunResult, Status};

    /// Opens a journal holding a finished result and a queued task, reopens it with `tweak`
    /// (a configuration that leaves no room) and checks what is refused and what is not.
    /// `output_kept`: whether a task that finishes while the journal is full keeps its output
    /// (a full filesystem: yes, a write that succeeds is whole; a journal at its size limit with
    /// nothing acknowledged to evict: no, the result is kept without it).
    async fn storage_full_case(tweak: fn(&mut JournalConfig), output_kept: bool) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept(&request("kept")).await.unwrap();
        j.finish("kept", &result("kept")).await.unwrap();
        j.accept(&request("queued")).await.unwrap();
        drop(j);

        let mut full = cfg.clone();
        tweak(&mut full);
        let (j, recovery) = open(&full);
        assert_eq!(recovery.queued.len(), 1);
        match j.accept(&request("new")).await {
            Err(JournalError::StorageFull(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected StorageFull, got {other:?}"),
        }
        // Known ids are still answered, and recorded tasks still progress.
        assert!(matches!(
            j.accept(&request("kept")).await.unwrap(),
            Accept::Seen(_)
        ));
        j.start("queued").await.unwrap();
        j.finish("queued", &result("queued")).await.unwrap();
        assert!(j.get_blocking("new").is_none());
        assert_eq!(j.unacked().len(), 2);
        assert_eq!(j.get_blocking("kept").unwrap().result, Some(result("kept")));
        drop(j);

        // Back to normal limits: nothing was lost, and the refused id can come again.
        let (j, _) = open(&cfg);
        assert_eq!(j.counts(), (2, 2));
        assert_eq!(j.get_blocking("kept").unwrap().result, Some(result("kept")));
        let queued = if output_kept {
            result("queued")
        } else {
            result("queued").without_output()
        };
        assert_eq!(j.get_blocking("queued").unwrap().result, Some(queued));
        assert_eq!(j.accept(&request("new")).await.unwrap(), Accept::New);
    }

    #[tokio::test]
    async fn storage_full_when_the_filesystem_is_nearly_full() {
        storage_full_case(|c| c.min_free_bytes = u64::MAX / 2, true).await;
    }

    #[tokio::test]
    async fn storage_full_when_unacknowledged_results_fill_it() {
        storage_full_case(|c| c.max_bytes = 1, false).await;
    }

    fn big_result(text: &str, bytes: usize) -> RunResult {
        let mut r = result(text);
        r.stdout = "x".repeat(bytes);
        r.output = serde_json::json!({"text": text});
        r
    }

    /// Accepts, runs and (if `ack`) acknowledges `n` tasks named `{prefix}{i}`, each with a
    /// result of about `bytes`.
    async fn fill(j: &Journal, prefix: &str, n: usize, bytes: usize, ack: bool) {
        for i in 0..n {
            let id = format!("{prefix}{i}");
            assert_eq!(j.accept(&request(&id)).await.unwrap(), Accept::New, "{id}");
            j.start(&id).await.unwrap();
            j.finish(&id, &big_result(&id, bytes)).await.unwrap();
            if ack {
                j.ack(std::slice::from_ref(&id));
            }
        }
    }

    #[tokio::test]
    async fn acknowledged_results_are_evicted_oldest_first_and_never_block_new_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 1 << 20;
        let (j, _) = open(&cfg);
        // Ten times the limit in acknowledged results of 64 KiB.
        fill(&j, "t", 160, 64 << 10, true).await;
        let held = lock(&j.inner.shared.index).bytes;
        assert!(held <= cfg.max_bytes, "the journal holds {held} bytes");
        // The oldest lost their output, and only that; the newest are whole.
        let old = j.get_blocking("t0").unwrap();
        let r = old.result.unwrap();
        assert!(r.evicted);
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (Status::Ok, Some(0), Some("t0"))
        );
        assert!(r.stdout.is_empty() && r.output.is_null());
        assert!(old.request.input.is_null());
        assert_eq!(
            j.get_blocking("t159").unwrap().result,
            Some(big_result("t159", 64 << 10))
        );
        // Every id is still known: none runs twice.
        for i in 0..160 {
            assert!(matches!(
                j.accept(&request(&format!("t{i}"))).await.unwrap(),
                Accept::Seen(_)
            ));
        }
        drop(j);
        // The evictions are durable, and the sizes are known again after a restart.
        let (j, _) = open(&cfg);
        assert!(j.get_blocking("t0").unwrap().result.unwrap().evicted);
        let reopened = lock(&j.inner.shared.index).bytes;
        assert_eq!(reopened, held);
        fill(&j, "u", 40, 64 << 10, true).await;
        assert!(lock(&j.inner.shared.index).bytes <= cfg.max_bytes);
    }

    #[tokio::test]
    async fn unacknowledged_results_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 1 << 20;
        let (j, _) = open(&cfg);
        fill(&j, "acked", 4, 64 << 10, true).await;
        // Unacknowledged results up to the limit: the acknowledged ones make room first.
        let mut refused_at = None;
        for i in 0..40 {
            let id = format!("owed{i}");
            match j.accept(&request(&id)).await {
                Ok(Accept::New) => {
                    j.start(&id).await.unwrap();
                    j.finish(&id, &big_result(&id, 64 << 10)).await.unwrap();
                }
                Err(JournalError::StorageFull(msg)) => {
                    assert!(msg.contains("not acknowledged"), "{msg}");
                    refused_at = Some(i);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let refused_at = refused_at.expect("the journal filled up");
        assert!(j.get_blocking("acked0").unwrap().result.unwrap().evicted);
        for i in 0..refused_at {
            let r = j.get_blocking(&format!("owed{i}")).unwrap().result.unwrap();
            assert!(!r.evicted, "owed{i} lost its output");
        }
        assert_eq!(j.unacked().len(), refused_at);
        // Once the platform acknowledges them, there is room again.
        let owed: Vec<String> = (0..refused_at).map(|i| format!("owed{i}")).collect();
        j.ack(&owed);
        assert_eq!(j.accept(&request("after")).await.unwrap(), Accept::New);
    }

    #[tokio::test]
    async fn the_file_stays_near_its_limit_however_many_results_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_bytes = 16 << 20;
        let (j, _) = open(&cfg);
        // 100 MiB of acknowledged results through a journal of 16 MiB.
        fill(&j, "t", 400, 256 << 10, true).await;
        // What the file keeps beyond its limit is compacted away with the next acceptance.
        tokio::time::sleep(SPACE_RECHECK).await;
        j.accept(&request("next")).await.unwrap();
        drop(j);
        let len = file_len(&cfg.path);
        // Pages freed by evictions are reused; redb's copy-on-write and its regions for large
        // values keep the file within about twice what it holds.
        assert!(
            len <= 5 * cfg.max_bytes / 2,
            "the file is {len} bytes for a limit of {}",
            cfg.max_bytes
        );
    }
}
