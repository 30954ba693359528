//! The platform's view of the agents' audit chains: the real `bridgectl serve`, an agent played
//! over real TLS sending `status` messages with audit heads, and what the platform stores,
//! flags, names in `welcome.audit_seq`, lists in `agents` and clears with `audit clear`.

mod common;

use bridge_protocol::status::MAX_LAST_ERROR_BYTES;
use bridge_testkit::wait::wait_for;
use bridge_testkit::Platform;
use serde_json::{json, Value};

use common::*;

/// A hash that differs for each `(seq, chain)`: the chain as first written is chain 0, a
/// rewritten one another number.
fn h(seq: u64, chain: u8) -> String {
    format!("{chain:02x}{seq:062x}")
}

/// A head `seq` of `chain`.
fn head(seq: u64, chain: u8) -> Value {
    json!({"seq": seq, "hash": h(seq, chain)})
}

/// A head `seq` of `chain` answering `audit_seq` `at` with `at_hash`.
fn head_at(seq: u64, chain: u8, at: u64, at_hash: Option<String>) -> Value {
    json!({"seq": seq, "hash": h(seq, chain), "at": {"seq": at, "hash": at_hash}})
}

/// A status with the agent's stats (its last error `last_error`) and audit head `audit`.
fn status_of(who: &Identity, audit: Value, last_error: &str) -> Value {
    let mut status = status(who, "audited");
    status["stats"] = json!({
        "link": {"connected": true, "since_unix_ms": 1764049400000u64, "heartbeat_rtt_ms": 0.41,
                 "reconnects": 2, "last_error": last_error},
        "tasks": {"running": 0, "queued": 0, "unacked": 1, "finished": {"ok": 3, "rejected": 1}},
        "journal": {"bytes": 1597440, "records": 4},
        "store": {"modules": 1, "module_bytes": 912384, "compiled": 1, "compiled_bytes": 3145728},
        "rss_bytes": 9175040
    });
    status["audit"] = audit;
    status
}

/// Sends a status carrying `audit`, and waits until the platform has handled it (see [`sync`]).
async fn report(ws: &mut Ws, who: &Identity, audit: Value) {
    send(
        ws,
        status_of(who, audit, "no frame from the platform within 45 s"),
    )
    .await;
    sync(ws).await;
}

/// Waits until the platform has handled everything sent before: the reader handles an agent's
/// messages in order, so once it answers a message of an unknown type, the ones before it are
/// handled.
async fn sync(ws: &mut Ws) {
    send(ws, json!({"type": "sync_probe", "id": "sync"})).await;
    let reply = recv(ws).await;
    assert_eq!(reply["code"], "unknown_type", "{reply}");
    assert_eq!(reply["id"], "sync", "{reply}");
}

/// Connects again (replacing `ws`, if any) and returns the connection and its `welcome`.
async fn reconnect(serve: &Platform, who: &Identity) -> (Ws, Value) {
    let mut ws = connect(serve, who, None).await.expect("upgrade refused");
    let welcome = hello(&mut ws, who).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// The agent's audit view as `agents` lists it.
fn audit_of(serve: &Platform, who: &Identity) -> Value {
    serve.control().listed(&who.id)["audit"].clone()
}

/// Expects agent `who` flagged `kind` at `seq`, and the warning naming both in the log.
#[track_caller]
fn expect_flag(serve: &Platform, who: &Identity, kind: &str, seq: u64) -> Value {
    let flag = audit_of(serve, who)["flag"].clone();
    assert_eq!(flag["kind"], kind, "{flag}");
    assert_eq!(flag["seq"], seq, "{flag}");
    assert!(
        flag["flagged_at"].as_str().unwrap().ends_with('Z'),
        "{flag}"
    );
    assert!(!flag["detail"].as_str().unwrap().is_empty(), "{flag}");
    wait_for("the flag's warning in the log", STEP, || {
        serve.log().text().lines().any(|l| {
            l.contains("WARN")
                && l.contains("audit chain flagged")
                && l.contains(&who.id)
                && l.contains(&format!("kind=\"{kind}\""))
        })
    });
    flag
}

/// An enrolled agent's first session.
async fn enrolled(serve: &Platform) -> (Identity, Ws) {
    let agent = Identity::new();
    let (ws, _) = session(serve, &agent, Some(&serve.token())).await;
    (agent, ws)
}

/// A platform of its own (its state in the returned directory) and an enrolled agent's first
/// session.
async fn started() -> (tempfile::TempDir, Platform, Identity, Ws) {
    let dir = tempfile::tempdir().unwrap();
    let serve = Platform::start(&dir.path().join("state"));
    let (agent, ws) = enrolled(&serve).await;
    (dir, serve, agent, ws)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_growing_chain_is_never_flagged_and_welcome_names_the_stored_seq() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let mut ws = connect(&serve, &agent, Some(&serve.token())).await.unwrap();
        let welcome = hello(&mut ws, &agent).await;
        assert!(
            welcome.get("audit_seq").is_none(),
            "nothing stored: {welcome}"
        );

        // No record yet: seq 0 is stored, and names no record to ask about.
        report(&mut ws, &agent, json!({"seq": 0, "hash": "0".repeat(64)})).await;
        assert_eq!(
            audit_of(&serve, &agent),
            json!({"seq": 0, "hash": "0".repeat(64), "flag": null})
        );
        let (mut ws, welcome) = reconnect(&serve, &agent).await;
        assert!(welcome.get("audit_seq").is_none(), "{welcome}");

        for seq in [1, 2, 2, 5] {
            report(&mut ws, &agent, head(seq, 0)).await;
        }
        assert_eq!(
            audit_of(&serve, &agent),
            json!({"seq": 5, "hash": h(5, 0), "flag": null})
        );
        // The next connection is asked about seq 5, answers it, and grows on.
        let (mut ws, welcome) = reconnect(&serve, &agent).await;
        assert_eq!(welcome["audit_seq"], 5, "{welcome}");
        for seq in [5, 8, 9] {
            report(&mut ws, &agent, head_at(seq, 0, 5, Some(h(5, 0)))).await;
        }
        let listed = serve.control().listed(&agent.id);
        assert_eq!(
            listed["audit"],
            json!({"seq": 9, "hash": h(9, 0), "flag": null})
        );
        // The latest status, with its stats, through the real client.
        let out = output_of(bridgectl(&serve, &["agents"])).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let a = &printed[0];
        assert_eq!(a["audit"], listed["audit"]);
        assert_eq!(a["status"]["audit"]["seq"], 9);
        assert_eq!(a["status"]["stats"]["tasks"]["finished"]["ok"], 3);
        assert_eq!(a["status"]["stats"]["link"]["reconnects"], 2);
        assert_eq!(a["status"]["stats"]["rss_bytes"], 9175040);
        assert!(!serve.log().text().contains("audit chain flagged"));
        drop(ws);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_that_goes_back_is_flagged_backwards_and_the_flag_sticks() {
    within(60, async {
        let (_dir, serve, agent, mut ws) = started().await;
        report(&mut ws, &agent, head(5, 0)).await;
        report(&mut ws, &agent, head(3, 1)).await;
        let flag = expect_flag(&serve, &agent, "backwards", 3);
        // Later statuses move the head on but leave the flag as it was.
        report(&mut ws, &agent, head(4, 1)).await;
        report(&mut ws, &agent, head(4, 2)).await;
        let audit = audit_of(&serve, &agent);
        assert_eq!(audit["seq"], 4);
        assert_eq!(audit["hash"], h(4, 2));
        assert_eq!(audit["flag"], flag);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_hash_at_the_same_seq_is_flagged_fork() {
    within(60, async {
        let (_dir, serve, agent, mut ws) = started().await;
        report(&mut ws, &agent, head(5, 0)).await;
        report(&mut ws, &agent, head(5, 0)).await;
        assert_eq!(audit_of(&serve, &agent)["flag"], Value::Null);
        report(&mut ws, &agent, head(5, 1)).await;
        let flag = expect_flag(&serve, &agent, "fork", 5);
        let detail = flag["detail"].as_str().unwrap();
        assert!(
            detail.contains(&h(5, 0)) && detail.contains(&h(5, 1)),
            "{detail}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_to_audit_seq_with_another_hash_is_flagged_fork() {
    within(60, async {
        let (_dir, serve, agent, mut ws) = started().await;
        report(&mut ws, &agent, head(5, 0)).await;
        // Rewritten from record 5 on, every hash recomputed, and grown since: only the answer
        // about record 5 shows it.
        let (mut ws, welcome) = reconnect(&serve, &agent).await;
        assert_eq!(welcome["audit_seq"], 5);
        report(&mut ws, &agent, head_at(7, 1, 5, Some(h(5, 1)))).await;
        expect_flag(&serve, &agent, "fork", 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_agent_no_longer_has_is_flagged_unverifiable() {
    within(60, async {
        let (_dir, serve, agent, mut ws) = started().await;
        report(&mut ws, &agent, head(5, 0)).await;
        let (mut ws, welcome) = reconnect(&serve, &agent).await;
        assert_eq!(welcome["audit_seq"], 5);
        report(&mut ws, &agent, head_at(9, 0, 5, None)).await;
        expect_flag(&serve, &agent, "unverifiable", 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flag_survives_a_restart_until_audit_clear_clears_it() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut serve = Platform::start(&state);
        let (agent, mut ws) = enrolled(&serve).await;
        report(&mut ws, &agent, head(9, 0)).await;
        report(&mut ws, &agent, head(9, 1)).await;
        let flag = expect_flag(&serve, &agent, "fork", 9);
        drop(ws);
        assert_eq!(
            tokio::task::block_in_place(|| serve.terminate()).code(),
            Some(0)
        );
        drop(serve);

        let serve = Platform::start(&state);
        let listed = serve.control().listed(&agent.id);
        assert!(
            listed["status"].is_null(),
            "statuses are kept in memory only"
        );
        assert_eq!(
            listed["audit"],
            json!({"seq": 9, "hash": h(9, 1), "flag": flag})
        );
        let (mut ws, welcome) = reconnect(&serve, &agent).await;
        assert_eq!(welcome["audit_seq"], 9, "the stored seq survives too");

        // Cleared through the real client: it prints the flag it cleared, then null.
        let out = output_of(bridgectl(&serve, &["audit", "clear", "--agent", &agent.id])).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed, json!({"agent": agent.id, "cleared": flag}));
        assert_eq!(audit_of(&serve, &agent)["flag"], Value::Null);
        let again = serve
            .control()
            .request(&json!({"cmd": "audit_clear", "agent": agent.id}));
        assert_eq!(
            again,
            json!({"ok": true, "agent": agent.id, "cleared": null})
        );
        // The chain the agent reports now is the one judged from here on: not flagged again.
        report(&mut ws, &agent, head_at(10, 1, 9, Some(h(9, 1)))).await;
        assert_eq!(
            audit_of(&serve, &agent),
            json!({"seq": 10, "hash": h(10, 1), "flag": null})
        );
        // An agent the platform does not know: an error, exit status 2.
        let stranger = Identity::new();
        let out = output_of(bridgectl(
            &serve,
            &["audit", "clear", "--agent", &stranger.id],
        ))
        .await;
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown agent"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_status_is_refused_and_not_stored() {
    within(60, async {
        let (dir, serve, agent, mut ws) = started().await;
        let good = h(5, 0);
        let fine = "no frame from the platform within 45 s";
        let over = "é".repeat(MAX_LAST_ERROR_BYTES / 2) + "x";
        let cases = [
            (
                json!({"seq": 5, "hash": "AB".repeat(32)}),
                fine,
                "`audit.hash`",
            ),
            (json!({"seq": 5, "hash": &good[..63]}), fine, "`audit.hash`"),
            (
                json!({"seq": 5, "hash": format!("{good}0")}),
                fine,
                "`audit.hash`",
            ),
            (
                head_at(5, 0, 4, Some("zz".repeat(32))),
                fine,
                "`audit.at.hash`",
            ),
            (head(5, 0), over.as_str(), "last_error"),
        ];
        for (audit, last_error, field) in cases {
            send(&mut ws, status_of(&agent, audit, last_error)).await;
            let reply = recv(&mut ws).await;
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["code"], "malformed", "{reply}");
            let message = reply["message"].as_str().unwrap();
            assert!(
                message.contains("bad `status` message") && message.contains(field),
                "{reply}"
            );
        }
        let listed = serve.control().listed(&agent.id);
        assert!(listed["status"].is_null(), "{listed}");
        assert!(listed["audit"].is_null(), "{listed}");
        assert!(!dir
            .path()
            .join(format!("state/audit/{}.json", agent.id))
            .exists());

        // At the limit, and still connected: stored.
        let at_limit = "é".repeat(MAX_LAST_ERROR_BYTES / 2);
        send(&mut ws, status_of(&agent, head(5, 0), &at_limit)).await;
        sync(&mut ws).await;
        let listed = serve.control().listed(&agent.id);
        assert_eq!(listed["connected"], true);
        assert_eq!(
            listed["status"]["stats"]["link"]["last_error"],
            at_limit.as_str()
        );
        assert_eq!(listed["audit"]["seq"], 5);
        // A status without `audit` (an older agent) stores no head and leaves it as it was.
        send(&mut ws, status(&agent, "older")).await;
        sync(&mut ws).await;
        let listed = serve.control().listed(&agent.id);
        assert_eq!(listed["status"]["host"]["hostname"], "older");
        assert_eq!(
            listed["audit"],
            json!({"seq": 5, "hash": good, "flag": null})
        );
    })
    .await;
}
