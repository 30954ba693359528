//! The warm `hello` task the journal benchmarks write: its request and its result, as the
//! agent's fast path journals them. Included by `journal.rs` and `audit.rs` (`#[path]`).

use bridge_host::outcome::{RunResult, Status};
use bridge_protocol::RunRequest;

/// The `run` request of task `task_id`.
pub fn request(task_id: &str) -> RunRequest {
    RunRequest {
        id: format!("msg-{task_id}"),
        task_id: task_id.to_string(),
        command: Some("hello".into()),
        input: serde_json::json!({"name": "bench"}),
        ..Default::default()
    }
}

/// The result `hello` gives.
pub fn result() -> RunResult {
    let mut r = RunResult::refused(Status::Ok, "");
    r.error = None;
    r.exit_code = Some(0);
    r.output = serde_json::json!({"greeting": "hello, bench"});
    r.duration_ms = 1.2;
    r.fuel_consumed = Some(123_456);
    r
}
