//! `bridgectl result`: print a task's stored result.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::cmd::run::{print_result, CLIENT_MARGIN};
use crate::serve::control;

/// Print the result a running `bridgectl serve` stored for a task.
///
/// The server stores every result an agent delivers, by task id, in its state directory (the
/// first one received wins), so this works after the `run` that started the task gave up
/// waiting, and after a restart of the server. Prints the result as one JSON object, exactly as
/// `bridgectl run` does.
///
/// Exit status: 0 if the result's status is "ok", 1 for any other status, 2 if there is no
/// result (none stored within --wait-ms, server unreachable).
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The task id.
    #[arg(long, value_name = "ID")]
    pub task_id: String,
    /// How long to wait for a result that is not stored yet, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub wait_ms: u64,
}

/// Runs `result` against the control socket at `socket`.
pub fn run(socket: &Path, args: ResultArgs) -> Result<ExitCode> {
    let request = json!({"cmd": "result", "task_id": args.task_id, "wait_ms": args.wait_ms});
    let wait = Duration::from_millis(args.wait_ms).saturating_add(CLIENT_MARGIN);
    let response = control::request(socket, &request, wait)?;
    print_result(&response)
}
