//! An agent: `bridge-daemon run`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bins;
use crate::process::{Log, Proc};

/// A running `bridge-daemon run`, killed when dropped.
pub struct Agent {
    proc: Proc,
    /// Its stderr (`RUST_LOG=info`).
    pub log: Log,
    /// Its state directory.
    pub state: PathBuf,
}

impl Agent {
    /// Starts `bridge-daemon run --state STATE ARGS...` (see
    /// [`crate::Platform::agent_args`]).
    pub fn start<S: AsRef<str>>(state: &Path, args: &[S]) -> Agent {
        Agent::start_with(state, args, |_| {})
    }

    /// [`Agent::start`], with `prepare` applied to the command before it is spawned.
    pub fn start_with<S: AsRef<str>>(
        state: &Path,
        args: &[S],
        prepare: impl FnOnce(&mut Command),
    ) -> Agent {
        let mut cmd = bins::daemon();
        cmd.arg("run")
            .arg("--state")
            .arg(state)
            .args(args.iter().map(AsRef::as_ref))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        prepare(&mut cmd);
        let proc = Proc::spawn("bridge-daemon run", cmd);
        Agent {
            log: proc.log.clone(),
            proc,
            state: state.to_path_buf(),
        }
    }

    /// The agent id in its state directory, waiting (30 s) for the agent to create it; a
    /// failure shows the agent's log.
    pub fn id(&self) -> String {
        identity_within(&self.state, Duration::from_secs(30), &self.log)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.proc.try_exit()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// Waits for it to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_exit(timeout)
    }

    /// SIGTERM, then waits (at most 20 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate(Duration::from_secs(20))
    }

    /// SIGKILL (no chance to clean up), then reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// `bridge-daemon identity --state STATE`, waiting (20 s) for a starting agent to create it.
pub fn agent_id(state: &Path) -> String {
    identity_within(state, Duration::from_secs(20), &Log::default())
}

/// The agent id in `state`, waiting at most `timeout` for the agent to create it; a failure
/// shows `log`.
pub fn identity_within(state: &Path, timeout: Duration, log: &Log) -> String {
    let start = Instant::now();
    loop {
        let out = bins::daemon()
            .arg("identity")
            .arg("--state")
            .arg(state)
            .output()
            .expect("running bridge-daemon identity");
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap().trim().to_string();
        }
        assert!(
            start.elapsed() < timeout,
            "no identity in {}: {}; agent log:\n{}",
            state.display(),
            String::from_utf8_lossy(&out.stderr),
            log.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
