//! Per-run supervisors: the part of tree-kill that holds on every machine, with or without a
//! cgroup.
//!
//! Every shell command runs under a supervisor of its own: the agent's own executable
//! (`/proc/self/exe`) started again in a hidden mode ([`MODE`], dispatched by [`dispatch`]
//! before anything else in `main`). The supervisor
//!
//! 1. closes every descriptor above stderr it inherited, except its control socket (so nothing
//!    the agent holds or inherited reaches the command),
//! 2. becomes a *child subreaper* (`PR_SET_CHILD_SUBREAPER`): whatever the command starts and
//!    orphans, including children that called `setsid` and whose parent exited, is re-parented
//!    to it rather than to init,
//! 3. starts the command (no shell; the rule's environment, working directory and identity; its
//!    own process group; stdin `/dev/null`; stdout and stderr the agent's pipes, which the
//!    supervisor then lets go of), and reports `P <pid>` on the control socket (or `E <why>`),
//! 4. reaps every child as it ends, and reports the command's raw wait status (`X <status>`),
//! 5. when the agent closes its end of the socket (the run is over: the command exited and the
//!    pipes drained, a timeout, a cancel, the agent stopping or dying), kills every child it
//!    has with SIGKILL, again and again as killed processes hand their own children over, until
//!    it has none left — then no descendant of the command is left anywhere — reports `D` and
//!    exits.
//!
//! Attribution is exact: an orphan belongs to the supervisor of the run that made it, so a run
//! ending never touches another run's processes. The supervisor kills only its own unreaped
//! children (a pid cannot be recycled before its parent reaps it), and it alone reaps them.
//!
//! The agent is a child subreaper too ([`become_subreaper`]). Processes reach it only if a
//! supervisor dies before its tree is empty (killed by a command running as the same user, the
//! OOM killer); the agent then kills and reaps every child of its own that is not a supervisor
//! ([`sweep_orphans`]), so no zombie accumulates. tokio reaps the supervisors themselves, by
//! pid, as before.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{LazyLock, Mutex, OnceLock, RwLock};
use std::time::Duration;

use super::exec::Identity;
use super::rules::ShellRule;

/// `argv[1]` of a supervisor: `bridge-daemon __bridge-shell-supervisor UID GID CWD N
/// NAME=VALUE… PROGRAM ARG…` (UID, GID: a number or `-`; N: how many environment entries
/// follow). Its stdin is the control socket.
pub const MODE: &str = "__bridge-shell-supervisor";

/// The executable started as a supervisor.
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Sets the executable to start as each run's supervisor: one whose `main` calls [`dispatch`]
/// first. `bridge-daemon` sets `/proc/self/exe` itself; a test binary names `bridge-daemon`.
/// Returns false if one was already set.
pub fn set_program(path: impl Into<PathBuf>) -> bool {
    PROGRAM.set(path.into()).is_ok()
}

/// The supervisor executable, if this process has one.
pub fn program() -> Option<&'static Path> {
    PROGRAM.get().map(PathBuf::as_path)
}

/// Call first in `main`: runs the supervisor and exits when this process was started as one;
/// otherwise makes this executable the supervisor of the shell runs it starts.
pub fn dispatch() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(MODE)) {
        std::process::exit(supervisor_main(args.collect()));
    }
    set_program("/proc/self/exe");
}

/// Whether [`become_subreaper`] succeeded in this process.
static SUBREAPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this process a child subreaper: orphaned descendants are re-parented to it instead of
/// init. The agent calls it at start; see [`sweep_orphans`].
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: a plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0 {
        SUBREAPER.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's side

/// The supervisors alive, pid → run number.
static SUPERVISORS: LazyLock<Mutex<HashMap<i32, u64>>> = LazyLock::new(Mutex::default);

/// Spawning holds this for reading from fork to registration (spawns run in parallel);
/// [`sweep_orphans`] holds it for writing, so it never mistakes a supervisor being forked for
/// an orphan.
static SPAWNING: RwLock<()> = RwLock::new(());

fn supervisors() -> std::sync::MutexGuard<'static, HashMap<i32, u64>> {
    SUPERVISORS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A supervisor's entry in the registry, removed once the supervisor is reaped.
#[derive(Debug)]
pub struct Registration {
    pid: i32,
    run: u64,
}

impl Registration {
    /// The supervisor's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Removes the entry (after the supervisor was reaped).
    pub fn release(self) {
        let mut map = supervisors();
        if map.get(&self.pid) == Some(&self.run) {
            map.remove(&self.pid);
        }
    }
}

/// Builds the supervisor's command for `rule` + `args`: the control socket `ctrl` as its
/// stdin (so that no code has to run between fork and exec, and the agent can spawn it the
/// cheap way, `posix_spawn`); no environment (the command's is in the arguments); `/` as its
/// working directory; stdout and stderr piped; its own process group.
pub fn command(
    exe: &Path,
    rule: &ShellRule,
    args: &[String],
    id: Identity,
    ctrl: std::os::fd::OwnedFd,
) -> tokio::process::Command {
    let num = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(MODE)
        .arg(num(id.uid))
        .arg(num(id.gid))
        .arg(&rule.cwd)
        .arg(rule.env.len().to_string());
    for (k, v) in &rule.env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(&rule.program)
        .args(&rule.args)
        .args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(ctrl))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    cmd
}

static NEXT_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Spawns `cmd` (a supervisor) and registers it; the registration must be released once the
/// supervisor has been reaped.
pub fn spawn(
    cmd: &mut tokio::process::Command,
) -> io::Result<(tokio::process::Child, Registration)> {
    let run = NEXT_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _gate = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    let pid = child.id().map_or(0, |p| p as i32);
    supervisors().insert(pid, run);
    Ok((child, Registration { pid, run }))
}

/// What a supervisor says on its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The command started with this pid.
    Started(i32),
    /// The command could not be started (nothing of it ran).
    Failed(String),
    /// The command exited; its raw wait status.
    Exited(i32),
    /// Every descendant is gone; the supervisor exits.
    Done,
    /// The socket closed: the supervisor exited (or died).
    Closed,
}

impl Report {
    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<Report> {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "P" => rest.parse().ok().map(Report::Started),
            "E" => Some(Report::Failed(rest.to_string())),
            "X" => rest.parse().ok().map(Report::Exited),
            "D" if rest.is_empty() => Some(Report::Done),
            _ => None,
        }
    }
}

/// Reads the next report; anything unparsable or an I/O error counts as [`Report::Closed`].
pub async fn next_report<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Report {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = Vec::new();
    let mut limited = tokio::io::AsyncReadExt::take(reader, 4096);
    match limited.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => Report::Closed,
        Ok(_) => {
            let text = String::from_utf8_lossy(&line);
            Report::parse(text.trim_end_matches('\n')).unwrap_or(Report::Closed)
        }
    }
}

/// Kills and reaps every child of this process that is not a registered supervisor: processes
/// re-parented to the agent after their supervisor died. Blocking (a few milliseconds; at most
/// about a second if killed processes are slow to die). Does nothing unless this process is a
/// subreaper: otherwise orphans never come to it, and its other children are not ours to kill.
pub fn sweep_orphans() {
    if !SUBREAPER.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let me = std::process::id() as i32;
    for round in 0..100 {
        let left = {
            let _gate = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
            let known = supervisors().clone();
            let mut left = 0;
            for pid in children_of(me) {
                if known.contains_key(&pid) {
                    continue;
                }
                left += 1;
                // Our own unreaped child: its pid cannot have been recycled.
                let mut status = 0;
                // SAFETY: plain syscalls on our own child.
                let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid;
                if !reaped {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            left
        };
        if left == 0 {
            return;
        }
        if round == 0 {
            tracing::warn!(
                processes = left,
                "processes of a shell run outlived their supervisor; killing them"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!("processes re-parented to the agent could not all be killed and reaped");
}

/// The children of `pid` (a process of ours or ourselves): `/proc/PID/task/*/children`, or a
/// scan of `/proc/*/stat` on kernels without that file. Includes unreaped zombies.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                found_file = true;
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if found_file {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if parent_of(child) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The parent pid of `pid` from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The supervisor's side

/// What the agent asked to run.
struct Spec {
    uid: Option<u32>,
    gid: Option<u32>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    program: PathBuf,
    args: Vec<OsString>,
}

impl Spec {
    fn parse(args: Vec<OsString>) -> Option<Spec> {
        let mut it = args.into_iter();
        let mut text = || it.next().and_then(|a| a.into_string().ok());
        let id = |s: String| -> Option<Option<u32>> {
            if s == "-" {
                Some(None)
            } else {
                s.parse().ok().map(Some)
            }
        };
        let uid = id(text()?)?;
        let gid = id(text()?)?;
        let cwd = PathBuf::from(text()?);
        let n: usize = text()?.parse().ok()?;
        let mut env = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let entry = it.next()?.into_vec();
            let eq = entry.iter().position(|b| *b == b'=')?;
            env.push((
                OsString::from_vec(entry[..eq].to_vec()),
                OsString::from_vec(entry[eq + 1..].to_vec()),
            ));
        }
        let program = PathBuf::from(it.next()?);
        Some(Spec {
            uid,
            gid,
            cwd,
            env,
            program,
            args: it.collect(),
        })
    }
}

/// The supervisor's `main`; returns the exit code.
fn supervisor_main(args: Vec<OsString>) -> i32 {
    let Some(spec) = Spec::parse(args) else {
        return 64; // EX_USAGE: not started by an agent.
    };
    // The control socket is our stdin: move it above stderr, close-on-exec (the command must
    // not inherit it), and give stdin /dev/null.
    // SAFETY: plain fcntl on our own descriptor.
    let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return 71; // EX_OSERR
    }
    // SAFETY: the descriptor was just duplicated for us alone.
    let mut ctrl = unsafe { UnixStream::from_raw_fd(fd) };
    match std::fs::File::open("/dev/null") {
        // SAFETY: dup2 onto our own stdin.
        Ok(null) => unsafe {
            libc::dup2(null.as_raw_fd(), 0);
        },
        // SAFETY: closing our own stdin (the command gets /dev/null from std anyway).
        Err(_) => unsafe {
            libc::close(0);
        },
    }
    close_fds_above_stderr_except(fd);
    if let Err(e) = become_subreaper() {
        let _ = writeln!(ctrl, "E cannot become a subreaper: {}", one_line(&e));
        return 0;
    }
    let sigchld = sigchld_fd();

    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        // std clears the supplementary groups when a root parent sets a uid.
        cmd.uid(uid);
    }
    let pid = match cmd.spawn() {
        Ok(child) => child.id() as i32,
        Err(e) => {
            let _ = writeln!(ctrl, "E {}", one_line(&e));
            return 0;
        }
    };
    release_stdio();
    if writeln!(ctrl, "P {pid}").is_err() {
        // The agent is gone already: end the tree at once.
    }
    supervise(pid, &mut ctrl, sigchld)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// Points stdout and stderr at `/dev/null`: the command's tree alone holds the agent's pipes,
/// so they reach end-of-file when the tree is done with them.
fn release_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto our own standard descriptors.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    } else {
        // SAFETY: closing our own standard descriptors.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
    }
}

/// Closes every descriptor above stderr except `keep`: `close_range(2)`, or each entry of
/// `/proc/self/fd` where that system call is missing or filtered.
pub fn close_fds_above_stderr_except(keep: RawFd) {
    let ranges: [(u32, u32); 2] = [
        (3, (keep as u32).saturating_sub(1)),
        (keep as u32 + 1, u32::MAX),
    ];
    let mut ok = true;
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: a plain system call; nothing in this process uses the descriptors closed.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        ok &= rc == 0;
    }
    if ok {
        return;
    }
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: as above (the directory's own descriptor is closed already: EBADF).
            unsafe { libc::close(fd) };
        }
    }
}

/// A signalfd for SIGCHLD (SIGCHLD blocked), or -1 when it cannot be had (then the
/// supervisor polls for ended children every few milliseconds).
fn sigchld_fd() -> RawFd {
    // SAFETY: sigset manipulation on a local set; blocking SIGCHLD in this single-threaded
    // process (std resets the mask for the command it starts).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return -1;
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        fd
    }
}

/// The supervisor's loop: reap, report the command's end, and on the agent's word (end of
/// file on the control socket) kill every child until none is left.
fn supervise(command: i32, ctrl: &mut UnixStream, sigchld: RawFd) -> i32 {
    let mut killing = false;
    loop {
        // Reap whatever has ended; learn whether any child is left.
        let mut none_left = false;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own children; only this thread reaps.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                if pid == command {
                    let _ = writeln!(ctrl, "X {status}");
                }
                continue;
            }
            if pid == 0 {
                break;
            }
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            none_left = true; // ECHILD: no child, hence no descendant, is left.
            break;
        }
        if killing {
            if none_left {
                let _ = writeln!(ctrl, "D");
                return 0;
            }
            // Only this thread reaps, so every pid listed is an unreaped child of ours and
            // cannot have been recycled. Their own children come to us as they die; the next
            // round kills those.
            for pid in children_of(std::process::id() as i32) {
                // SAFETY: a plain syscall on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut fds = Vec::with_capacity(2);
        if !killing {
            fds.push(libc::pollfd {
                fd: ctrl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if sigchld >= 0 {
            fds.push(libc::pollfd {
                fd: sigchld,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if killing || sigchld < 0 { 20 } else { -1 };
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            continue;
        }
        for p in &fds {
            if p.revents == 0 {
                continue;
            }
            if p.fd == sigchld {
                let mut buf = [0u8; 1024];
                // SAFETY: reading into a local buffer from our own non-blocking descriptor.
                while unsafe { libc::read(sigchld, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            } else {
                let mut buf = [0u8; 64];
                match ctrl.read(&mut buf) {
                    Ok(0) => killing = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => killing = true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse() {
        assert_eq!(Report::parse("P 42"), Some(Report::Started(42)));
        assert_eq!(
            Report::parse("E no such file"),
            Some(Report::Failed("no such file".into()))
        );
        assert_eq!(Report::parse("X 256"), Some(Report::Exited(256)));
        assert_eq!(Report::parse("D"), Some(Report::Done));
        assert_eq!(Report::parse("P x"), None);
        assert_eq!(Report::parse("Q"), None);
    }

    #[test]
    fn the_spec_round_trips_through_arguments() {
        let mut rule = ShellRule::new("t", "/bin/echo");
        rule.args = vec!["a b".into(), "=x".into()];
        rule.env.insert("K".into(), "v=w".into());
        rule.cwd = "/tmp".into();
        let id = Identity {
            uid: Some(7),
            gid: None,
        };
        let (a, _b) = UnixStream::pair().unwrap();
        let cmd = command(Path::new("/x"), &rule, &["extra".into()], id, a.into());
        let args: Vec<OsString> = cmd
            .as_std()
            .get_args()
            .skip(1)
            .map(OsStr::to_os_string)
            .collect();
        let spec = Spec::parse(args).unwrap();
        assert_eq!((spec.uid, spec.gid), (Some(7), None));
        assert_eq!(spec.cwd, Path::new("/tmp"));
        assert_eq!(spec.env, vec![("K".into(), "v=w".into())]);
        assert_eq!(spec.program, Path::new("/bin/echo"));
        assert_eq!(spec.args, ["a b", "=x", "extra"]);
        assert!(Spec::parse(vec!["x".into()]).is_none());
    }
}
