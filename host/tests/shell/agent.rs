//! The shell fallback in a real agent (`bridge-daemon run`) against a real platform on
//! 127.0.0.1: escaped process trees, concurrent runs, a killed supervisor, inherited
//! descriptors, delegated cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bridge_testkit::Setup;
use serde_json::{json, Value};

use super::{gone, kill9, proc_state, test_cgroup_root};

/// A real platform and a real agent (`bridge-daemon run`) with a config of `rules` (TOML).
struct Live(Setup);

impl std::ops::Deref for Live {
    type Target = Setup;
    fn deref(&self) -> &Setup {
        &self.0
    }
}

impl std::ops::DerefMut for Live {
    fn deref_mut(&mut self) -> &mut Setup {
        &mut self.0
    }
}

impl Live {
    fn start(config: &str) -> Live {
        Live(Setup::with_config(config))
    }

    fn start_with(config: &str, prepare: impl FnOnce(&mut std::process::Command)) -> Live {
        Live(Setup::builder().config(config).prepare(prepare).start())
    }

    /// Runs `command` with `args` (and `extra` request fields) and returns the result.
    fn run(&self, command: &str, args: &[&str], extra: Value) -> Value {
        let mut req = json!({"cmd": "run", "agent": self.id, "command": command,
                             "args": args, "wait_ms": 60000});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = self.control().request(&req);
        assert_eq!(r["ok"], true, "{r}\nagent log:\n{}", self.agent.log.text());
        r["result"].clone()
    }

    /// The agent's zombie children (unreaped), after giving tokio a moment to reap.
    fn zombies(&self) -> Vec<i32> {
        let me = self.agent.pid() as i32;
        let list = || -> Vec<i32> {
            bridge_host::shell::supervise::children_of(me)
                .into_iter()
                .filter(|p| matches!(proc_state(*p), Some(('Z', _))))
                .collect()
        };
        for _ in 0..100 {
            if list().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        list()
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Rules whose command leaves a `setsid` grandchild (its pid written to `$1`) running
/// `sleep 300` with all its descriptors elsewhere, waits for it to be set up, prints
/// `launched`, then sleeps `$2` seconds (`escape`) or kills its supervisor (`kill-supervisor`).
fn escape_rules() -> String {
    let escape = r#"setsid sh -c 'echo $$ > "$1"; exec sleep 300' sh "$1" </dev/null >/dev/null 2>&1 &
while [ ! -s "$1" ]; do sleep 0.01; done
echo launched"#;
    let sleep = format!("{escape}\nsleep \"$2\"");
    let kill = format!("{escape}\necho $$ > \"$1.sh\"\nkill -9 $PPID\nsleep 300");
    format!(
        r#"
[[shell.rules]]
name = "escape"
program = "/bin/sh"
args = ["-c", {}, "sh"]
extra_args = {{ max = 2, patterns = ['/[A-Za-z0-9/._-]+', '[0-9.]+'] }}
timeout_ms = 30000

[[shell.rules]]
name = "kill-supervisor"
program = "/bin/sh"
args = ["-c", {}, "sh"]
extra_args = {{ max = 1, patterns = ['/[A-Za-z0-9/._-]+'] }}
timeout_ms = 30000
"#,
        toml_str(&sleep),
        toml_str(&kill)
    )
}

/// Waits up to 5 s for `pid` to be gone; kills it (cleanup) and fails if it is not.
fn assert_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !gone(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gone(pid) {
        kill9(pid);
        panic!("{what}: process {pid} survived the end of its run");
    }
}

fn read_pid_blocking(file: &Path) -> i32 {
    for _ in 0..500 {
        if let Ok(s) = std::fs::read_to_string(file) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no pid in {}", file.display());
}

#[test]
fn setsid_descendants_die_when_the_run_ends_however_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(&escape_rules());
    let pidfile = |name: &str| dir.path().join(name).display().to_string();

    // The command exits at once; its escaped grandchild must not outlive the run.
    let file = pidfile("exited");
    let r = live.run("escape", &[&file, "0"], json!({}));
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["stdout"], "launched\n");
    assert!(r.get("cgroup").is_none(), "no cgroup here: {r}");
    assert_gone(read_pid_blocking(Path::new(&file)), "after a normal exit");

    // A timeout.
    let file = pidfile("timeout");
    let r = live.run(
        "escape",
        &[&file, "300"],
        json!({"limits": {"timeout_ms": 3000}}),
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_gone(read_pid_blocking(Path::new(&file)), "after a timeout");

    // A cancel.
    let file = pidfile("cancel");
    std::thread::scope(|s| {
        let running =
            s.spawn(|| live.run("escape", &[&file, "300"], json!({"task_id": "to-cancel"})));
        let pid = read_pid_blocking(Path::new(&file));
        let c = live
            .platform
            .control()
            .request(&json!({"cmd": "cancel", "agent": live.id, "task_id": "to-cancel"}));
        assert_eq!(c["outcome"], "cancelling", "{c}");
        let r = running.join().unwrap();
        assert_eq!(r["status"], "cancelled", "{r}");
        assert_gone(pid, "after a cancel");
    });
    assert_eq!(
        live.zombies(),
        Vec::<i32>::new(),
        "zombies left in the agent"
    );
}

#[test]
fn a_run_ending_kills_its_own_orphans_and_no_one_elses() {
    let dir = tempfile::tempdir().unwrap();
    let live = Live::start(&escape_rules());
    let (file_a, file_b) = (dir.path().join("a"), dir.path().join("b"));
    std::thread::scope(|s| {
        // A: leaves an orphan, then runs until it is cancelled.
        let a = s.spawn(|| {
            live.run(
                "escape",
                &[file_a.to_str().unwrap(), "300"],
                json!({"task_id": "task-a"}),
            )
        });
        let orphan_a = read_pid_blocking(&file_a);
        // B: leaves an orphan and ends at once, while A runs.
        let r = live.run("escape", &[file_b.to_str().unwrap(), "0"], json!({}));
        assert_eq!(r["status"], "ok", "{r}");
        assert_gone(read_pid_blocking(&file_b), "B's orphan after B ended");
        assert!(!gone(orphan_a), "B's end killed A's orphan {orphan_a}");
        assert_eq!(
            proc_state(orphan_a).map(|(state, _)| state != 'Z'),
            Some(true)
        );
        // A ends: its orphan goes with it.
        let c = live
            .platform
            .control()
            .request(&json!({"cmd": "cancel", "agent": live.id, "task_id": "task-a"}));
        assert_eq!(c["outcome"], "cancelling", "{c}");
        let r = a.join().unwrap();
        assert_eq!(r["status"], "cancelled", "{r}");
        assert_gone(orphan_a, "A's orphan after A ended");
    });
    assert_eq!(live.zombies(), Vec::<i32>::new());
}

#[test]
fn a_command_that_kills_its_supervisor_is_still_ended_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let mut live = Live::start(&escape_rules());
    let file = dir.path().join("k");
    let r = live.run("kill-supervisor", &[file.to_str().unwrap()], json!({}));
    assert_eq!(r["status"], "error", "{r}");
    assert!(r["error"].as_str().unwrap().contains("supervisor"), "{r}");
    assert_gone(read_pid_blocking(&file), "the setsid orphan");
    let sh = read_pid_blocking(&dir.path().join("k.sh"));
    assert_gone(sh, "the command itself");
    assert_eq!(
        live.zombies(),
        Vec::<i32>::new(),
        "zombies left in the agent"
    );
    assert!(
        live.agent.try_exit().is_none(),
        "the agent is still running"
    );
    // And the agent still runs commands.
    let again = dir.path().join("again");
    let r = live.run("escape", &[again.to_str().unwrap(), "0"], json!({}));
    assert_eq!(r["status"], "ok", "{r}");
    assert_gone(read_pid_blocking(&again), "the next run's orphan");
}

#[test]
fn descriptors_the_agent_inherited_do_not_reach_commands() {
    let mut fds = [0; 2];
    // SAFETY: a plain pipe2 into a local array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let write_end = fds[1];
    let config = r#"
[[shell.rules]]
name = "fds"
program = "/bin/ls"
args = ["/proc/self/fd"]
"#;
    let live = Live::start_with(config, |cmd| {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: dup2 is async-signal-safe; the descriptor is open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 leaves the new descriptor without FD_CLOEXEC: the agent inherits fd 9.
                if libc::dup2(write_end, 9) == 9 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    // SAFETY: closing our own copies.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let agent_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", live.agent.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(agent_fds.contains(&"9".to_string()), "the agent has fd 9");
    let r = live.run("fds", &[], json!({}));
    assert_eq!(r["status"], "ok", "{r}");
    // 0, 1, 2, and the directory ls itself opened.
    assert_eq!(r["stdout"], "0\n1\n2\n3\n", "{r}");
}

#[test]
fn with_cgroup_root_auto_the_agent_takes_a_leaf_and_runs_tasks_in_cgroups() {
    let base = match test_cgroup_root("auto") {
        Ok(d) => d,
        Err(why) => {
            eprintln!("note: delegated-cgroup test skipped (needs a writable cgroup v2): {why}");
            return;
        }
    };
    eprintln!("note: delegated-cgroup test ran under {}", base.display());
    /// Removes the test's cgroups however the test ends (the agent, in `agent`, is gone by then).
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            for sub in ["tasks", "agent", ""] {
                let _ = std::fs::remove_dir(self.0.join(sub));
            }
        }
    }
    let _removed = Removed(base.clone());
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(base.join("cgroup.procs"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[shell]\ncgroup_root = \"auto\"\n{}", escape_rules());
    // The agent starts inside `base`, as a service starts inside its unit's cgroup.
    let live = Live::start_with(&config, |cmd| {
        bridge_host::shell::exec::enter_cgroup_before_exec(cmd, &procs)
    });
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", live.agent.pid())).unwrap();
    let leaf = format!("/{}/agent", base.file_name().unwrap().to_string_lossy());
    let file = dir.path().join("escaped");
    let r = live.run("escape", &[file.to_str().unwrap(), "0"], json!({}));
    let escaped = read_pid_blocking(&file);
    let ended = {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !gone(escaped) {
            std::thread::sleep(Duration::from_millis(20));
        }
        gone(escaped)
    };
    let task_cgroups = std::fs::read_dir(base.join("tasks"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .ok();
    if !ended {
        kill9(escaped);
    }
    drop(live);
    assert!(
        own.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&leaf)),
        "the agent is not in its leaf {leaf}: {own}"
    );
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["cgroup"], true, "a cgroup bounded the run: {r}");
    assert!(ended, "the setsid grandchild survived");
    assert_eq!(
        task_cgroups,
        Some(0),
        "task cgroups are removed after their run"
    );
}
