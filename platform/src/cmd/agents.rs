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
/// Prints one JSON array: [{"id", "connected", "enrolled_at", "last_seen", "status", "audit"}],
/// where status is the agent's latest status report since the server started (or null), with
/// its stats (link, tasks, journal, stores, memory) when the agent sends them, and audit is its
/// audit chain as the platform stored it, kept across restarts: {"seq", "hash", "flag"} (null
/// when no status carried one). flag is null, or {"kind", "detail", "seq", "flagged_at"} with
/// kind "backwards" (the chain's seq went down), "fork" (a hash differs from one stored) or
/// "unverifiable" (the agent no longer has the record asked about); `bridgectl audit clear`
/// clears it. An agent whose stored audit state cannot be read has "audit_error" instead.
#[derive(Debug, Args)]
pub struct AgentsArgs {}

/// Runs `agents` against the control socket at `socket`.
pub fn run(socket: &Path, _args: AgentsArgs) -> Result<ExitCode> {
    let response = control::request(socket, &json!({"cmd": "agents"}), Duration::from_secs(30))?;
    crate::print_json(&response["agents"]);
    Ok(ExitCode::SUCCESS)
}
