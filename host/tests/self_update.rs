//! Self-update end to end: `bridgectl update` and `bridgectl rollout` against real agents
//! installed in a layout like `install.sh`'s and run under a supervisor that does what systemd
//! does with the installer's unit (testkit's `supervisor`): the launcher's root step before
//! every start, the launcher as the main process, a restart after every exit.
//!
//! The release updated to is the agent itself rebuilt as the next version
//! (`cargo xtask next-daemon`); the releases that must be rolled back never run our code: a
//! script that exits at start, one that hangs, bytes that are not an executable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bridge_signing::KeyPair;
use bridge_testkit::bins::{self, next_daemon, next_version};
use bridge_testkit::supervisor::{self, current_version, Impostor, Supervisor};
use bridge_testkit::{wait_until, Control, Platform, Publisher};
use serde_json::{json, Value};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The health window the agents under test use (the default is 60 s).
const HEALTH_WINDOW_SECS: u64 = 2;
/// How long a new version has to confirm before the launcher gives up on it.
const CONFIRM_TIMEOUT_SECS: u64 = 10;
const DRAIN_TIMEOUT_SECS: u64 = 3;
/// Long enough for any update's verdict here (transfer, drain, restart, window or timeout).
const VERDICT: Duration = Duration::from_secs(90);

/// A platform, a publisher, and the agents installed for it; releases are signed with the
/// tests' shared release key ([`Releases`]).
struct World {
    platform: Platform,
    publisher: Publisher,
    dir: tempfile::TempDir,
}

/// The release key the tests share, and the releases signed with it, each once per run:
/// signing a debug build of the agent gzips ~64 MB at the best compression, seconds of CPU
/// each, and most tests update to the same release. The key and manifests live in
/// `CARGO_TARGET_TMPDIR/self_update`, emptied the first time a test of this run asks for them.
struct Releases {
    dir: PathBuf,
    key: PathBuf,
    public: String,
    /// The manifest signed for each release.
    signed: Mutex<HashMap<Release, Arc<OnceLock<PathBuf>>>>,
}

/// A release as `bridgectl release sign` is asked for it: binary, version, extra arguments.
type Release = (PathBuf, String, Vec<String>);

impl Releases {
    fn get() -> &'static Releases {
        static RELEASES: OnceLock<Releases> = OnceLock::new();
        RELEASES.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("self_update");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let pair = KeyPair::generate().unwrap();
            let key = dir.join("release.key");
            std::fs::write(&key, pair.to_pem()).unwrap();
            Releases {
                dir,
                key,
                public: pair.public_key().to_string(),
                signed: Mutex::default(),
            }
        })
    }

    /// `bridgectl release sign BINARY` as `version`, with `extra` arguments: the manifest's
    /// path (the archive is `BINARY.gz`, as the updates read it), signed the first time only.
    fn sign(&self, binary: &Path, version: &str, extra: &[&str]) -> PathBuf {
        let wanted = (
            binary.to_path_buf(),
            version.to_string(),
            extra.iter().map(|a| a.to_string()).collect(),
        );
        let slot = self
            .signed
            .lock()
            .unwrap()
            .entry(wanted)
            .or_default()
            .clone();
        slot.get_or_init(|| {
            let manifest = self
                .dir
                .join(format!("{version}-{}.manifest", rand_suffix()));
            let out = bins::bridgectl()
                .args(["release", "sign"])
                .arg(binary)
                .arg("--key")
                .arg(&self.key)
                .args(["--version", version])
                .args(extra)
                .arg("-o")
                .arg(&manifest)
                .output()
                .unwrap();
            assert!(out.status.success(), "release sign: {}", text(&out));
            manifest
        })
        .clone()
    }
}

/// One installed, supervised agent.
struct Installed {
    sup: Supervisor,
    layout: PathBuf,
    state: PathBuf,
    id: String,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let platform = Platform::start(&dir.path().join("platform"));
        World {
            platform,
            publisher: Publisher::new(),
            dir,
        }
    }

    fn control(&self) -> Control {
        self.platform.control()
    }

    /// Installs an agent (`target/debug/bridge-daemon` as this version) named `name`, starts it
    /// under a supervisor, and waits until it is connected.
    fn install(&self, name: &str) -> Installed {
        self.install_with(name, None)
    }

    /// [`World::install`], with `failpoint` armed from the first process the supervisor starts.
    fn install_with(&self, name: &str, failpoint: Option<&str>) -> Installed {
        let root = self.dir.path().join(name);
        let (layout, state) = (root.join("lib/bridge"), root.join("state"));
        supervisor::install(&layout, &bins::bin("bridge-daemon"), VERSION);
        let config = root.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"[agent]
state_dir = "{state}"

[platform]
server = "{url}"
server_pins = ["{pin}"]
token = "{token}"
reconnect_base_ms = 100
reconnect_max_secs = 1

[trust]
keys = [{{ key = "{publisher}" }}]

[shell]
rules = [{{ name = "sleep", program = "/bin/sleep", extra_args = {{ max = 1, patterns = ["[0-9]+"] }} }}]

[update]
release_keys = ["{key}"]
health_window_secs = {HEALTH_WINDOW_SECS}
confirm_timeout_secs = {CONFIRM_TIMEOUT_SECS}
drain_timeout_secs = {DRAIN_TIMEOUT_SECS}
"#,
                state = state.display(),
                url = self.platform.url(),
                pin = self.platform.pin(),
                token = self.control().token(),
                key = Releases::get().public,
                publisher = self.publisher.public(),
            ),
        )
        .unwrap();
        let sup = Supervisor::start_with_failpoint(&layout, &config, failpoint);
        let id = bridge_testkit::agent::identity_within(&state, Duration::from_secs(30), &sup.log);
        self.control().wait_connected(&id);
        Installed {
            sup,
            layout,
            state,
            id,
        }
    }

    /// The agent's next version (`cargo xtask next-daemon`) and its manifest, signed as
    /// [`next_version`].
    fn next_signed(&self) -> (PathBuf, PathBuf) {
        let next = next_daemon();
        let manifest = self.release(&next, &next_version(), &[]);
        (next, manifest)
    }

    /// The manifest of `binary` released as `version` (with `extra` arguments to `bridgectl
    /// release sign`), signed with the shared release key.
    fn release(&self, binary: &Path, version: &str, extra: &[&str]) -> PathBuf {
        Releases::get().sign(binary, version, extra)
    }

    /// `bridgectl update` of agent `id`; its exit status and the verdict it printed.
    fn update(&self, id: &str, manifest: &Path, binary: &Path) -> (bool, Value) {
        let out = bins::bridgectl()
            .arg("--control")
            .arg(self.platform.control_socket())
            .args(["update", "--agent", id, "--release"])
            .arg(manifest)
            .arg("--binary")
            .arg(binary)
            .args(["--timeout", &format!("{}s", VERDICT.as_secs())])
            .output()
            .unwrap();
        let verdict: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("update printed no JSON: {}", text(&out)));
        (out.status.success(), verdict)
    }

    /// An impostor release, written into the world's directory.
    fn impostor(&self, kind: Impostor, name: &str) -> PathBuf {
        supervisor::write_executable(&self.dir.path().join(name), &kind.bytes())
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The version agent `id` reports in its latest status or hello.
fn reported_version(control: &Control, id: &str) -> String {
    let a = control.listed(id);
    a["agent_version"]
        .as_str()
        .or_else(|| a["status"]["agent_version"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Waits until agent `id` is connected and reports `version`.
fn wait_version(control: &Control, id: &str, version: &str) {
    wait_until(
        &format!("agent {id} connected as {version}"),
        VERDICT,
        || {
            let v = reported_version(control, id);
            if control.connected(id) && v == version {
                Ok(())
            } else {
                Err(format!("{v} (connected: {})", control.connected(id)))
            }
        },
    );
}

/// Runs the shell rule `sleep 0` on agent `id` and checks it ran.
fn runs_a_task(control: &Control, id: &str, task_id: &str) {
    let r = control.run_command(id, "sleep", json!({"args": ["0"], "task_id": task_id}));
    assert_eq!(r["result"]["status"], "ok", "{r}");
}

impl Installed {
    fn assert_runs(&self, version: &str) {
        assert_eq!(
            current_version(&self.layout),
            version,
            "{}",
            self.sup.log.text()
        );
    }
}

/// Installs the publisher's `hello` as the handler `hello` on agent `id`.
fn install_hello(world: &World, id: &str) {
    use base64::Engine as _;
    let module = base64::engine::general_purpose::STANDARD.encode(world.publisher.signed("hello"));
    let r = world.control().request(
        &json!({"cmd": "install_handler", "agent": id, "name": "hello", "module": module}),
    );
    assert!(r.to_string().contains("\"hello\""), "{r}");
}

/// The handler `hello` installed before the update is still there and runs.
fn hello_survived(world: &World, id: &str, task_id: &str) {
    let r = world.control().run_command(
        id,
        "hello",
        json!({"input": {"name": "Ada"}, "task_id": task_id}),
    );
    assert_eq!(r["result"]["output"]["greeting"], "Hello, Ada!", "{r}");
}

#[test]
fn an_update_to_the_next_version_is_confirmed_and_the_agent_runs_tasks_on_it() {
    let world = World::new();
    let agent = world.install("a");
    install_hello(&world, &agent.id);
    let (next, manifest) = world.next_signed();
    let (ok, verdict) = world.update(&agent.id, &manifest, &next);
    assert!(ok, "{verdict}\n{}", agent.sup.log.text());
    assert_eq!(verdict["state"], "succeeded", "{verdict}");
    let control = world.control();
    wait_version(&control, &agent.id, &next_version());
    agent.assert_runs(&next_version());
    runs_a_task(&control, &agent.id, "after-update");
    hello_survived(&world, &agent.id, "hello-after-update");
    // Same identity; the previous release kept for one manual rollback.
    assert_eq!(
        bridge_testkit::agent::agent_id(&agent.state),
        agent.id,
        "the agent id changed"
    );
    assert!(agent.layout.join("previous").exists());
}

/// Pushes the release `make` returns (signed as the next version) and expects a rollback for
/// `reason`.
fn rolled_back(
    make: impl Fn(&World) -> PathBuf,
    reason: &str,
    during_window: Option<&dyn Fn(&Installed)>,
) {
    let world = World::new();
    let agent = world.install("a");
    let control = world.control();
    install_hello(&world, &agent.id);
    let release = make(&world);
    let manifest = world.release(&release, &next_version(), &[]);
    let (ok, verdict) = std::thread::scope(|s| {
        let update = s.spawn(|| world.update(&agent.id, &manifest, &release));
        if let Some(act) = during_window {
            act(&agent);
        }
        update.join().unwrap()
    });
    assert!(!ok, "{verdict}\n{}", agent.sup.log.text());
    assert_eq!(
        verdict["state"],
        "failed",
        "{verdict}\n{}",
        agent.sup.log.text()
    );
    assert_eq!(verdict["reason"], reason, "{verdict}");
    wait_version(&control, &agent.id, VERSION);
    agent.assert_runs(VERSION);
    runs_a_task(&control, &agent.id, "after-rollback");
    hello_survived(&world, &agent.id, "hello-after-rollback");
}

#[test]
fn a_release_that_exits_at_start_is_rolled_back() {
    rolled_back(
        |w| w.impostor(Impostor::ExitsAtStart, "exits"),
        "exited",
        None,
    );
}

#[test]
fn a_release_that_hangs_without_connecting_is_rolled_back() {
    rolled_back(
        |w| w.impostor(Impostor::Hangs, "hangs"),
        "not_confirmed",
        None,
    );
}

#[test]
fn a_release_that_is_not_an_executable_is_rolled_back() {
    rolled_back(
        |w| w.impostor(Impostor::NotExecutable, "garbage"),
        "not_started",
        None,
    );
}

#[test]
fn a_new_version_killed_inside_the_health_window_is_rolled_back() {
    let next = next_daemon();
    let kill_in_window = |agent: &Installed| {
        // The new version is up (connected, so past the handshake) but not yet confirmed.
        wait_until("the next version running", VERDICT, || {
            let running = agent
                .sup
                .agent_pid()
                .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
                .is_some_and(|exe| exe.to_string_lossy().contains(&next_version()));
            running.then_some(()).ok_or("not yet".to_string())
        });
        std::thread::sleep(Duration::from_millis(500));
        agent.sup.kill_agent();
    };
    rolled_back(|_| next.clone(), "exited", Some(&kill_in_window));
}

/// What a refusal must leave as it was: the layout's releases and links, and the agent's
/// update directory.
fn disk_snapshot(agent: &Installed) -> Vec<String> {
    let mut seen = Vec::new();
    for dir in [agent.layout.clone(), agent.state.join("update")] {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let link = std::fs::read_link(&path).ok();
                seen.push(format!("{} {:?} {}", path.display(), link, meta.len()));
                if meta.is_dir() {
                    stack.push(path);
                }
            }
        }
    }
    seen.sort();
    seen
}

#[test]
fn refused_updates_change_nothing_on_disk_and_say_why() {
    let world = World::new();
    let agent = world.install("a");
    let next = next_daemon();
    let before = disk_snapshot(&agent);
    let other_key = world.dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().to_pem()).unwrap();

    let unknown_key = {
        let m = world.dir.path().join("unknown-key.manifest");
        let out = bins::bridgectl()
            .args(["release", "sign"])
            .arg(&next)
            .arg("--key")
            .arg(&other_key)
            .args(["--version", &next_version(), "-o"])
            .arg(&m)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        m
    };
    let bad_signature = {
        let m = world.release(&next, &next_version(), &[]);
        let tampered = world.dir.path().join("tampered.manifest");
        let text = std::fs::read_to_string(&m).unwrap();
        std::fs::write(&tampered, text.replace(&next_version(), "99.0.0")).unwrap();
        tampered
    };
    let wrong_arch = world.release(&next, &next_version(), &["--arch", "riscv64"]);
    let downgrade = world.release(&next, "0.0.1", &[]);
    let same = world.release(&next, VERSION, &[]);
    for (manifest, reason) in [
        (&unknown_key, "unknown_key"),
        (&bad_signature, "bad_signature"),
        (&wrong_arch, "wrong_platform"),
        (&downgrade, "downgrade"),
        (&same, "downgrade"),
    ] {
        let (ok, verdict) = world.update(&agent.id, manifest, &next);
        assert!(!ok, "{verdict}");
        assert_eq!(verdict["state"], "refused", "{verdict}");
        assert_eq!(verdict["reason"], reason, "{verdict}");
        assert_eq!(disk_snapshot(&agent), before, "after a {reason} refusal");
    }
    runs_a_task(&world.control(), &agent.id, "still-working");
    assert_eq!(agent.sup.starts(), 1, "a refusal restarted the agent");
}

#[test]
fn tasks_in_flight_during_an_update_each_get_exactly_one_result() {
    let world = World::new();
    let agent = world.install("a");
    let control = world.control();
    let (next, manifest) = world.next_signed();
    let run = |task_id: &'static str, secs: &'static str| {
        let control = world.control();
        let id = agent.id.clone();
        std::thread::spawn(move || {
            control.run_command(&id, "sleep", json!({"args": [secs], "task_id": task_id}))
        })
    };
    // One ends within the drain timeout, one outlasts it (and the agent's restart).
    let short = run("short", "1");
    let long = run("long", "60");
    control.wait_task_state("long", "running");
    control.wait_task_state("short", "running");
    let (ok, verdict) = world.update(&agent.id, &manifest, &next);
    assert!(ok, "{verdict}\n{}", agent.sup.log.text());
    let short = short.join().unwrap();
    assert_eq!(short["result"]["status"], "ok", "{short}");
    let long_result = control.wait_result("long", VERDICT);
    assert_eq!(
        long_result["result"]["status"], "interrupted",
        "{long_result}"
    );
    drop(long);
    // Exactly one stored result each; a task run after the update runs once too.
    for task in ["short", "long"] {
        let r = control.result(task);
        assert_eq!(r["ok"], true, "{r}");
    }
    runs_a_task(&control, &agent.id, "after");
}

#[test]
fn a_rollout_halts_at_the_failure_count_and_leaves_the_rest_untouched() {
    let world = World::new();
    let agents: Vec<Installed> = (0..4).map(|i| world.install(&format!("a{i}"))).collect();
    let bad = world.impostor(Impostor::ExitsAtStart, "exits");
    let manifest = world.release(&bad, &next_version(), &[]);
    let out = bins::bridgectl()
        .arg("--control")
        .arg(world.platform.control_socket())
        .args(["rollout", "--release"])
        .arg(&manifest)
        .arg("--binary")
        .arg(&bad)
        .args([
            "--canary",
            "1",
            "--batch",
            "25%",
            "--max-failures",
            "2",
            "--wait",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let status = bins::bridgectl()
        .arg("--control")
        .arg(world.platform.control_socket())
        .args(["rollout", "status"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["state"], "halted", "{status}");
    assert_eq!(status["failed"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(status["untouched"], 2, "{status}");
    let control = world.control();
    let failed: Vec<&str> = status["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["agent"].as_str().unwrap())
        .collect();
    for agent in &agents {
        wait_version(&control, &agent.id, VERSION);
        agent.assert_runs(VERSION);
        if !failed.contains(&agent.id.as_str()) {
            // Never sent the update: one start, one release.
            assert_eq!(agent.sup.starts(), 1, "{}", agent.id);
            let releases = std::fs::read_dir(agent.layout.join("releases"))
                .unwrap()
                .count();
            assert_eq!(releases, 1, "{}", agent.id);
        }
    }
}

/// Arms `step`, updates to `release`, and checks the agent works afterwards: connected as
/// the version `current` points at, same id, running tasks, the update's verdict reported.
fn killed_at(step: &str, make: impl Fn(&World) -> PathBuf) {
    let world = World::new();
    // The agent's own steps need the failpoint in the environment it starts with; the
    // launcher's are read by each `launcher prepare`, so they are armed once it runs.
    let agent_step = step.starts_with("agent_");
    let agent = world.install_with("a", agent_step.then_some(step));
    let control = world.control();
    let release = make(&world);
    let manifest = world.release(&release, &next_version(), &[]);
    if !agent_step {
        agent.sup.arm(step);
    }
    let (_, verdict) = world.update(&agent.id, &manifest, &release);
    assert!(
        agent.sup.fired(step),
        "the failpoint {step} did not fire:\n{}",
        agent.sup.log.text()
    );
    let state = verdict["state"].as_str().unwrap_or("");
    assert!(
        state == "succeeded" || state == "failed",
        "no verdict after a kill at {step}: {verdict}\n{}",
        agent.sup.log.text()
    );
    let version = current_version(&agent.layout);
    let expected = if state == "succeeded" {
        next_version()
    } else {
        VERSION.to_string()
    };
    assert_eq!(version, expected, "{verdict}\n{}", agent.sup.log.text());
    wait_version(&control, &agent.id, &version);
    runs_a_task(&control, &agent.id, "after-kill");
    assert_eq!(bridge_testkit::agent::agent_id(&agent.state), agent.id);
}

macro_rules! killed_at_tests {
    ($($name:ident: $step:literal, $release:expr;)*) => {$(
        #[test]
        fn $name() {
            killed_at($step, $release);
        }
    )*};
}

fn next_release(_: &World) -> PathBuf {
    next_daemon()
}

fn exits_at_start(w: &World) -> PathBuf {
    w.impostor(Impostor::ExitsAtStart, "exits")
}

killed_at_tests! {
    kill_9_after_staging_leaves_a_working_agent: "agent_staged", next_release;
    kill_9_after_copying_the_release_leaves_a_working_agent: "prepare_copied", next_release;
    kill_9_after_recording_the_switch_leaves_a_working_agent: "prepare_recorded", next_release;
    kill_9_after_unstaging_leaves_a_working_agent: "prepare_unstaged", next_release;
    kill_9_after_switching_the_links_leaves_a_working_agent: "prepare_linked", next_release;
    kill_9_after_recording_the_switched_phase_leaves_a_working_agent: "prepare_switched", next_release;
    kill_9_after_reporting_a_rollback_leaves_a_working_agent: "rollback_reported", exits_at_start;
    kill_9_after_relinking_a_rollback_leaves_a_working_agent: "rollback_linked", exits_at_start;
}
