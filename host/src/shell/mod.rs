//! The shell fallback: allowlisted commands run as real processes, for what no WASI handler
//! does yet.
//!
//! An operator lists the commands in the config's `[shell]` section ([`ShellRule`]): a name,
//! an absolute program, fixed arguments, how many extra arguments a task may add and a pattern
//! for each, a timeout, an output cap, a working directory, the whole environment, and
//! optionally a user and group. A task names a rule and supplies extra arguments; [`run`] does
//! the rest and returns the same [`RunResult`] a WASI run does.
//!
//! Guarantees:
//! - **No shell.** The program is executed directly with `rule.args` then the task's
//!   arguments: no `sh -c`, no expansion, no globbing. An extra argument containing NUL, one
//!   too many, one not matching its (anchored) pattern, one longer than
//!   [`rules::MAX_ARG_BYTES`] (the kernel's limit for one argument) or a command line over
//!   [`rules::MAX_COMMAND_BYTES`] is refused before anything runs (`rejected`, reason
//!   `bad_argument`). A rule may itself run a shell with *fixed* arguments; the task's
//!   arguments then reach it as positional parameters (`$1`…), never as code.
//! - **Nothing inherited.** The environment is exactly `rule.env`; stdin is `/dev/null`; no
//!   descriptor above stderr (nothing the agent opened or inherited); the working directory
//!   is `rule.cwd`; with `user`/`group` the ids are switched (and the supplementary groups
//!   cleared) before exec.
//! - **The whole tree ends with the run**, however it ends (exit, timeout, cancel, the agent
//!   stopping). Each run has a supervisor ([`supervise`]): the agent's own executable,
//!   started again as a child subreaper, which starts the command, inherits whatever the
//!   command orphans (also children that left with `setsid`) and, when the run is over, kills
//!   every descendant until none is left. This holds on every machine. With a `cgroup_root`
//!   the supervisor also starts inside a fresh cgroup v2 (`bridge-task-…`, entered between
//!   fork and exec), killed through `cgroup.kill` afterwards; the result's `cgroup` says so.
//!   When the command has exited, the pipes get [`DRAIN_GRACE`] to reach end-of-file before
//!   the rest of the tree is killed.
//! - **Bounded output.** stdout and stderr are read concurrently into a [`HeadTail`] each: the
//!   first half of `output_bytes` and a ring of the last half, with the total counted. A command
//!   printing gigabytes costs the agent at most `2 × output_bytes` plus read buffers.
//!
//! The result: `ok` (exit 0), `error` (non-zero exit code, or killed by a signal: `exit_code`
//! null, the signal named in `error`), `timeout`, `cancelled`, or `rejected` (nothing ran:
//! reason `bad_argument`, `invalid_rule` or `rule_unavailable`). `output` is stdout parsed as
//! JSON when it is complete JSON, else `null`. A truncated stream's text is
//! `head + "\n…[N bytes omitted]…\n" + tail`. `fuel_consumed` is `null`, `memory_peak_bytes` 0,
//! and `limits` carries the rule's `timeout_ms` and `output_bytes` (fuel and memory 0: not
//! limited). `duration_ms` runs from spawn to the command's exit (or to the kill). `cgroup` is
//! true when a task cgroup bounded the run.

pub mod exec;
pub mod rules;
pub mod supervise;

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub use crate::capture::HeadTail;
use crate::limits::{AppliedLimits, LimitRequest};
use crate::outcome::{RunResult, Status, Truncation};
use crate::stream::StreamTap;
use bridge_protocol::StreamName;
pub use rules::{check_args, Allowlist, ArgRefusal, ExtraArgs, ShellRule};

/// After the direct child exits, how long the pipes may take to reach end-of-file before the
/// rest of the tree is killed (a background child holding stdout open must not hang the task).
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// After a kill, how long to wait for the direct child to die before giving up on it (a process
/// stuck in uninterruptible sleep); tokio reaps it later.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long to wait for a killed cgroup to empty before removing it.
const CGROUP_REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Resolves `[shell] cgroup_root` at the agent's start: `"auto"` takes over the cgroup the
/// agent's unit delegated to it ([`exec::delegated_root`]: the agent moves itself into a leaf),
/// a path is used as it is. Says which bound shell runs get; `None` when no cgroup is usable
/// (each run's supervisor alone then bounds its tree).
pub fn resolve_cgroup_root(configured: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    let resolved = match configured {
        Some(p) if p.as_os_str() == exec::AUTO => match exec::delegated_root() {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::warn!(error = %e,
                    "shell.cgroup_root = \"auto\": no delegated cgroup; each shell run is bounded by its supervisor alone");
                None
            }
        },
        other => other,
    };
    match &resolved {
        Some(root) => tracing::info!(cgroup_root = %root.display(),
            "shell runs get a task cgroup each (and a supervisor)"),
        None => tracing::info!("shell runs are bounded by a supervisor each (no cgroup_root)"),
    }
    resolved
}

/// The limits reported for a shell run: the rule's time and output caps; no fuel or memory.
fn applied(rule: &ShellRule) -> AppliedLimits {
    rule.bounds().resolve(&LimitRequest::default())
}

/// A shell rule's refusal: `reason` is one of the protocol's (`bridge_protocol::REASONS`).
fn refused(rule: &ShellRule, reason: &str, error: String) -> RunResult {
    debug_assert!(
        bridge_protocol::REASONS.contains(&reason),
        "{reason} is not in the protocol's list of reasons"
    );
    let mut r = RunResult::refused(Status::Rejected, error);
    r.reason = Some(reason.to_string());
    r.limits = Some(applied(rule));
    r
}

/// Runs `rule` with the task's extra `args`. Never panics on the command's behaviour; every
/// ending is a [`RunResult`] (see the module docs). `cancel` kills the run (`cancelled`);
/// `cgroup_root`, when given, is a delegated cgroup v2 directory to create the task's cgroup in
/// (if that fails the run falls back to its supervisor alone, with a warning). The process
/// must have a supervisor executable ([`supervise::dispatch`] or [`supervise::set_program`]).
pub async fn run(
    rule: &ShellRule,
    args: &[String],
    cancel: CancellationToken,
    cgroup_root: Option<&Path>,
) -> RunResult {
    run_streamed(rule, args, cancel, cgroup_root, None).await
}

/// [`run`], streaming stdout and stderr to `tap` while the command runs.
pub async fn run_streamed(
    rule: &ShellRule,
    args: &[String],
    cancel: CancellationToken,
    cgroup_root: Option<&Path>,
    tap: Option<StreamTap>,
) -> RunResult {
    let name = &rule.name;
    if let Err(e) = rule.validate() {
        return refused(rule, "invalid_rule", e);
    }
    if let Err(e) = check_args(rule, args) {
        return refused(
            rule,
            "bad_argument",
            format!("shell rule {name:?}: {e}; nothing was run"),
        );
    }
    let prepared = exec::check_paths(rule).and_then(|()| exec::resolve_identity(rule));
    let id = match prepared {
        Ok(id) => id,
        Err(e) => {
            return refused(
                rule,
                "rule_unavailable",
                format!("shell rule {name:?} cannot run on this agent: {e}"),
            )
        }
    };
    if cancel.is_cancelled() {
        let mut r = RunResult::refused(Status::Cancelled, "cancelled before it started");
        r.limits = Some(applied(rule));
        return r;
    }
    execute(rule, args, id, cancel, cgroup_root, tap).await
}

/// What a run holds until it ends: the supervisor, its control socket, the task cgroup. When
/// the run is abandoned half-way (its future dropped), dropping this ends the tree: closing the
/// control socket tells the supervisor to kill everything, the cgroup is killed, the readers
/// stop, and the supervisor is reaped in the background.
struct TreeGuard {
    /// The write half of the control socket; dropping it tells the supervisor to end the tree.
    ctrl: Option<tokio::net::unix::OwnedWriteHalf>,
    supervisor: Option<tokio::process::Child>,
    registration: Option<supervise::Registration>,
    cgroup: Option<exec::TaskCgroup>,
    stop: CancellationToken,
    armed: bool,
}

impl TreeGuard {
    /// Tells the supervisor to kill every descendant of the command (idempotent).
    fn end_tree(&mut self) {
        self.ctrl = None;
    }

    fn kill_cgroup(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.end_tree();
            self.kill_cgroup();
            self.stop.cancel();
            if let (Some(child), Some(reg)) = (self.supervisor.take(), self.registration.take()) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(reap(child, reg));
                }
            }
            if let Some(cg) = self.cgroup.take() {
                std::thread::spawn(move || cg.remove(CGROUP_REMOVE_WAIT));
            }
        }
    }
}

/// Reaps a supervisor and drops its registration; if it did not end cleanly (it died before
/// its tree was empty), kills and reaps whatever was re-parented to the agent.
async fn reap(mut child: tokio::process::Child, registration: supervise::Registration) {
    let pid = registration.pid();
    let clean = match child.wait().await {
        Ok(s) => s.success(),
        Err(e) => {
            tracing::warn!(pid, error = %e, "waiting for a shell supervisor failed");
            false
        }
    };
    registration.release();
    if !clean {
        let _ = tokio::task::spawn_blocking(supervise::sweep_orphans).await;
    }
}

/// How the command ended, as far as the agent knows.
#[derive(Debug)]
enum Ending {
    /// It exited with this wait status.
    Exited(std::process::ExitStatus),
    /// Its time ran out (the tree was killed).
    Timeout,
    /// The task was cancelled (the tree was killed).
    Cancelled,
    /// It could not be started (nothing of it ran).
    Unstarted(String),
    /// Its supervisor ended without reporting the command's end (the tree was killed).
    Lost,
}

/// The supervisor's reports, read line by line; safe to abandon mid-line (a `select!` branch
/// that loses keeps what was read in `buf`).
struct Reports {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: Vec<u8>,
}

impl Reports {
    async fn next(&mut self) -> supervise::Report {
        use tokio::io::AsyncBufReadExt as _;
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line[..end]);
                return supervise::Report::parse(&text).unwrap_or(supervise::Report::Closed);
            }
            if self.buf.len() > 4096 {
                return supervise::Report::Closed;
            }
            match self.reader.read_until(b'\n', &mut self.buf).await {
                Ok(0) | Err(_) => return supervise::Report::Closed,
                Ok(_) => {}
            }
        }
    }

    /// Waits (up to `within`) for the supervisor to say its tree is empty, or to close.
    async fn until_done(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                match self.next().await {
                    supervise::Report::Done => return true,
                    supervise::Report::Closed => return false,
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

/// Reads one stream into a [`HeadTail`] until end-of-file or `stop`; fires `eof` at end-of-file.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    cap: usize,
    stop: CancellationToken,
    eof: CancellationToken,
    tap: Option<(StreamTap, StreamName)>,
) -> HeadTail {
    let mut capture = HeadTail::new(cap);
    let Some(mut pipe) = pipe else {
        eof.cancel();
        return capture;
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            read = pipe.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    eof.cancel();
                    break;
                }
                Ok(n) => {
                    if let Some((tap, stream)) = &tap {
                        tap.push(*stream, &buf[..n]);
                    }
                    capture.push(&buf[..n]);
                }
            },
        }
    }
    capture
}

/// Starts the supervisor for `rule` + `args`, inside `procs`' cgroup when given.
fn spawn_supervisor(
    exe: &Path,
    rule: &ShellRule,
    args: &[String],
    id: exec::Identity,
    procs: Option<&std::fs::File>,
) -> std::io::Result<(
    tokio::process::Child,
    supervise::Registration,
    tokio::net::UnixStream,
)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut cmd = supervise::command(exe, rule, args, id, theirs.into());
    if let Some(f) = procs {
        exec::enter_cgroup_before_exec(cmd.as_std_mut(), f);
    }
    let (child, registration) = supervise::spawn(&mut cmd)?;
    // Our copy of the supervisor's end goes with the command: only the supervisor holds it.
    drop(cmd);
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    Ok((child, registration, ours))
}

async fn execute(
    rule: &ShellRule,
    args: &[String],
    id: exec::Identity,
    cancel: CancellationToken,
    cgroup_root: Option<&Path>,
    tap: Option<StreamTap>,
) -> RunResult {
    let name = &rule.name;
    let Some(exe) = supervise::program() else {
        return refused(
            rule,
            "rule_unavailable",
            format!(
                "shell rule {name:?} cannot run: this process has no shell supervisor \
                 (its main does not call bridge_host::shell::supervise::dispatch)"
            ),
        );
    };
    let mut cgroup = cgroup_root.and_then(|root| match exec::TaskCgroup::create(root) {
        Ok(cg) => Some(cg),
        Err(e) => {
            tracing::warn!(rule = %name, root = %root.display(), error = %e,
                "could not create a task cgroup; the supervisor alone bounds the run");
            None
        }
    });
    let procs = cgroup.as_ref().and_then(|cg| match cg.procs_file() {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(rule = %name, cgroup = %cg.dir().display(), error = %e,
                "could not open cgroup.procs; the supervisor alone bounds the run");
            None
        }
    });
    let started = Instant::now();
    let spawned = match spawn_supervisor(exe, rule, args, id, procs.as_ref()) {
        Err(e) if procs.is_some() => {
            // Possibly the cgroup move; nothing ran (exec never happened).
            tracing::warn!(rule = %name, error = %e,
                "starting inside the task cgroup failed; retrying without it");
            if let Some(cg) = cgroup.take() {
                cg.remove(Duration::ZERO);
            }
            spawn_supervisor(exe, rule, args, id, None)
        }
        other => other,
    };
    drop(procs);
    let (mut supervisor, registration, ctrl) = match spawned {
        Ok(s) => s,
        Err(e) => {
            if let Some(cg) = cgroup.take() {
                cg.remove(Duration::ZERO);
            }
            let mut r = RunResult::refused(
                Status::Error,
                format!(
                    "shell rule {name:?}: could not start {}: {e}",
                    rule.program.display()
                ),
            );
            r.limits = Some(applied(rule));
            return r;
        }
    };
    let bounded_by_cgroup = cgroup.is_some();
    let (ctrl_read, ctrl_write) = ctrl.into_split();
    let mut reports = Reports {
        reader: tokio::io::BufReader::new(ctrl_read),
        buf: Vec::new(),
    };
    let stop = CancellationToken::new();
    let cap = usize::try_from(rule.output_bytes).unwrap_or(usize::MAX);
    let (out_eof, err_eof) = (CancellationToken::new(), CancellationToken::new());
    let out_task = tokio::spawn(read_capped(
        supervisor.stdout.take(),
        cap,
        stop.clone(),
        out_eof.clone(),
        tap.clone().map(|t| (t, StreamName::Stdout)),
    ));
    let err_task = tokio::spawn(read_capped(
        supervisor.stderr.take(),
        cap,
        stop.clone(),
        err_eof.clone(),
        tap.map(|t| (t, StreamName::Stderr)),
    ));
    let mut guard = TreeGuard {
        ctrl: Some(ctrl_write),
        supervisor: Some(supervisor),
        registration: Some(registration),
        cgroup,
        stop: stop.clone(),
        armed: true,
    };

    let deadline = tokio::time::Instant::from_std(started) + Duration::from_millis(rule.timeout_ms);
    let ending = loop {
        let report = tokio::select! {
            r = reports.next() => r,
            _ = tokio::time::sleep_until(deadline) => break Ending::Timeout,
            _ = cancel.cancelled() => break Ending::Cancelled,
        };
        match report {
            supervise::Report::Started(_) => continue,
            supervise::Report::Failed(e) => break Ending::Unstarted(e),
            supervise::Report::Exited(raw) => {
                use std::os::unix::process::ExitStatusExt as _;
                break Ending::Exited(std::process::ExitStatus::from_raw(raw));
            }
            supervise::Report::Done | supervise::Report::Closed => break Ending::Lost,
        }
    };
    let duration = started.elapsed();
    if matches!(ending, Ending::Timeout | Ending::Cancelled) {
        guard.end_tree();
        if !reports.until_done(KILL_WAIT).await {
            tracing::warn!(rule = %name, "the killed command's tree has not ended yet");
        }
    }
    // The command is over: let the pipes drain briefly, then end whatever is left of the tree
    // (background children, possibly still holding the pipes) and stop reading.
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        out_eof.cancelled().await;
        err_eof.cancelled().await;
    })
    .await;
    guard.end_tree();
    if !reports.until_done(KILL_WAIT).await {
        // The supervisor did not empty its tree (it died, or a process is stuck): the cgroup,
        // if there is one, ends everything in it, the supervisor included.
        guard.kill_cgroup();
    }
    stop.cancel();
    let stdout = out_task.await.unwrap_or_else(|_| HeadTail::new(0));
    let stderr = err_task.await.unwrap_or_else(|_| HeadTail::new(0));
    guard.armed = false;
    if let (Some(child), Some(reg)) = (guard.supervisor.take(), guard.registration.take()) {
        let reaping = tokio::spawn(reap(child, reg));
        if tokio::time::timeout(KILL_WAIT, reaping).await.is_err() {
            tracing::warn!(rule = %name, "the shell supervisor has not exited yet");
        }
    }
    // Normally empty by now; whatever is left in the cgroup goes with it.
    guard.kill_cgroup();
    if let Some(cg) = guard.cgroup.take() {
        let _ = tokio::task::spawn_blocking(move || cg.remove(CGROUP_REMOVE_WAIT)).await;
    }
    let mut result = finish(rule, ending, &stdout, &stderr, duration);
    result.cgroup = bounded_by_cgroup;
    result
}

fn finish(
    rule: &ShellRule,
    ending: Ending,
    stdout: &HeadTail,
    stderr: &HeadTail,
    duration: Duration,
) -> RunResult {
    use std::os::unix::process::ExitStatusExt;
    let name = &rule.name;
    let truncated = Truncation {
        stdout: stdout.truncated(),
        stderr: stderr.truncated(),
        stdout_total_bytes: stdout.total(),
        stderr_total_bytes: stderr.total(),
    };
    let stdout_text = stdout.render();
    let stderr_text = stderr.render();
    let output = if truncated.stdout || !matches!(ending, Ending::Exited(_)) {
        serde_json::Value::Null
    } else {
        parse_output(&stdout.bytes())
    };
    let (status, exit_code, error) = match ending {
        Ending::Timeout => (
            Status::Timeout,
            None,
            Some(format!(
                "shell rule {name:?} did not finish within {} ms; its process tree was killed",
                rule.timeout_ms
            )),
        ),
        Ending::Cancelled => (
            Status::Cancelled,
            None,
            Some(format!(
                "shell rule {name:?} was cancelled; its process tree was killed"
            )),
        ),
        Ending::Unstarted(e) => (
            Status::Error,
            None,
            Some(format!(
                "shell rule {name:?}: could not start {}: {e}",
                rule.program.display()
            )),
        ),
        Ending::Lost => (
            Status::Error,
            None,
            Some(format!(
                "shell rule {name:?}: the command's supervisor ended before the command did \
                 (killed?); its process tree was killed"
            )),
        ),
        Ending::Exited(s) => match (s.code(), s.signal()) {
            (Some(0), _) => (Status::Ok, Some(0), None),
            (Some(code), _) => (
                Status::Error,
                Some(code),
                Some(explain(
                    format!("shell rule {name:?} exited with code {code}"),
                    &stderr_text,
                )),
            ),
            (None, Some(sig)) => (
                Status::Error,
                None,
                Some(explain(
                    format!(
                        "shell rule {name:?} was killed by signal {}",
                        exec::signal_name(sig)
                    ),
                    &stderr_text,
                )),
            ),
            (None, None) => (
                Status::Error,
                None,
                Some(format!("shell rule {name:?} ended in an unknown way ({s})")),
            ),
        },
    };
    let mut result = RunResult::refused(status, String::new());
    result.exit_code = exit_code;
    result.output = output;
    result.stdout = stdout_text;
    result.stderr = stderr_text;
    result.truncated = truncated;
    result.duration_ms = duration.as_secs_f64() * 1e3;
    result.limits = Some(applied(rule));
    result.error = error;
    result
}

/// stdout parsed as one JSON value, or `null` when it is empty or not JSON.
fn parse_output(stdout: &[u8]) -> serde_json::Value {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(stdout).unwrap_or(serde_json::Value::Null)
}

/// Adds the command's last stderr line to an error message.
fn explain(base: String, stderr: &str) -> String {
    match stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!("{base} (last stderr line: {})", line.trim()),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_json_only_when_it_is_json() {
        assert_eq!(parse_output(b"{\"a\":1}\n"), serde_json::json!({"a": 1}));
        assert_eq!(parse_output(b"hello"), serde_json::Value::Null);
        assert_eq!(parse_output(b" \n"), serde_json::Value::Null);
    }

    #[test]
    fn errors_quote_the_last_stderr_line() {
        assert_eq!(
            explain("failed".into(), "a\nno such file\n\n"),
            "failed (last stderr line: no such file)"
        );
        assert_eq!(explain("failed".into(), ""), "failed");
    }
}
