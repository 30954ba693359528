//! `bridgectl audit clear`: clear the flag the platform raised on an agent's audit chain.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::serve::control;

/// The platform's view of the agents' audit chains, through a running `bridgectl serve`.
///
/// `bridgectl agents` shows each agent's chain as the platform stored it: {"seq", "hash",
/// "flag"}, where flag is null or {"kind": "backwards"|"fork"|"unverifiable", "detail", "seq",
/// "flagged_at"}. A flag stays until it is cleared here.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// The `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Clear an agent's audit flag (once the rewrite it points at is explained).
    ///
    /// Prints {"agent", "cleared": FLAG|null} (null: there was no flag). The platform keeps
    /// judging the chain from the head the agent reports now.
    Clear {
        /// The agent id.
        #[arg(long, value_name = "ID")]
        agent: String,
    },
}

/// Runs `audit …` against the control socket at `socket`.
pub fn run(socket: &Path, args: AuditArgs) -> Result<ExitCode> {
    match args.command {
        AuditCommand::Clear { agent } => {
            let request = json!({"cmd": "audit_clear", "agent": agent});
            let response = control::request(socket, &request, Duration::from_secs(30))?;
            crate::print_json(&json!({"agent": response["agent"], "cleared": response["cleared"]}));
            Ok(ExitCode::SUCCESS)
        }
    }
}
