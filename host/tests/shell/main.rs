//! The shell fallback with real processes: argument checks (injection strings are inert or
//! refused, nothing runs when refused), stdin, timeouts and cancel killing the whole tree,
//! bounded output, background children holding stdout, exit codes, signals, identity, cgroups.
//!
//! Every run is bounded by a timeout of its own so a regression fails instead of hanging.
//!
//! This file drives `bridge_host::shell` directly (with `bridge-daemon` as the runs'
//! supervisor); `agent.rs` runs a real agent (`bridge-daemon run`) against a real platform on
//! 127.0.0.1: escaped process trees, concurrent runs, a killed supervisor, inherited
//! descriptors, delegated cgroups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bridge_host::outcome::{RunResult, Status};
use bridge_host::shell::{self, ExtraArgs, ShellRule};
use tokio_util::sync::CancellationToken;

mod agent;

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A `/bin/sh -c SCRIPT sh` rule: the script is fixed; extra arguments become `$1`…
fn sh(name: &str, script: &str) -> ShellRule {
    let mut r = ShellRule::new(name, "/bin/sh");
    r.args = vec!["-c".into(), script.into(), "sh".into()];
    r.env = BTreeMap::from([("PATH".to_string(), PATH.to_string())]);
    r
}

fn extra(max: usize, patterns: &[&str]) -> ExtraArgs {
    ExtraArgs {
        max,
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Makes `bridge-daemon` the supervisor of the runs this test binary starts.
fn init() {
    shell::supervise::set_program(env!("CARGO_BIN_EXE_bridge-daemon"));
}

async fn run_with(
    rule: &ShellRule,
    args: &[String],
    cancel: CancellationToken,
    cgroup: Option<&Path>,
) -> RunResult {
    init();
    tokio::time::timeout(
        Duration::from_secs(60),
        shell::run(rule, args, cancel, cgroup),
    )
    .await
    .expect("the run itself must end")
}

async fn run(rule: &ShellRule, args: &[&str]) -> RunResult {
    run_with(rule, &strings(args), CancellationToken::new(), None).await
}

/// (state, ppid) of a process, or `None` when it is gone.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is gone (or a zombie left for init to reap: it no longer runs).
fn gone(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some(('Z' | 'X', _)))
}

/// Waits up to `within` for `pid` to be gone.
async fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gone(pid)
}

/// Reads a pid a script wrote, waiting briefly for it to appear.
async fn read_pid(file: &Path) -> i32 {
    for _ in 0..100 {
        if let Ok(s) = std::fs::read_to_string(file) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pid in {}", file.display());
}

/// Zombies whose parent is this test process (unreaped children).
fn our_zombies() -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_state(*pid) == Some(('Z', me)))
        .collect()
}

/// No zombie children of ours, allowing other tests' children a moment to be reaped.
async fn assert_no_zombies() {
    for _ in 0..100 {
        if our_zombies().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("zombie children left: {:?}", our_zombies());
}

fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn fixed_and_extra_arguments_arrive_literally() {
    let mut rule = ShellRule::new("print-args", "/usr/bin/printf");
    rule.args = vec!["%s\\n".into(), "fixed".into()];
    rule.extra_args = extra(8, &[".*"]);
    let hostile = [
        "a; touch /tmp/pwned",
        "$(id)",
        "`id`",
        "../x",
        "two words",
        "*",
        "-n",
        "%d\\t'\"|&>",
    ];
    let r = run(&rule, &hostile).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.exit_code, Some(0));
    let mut expected = String::from("fixed\n");
    for a in hostile {
        expected.push_str(a);
        expected.push('\n');
    }
    assert_eq!(r.stdout, expected);
    assert!(r.output.is_null());
    assert!(!r.truncated.stdout);
    assert_eq!(r.truncated.stdout_total_bytes, expected.len() as u64);
    assert!(r.fuel_consumed.is_none());
    let limits = r.limits.unwrap();
    assert_eq!(limits.limits.timeout_ms, 10_000);
    assert_eq!(limits.limits.output_bytes, 1 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_shell_script_sees_extra_arguments_only_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut rule = sh("script", r#"printf '%s\n' "$@""#);
    rule.cwd = dir.path().to_path_buf();
    rule.extra_args = extra(4, &[".*"]);
    let args = ["x; touch pwned", "$(touch pwned2)", "`touch pwned3`", "*"];
    let r = run(&rule, &args).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, args.map(|a| format!("{a}\n")).concat());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing ran"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_arguments_run_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut rule = sh(
        "marker",
        &format!("touch '{}'; echo \"$@\"", marker.display()),
    );
    rule.extra_args = extra(2, &["[A-Za-z0-9_][A-Za-z0-9._-]*"]);
    for (args, says) in [
        (vec!["-rf"], "does not match"),
        (vec!["../etc"], "does not match"),
        (vec!["ok", "a/b"], "argument 1"),
        (vec!["a;id"], "does not match"),
        (vec!["$(id)"], "does not match"),
        (vec!["a\0b"], "NUL"),
        (vec!["a", "b", "c"], "at most 2"),
    ] {
        let r = run(&rule, &args).await;
        assert_eq!(r.status, Status::Rejected, "{args:?}: {r:?}");
        assert_eq!(r.reason.as_deref(), Some("bad_argument"));
        let error = r.error.unwrap();
        assert!(error.contains(says), "{args:?}: {error}");
        assert!(error.contains("\"marker\""), "names the rule: {error}");
        assert!(r.exit_code.is_none());
        assert!(!marker.exists(), "{args:?} ran the command");
    }
    // The same rule does run (and leave its marker) with acceptable arguments.
    let r = run(&rule, &["ok", "v1.2"]).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "ok v1.2\n");
    assert!(marker.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_dev_null() {
    let rule = sh("read", r#"read x; echo "got:$x""#);
    let started = Instant::now();
    let r = run(&rule, &[]).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // `read` at end-of-file fails; the echo still runs and is the exit status.
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "got:\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_environment_and_cwd_are_the_rules_only() {
    let mut env = ShellRule::new("env", "/usr/bin/env");
    env.env = BTreeMap::from([("LANG".to_string(), "C".to_string())]);
    let r = run(&env, &[]).await;
    assert_eq!(r.stdout, "LANG=C\n", "nothing of the agent's environment");
    let mut pwd = ShellRule::new("pwd", "/bin/pwd");
    pwd.cwd = "/tmp".into();
    assert_eq!(run(&pwd, &[]).await.stdout, "/tmp\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_stdout_becomes_the_output() {
    let r = run(&sh("json", r#"echo '{"free": 42}'"#), &[]).await;
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.output, serde_json::json!({"free": 42}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_zero_exit_is_an_error_with_its_code() {
    let r = run(
        &sh("fail", "echo partial; echo 'disk not found' >&2; exit 3"),
        &[],
    )
    .await;
    assert_eq!(r.status, Status::Error);
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.stdout, "partial\n");
    assert_eq!(r.stderr, "disk not found\n");
    let error = r.error.unwrap();
    assert!(
        error.contains("code 3") && error.contains("disk not found"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn death_by_signal_is_named() {
    let r = run(&sh("segv", "kill -SEGV $$"), &[]).await;
    assert_eq!(r.status, Status::Error, "{r:?}");
    assert_eq!(r.exit_code, None);
    let error = r.error.unwrap();
    assert!(error.contains("SIGSEGV"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_is_refused_before_running() {
    let r = run(&ShellRule::new("gone", "/nonexistent/tool"), &[]).await;
    assert_eq!(r.status, Status::Rejected);
    assert_eq!(r.reason.as_deref(), Some("rule_unavailable"));
    assert!(r.error.unwrap().contains("/nonexistent/tool"));
    let mut bad = ShellRule::new("bad", "relative/tool");
    bad.timeout_ms = 1;
    let r = run(&bad, &[]).await;
    assert_eq!(r.reason.as_deref(), Some("invalid_rule"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_kills_the_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild");
    let mut rule = sh(
        "slow",
        &format!("sleep 300 & echo $! > '{}'; sleep 300", pidfile.display()),
    );
    rule.timeout_ms = 500;
    let started = Instant::now();
    let r = run(&rule, &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert!(r.error.unwrap().contains("500 ms"));
    assert!(
        (500.0..3000.0).contains(&r.duration_ms),
        "{}",
        r.duration_ms
    );
    let grandchild = read_pid(&pidfile).await;
    assert!(
        wait_gone(grandchild, Duration::from_secs(2)).await,
        "grandchild {grandchild} survived the timeout"
    );
    assert_no_zombies().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_the_tree_and_says_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild");
    let rule = sh(
        "long",
        &format!("sleep 300 & echo $! > '{}'; wait", pidfile.display()),
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let r = run_with(&rule, &[], cancel, None).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(r.status, Status::Cancelled, "{r:?}");
    assert_eq!(r.status.as_str(), "cancelled");
    let grandchild = read_pid(&pidfile).await;
    assert!(wait_gone(grandchild, Duration::from_secs(2)).await);
    // Already cancelled: nothing starts.
    let done = CancellationToken::new();
    done.cancel();
    let r = run_with(&rule, &[], done, None).await;
    assert_eq!(r.status, Status::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_holding_stdout_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, me) = (dir.path().join("bg"), dir.path().join("me"));
    let rule = sh(
        "detach",
        &format!(
            "echo $$ > '{}'; sleep 300 & echo $! > '{}'; echo done",
            me.display(),
            bg.display()
        ),
    );
    let started = Instant::now();
    let r = run(&rule, &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "done\n");
    let (bg, me) = (read_pid(&bg).await, read_pid(&me).await);
    assert!(
        wait_gone(bg, Duration::from_secs(2)).await,
        "the background child was left"
    );
    assert_eq!(proc_state(me), None, "the direct child {me} was not reaped");
    assert_no_zombies().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_output_is_capped_in_memory_and_counted() {
    let mut rule = ShellRule::new("yes", "/usr/bin/yes");
    rule.output_bytes = 65536;
    rule.timeout_ms = 2000;
    let before = vm_rss_bytes();
    let r = run(&rule, &[]).await;
    let grown = vm_rss_bytes().saturating_sub(before);
    assert_eq!(r.status, Status::Timeout, "{:?}", r.error);
    assert!(r.truncated.stdout);
    assert!(!r.truncated.stderr);
    let total = r.truncated.stdout_total_bytes;
    assert!(total > 1_000_000, "only {total} bytes counted");
    assert!(r.stdout.starts_with("y\ny\n"));
    assert!(r.stdout.ends_with("y\n"));
    let marker = format!("\n…[{} bytes omitted]…\n", total - 65536);
    assert!(r.stdout.contains(&marker), "{}", &r.stdout[32760..32800]);
    assert_eq!(r.stdout.len(), 65536 + marker.len());
    assert!(r.output.is_null());
    assert!(grown < 64 << 20, "the agent grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gigabyte_of_output_costs_bounded_memory() {
    let mut rule = ShellRule::new("gigabyte", "/usr/bin/head");
    rule.args = strings(&["-c", "1073741824", "/dev/zero"]);
    rule.output_bytes = 1 << 20;
    rule.timeout_ms = 120_000;
    let before = vm_rss_bytes();
    let r = run(&rule, &[]).await;
    let grown = vm_rss_bytes().saturating_sub(before);
    assert_eq!(r.status, Status::Ok, "{:?}", r.error);
    assert!(r.truncated.stdout);
    assert_eq!(r.truncated.stdout_total_bytes, 1 << 30);
    assert!(r.stdout.len() < (1 << 20) + 64);
    assert!(grown < 64 << 20, "the agent grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_user_is_applied() {
    if !is_root() {
        eprintln!("note: not root; running as another user cannot be tested here");
        let mut rule = ShellRule::new("as-nobody", "/usr/bin/id");
        rule.user = Some("nobody".into());
        let r = run(&rule, &[]).await;
        assert_eq!(r.reason.as_deref(), Some("rule_unavailable"), "{r:?}");
        return;
    }
    let Ok(out) = std::process::Command::new("/usr/bin/id")
        .args(["-u", "nobody"])
        .output()
    else {
        eprintln!("note: no /usr/bin/id; skipped");
        return;
    };
    if !out.status.success() {
        eprintln!("note: no user nobody; skipped");
        return;
    }
    let nobody = String::from_utf8(out.stdout).unwrap();
    let mut rule = ShellRule::new("as-nobody", "/usr/bin/id");
    rule.user = Some("nobody".into());
    rule.args = strings(&["-u"]);
    let r = run(&rule, &[]).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, nobody);
    // Supplementary groups are cleared: only the primary group is left.
    rule.args = strings(&["-G"]);
    let r = run(&rule, &[]).await;
    assert_eq!(r.stdout.split_whitespace().count(), 1, "{}", r.stdout);
    rule.user = Some("no-such-user-at-all".into());
    let r = run(&rule, &[]).await;
    assert_eq!(r.reason.as_deref(), Some("rule_unavailable"));
}

/// A writable cgroup v2 directory for the tests, with `cgroup.kill`, or why there is none.
fn test_cgroup_root(tag: &str) -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or("no cgroup2 mount")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| e.to_string())?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or("not in a cgroup v2 hierarchy")?;
    let base = mount.join(own.trim_start_matches('/'));
    let root = base.join(format!("bridge-shell-test-{}-{tag}", std::process::id()));
    std::fs::create_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let probe = root.join("probe");
    let ok = std::fs::create_dir(&probe).is_ok() && probe.join("cgroup.kill").exists();
    let _ = std::fs::remove_dir(&probe);
    if !ok {
        let _ = std::fs::remove_dir(&root);
        return Err(format!("no cgroup.kill under {}", root.display()));
    }
    Ok(root)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_cgroup_even_setsid_children_are_killed() {
    let root = match test_cgroup_root("setsid") {
        Ok(r) => r,
        Err(why) => {
            eprintln!("note: cgroup test skipped (needs a writable cgroup v2): {why}");
            return;
        }
    };
    eprintln!("note: cgroup test ran under {}", root.display());
    let dir = tempfile::tempdir().unwrap();
    let (detached, plain) = (dir.path().join("detached"), dir.path().join("plain"));
    let mut rule = sh(
        "escape",
        &format!(
            "setsid sh -c 'echo $$ > \"{}\"; exec sleep 300' & sleep 300 & echo $! > '{}'; sleep 300",
            detached.display(),
            plain.display()
        ),
    );
    rule.timeout_ms = 700;
    let r = run_with(&rule, &[], CancellationToken::new(), Some(&root)).await;
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert!(r.cgroup, "a cgroup bounded the run: {r:?}");
    let (detached, plain) = (read_pid(&detached).await, read_pid(&plain).await);
    let escaped = wait_gone(detached, Duration::from_secs(2)).await;
    let plain_gone = wait_gone(plain, Duration::from_secs(2)).await;
    // The task's cgroup is removed after the run.
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    if !escaped {
        kill9(detached);
    }
    let _ = std::fs::remove_dir(&root);
    assert!(escaped, "the setsid child {detached} escaped the kill");
    assert!(plain_gone);
    assert!(leftovers.is_empty(), "task cgroups left: {leftovers:?}");

    // And an ordinary run through the cgroup works and cleans up.
    let root = test_cgroup_root("hello").unwrap();
    let r = run_with(
        &sh("hello", "echo hello"),
        &[],
        CancellationToken::new(),
        Some(&root),
    )
    .await;
    assert_eq!(r.stdout, "hello\n");
    assert!(r.cgroup);
    assert_eq!(
        serde_json::to_value(&r).unwrap()["cgroup"],
        true,
        "the wire field"
    );
    assert_eq!(
        std::fs::read_dir(&root)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count(),
        0
    );
    std::fs::remove_dir(&root).unwrap();
}

/// SIGKILL to a process this test started (cleanup after a failure).
fn kill9(pid: i32) {
    let _ = std::process::Command::new("/bin/kill")
        .args(["-9", &pid.to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_cgroup_root_falls_back_to_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_with(
        &sh("hello", "echo hello"),
        &[],
        CancellationToken::new(),
        Some(dir.path()),
    )
    .await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "hello\n");
    assert!(!r.cgroup, "no cgroup bounded the run");
    assert!(serde_json::to_value(&r).unwrap().get("cgroup").is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_run_kills_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild");
    let rule = sh(
        "abandoned",
        &format!("sleep 300 & echo $! > '{}'; wait", pidfile.display()),
    );
    let args: Vec<String> = Vec::new();
    init();
    let run = shell::run(&rule, &args, CancellationToken::new(), None);
    assert!(tokio::time::timeout(Duration::from_millis(300), run)
        .await
        .is_err());
    let grandchild = read_pid(&pidfile).await;
    assert!(wait_gone(grandchild, Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn arguments_too_long_for_exec_are_refused_before_running() {
    let mut rule = ShellRule::new("print", "/usr/bin/printf");
    rule.args = strings(&["%s\\n"]);
    rule.extra_args = extra(16, &[".*"]);
    // The longest argument the kernel takes (128 KiB with its NUL) runs.
    let longest = "a".repeat(shell::rules::MAX_ARG_BYTES);
    let r = run_with(
        &rule,
        std::slice::from_ref(&longest),
        CancellationToken::new(),
        None,
    )
    .await;
    assert_eq!(r.status, Status::Ok, "{:?}", r.error);
    assert_eq!(r.stdout.len(), longest.len() + 1);
    // One byte more, or 200 KB, is refused: nothing runs, no E2BIG error.
    for len in [shell::rules::MAX_ARG_BYTES + 1, 200_000] {
        let r = run_with(&rule, &["a".repeat(len)], CancellationToken::new(), None).await;
        assert_eq!(r.status, Status::Rejected, "{len}: {:?}", r.error);
        assert_eq!(r.reason.as_deref(), Some("bad_argument"));
        let error = r.error.unwrap();
        assert!(error.contains(&len.to_string()), "{error}");
    }
    // Arguments each acceptable, together over the documented total.
    let many = vec!["b".repeat(120_000); 9];
    let r = run_with(&rule, &many, CancellationToken::new(), None).await;
    assert_eq!(r.status, Status::Rejected, "{:?}", r.error);
    assert_eq!(r.reason.as_deref(), Some("bad_argument"));
    assert!(r.error.unwrap().contains("1048576"));
}
