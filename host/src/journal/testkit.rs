//! Test fixtures shared by the journal's unit tests: requests, results, a journal in a
//! temporary directory.

use std::path::Path;

use bridge_protocol::RunRequest;
use redb::{Database, ReadableDatabase};

use crate::outcome::{RunResult, Status};

use super::schema::META;
use super::{Journal, JournalConfig, Recovery, TaskRecord};

pub(super) fn request(task_id: &str) -> RunRequest {
    RunRequest {
        id: format!("msg-{task_id}"),
        task_id: task_id.to_string(),
        command: Some("hello".into()),
        input: serde_json::json!({"n": 1}),
        ..Default::default()
    }
}

pub(super) fn result(text: &str) -> RunResult {
    let mut r = RunResult::refused(Status::Ok, text);
    r.exit_code = Some(0);
    r.stdout = text.to_string();
    r
}

pub(super) fn config(dir: &Path) -> JournalConfig {
    JournalConfig::new(dir.join("state").join("journal.redb"))
}

pub(super) fn open(config: &JournalConfig) -> (Journal, Recovery) {
    Journal::open(config.clone()).expect("open the journal")
}

/// The format version recorded in the journal file at `path`.
pub(super) fn format_version(path: &Path) -> u64 {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let version = meta.get("schema").unwrap().unwrap().value();
    version
}

/// The task ids of `records`, in order.
pub(super) fn ids(records: &[TaskRecord]) -> Vec<String> {
    records.iter().map(|r| r.request.task_id.clone()).collect()
}
