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
//!   too many, or one not matching its (anchored) pattern is refused before anything runs
//!   (`rejected`, reason `bad_argument`). A rule may itself run a shell with *fixed* arguments;
//!   the task's arguments then reach it as positional parameters (`$1`…), never as code.
//! - **Nothing inherited.** The environment is exactly `rule.env`; stdin is `/dev/null`; the
//!   working directory is `rule.cwd`; with `user`/`group` the ids are switched (and the
//!   supplementary groups cleared) before exec.
//! - **The whole tree ends with the run.** The child leads its own process group; with a
//!   `cgroup_root` it also starts inside a fresh cgroup v2 (`bridge-task-…`), entered between
//!   fork and exec so even its first fork is inside. On timeout or cancel, and when the command
//!   has finished (its direct child exited and the pipes drained or [`DRAIN_GRACE`] passed), the
//!   group gets SIGKILL and the cgroup is killed through `cgroup.kill`, which also reaches
//!   children that left the group with `setsid`. The direct child is always reaped; the group
//!   is killed while the child is still an unreaped zombie, so its id cannot have been recycled.
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
//! limited). `duration_ms` runs from spawn to the child's exit (or to the kill).

pub mod exec;
pub mod rules;

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub use crate::capture::HeadTail;
use crate::limits::{AppliedLimits, Limits};
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

/// The limits reported for a shell run: the rule's time and output caps; no fuel or memory.
fn applied(rule: &ShellRule) -> AppliedLimits {
    AppliedLimits {
        limits: Limits {
            fuel: 0,
            memory_bytes: 0,
            timeout_ms: rule.timeout_ms,
            output_bytes: rule.output_bytes,
        },
        clamped: Vec::new(),
    }
}

fn refused(rule: &ShellRule, reason: &str, error: String) -> RunResult {
    let mut r = RunResult::refused(Status::Rejected, error);
    r.reason = Some(reason.to_string());
    r.limits = Some(applied(rule));
    r
}

/// Runs `rule` with the task's extra `args`. Never panics on the command's behaviour; every
/// ending is a [`RunResult`] (see the module docs). `cancel` kills the run (`cancelled`);
/// `cgroup_root`, when given, is a delegated cgroup v2 directory to create the task's cgroup in
/// (if that fails the run falls back to the process group alone, with a warning).
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

/// Kills the tree and stops the readers if the run is abandoned half-way (its future dropped).
struct TreeGuard {
    pgid: i32,
    cgroup: Option<exec::TaskCgroup>,
    stop: CancellationToken,
    armed: bool,
}

impl TreeGuard {
    fn kill(&self) {
        exec::kill_group(self.pgid);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
            self.stop.cancel();
            if let Some(cg) = self.cgroup.take() {
                std::thread::spawn(move || cg.remove(CGROUP_REMOVE_WAIT));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    Timeout,
    Cancelled,
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

async fn execute(
    rule: &ShellRule,
    args: &[String],
    id: exec::Identity,
    cancel: CancellationToken,
    cgroup_root: Option<&Path>,
    tap: Option<StreamTap>,
) -> RunResult {
    let name = &rule.name;
    let mut cgroup = cgroup_root.and_then(|root| match exec::TaskCgroup::create(root) {
        Ok(cg) => Some(cg),
        Err(e) => {
            tracing::warn!(rule = %name, root = %root.display(), error = %e,
                "could not create a task cgroup; the process group alone bounds the run");
            None
        }
    });
    let procs = cgroup.as_ref().and_then(|cg| match cg.procs_file() {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(rule = %name, cgroup = %cg.dir().display(), error = %e,
                "could not open cgroup.procs; the process group alone bounds the run");
            None
        }
    });
    let mut cmd = exec::command(rule, args, id);
    if let Some(f) = &procs {
        exec::enter_cgroup_before_exec(&mut cmd, f);
    }
    let started = Instant::now();
    let spawned = match cmd.spawn() {
        Err(e) if procs.is_some() => {
            // Possibly the cgroup move; nothing of the program ran (exec never happened).
            tracing::warn!(rule = %name, error = %e,
                "starting inside the task cgroup failed; retrying without it");
            if let Some(cg) = cgroup.take() {
                cg.remove(Duration::ZERO);
            }
            exec::command(rule, args, id).spawn()
        }
        other => other,
    };
    drop(procs);
    let mut child = match spawned {
        Ok(c) => c,
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
    let pid = child.id().map_or(0, |p| p as i32);
    let stop = CancellationToken::new();
    let mut guard = TreeGuard {
        pgid: pid,
        cgroup,
        stop: stop.clone(),
        armed: true,
    };

    let cap = usize::try_from(rule.output_bytes).unwrap_or(usize::MAX);
    let (out_eof, err_eof) = (CancellationToken::new(), CancellationToken::new());
    let out_task = tokio::spawn(read_capped(
        child.stdout.take(),
        cap,
        stop.clone(),
        out_eof.clone(),
        tap.clone().map(|t| (t, StreamName::Stdout)),
    ));
    let err_task = tokio::spawn(read_capped(
        child.stderr.take(),
        cap,
        stop.clone(),
        err_eof.clone(),
        tap.map(|t| (t, StreamName::Stderr)),
    ));

    let mut exited = tokio::task::spawn_blocking(move || exec::wait_exit_keep_zombie(pid));
    let timeout = Duration::from_millis(rule.timeout_ms);
    let ending = tokio::select! {
        _ = &mut exited => Ending::Exited,
        _ = tokio::time::sleep(timeout) => Ending::Timeout,
        _ = cancel.cancelled() => Ending::Cancelled,
    };
    let duration = started.elapsed();
    if ending != Ending::Exited {
        guard.kill();
        if tokio::time::timeout(KILL_WAIT, &mut exited).await.is_err() {
            tracing::warn!(rule = %name, pid, "the killed command has not exited yet");
        }
    }
    // The command is over: let the pipes drain briefly, then end whatever is left of the tree
    // (background children, possibly still holding the pipes) and stop reading.
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        out_eof.cancelled().await;
        err_eof.cancelled().await;
    })
    .await;
    guard.kill();
    stop.cancel();
    let stdout = out_task.await.unwrap_or_else(|_| HeadTail::new(0));
    let stderr = err_task.await.unwrap_or_else(|_| HeadTail::new(0));
    // Reap the direct child (after the group kill: see `wait_exit_keep_zombie`).
    let status = match tokio::time::timeout(KILL_WAIT, child.wait()).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::warn!(rule = %name, pid, error = %e, "waiting for the command failed");
            None
        }
        Err(_) => None,
    };
    guard.armed = false;
    if let Some(cg) = guard.cgroup.take() {
        let _ = tokio::task::spawn_blocking(move || cg.remove(CGROUP_REMOVE_WAIT)).await;
    }
    finish(rule, ending, status, &stdout, &stderr, duration)
}

fn finish(
    rule: &ShellRule,
    ending: Ending,
    status: Option<std::process::ExitStatus>,
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
    let output = if truncated.stdout || ending != Ending::Exited {
        serde_json::Value::Null
    } else {
        parse_output(&stdout.bytes())
    };
    let (status, exit_code, error) = match (ending, status) {
        (Ending::Timeout, _) => (
            Status::Timeout,
            None,
            Some(format!(
                "shell rule {name:?} did not finish within {} ms; its process tree was killed",
                rule.timeout_ms
            )),
        ),
        (Ending::Cancelled, _) => (
            Status::Cancelled,
            None,
            Some(format!(
                "shell rule {name:?} was cancelled; its process tree was killed"
            )),
        ),
        (Ending::Exited, Some(s)) => match (s.code(), s.signal()) {
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
        (Ending::Exited, None) => (
            Status::Error,
            None,
            Some(format!(
                "shell rule {name:?}: the command's exit status could not be collected"
            )),
        ),
    };
    RunResult {
        status,
        exit_code,
        output,
        stdout: stdout_text,
        stderr: stderr_text,
        truncated,
        fuel_consumed: None,
        memory_peak_bytes: 0,
        duration_ms: duration.as_secs_f64() * 1e3,
        limits: Some(applied(rule)),
        error,
        reason: None,
        module_sha256: None,
        evicted: false,
    }
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
