//! Runs the real `bridgectl serve` and talks to it as an agent would: TLS with a self-signed
//! client certificate, the server pinned by the printed pin, WebSocket at /agent.
//! (Tasks across reconnections, stored results, streaming, cancel and handlers: `tasks.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use bridge_protocol::identity::spki_fingerprint;
use bridge_protocol::{MAX_DEPTH, MAX_TEXT_BYTES};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use bridge_testkit::Platform;
use common::*;

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread")]
async fn first_line_names_url_pin_token_control_and_ca_file() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let serve = Platform::start(&state);
        let info = serve.info.as_object().unwrap();
        let mut keys: Vec<&str> = info.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "ca_file",
                "control",
                "install_command",
                "server_pin",
                "token",
                "url"
            ]
        );
        let url = serve.url();
        assert!(
            url.starts_with("wss://127.0.0.1:") && url.ends_with("/agent"),
            "{url}"
        );
        assert!(!url.contains(":0/"), "the actual port: {url}");
        let pin = serve.pin();
        assert_eq!(pin.len(), 64);
        assert!(pin
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(serve.token().len(), 43);
        assert_eq!(
            Path::new(serve.control_socket()),
            state.canonicalize().unwrap().join("control.sock")
        );
        let ca = PathBuf::from(info["ca_file"].as_str().unwrap());
        assert!(ca.is_absolute());
        assert_eq!(ca, state.canonicalize().unwrap().join("server.crt"));
        assert!(std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("control.sock")), 0o600);
        assert_eq!(mode(&state.join("server.key")), 0o600);
        assert_eq!(mode(&state.join("tokens.json")), 0o600);
        let hint = serve.log().text();
        assert!(
            hint.contains(&format!(
                "bridge-daemon run --server {url} --token {} --server-pin {pin} --state",
                serve.token()
            )),
            "{hint}"
        );
        // The pin is the certificate's key fingerprint.
        let der = CertificateDer::from_pem_file(&ca).unwrap();
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        assert_eq!(
            spki_fingerprint(cert.subject_public_key_info().as_ref()),
            pin
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_enrolls_once_and_the_key_reconnects_without_it() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();

        let (mut ws, enrolled) = session(&serve, &agent, Some(&serve.token())).await;
        assert!(enrolled, "the first connection with a token enrolls");
        ws.close(None).await.unwrap();

        let (mut ws, enrolled) = session(&serve, &agent, None).await;
        assert!(!enrolled, "a known key needs no token");
        // Presenting the (now used) token again is harmless for the agent it enrolled.
        let (ws2, enrolled) = session(&serve, &agent, Some(&serve.token())).await;
        assert!(!enrolled);
        // ...and the second connection replaced the first.
        assert_eq!(expect_close(&mut ws).await, 4000);
        drop(ws2);

        let listed = serve.control().listed(&agent.id);
        assert!(listed["enrolled_at"].as_str().unwrap().ends_with('Z'));
        let agents: Value = serde_json::from_str(
            std::fs::read_to_string(dir.path().join("state/agents.json"))
                .unwrap()
                .as_str(),
        )
        .unwrap();
        assert_eq!(agents["agents"][0]["id"], agent.id.as_str());
        let tokens = std::fs::read_to_string(dir.path().join("state/tokens.json")).unwrap();
        assert!(!tokens.contains(&serve.token()), "only hashes are stored");
        assert!(tokens.contains(&agent.id), "the token records who used it");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_agents_without_a_good_token_are_refused_with_401() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let (first, second) = (Identity::new(), Identity::new());
        assert_refused(
            connect(&serve, &first, None).await,
            401,
            Some("token_missing"),
        );
        assert_refused(
            connect(
                &serve,
                &first,
                Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            )
            .await,
            401,
            Some("token_invalid"),
        );
        let (_ws, enrolled) = session(&serve, &first, Some(&serve.token())).await;
        assert!(enrolled);
        // The token is spent: another key cannot use it.
        assert_refused(
            connect(&serve, &second, Some(&serve.token())).await,
            401,
            Some("token_used"),
        );
        assert_refused(
            connect(&serve, &second, None).await,
            401,
            Some("token_missing"),
        );
        // A fresh token from the control interface works for the second key, once.
        let response = serve.control().request_async(r#"{"cmd":"token"}"#).await;
        assert_eq!(response["ok"], true);
        let token = response["token"].as_str().unwrap().to_string();
        let (_ws2, enrolled) = session(&serve, &second, Some(&token)).await;
        assert!(enrolled);
        assert_refused(
            connect(&serve, &Identity::new(), Some(&token)).await,
            401,
            Some("token_used"),
        );
        // Only /agent upgrades.
        assert_refused(
            connect_path(&serve, &first, None, "/other").await,
            404,
            None,
        );
        assert_eq!(serve.control().agents().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_are_refused() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::builder(&dir.path().join("state"))
            .args(&["--token-ttl-secs", "1"])
            .start();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_refused(
            connect(&serve, &Identity::new(), Some(&serve.token())).await,
            401,
            Some("token_expired"),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_without_a_common_version_gets_an_error_and_a_close() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let mut ws = connect(&serve, &agent, Some(&serve.token())).await.unwrap();
        // Anything before hello is answered with an error; the connection waits for hello.
        send(&mut ws, status(&agent, "early")).await;
        let reply = recv(&mut ws).await;
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["code"], "unexpected");
        send(
            &mut ws,
            json!({"type": "hello", "versions": [3, 99], "agent_id": agent.id, "agent_version": "9"}),
        )
        .await;
        let reply = recv(&mut ws).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "unsupported_version");
        assert_eq!(expect_close(&mut ws).await, 1008);
        assert_eq!(serve.control().listed(&agent.id)["connected"], false);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_errors_and_the_connection_survives() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;

        let oversize = format!(r#"{{"type":"status","pad":"{}"}}"#, "x".repeat(MAX_TEXT_BYTES));
        let too_deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let cases: Vec<(String, &str)> = vec![
            ("this is not json".into(), "malformed"),
            (r#"{"no_type": 1}"#.into(), "malformed"),
            (r#"{"type":"status","agent_id":"x"}"#.into(), "malformed"),
            (r#"{"type":"launch_missiles","id":"m-1"}"#.into(), "unknown_type"),
            (oversize, "oversize"),
            (too_deep, "too_deep"),
            (
                json!({"type": "hello", "versions": [2, 1], "agent_id": agent.id, "agent_version": "x"}).to_string(),
                "unexpected",
            ),
        ];
        for (text, code) in cases {
            timeout(STEP, ws.send(Message::Text(text.into())))
                .await
                .unwrap()
                .unwrap();
            let reply = recv(&mut ws).await;
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["code"], code, "{reply}");
            assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // The id of an unknown message is echoed.
        send(&mut ws, json!({"type": "nope", "id": "m-7"})).await;
        assert_eq!(recv(&mut ws).await["id"], "m-7");
        // Binary frames are not expected from agents.
        timeout(STEP, ws.send(Message::Binary(vec![1, 2, 3].into())))
            .await
            .unwrap()
            .unwrap();
        let reply = recv(&mut ws).await;
        assert_eq!(reply["code"], "binary_not_expected");
        // A module nobody uploaded.
        send(&mut ws, json!({"type": "need_module", "id": "run-x", "file_sha256": "00".repeat(32)})).await;
        let reply = recv(&mut ws).await;
        assert_eq!(reply["code"], "unexpected");
        assert_eq!(reply["id"], "run-x");
        // Pings are answered.
        timeout(STEP, ws.send(Message::Ping(b"hb".to_vec().into())))
            .await
            .unwrap()
            .unwrap();
        let pong = timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(pong, Message::Pong(b"hb".to_vec().into()));

        // Still alive: a status goes through and is listed.
        send(&mut ws, status(&agent, "survivor")).await;
        let mut listed = Value::Null;
        for _ in 0..100 {
            listed = serve.control().listed(&agent.id);
            if !listed["status"].is_null() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(listed["connected"], true);
        assert_eq!(listed["status"]["host"]["hostname"], "survivor");
        assert_eq!(listed["status"]["agent_id"], agent.id.as_str());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_lists_connection_state_and_status() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        assert!(serve.control().agents().is_empty());
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        send(&mut ws, status(&agent, "box-1")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Through the real client, with the address from the environment.
        let out = tokio::process::Command::new(BIN)
            .arg("agents")
            .env("BRIDGE_CONTROL", serve.control_socket())
            .output();
        let out = timeout(STEP, out).await.unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 1);
        let a = &listed[0];
        assert_eq!(a["id"], agent.id.as_str());
        assert_eq!(a["connected"], true);
        assert_eq!(a["status"]["host"]["hostname"], "box-1");
        for field in ["enrolled_at", "last_seen"] {
            assert!(a[field].as_str().unwrap().ends_with('Z'), "{a}");
        }

        ws.close(None).await.unwrap();
        for _ in 0..100 {
            if serve.control().listed(&agent.id)["connected"] == false {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let a = serve.control().listed(&agent.id);
        assert_eq!(a["connected"], false);
        assert_eq!(
            a["status"]["host"]["hostname"], "box-1",
            "the latest status is kept"
        );

        // Control errors.
        let r = serve.control().request_async("not json").await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("bad request"));
        let r = serve.control().request_async(r#"{"cmd":"reboot"}"#).await;
        assert_eq!(r["ok"], false);
        // Without a control socket the clients fail with status 2.
        let out = Command::new(BIN)
            .arg("agents")
            .env_remove("BRIDGE_CONTROL")
            .env_remove("BRIDGE_STATE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--control"));
    })
    .await;
}

/// Plays the agent's side of one run: receives `run`, asks for the module, checks the bytes,
/// answers `result` with `status` and expects its `ack`. Returns the `run` message.
async fn serve_one_run(ws: &mut Ws, module: &[u8], status: &str, exit_code: i32) -> Value {
    let run = recv(ws).await;
    assert_eq!(run["type"], "run", "{run}");
    let sha = hex::encode(sha2::Sha256::digest(module));
    assert_eq!(run["file_sha256"], sha.as_str());
    send(
        ws,
        json!({"type": "need_module", "id": run["id"], "file_sha256": sha}),
    )
    .await;
    match next_frame(ws).await {
        Message::Binary(bytes) => assert_eq!(&bytes[..], module, "the exact module bytes"),
        other => panic!("expected the module as a binary frame, got {other:?}"),
    }
    send(
        ws,
        json!({"type": "result", "id": run["id"], "task_id": run["task_id"], "result": run_result(status, exit_code)}),
    )
    .await;
    expect_ack(ws, run["task_id"].as_str().unwrap()).await;
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn run_sends_the_task_serves_the_module_and_prints_the_result() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        let module: Vec<u8> = b"\0asm\x01\0\0\0"
            .iter()
            .copied()
            .chain((0..100_000u32).map(|i| (i % 251) as u8))
            .collect();
        let module_path = dir.path().join("hello.wasm");
        std::fs::write(&module_path, &module).unwrap();
        let sig_path = dir.path().join("hello.wasm.sig");
        std::fs::write(&sig_path, b"\x01signature-envelope").unwrap();
        let input_path = dir.path().join("input.json");
        std::fs::write(&input_path, r#"{"name":"Ada"}"#).unwrap();

        // status ok => exit 0, the result printed.
        let child = tokio::process::Command::new(BIN)
            .args([
                "--control",
                serve.control_socket().to_str().unwrap(),
                "run",
                "--agent",
                &agent.id,
                "--module",
            ])
            .arg(&module_path)
            .arg(format!("--input=@{}", input_path.display()))
            .args([
                "--arg=--loud",
                "--arg",
                "x y",
                "--task-id",
                "task-42",
                "--fuel",
                "5000",
            ])
            .arg("--signature")
            .arg(&sig_path)
            .output();
        let child = tokio::spawn(child);
        let run = serve_one_run(&mut ws, &module, "ok", 0).await;
        assert_eq!(run["task_id"], "task-42");
        assert_eq!(run["input"], json!({"name": "Ada"}));
        assert_eq!(run["args"], json!(["--loud", "x y"]));
        assert_eq!(run["limits"], json!({"fuel": 5000}));
        assert_eq!(
            run["signature"],
            base64::engine::general_purpose::STANDARD.encode(b"\x01signature-envelope")
        );
        let out = timeout(STEP, child).await.unwrap().unwrap().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.lines().count(), 1);
        let printed: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(printed, run_result("ok", 0));

        // Another status => exit 1, still printed. The agent already has the module now but
        // may ask again; the default task id is a fresh UUID.
        let child = tokio::spawn(
            tokio::process::Command::new(BIN)
                .args([
                    "--control",
                    serve.control_socket().to_str().unwrap(),
                    "run",
                    "--agent",
                    &agent.id,
                    "--module",
                ])
                .arg(&module_path)
                .output(),
        );
        let run = serve_one_run(&mut ws, &module, "error", 3).await;
        assert_eq!(run["task_id"].as_str().unwrap().len(), 36);
        assert!(run["input"].is_null());
        let out = timeout(STEP, child).await.unwrap().unwrap().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["status"], "error");
        assert_eq!(printed["exit_code"], 3);

        // No result: exit 2 with one line on stderr.
        let out = Command::new(BIN)
            .args([
                "--control",
                serve.control_socket().to_str().unwrap(),
                "run",
                "--agent",
                &"0".repeat(64),
                "--module",
            ])
            .arg(&module_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("unknown agent"), "{err}");
        assert_eq!(err.lines().count(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_end_on_timeout_and_on_agent_errors() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let module = base64::engine::general_purpose::STANDARD.encode(b"\0asm\x01\0\0\0");
        // `timeout_ms` is the older name of `wait_ms`; callers still use it.
        let run = |timeout_ms: u64| {
            json!({"cmd": "run", "agent": agent.id, "module": module, "timeout_ms": timeout_ms}).to_string()
        };

        // Enrolled but not connected.
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        ws.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = serve.control().request_async(&run(5000)).await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("not connected"), "{r}");

        // Timeout.
        let (mut ws, _) = session(&serve, &agent, None).await;
        let r = serve.control().request_async(&run(300)).await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("timeout"), "{r}");
        assert_eq!(recv(&mut ws).await["type"], "run");

        // The agent refuses the run with an error naming it.
        let waiting = serve.control().background(&serde_json::from_str(&run(10_000)).unwrap());
        let run_msg = recv(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "error", "id": run_msg["id"], "code": "module_mismatch", "message": "bytes do not match"}),
        )
        .await;
        let r = response_of(waiting).await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("module_mismatch"), "{r}");

        // (A connection that goes away does not end a run: see tasks.rs.)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_pin_and_the_enrolled_agents() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let agent = Identity::new();
        let mut serve = Platform::start(&state);
        let pin = serve.pin().to_string();
        let first_token = serve.token().to_string();
        let (ws, enrolled) = session(&serve, &agent, Some(&serve.token())).await;
        assert!(enrolled);
        drop(ws);
        let status = serve.terminate();
        assert_eq!(status.code(), Some(0));
        drop(serve);

        let serve = Platform::start(&state);
        assert_eq!(serve.pin(), pin, "same key, same pin");
        assert_ne!(serve.token(), first_token, "a fresh token at each start");
        let listed = serve.control().listed(&agent.id);
        assert_eq!(listed["connected"], false);
        assert!(listed["status"].is_null());
        let (_ws, enrolled) = session(&serve, &agent, None).await;
        assert!(!enrolled, "still enrolled after the restart");
        assert_eq!(serve.control().listed(&agent.id)["connected"], true);
        // The old token stays spent.
        assert_refused(
            connect(&serve, &Identity::new(), Some(&first_token)).await,
            401,
            Some("token_used"),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_connections_and_exits_0_promptly() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let mut serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        // A control connection that stays open must not hold the shutdown up either.
        let _idle_control = tokio::net::UnixStream::connect(serve.control_socket())
            .await
            .unwrap();
        let closer = tokio::spawn(async move { expect_close(&mut ws).await });
        let started = std::time::Instant::now();
        let status = tokio::task::block_in_place(|| serve.terminate());
        let took = started.elapsed();
        assert_eq!(status.code(), Some(0), "{}", serve.log().text());
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(timeout(STEP, closer).await.unwrap().unwrap(), 1001);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_hello_is_closed_after_10_s() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let mut ws = connect(&serve, &agent, Some(&serve.token())).await.unwrap();
        let started = std::time::Instant::now();
        let frame = timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("closed within 20 s")
            .unwrap()
            .unwrap();
        match frame {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1008),
            other => panic!("expected a close frame, got {other:?}"),
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(15),
            "{took:?}"
        );
        // Enrolled by the upgrade, but never connected as a session.
        assert_eq!(serve.control().listed(&agent.id)["connected"], false);
    })
    .await;
}

/// A `rejected` result in version-1 shape, with `error` as a version-1 agent wrote it.
fn v1_refusal(reason: &str, error: &str) -> Value {
    json!({
        "status": "rejected", "exit_code": null, "output": null, "stdout": "", "stderr": "",
        "truncated": {"stdout": false, "stderr": false, "stdout_total_bytes": 0, "stderr_total_bytes": 0},
        "fuel_consumed": null, "memory_peak_bytes": 0, "duration_ms": 0.0, "limits": null,
        "error": error, "reason": reason
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_offering_only_version_1_is_served_in_version_1() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let mut ws = connect(&serve, &agent, Some(&serve.token())).await.unwrap();
        send(
            &mut ws,
            json!({"type": "hello", "versions": [1], "agent_id": agent.id, "agent_version": "0.0.9"}),
        )
        .await;
        let welcome = recv(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["version"], 1);

        // A module run: the version-1 names both ways; stored and answered in version 2.
        let module = b"\0asm\x01\0\0\0 a version-1 module".to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&module));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&module);
        let waiting = serve.control().background(
            &json!({"cmd": "run", "agent": agent.id, "module": b64, "task_id": "v1-module"}),
        );
        let run = recv(&mut ws).await;
        assert_eq!(run["type"], "run", "{run}");
        assert_eq!(run["module_sha256"], sha.as_str(), "{run}");
        assert!(run.get("file_sha256").is_none(), "{run}");
        send(
            &mut ws,
            json!({"type": "need_module", "id": run["id"], "sha256": sha}),
        )
        .await;
        match next_frame(&mut ws).await {
            Message::Binary(bytes) => assert_eq!(&bytes[..], &module[..]),
            other => panic!("expected the module, got {other:?}"),
        }
        let mut result = run_result("ok", 0);
        let hash = result.as_object_mut().unwrap().remove("file_sha256").unwrap();
        result["module_sha256"] = hash.clone();
        send(
            &mut ws,
            json!({"type": "result", "id": run["id"], "task_id": "v1-module", "result": result}),
        )
        .await;
        expect_ack(&mut ws, "v1-module").await;
        let response = response_of(waiting).await;
        assert_eq!(response["ok"], true, "{response}");
        assert_eq!(response["result"], run_result("ok", 0), "{response}");
        let stored = serve
            .control()
            .request_async(&json!({"cmd": "result", "task_id": "v1-module"}).to_string())
            .await;
        assert_eq!(stored["result"]["file_sha256"], hash, "{stored}");

        // `expired` is a task's deadline (not recorded: not stored) or a signature's expiry
        // (recorded), told apart in version 1 by the text a version-1 agent gave.
        for (task, error, reason, kept) in [
            (
                "v1-late",
                "the task's not_after (2020-01-01T00:00:00Z) passed before it could start; it was not run",
                "deadline_passed",
                false,
            ),
            (
                "v1-old-signature",
                "the signature expired at unix time 5",
                "expired",
                true,
            ),
        ] {
            let waiting = serve.control().background(
                &json!({"cmd": "run", "agent": agent.id, "command": "x", "task_id": task}),
            );
            let run = recv(&mut ws).await;
            send(
                &mut ws,
                json!({"type": "result", "id": run["id"], "task_id": task, "result": v1_refusal("expired", error)}),
            )
            .await;
            expect_ack(&mut ws, task).await;
            let response = response_of(waiting).await;
            assert_eq!(response["result"]["reason"], reason, "{response}");
            let stored = serve
                .control()
                .request_async(&json!({"cmd": "result", "task_id": task}).to_string())
                .await;
            assert_eq!(stored["ok"], kept, "{task}: {stored}");
        }

        // A handler install: the control interface's old name still works; the agent hears
        // `module_sha256`, and its version-1 list (no code hash) comes back in version 2.
        let waiting = serve.control().background(&json!({
            "cmd": "install_handler", "agent": agent.id, "name": "hello", "module_sha256": sha
        }));
        let install = recv(&mut ws).await;
        assert_eq!(install["type"], "install_handler", "{install}");
        assert_eq!(install["module_sha256"], sha.as_str(), "{install}");
        assert!(install.get("file_sha256").is_none(), "{install}");
        send(
            &mut ws,
            json!({"type": "handlers", "id": install["id"], "handlers": [
                {"name": "hello", "module_sha256": sha, "installed_at": "2025-11-25T05:53:20Z", "key": "8f2c0a7e".repeat(4)}
            ]}),
        )
        .await;
        let response = response_of(waiting).await;
        assert_eq!(
            response["handlers"],
            json!([{"name": "hello", "file_sha256": sha, "installed_at": "2025-11-25T05:53:20Z", "key": "8f2c0a7e".repeat(4)}]),
            "{response}"
        );
    })
    .await;
}
