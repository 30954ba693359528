//! An installed agent under a supervisor that does what systemd does with the installer's
//! unit: before every start `bridge-launcher launcher prepare` (`ExecStartPre=+`), then
//! `bridge-launcher launcher run` (`ExecStart=`), started again a moment after every exit
//! (`Restart=always`), stopped with SIGTERM then SIGKILL (`TimeoutStopSec=`).
//!
//! [`install`] lays out the root-owned directory as `install.sh` does (here owned by the test's
//! user): `releases/VERSION/bridge-daemon`, `current`, and `bridge-launcher`, a copy of the
//! installed binary that updates never replace.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::process::Log;

/// How long the supervisor waits after an exit before starting again (systemd's
/// `RestartSec=`, shortened).
pub const RESTART_DELAY: Duration = Duration::from_millis(300);
/// How long a stop waits after SIGTERM before SIGKILL (`TimeoutStopSec=`).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Lays out `LAYOUT` (created) as the installer does, with `binary` as release `version`:
/// `releases/VERSION/bridge-daemon`, `current -> releases/VERSION`, `bridge-launcher`.
pub fn install(layout: &Path, binary: &Path, version: &str) {
    let release = layout.join("releases").join(version);
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(binary, release.join("bridge-daemon")).unwrap();
    std::os::unix::fs::symlink(format!("releases/{version}"), layout.join("current")).unwrap();
    std::fs::copy(binary, layout.join("bridge-launcher")).unwrap();
}

/// Where `current` points: the version the service runs.
pub fn current_version(layout: &Path) -> String {
    let target = std::fs::read_link(layout.join("current")).expect("the current link");
    target
        .file_name()
        .expect("current points at releases/VERSION")
        .to_string_lossy()
        .into_owned()
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// The main process (`launcher run`, or the agent it became).
    main: Mutex<Option<u32>>,
    /// A failpoint set in the environment of every process started until one is killed by
    /// SIGKILL (the failpoint fired).
    failpoint: Mutex<Option<String>>,
    /// Processes killed by SIGKILL: which command, and the failpoint armed then.
    killed: Mutex<Vec<(String, Option<String>)>>,
    /// `launcher run` starts.
    starts: AtomicUsize,
}

/// The supervisor of one installed agent; stops it when dropped.
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Everything the launcher, its root step and the agents wrote to stderr.
    pub log: Log,
}

impl Supervisor {
    /// Starts supervising the agent installed in `layout` with the config file `config`.
    pub fn start(layout: &Path, config: &Path) -> Supervisor {
        Supervisor::start_with_failpoint(layout, config, None)
    }

    /// [`Supervisor::start`], with `BRIDGE_FAILPOINT=failpoint` armed from the first process
    /// on (see [`Supervisor::arm`]).
    pub fn start_with_failpoint(
        layout: &Path,
        config: &Path,
        failpoint: Option<&str>,
    ) -> Supervisor {
        let shared = Arc::new(Shared::default());
        *shared.failpoint.lock().unwrap() = failpoint.map(str::to_string);
        let log = Log::default();
        let (layout, config) = (layout.to_path_buf(), config.to_path_buf());
        let thread = {
            let (shared, log) = (shared.clone(), log.clone());
            std::thread::spawn(move || supervise(&layout, &config, &shared, &log))
        };
        Supervisor {
            shared,
            thread: Some(thread),
            log,
        }
    }

    /// Arms `BRIDGE_FAILPOINT=step` for the processes started from now on, until one of them
    /// is killed by SIGKILL.
    pub fn arm(&self, step: &str) {
        *self.shared.failpoint.lock().unwrap() = Some(step.to_string());
    }

    /// Whether an armed failpoint has fired (a process was killed by SIGKILL with it armed).
    pub fn fired(&self, step: &str) -> bool {
        self.shared
            .killed
            .lock()
            .unwrap()
            .iter()
            .any(|(_, f)| f.as_deref() == Some(step))
    }

    /// How many times the service's main process was started.
    pub fn starts(&self) -> usize {
        self.shared.starts.load(Ordering::SeqCst)
    }

    /// The running agent process: the main process once it became the agent, or the agent
    /// `launcher run` watches as its child.
    pub fn agent_pid(&self) -> Option<u32> {
        let main = (*self.shared.main.lock().unwrap())?;
        let children = std::fs::read_to_string(format!("/proc/{main}/task/{main}/children"))
            .unwrap_or_default();
        match children.split_whitespace().next() {
            Some(child) => child.parse().ok(),
            None => Some(main),
        }
    }

    /// SIGKILLs the running agent (`kill -9`), as a crash would.
    pub fn kill_agent(&self) {
        let pid = self.agent_pid().expect("an agent is running");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }

    /// Stops the service (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and the supervisor.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(cmd: &mut Command, log: &Log, failpoint: &Option<String>) -> std::io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info");
    match failpoint {
        Some(f) => cmd.env("BRIDGE_FAILPOINT", f),
        None => cmd.env_remove("BRIDGE_FAILPOINT"),
    };
    let mut child = cmd.spawn()?;
    if let Some(stderr) = child.stderr.take() {
        log.follow(stderr);
    }
    Ok(child)
}

/// Waits for `child`; on a stop request, SIGTERM then SIGKILL after [`STOP_TIMEOUT`].
fn wait(child: &mut Child, shared: &Shared) -> ExitStatus {
    let mut terminated: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        if shared.stop.load(Ordering::SeqCst) {
            match terminated {
                None => {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(child.id() as i32, libc::SIGTERM);
                    }
                    terminated = Some(Instant::now());
                }
                Some(t) if t.elapsed() > STOP_TIMEOUT => {
                    let _ = child.kill();
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn note_exit(shared: &Shared, what: &str, status: ExitStatus, log: &Log) {
    if status.signal() == Some(libc::SIGKILL) {
        let armed = shared.failpoint.lock().unwrap().take();
        shared
            .killed
            .lock()
            .unwrap()
            .push((what.to_string(), armed));
    }
    log.follow(std::io::Cursor::new(format!(
        "supervisor: {what} ended: {status}\n"
    )));
}

/// The launcher's command line for `step` (`prepare`, `run`), as the installer's unit has it.
fn launcher_command(layout: &Path, config: &Path, step: &str) -> Vec<String> {
    let layout = layout.display().to_string();
    vec![
        format!("{layout}/bridge-launcher"),
        "launcher".into(),
        step.into(),
        "--layout".into(),
        layout,
        "--config".into(),
        config.display().to_string(),
    ]
}

/// The unit lines that run what this supervisor runs (`ExecStartPre=+…prepare…`, then
/// `ExecStart=…run…`), for a layout and config at these paths: the installer's tests check
/// that the unit `install.sh` writes has exactly these.
pub fn unit_lines(layout: &str, config: &str) -> [String; 2] {
    let line = |step| launcher_command(Path::new(layout), Path::new(config), step).join(" ");
    [
        format!("ExecStartPre=+{}\n", line("prepare")),
        format!("ExecStart={}\n", line("run")),
    ]
}

fn supervise(layout: &Path, config: &Path, shared: &Shared, log: &Log) {
    let launcher = layout.join("bridge-launcher");
    let common = |step: &str| {
        let argv = launcher_command(layout, config, step);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let failpoint = shared.failpoint.lock().unwrap().clone();
        match spawn(&mut common("prepare"), log, &failpoint) {
            Ok(mut pre) => {
                let status = wait(&mut pre, shared);
                note_exit(shared, "launcher prepare", status, log);
                if !status.success() {
                    std::thread::sleep(RESTART_DELAY);
                    continue;
                }
            }
            Err(e) => panic!("starting {}: {e}", launcher.display()),
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let failpoint = shared.failpoint.lock().unwrap().clone();
        let mut main = spawn(&mut common("run"), log, &failpoint)
            .unwrap_or_else(|e| panic!("starting {}: {e}", launcher.display()));
        shared.starts.fetch_add(1, Ordering::SeqCst);
        *shared.main.lock().unwrap() = Some(main.id());
        let status = wait(&mut main, shared);
        *shared.main.lock().unwrap() = None;
        note_exit(shared, "launcher run", status, log);
        if !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(RESTART_DELAY);
        }
    }
}

/// A release that is not the agent: for the rollback tests.
pub enum Impostor {
    /// A script that exits with status 3 at once.
    ExitsAtStart,
    /// A script that sleeps without ever connecting.
    Hangs,
    /// Bytes that are not an executable.
    NotExecutable,
}

impl Impostor {
    /// Its bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Impostor::ExitsAtStart => b"#!/bin/sh\necho 'impostor: exiting' >&2\nexit 3\n".to_vec(),
            Impostor::Hangs => {
                b"#!/bin/sh\necho 'impostor: hanging' >&2\nexec sleep 600\n".to_vec()
            }
            Impostor::NotExecutable => (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        }
    }
}

/// Writes `bytes` to `path` (mode 0755).
pub fn write_executable(path: &Path, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}
