//! `bridgectl cancel`: cancel a task on an agent.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::cmd::run::CLIENT_MARGIN;
use crate::serve::control;

/// Ask a connected agent to cancel a task, through a running `bridgectl serve`.
///
/// Prints {"task_id", "outcome"}, where outcome is what the agent found: "cancelling" (the
/// task was running and is being stopped), "dequeued" (it was waiting and was removed), both
/// followed by a "cancelled" result; "finished" (too late: it had finished, nothing changes),
/// or "unknown" (the agent has no such task).
///
/// Exit status: 0 when the agent answered, 2 otherwise (agent unknown or not connected, no
/// answer within 30 s, connection lost).
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The agent id.
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The task to cancel.
    #[arg(long, value_name = "ID")]
    pub task_id: String,
}

/// Runs `cancel` against the control socket at `socket`.
pub fn run(socket: &Path, args: CancelArgs) -> Result<ExitCode> {
    let request = json!({"cmd": "cancel", "agent": args.agent, "task_id": args.task_id});
    let wait =
        Duration::from_millis(control::DEFAULT_REQUEST_WAIT_MS).saturating_add(CLIENT_MARGIN);
    let response = control::request(socket, &request, wait)?;
    crate::print_json(&json!({"task_id": response["task_id"], "outcome": response["outcome"]}));
    Ok(ExitCode::SUCCESS)
}
