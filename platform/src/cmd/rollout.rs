//! `bridgectl rollout`: a staged rollout of a release across the connected agents, and its
//! status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::cmd::update::{millis, ReleaseOptions, CLIENT_MARGIN};
use crate::serve::control;
use crate::timearg::parse_duration;

/// How long one `rollout_status` request waits for the rollout to be over, with --wait.
const POLL: Duration = Duration::from_secs(30);

/// Roll a release out to the connected agents in stages, through a running `bridgectl serve`;
/// or, with `status`, show how the rollout stands.
///
/// The targets are the agents connected now that do not already report the release's version,
/// in agent id order. The first --canary of them are updated first (all at once); once their
/// verdicts are in, the rest follow in batches of --batch percent of the targets (rounded up),
/// one batch after the other. An agent fails when its update is refused, rolled back
/// ("failed"), not sent, or has no verdict within --timeout. As soon as --max-failures agents
/// failed the rollout halts: no further agent is updated (updates already sent finish). One
/// rollout at a time per server; it runs inside the server, so this command may exit while it
/// goes on.
///
/// Prints the rollout's status: {"state": "running"|"halted"|"completed", "version",
/// "targets", "succeeded": [ID…], "failed": [{"agent", "reason", "detail"}], "in_flight":
/// [ID…], "untouched", "canary", "batch_percent", "max_failures", "started_at",
/// "finished_at"}; `rollout status` prints null when no rollout was started. With --wait, the
/// status once the rollout is over.
///
/// Exit status: 0 started (with --wait: completed); 1 with --wait: halted; 2 not started
/// (usage error, server unreachable, a rollout already running, the binary does not match the
/// manifest).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutArgs {
    /// `status`: show the rollout's status.
    #[command(subcommand)]
    pub command: Option<RolloutCommand>,
    /// The signed release manifest.
    #[arg(long, value_name = "MANIFEST", required = true)]
    pub release: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: ReleaseOptions,
    /// How many agents are updated first, before any batch.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub canary: usize,
    /// The size of each batch after the canary group, in percent of the targets (1% to 100%,
    /// rounded up to whole agents).
    #[arg(long, value_name = "P%", value_parser = parse_percent, default_value = "25%")]
    pub batch: u32,
    /// The rollout halts once this many agents failed.
    #[arg(long, value_name = "F", default_value_t = 1)]
    pub max_failures: usize,
    /// How long to wait for each agent's verdict; no verdict in time counts as a failure.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10m")]
    pub timeout: Duration,
    /// Wait until the rollout is over (halted or completed, nothing in flight) and print its
    /// final status.
    #[arg(long)]
    pub wait: bool,
}

/// The `rollout` subcommands.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Print the rollout's status (null if none was started).
    Status {
        /// Wait until the rollout is over, then print its status.
        #[arg(long)]
        wait: bool,
    },
}

/// Parses `25%` or `25` (1 to 100).
fn parse_percent(text: &str) -> Result<u32, String> {
    let number = text.strip_suffix('%').unwrap_or(text);
    match number.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{text:?} is not a percentage from 1% to 100%")),
    }
}

/// Runs `rollout` or `rollout status` against the control socket at `socket`.
pub fn run(socket: &Path, args: RolloutArgs) -> Result<ExitCode> {
    let (status, wait) = match (&args.command, &args.release) {
        (Some(RolloutCommand::Status { wait }), _) => (status(socket, Duration::ZERO)?, *wait),
        (None, Some(release)) => (start(socket, release, &args)?, args.wait),
        (None, None) => anyhow::bail!("give --release MANIFEST, or `rollout status`"),
    };
    let status = if wait && !status.is_null() {
        wait_over(socket, status)?
    } else {
        status
    };
    crate::print_json(&status);
    Ok(if wait && status["state"] == "halted" {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn start(socket: &Path, release: &Path, args: &RolloutArgs) -> Result<Value> {
    let mut request = args.options.request("rollout", release)?;
    request["canary"] = json!(args.canary);
    request["batch_percent"] = json!(args.batch);
    request["max_failures"] = json!(args.max_failures);
    request["agent_wait_ms"] = json!(millis(args.timeout));
    let response = control::request(socket, &request, CLIENT_MARGIN)?;
    Ok(response["rollout"].clone())
}

/// The rollout's status, the server waiting up to `wait` for it to be over.
fn status(socket: &Path, wait: Duration) -> Result<Value> {
    let request = json!({"cmd": "rollout_status", "wait_ms": millis(wait)});
    let response = control::request(socket, &request, wait.saturating_add(CLIENT_MARGIN))?;
    Ok(response["rollout"].clone())
}

/// Whether a status says the rollout is over: the server records its end last
/// (`RolloutStatus::is_over`).
fn is_over(status: &Value) -> bool {
    status["finished_at"].is_string()
}

/// Asks for the status until the rollout is over.
fn wait_over(socket: &Path, mut current: Value) -> Result<Value> {
    while !is_over(&current) {
        current = status(socket, POLL)?;
        if current.is_null() {
            anyhow::bail!("the server has no rollout any more (was it restarted?)");
        }
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("25%"), Ok(25));
        assert_eq!(parse_percent("100"), Ok(100));
        for bad in ["0%", "101%", "%", "", "12.5%", "-5%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }
}
