//! `bridgectl update` and `bridgectl rollout` against the real `bridgectl serve`, with a test
//! agent speaking the protocol by hand: the `update` sent, `need_release` ranges answered with
//! exactly the bytes asked for (or an error), the verdict stored before `update_ack`, the
//! platform's own refusals, and a rollout halting at its failure count.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge_signing::release::sign_manifest;
use bridge_signing::KeyPair;
use bridge_testkit::Platform;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;

/// A release: a manifest for `bytes`, version `version`, beside the binary in `dir`.
struct Release {
    manifest: PathBuf,
    text: String,
    bytes: Vec<u8>,
}

fn release(dir: &Path, version: &str) -> Release {
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let key = KeyPair::from_seed(&[9; 32]);
    let text = sign_manifest(version, "linux", std::env::consts::ARCH, &bytes, &key).unwrap();
    let binary = dir.join(format!("bridge-daemon-{version}"));
    fs::write(&binary, &bytes).unwrap();
    let manifest = dir.join(format!("bridge-daemon-{version}.manifest"));
    fs::write(&manifest, &text).unwrap();
    Release {
        manifest,
        text,
        bytes,
    }
}

/// A platform in a new directory (keep it to the end), an agent connected to it, and release 0.2.0
/// in the directory.
async fn one_agent() -> (tempfile::TempDir, Platform, Identity, Ws, Release) {
    let dir = tempfile::tempdir().unwrap();
    let serve = Platform::start(&dir.path().join("state"));
    let agent = Identity::new();
    let (ws, _) = session(&serve, &agent, Some(&serve.token())).await;
    let release = release(dir.path(), "0.2.0");
    (dir, serve, agent, ws, release)
}

/// `bridgectl update --agent AGENT --release MANIFEST`, then `extra`.
fn update_args<'a>(agent: &'a Identity, manifest: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "update",
        "--agent",
        &agent.id,
        "--release",
        manifest.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// The `update` message the agent receives.
async fn expect_update(ws: &mut Ws, release: &Release) -> String {
    let update = recv(ws).await;
    assert_eq!(update["type"], "update", "{update}");
    assert_eq!(update["manifest"], release.text.as_str());
    let id = update["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("update-"), "{id}");
    id
}

async fn need_release(ws: &mut Ws, id: &str, offset: u64, length: u64) -> Message {
    send(
        ws,
        json!({"type": "need_release", "id": id, "offset": offset, "length": length}),
    )
    .await;
    next_frame(ws).await
}

fn update_status(id: &str, state: &str, agent_version: &str, reason: Option<&str>) -> Value {
    let mut status = json!({
        "type": "update_status", "id": id, "state": state, "version": "0.2.0",
        "agent_version": agent_version,
    });
    if let Some(reason) = reason {
        status["reason"] = json!(reason);
        status["detail"] = json!(format!("{reason}, for the test"));
    }
    status
}

/// The stored record of update `id`.
fn record(serve: &Platform, id: &str) -> Value {
    let text = fs::read_to_string(serve.state.join("updates").join(format!("{id}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn stdout_json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "stdout is not JSON: {}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_is_fetched_by_ranges_and_its_verdict_stored_before_it_is_acknowledged() {
    within(60, async {
        let (_dir, serve, agent, mut ws, release) = one_agent().await;
        let cli = bridgectl(
            &serve,
            &update_args(&agent, &release.manifest, &["--drain-timeout", "5s"]),
        );
        let id = expect_update(&mut ws, &release).await;

        // Ranges: exactly the bytes asked for.
        for (offset, length) in [(0u64, 40_000u64), (40_000, 60_000), (99_999, 1)] {
            match need_release(&mut ws, &id, offset, length).await {
                Message::Binary(bytes) => assert_eq!(
                    &bytes[..],
                    &release.bytes[offset as usize..(offset + length) as usize]
                ),
                other => panic!("expected release bytes, got {other:?}"),
            }
        }
        // A range past the end, an empty one, an update id that is not this one: errors.
        for (which, offset, length, code) in [
            (id.as_str(), 99_999, 2, "unexpected"),
            (id.as_str(), 0, 0, "unexpected"),
            ("update-0000000000000000", 0, 1, "not_found"),
        ] {
            match need_release(&mut ws, which, offset, length).await {
                Message::Text(text) => {
                    let error: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(error["type"], "error", "{error}");
                    assert_eq!(error["code"], code, "{error}");
                    assert_eq!(error["id"], which, "{error}");
                }
                other => panic!("expected an error, got {other:?}"),
            }
        }

        // Staged; the agent restarts into the new version, which confirms and says so.
        send(&mut ws, update_status(&id, "staged", "0.1.0-test", None)).await;
        drop(ws);
        let (mut ws, _) = session(&serve, &agent, None).await;
        // Once staged, the release is no longer handed out.
        match need_release(&mut ws, &id, 0, 1).await {
            Message::Text(text) => assert!(text.contains("not_found"), "{text}"),
            other => panic!("expected an error, got {other:?}"),
        }
        send(&mut ws, update_status(&id, "succeeded", "0.2.0", None)).await;
        assert_eq!(recv(&mut ws).await, json!({"type": "update_ack", "id": id}));
        let out = output_of(cli).await;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let printed = stdout_json(&out);
        assert_eq!(printed["id"], id.as_str());
        assert_eq!(printed["agent"], agent.id.as_str());
        assert_eq!(printed["version"], "0.2.0");
        assert_eq!(printed["state"], "succeeded");
        assert_eq!(printed["staged"], true);
        assert_eq!(printed["agent_version"], "0.2.0");

        // Stored; a verdict repeated after a reconnect is acknowledged again, stored once.
        let stored = record(&serve, &id);
        assert_eq!(stored["agent"], agent.id.as_str());
        assert_eq!(stored["version"], "0.2.0");
        assert_eq!(stored["outcome"]["state"], "succeeded");
        drop(ws);
        let (mut ws, _) = session(&serve, &agent, None).await;
        send(&mut ws, update_status(&id, "succeeded", "0.2.0", None)).await;
        assert_eq!(recv(&mut ws).await, json!({"type": "update_ack", "id": id}));
        assert_eq!(record(&serve, &id), stored);
        // A verdict for an update this platform never sent: acknowledged, not stored.
        let unknown = "update-0123456789abcdef";
        send(
            &mut ws,
            update_status(unknown, "failed", "0.1.0-test", Some("exited")),
        )
        .await;
        assert_eq!(
            recv(&mut ws).await,
            json!({"type": "update_ack", "id": unknown})
        );
        let records = fs::read_dir(serve.state.join("updates")).unwrap().count();
        assert_eq!(records, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_refuses_a_binary_that_is_not_the_manifests_before_sending_anything() {
    within(60, async {
        let (dir, serve, agent, mut ws, release) = one_agent().await;
        let mut changed = release.bytes.clone();
        changed[1234] ^= 1;
        let truncated = &release.bytes[..release.bytes.len() - 1];
        for (name, bytes) in [("changed", &changed[..]), ("truncated", truncated)] {
            let other = dir.path().join(name);
            fs::write(&other, bytes).unwrap();
            let args = ["--binary", other.to_str().unwrap()];
            let out = output_of(bridgectl(
                &serve,
                &update_args(&agent, &release.manifest, &args),
            ))
            .await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
            assert!(
                stderr.contains("does not match the manifest"),
                "{name}: {stderr}"
            );
        }
        expect_silence(&mut ws, Duration::from_millis(500)).await;
        assert_eq!(
            fs::read_dir(serve.state.join("updates")).unwrap().count(),
            0,
            "nothing recorded"
        );
    })
    .await;
}

/// `bytes`, gzip-compressed.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_format_2_release_is_served_as_its_archive_and_a_bad_archive_is_refused_before_sending() {
    within(60, async {
        let (dir, serve, agent, mut ws, v1) = one_agent().await;
        // Release 0.2.0 in format 2: the manifest names BINARY.gz beside the binary.
        let key = KeyPair::from_seed(&[9; 32]);
        let archive = gzip(&v1.bytes);
        let text = bridge_signing::release::sign_manifest_gzip(
            "0.2.0",
            "linux",
            std::env::consts::ARCH,
            &v1.bytes,
            &archive,
            &key,
        )
        .unwrap();
        let binary = dir.path().join("v2/bridge-daemon");
        fs::create_dir(dir.path().join("v2")).unwrap();
        fs::write(&binary, &v1.bytes).unwrap();
        let gz = dir.path().join("v2/bridge-daemon.gz");
        let manifest = dir.path().join("v2/bridge-daemon.manifest");
        fs::write(&manifest, &text).unwrap();

        // The archive missing, changed, cut short, or not unpacking to the binary: refused
        // before anything is sent.
        let mut changed = archive.clone();
        changed[archive.len() / 2] ^= 1;
        for (name, bytes) in [
            ("missing", None),
            ("changed", Some(changed)),
            ("truncated", Some(archive[..archive.len() - 1].to_vec())),
        ] {
            match &bytes {
                Some(b) => fs::write(&gz, b).unwrap(),
                None => {
                    let _ = fs::remove_file(&gz);
                }
            }
            let out = output_of(bridgectl(&serve, &update_args(&agent, &manifest, &[]))).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
            assert!(stderr.contains("bridge-daemon.gz"), "{name}: {stderr}");
        }
        // Signed over an archive of another binary: it matches the manifest but does not
        // unpack to the binary given.
        let other = gzip(&[7u8; 100_000]);
        let text_other = bridge_signing::release::sign_manifest_gzip(
            "0.2.0",
            "linux",
            std::env::consts::ARCH,
            &v1.bytes,
            &other,
            &key,
        )
        .unwrap();
        fs::write(&manifest, &text_other).unwrap();
        fs::write(&gz, &other).unwrap();
        let out = output_of(bridgectl(&serve, &update_args(&agent, &manifest, &[]))).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("does not unpack to"), "{stderr}");
        expect_silence(&mut ws, Duration::from_millis(300)).await;

        // The good archive: the ranges the agent asks for are the archive's.
        fs::write(&manifest, &text).unwrap();
        fs::write(&gz, &archive).unwrap();
        let cli = bridgectl(&serve, &update_args(&agent, &manifest, &[]));
        let update = recv(&mut ws).await;
        assert_eq!(update["manifest"], text.as_str());
        let id = update["id"].as_str().unwrap().to_string();
        let len = archive.len() as u64;
        match need_release(&mut ws, &id, 0, len).await {
            Message::Binary(bytes) => assert!(bytes[..] == archive[..]),
            other => panic!("expected the archive, got {other:?}"),
        }
        match need_release(&mut ws, &id, len, 1).await {
            Message::Text(text) => assert!(text.contains("past the end"), "{text}"),
            other => panic!("expected an error, got {other:?}"),
        }
        send(
            &mut ws,
            update_status(&id, "refused", "0.1.0-test", Some("mismatch")),
        )
        .await;
        let out = output_of(cli).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_or_no_verdict_in_time_exits_1_and_a_version_1_agent_is_not_sent_an_update() {
    within(60, async {
        let (_dir, serve, agent, mut ws, release) = one_agent().await;
        let args = update_args(&agent, &release.manifest, &[]);

        let cli = bridgectl(&serve, &args);
        let id = expect_update(&mut ws, &release).await;
        send(
            &mut ws,
            update_status(&id, "refused", "0.1.0-test", Some("downgrade")),
        )
        .await;
        let out = output_of(cli).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let printed = stdout_json(&out);
        assert_eq!(printed["state"], "refused");
        assert_eq!(printed["reason"], "downgrade");
        assert_eq!(printed["staged"], false);
        assert_eq!(record(&serve, &id)["outcome"]["reason"], "downgrade");
        // Refusals are not acknowledged (the agent keeps nothing to resend).
        expect_silence(&mut ws, Duration::from_millis(300)).await;

        let mut timed = args.to_vec();
        timed.extend(["--timeout", "1s"]);
        let cli = bridgectl(&serve, &timed);
        let id = expect_update(&mut ws, &release).await;
        let out = output_of(cli).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(stdout_json(&out)["state"], "timeout");
        // The update is over for the platform: its release is no longer handed out.
        match need_release(&mut ws, &id, 0, 1).await {
            Message::Text(text) => assert!(text.contains("not_found"), "{text}"),
            other => panic!("expected an error, got {other:?}"),
        }
        drop(ws);

        // A version-1 connection carries no update.
        let old = Identity::new();
        let mut ws = connect(&serve, &old, Some(&token(&serve).await))
            .await
            .unwrap();
        send(
            &mut ws,
            json!({"type": "hello", "versions": [1], "agent_id": old.id, "agent_version": "0.0.9"}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["version"], 1);
        let out = output_of(bridgectl(
            &serve,
            &update_args(&old, &release.manifest, &[]),
        ))
        .await;
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("protocol version 1"));
        expect_silence(&mut ws, Duration::from_millis(300)).await;
        // Nor does it carry the agent's side: an error, nothing stored, nothing acknowledged.
        match need_release(&mut ws, &id, 0, 1).await {
            Message::Text(text) => assert!(text.contains("\"error\""), "{text}"),
            other => panic!("expected an error, got {other:?}"),
        }
        send(
            &mut ws,
            update_status(&id, "failed", "0.0.9", Some("exited")),
        )
        .await;
        let error = recv(&mut ws).await;
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["id"], id.as_str(), "{error}");
        assert_eq!(record(&serve, &id)["outcome"], Value::Null);
    })
    .await;
}

/// A fresh enrollment token (each enrolls one agent).
async fn token(serve: &Platform) -> String {
    let response = serve
        .control()
        .request_async(json!({"cmd": "token"}).to_string())
        .await;
    response["token"].as_str().unwrap().to_string()
}

/// Connects a new test agent that says it runs `agent_version`.
async fn agent_at(serve: &Platform, who: &Identity, agent_version: &str) -> Ws {
    let mut ws = connect(serve, who, Some(&token(serve).await))
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "hello", "versions": [2], "agent_id": who.id, "agent_version": agent_version}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    ws
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_halts_at_its_failure_count_and_leaves_the_rest_untouched() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let release = release(dir.path(), "0.2.0");
        // Six agents: one already at 0.2.0 (not a target), five to update, in id order.
        let current = Identity::new();
        let _current_ws = agent_at(&serve, &current, "0.2.0").await;
        let mut agents: Vec<Identity> = (0..5).map(|_| Identity::new()).collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        let mut links = Vec::new();
        for a in &agents {
            links.push(agent_at(&serve, a, "0.1.0").await);
        }

        // Batches: canary [0], then ceil(25% of 5) = 2 at a time: [1, 2], [3, 4]. The canary
        // succeeds, the first batch fails twice: halted at 2, [3, 4] untouched.
        let out = output_of(bridgectl(
            &serve,
            &[
                "rollout",
                "--release",
                release.manifest.to_str().unwrap(),
                "--canary",
                "1",
                "--batch",
                "25%",
                "--max-failures",
                "2",
            ],
        ))
        .await;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let started = stdout_json(&out);
        assert_eq!(started["state"], "running");
        assert_eq!(started["targets"], 5);
        assert_eq!(started["version"], "0.2.0");

        let id = expect_update(&mut links[0], &release).await;
        // Nobody else hears of it before the canary's verdict.
        expect_silence(&mut links[1], Duration::from_millis(300)).await;
        send(
            &mut links[0],
            update_status(&id, "succeeded", "0.2.0", None),
        )
        .await;
        assert_eq!(recv(&mut links[0]).await["type"], "update_ack");
        for (n, reason) in [(1, "exited"), (2, "downgrade")] {
            let id = expect_update(&mut links[n], &release).await;
            let state = if reason == "exited" {
                "failed"
            } else {
                "refused"
            };
            send(
                &mut links[n],
                update_status(&id, state, "0.1.0", Some(reason)),
            )
            .await;
        }
        let out = output_of(bridgectl(&serve, &["rollout", "status", "--wait"])).await;
        assert_eq!(out.status.code(), Some(1), "halted: {out:?}");
        let status = stdout_json(&out);
        assert_eq!(status["state"], "halted");
        assert_eq!(status["succeeded"], json!([agents[0].id]));
        let mut failed: Vec<(String, String)> = status["failed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["agent"].as_str().unwrap().to_string(),
                    f["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        failed.sort();
        let mut want = vec![
            (agents[1].id.clone(), "exited".to_string()),
            (agents[2].id.clone(), "downgrade".to_string()),
        ];
        want.sort();
        assert_eq!(failed, want);
        assert_eq!(status["in_flight"], json!([]));
        assert_eq!(status["untouched"], 2);
        for link in &mut links[3..] {
            expect_silence(link, Duration::from_millis(300)).await;
        }
        // Over: another rollout may start (nothing left to do but the untouched and failed).
        let again = output_of(bridgectl(&serve, &["rollout", "status"])).await;
        assert_eq!(stdout_json(&again), status);
    })
    .await;
}
