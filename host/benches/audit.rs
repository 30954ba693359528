//! What the audit record costs a result: `cargo bench -p bridge-host --bench audit`.
//!
//! Two journals side by side in one directory (`BRIDGE_BENCH_DIR`, default a temporary
//! directory under `target/`, on the disk the agent's state would be on, not a tmpfs), one with
//! audit records (as the agent runs) and one without (`JournalConfig::audit = false`, which
//! exists for this measurement). Rounds alternate between them; each round accepts a task and
//! records its result (`finish`, a durable commit: the record is written in that commit). The
//! latencies of the finish commits are compared (median, p99), and of the whole task's two
//! commits. Then the CPU cost of one record alone (made, serialized, hashed: what the writer
//! adds to a commit), over 100 000 records. `BRIDGE_BENCH_QUICK=1`: 200 rounds and 10 000
//! records.

use std::time::{Duration, Instant};

use bridge_host::journal::{Journal, JournalConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[path = "common/task.rs"]
mod task;
use task::{request, result};

fn open(dir: &std::path::Path, audit: bool) -> Journal {
    let mut config = JournalConfig::new(dir.join("journal.redb"));
    config.audit = audit;
    config.min_free_bytes = 0;
    Journal::open(config).expect("open the journal").0
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let rounds = if quick { 200 } else { 2000 };
    let base = std::env::var_os("BRIDGE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-audit")
        });
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let with = open(&tmp.path().join("with"), true);
        let without = open(&tmp.path().join("without"), false);
        let r = result();
        // (finish, accept + finish) per journal.
        let mut times = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for round in 0..rounds + 50 {
            // Alternating which goes first, so that neither always follows the other's fsync.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let j = if which == 0 { &with } else { &without };
                let id = format!("t{round}");
                let start = Instant::now();
                j.accept_running(&request(&id)).await.unwrap();
                let accepted = Instant::now();
                j.finish(&id, &r).await.unwrap();
                let done = Instant::now();
                if round >= 50 {
                    times[which].0.push(done - accepted);
                    times[which].1.push(done - start);
                }
            }
        }
        assert_eq!(with.audit_head().seq, (rounds + 50) as u64);
        assert_eq!(without.audit_head().seq, 0);
        println!(
            "audit record cost: {rounds} rounds, alternating, journals in {}",
            base.display()
        );
        for (name, (finish, task)) in ["with audit", "without audit"].iter().zip(times.iter_mut()) {
            finish.sort();
            task.sort();
            println!(
                "{name:>14}: finish commit median {:>7.1} µs p99 {:>8.1} µs; task (accept + finish) median {:>7.1} µs p99 {:>8.1} µs",
                percentile(finish, 0.5).as_secs_f64() * 1e6,
                percentile(finish, 0.99).as_secs_f64() * 1e6,
                percentile(task, 0.5).as_secs_f64() * 1e6,
                percentile(task, 0.99).as_secs_f64() * 1e6,
            );
        }
    });
    // The record alone: what the writer does in the transaction besides the table insert.
    let n = if quick { 10_000 } else { 100_000 };
    let facts = bridge_host::audit::Facts {
        kind: Some("wasm"),
        command: Some("hello".into()),
        file_sha256: Some("ab".repeat(32)),
        ..Default::default()
    };
    let r = result();
    let mut head = bridge_host::audit::Head::default();
    let start = Instant::now();
    for i in 0..n {
        let record =
            bridge_host::audit::Record::of(&head, 1_764_800_000_000 + i, "task", &facts, &r);
        let line = record.line();
        head = bridge_host::audit::head_after(record.seq, &line);
    }
    let per = start.elapsed().as_secs_f64() * 1e9 / n as f64;
    println!("one record (made, serialized, hashed): {per:.0} ns, {n} records");
}
