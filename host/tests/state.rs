//! The agent's state directory through the real binary: state that other users could read or
//! change refuses to start (naming the file and the fix), and enrollment is recorded there so
//! the enrollment token is neither sent nor read once the platform has welcomed the agent.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bridge_testkit::{wait_until, Agent, Platform, Publisher};
use serde_json::json;

const CONNECT: Duration = Duration::from_secs(30);

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Arguments that get an agent through start-up with nothing to connect to: a port nobody
/// listens on, so it stays in its reconnect loop.
fn unreachable_server() -> Vec<String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    vec!["--server".into(), format!("wss://127.0.0.1:{port}/agent")]
}

/// Starts an agent on `state` that must refuse to start; returns its log.
fn refuses_to_start(state: &Path) -> String {
    let mut agent = Agent::start(state, &unreachable_server());
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{}", agent.log.text());
    agent.log.text()
}

#[test]
fn state_others_could_read_or_change_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut agent = Agent::start(&state, &unreachable_server());
    agent.id();
    agent.terminate();
    // Created 0700 whatever the umask; the key 0600.
    assert_eq!(mode(&state), 0o700);
    let identity = state.join("identity");
    let key = identity.join("agent.key");
    assert_eq!(mode(&key), 0o600);

    for loose in [0o644, 0o640, 0o604] {
        chmod(&key, loose);
        let log = refuses_to_start(&state);
        assert!(
            log.contains(&format!("the agent key {}", key.display()))
                && log.contains(&format!("chmod 600 {}", key.display())),
            "{log}"
        );
    }
    chmod(&key, 0o600);

    for (dir, what) in [
        (&state, "the state directory"),
        (&identity, "the identity directory"),
    ] {
        chmod(dir, 0o777);
        let log = refuses_to_start(&state);
        assert!(
            log.contains(&format!("{what} {}", dir.display()))
                && log.contains(&format!("chmod 700 {}", dir.display())),
            "{log}"
        );
        chmod(dir, 0o700);
    }

    if euid() == 0 {
        let status = std::process::Command::new("chown")
            .arg("65534")
            .arg(&key)
            .status()
            .unwrap();
        assert!(status.success());
        let log = refuses_to_start(&state);
        assert!(log.contains("is owned by uid 65534"), "{log}");
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
        eprintln!("foreign-owner case: ran (as root)");
    } else {
        eprintln!("foreign-owner case: skipped (chown needs root)");
    }

    // Readable directories are fine (every file in them has its own mode).
    chmod(&state, 0o755);
    let mut agent = Agent::start(&state, &unreachable_server());
    agent.log.wait_for("starting the platform link", CONNECT);
    agent.terminate();
}

/// Starts an agent with `args` against a plain TCP listener and returns the head of the first
/// request it makes (the WebSocket upgrade), then stops it.
fn first_upgrade_request(state: &Path, extra: &[&str]) -> (String, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let mut args: Vec<String> = vec!["--server".into(), url, "--dev-allow-plaintext".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut agent = Agent::start(state, &args);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
            match conn.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
    });
    let head = rx
        .recv_timeout(CONNECT)
        .unwrap_or_else(|_| panic!("no upgrade request; agent log:\n{}", agent.log.text()));
    agent.terminate();
    (head, agent.log.text())
}

fn authorization(head: &str) -> Option<&str> {
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
}

#[test]
fn once_enrolled_the_token_is_never_sent_or_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let publisher = Publisher::new();
    let token = platform.token();

    // An agent that has not enrolled presents its token: the listener sees it.
    let (head, _) = first_upgrade_request(&tmp.path().join("fresh"), &["--token", &token]);
    assert_eq!(
        authorization(&head),
        Some(format!("authorization: Bearer {token}").as_str()),
        "{head}"
    );

    // Enroll; the welcome is recorded in the state directory, for this agent id.
    let state = tmp.path().join("agent");
    let mut agent = Agent::start(
        &state,
        &platform.agent_args_with(Some(&token), Some(&publisher.public())),
    );
    let id = agent.id();
    platform.control().wait_connected(&id);
    let record = state.join("enrolled");
    let json: serde_json::Value = wait_until("the enrollment record", CONNECT, || {
        let bytes = std::fs::read(&record).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {bytes:?}"))
    });
    assert_eq!(mode(&record), 0o600);
    assert_eq!(json["agent_id"], id, "{json}");
    assert_eq!(json["server"], platform.url(), "{json}");
    assert!(
        json["enrolled_at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    agent.terminate();

    // Restarted with the same token: the upgrade carries no Authorization header.
    let (head, log) = first_upgrade_request(&state, &["--token", &token]);
    assert!(head.starts_with("GET /agent "), "{head}");
    assert_eq!(
        authorization(&head),
        None,
        "the token was sent again: {head}"
    );
    assert!(log.contains("already enrolled"), "{log}");

    // Nor is the token read: a token file that is gone (as the installer removes it) is fine.
    let mut args = platform.agent_args_with(None, Some(&publisher.public()));
    args.extend([
        "--token-file".into(),
        tmp.path().join("gone").display().to_string(),
    ]);
    let agent = Agent::start(&state, &args);
    platform.control().wait_connected(&id);
    let r = platform.control().run_module(
        &id,
        &publisher.signed("hello"),
        json!({"name": "again"}),
        None,
    );
    assert_eq!(r["result"]["output"]["greeting"], "Hello, again!", "{r}");
    agent.log.wait_for("already enrolled", CONNECT);
    assert!(
        agent.log.text().contains("already enrolled"),
        "{}",
        agent.log.text()
    );

    // The daemon's compiled-module cache is keyed from its identity: no key file anywhere.
    let cache = state.join("cache");
    let artifacts: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    assert!(
        artifacts
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "cwasm")),
        "{artifacts:?}"
    );
    assert!(!cache.join("cache.key").exists() && !state.join("cache.key").exists());
    assert_eq!(mode(&cache), 0o700);
}

#[test]
fn a_second_daemon_on_the_same_state_stops_before_connecting() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let publisher = Publisher::new();
    let state = tmp.path().join("agent");
    let first = Agent::start(&state, &platform.agent_args(Some(&publisher)));
    let id = first.id();
    let control = platform.control();
    control.wait_connected(&id);
    let connections = platform.log().count("agent connected");

    // The journal's lock stops it; nothing of the link has started.
    let mut second = Agent::start(
        &state,
        &platform.agent_args_with(None, Some(&publisher.public())),
    );
    let status = second.wait_exit(Duration::from_secs(20));
    let log = second.log.text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("opening the journal"), "{log}");
    assert!(!log.contains("starting the platform link"), "{log}");
    assert_eq!(
        platform.log().count("agent connected"),
        connections,
        "the second daemon reached the platform: {}",
        platform.log().text()
    );

    // The first one still runs tasks.
    let r = control.run_module(
        &id,
        &publisher.signed("hello"),
        json!({"name": "first"}),
        None,
    );
    assert_eq!(r["result"]["status"], "ok", "{r}");
}
