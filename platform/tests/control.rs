//! Who may use the control interface of the real `bridgectl serve`, and what ends a control
//! connection: the Unix socket in the state directory, its peer-credential check, the state
//! directory's checks, and lines that are not requests (HTTP among them).

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use bridge_testkit::Platform;
use common::*;

/// The uid (and gid) of `nobody`, the other user the tests connect as.
const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

/// How many enrollment tokens the server has issued (its `tokens.json`).
fn tokens_issued(state: &Path) -> usize {
    let text = std::fs::read_to_string(state.join("tokens.json")).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    file["tokens"].as_array().unwrap().len()
}

/// Writes `bytes` on a new control connection, then reads until the server closes it; returns
/// the lines received. A reset after the lines (the server closed with our bytes unread)
/// counts as closed.
fn exchange(socket: impl AsRef<Path>, bytes: &[u8]) -> Vec<Value> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    // The server may close before reading everything: a failed write is part of the test.
    let _ = stream.write_all(bytes);
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the connection was not closed ({e}); received {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    BufReader::new(&received[..])
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// Runs `command` (which must end by itself) and returns its output, within 10 s.
fn output_within(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > STEP {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{command:?} did not end within 10 s; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `bridgectl serve` on `state`, expected to refuse to start; returns its stderr.
fn serve_refuses(state: &Path) -> String {
    let out = output_within(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(state),
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "no first line");
    err
}

/// A copy of `bridgectl` that any user can run, in a directory any user can enter.
fn bridgectl_for_everyone(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    chmod(&bin, 0o755);
    let copy = bin.join("bridgectl");
    std::fs::copy(BIN, &copy).unwrap();
    chmod(&copy, 0o755);
    copy
}

/// Runs `bridgectl ARGS…` as uid and gid `nobody`, without supplementary groups.
fn as_nobody(bridgectl: &Path, args: &[&str]) -> Output {
    output_within(
        Command::new(bridgectl)
            .args(args)
            .env_remove("BRIDGE_CONTROL")
            .env_remove("BRIDGE_STATE")
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY),
    )
}

#[test]
fn another_user_cannot_use_the_control_interface() {
    if !is_root() {
        println!("SKIPPED: another_user_cannot_use_the_control_interface needs root (to run a client as uid {NOBODY})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let state = dir.path().join("state");
    let serve = Platform::start(&state);
    let bridgectl = bridgectl_for_everyone(dir.path());
    let socket = serve.control_socket().to_str().unwrap().to_string();
    let issued = tokens_issued(&state);

    // The copy runs as nobody (so a refusal below is the control interface's, not exec's).
    let out = as_nobody(&bridgectl, &["--version"]);
    assert!(
        out.status.success(),
        "bridgectl does not run as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // As the server leaves it, the state directory (0700) keeps other users from the socket.
    let out = as_nobody(&bridgectl, &["--control", &socket, "token"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "no token printed");
    assert!(err.contains("Permission denied"), "{err}");

    // With the directory and the socket opened to everyone (a mistake, or the modes changed
    // behind the server's back), the peer-credential check still refuses other users: one
    // error line, then the connection is closed, and nothing was done.
    chmod(&state, 0o755);
    chmod(Path::new(&socket), 0o666);
    for args in [
        &["--control", &socket, "token"][..],
        &[
            "--state",
            state.to_str().unwrap(),
            "run",
            "--agent",
            &"0".repeat(64),
            "--command",
            "env",
        ],
    ] {
        let out = as_nobody(&bridgectl, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(out.stdout.is_empty(), "nothing printed");
        assert!(
            err.contains("refused: the control interface serves its own user (uid 0) and root only, not uid 65534"),
            "{err}"
        );
    }
    assert_eq!(tokens_issued(&state), issued, "no token was issued");
    assert!(
        serve
            .log()
            .text()
            .contains("control connection refused: not the server's user"),
        "{}",
        serve.log().text()
    );

    // The server's own user (root here) still gets through the same socket.
    let out = output_within(Command::new(&bridgectl).args(["--control", &socket, "token"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tokens_issued(&state), issued + 1);
}

#[test]
fn the_lines_of_an_http_request_are_not_executed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = Platform::start(&state);
    let issued = tokens_issued(&state);
    let body = format!(
        "\n{{\"cmd\":\"token\"}}\n{{\"cmd\":\"run\",\"agent\":\"{}\",\"command\":\"env\",\"task_id\":\"via-http\"}}\n",
        "0".repeat(64)
    );
    for head in [
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\n",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "OPTIONS * HTTP/1.1\r\n",
        "PRI * HTTP/2.0\r\n",
    ] {
        let request = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
        let lines = exchange(serve.control_socket(), request.as_bytes());
        assert_eq!(lines.len(), 1, "one error line, then closed: {lines:?}");
        assert_eq!(lines[0]["ok"], false);
        let error = lines[0]["error"].as_str().unwrap();
        assert!(error.contains("not an HTTP server"), "{error}");
    }
    assert_eq!(tokens_issued(&state), issued, "no token was issued");
}

#[test]
fn a_line_that_is_not_a_request_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = Platform::start(&state);
    let issued = tokens_issued(&state);
    for bad in [
        "not json",
        r#"{"cmd":"token""#,
        r#"{"cmd":"reboot"}"#,
        r#"{"cmd":"token","extra":1}"#,
        "[1,2]",
    ] {
        let lines = exchange(
            serve.control_socket().to_str().unwrap(),
            format!("{{\"cmd\":\"agents\"}}\n\n{bad}\n{{\"cmd\":\"token\"}}\n").as_bytes(),
        );
        assert_eq!(
            lines.len(),
            2,
            "{bad}: the answer, one error, then closed: {lines:?}"
        );
        assert_eq!(lines[0]["ok"], true, "{lines:?}");
        assert_eq!(lines[1]["ok"], false, "{lines:?}");
        let error = lines[1]["error"].as_str().unwrap();
        assert!(
            error.starts_with("bad request") && error.contains("closing the connection"),
            "{error}"
        );
    }
    assert_eq!(tokens_issued(&state), issued, "no token was issued");

    // A request that parses but cannot be carried out is answered, and the connection goes on.
    let mut stream = UnixStream::connect(serve.control_socket()).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream
        .write_all(
            b"{\"cmd\":\"run\",\"agent\":\"a\",\"module\":\"not base64!\"}\n{\"cmd\":\"token\"}\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap();
    assert!(
        first["error"].as_str().unwrap().contains("not base64"),
        "{first}"
    );
    line.clear();
    reader.read_line(&mut line).unwrap();
    let second: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(second["ok"], true, "{second}");
    assert_eq!(tokens_issued(&state), issued + 1);
}

/// One request on its own connection, through the library's client.
fn serve_request(socket: impl AsRef<Path>, request: &str) -> Value {
    let request: Value = serde_json::from_str(request).unwrap();
    match bridge_platform::serve::control::request(socket, &request, STEP) {
        Ok(response) => response,
        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
    }
}

#[test]
fn bridgectl_finds_the_socket_from_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = Platform::start(&state);
    let issued = tokens_issued(&state);
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = ok(output_within(
        Command::new(BIN)
            .arg("--state")
            .arg(&state)
            .arg("agents")
            .env_remove("BRIDGE_CONTROL")
            .env_remove("BRIDGE_STATE"),
    ));
    assert_eq!(printed.trim(), "[]");
    ok(output_within(
        Command::new(BIN)
            .arg("token")
            .env_remove("BRIDGE_CONTROL")
            .env("BRIDGE_STATE", &state),
    ));
    // --control wins over --state.
    ok(output_within(
        Command::new(BIN)
            .args([
                "--control",
                serve.control_socket().to_str().unwrap(),
                "--state",
                "/nonexistent",
                "token",
            ])
            .env_remove("BRIDGE_CONTROL")
            .env_remove("BRIDGE_STATE"),
    ));
    // The command line wins over the environment.
    ok(output_within(
        Command::new(BIN)
            .arg("--state")
            .arg(&state)
            .arg("token")
            .env("BRIDGE_CONTROL", "/nonexistent/control.sock"),
    ));
    assert_eq!(tokens_issued(&state), issued + 3);

    // Neither: status 2, naming both ways.
    let out = output_within(
        Command::new(BIN)
            .arg("agents")
            .env_remove("BRIDGE_CONTROL")
            .env_remove("BRIDGE_STATE"),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--state DIR") && err.contains("--control PATH"),
        "{err}"
    );
    // An address where the socket's path goes is named as such.
    let out = output_within(
        Command::new(BIN)
            .args(["--control", "127.0.0.1:7000", "agents"])
            .env_remove("BRIDGE_STATE"),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("takes the path of the control socket"),
        "{err}"
    );
}

#[test]
fn the_state_directory_must_be_the_servers_own() {
    let dir = tempfile::tempdir().unwrap();

    // A symbolic link is refused, and nothing is created where it points.
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = serve_refuses(&link);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);

    // A directory of another user is refused.
    if is_root() {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = serve_refuses(&theirs);
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    } else {
        println!("SKIPPED (part): a state directory of another user needs root to make");
    }

    // A loose one is tightened to 0700.
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    chmod(&loose, 0o777);
    let serve = Platform::start(&loose);
    assert_eq!(std::fs::metadata(&loose).unwrap().mode() & 0o7777, 0o700);
    serve
        .log()
        .wait_for("had mode 777; set it to 700", Duration::from_secs(10));
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_or_another_file_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let socket = state.join("control.sock");

    // A server killed without cleaning up leaves its socket; the next start replaces it.
    let mut first = Platform::start(&state);
    first.kill();
    assert!(socket.exists(), "the killed server's socket is still there");
    let mut second = Platform::start(&state);
    assert_eq!(
        serve_request(second.control_socket(), r#"{"cmd":"agents"}"#)["ok"],
        true
    );

    // While it serves, another server on the same state directory refuses to start.
    let err = serve_refuses(&state);
    assert!(
        err.contains("another bridgectl serve is using the state directory"),
        "{err}"
    );
    assert_eq!(
        serve_request(second.control_socket(), r#"{"cmd":"agents"}"#)["ok"],
        true,
        "the running server's socket is intact"
    );

    // A clean stop removes the socket.
    let status = second.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists());

    // Something else where the socket goes is not removed.
    std::fs::write(&socket, "mine").unwrap();
    let err = serve_refuses(&state);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "mine");

    // A start that fails after binding the socket (the agent port is taken) removes it.
    std::fs::remove_file(&socket).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = output_within(
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &taken.local_addr().unwrap().to_string(),
                "--state",
            ])
            .arg(&state),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(!socket.exists(), "the socket of the failed start is gone");
}
