//! The process side of a shell run: identity lookup and the task cgroup (the supervisor that
//! starts, kills and reaps the tree is in [`super::supervise`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::rules::ShellRule;

/// The uid and gid a command runs as, when the rule names a user or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Identity {
    /// Set the uid (and clear supplementary groups) before exec.
    pub uid: Option<u32>,
    /// Set the gid before exec.
    pub gid: Option<u32>,
}

/// Buffer for the reentrant passwd/group lookups.
const LOOKUP_BUF: usize = 16 << 10;

fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, String> {
    let by_id = name.parse::<u32>().ok();
    let cname = CString::new(name).map_err(|_| format!("user {name:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids), filled in by the call.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`'s strings
    // (we only read the ids).
    let rc = unsafe {
        match by_id {
            Some(uid) => libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found),
            None => libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            ),
        }
    };
    if rc != 0 {
        return Err(format!(
            "looking up user {name:?}: {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Ok(by_id.map(|uid| (uid, u32::MAX)));
    }
    Ok(Some((pwd.pw_uid, pwd.pw_gid)))
}

fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Some(gid));
    }
    let cname = CString::new(name).map_err(|_| format!("group {name:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: as in `lookup_user`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "looking up group {name:?}: {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    Ok((!found.is_null()).then_some(grp.gr_gid))
}

/// Resolves the rule's `user` / `group` and checks that this agent may switch to them.
pub fn resolve_identity(rule: &ShellRule) -> Result<Identity, String> {
    let mut id = Identity::default();
    if let Some(user) = &rule.user {
        match lookup_user(user)? {
            Some((uid, primary)) => {
                id.uid = Some(uid);
                if primary != u32::MAX {
                    id.gid = Some(primary);
                }
            }
            None => return Err(format!("unknown user {user:?}")),
        }
    }
    if let Some(group) = &rule.group {
        match lookup_group(group)? {
            Some(gid) => id.gid = Some(gid),
            None => return Err(format!("unknown group {group:?}")),
        }
    }
    if id.uid.is_some() && id.gid.is_none() {
        return Err(format!(
            "user {:?} has no passwd entry; name a group too",
            rule.user.as_deref().unwrap_or_default()
        ));
    }
    // SAFETY: plain syscalls without arguments.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let switching = id.uid.is_some_and(|u| u != euid) || id.gid.is_some_and(|g| g != egid);
    if switching && euid != 0 {
        return Err(format!(
            "running as user {:?} / group {:?} needs a root agent (the agent runs as uid {euid})",
            rule.user.as_deref().unwrap_or("-"),
            rule.group.as_deref().unwrap_or("-"),
        ));
    }
    Ok(id)
}

/// Checks what the config cannot: the program is an executable file, the cwd a directory.
pub fn check_paths(rule: &ShellRule) -> Result<(), String> {
    let program = &rule.program;
    let meta =
        std::fs::metadata(program).map_err(|e| format!("program {}: {e}", program.display()))?;
    let c = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| "the program path contains a NUL byte".to_string())?;
    // SAFETY: a valid C string.
    let executable = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
    if !meta.is_file() || !executable {
        return Err(format!(
            "program {} is not an executable file",
            program.display()
        ));
    }
    if !rule.cwd.is_dir() {
        return Err(format!(
            "working directory {} is not a directory",
            rule.cwd.display()
        ));
    }
    Ok(())
}

/// Moves the child (the run's supervisor) into `procs` (an open `cgroup.procs`) between fork
/// and exec, so that everything it starts is inside.
pub fn enter_cgroup_before_exec(cmd: &mut std::process::Command, procs: &File) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = procs.as_raw_fd();
    // SAFETY: the closure only calls write(2), which is async-signal-safe, on a descriptor the
    // parent keeps open until `spawn` returns. Writing "0" moves the writing process; the
    // kernel checks the permissions of the opener (the agent), not of the child's new uid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// One task's cgroup v2: `<root>/bridge-task-<unique>`.
#[derive(Debug)]
pub struct TaskCgroup {
    dir: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TaskCgroup {
    /// Creates a fresh cgroup under `root` (a delegated cgroup v2 directory).
    pub fn create(root: &Path) -> io::Result<TaskCgroup> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "bridge-task-{}-{}-{nanos:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = root.join(name);
        std::fs::create_dir(&dir)?;
        let cg = TaskCgroup { dir };
        if !cg.dir.join("cgroup.procs").exists() {
            cg.remove_now();
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not a cgroup v2 directory", root.display()),
            ));
        }
        Ok(cg)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for writing (by the agent, before forking).
    pub fn procs_file(&self) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// Kills every process in the cgroup: `cgroup.kill` (Linux ≥ 5.14), or SIGKILL to each
    /// listed process a few times over (older kernels; racy against forks, hence the repeats).
    pub fn kill(&self) {
        let kill_file = self.dir.join("cgroup.kill");
        if let Ok(mut f) = OpenOptions::new().write(true).open(&kill_file) {
            if f.write_all(b"1").is_ok() {
                return;
            }
        }
        for _ in 0..8 {
            let Ok(list) = std::fs::read_to_string(self.dir.join("cgroup.procs")) else {
                return;
            };
            let pids: Vec<i32> = list.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: a plain syscall; the pid is in our task's cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether processes are left in the cgroup.
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    fn remove_now(&self) -> bool {
        std::fs::remove_dir(&self.dir).is_ok()
    }

    /// Removes the (killed) cgroup, waiting up to `within` for its processes to be gone.
    /// Blocking; returns whether the directory is gone.
    pub fn remove(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.remove_now() || !self.dir.exists() {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(cgroup = %self.dir.display(), "could not remove the task cgroup");
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The value of `[shell] cgroup_root` that asks the agent to use the cgroup its service manager
/// delegated to it (see [`delegated_root`]).
pub const AUTO: &str = "auto";

/// The cgroup v2 directory this process is in: the `cgroup2` mount joined with the `0::` line
/// of `/proc/self/cgroup`.
pub fn own_cgroup_dir() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let (mount_root, mount_point) = mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = pre.split_whitespace();
            let root = f.nth(3)?.to_string();
            let point = f.next()?.to_string();
            Some((root, point))
        })
        .ok_or("no cgroup v2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or("this process is not in a cgroup v2 hierarchy")?;
    let relative = own
        .strip_prefix(mount_root.trim_end_matches('/'))
        .unwrap_or(&own)
        .trim_start_matches('/')
        .to_string();
    if relative.contains(" (deleted)") {
        return Err(format!("this process's cgroup {own} was removed"));
    }
    Ok(Path::new(&mount_point).join(relative))
}

/// `cgroup_root = "auto"`: takes over the cgroup v2 directory this process was started in
/// (one its service manager delegated to it, `Delegate=yes`). The agent moves itself into a
/// leaf `<its cgroup>/agent` (a cgroup with children must not hold processes itself) and
/// returns `<its cgroup>/tasks`, created if missing, where task cgroups go. An agent already in
/// a leaf named `agent` keeps it. Refuses the root cgroup, and anything it cannot write.
pub fn delegated_root() -> Result<PathBuf, String> {
    let own = own_cgroup_dir()?;
    let base = if own.file_name().is_some_and(|n| n == "agent") {
        own.parent().map(Path::to_path_buf).unwrap_or(own.clone())
    } else {
        own.clone()
    };
    if !base.join("cgroup.procs").exists() {
        return Err(format!("{} is not a cgroup v2 directory", base.display()));
    }
    if !base.join("cgroup.type").exists() {
        return Err(format!(
            "{} is the root cgroup: the agent creates cgroups only in one delegated to it",
            base.display()
        ));
    }
    let mkdir = |dir: &Path| match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "creating {}: {e} (is the cgroup delegated to the agent? Delegate=yes, and no \
             ProtectControlGroups=yes, in its unit)",
            dir.display()
        )),
    };
    let leaf = base.join("agent");
    if own != leaf {
        mkdir(&leaf)?;
        OpenOptions::new()
            .write(true)
            .open(leaf.join("cgroup.procs"))
            .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()))
            .map_err(|e| format!("moving the agent into {}: {e}", leaf.display()))?;
    }
    let tasks = base.join("tasks");
    mkdir(&tasks)?;
    Ok(tasks)
}

/// A signal's conventional name (`SIGKILL`), or `signal N`.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    format!("{name} ({sig})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_numbers_pass_through() {
        let mut rule = ShellRule::new("t", "/bin/true");
        rule.user = Some("root".into());
        // SAFETY: a plain syscall.
        if unsafe { libc::geteuid() } == 0 {
            let id = resolve_identity(&rule).unwrap();
            assert_eq!((id.uid, id.gid), (Some(0), Some(0)));
        } else {
            assert!(resolve_identity(&rule).unwrap_err().contains("root agent"));
        }
        rule.user = Some("no-such-user-here".into());
        assert!(resolve_identity(&rule)
            .unwrap_err()
            .contains("unknown user"));
        rule.user = None;
        rule.group = Some("no-such-group-here".into());
        assert!(resolve_identity(&rule)
            .unwrap_err()
            .contains("unknown group"));
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_paths(&ShellRule::new("t", "/bin/sh")).is_ok());
        assert!(check_paths(&ShellRule::new("t", "/nonexistent/x")).is_err());
        assert!(check_paths(&ShellRule::new("t", "/etc/passwd"))
            .unwrap_err()
            .contains("executable"));
        let mut r = ShellRule::new("t", "/bin/sh");
        r.cwd = "/nonexistent".into();
        assert!(check_paths(&r).is_err());
    }

    #[test]
    fn signals_are_named() {
        assert_eq!(signal_name(9), "SIGKILL (9)");
        assert_eq!(signal_name(64), "signal 64");
    }
}
