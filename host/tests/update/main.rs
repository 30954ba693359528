//! Self-update, the agent's side, against the real agent over real TLS: the platform is the
//! hand-written one of the hostile tests (`hostile_platform/`), so each test chooses every
//! byte of the release the agent receives. Refusals leave nothing on disk; a good release is
//! staged whole, then the agent drains and stops; a new version confirms after its health
//! window; a verdict is reported after every reconnect until the platform acknowledges it.
//! A release served as a gzip archive (manifest format 2): `archive.rs`.

#[allow(dead_code)] // the hostile tests use the rest of it
#[path = "../hostile_platform/mod.rs"]
mod hostile_platform;

mod archive;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bridge_signing::release::{sign_manifest, sign_manifest_gzip, SignedManifest};
use bridge_signing::KeyPair;
use hostile_platform::*;
use serde_json::{json, Value};

/// The version the agent under test reports (`bridge-daemon --version`).
fn own_version() -> String {
    let out = bridge_testkit::bins::daemon()
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim()
        .strip_prefix("bridge-daemon ")
        .expect("`bridge-daemon VERSION`")
        .to_string()
}

/// A version newer than `v` (its major version plus one).
fn newer(v: &str) -> String {
    let major: u64 = v.split('.').next().unwrap().parse().unwrap();
    format!("{}.0.0", major + 1)
}

/// `len` bytes that are not all alike.
fn binary(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 2654435761 % 251) as u8 ^ seed)
        .collect()
}

fn manifest(version: &str, arch: &str, binary: &[u8], key: &KeyPair) -> String {
    sign_manifest(version, std::env::consts::OS, arch, binary, key).unwrap()
}

/// An agent trusting `key` for releases, `update` lines in its `[update]` table, and the
/// launcher's environment when `layout` is given.
fn start(
    server: &Server,
    dir: &Path,
    key: Option<&KeyPair>,
    update: &str,
    agent: &str,
    layout: Option<&Path>,
) -> Agent {
    let keys = key.map_or(String::new(), |k| {
        format!("release_keys = [\"{}\"]", k.public_key())
    });
    let toml = match (keys.is_empty(), update.is_empty()) {
        (true, true) => agent.to_string(),
        _ => format!("{agent}\n[update]\n{keys}\n{update}\n"),
    };
    let env: Vec<(&str, &OsStr)> = layout
        .map(|l| vec![("BRIDGE_LAUNCHER_LAYOUT", l.as_os_str())])
        .unwrap_or_default();
    Agent::start_env(server, dir, 256, &[], &toml, &env)
}

/// The agent's next connection, accepted and past the handshake.
fn accept(server: &Server) -> Conn {
    let mut conn = server.accept();
    conn.open();
    conn
}

/// The prologue of most tests: an agent in a temporary directory, trusting `key` for releases,
/// started by the launcher (its layout is `DIR/layout`) and connected.
struct Setup {
    dir: tempfile::TempDir,
    server: Server,
    key: KeyPair,
    agent: Agent,
    conn: Conn,
    /// The agent's version, and one newer.
    own: String,
    next: String,
}

impl Setup {
    /// `seed` makes the release key; `update` and `agent` as for [`start`].
    fn new(seed: u8, update: &str, agent: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start();
        let key = KeyPair::from_seed(&[seed; 32]);
        let layout = dir.path().join("layout");
        let agent = start(
            &server,
            dir.path(),
            Some(&key),
            update,
            agent,
            Some(&layout),
        );
        let conn = accept(&server);
        let own = own_version();
        let next = newer(&own);
        Setup {
            dir,
            server,
            key,
            agent,
            conn,
            own,
            next,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A manifest of `bin` as version `next` for this machine, signed by `key`.
    fn manifest(&self, bin: &[u8]) -> String {
        manifest(&self.next, std::env::consts::ARCH, bin, &self.key)
    }

    /// Update `id` to `bin` as version `next`, with a drain timeout of `drain_ms`, offered
    /// and served whole; returns the status and the ranges asked for.
    fn offer_next(&mut self, id: &str, bin: &[u8], drain_ms: u64) -> (Value, Vec<(u64, u64)>) {
        let manifest = self.manifest(bin);
        let extra = json!({ "drain_timeout_ms": drain_ms });
        offer(&mut self.conn, id, &manifest, extra, Answer::Bytes(bin))
    }

    /// After the agent exited: the same agent started again on the same directory (without
    /// the launcher), with `agent` in its configuration, and connected.
    fn restart(&mut self, agent: &str) {
        let agent = start(
            &self.server,
            self.dir.path(),
            Some(&self.key),
            "",
            agent,
            None,
        );
        let conn = accept(&self.server);
        // The old connection closes as the old agent's did.
        self.conn = conn;
        self.agent = agent;
    }
}

fn update_msg(id: &str, manifest: &str, extra: Value) -> Value {
    let mut m = json!({"type": "update", "id": id, "manifest": manifest});
    m.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    m
}

/// How the platform answers `need_release`.
#[derive(Clone, Copy)]
enum Answer<'a> {
    /// With these bytes (the range asked for, cut at their end).
    Bytes(&'a [u8]),
    /// Not at all.
    Never,
}

/// Sends update `id` of `manifest` (with `extra` fields) and [`serve`]s it.
fn offer(
    conn: &mut Conn,
    id: &str,
    manifest: &str,
    extra: Value,
    answer: Answer,
) -> (Value, Vec<(u64, u64)>) {
    conn.send(&update_msg(id, manifest, extra));
    serve(conn, id, answer)
}

/// Waits until the agent accepted every task of `ids` (noting everything else).
fn wait_accepted(conn: &mut Conn, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ids.iter().all(|id| conn.accepted.contains(*id)) {
        assert!(Instant::now() < deadline, "accepted: {ids:?}");
        conn.recv(Duration::from_secs(1));
    }
}

/// Waits until `path` is gone, which `what` should have done.
fn wait_removed(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} removed after {what}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The task's result `r` is a success that printed `stdout`.
fn assert_ran(r: &Value, stdout: &str) {
    assert_eq!(
        (r["status"].as_str(), r["stdout"].as_str()),
        (Some("ok"), Some(stdout)),
        "{r}"
    );
}

/// Answers `need_release`s for update `id` until its `update_status`; returns the status and
/// the ranges asked for.
fn serve(conn: &mut Conn, id: &str, answer: Answer) -> (Value, Vec<(u64, u64)>) {
    let mut asked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match conn.recv(left) {
            Some(Got::Text(m)) => m,
            other => panic!("waiting for update_status of {id}: got {other:?}"),
        };
        match msg["type"].as_str() {
            Some("need_release") => {
                assert_eq!(msg["id"], id, "{msg}");
                let (offset, length) = (
                    msg["offset"].as_u64().unwrap(),
                    msg["length"].as_u64().unwrap(),
                );
                assert!((1..=8 << 20).contains(&length), "{msg}");
                asked.push((offset, length));
                if let Answer::Bytes(bytes) = answer {
                    let start = (offset as usize).min(bytes.len());
                    let end = (offset as usize + length as usize).min(bytes.len());
                    conn.write(&frame(2, &bytes[start..end]));
                }
            }
            Some("update_status") if msg["id"] == id => return (msg, asked),
            _ => {}
        }
    }
}

/// Nothing of an update is on disk: `STATE/update` is absent or empty.
fn nothing_staged(dir: &Path) {
    let update = dir.join("state/update");
    if let Ok(entries) = std::fs::read_dir(&update) {
        let left: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn assert_refused(status: &Value, reason: &str, version: &str) {
    assert_eq!(status["state"], "refused", "{status}");
    assert_eq!(status["reason"], reason, "{status}");
    assert_eq!(status["version"], version, "{status}");
    assert_eq!(status["agent_version"], own_version(), "{status}");
    assert!(
        !status["detail"].as_str().unwrap_or_default().is_empty(),
        "{status}"
    );
}

#[test]
fn every_refusal_says_why_and_leaves_nothing_on_disk() {
    let mut t = Setup::new(41, "max_binary_bytes = 2000000\nchunk_timeout_secs = 2", "");
    let other = KeyPair::from_seed(&[42; 32]);
    let (key, own, next) = (&t.key, &t.own, &t.next);
    let arch = std::env::consts::ARCH;
    let bin = binary(300_000, 1);
    let good = t.manifest(&bin);
    let dir = t.dir.path();
    let conn = &mut t.conn;

    let refuse = |conn: &mut Conn, id: &str, manifest: &str, extra: Value, answer: Answer| {
        let (status, asked) = offer(conn, id, manifest, extra, answer);
        nothing_staged(dir);
        (status, asked)
    };

    // The signature of another manifest by the same key.
    let sig = |m: &str| m.lines().last().unwrap().to_string();
    let other_sig = sig(&manifest(next, arch, &binary(10, 9), key));
    let forged = good.replace(&sig(&good), &other_sig);
    let (s, asked) = refuse(conn, "u-sig", &forged, json!({}), Answer::Bytes(&bin));
    assert_refused(&s, "bad_signature", next);
    assert!(
        asked.is_empty(),
        "nothing is fetched for a refused manifest"
    );

    let by_other = manifest(next, arch, &bin, &other);
    let (s, _) = refuse(conn, "u-key", &by_other, json!({}), Answer::Never);
    assert_refused(&s, "unknown_key", next);

    for (i, bad) in [
        "bridge-release 1\nversion 2.0.0\n".to_string(),
        good.replace("bridge-release 1", "bridge-release 2"),
        good.replace("\nos ", "\nos  "),
        format!("{good}extra line\n"),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("u-malformed-{i}");
        let (s, _) = refuse(conn, &id, bad, json!({}), Answer::Never);
        assert_refused(&s, "malformed_manifest", "");
    }

    let foreign = if arch == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let elsewhere = manifest(next, foreign, &bin, key);
    let (s, _) = refuse(conn, "u-arch", &elsewhere, json!({}), Answer::Never);
    assert_refused(&s, "wrong_platform", next);

    let huge = binary(2_000_001, 2);
    let too_large = manifest(next, arch, &huge, key);
    let (s, asked) = refuse(conn, "u-big", &too_large, json!({}), Answer::Bytes(&huge));
    assert_refused(&s, "too_large", next);
    assert!(asked.is_empty());

    for (id, version, extra) in [
        ("u-older", "0.0.1".to_string(), json!({})),
        ("u-same", own.clone(), json!({})),
        // The platform asks, but the config does not allow it.
        (
            "u-asked",
            "0.0.1".to_string(),
            json!({"allow_downgrade": true}),
        ),
    ] {
        let m = manifest(&version, arch, &bin, key);
        let (s, _) = refuse(conn, id, &m, extra, Answer::Never);
        assert_refused(&s, "downgrade", &version);
    }

    // The bytes sent are one short of what was asked.
    let (s, asked) = refuse(
        conn,
        "u-short",
        &good,
        json!({}),
        Answer::Bytes(&bin[..bin.len() - 1]),
    );
    assert_refused(&s, "mismatch", next);
    assert_eq!(asked, [(0, bin.len() as u64)]);
    // As many bytes as the manifest says, but not the binary it describes.
    let mut altered = bin.clone();
    altered[150_000] ^= 1;
    let (s, _) = refuse(conn, "u-altered", &good, json!({}), Answer::Bytes(&altered));
    assert_refused(&s, "mismatch", next);

    // The bytes never come; meanwhile another update is refused as in progress.
    conn.send(&update_msg("u-slow", &good, json!({})));
    let asked = conn.expect("need_release", Duration::from_secs(10));
    assert_eq!(asked["id"], "u-slow");
    assert!(dir.join("state/update/staging").is_dir());
    conn.send(&update_msg("u-second", &good, json!({})));
    let (s, _) = serve(conn, "u-second", Answer::Never);
    assert_refused(&s, "in_progress", next);
    let started = Instant::now();
    let (s, _) = serve(conn, "u-slow", Answer::Never);
    assert_refused(&s, "unavailable", next);
    assert!(started.elapsed() < Duration::from_secs(10));
    nothing_staged(dir);
    // A frame that comes too late is no release's part.
    conn.write(&frame(2, &bin));
    let e = conn.expect("error", Duration::from_secs(10));
    assert_eq!(e["code"], "unexpected", "{e}");

    // A platform that cannot serve a part answers with an `error`: the update ends on it,
    // with the platform's word, not after the part's timeout.
    conn.send(&update_msg("u-error", &good, json!({})));
    let asked = conn.expect("need_release", Duration::from_secs(10));
    assert_eq!(asked["id"], "u-error");
    conn.send(
        &json!({"type": "error", "id": "u-error", "code": "not_found",
        "message": "no release is being fetched under this id"}),
    );
    let (s, _) = serve(conn, "u-error", Answer::Never);
    assert_refused(&s, "unavailable", next);
    let detail = s["detail"].as_str().unwrap();
    assert!(
        detail.contains("not_found: no release is being fetched"),
        "{s}"
    );
    nothing_staged(dir);

    conn.healthy(&mut t.agent);
}

#[test]
fn an_agent_the_launcher_did_not_start_or_without_release_keys_refuses_updates() {
    let next = newer(&own_version());
    let key = KeyPair::from_seed(&[43; 32]);
    let bin = binary(1000, 3);
    let m = manifest(&next, std::env::consts::ARCH, &bin, &key);
    for (with_key, layout) in [(true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start();
        let layout_dir = dir.path().join("layout");
        let mut agent = start(
            &server,
            dir.path(),
            with_key.then_some(&key),
            "",
            "",
            layout.then_some(layout_dir.as_path()),
        );
        let mut conn = accept(&server);
        let (s, asked) = offer(&mut conn, "u-1", &m, json!({}), Answer::Bytes(&bin));
        assert_refused(&s, "unsupported", &next);
        assert!(asked.is_empty());
        nothing_staged(dir.path());
        conn.healthy(&mut agent);
    }
}

/// Every `result` for `task_id` seen on `conn` (noting the rest), within `wait`.
fn results_of(conn: &mut Conn, task_id: &str, wait: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv(left) {
            Some(Got::Text(m)) if m["type"] == "result" && m["task_id"] == task_id => {
                seen.push(m["result"].clone())
            }
            Some(Got::Text(_)) => {}
            _ => return seen,
        }
    }
}

#[test]
fn a_good_release_is_staged_whole_then_the_agent_drains_and_stops() {
    let mut t = Setup::new(44, "", "max_concurrent_tasks = 1");
    let (own, next) = (t.own.clone(), t.next.clone());
    // Two parts: 8 MiB, then the rest.
    let bin = binary((8 << 20) + 12_345, 4);
    let m = t.manifest(&bin);

    // One task running (ends within the drain), one queued behind it (one slot).
    t.conn.send(&run("during", "sleep", &["5"]));
    t.conn.send(&run("queued", "echo", &["queued"]));
    wait_accepted(&mut t.conn, &["during", "queued"]);
    let (s, asked) = t.offer_next("u-good", &bin, 20000);
    assert_eq!(asked, [(0, 8 << 20), (8 << 20, 12_345)]);
    assert_eq!(s["state"], "staged", "{s}");
    assert_eq!(s["version"], next.as_str());
    assert_eq!(s["agent_version"], own.as_str());

    let staged = t.dir().join("state/update/staged");
    assert!(std::fs::read(staged.join("bridge-daemon")).unwrap() == bin);
    assert_eq!(std::fs::read_to_string(staged.join("manifest")).unwrap(), m);
    let request: Value =
        serde_json::from_slice(&std::fs::read(staged.join("request.json")).unwrap()).unwrap();
    assert_eq!(
        request,
        json!({"update_id": "u-good", "version": next, "from_version": own, "allow_downgrade": false})
    );
    assert!(!t.dir().join("state/update/staging").exists());

    // Draining: a new task is refused, and not recorded.
    t.conn.send(&run("late", "echo", &["late"]));
    let r = t.conn.result("late", Duration::from_secs(10));
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(r["reason"], "updating", "{r}");
    // The running task finishes; the queued one does not start.
    let r = t.conn.result("during", Duration::from_secs(20));
    assert_eq!(r["status"], "ok", "{r}");
    let status = t.agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}; log:\n{}", t.agent.log());
    assert!(!t.conn.results.contains_key("queued"));
    assert!(
        t.agent.log().contains("staying queued"),
        "{}",
        t.agent.log()
    );
    // Staged files stay for the launcher.
    assert!(staged.join("bridge-daemon").exists());

    // The next start (here without the launcher: the same agent) runs the queued task, and the
    // refused one when it is sent again: it was not recorded.
    t.restart("max_concurrent_tasks = 1");
    let r = t.conn.result("queued", Duration::from_secs(20));
    assert_ran(&r, "queued\n");
    t.conn.send(&run("late", "echo", &["late"]));
    let r = t.conn.result("late", Duration::from_secs(20));
    assert_ran(&r, "late\n");
    if let Some(again) = t.conn.results.get("during") {
        assert_eq!(
            again["result"]["status"], "ok",
            "one result for `during`: {again}"
        );
    }
    t.conn.healthy(&mut t.agent);
}

#[test]
fn a_task_running_past_the_drain_timeout_ends_interrupted_once_after_the_restart() {
    let mut t = Setup::new(45, "", "");
    let bin = binary(5000, 5);
    t.conn.send(&run("long", "sleep", &["30"]));
    wait_accepted(&mut t.conn, &["long"]);
    let (s, _) = t.offer_next("u-long", &bin, 500);
    assert_eq!(s["state"], "staged", "{s}");
    let stopping = Instant::now();
    let status = t.agent.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}; log:\n{}", t.agent.log());
    assert!(stopping.elapsed() < Duration::from_secs(10));
    assert!(results_of(&mut t.conn, "long", Duration::from_millis(200)).is_empty());
    assert!(
        !t.conn.results.contains_key("long"),
        "no result before the restart"
    );

    t.restart("");
    let r = t.conn.result("long", Duration::from_secs(20));
    assert_eq!(r["status"], "interrupted", "{r}");
    // Acknowledged: it is not sent again, and the same task id is answered with it.
    t.conn.send(&run("long", "sleep", &["30"]));
    let again = results_of(&mut t.conn, "long", Duration::from_secs(3));
    assert!(
        again.iter().all(|r| r["status"] == "interrupted"),
        "{again:?}"
    );
    assert!(
        !again.is_empty(),
        "a repeated task id is answered with its one result"
    );
    t.conn.healthy(&mut t.agent);
}

fn write_outcome(dir: &Path, outcome: &Value) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir.join("state/update"))
        .unwrap();
    std::fs::write(
        dir.join("state/update/outcome.json"),
        serde_json::to_vec(outcome).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_verdict_is_reported_after_every_reconnect_until_the_platform_acknowledges_it() {
    let dir = tempfile::tempdir().unwrap();
    let own = own_version();
    write_outcome(
        dir.path(),
        &json!({"update_id": "u-7", "state": "failed", "version": "9.9.9", "from_version": own,
                "reason": "exited", "detail": "exited with status 3 before confirming"}),
    );
    let outcome = dir.path().join("state/update/outcome.json");
    let server = Server::start();
    let mut agent = start(&server, dir.path(), None, "", "", None);
    for _ in 0..2 {
        let mut conn = accept(&server);
        let s = conn.expect("update_status", Duration::from_secs(10));
        assert_eq!(
            s,
            json!({"type": "update_status", "id": "u-7", "state": "failed", "version": "9.9.9",
                   "agent_version": own, "reason": "exited",
                   "detail": "exited with status 3 before confirming"})
        );
        // Another update's ack changes nothing.
        conn.send(&json!({"type": "update_ack", "id": "u-other"}));
        conn.healthy(&mut agent);
        assert!(outcome.exists());
    }
    let mut conn = accept(&server);
    conn.expect("update_status", Duration::from_secs(10));
    conn.send(&json!({"type": "update_ack", "id": "u-7"}));
    wait_removed(&outcome, "update_ack");
    drop(conn);
    let mut conn = accept(&server);
    // The welcome's report would come before this task's result.
    conn.healthy(&mut agent);
    let mut seen = Vec::new();
    while let Some(Got::Text(m)) = conn.recv(Duration::from_millis(500)) {
        seen.push(m);
    }
    assert!(
        seen.iter().all(|m| m["type"] != "update_status"),
        "{seen:?}"
    );
}

/// The launcher's `state.json` in `DIR/layout`: update `u-9` from `0.0.1` to `version`, in
/// `phase`.
fn write_pending(dir: &Path, version: &str, phase: &str) {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let state = json!({"pending": {"update_id": "u-9", "version": version,
                                   "from_version": "0.0.1", "phase": phase,
                                   "confirm_timeout_secs": 300}});
    std::fs::write(layout.join("state.json"), state.to_string()).unwrap();
}

/// An agent on `dir` started by the launcher (its layout `DIR/layout`), with a health window
/// of `window_secs`, connected to a server of its own.
fn launched(dir: &Path, window_secs: u64) -> (Server, Agent, Conn) {
    let server = Server::start();
    let update = format!("health_window_secs = {window_secs}\nconfirm_timeout_secs = 30");
    let layout = dir.join("layout");
    let agent = start(&server, dir, None, &update, "", Some(&layout));
    let conn = accept(&server);
    (server, agent, conn)
}

#[test]
fn a_new_version_confirms_once_it_stayed_up_for_the_health_window() {
    let dir = tempfile::tempdir().unwrap();
    let own = own_version();
    let confirmed = dir.path().join("state/update/confirmed");
    let outcome = dir.path().join("state/update/outcome.json");

    // A pending switch to another version, or one still switching: nothing to confirm.
    for (version, phase) in [("7.7.7", "switched"), (own.as_str(), "switching")] {
        let other = tempfile::tempdir().unwrap();
        write_pending(other.path(), version, phase);
        let (_server, mut agent, mut conn) = launched(other.path(), 1);
        std::thread::sleep(Duration::from_secs(2));
        conn.healthy(&mut agent);
        let update = other.path().join("state/update");
        assert!(!update.join("confirmed").exists() && !update.join("outcome.json").exists());
    }

    write_pending(dir.path(), &own, "switched");
    let (_server, mut agent, mut conn) = launched(dir.path(), 2);
    let welcomed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!confirmed.exists(), "not before the health window");
    let s = conn.expect("update_status", Duration::from_secs(20));
    assert!(welcomed.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        s,
        json!({"type": "update_status", "id": "u-9", "state": "succeeded", "version": own,
               "agent_version": own})
    );
    assert_eq!(
        std::fs::read_to_string(&confirmed).unwrap(),
        format!("{own}\n")
    );
    let kept: Value = serde_json::from_slice(&std::fs::read(&outcome).unwrap()).unwrap();
    assert_eq!(
        kept,
        json!({"update_id": "u-9", "state": "succeeded", "version": own, "from_version": "0.0.1"})
    );
    conn.send(&json!({"type": "update_ack", "id": "u-9"}));
    wait_removed(&outcome, "update_ack");
    conn.healthy(&mut agent);
    drop((conn, agent));

    // Confirmed already (the launcher has not cleared its state yet): not again.
    let (_server, mut agent, mut conn) = launched(dir.path(), 1);
    std::thread::sleep(Duration::from_secs(2));
    conn.send(&run("after", "echo", &["after"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !conn.results.contains_key("after") {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv(left) {
            Some(Got::Text(m)) => assert_ne!(m["type"], "update_status", "no second verdict: {m}"),
            other => panic!("waiting for a result: {other:?}"),
        }
    }
    assert_eq!(conn.results["after"]["result"]["status"], "ok");
    assert!(!outcome.exists(), "no second verdict");
    assert!(agent.alive());
}
