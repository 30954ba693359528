//! The platform catches what the machine cannot: an audit chain rewritten on the machine with
//! every hash recomputed (the files and the journal's copy of the head alike) passes
//! `bridge-daemon audit verify`, and the real `bridgectl serve` flags the agent from the head
//! it stored when the agent connects again. Real binaries on 127.0.0.1, real tasks; every wait
//! is bounded.

use std::path::Path;

use bridge_testkit::audit::audit_files;
use bridge_testkit::{bins, wait_until, Setup, CONNECT};
use redb::ReadableTable;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CONFIG: &str = "[platform]\nstatus_secs = 1\n";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites the chain the way an intruder with the agent's privileges could: `edit` changes
/// record `seq`'s line, and every later record's `prev` is recomputed, so the chain is
/// consistent again.
fn rewrite(state: &Path, seq: u64, edit: impl Fn(&str) -> String) {
    let mut prev_old = String::new();
    let mut prev_new = String::new();
    for file in audit_files(state) {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut out = String::new();
        for line in text.lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            let this_seq = record["seq"].as_u64().unwrap();
            let mut new_line = line.to_string();
            if this_seq == seq {
                new_line = edit(line);
                assert_ne!(new_line, line, "the edit changed nothing");
            } else if this_seq > seq {
                new_line = line.replacen(
                    &format!("\"prev\":\"{prev_old}\""),
                    &format!("\"prev\":\"{prev_new}\""),
                    1,
                );
            }
            prev_old = hex(&Sha256::digest(line.as_bytes()));
            prev_new = hex(&Sha256::digest(new_line.as_bytes()));
            out.push_str(&new_line);
            out.push('\n');
        }
        std::fs::write(&file, out).unwrap();
    }
}

/// The journal's copy of the chain's head (the `audit` table keeps the last record), rewritten
/// to `line` as an intruder who rewrote the files would, so the agent starts from it.
fn rewrite_journal_head(state: &Path, seq: u64, line: &str) {
    const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
    let db = redb::Database::open(state.join("journal.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(AUDIT).unwrap();
        let last = table.last().unwrap().map(|(k, _)| k.value());
        assert_eq!(last, Some(seq), "the journal keeps the head");
        table.insert(seq, line.as_bytes()).unwrap();
    }
    txn.commit().unwrap();
}

/// The journal's copy of the chain's head removed, as an intruder cutting the chain short would.
fn remove_journal_head(state: &Path, seq: u64) {
    const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
    let db = redb::Database::open(state.join("journal.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(AUDIT).unwrap();
        assert!(
            table.remove(seq).unwrap().is_some(),
            "the journal keeps the head"
        );
    }
    txn.commit().unwrap();
}

/// Record `seq`'s line as the files hold it.
fn line_of(state: &Path, seq: u64) -> String {
    audit_files(state)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|l| serde_json::from_str::<Value>(l).unwrap()["seq"] == seq)
        .unwrap_or_else(|| panic!("no record {seq}"))
}

fn verify(state: &Path) -> (bool, String) {
    let out = bins::daemon()
        .args(["audit", "verify", "--state"])
        .arg(state)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The platform's audit view of the agent (`bridgectl agents`' `audit`).
fn platform_audit(s: &Setup) -> Value {
    s.control().listed(&s.id)["audit"].clone()
}

#[test]
fn a_chain_rewritten_with_every_hash_recomputed_passes_verify_and_is_flagged_by_the_platform() {
    let mut s = Setup::with_config(CONFIG);
    let hello = s.publisher.signed("hello");
    for name in ["Ada", "Grace", "Edsger"] {
        let r = s
            .control()
            .run_module(&s.id, &hello, json!({ "name": name }), None);
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    // The platform has stored the head of the three records.
    let stored = wait_until("the platform stores head 3", CONNECT, || {
        let a = platform_audit(&s);
        if a["seq"] == 3 {
            Ok(a)
        } else {
            Err(a.to_string())
        }
    });
    assert!(stored["flag"].is_null(), "{stored}");

    // Stopped, the chain is rewritten: the second task "failed", every hash after it redone.
    s.agent.terminate();
    let state = s.agent.state.clone();
    let head_before = line_of(&state, 3);
    rewrite(&state, 2, |line| {
        line.replacen("\"status\":\"ok\"", "\"status\":\"error\"", 1)
    });
    let head_after = line_of(&state, 3);
    assert_ne!(head_before, head_after);
    rewrite_journal_head(&state, 3, &head_after);
    let (ok, out) = verify(&state);
    assert!(ok, "a consistent rewrite passes local verification: {out}");

    // Connected again, the agent answers welcome.audit_seq (3) with the rewritten record's
    // hash: the platform flags a fork.
    s.restart_agent(false);
    let flagged = wait_until("the platform flags the rewritten chain", CONNECT, || {
        let a = platform_audit(&s);
        if a["flag"].is_object() {
            Ok(a)
        } else {
            Err(a.to_string())
        }
    });
    assert_eq!(flagged["flag"]["kind"], "fork", "{flagged}");
    assert_eq!(flagged["flag"]["seq"], 3, "{flagged}");
}

#[test]
fn a_chain_cut_short_is_flagged_by_the_platform() {
    let mut s = Setup::with_config(CONFIG);
    let hello = s.publisher.signed("hello");
    for name in ["Ada", "Grace"] {
        let r = s
            .control()
            .run_module(&s.id, &hello, json!({ "name": name }), None);
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }
    wait_until("the platform stores head 2", CONNECT, || {
        let a = platform_audit(&s);
        if a["seq"] == 2 {
            Ok(())
        } else {
            Err(a.to_string())
        }
    });
    // The last record deleted, in the files and in the journal: what remains verifies, and the
    // agent starts from record 1.
    s.agent.terminate();
    let state = s.agent.state.clone();
    let last = audit_files(&state).pop().unwrap();
    let text = std::fs::read_to_string(&last).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"seq\":2,")).collect();
    std::fs::write(&last, kept.join("\n") + "\n").unwrap();
    remove_journal_head(&state, 2);
    let (ok, out) = verify(&state);
    assert!(ok, "{out}");
    s.restart_agent(false);
    let flagged = wait_until("the platform flags the shortened chain", CONNECT, || {
        let a = platform_audit(&s);
        if a["flag"].is_object() {
            Ok(a)
        } else {
            Err(a.to_string())
        }
    });
    // The agent's head went back to 1, and it cannot show record 2 (welcome.audit_seq): the
    // platform names the missing record first.
    assert_eq!(flagged["seq"], 1, "{flagged}");
    assert_eq!(flagged["flag"]["kind"], "unverifiable", "{flagged}");
    assert_eq!(flagged["flag"]["seq"], 2, "{flagged}");
}
