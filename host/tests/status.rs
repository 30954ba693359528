//! `bridge-daemon status` on the real binaries: a real platform on 127.0.0.1, a real agent, the
//! status socket asked by the real command while the agent is connected, disconnected and
//! stopped; and hostile local clients (a request line over the bound, one that never sends)
//! that are closed while the daemon goes on answering others. Every test ends by itself.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bridge_testkit::{bins, wait_until, Agent, Platform, Publisher, Setup, CONNECT};
use serde_json::{json, Value};

/// `bridge-daemon status --state STATE [--json]`: exit code, stdout, stderr.
fn status_command(state: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = bins::daemon();
    cmd.arg("status").arg("--state").arg(state);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("running bridge-daemon status");
    (
        out.status.code().expect("an exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bridge-daemon status --json` decoded, with its exit code.
fn status(state: &Path) -> (i32, Value) {
    let (code, out, err) = status_command(state, true);
    let value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("status printed no JSON ({e}): {out:?}; stderr: {err}"));
    (code, value)
}

/// Waits until the running daemon's status satisfies `holds`; returns it.
#[track_caller]
fn wait_status(state: &Path, what: &str, holds: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, CONNECT, || {
        let (code, s) = status(state);
        if code == 0 && holds(&s) {
            Ok(s)
        } else {
            Err(format!("exit {code}: {s}"))
        }
    })
}

const HELLO_RULE: &str = "[[shell.rules]]\nname = \"hello\"\nprogram = \"/bin/echo\"\nargs = [\"from the shell\"]\n[platform]\nstatus_secs = 1\n";

#[test]
fn status_while_connected_counts_the_tasks_run() {
    let s = Setup::builder()
        .config(HELLO_RULE)
        .args(&["--heartbeat-secs", "1"])
        .start();
    let control = s.control();
    let hello = s.publisher.signed("hello");
    for name in ["Ada", "Grace", "Edsger"] {
        let r = control.run_module(&s.id, &hello, json!({ "name": name }), None);
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    let r = s.run_command("hello", json!({}));
    assert_eq!(r["result"]["status"], "ok", "{r}");
    let r = s.run_command("no-such-command", json!({}));
    assert_eq!(r["result"]["reason"], "unknown_command", "{r}");

    let state = &s.agent.state;
    // Acknowledged by the platform, and a heartbeat answered (every second).
    let st = wait_status(
        state,
        "no result unacknowledged and a heartbeat timed",
        |s| s["stats"]["tasks"]["unacked"] == 0 && s["stats"]["link"]["heartbeat_rtt_ms"].is_f64(),
    );
    assert_eq!(st["running"], true);
    assert_eq!(st["agent_id"], s.id.as_str());
    assert_eq!(st["platform"], s.platform.url().as_str());
    assert_eq!(st["pid"], s.agent.pid());
    assert_eq!(st["state_dir"], state.display().to_string());
    assert!(st["uptime_secs"].is_u64(), "{st}");
    assert!(st["metrics_listen"].is_null(), "{st}");
    let stats = &st["stats"];
    assert_eq!(stats["tasks"]["finished"], json!({"ok": 4, "rejected": 1}));
    assert_eq!(stats["tasks"]["running"], 0);
    assert_eq!(stats["tasks"]["queued"], 0);
    let link = &stats["link"];
    assert_eq!(link["connected"], true);
    assert!(
        link["since_unix_ms"].as_u64().unwrap() > 1_700_000_000_000,
        "{link}"
    );
    assert_eq!(link["reconnects"], 0);
    assert!(
        link["heartbeat_rtt_ms"].as_f64().unwrap() < 5000.0,
        "{link}"
    );
    // Four tasks accepted and recorded; the unknown command was refused unrecorded.
    assert_eq!(stats["journal"]["records"], 4);
    // The journal's size on disk counts its write-ahead log, in use since the first task.
    let log_file = std::fs::metadata(state.join("journal.redb.log"))
        .unwrap()
        .len();
    assert!(
        stats["journal"]["bytes"].as_u64().unwrap() > log_file && log_file > 0,
        "{stats}"
    );
    let store = &stats["store"];
    assert_eq!(store["modules"], 1, "the hello module is stored: {store}");
    let module_file = std::fs::read_dir(state.join("modules"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();
    assert_eq!(store["module_bytes"], module_file);
    assert_eq!(store["compiled"], 1, "its compiled artifact: {store}");
    assert!(store["compiled_bytes"].as_u64().unwrap() > 0);
    assert!(stats["rss_bytes"].as_u64().unwrap() > 1 << 20, "{stats}");

    // The human form: a headline and aligned lines.
    let (code, text, _) = status_command(state, false);
    assert_eq!(code, 0);
    assert!(
        text.starts_with("● bridge-daemon ") && text.lines().next().unwrap().contains("running"),
        "{text}"
    );
    assert!(
        text.contains(&format!("       Agent: {}\n", s.id)),
        "{text}"
    );
    assert!(text.contains("        Link: connected since "), "{text}");
    assert!(
        text.contains("    Finished: 4 ok, 1 rejected since start\n"),
        "{text}"
    );

    // Only the owner may use the socket.
    let mode = std::fs::metadata(state.join("status.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The platform sees the same stats in the agent's periodic `status`.
    let listed = control.wait_agent(&s.id, "stats in its status", CONNECT, |a| {
        a["status"]["stats"]["tasks"]["finished"] == json!({"ok": 4, "rejected": 1})
    });
    assert_eq!(listed["status"]["stats"]["link"]["connected"], true);
    assert_eq!(listed["status"]["stats"]["store"]["modules"], 1);
}

/// Connects to the status socket in `state`.
fn connect(state: &Path) -> UnixStream {
    let stream = UnixStream::connect(state.join("status.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads what the daemon sends until it closes (a close with the request partly unread
/// resets the connection: nothing more was sent).
fn read_all(stream: &mut UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(e) => panic!("the daemon closes within its 2 s bound: {e}"),
    }
}

#[test]
fn hostile_local_clients_are_closed_and_others_still_answered() {
    let s = Setup::start();
    let state = &s.agent.state;
    assert_eq!(status(state).0, 0);

    // A line over 64 bytes: closed without an answer, at once.
    let mut long = connect(state);
    long.write_all(&[b'x'; 65]).unwrap();
    assert!(read_all(&mut long).is_empty());
    // Exactly 64 bytes with the newline is a line: an unknown request, answered so.
    let mut line = connect(state);
    line.write_all(format!("{}\n", "y".repeat(63)).as_bytes())
        .unwrap();
    let answer: Value = serde_json::from_slice(&read_all(&mut line)).unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("unknown request"),
        "{answer}"
    );

    // Four silent clients take every slot; they are closed after 2 s, and a status asked
    // meanwhile is answered once a slot frees.
    let started = Instant::now();
    let mut silent: Vec<UnixStream> = (0..4).map(|_| connect(state)).collect();
    let (code, st) = status(state);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["running"], true);
    for client in &mut silent {
        assert!(read_all(client).is_empty(), "a silent client gets nothing");
    }
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(8),
        "silent clients were closed after {held:?}"
    );
    // A client that sends half a line and stops is closed the same way.
    let mut half = connect(state);
    half.write_all(b"sta").unwrap();
    assert!(read_all(&mut half).is_empty());
    assert_eq!(status(state).0, 0, "the daemon still answers");
}

#[test]
fn status_while_disconnected_reconnected_and_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut platform = Platform::start(&tmp.path().join("platform"));
    let publisher = Publisher::new();
    let mut args = platform.agent_args(Some(&publisher));
    args.extend(["--reconnect-max-secs".into(), "1".into()]);
    let state = tmp.path().join("agent");
    let mut agent = Agent::start(&state, &args);
    let id = agent.id();
    platform.control().wait_connected(&id);
    wait_status(&state, "connected", |s| {
        s["stats"]["link"]["connected"] == true
    });

    // The platform goes away: disconnected, with the reason.
    platform.kill();
    let st = wait_status(&state, "disconnected with an error", |s| {
        s["stats"]["link"]["connected"] == false && s["stats"]["link"]["last_error"].is_string()
    });
    assert_eq!(st["stats"]["link"]["reconnects"], 0);
    let (_, text, _) = status_command(&state, false);
    assert!(text.contains("        Link: disconnected since "), "{text}");
    assert!(text.contains("  Last error: "), "{text}");

    // It comes back: connected again, one reconnect counted.
    let platform = platform.restart();
    platform.control().wait_connected(&id);
    wait_status(&state, "reconnected", |s| {
        s["stats"]["link"]["connected"] == true && s["stats"]["link"]["reconnects"] == 1
    });

    // Stopped: exit 3, and what the state directory tells.
    agent.terminate();
    assert!(
        !state.join("status.sock").exists(),
        "the socket goes with the daemon"
    );
    let (code, st) = status(&state);
    assert_eq!(code, 3, "{st}");
    assert_eq!(st["running"], false);
    assert_eq!(st["agent_id"], id.as_str());
    assert_eq!(
        st["platform"],
        platform.url().as_str(),
        "from the enrollment record"
    );
    assert!(st["pid"].is_null() && st["stats"].is_null(), "{st}");
    // The journal's two files: the redb file and its write-ahead log (preallocated).
    let journal_file = std::fs::metadata(state.join("journal.redb")).unwrap().len();
    let log_file = std::fs::metadata(state.join("journal.redb.log")).map_or(0, |m| m.len());
    assert_eq!(st["on_disk"]["journal_bytes"], journal_file + log_file);
    let (code, text, _) = status_command(&state, false);
    assert_eq!(code, 3);
    assert!(text.starts_with("○ bridge-daemon: not running\n"), "{text}");
    assert!(text.contains(&format!("       Agent: {id}\n")), "{text}");

    // With --config: the state directory and the platform as the config file names them.
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\n[platform]\nserver = \"wss://configured.example/agent\"\n",
            state.display()
        ),
    )
    .unwrap();
    let out = bins::daemon()
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["platform"], "wss://configured.example/agent");
    assert_eq!(st["agent_id"], id.as_str());

    // Killed, it leaves its socket behind: still "not running", and the next start replaces it.
    let mut agent = Agent::start(&state, &args);
    platform.control().wait_connected(&id);
    agent.kill();
    assert!(state.join("status.sock").exists());
    assert_eq!(status(&state).0, 3);
    let _agent = Agent::start(&state, &args);
    wait_status(&state, "answering again after a stale socket", |s| {
        s["running"] == true
    });

    // A state directory nobody ever used: not running, nothing known.
    let (code, st) = status(&tmp.path().join("nothing"));
    assert_eq!(code, 3);
    assert!(st["agent_id"].is_null(), "{st}");
}
