//! The journal's commit latency, and what the alternatives would take: `cargo bench -p
//! bridge-host --bench journal`.
//!
//! Each variant makes a few thousand commits, one after the other, of a realistic task: a warm
//! `hello` whose result is written with its acceptance (`accept_running_with`, the agent's
//! fast path: the task's record, result, index entry and audit record in one commit). The
//! latency of each commit is measured as the caller sees it (the `accept` call, or the raw
//! write and sync), and the median and p99 printed and recorded (`journal.<variant>_commit_*`).
//! Variants, all in one directory (`BRIDGE_BENCH_DIR`, default under `target/`, on the disk the
//! agent's state would be on):
//! - `redb`: the journal committing in its redb file (as it runs without its log);
//! - `redb_no_audit`: the same without the audit record (`JournalConfig::audit = false`);
//! - `btree_one_table`: a redb file of one table, one value per task (the smallest B-tree
//!   commit the journal's data could take);
//! - `log_prototype`: a preallocated file, one `pwrite` of a frame of the same bytes and one
//!   `fdatasync` per commit (what an append-only log costs, without the journal around it);
//! - `fdatasync_floor`: one 64-byte `pwrite` and one `fdatasync` of a preallocated file;
//! - `wal`: the journal with its write-ahead log in use (`JournalConfig::log`), as the agent runs;
//! - `fdatasync_paced`, `wal_paced`: `fdatasync_floor` and `wal` with a pause of [`PACE`]
//!   before each commit (not timed): the cadence of the link benchmark's round trips, one task
//!   after the other, with the disk and the CPUs idle between commits. On a virtual machine a
//!   sync after an idle pause takes longer than one right behind the previous sync (the host's
//!   side of the disk and the idle vCPUs have to wake up), so these are the floor and the
//!   journal's share of a sequential round trip.
//!
//! `BRIDGE_BENCH_QUICK=1`: 300 commits per variant instead of 3000 (the paced ones: 1000 and
//! 300).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bridge_host::audit::Facts;
use bridge_host::journal::{Accept, EarlyResult, Journal, JournalConfig};

#[path = "common/task.rs"]
mod task;
use task::{request, result};

fn facts() -> Facts {
    Facts {
        kind: Some("wasm"),
        command: Some("hello".into()),
        file_sha256: Some("ab".repeat(32)),
        ..Default::default()
    }
}

/// The bytes a task's commit writes as values (record, result, entry, audit line): what the
/// raw variants write per commit.
fn task_bytes(i: usize) -> Vec<u8> {
    let record = serde_json::json!({
        "request": request(&format!("t{i}")),
        "phase": "running", "acked": false, "accepted_at_ms": 1_764_800_000_000u64 + i as u64,
    });
    let mut v = serde_json::to_vec(&record).unwrap();
    v.extend(serde_json::to_vec(&result()).unwrap());
    v.extend_from_slice(&[b'e'; 96]);
    v.extend_from_slice(&[b'a'; 320]);
    v
}

struct Figures {
    median: Duration,
    p99: Duration,
}

fn figures(mut times: Vec<Duration>) -> Figures {
    times.sort();
    let at = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Figures {
        median: at(0.5),
        p99: at(0.99),
    }
}

/// The pause before each commit of the paced variants: about one sequential round trip.
const PACE: Duration = Duration::from_millis(1);

fn journal_variant(
    dir: &Path,
    n: usize,
    audit: bool,
    log: bool,
    pace: Option<Duration>,
) -> Vec<Duration> {
    let mut config = JournalConfig::new(dir.join("journal.redb"));
    config.audit = audit;
    config.log = log;
    config.min_free_bytes = 0;
    let (journal, _) = Journal::open(config).expect("open the journal");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = result();
    let times = runtime.block_on(async {
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 50 {
            let id = format!("t{i}");
            let early = EarlyResult::audited(facts());
            assert!(early.offer(r.clone()).is_none());
            if let Some(pace) = pace {
                std::thread::sleep(pace);
            }
            let start = Instant::now();
            let accepted = journal.accept_running_with(&request(&id), early).await;
            let took = start.elapsed();
            assert_eq!(accepted.unwrap(), Accept::New);
            if i >= 50 {
                times.push(took);
            }
        }
        times
    });
    drop(journal);
    times
}

fn btree_variant(dir: &Path, n: usize) -> Vec<Duration> {
    const TASKS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("tasks");
    let db = redb::Database::create(dir.join("one-table.redb")).unwrap();
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let v = task_bytes(i);
        let start = Instant::now();
        let txn = db.begin_write().unwrap();
        txn.open_table(TASKS)
            .unwrap()
            .insert(i as u64, v.as_slice())
            .unwrap();
        txn.commit().unwrap();
        if i >= 50 {
            times.push(start.elapsed());
        }
    }
    times
}

/// A preallocated file of `capacity` zeros, synced.
fn prealloc(path: &Path, capacity: u64) -> std::fs::File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all_at(&vec![0u8; capacity as usize], 0).unwrap();
    f.sync_all().unwrap();
    f
}

fn log_variant(dir: &Path, n: usize) -> Vec<Duration> {
    let capacity = 4u64 << 20;
    let f = prealloc(&dir.join("prototype.log"), capacity);
    let mut at = 0u64;
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let payload = task_bytes(i);
        let start = Instant::now();
        let mut frame = Vec::with_capacity(payload.len() + 20);
        frame.extend_from_slice(b"BJL1");
        frame.extend_from_slice(&1u64.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        if at + frame.len() as u64 > capacity {
            at = 0;
        }
        f.write_all_at(&frame, at).unwrap();
        f.sync_data().unwrap();
        at += frame.len() as u64;
        if i >= 50 {
            times.push(start.elapsed());
        }
    }
    times
}

fn floor_variant(dir: &Path, n: usize, pace: Option<Duration>) -> Vec<Duration> {
    let f = prealloc(&dir.join("floor"), 1 << 20);
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 50 {
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
        let start = Instant::now();
        f.write_all_at(&[i as u8; 64], ((i % 256) * 4096) as u64)
            .unwrap();
        f.sync_data().unwrap();
        if i >= 50 {
            times.push(start.elapsed());
        }
    }
    times
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let n = if quick { 300 } else { 3000 };
    let paced = if quick { 300 } else { 1000 };
    let base = std::env::var_os("BRIDGE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-journal")
        });
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let sub = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let variants: Vec<(&str, Vec<Duration>)> = vec![
        ("redb", journal_variant(&sub("redb"), n, true, false, None)),
        (
            "redb_no_audit",
            journal_variant(&sub("no-audit"), n, false, false, None),
        ),
        ("btree_one_table", btree_variant(&sub("btree"), n)),
        ("log_prototype", log_variant(&sub("log"), n)),
        ("fdatasync_floor", floor_variant(&sub("floor"), n, None)),
        ("wal", journal_variant(&sub("wal"), n, true, true, None)),
        (
            "fdatasync_paced",
            floor_variant(&sub("floor-paced"), paced, Some(PACE)),
        ),
        (
            "wal_paced",
            journal_variant(&sub("wal-paced"), paced, true, true, Some(PACE)),
        ),
    ];
    println!(
        "journal commit latency: {n} commits per variant ({paced} for the paced ones), files in {}",
        base.display()
    );
    println!("{:<18} {:>12} {:>12}", "variant", "median µs", "p99 µs");
    for (name, times) in variants {
        let f = figures(times);
        let (median, p99) = (f.median.as_secs_f64() * 1e6, f.p99.as_secs_f64() * 1e6);
        println!("{name:<18} {median:>12.0} {p99:>12.0}");
        bridge_testkit::figures::record(&format!("journal.{name}_commit_median_us"), median, "us");
        bridge_testkit::figures::record(&format!("journal.{name}_commit_p99_us"), p99, "us");
    }
}
