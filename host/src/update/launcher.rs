//! `bridge-daemon launcher run`: the service's main process, unprivileged. It starts
//! `LAYOUT/current/bridge-daemon run --config FILE` with [`ENV_LAYOUT`] set:
//!
//! - nothing pending (or the pending version already confirmed): it becomes the agent (`exec`),
//!   no process stays in between;
//! - a switched version not yet confirmed: it starts it as a child and watches it. The child
//!   cannot be started → verdict `not_started`; it exits before confirming → `exited`; it does
//!   not confirm within the confirm timeout → `not_confirmed`, and it is stopped (SIGTERM, then
//!   SIGKILL after [`KILL_AFTER`]). With a verdict the launcher exits 1: the service manager
//!   restarts it, and `launcher prepare` rolls back. Once confirmed, the launcher stays the
//!   child's parent and exits with its status. SIGTERM and SIGINT are forwarded to the child.
//!
//! The verdict ([`files::Verdict`]) goes to `STATE/update/verdict`: the launcher runs as the
//! service user, whose directory it is. Confirmation is `STATE/update/confirmed` holding the
//! pending version, polled every [`POLL`].

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bridge_protocol::UpdateReason;
use tokio::signal::unix::{signal, SignalKind};

use super::files::{Pending, Phase, Verdict};
use super::layout::Layout;
use super::settings::LauncherSettings;
use super::state::AgentState;
use super::ENV_LAYOUT;

/// How often the confirmation is looked for.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a version that did not confirm gets between SIGTERM and SIGKILL.
pub const KILL_AFTER: Duration = Duration::from_secs(5);

/// The agent command the launcher starts.
pub fn agent_command(layout: &Layout, config: &Path, extra: &[OsString]) -> Command {
    let mut cmd = Command::new(layout.current_binary());
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env(ENV_LAYOUT, layout.root());
    cmd
}

/// Runs the agent. Returns only when watching a pending version (its exit status to exit
/// with); otherwise this process becomes the agent, or the error says why it could not.
pub fn run(layout: &Layout, config: &Path, extra: &[OsString]) -> Result<u8> {
    let mut cmd = agent_command(layout, config, extra);
    let state = layout.read_state().unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "cannot read the layout's state: starting the current release");
        Default::default()
    });
    if let Some(pending) = state.pending.filter(|p| p.phase == Phase::Switched) {
        match LauncherSettings::load(config).and_then(|s| AgentState::open(&s.state_dir)) {
            Ok(agent) if agent.is_confirmed(&pending.version) => {}
            Ok(agent) => return watch(cmd, &agent, &pending, layout),
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                version = %pending.version,
                "cannot read the agent's state: the pending version runs unwatched"
            ),
        }
    }
    let e = cmd.exec();
    Err(e).with_context(|| format!("cannot start {}", layout.current_binary().display()))
}

/// Starts the pending version as a child and watches it (see the module's docs).
fn watch(cmd: Command, agent: &AgentState, pending: &Pending, layout: &Layout) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(watch_child(cmd, agent, pending, layout))
}

fn record(agent: &AgentState, pending: &Pending, reason: UpdateReason, detail: String) {
    tracing::error!(version = %pending.version, ?reason, %detail, "the new version did not confirm");
    let verdict = Verdict {
        version: pending.version.clone(),
        reason,
        detail,
    };
    if let Err(e) = agent.write_verdict(&verdict) {
        // `prepare` still rolls back without it (reason `exited`).
        tracing::error!(error = %format!("{e:#}"), "cannot record the verdict");
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// The exit status to pass on: the child's code, or 128 + its signal.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    }
}

fn send(pid: Option<u32>, sig: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our unreaped child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

async fn watch_child(
    cmd: Command,
    agent: &AgentState,
    pending: &Pending,
    layout: &Layout,
) -> Result<u8> {
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let timeout = Duration::from_secs(pending.confirm_timeout_secs);
    let started = Instant::now();
    let mut child = match tokio::process::Command::from(cmd).spawn() {
        Ok(c) => c,
        Err(e) => {
            let detail = format!("cannot start {}: {e}", layout.current_binary().display());
            record(agent, pending, UpdateReason::NotStarted, detail);
            return Ok(1);
        }
    };
    tracing::info!(
        version = %pending.version,
        timeout_secs = pending.confirm_timeout_secs,
        "watching the new version until it confirms"
    );
    let pid = child.id();
    let mut tick = tokio::time::interval(POLL);
    let mut confirmed = false;
    let mut stopped_by: Option<&str> = None;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for the agent")?;
                if confirmed || agent.is_confirmed(&pending.version) {
                    return Ok(exit_code(status));
                }
                let detail = match stopped_by {
                    Some(sig) => format!(
                        "stopped ({sig}) before confirming, exited with {}",
                        describe(status)
                    ),
                    None => format!("exited with {} before confirming", describe(status)),
                };
                record(agent, pending, UpdateReason::Exited, detail);
                return Ok(1);
            }
            _ = term.recv() => {
                send(pid, libc::SIGTERM);
                stopped_by = Some("SIGTERM");
            }
            _ = int.recv() => {
                send(pid, libc::SIGINT);
                stopped_by = Some("SIGINT");
            }
            _ = tick.tick(), if !confirmed => {
                if agent.is_confirmed(&pending.version) {
                    confirmed = true;
                    tracing::info!(version = %pending.version, "the new version confirmed");
                } else if started.elapsed() >= timeout && stopped_by.is_none() {
                    let detail = format!(
                        "did not confirm within {} s",
                        pending.confirm_timeout_secs
                    );
                    record(agent, pending, UpdateReason::NotConfirmed, detail);
                    send(pid, libc::SIGTERM);
                    if tokio::time::timeout(KILL_AFTER, child.wait()).await.is_err() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    return Ok(1);
                }
            }
        }
    }
}
