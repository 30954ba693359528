//! The launcher end to end: the real `bridge-daemon launcher prepare|run` and
//! `bridge-daemon rollback` on a temporary layout and agent state directory, with releases
//! signed by a fresh release key. The releases are small shell scripts (or random bytes) that
//! never run our code: one that confirms, one that exits at start, one killed before it
//! confirms, one that hangs, one that is not an executable. Then a `kill -9` at every named
//! step of a switch and of a rollback, each followed by the next `prepare`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bridge_host::update::files::{LayoutState, Outcome, Phase, StagedRequest, Verdict};
use bridge_host::update::{
    CONFIRMED, CURRENT_LINK, LAYOUT_STATE, OUTCOME, PREVIOUS_LINK, RELEASES_DIR, STAGED_BINARY,
    STAGED_DIR, STAGED_MANIFEST, STAGED_REQUEST, UPDATE_DIR, VERDICT,
};
use bridge_protocol::{UpdateReason, UpdateState};
use bridge_signing::release::sign_manifest;
use bridge_signing::KeyPair;
use bridge_testkit::process::Proc;

/// How long a switched version has to confirm in these tests.
const CONFIRM_SECS: u64 = 2;
/// Bound on any one launcher command.
const BOUND: Duration = Duration::from_secs(20);

struct Env {
    _tmp: tempfile::TempDir,
    layout: PathBuf,
    state: PathBuf,
    config: PathBuf,
    /// Where the releases leave marks (what ran, with which arguments).
    marks: PathBuf,
    key: KeyPair,
}

/// A release binary: a shell script (with its version in it, so each one's hash differs).
fn script(version: &str, body: &str) -> Vec<u8> {
    format!("#!/bin/sh\n# bridge-daemon {version}\n{body}\n").into_bytes()
}

impl Env {
    /// A layout running 0.1.0 (a script that notes its arguments and exits 0), an agent
    /// state directory, a config with a fresh release key.
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("layout");
        let state = tmp.path().join("state");
        let marks = tmp.path().join("marks");
        std::fs::create_dir_all(layout.join(RELEASES_DIR).join("0.1.0")).unwrap();
        std::fs::create_dir_all(state.join(UPDATE_DIR)).unwrap();
        std::fs::create_dir_all(&marks).unwrap();
        let key = KeyPair::generate().unwrap();
        let config = tmp.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nstate_dir = \"{}\"\n[update]\nrelease_keys = [\"{}\"]\nconfirm_timeout_secs = {CONFIRM_SECS}\nhealth_window_secs = 1\n[platform]\nserver = \"wss://127.0.0.1:1/agent\"\n",
                state.display(),
                key.public_key()
            ),
        )
        .unwrap();
        let env = Env {
            _tmp: tmp,
            layout,
            state,
            config,
            marks,
            key,
        };
        let old = env.noting("0.1.0");
        let bin = env
            .layout
            .join(RELEASES_DIR)
            .join("0.1.0")
            .join(STAGED_BINARY);
        std::fs::write(&bin, old).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("releases/0.1.0", env.layout.join(CURRENT_LINK)).unwrap();
        env
    }

    /// A release that notes its version, arguments and layout variable, then exits 0.
    fn noting(&self, version: &str) -> Vec<u8> {
        script(
            version,
            &format!(
                "echo \"{version} $* layout=$BRIDGE_LAUNCHER_LAYOUT\" >> {}/ran",
                self.marks.display()
            ),
        )
    }

    /// A release that confirms, stays up a little, and exits `status`.
    fn confirming(&self, version: &str) -> Vec<u8> {
        script(
            version,
            &format!(
                "echo \"{version} $*\" >> {marks}/ran\nprintf '{version}\\n' > {update}/.c.tmp && mv {update}/.c.tmp {update}/{CONFIRMED}\nsleep 0.5\nexit 0",
                marks = self.marks.display(),
                update = self.state.join(UPDATE_DIR).display(),
            ),
        )
    }

    fn update_dir(&self) -> PathBuf {
        self.state.join(UPDATE_DIR)
    }

    fn staged(&self) -> PathBuf {
        self.update_dir().join(STAGED_DIR)
    }

    /// Stages `binary` as `version`, as the agent does, signed by `key`.
    fn stage_with(&self, version: &str, binary: &[u8], key: &KeyPair) {
        let manifest =
            sign_manifest(version, "linux", std::env::consts::ARCH, binary, key).unwrap();
        std::fs::create_dir_all(self.staged()).unwrap();
        std::fs::write(self.staged().join(STAGED_MANIFEST), manifest).unwrap();
        std::fs::write(self.staged().join(STAGED_BINARY), binary).unwrap();
        let request = StagedRequest {
            update_id: format!("update-{version}"),
            version: version.into(),
            from_version: "0.1.0".into(),
            allow_downgrade: false,
        };
        std::fs::write(
            self.staged().join(STAGED_REQUEST),
            serde_json::to_vec(&request).unwrap(),
        )
        .unwrap();
    }

    fn stage(&self, version: &str, binary: &[u8]) {
        self.stage_with(version, binary, &self.key);
    }

    fn launcher(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge-daemon"));
        cmd.args(args)
            .arg("--layout")
            .arg(&self.layout)
            .arg("--config")
            .arg(&self.config)
            .env_remove("BRIDGE_FAILPOINT")
            .stdout(Stdio::null());
        // The installer's unit sets UMask=0077: what root installs must still be the
        // service user's to run.
        // SAFETY: umask(2) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        cmd
    }

    fn finish(name: &str, cmd: Command) -> (ExitStatus, String) {
        let mut p = Proc::spawn(name, cmd);
        let status = p.wait_exit(BOUND);
        (status, p.log.text())
    }

    /// `launcher prepare`, which always exits 0.
    fn prepare(&self) -> String {
        let (status, log) = Env::finish("prepare", self.launcher(&["launcher", "prepare"]));
        assert!(status.success(), "prepare: {status}; log:\n{log}");
        log
    }

    /// `launcher prepare` with a failpoint armed: it must die of SIGKILL there.
    fn prepare_killed_at(&self, failpoint: &str) {
        let mut cmd = self.launcher(&["launcher", "prepare"]);
        cmd.env("BRIDGE_FAILPOINT", failpoint);
        let (status, log) = Env::finish("prepare", cmd);
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "prepare should be killed at {failpoint}: {status}; log:\n{log}"
        );
    }

    /// `launcher run`, to its end: (status, log).
    fn run(&self) -> (ExitStatus, String) {
        Env::finish("launcher run", self.launcher(&["launcher", "run"]))
    }

    fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.layout.join(name)).ok()?;
        Some(
            target
                .strip_prefix(RELEASES_DIR)
                .expect("a link into releases/")
                .to_str()
                .unwrap()
                .to_string(),
        )
    }

    fn current(&self) -> Option<String> {
        self.link(CURRENT_LINK)
    }

    fn previous(&self) -> Option<String> {
        self.link(PREVIOUS_LINK)
    }

    fn releases(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.layout.join(RELEASES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn state_file(&self) -> LayoutState {
        match std::fs::read(self.layout.join(LAYOUT_STATE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(_) => LayoutState::default(),
        }
    }

    fn outcome(&self) -> Outcome {
        let bytes = std::fs::read(self.update_dir().join(OUTCOME)).expect("outcome.json");
        serde_json::from_slice(&bytes).unwrap()
    }

    fn verdict(&self) -> Verdict {
        let bytes = std::fs::read(self.update_dir().join(VERDICT)).expect("verdict");
        serde_json::from_slice(&bytes).unwrap()
    }

    fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.marks.join("ran"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Everything about the layout a refusal must leave as it was.
    fn snapshot(&self) -> (Option<String>, Option<String>, Vec<String>, Option<Vec<u8>>) {
        (
            self.current(),
            self.previous(),
            self.releases(),
            std::fs::read(self.layout.join(LAYOUT_STATE)).ok(),
        )
    }

    /// `current` names an installed release (whatever moment a kill hit).
    fn assert_current_installed(&self, when: &str) -> String {
        let current = self.current().expect("a current link");
        assert!(
            self.layout
                .join(RELEASES_DIR)
                .join(&current)
                .join(STAGED_BINARY)
                .is_file(),
            "{when}: current -> {current}, which is not installed"
        );
        current
    }

    /// The layout is one a service can start from: `current` names an installed release and
    /// the state is either nothing pending, or a switch to that release awaiting its start.
    fn assert_consistent(&self, from: &str, to: &str) {
        let current = self.assert_current_installed("now");
        match self.state_file().pending {
            None => assert_eq!(current, from, "nothing pending: the old release runs"),
            Some(p) => {
                assert_eq!(p.phase, Phase::Switched, "{p:?}");
                assert_eq!((p.version.as_str(), current.as_str()), (to, to));
                assert_eq!(self.previous().as_deref(), Some(from));
            }
        }
    }

    /// Stages `binary` as 0.2.0, switches to it, runs it: it must fail with `reason`
    /// (recorded by `launcher run`), and the next `prepare` puts 0.1.0 back, reporting it.
    fn assert_rolled_back(&self, binary: &[u8], reason: UpdateReason, detail: &str) {
        self.stage("0.2.0", binary);
        self.prepare();
        assert_eq!(self.current().as_deref(), Some("0.2.0"));
        let (status, log) = self.run();
        assert_eq!(
            status.code(),
            Some(1),
            "launcher run: {status}; log:\n{log}"
        );
        let verdict = self.verdict();
        assert_eq!(
            (verdict.version.as_str(), verdict.reason),
            ("0.2.0", reason)
        );
        assert!(verdict.detail.contains(detail), "{verdict:?}");

        self.prepare();
        assert_eq!(self.current().as_deref(), Some("0.1.0"));
        assert_eq!(self.previous(), None);
        assert_eq!(self.releases(), vec!["0.1.0"]);
        assert_eq!(self.state_file(), LayoutState::default());
        let outcome = self.outcome();
        assert_eq!(outcome.update_id, "update-0.2.0");
        assert_eq!(outcome.state, UpdateState::Failed);
        assert_eq!(
            (outcome.version.as_str(), outcome.from_version.as_str()),
            ("0.2.0", "0.1.0")
        );
        assert_eq!(outcome.reason, Some(reason));
        assert!(outcome.detail.unwrap().contains(detail));

        // The previous version runs again, started by the launcher.
        let (status, log) = self.run();
        assert!(status.success(), "{status}; log:\n{log}");
        assert!(
            self.ran().last().unwrap().starts_with("0.1.0 run --config"),
            "{:?}",
            self.ran()
        );
    }
}

#[test]
fn with_nothing_pending_the_launcher_becomes_the_current_release() {
    let env = Env::new();
    env.prepare();
    let mut cmd = env.launcher(&["launcher", "run"]);
    cmd.args(["--", "--verbose", "--state", "/x"]);
    let (status, log) = Env::finish("launcher run", cmd);
    assert!(status.success(), "{status}; log:\n{log}");
    assert_eq!(
        env.ran(),
        vec![format!(
            "0.1.0 run --config {} --verbose --state /x layout={}",
            env.config.display(),
            env.layout.display()
        )]
    );
}

#[test]
fn a_release_that_confirms_stays_and_older_releases_are_pruned() {
    let env = Env::new();
    env.stage("0.2.0", &env.confirming("0.2.0"));
    env.prepare();
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
    assert_eq!(env.previous().as_deref(), Some("0.1.0"));
    assert!(!env.staged().exists());
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let release = env.layout.join(RELEASES_DIR).join("0.2.0");
    assert_eq!(mode(release.clone()), 0o755, "anyone may enter a release");
    assert_eq!(
        mode(release.join(STAGED_BINARY)),
        0o755,
        "anyone may run it"
    );
    assert_eq!(
        mode(env.layout.join(LAYOUT_STATE)),
        0o644,
        "anyone may read the state"
    );
    let (status, log) = env.run();
    assert!(status.success(), "{status}; log:\n{log}");
    env.prepare();
    assert_eq!(env.state_file(), LayoutState::default());
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
    assert_eq!(env.releases(), vec!["0.1.0", "0.2.0"]);

    env.stage("0.3.0", &env.confirming("0.3.0"));
    env.prepare();
    let (status, log) = env.run();
    assert!(status.success(), "{status}; log:\n{log}");
    env.prepare();
    assert_eq!(env.releases(), vec!["0.2.0", "0.3.0"], "0.1.0 is pruned");
    assert_eq!(env.previous().as_deref(), Some("0.2.0"));
    assert!(
        !env.update_dir().join(OUTCOME).exists(),
        "a success is the agent's to report"
    );

    // One manual rollback, to the previous release; not two.
    let rollback = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridge-daemon"));
        cmd.args(["rollback", "--layout"]).arg(&env.layout);
        cmd.output().unwrap()
    };
    let out = rollback();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains("0.2.0") && said.contains("systemctl restart bridge-daemon"),
        "{said}"
    );
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
    assert_eq!(env.previous(), None);
    let again = rollback();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no previous release"));
    let ran = env.ran();
    let (status, _) = env.run();
    assert!(status.success());
    assert!(
        env.ran()[ran.len()].starts_with("0.2.0 run"),
        "{:?}",
        env.ran()
    );
}

/// A release 0.2.0 running `body` exits before confirming and is rolled back, with `detail`.
fn exits_then_rolled_back(body: &str, detail: &str) {
    Env::new().assert_rolled_back(&script("0.2.0", body), UpdateReason::Exited, detail);
}

#[test]
fn a_release_that_exits_at_start_is_rolled_back() {
    exits_then_rolled_back("exit 3", "exited with status 3 before confirming");
}

#[test]
fn a_release_killed_before_confirming_is_rolled_back() {
    exits_then_rolled_back(
        "sleep 0.3\nkill -9 $$",
        "exited with signal 9 before confirming",
    );
}

#[test]
fn a_release_that_hangs_is_stopped_and_rolled_back() {
    let env = Env::new();
    let pid_file = env.marks.join("pid");
    let hang = script(
        "0.2.0",
        &format!("echo $$ > {}\nexec sleep 60", pid_file.display()),
    );
    let started = Instant::now();
    env.assert_rolled_back(
        &hang,
        UpdateReason::NotConfirmed,
        &format!("did not confirm within {CONFIRM_SECS} s"),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the hanging release was stopped"
    );
}

#[test]
fn a_release_that_is_not_an_executable_is_rolled_back() {
    let env = Env::new();
    let mut junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    junk[0] = 0x00; // neither "#!" nor ELF
    env.assert_rolled_back(&junk, UpdateReason::NotStarted, "cannot start");
}

#[test]
fn signals_reach_the_watched_release_and_its_status_is_the_launchers() {
    let env = Env::new();
    let body = format!(
        "trap 'exit 7' TERM\nprintf '0.2.0\\n' > {update}/{CONFIRMED}\nwhile true; do sleep 0.1; done",
        update = env.update_dir().display()
    );
    env.stage("0.2.0", &script("0.2.0", &body));
    env.prepare();
    let mut launcher = Proc::spawn("launcher run", env.launcher(&["launcher", "run"]));
    let confirmed = env.update_dir().join(CONFIRMED);
    let start = Instant::now();
    while !confirmed.exists() {
        assert!(start.elapsed() < BOUND, "the release never confirmed");
        std::thread::sleep(Duration::from_millis(20));
    }
    launcher.signal("TERM");
    let status = launcher.wait_exit(BOUND);
    assert_eq!(status.code(), Some(7), "log:\n{}", launcher.log.text());
    assert!(!env.update_dir().join(VERDICT).exists());
    env.prepare();
    assert_eq!(env.state_file(), LayoutState::default());
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
}

/// Each refusal: `prepare` exits 0, the layout is as it was, the staged release is gone and
/// the refusal is in `outcome.json` (`switch_failed`).
fn assert_refused(env: &Env, detail: &str) {
    let before = env.snapshot();
    let log = env.prepare();
    assert_eq!(env.snapshot(), before, "log:\n{log}");
    assert!(!env.staged().exists());
    let outcome = env.outcome();
    assert_eq!(outcome.state, UpdateState::Failed);
    assert_eq!(outcome.reason, Some(UpdateReason::SwitchFailed));
    assert!(
        outcome.detail.as_deref().unwrap().contains(detail),
        "{outcome:?}"
    );
}

#[test]
fn a_staged_release_that_fails_the_check_again_changes_nothing() {
    let env = Env::new();
    let release = env.confirming("0.2.0");

    env.stage_with("0.2.0", &release, &KeyPair::generate().unwrap());
    assert_refused(&env, "not a trusted release key");

    env.stage("0.2.0", &release);
    let mut other = release.clone();
    *other.last_mut().unwrap() = b' ';
    std::fs::write(env.staged().join(STAGED_BINARY), &other).unwrap();
    assert_refused(&env, "SHA-256 does not match");

    env.stage("0.2.0", &release);
    let aside = env.marks.join("binary");
    std::fs::rename(env.staged().join(STAGED_BINARY), &aside).unwrap();
    std::os::unix::fs::symlink(&aside, env.staged().join(STAGED_BINARY)).unwrap();
    assert_refused(&env, "symbolic link");

    env.stage("0.0.1", &release);
    assert_refused(&env, "not newer");

    // And a good one still goes through afterwards.
    env.stage("0.2.0", &release);
    env.prepare();
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
}

const SWITCH_STEPS: [&str; 5] = [
    "prepare_copied",
    "prepare_recorded",
    "prepare_unstaged",
    "prepare_linked",
    "prepare_switched",
];

#[test]
fn a_switch_killed_at_any_step_is_completed_by_the_next_prepare() {
    // Killed before the phase says "switched": the next prepare finishes the switch.
    for step in &SWITCH_STEPS[..4] {
        let env = Env::new();
        env.stage("0.2.0", &env.confirming("0.2.0"));
        env.prepare_killed_at(step);
        env.assert_current_installed(step);
        env.prepare();
        env.assert_consistent("0.1.0", "0.2.0");
        assert_eq!(
            env.state_file().pending.map(|p| p.phase),
            Some(Phase::Switched),
            "after {step}, the next prepare has switched"
        );
        assert!(!env.staged().exists(), "{step}");
        let (status, log) = env.run();
        assert!(
            status.success(),
            "{step}: {status}; log:
{log}"
        );
        env.prepare();
        assert_eq!(env.state_file(), LayoutState::default(), "{step}");
        assert_eq!(env.current().as_deref(), Some("0.2.0"), "{step}");
        assert_eq!(
            env.releases(),
            vec!["0.1.0", "0.2.0"],
            "{step}: no leftovers"
        );
    }
}

#[test]
fn a_switch_killed_once_switched_counts_as_its_one_start_and_is_rolled_back() {
    // Once the phase says "switched", the next prepare cannot tell a start that never came
    // from one that died without a verdict: the old version comes back and says so.
    let env = Env::new();
    env.stage("0.2.0", &env.confirming("0.2.0"));
    env.prepare_killed_at("prepare_switched");
    assert_eq!(env.current().as_deref(), Some("0.2.0"));
    env.prepare();
    env.assert_consistent("0.1.0", "0.2.0");
    assert_eq!(env.current().as_deref(), Some("0.1.0"));
    assert_eq!(env.state_file(), LayoutState::default());
    assert_eq!(env.releases(), vec!["0.1.0"]);
    let outcome = env.outcome();
    assert_eq!(outcome.reason, Some(UpdateReason::Exited));
    assert_eq!(outcome.detail.as_deref(), Some("stopped before confirming"));
}

#[test]
fn a_rollback_killed_at_any_step_is_completed_by_the_next_prepare() {
    for step in ["rollback_reported", "rollback_linked"] {
        let env = Env::new();
        env.stage("0.2.0", &script("0.2.0", "exit 3"));
        env.prepare();
        let (status, _) = env.run();
        assert_eq!(status.code(), Some(1));
        env.prepare_killed_at(step);
        env.assert_current_installed(step);
        env.prepare();
        assert_eq!(env.current().as_deref(), Some("0.1.0"), "{step}");
        assert_eq!(env.state_file(), LayoutState::default(), "{step}");
        assert_eq!(env.releases(), vec!["0.1.0"], "{step}");
        let outcome = env.outcome();
        assert_eq!(outcome.reason, Some(UpdateReason::Exited), "{step}");
        assert!(outcome.detail.unwrap().contains("status 3"), "{step}");
    }
}
