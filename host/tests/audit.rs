//! The audit log end to end: a real `bridgectl serve`, a real `bridge-daemon run` over TLS on
//! 127.0.0.1, signed modules from `examples/`, real shell commands; the chain checked with the
//! real `bridge-daemon audit verify|tail`. Every test ends by itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use bridge_testkit::audit::audit_files;
use bridge_testkit::{bins, wait_until, Setup};
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(30);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An agent with a shell rule `greet` (`/bin/echo hello <arg>`, with a secret in its
/// environment), reporting its status every second, with `extra` config.
fn setup(extra: &str) -> Setup {
    let config = format!(
        r#"
[platform]
status_secs = 1

[[shell.rules]]
name = "greet"
program = "/bin/echo"
args = ["hello"]
extra_args = {{ max = 1, patterns = ['[a-z]+'] }}
env = {{ LANG = "C", API_TOKEN = "hunter2-secret" }}
{extra}
"#
    );
    Setup::builder()
        .config(&config)
        .args(&["--reconnect-max-secs", "1"])
        .start()
}

fn state(s: &Setup) -> PathBuf {
    s.dir.path().join("agent")
}

/// `bridge-daemon audit ARGS --state STATE`: exit code and stdout.
fn audit(state: &Path, args: &[&str]) -> (i32, String) {
    let out = bins::daemon()
        .arg("audit")
        .args(args)
        .arg("--state")
        .arg(state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// The records in the files (`audit tail --json`).
fn records(state: &Path) -> Vec<Value> {
    let (code, out) = audit(state, &["tail", "-n", "100000", "--json"]);
    assert_eq!(code, 0, "{out}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the files hold `n` records; returns them.
fn wait_records(state: &Path, n: usize) -> Vec<Value> {
    wait_until(&format!("{n} audit records in the files"), WITHIN, || {
        let r = records(state);
        if r.len() == n {
            Ok(r)
        } else {
            Err(format!("{} records: {r:?}", r.len()))
        }
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A copy of the agent's audit directory, as a state directory of its own, its first file's
/// lines changed by `change`.
fn tampered(state: &Path, change: impl FnOnce(&mut Vec<String>)) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let dir = copy.path().join("audit");
    std::fs::create_dir(&dir).unwrap();
    for f in audit_files(state) {
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let first = audit_files(copy.path()).remove(0);
    let text = std::fs::read_to_string(&first).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    change(&mut lines);
    std::fs::write(&first, lines.join("\n") + "\n").unwrap();
    copy
}

#[test]
fn a_chain_of_tasks_verifies_with_the_facts_and_names_edits_deletions_and_swaps() {
    let s = setup("");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    let r = control.run_module(&s.id, &hello, json!({"name": "audit"}), Some("wasm-1"));
    assert_eq!(r["result"]["status"], "ok", "{r}");
    let r = s.run_command("greet", json!({"args": ["world"], "task_id": "shell-1"}));
    assert_eq!(r["result"]["status"], "ok", "{r}");
    // Accepted, then refused by the trust policy: a recorded refusal.
    let unsigned = std::fs::read(bins::wasm("hello")).unwrap();
    let r = s.request(
        json!({"cmd": "run", "agent": s.id, "module": b64(&unsigned),
                             "task_id": "unsigned-1", "timeout_ms": 60000}),
    );
    assert_eq!(r["result"]["status"], "rejected", "{r}");
    // Refused before it is recorded.
    let r = s.run_command("no-such-command", json!({"task_id": "unknown-1"}));
    assert_eq!(r["result"]["reason"], "unknown_command", "{r}");

    let st = state(&s);
    let recs = wait_records(&st, 4);
    let ids: Vec<&str> = recs
        .iter()
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["wasm-1", "shell-1", "unsigned-1", "unknown-1"]);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);

    let wasm = &recs[0];
    assert_eq!(wasm["event"], "ended");
    assert_eq!(wasm["kind"], "wasm");
    assert_eq!(wasm["status"], "ok");
    let signed_hash = sha256_hex(&hello);
    assert_eq!(wasm["file_sha256"], signed_hash.as_str(), "{wasm}");
    assert!(wasm["code_sha256"].is_string(), "{wasm}");
    assert_eq!(
        wasm["handler"],
        json!({"name": "hello", "version": "1.0.0"})
    );
    let key_id = s.publisher.key.public_key().key_id().to_string();
    assert_eq!(wasm["signer"], key_id.as_str());
    assert!(wasm["fuel"].as_u64().unwrap() > 0, "{wasm}");
    assert_eq!(wasm["program"], Value::Null);

    let shell = &recs[1];
    assert_eq!(shell["kind"], "shell");
    assert_eq!(shell["command"], "greet");
    assert_eq!(shell["program"], "/bin/echo");
    assert_eq!(shell["argv"], json!(["/bin/echo", "hello", "world"]));
    assert_eq!(shell["env"], json!(["API_TOKEN", "LANG"]));
    assert_eq!(shell["exit_code"], 0);
    let lines = std::fs::read_to_string(&audit_files(&st)[0]).unwrap();
    assert!(!lines.contains("hunter2"), "an env value in the audit log");

    let refused = &recs[2];
    assert_eq!(refused["event"], "refused");
    assert_eq!(refused["status"], "rejected");
    let unknown = &recs[3];
    assert_eq!(unknown["event"], "refused");
    assert_eq!(unknown["reason"], "unknown_command");
    assert_eq!(unknown["kind"], Value::Null);
    assert_eq!(unknown["command"], "no-such-command");

    let (code, out) = audit(&st, &["verify"]);
    assert_eq!(code, 0, "{out}");
    let last_line = lines.lines().last().unwrap();
    let head = sha256_hex(last_line.as_bytes());
    assert_eq!(out.trim(), format!("4 records, seq 1..4, head {head}"));
    let (code, out) = audit(&st, &["tail", "-n", "2"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.starts_with("3 "), "{out}");

    // The platform is told the same head.
    control.wait_agent(&s.id, "the audit head in a status", WITHIN, |a| {
        a["status"]["audit"]["seq"] == 4 && a["status"]["audit"]["hash"] == head.as_str()
    });

    let file = "audit-00000000000000000001.jsonl";
    // An edited record (its hash no longer what the next one names).
    let copy = tampered(&st, |l| {
        l[1] = l[1].replace("\"exit_code\":0", "\"exit_code\":1")
    });
    let (code, out) = audit(copy.path(), &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{file}:3 (seq 3): prev")), "{out}");
    // The last record edited: the platform's head no longer matches; locally it parses.
    // A deleted record.
    let copy = tampered(&st, |l| {
        l.remove(1);
    });
    let (code, out) = audit(copy.path(), &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{file}:2 (seq 3): expected seq 2")),
        "{out}"
    );
    // Two records swapped.
    let copy = tampered(&st, |l| l.swap(1, 2));
    let (code, out) = audit(copy.path(), &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{file}:2 (seq 3)")), "{out}");
    // A line that is not a record.
    let copy = tampered(&st, |l| {
        l[0] = l[0].replacen("{\"seq\":1,", "{\"seq\": 1,", 1)
    });
    let (code, out) = audit(copy.path(), &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{file}:1: ")), "{out}");
}

#[test]
fn killed_right_after_its_results_every_result_has_its_record() {
    let mut s = setup("");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    let n = 20;
    for i in 0..n {
        let r = control.run_module(&s.id, &hello, json!({"name": "x"}), Some(&format!("k{i}")));
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    // SIGKILL right after the last result arrived, then a restart.
    s.restart_agent(true);
    let st = state(&s);
    let recs = wait_records(&st, n);
    let mut ids: Vec<String> = recs
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "one record per task");
    // Each record says how the platform saw the task end.
    for r in &recs {
        let task = r["task_id"].as_str().unwrap();
        let stored = s.request(json!({"cmd": "result", "task_id": task}));
        let status = r["status"].as_str().unwrap();
        assert!(status == "ok" || status == "interrupted", "{r}");
        if status == "ok" {
            assert_eq!(stored["result"]["status"], "ok", "{stored}");
        }
    }
    let (code, out) = audit(&st, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(&format!("{n} records, seq 1..{n}")),
        "{out}"
    );
}

#[test]
fn a_torn_last_line_is_reported_by_verify_and_repaired_at_the_next_start() {
    let mut s = setup("");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    for i in 0..2 {
        let r = control.run_module(&s.id, &hello, json!({}), Some(&format!("t{i}")));
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    let st = state(&s);
    let recs = wait_records(&st, 2);
    s.agent.terminate();
    // The last append cut short: its last 40 bytes (and the `\n`) never reached the disk.
    let file = audit_files(&st).pop().unwrap();
    let text = std::fs::read(&file).unwrap();
    let cut = text.len() - 41;
    std::fs::write(&file, &text[..cut]).unwrap();
    let torn = cut
        - (text[..text.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1);
    let (code, out) = audit(&st, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ends in a torn line of {torn} bytes")),
        "{out}"
    );
    assert!(out.starts_with("1 records, seq 1..1"), "{out}");

    // The next start sets the torn bytes aside, says so, and writes the record again.
    s.restart_agent(false);
    let again = wait_records(&st, 2);
    assert_eq!(again, recs);
    s.agent
        .log
        .wait_for("the audit file ended in a torn line", WITHIN);
    let log = s.agent.log.text();
    assert!(log.contains(&format!("bytes={torn}")), "{log}");
    assert!(log.contains(&file.display().to_string()), "{log}");
    let mut aside = file.as_os_str().to_owned();
    aside.push(".torn");
    let kept = std::fs::read(PathBuf::from(aside)).unwrap();
    assert_eq!(&kept[..torn], &text[cut - torn..cut]);
    let (code, out) = audit(&st, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("2 records, seq 1..2") && !out.contains("torn"),
        "{out}"
    );
}

#[test]
fn rotation_keeps_the_chain_across_files_and_at_most_max_files() {
    let s = setup("[audit]\nmax_file_bytes = 1024\nmax_files = 3\n");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    let n = 12;
    for i in 0..n {
        let r = control.run_module(&s.id, &hello, json!({}), Some(&format!("r{i}")));
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    let st = state(&s);
    let out = wait_until("the last record exported", WITHIN, || {
        let (code, out) = audit(&st, &["verify"]);
        if code == 0 && out.contains(&format!("..{n}, head")) {
            Ok(out)
        } else {
            Err(out)
        }
    });
    let files = audit_files(&st);
    assert!(files.len() <= 3, "{files:?}");
    assert!(files.len() >= 2, "{files:?}");
    assert!(out.contains("were rotated away"), "{out}");
    for f in &files {
        let bytes = std::fs::metadata(f).unwrap().len();
        // A record that would pass the size starts a new file.
        assert!(bytes <= 1024, "{} is {bytes} bytes", f.display());
        assert!(bytes > 0, "{} is empty", f.display());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let dir_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(st.join("audit"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(dir_mode, 0o700);
    // The head is the last record's; the platform has it.
    let last = std::fs::read_to_string(files.last().unwrap()).unwrap();
    let head = sha256_hex(last.lines().last().unwrap().as_bytes());
    control.wait_agent(&s.id, "the audit head in a status", WITHIN, |a| {
        a["status"]["audit"]["seq"] == n && a["status"]["audit"]["hash"] == head.as_str()
    });
    // Stopped, `bridge-daemon status` reads the same head from the files.
    let mut s = s;
    s.agent.terminate();
    let out = bins::daemon()
        .args(["status", "--json", "--state"])
        .arg(&st)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let offline: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        offline["audit"],
        json!({"seq": n, "hash": head}),
        "{offline}"
    );
}

#[allow(dead_code)]
mod hostile_platform;

/// The next `status` on `conn` (noting everything else).
fn next_status(conn: &mut hostile_platform::Conn) -> Value {
    conn.expect("status", WITHIN)
}

#[test]
fn welcome_audit_seq_is_answered_with_that_records_hash_in_every_status_of_the_connection() {
    use hostile_platform::{run, Agent, Server};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    // Status every second (the `[platform]` table after the `[agent]` lines).
    let _agent = Agent::start_with(
        &server,
        dir.path(),
        256,
        &[],
        "\n[platform]\nstatus_secs = 1\n",
    );
    let mut conn = server.accept();
    conn.open();
    let status = next_status(&mut conn);
    assert_eq!(status["audit"]["seq"], 0, "{status}");
    assert_eq!(status["audit"]["hash"], "0".repeat(64));
    for t in ["a", "b", "c"] {
        conn.send(&run(t, "echo", &[t]));
        assert_eq!(conn.result(t, WITHIN)["status"], "ok");
    }
    let st = dir.path().join("state");
    let recs = wait_records(&st, 3);
    assert_eq!(recs[2]["task_id"], "c");
    let lines = std::fs::read_to_string(&audit_files(&st)[0]).unwrap();
    let hashes: Vec<String> = lines.lines().map(|l| sha256_hex(l.as_bytes())).collect();
    let status = wait_until("a status with the head at seq 3", WITHIN, || {
        let s = next_status(&mut conn);
        if s["audit"]["seq"] == 3 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(status["audit"]["hash"], hashes[2].as_str(), "{status}");
    assert!(status["audit"].get("at").is_none(), "{status}");

    // Each connection: the welcome's audit_seq, answered in every status of that connection.
    for (audit_seq, want) in [
        (Some(2), json!({"seq": 2, "hash": hashes[1]})),
        (Some(3), json!({"seq": 3, "hash": hashes[2]})),
        (Some(99), json!({"seq": 99, "hash": null})),
        (None, Value::Null),
    ] {
        drop(conn);
        conn = server.accept();
        let hello = conn.expect("hello", WITHIN);
        let mut welcome = json!({"type": "welcome", "version": 2,
                                 "agent_id": hello["agent_id"], "enrolled": false});
        if let Some(seq) = audit_seq {
            welcome["audit_seq"] = json!(seq);
        }
        conn.send(&welcome);
        for _ in 0..2 {
            let status = next_status(&mut conn);
            let at = status["audit"].get("at").cloned().unwrap_or(Value::Null);
            assert_eq!(at, want, "{status}");
            assert_eq!(status["audit"]["seq"], 3, "{status}");
        }
    }
}

#[test]
fn a_new_journal_beside_the_files_goes_on_with_their_chain() {
    let mut s = setup("[audit]\nlog = true\n");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    let r = control.run_module(&s.id, &hello, json!({}), Some("before"));
    assert_eq!(r["result"]["status"], "ok", "{r}");
    let st = state(&s);
    wait_records(&st, 1);
    s.agent.terminate();
    std::fs::remove_file(st.join("journal.redb")).unwrap();
    s.restart_agent(false);
    let r = control.run_module(&s.id, &hello, json!({}), Some("after"));
    assert_eq!(r["result"]["status"], "ok", "{r}");
    let recs = wait_records(&st, 2);
    assert_eq!(recs[1]["task_id"], "after");
    let (code, out) = audit(&st, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("2 records, seq 1..2"), "{out}");
    // `[audit] log = true`: each record is in the log too, as written.
    let last = std::fs::read_to_string(audit_files(&st).pop().unwrap()).unwrap();
    let line = last.lines().last().unwrap().to_string();
    s.agent.log.wait_for(&line, WITHIN);
}
