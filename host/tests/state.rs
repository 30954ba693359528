//! The agent's state directory through the real binary: state that other users could read or
//! change refuses to start (naming the file and the fix).

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::platform::Agent;

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
