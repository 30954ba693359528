//! A manual rollback after a `kill -9` leaves the previous release a journal it can read whole:
//! an agent process (this test binary, in child mode) records tasks through the journal's
//! write-ahead log and is killed with SIGKILL before any checkpoint; `bridge-daemon rollback`
//! settles the journal, then switches; the redb file alone, read as an agent that knows nothing
//! of the log reads it, holds every task.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use bridge_host::journal::{log_path, Accept, Journal, JournalConfig};
use bridge_protocol::RunRequest;
use redb::{ReadableDatabase, ReadableTable};

const CHILD_ENV: &str = "BRIDGE_TEST_JOURNAL_CHILD";
const TASKS: usize = 20;

/// Child mode: records tasks through the log, says `ready` after `TASKS`, goes on until killed.
#[test]
fn child_agent() {
    let Some(state) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut config = JournalConfig::new(Path::new(&state).join("journal.redb"));
    config.log = true;
    config.min_free_bytes = 0;
    let (journal, _) = Journal::open(config).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Never idle (an idle journal checkpoints its log): tasks keep coming until the kill.
    runtime.block_on(async {
        for i in 0..1_000_000 {
            let request = RunRequest {
                id: format!("msg-{i}"),
                task_id: format!("task-{i:07}"),
                command: Some("hello".into()),
                ..Default::default()
            };
            assert_eq!(journal.accept(&request).await.unwrap(), Accept::New);
            if i + 1 == TASKS {
                println!("ready");
            }
        }
    });
}

/// The task ids in the redb file, read without the log (table `entries`, as every version
/// since format 2 reads it).
fn task_ids(journal: &Path) -> Vec<String> {
    const ENTRIES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
    let db = redb::Database::open(journal).unwrap();
    let txn = db.begin_read().unwrap();
    let entries = txn.open_table(ENTRIES).unwrap();
    let mut ids = Vec::new();
    for item in entries.iter().unwrap() {
        let (_, v) = item.unwrap();
        let entry: serde_json::Value = serde_json::from_slice(v.value()).unwrap();
        ids.push(entry["id"].as_str().unwrap().to_string());
    }
    ids
}

#[test]
fn a_rollback_after_kill_9_leaves_every_logged_task_in_the_redb_file() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let layout = dir.path().join("layout");
    for version in ["0.1.0", "0.2.0"] {
        let release = layout.join("releases").join(version);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::write(release.join("bridge-daemon"), b"#!/bin/sh\n").unwrap();
    }
    std::os::unix::fs::symlink("releases/0.2.0", layout.join("current")).unwrap();
    std::os::unix::fs::symlink("releases/0.1.0", layout.join("previous")).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_agent", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &state)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("ready")),
        "the child agent did not get ready"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let journal = state.join("journal.redb");
    assert!(log_path(&journal).exists());
    // Before settling, the redb file alone lacks the tasks the log holds.
    let before = task_ids(&journal).len();

    let out = Command::new(env!("CARGO_BIN_EXE_bridge-daemon"))
        .args(["rollback", "--layout"])
        .arg(&layout)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_link(layout.join("current")).unwrap(),
        Path::new("releases/0.1.0")
    );
    assert!(!log_path(&journal).exists());
    // Every task the killed agent accepted (at least `TASKS`, in order, none missing).
    let ids = task_ids(&journal);
    assert!(
        ids.len() >= TASKS && ids.len() > before,
        "{} tasks, {before} before",
        ids.len()
    );
    let expected: Vec<String> = (0..ids.len()).map(|i| format!("task-{i:07}")).collect();
    assert_eq!(ids, expected);
}
