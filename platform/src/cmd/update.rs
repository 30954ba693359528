//! `bridgectl update`: update one agent to a signed release and wait for the verdict.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::release::default_binary;
use crate::serve::control;
use crate::timearg::parse_duration;

/// How much longer than the server's wait the client waits for its answer (the server reads
/// and hashes the release first).
pub const CLIENT_MARGIN: Duration = Duration::from_secs(60);

/// Update a connected agent to a release, through a running `bridgectl serve`, and wait for
/// the verdict.
///
/// The server reads the manifest (`bridgectl release sign`'s output) and the binary (for a
/// format-2 manifest also its gzip archive, BINARY.gz), and refuses a binary or archive whose
/// size or SHA-256 is not the manifest's before sending anything. It sends the agent `update`;
/// the agent checks the manifest against its release keys (and OS, architecture, downgrade),
/// fetches the binary (format 2: the archive, checked, then unpacked no further than the
/// binary's size) from the server, lets its running tasks finish
/// (--drain-timeout, default its config's) and restarts into the new version through its
/// launcher. The new version confirms after its health window and reports `succeeded`; one
/// that does not confirm is rolled back, and the previous version reports `failed`. The server
/// stores the verdict in its state directory (updates/ID.json).
///
/// Prints {"id", "agent", "version", "state", "staged", "reason"?, "detail"?,
/// "agent_version"?}, where state is "succeeded", "failed" (rolled back), "refused" (by the
/// agent; reason says why: downgrade, bad_signature, unknown_key, wrong_platform…) or
/// "timeout" (no verdict within --timeout).
///
/// Exit status: 0 succeeded; 1 refused, failed or timeout; 2 not sent (usage error, server
/// unreachable, agent unknown, not connected or speaking protocol version 1, an update of it
/// already in progress, the binary or archive does not match the manifest).
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The agent id (see `bridgectl agents`).
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The signed release manifest.
    #[arg(long, value_name = "MANIFEST")]
    pub release: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: ReleaseOptions,
    /// How long to wait for the verdict (e.g. 90s, 10m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

/// What `update` and `rollout` say of the release besides its manifest.
#[derive(Debug, Args)]
pub struct ReleaseOptions {
    /// The agent binary the manifest describes (default: MANIFEST without ".manifest").
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// Allow a release older than an agent's version (its config must allow downgrades too).
    #[arg(long)]
    pub allow_downgrade: bool,
    /// How long an agent lets running tasks finish before it restarts (e.g. 30s, 5m;
    /// default: its config's `update.drain_timeout_secs`).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
}

impl ReleaseOptions {
    /// The control request `cmd` for the release `manifest`: the absolute paths of the
    /// manifest and the binary (the server reads them) and these options.
    pub fn request(&self, cmd: &str, manifest: &Path) -> Result<Value> {
        let (manifest, binary) = release_paths(manifest, self.binary.as_deref())?;
        let mut request = json!({
            "cmd": cmd,
            "manifest": manifest,
            "binary": binary,
            "allow_downgrade": self.allow_downgrade,
        });
        if let Some(drain) = self.drain_timeout {
            request["drain_timeout_ms"] = json!(millis(drain));
        }
        Ok(request)
    }
}

/// The absolute paths of a release's manifest and binary (the server reads them).
fn release_paths(manifest: &Path, binary: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => default_binary(manifest)?,
    };
    let absolute = |p: &Path| {
        p.canonicalize()
            .with_context(|| format!("cannot read {}", p.display()))
    };
    Ok((absolute(manifest)?, absolute(&binary)?))
}

/// Milliseconds of `d`, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `update` against the control socket at `socket`.
pub fn run(socket: &Path, args: UpdateArgs) -> Result<ExitCode> {
    let mut request = args.options.request("update", &args.release)?;
    request["agent"] = json!(args.agent);
    request["wait_ms"] = json!(millis(args.timeout));
    let wait = args.timeout.saturating_add(CLIENT_MARGIN);
    let response = control::request(socket, &request, wait)?;
    let update = &response["update"];
    crate::print_json(update);
    Ok(if update["state"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
