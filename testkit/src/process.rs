//! A child process: stderr collected line by line, killed when dropped, waited for with a bound.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The lines a child wrote to stderr, collected in the background (a line the child wrote is
/// here a moment later, not at once: wait for one with [`Log::wait_for`]; once the child has
/// exited, [`Proc::wait_exit`] waits until every line is here).
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    /// The stream ended: every line is collected.
    ended: Arc<AtomicBool>,
}

impl Log {
    /// Collects the lines of `stream` until it ends.
    pub fn follow(&self, stream: impl Read + Send + 'static) {
        let (lines, ended) = (self.lines.clone(), self.ended.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
            ended.store(true, Ordering::SeqCst);
        });
    }

    /// Waits (at most `timeout`) until the stream has ended and every line is collected;
    /// returns whether it has.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while !self.ended.load(Ordering::SeqCst) {
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Whether nothing was logged yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The lines so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits until a line contains `needle`; panics with the log after `timeout`. Only for a
    /// log line that is itself the behaviour under test, or a state nothing else shows: a
    /// state the platform sees is waited for with [`crate::Control`].
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.count(needle) > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no log line with {needle:?} within {timeout:?}; log:\n{}",
            self.text()
        );
    }
}

/// A running child process with its stderr collected in [`Proc::log`], killed (SIGKILL) and
/// reaped when dropped.
pub struct Proc {
    child: Child,
    /// What it wrote to stderr.
    pub log: Log,
    name: String,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stderr collected (stdout is left as `cmd` set it:
    /// take a pipe with [`Proc::child`]).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc::adopt(name, child)
    }

    /// Takes charge of a child spawned elsewhere (its stderr is collected if it is piped).
    pub fn adopt(name: &str, mut child: Child) -> Proc {
        let log = Log::default();
        if let Some(stderr) = child.stderr.take() {
            log.follow(stderr);
        }
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    /// The process, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits for it to exit, at most `timeout`; panics with its log after that. Once it has
    /// exited, its log is complete (unless a process it left behind holds its stderr open:
    /// then after at most 5 s more).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                self.log.wait_ended(Duration::from_secs(5));
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`…) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.child.id()
        );
    }

    /// SIGTERM, then waits for the exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        self.signal("TERM");
        self.wait_exit(timeout)
    }

    /// SIGKILL (no chance to clean up), then reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
