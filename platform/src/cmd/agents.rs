//! `bridgectl agents`: list the agents a running server knows.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::serve::control;

/// List the enrolled agents of a running `bridgectl serve`.
///
/// Prints one JSON array: [{"id", "connected", "enrolled_at", "last_seen", "status"}], where
/// status is the agent's latest status report since the server started (or null).
#[derive(Debug, Args)]
pub struct AgentsArgs {}

/// Runs `agents` against the control socket at `socket`.
pub fn run(socket: &Path, _args: AgentsArgs) -> Result<ExitCode> {
    let response = control::request(socket, &json!({"cmd": "agents"}), Duration::from_secs(30))?;
    crate::print_json(&response["agents"]);
    Ok(ExitCode::SUCCESS)
}
