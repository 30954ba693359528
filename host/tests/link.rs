//! The platform link over real TLS on 127.0.0.1: a real `bridgectl serve`, real `bridge-daemon
//! run` agents, signed modules compiled from `examples/`. Every test ends by itself.

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use bridge_testkit::agent::agent_id;
use bridge_testkit::{Agent, Platform, Proxy, Publisher, Setup};
use serde_json::json;

const CONNECT: Duration = Duration::from_secs(30);

fn hello_ok(platform: &Platform, id: &str, publisher: &Publisher, name: &str) {
    let r =
        platform
            .control()
            .run_module(id, &publisher.signed("hello"), json!({"name": name}), None);
    assert_eq!(
        r["ok"],
        true,
        "{r}\nplatform log:\n{}",
        platform.log().text()
    );
    assert_eq!(r["result"]["status"], "ok", "{r}");
    assert_eq!(r["result"]["output"]["greeting"], format!("Hello, {name}!"));
}

#[test]
fn enrollment_then_reconnect_without_token_keeps_the_agent_id() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let publisher = Publisher::new();
    let state = tmp.path().join("agent");
    let token = platform.token();

    let mut agent = Agent::start(
        &state,
        &platform.agent_args_with(Some(&token), Some(&publisher.public())),
    );
    let id = agent.id();
    // Enrolled by the token: listed with its enrollment time, and its status report.
    let listed = platform.control().wait_status(&id);
    assert!(listed["enrolled_at"].is_string(), "{listed}");
    hello_ok(&platform, &id, &publisher, "first");
    let status = listed["status"].clone();
    assert_eq!(status["agent_id"], id, "status report: {status}");
    assert!(!status["host"]["hostname"].as_str().unwrap().is_empty());
    assert!(
        agent.terminate().success(),
        "SIGTERM should stop the agent cleanly"
    );

    // Restarted without a token: the enrolled key is enough, and the id is the same.
    let agent = Agent::start(
        &state,
        &platform.agent_args_with(None, Some(&publisher.public())),
    );
    assert_eq!(agent.id(), id, "the agent id changed across a restart");
    platform.control().wait_connected(&id);
    hello_ok(&platform, &id, &publisher, "again");
}

#[test]
fn wrong_and_missing_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let cases = [
        (Some("not-a-real-token"), "token_invalid"),
        (None, "token_missing"),
    ];
    for (i, (token, reason)) in cases.into_iter().enumerate() {
        let agent = Agent::start(
            &tmp.path().join(format!("a{i}")),
            &platform.agent_args_with(token, None),
        );
        agent.log.wait_for(reason, CONNECT);
        assert!(!platform.control().connected(&agent.id()));
    }
}

#[test]
fn a_used_token_is_refused_to_a_second_key() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    // The real token enrolls one agent; a second key presenting it is refused.
    let token = platform.token();
    let first = Agent::start(
        &tmp.path().join("first"),
        &platform.agent_args_with(Some(&token), None),
    );
    platform.control().wait_connected(&first.id());
    let second = Agent::start(
        &tmp.path().join("second"),
        &platform.agent_args_with(Some(&token), None),
    );
    second.log.wait_for("token_used", CONNECT);
    assert!(!platform.control().connected(&second.id()));
    assert!(platform.control().connected(&first.id()));
}

#[test]
fn a_pin_mismatch_is_refused_logged_and_backed_off() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let wrong = "ab".repeat(32);
    let args = vec![
        "--server".to_string(),
        platform.url(),
        "--server-pin".into(),
        wrong.clone(),
        "--token".into(),
        platform.token(),
        "--reconnect-max-secs".into(),
        "1".into(),
    ];
    let agent = Agent::start(&tmp.path().join("agent"), &args);
    agent.log.wait_for("server pin mismatch", CONNECT);
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log.text();
    assert!(
        log.contains(&platform.pin()),
        "the presented fingerprint is logged: {log}"
    );
    assert!(
        log.contains(&wrong),
        "the expected fingerprint is logged: {log}"
    );
    let attempts = agent.log.count("server pin mismatch: not connecting");
    assert!(
        (2..=40).contains(&attempts),
        "{attempts} attempts in ~3 s: not backing off?\n{log}"
    );
    assert!(
        platform.control().agents().is_empty(),
        "nothing may enroll through a refused server"
    );
}

#[test]
fn a_ca_file_is_enough_to_trust_the_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let ca = platform.info["ca_file"].as_str().unwrap().to_string();
    let args = vec![
        "--server".into(),
        platform.url(),
        "--ca-file".into(),
        ca,
        "--token".into(),
        platform.token(),
    ];
    let agent = Agent::start(&tmp.path().join("agent"), &args);
    platform.control().wait_connected(&agent.id());
}

#[test]
fn without_a_pin_or_a_ca_file_the_platform_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    // The self-signed platform is not trusted by the system roots.
    let args = vec![
        "--server".into(),
        platform.url(),
        "--token".into(),
        platform.token(),
    ];
    let stranger = Agent::start(&tmp.path().join("stranger"), &args);
    stranger.log.wait_for("cannot reach the platform", CONNECT);
    assert!(!platform.control().connected(&stranger.id()));
}

#[test]
fn plaintext_is_refused_unless_the_development_flag_allows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let mut agent = Agent::start(&tmp.path().join("a"), &["--server".into(), url.clone()]);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(2));
    assert!(
        agent.log.text().contains("refusing plaintext ws://"),
        "{}",
        agent.log.text()
    );

    let _agent = Agent::start(
        &tmp.path().join("b"),
        &["--server".into(), url, "--dev-allow-plaintext".into()],
    );
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("GET /agent"),
        "a plaintext upgrade request"
    );
}

#[test]
fn the_agent_comes_back_after_the_platform_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let pstate = tmp.path().join("platform");
    let mut platform = Platform::start(&pstate);
    let addr = platform.listen_addr();
    let publisher = Publisher::new();
    let mut args = platform.agent_args_with(Some(&platform.token()), Some(&publisher.public()));
    args.extend(["--reconnect-max-secs".into(), "1".into()]);
    let agent = Agent::start(&tmp.path().join("agent"), &args);
    let id = agent.id();
    platform.control().wait_connected(&id);

    platform.kill();
    agent.log.wait_for("link lost", CONNECT);
    std::thread::sleep(Duration::from_secs(4)); // several failed attempts with a 1 s ceiling
    let restarted_at = Instant::now();
    let platform = Platform::builder(&pstate).listen(&addr).start();
    assert_eq!(platform.listen_addr(), addr);
    platform.control().wait_connected(&id);
    let back_after = restarted_at.elapsed();
    assert!(
        back_after < Duration::from_secs(5),
        "back after {back_after:?}, the ceiling is 1 s"
    );
    hello_ok(&platform, &id, &publisher, "after restart");

    // The waits between attempts respect the ceiling and are jittered.
    let delays: Vec<u64> = agent
        .log
        .text()
        .lines()
        .filter(|l| l.contains("reconnecting after a pause"))
        .filter_map(|l| {
            l.split("delay_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.len() >= 3, "{delays:?}");
    assert!(
        delays.iter().all(|d| *d <= 1000),
        "a wait exceeded the 1 s ceiling: {delays:?}"
    );
    let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
    assert!(distinct.len() >= 2, "no jitter: {delays:?}");
}

#[test]
fn a_silent_partition_is_detected_by_the_heartbeat_and_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let proxy = Proxy::start(&platform.listen_addr());
    let publisher = Publisher::new();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        "[platform]\nheartbeat_secs = 1\nheartbeat_timeout_secs = 3\nreconnect_max_secs = 1\n",
    )
    .unwrap();
    let args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--server".into(),
        format!("wss://{}/agent", proxy.addr()),
        "--server-pin".into(),
        platform.pin(),
        "--token".into(),
        platform.token(),
        "--trusted-key".into(),
        publisher.public(),
    ];
    let agent = Agent::start(&tmp.path().join("agent"), &args);
    let id = agent.id();
    // The platform counts the agent connected before its `welcome` has crossed the proxy:
    // freeze only once the agent has it (it then reports its status), or the freeze swallows
    // the handshake instead.
    platform.control().wait_status(&id);

    proxy.freeze(true);
    let frozen_at = Instant::now();
    agent.log.wait_for(
        "no frame from the platform for 3 s",
        Duration::from_secs(15),
    );
    let detected = frozen_at.elapsed();
    assert!(
        detected < Duration::from_secs(8),
        "detected after {detected:?}; the timeout is 3 s"
    );

    proxy.freeze(false);
    // The old, frozen connection is abandoned; a new one goes through and works.
    let start = Instant::now();
    loop {
        let r = platform.control().run_module(
            &id,
            &publisher.signed("hello"),
            json!({"name": "healed"}),
            None,
        );
        if r["ok"] == true {
            assert_eq!(r["result"]["output"]["greeting"], "Hello, healed!");
            break;
        }
        assert!(
            start.elapsed() < CONNECT,
            "never recovered: {r}\n{}",
            agent.log.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_identity_command_prints_the_id_the_platform_sees() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &platform.agent_args_with(Some(&platform.token()), None),
    );
    let id = agent_id(&agent.state);
    assert_eq!(id.len(), 64);
    platform.control().wait_connected(&id);
}

#[test]
fn malformed_unknown_and_oversize_messages_get_error_replies_and_the_link_survives() {
    let s = Setup::start();
    let deep = format!(
        "{{\"type\":\"run\",\"id\":\"d1\",\"x\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let oversize = format!(
        "{{\"type\":\"run\",\"id\":\"o1\",\"pad\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let cases = [
        ("this is not json".to_string(), "malformed", None),
        (
            r#"{"type":"launch_missiles","id":"u1"}"#.to_string(),
            "unknown_type",
            Some("u1"),
        ),
        (
            r#"{"type":"run","id":"r1","task_id":"t"}"#.to_string(),
            "malformed",
            Some("r1"),
        ),
        (r#"{"no_type":true}"#.to_string(), "malformed", None),
        (deep, "too_deep", None),
        (oversize, "oversize", None),
    ];
    for (text, code, reply_id) in cases {
        let r = s
            .platform
            .control()
            .request(&json!({"cmd": "send", "agent": s.id, "text": text, "wait_ms": 10000}));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["reply"]["code"], code, "reply to {:.60}: {r}", text);
        assert!(!r["reply"]["message"].as_str().unwrap().is_empty());
        if let Some(rid) = reply_id {
            assert_eq!(r["reply"]["id"], rid, "the reply is correlated by id");
        }
    }
    // The same connection still runs tasks.
    hello_ok(&s.platform, &s.id, &s.publisher, "still here");
    assert_eq!(
        s.agent.log.count("link lost"),
        0,
        "the connection must survive: {}",
        s.agent.log.text()
    );
}

#[test]
fn a_result_larger_than_one_frame_still_arrives_cut_to_fit() {
    let s = Setup::start();
    // 3 MB of stdout: the run keeps 1 MiB (the default cap), the message keeps what fits in one
    // frame; the totals stay exact and the result is not lost.
    let r = s.platform.control().run_module(
        &s.id,
        &s.publisher.signed("flood"),
        json!({"bytes": 3_000_000}),
        None,
    );
    assert_eq!(r["ok"], true, "{r}");
    let result = &r["result"];
    assert_eq!(result["status"], "ok");
    assert_eq!(result["truncated"]["stdout"], true);
    assert_eq!(result["truncated"]["stdout_total_bytes"], 3_000_000);
    let kept = result["stdout"].as_str().unwrap().len();
    assert!(kept > 100_000 && kept < (1 << 20), "{kept}");
}

#[test]
fn only_modules_that_pass_the_trust_policy_are_kept_in_the_store() {
    let s = Setup::start();
    let stored = || {
        std::fs::read_dir(s.agent.state.join("modules"))
            .map(|d| d.count())
            .unwrap_or(0)
    };

    let unsigned = std::fs::read(bridge_testkit::bins::wasm("hello")).unwrap();
    let r = s
        .platform
        .control()
        .run_module(&s.id, &unsigned, json!({}), None);
    assert_eq!(r["result"]["status"], "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "unsigned");
    assert_eq!(stored(), 0, "a refused module was kept on disk");

    hello_ok(&s.platform, &s.id, &s.publisher, "kept");
    assert_eq!(stored(), 1);
}

#[test]
fn a_token_that_starts_with_a_dash_is_accepted() {
    // Tokens are base64url: one in 32 starts with '-'. Ask the platform until it issues one.
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let token = (0..2000)
        .map(|_| {
            platform.control().request(&json!({"cmd": "token"}))["token"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .find(|t| t.starts_with('-'))
        .expect("no token starting with '-' in 2000 tries");
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &platform.agent_args_with(Some(&token), None),
    );
    platform.control().wait_connected(&agent.id());
}

/// `RssFile` (resident file-backed pages, mostly code) of a process, in KiB.
fn rss_file_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An idle agent gives back what its work needed: a couple of seconds after its last task it
/// unmaps the clean code pages the tasks touched (and trims its heap), so its resident code
/// shrinks to what idling uses; the next task maps what it needs again and runs as before.
#[test]
fn an_idle_agent_gives_its_code_pages_back_and_still_runs_tasks() {
    let s = Setup::start();
    for i in 0..10 {
        hello_ok(&s.platform, &s.id, &s.publisher, &format!("busy {i}"));
    }
    let busy = rss_file_kib(s.agent.pid());
    assert!(busy > 0, "no RssFile for the agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let idle = loop {
        let now = rss_file_kib(s.agent.pid());
        if now * 2 < busy {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "resident code stayed at {now} KiB (busy: {busy} KiB) for 20 s\nagent log:\n{}",
            s.agent.log.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("agent RssFile: busy {busy} KiB, idle {idle} KiB");
    hello_ok(&s.platform, &s.id, &s.publisher, "after the trim");
    hello_ok(&s.platform, &s.id, &s.publisher, "again");
}
