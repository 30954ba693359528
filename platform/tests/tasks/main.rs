//! The task life cycle against the real `bridgectl serve`, with a scripted agent: results stored
//! by task id and acknowledged, runs that wait across reconnections and are resent until the
//! agent accepts them, streamed output, refusals; the requests matched by message id (`cancel`,
//! the handler commands) and those refused before reaching the agent are in `requests.rs`.

#[path = "../common/mod.rs"]
mod common;
mod requests;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::Message;

use bridge_testkit::Platform;
use common::*;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Waits until the server lists the agent as disconnected.
async fn until_disconnected(serve: &Platform, id: &str) {
    let id = id.to_string();
    serve
        .control()
        .off_thread(move |c| c.wait_disconnected(&id))
        .await;
}

/// Returns once the server has processed everything sent on `ws` so far: sends a `status`
/// with a fresh host name (messages are processed in order) and waits until it is listed.
async fn processed(serve: &Platform, ws: &mut Ws, agent: &Identity) {
    static SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let marker = format!("sync-{}-{n}", std::process::id());
    send(ws, status(agent, &marker)).await;
    let id = agent.id.clone();
    serve
        .control()
        .off_thread(move |c| {
            c.wait_agent(&id, &format!("status from host {marker}"), STEP, |a| {
                a["status"]["host"]["hostname"] == marker.as_str()
            })
        })
        .await;
}

fn result_message(run: &Value, result: Value) -> Value {
    json!({"type": "result", "id": run["id"], "task_id": run["task_id"], "result": result})
}

fn accepted(run: &Value, state: &str) -> Value {
    json!({"type": "accepted", "id": run["id"], "task_id": run["task_id"], "state": state})
}

fn stdout_json(out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "stdout is not one JSON value: {text:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn results_are_stored_once_acknowledged_every_time_and_survive_a_restart() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut serve = Platform::start(&state);
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;

        // A command task, with every new field.
        let waiting = serve.control().background(&json!({
            "cmd": "run", "agent": agent.id, "command": "uptime", "args": ["-p"],
            "task_id": "task-1", "not_after": "2999-01-01T01:00:00+01:00",
            "idempotent": true, "limits": {"timeout_ms": 5000}
        }));
        let run = recv(&mut ws).await;
        assert_eq!(run["type"], "run", "{run}");
        assert_eq!(run["command"], "uptime");
        assert!(run.get("file_sha256").is_none(), "{run}");
        assert_eq!(run["task_id"], "task-1");
        assert_eq!(run["args"], json!(["-p"]));
        assert_eq!(run["not_after"], "2999-01-01T00:00:00Z", "sent in UTC");
        assert_eq!(run["idempotent"], true);
        assert!(run.get("stream").is_none(), "{run}");
        assert_eq!(run["limits"], json!({"timeout_ms": 5000}));
        send(&mut ws, accepted(&run, "running")).await;
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-1").await;
        let response = response_of(waiting).await;
        assert_eq!(response["ok"], true, "{response}");
        assert_eq!(response["task_id"], "task-1");
        assert_eq!(response["result"], run_result("ok", 0));
        assert_eq!(response["stored"], false, "the agent ran it");

        // Delivered again (the agent resends its outbox after a reconnect, e.g. when the ack
        // was lost): acknowledged again, stored once, the first one wins.
        send(&mut ws, result_message(&run, run_result("error", 1))).await;
        expect_ack(&mut ws, "task-1").await;
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-1"}"#)
            .await;
        assert_eq!(stored["ok"], true, "{stored}");
        assert_eq!(stored["task_id"], "task-1");
        assert_eq!(stored["agent"], agent.id.as_str());
        assert_eq!(stored["result"], run_result("ok", 0));
        assert_eq!(stored["deliveries"], 2);
        assert!(stored["received_at"].as_str().unwrap().ends_with('Z'));
        // On disk: the append-only log, private, one line per delivery.
        let log = state.join("results.jsonl");
        assert_eq!(mode(&log), 0o600);
        let lines: Vec<Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["stored"]["task_id"], "task-1");
        assert_eq!(lines[0]["stored"]["deliveries"], 1);
        assert_eq!(lines[1]["delivered"], "task-1");

        // A repeated run of the task id is answered with the stored result at once: nothing
        // reaches the agent (which may have forgotten the task id by now), nothing runs twice.
        let response = serve
            .control()
            .request_async(
                &json!({"cmd": "run", "agent": agent.id, "command": "uptime", "task_id": "task-1"})
                    .to_string(),
            )
            .await;
        assert_eq!(response["ok"], true, "{response}");
        assert_eq!(response["stored"], true, "{response}");
        assert_eq!(response["task_id"], "task-1");
        assert_eq!(response["result"], run_result("ok", 0));
        let out = output_of(bridgectl(
            &serve,
            &[
                "run",
                "--agent",
                &agent.id,
                "--command",
                "uptime",
                "--task-id",
                "task-1",
            ],
        ))
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout_json(&out), run_result("ok", 0));
        expect_silence(&mut ws, Duration::from_millis(300)).await;

        // `result` waits for a result not stored yet; an agent crash shows as `interrupted`.
        let late = serve
            .control()
            .background(&json!({"cmd": "result", "task_id": "task-late", "wait_ms": 8000}));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut interrupted = run_result("interrupted", 0);
        interrupted["exit_code"] = Value::Null;
        interrupted["output"] = Value::Null;
        let old_run = json!({"id": "run-0123456789abcdef", "task_id": "task-late"});
        send(&mut ws, result_message(&old_run, interrupted.clone())).await;
        expect_ack(&mut ws, "task-late").await;
        let response = response_of(late).await;
        assert_eq!(response["ok"], true, "{response}");
        assert_eq!(response["result"], interrupted);
        assert_eq!(response["deliveries"], 1);

        // From the command line: exit 0 for ok, 1 for another status, 2 for no result.
        let out = output_of(bridgectl(&serve, &["result", "--task-id", "task-1"])).await;
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout_json(&out), run_result("ok", 0));
        let out = output_of(bridgectl(&serve, &["result", "--task-id", "task-late"])).await;
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stdout_json(&out)["status"], "interrupted");
        let out = output_of(bridgectl(
            &serve,
            &["result", "--task-id", "nope", "--wait-ms", "200"],
        ))
        .await;
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no result for task nope"), "{err}");
        assert_eq!(err.lines().count(), 1);

        // After a restart on the same state directory.
        drop(ws);
        let status = serve.terminate();
        assert_eq!(status.code(), Some(0));
        drop(serve);
        let serve = Platform::start(&state);
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-1"}"#)
            .await;
        assert_eq!(stored["result"], run_result("ok", 0), "{stored}");
        assert_eq!(stored["deliveries"], 2);
        let out = output_of(bridgectl(&serve, &["result", "--task-id", "task-1"])).await;
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout_json(&out), run_result("ok", 0));
        // The agent comes back and resends what it has not seen acknowledged.
        let (mut ws, _) = session(&serve, &agent, None).await;
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-1").await;
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-1"}"#)
            .await;
        assert_eq!(stored["deliveries"], 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_across_reconnections_and_is_resent_until_accepted() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        let run_request = |task: &str| {
            json!({"cmd": "run", "agent": agent.id, "command": "slow", "task_id": task, "wait_ms": 30000})
        };

        // Two runs dispatched; the connection drops before the agent accepts either.
        let first = serve.control().background(&run_request("task-a"));
        let run_a = recv(&mut ws).await;
        let second = serve.control().background(&run_request("task-b"));
        let run_b = recv(&mut ws).await;
        assert_eq!(run_a["task_id"], "task-a");
        assert_eq!(run_b["task_id"], "task-b");
        drop(ws);
        until_disconnected(&serve, &agent.id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!first.is_finished(), "a lost connection does not end a run");
        assert!(!second.is_finished());

        // The next connection gets both again, unchanged, in order, right after welcome.
        let (mut ws, _) = session(&serve, &agent, None).await;
        assert_eq!(recv(&mut ws).await, run_a);
        assert_eq!(recv(&mut ws).await, run_b);
        // task-a is accepted on this connection, task-b is not.
        send(&mut ws, accepted(&run_a, "queued")).await;
        processed(&serve, &mut ws, &agent).await;
        drop(ws);
        until_disconnected(&serve, &agent.id).await;

        // Only the unaccepted one is resent.
        let (mut ws, _) = session(&serve, &agent, None).await;
        assert_eq!(recv(&mut ws).await, run_b);
        send(&mut ws, accepted(&run_b, "running")).await;
        expect_silence(&mut ws, Duration::from_millis(500)).await;

        // The results arrive on this connection (task-a's from the agent's outbox, answering
        // the run sent on an earlier connection) and end both waits.
        send(&mut ws, result_message(&run_a, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-a").await;
        send(&mut ws, result_message(&run_b, run_result("error", 2))).await;
        expect_ack(&mut ws, "task-b").await;
        let a = response_of(first).await;
        assert_eq!(a["ok"], true, "{a}");
        assert_eq!(a["task_id"], "task-a");
        assert_eq!(a["result"], run_result("ok", 0));
        let b = response_of(second).await;
        assert_eq!(b["result"]["status"], "error", "{b}");

        // Finished runs are not resent.
        drop(ws);
        until_disconnected(&serve, &agent.id).await;
        let (mut ws, _) = session(&serve, &agent, None).await;
        expect_silence(&mut ws, Duration::from_millis(500)).await;

        // The wait still ends at its timeout when no result comes.
        let r = serve
            .control().request_async(
                &json!({"cmd": "run", "agent": agent.id, "command": "slow", "wait_ms": 300})
                    .to_string(),
            )
            .await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("timeout"), "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_interface_says_where_a_task_is() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        let task = |id: &str| json!({"cmd": "task", "task_id": id}).to_string();
        let control = serve.control();
        let unknown = control.request_async(&task("task-w")).await;
        assert_eq!(
            (
                unknown["ok"].clone(),
                unknown["agent"].clone(),
                unknown["state"].clone()
            ),
            (json!(true), Value::Null, Value::Null),
            "{unknown}"
        );
        let waiting = control.background(
            &json!({"cmd": "run", "agent": agent.id, "command": "slow", "task_id": "task-w"}),
        );
        let run = recv(&mut ws).await;
        let sent = control.request_async(&task("task-w")).await;
        assert_eq!(sent["agent"], agent.id.as_str(), "{sent}");
        assert_eq!(sent["state"], Value::Null, "not acknowledged yet: {sent}");
        for state in ["queued", "running"] {
            send(&mut ws, accepted(&run, state)).await;
            processed(&serve, &mut ws, &agent).await;
            let seen = control.request_async(&task("task-w")).await;
            assert_eq!(seen["state"], state, "{seen}");
            assert_eq!(seen["result_stored"], false);
        }
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-w").await;
        assert_eq!(response_of(waiting).await["ok"], true);
        let done = control.request_async(&task("task-w")).await;
        assert_eq!(done["result_stored"], true, "{done}");
        assert_eq!(done["state"], Value::Null, "no run in flight: {done}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_are_forwarded_in_order_before_the_response() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;

        // Through the control interface.
        let waiting = serve.control().background(&json!({"cmd": "run", "agent": agent.id, "command": "tail", "task_id": "task-s", "stream": true}),
        );
        let run = recv(&mut ws).await;
        assert_eq!(run["stream"], true, "{run}");
        send(&mut ws, accepted(&run, "running")).await;
        for seq in 0..5u64 {
            let stream = if seq % 2 == 0 { "stdout" } else { "stderr" };
            let mut chunk = json!({"type": "chunk", "task_id": "task-s", "seq": seq, "stream": stream, "data": format!("line {seq}\n")});
            if seq == 3 {
                chunk["dropped_bytes"] = json!(4096);
            }
            send(&mut ws, chunk).await;
        }
        // Nobody streams this one: ignored.
        send(
            &mut ws,
            json!({"type": "chunk", "task_id": "task-other", "seq": 0, "stream": "stdout", "data": "x"}),
        )
        .await;
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-s").await;
        let lines = timeout_lines(waiting).await;
        assert_eq!(lines.len(), 6, "{lines:?}");
        for (seq, event) in lines[..5].iter().enumerate() {
            let expected = json!({
                "event": "chunk",
                "task_id": "task-s",
                "seq": seq,
                "stream": if seq % 2 == 0 { "stdout" } else { "stderr" },
                "data": format!("line {seq}\n"),
                "dropped_bytes": if seq == 3 { 4096 } else { 0 },
            });
            assert_eq!(event, &expected);
        }
        assert_eq!(lines[5]["ok"], true);
        assert_eq!(lines[5]["result"], run_result("ok", 0));

        // A run that did not ask to stream gets no event lines, whatever the agent sends.
        let waiting = serve.control().background(&json!({"cmd": "run", "agent": agent.id, "command": "tail", "task_id": "task-q"}),
        );
        let run = recv(&mut ws).await;
        assert!(run.get("stream").is_none());
        send(
            &mut ws,
            json!({"type": "chunk", "task_id": "task-q", "seq": 0, "stream": "stdout", "data": "x"}),
        )
        .await;
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-q").await;
        let lines = timeout_lines(waiting).await;
        assert_eq!(lines.len(), 1, "{lines:?}");

        // From the command line: one JSON line per chunk, then the result.
        let child = bridgectl(
            &serve,
            &["run", "--agent", &agent.id, "--command", "tail", "--stream", "--task-id", "task-c"],
        );
        let run = recv(&mut ws).await;
        assert_eq!(run["stream"], true);
        for seq in 0..2u64 {
            send(
                &mut ws,
                json!({"type": "chunk", "task_id": "task-c", "seq": seq, "stream": "stdout", "data": format!("{seq}")}),
            )
            .await;
        }
        send(&mut ws, result_message(&run, run_result("error", 3))).await;
        expect_ack(&mut ws, "task-c").await;
        let out = output_of(child).await;
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let printed: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(printed.len(), 3, "{stdout}");
        assert_eq!(printed[0]["event"], "chunk");
        assert_eq!(printed[0]["data"], "0");
        assert_eq!(printed[1]["seq"], 1);
        assert_eq!(printed[2], run_result("error", 3));
    })
    .await;
}

/// Every line of a background control request, within 10 s.
async fn timeout_lines(handle: tokio::task::JoinHandle<Vec<Value>>) -> Vec<Value> {
    tokio::time::timeout(STEP, handle)
        .await
        .expect("no control response within 10 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_results_is_acknowledged_while_the_agent_is_not_reading() {
    // At connection start an agent may send thousands of results from its outbox back to back
    // before it reads anything. The platform must keep reading them (its acknowledgements wait,
    // coalesced, until the agent reads), or both sides end up blocked writing.
    within(120, async {
        const RESULTS: usize = 5000;
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        // A small receive buffer (64 KiB; the acks below are over a hundred times more): the
        // platform's acknowledgements fill it quickly. Not smaller: with 4 KiB, this test's own
        // client (tokio-tungstenite over rustls) stalled about once in 25 runs with bytes unread
        // in its socket while the platform waited to send (seen with `ss`).
        let mut ws = connect_with(&serve, &agent, Some(&serve.token()), "/agent", Some(65536))
            .await
            .expect("upgrade refused");
        assert_eq!(hello(&mut ws, &agent).await["type"], "welcome");
        // Long acknowledgements: task ids of 256 bytes, most of them a character JSON escapes
        // as `\u0001`, so 5000 acks (~7.5 MiB) exceed what the kernel buffers between the two
        // ends (by default at most 4 MiB of send buffer on the platform's side).
        let task_id = |i: usize| format!("flood-{i:05}-{}", "\u{1}".repeat(244));
        let started = std::time::Instant::now();
        for i in 0..RESULTS {
            let run = json!({"id": format!("run-{i:016x}"), "task_id": task_id(i)});
            let mut result = run_result("ok", 0);
            result["stdout"] = json!("y".repeat(4096));
            let frame = Message::Text(result_message(&run, result).to_string().into());
            tokio::time::timeout(STEP, futures_util::SinkExt::send(&mut ws, frame))
                .await
                .unwrap_or_else(|_| {
                    panic!("result {i}: the platform stopped reading (it waits to write its acks)")
                })
                .unwrap();
        }
        let mut acked = std::collections::HashSet::new();
        let mut frames = 0;
        while acked.len() < RESULTS {
            let ack = match tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut ws)).await {
                Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Value>(&text).unwrap(),
                other => {
                    let log = serve.log().text();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "{} of {RESULTS} results acknowledged in {frames} frames, {:?} after the \
                         flood began; then {other:?}; the platform's last log lines:\n{}",
                        acked.len(),
                        started.elapsed(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                }
            };
            assert_eq!(ack["type"], "ack", "{ack}");
            frames += 1;
            for id in ack["task_ids"].as_array().unwrap() {
                let id = id.as_str().unwrap().to_string();
                assert!(id.starts_with("flood-"), "{id}");
                acked.insert(id);
            }
        }
        eprintln!(
            "{RESULTS} results acknowledged in {frames} ack frames within {:?}",
            started.elapsed()
        );
        expect_silence(&mut ws, Duration::from_millis(300)).await;
        for i in [0, RESULTS / 2, RESULTS - 1] {
            let stored = serve
                .control().request_async(&json!({"cmd": "result", "task_id": task_id(i)}).to_string())
                .await;
            assert_eq!(stored["ok"], true, "{stored}");
            assert_eq!(stored["deliveries"], 1);
        }
        // The connection still works both ways.
        processed(&serve, &mut ws, &agent).await;
        let waiting = serve.control().background(&json!({"cmd": "run", "agent": agent.id, "command": "uptime", "task_id": "after-flood"}),
        );
        let run = recv(&mut ws).await;
        assert_eq!(run["task_id"], "after-flood");
        send(&mut ws, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws, "after-flood").await;
        assert_eq!(response_of(waiting).await["ok"], true);
    })
    .await;
}

/// A `rejected` result with `reason`, as the agent sends for a task it refused.
fn refusal(reason: &str) -> Value {
    json!({
        "status": "rejected", "exit_code": null, "output": null, "stdout": "", "stderr": "",
        "truncated": {"stdout": false, "stderr": false, "stdout_total_bytes": 0, "stderr_total_bytes": 0},
        "fuel_consumed": null, "memory_peak_bytes": 0, "duration_ms": 0.0, "limits": null,
        "error": format!("refused: {reason}"), "reason": reason
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_the_agent_does_not_record_end_the_run_but_are_not_the_tasks_result() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        let run_request =
            json!({"cmd": "run", "agent": agent.id, "command": "slow", "task_id": "task-r"});

        // The agent is busy: the run ends with the refusal, which is acknowledged…
        let waiting = serve.control().background(&run_request.clone());
        let first = recv(&mut ws).await;
        assert_eq!(first["task_id"], "task-r");
        send(&mut ws, result_message(&first, refusal("busy"))).await;
        expect_ack(&mut ws, "task-r").await;
        let response = response_of(waiting).await;
        assert_eq!(response["ok"], true, "{response}");
        assert_eq!(response["result"], refusal("busy"));
        assert_eq!(response["stored"], false);
        // …but not stored as the task's result: the task id is free.
        let r = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-r"}"#)
            .await;
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("no result for task task-r"),
            "{r}"
        );

        // Retried with the same task id: sent to the agent again, and this time it runs.
        let waiting = serve.control().background(&run_request.clone());
        let second = recv(&mut ws).await;
        assert_eq!(second["task_id"], "task-r");
        assert_ne!(second["id"], first["id"]);
        send(&mut ws, accepted(&second, "running")).await;
        send(&mut ws, result_message(&second, run_result("ok", 0))).await;
        expect_ack(&mut ws, "task-r").await;
        let response = response_of(waiting).await;
        assert_eq!(response["result"], run_result("ok", 0), "{response}");
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-r"}"#)
            .await;
        assert_eq!(stored["result"], run_result("ok", 0), "{stored}");
        assert_eq!(stored["deliveries"], 1);

        // A refusal arriving late (the agent's answer to the first run) changes nothing.
        send(&mut ws, result_message(&first, refusal("busy"))).await;
        expect_ack(&mut ws, "task-r").await;
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-r"}"#)
            .await;
        assert_eq!(stored["result"], run_result("ok", 0), "{stored}");
        assert_eq!(stored["deliveries"], 1);

        // Every refusal the agent does not record is treated so; one it records (the trust
        // policy's) is the task's result.
        for reason in [
            "updating",
            "storage_full",
            "storage_error",
            "unknown_command",
            "deadline_passed",
            "unsigned",
            "expired",
        ] {
            let task = format!("task-{reason}");
            let waiting = serve.control().background(
                &json!({"cmd": "run", "agent": agent.id, "command": "x", "task_id": task}),
            );
            let run = recv(&mut ws).await;
            send(&mut ws, result_message(&run, refusal(reason))).await;
            expect_ack(&mut ws, &task).await;
            let response = response_of(waiting).await;
            assert_eq!(response["result"], refusal(reason), "{response}");
            let r = serve
                .control()
                .request_async(&json!({"cmd": "result", "task_id": task}).to_string())
                .await;
            assert_eq!(
                r["ok"],
                matches!(reason, "unsigned" | "expired"),
                "{reason}: {r}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn task_ids_are_global_a_result_stays_with_the_agent_that_delivered_it() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let a = Identity::new();
        let b = Identity::new();
        let (mut ws_a, _) = session(&serve, &a, Some(&serve.token())).await;
        let token = serve.control().request_async(r#"{"cmd":"token"}"#).await;
        let (mut ws_b, _) = session(&serve, &b, token["token"].as_str()).await;

        let waiting = serve.control().background(
            &json!({"cmd": "run", "agent": a.id, "command": "uptime", "task_id": "task-g"}),
        );
        let run = recv(&mut ws_a).await;
        send(&mut ws_a, result_message(&run, run_result("ok", 0))).await;
        expect_ack(&mut ws_a, "task-g").await;
        assert_eq!(response_of(waiting).await["ok"], true);

        // B delivers a result for the same task id: acknowledged (B's outbox drains), neither
        // stored nor counted.
        let other = json!({"id": "run-00000000000000b0", "task_id": "task-g"});
        send(&mut ws_b, result_message(&other, run_result("error", 7))).await;
        expect_ack(&mut ws_b, "task-g").await;
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-g"}"#)
            .await;
        assert_eq!(stored["agent"], a.id.as_str(), "{stored}");
        assert_eq!(stored["result"], run_result("ok", 0));
        assert_eq!(stored["deliveries"], 1);
        // A warning is logged (collected from the platform's stderr a moment later).
        serve.log().wait_for("another agent", STEP);

        // Running the task id on B is refused; on A, the stored result is the answer.
        let r = serve
            .control()
            .request_async(
                &json!({"cmd": "run", "agent": b.id, "command": "uptime", "task_id": "task-g"})
                    .to_string(),
            )
            .await;
        assert_eq!(r["ok"], false, "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("task-g") && error.contains(&a.id), "{error}");
        let r = serve
            .control()
            .request_async(
                &json!({"cmd": "run", "agent": a.id, "command": "uptime", "task_id": "task-g"})
                    .to_string(),
            )
            .await;
        assert_eq!(r["stored"], true, "{r}");
        assert_eq!(r["result"], run_result("ok", 0));
        expect_silence(&mut ws_a, Duration::from_millis(300)).await;
        expect_silence(&mut ws_b, Duration::from_millis(300)).await;

        // After a restart too (the log holds A's result only).
        drop((ws_a, ws_b));
        let mut serve = serve;
        let status = serve.terminate();
        assert_eq!(status.code(), Some(0));
        let state = dir.path().join("state");
        drop(serve);
        let serve = Platform::start(&state);
        let stored = serve
            .control()
            .request_async(r#"{"cmd":"result","task_id":"task-g"}"#)
            .await;
        assert_eq!(stored["agent"], a.id.as_str(), "{stored}");
        assert_eq!(stored["deliveries"], 1);
    })
    .await;
}
