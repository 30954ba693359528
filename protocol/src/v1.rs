//! Protocol version 1, served by a translation at the wire.
//!
//! The Rust types are the version-2 shape. Version 1 differs only in names, so an end that
//! negotiated version 1 rewrites each message as JSON: [`Versioned::to_v1`] just before sending,
//! [`Versioned::from_v1`] just after receiving. The differences (`docs/protocol.md`, "Version 1"):
//!
//! | where | version 1 | version 2 |
//! | --- | --- | --- |
//! | `run`, `install_handler` | `module_sha256` | `file_sha256` |
//! | `need_module` | `sha256` | `file_sha256` |
//! | `handlers[]` | `module_sha256` | `file_sha256`, `code_sha256` |
//! | `result.result` | `module_sha256` | `file_sha256`, `code_sha256` |
//! | `reason` of a task whose `not_after` passed | `expired` | `deadline_passed` |
//!
//! Version 1 has no `code_sha256`: it is dropped going to version 1 and absent coming from it.
//! Nor has it the self-update messages ([`V2_ONLY_TYPES`]): a version-1 connection never
//! carries them ([`carries`]), and decoding one on version 1 is `unknown_type`. Nor the
//! refusal reason `updating`: version 1 says `busy` (both are not recorded; retry later).

use serde_json::{Map, Value};

use crate::messages::{AgentMessage, PlatformMessage};

/// The start of the `error` text a version-1 agent gave a task whose own `not_after` passed:
/// the only thing telling it from a signature's expiry, which version 1 also calls `expired`.
pub const V1_DEADLINE_TEXT: &str = "the task's not_after";

/// The version-1 name of a module's file hash, which the types also read (as an alias, for
/// journals written before version 2) where version 2 says `file_sha256`.
pub const V1_ONLY_NAME: &str = "module_sha256";

/// The message types only version 2 has (self-update): a version-1 connection never carries
/// them, in either direction.
pub const V2_ONLY_TYPES: &[&str] = &["update", "update_ack", "need_release", "update_status"];

/// Whether protocol `version` has messages of type `kind` (an end checks this before sending
/// one: the platform does not offer an update to a version-1 agent connection, an agent keeps
/// its `update_status` until a version-2 connection).
pub fn carries(version: u32, kind: &str) -> bool {
    version != 1 || !V2_ONLY_TYPES.contains(&kind)
}

/// The refusal reason version 1 does not have (a `run` arriving while the agent drains for an
/// update), and the one version 1 says instead: both mean "not recorded, retry later".
const V2_ONLY_REASON: (&str, &str) = ("updating", "busy");

/// A message type both versions carry, with the rewrites between their JSON shapes.
pub trait Versioned {
    /// Rewrites a version-2 message (as JSON) into its version-1 shape.
    fn to_v1(message: &mut Value);
    /// Rewrites a version-1 message (as JSON) into its version-2 shape.
    fn from_v1(message: &mut Value);
    /// The message's `type` when it carries [`V1_ONLY_NAME`] where version 2 has
    /// `file_sha256` (a version-2 connection refuses it).
    fn uses_v1_name(message: &Value) -> Option<&str>;
}

fn kind(message: &Value) -> Option<&str> {
    message.get("type").and_then(Value::as_str)
}

/// Renames `from` to `to` in `object` when `from` is there and `to` is not.
fn rename(object: &mut Map<String, Value>, from: &str, to: &str) {
    if object.contains_key(to) {
        return;
    }
    if let Some(v) = object.remove(from) {
        object.insert(to.to_string(), v);
    }
}

/// Applies `f` to each entry of a `handlers` message's list.
fn each_handler(message: &mut Map<String, Value>, mut f: impl FnMut(&mut Map<String, Value>)) {
    let list = message.get_mut("handlers").and_then(Value::as_array_mut);
    for h in list.into_iter().flatten().filter_map(Value::as_object_mut) {
        f(h);
    }
}

fn result_to_v1(result: &mut Map<String, Value>) {
    rename(result, "file_sha256", "module_sha256");
    result.remove("code_sha256");
    if let Some(reason) = result.get_mut("reason") {
        if reason == "deadline_passed" {
            *reason = Value::from("expired");
        } else if reason == V2_ONLY_REASON.0 {
            *reason = Value::from(V2_ONLY_REASON.1);
        }
    }
}

fn result_from_v1(result: &mut Map<String, Value>) {
    rename(result, "module_sha256", "file_sha256");
    let deadline = result
        .get("error")
        .and_then(Value::as_str)
        .is_some_and(|e| e.starts_with(V1_DEADLINE_TEXT));
    if let Some(reason) = result.get_mut("reason") {
        if reason == "expired" && deadline {
            *reason = Value::from("deadline_passed");
        }
    }
}

impl Versioned for AgentMessage {
    fn to_v1(message: &mut Value) {
        let k = kind(message).map(str::to_string);
        let Some(m) = message.as_object_mut() else {
            return;
        };
        match k.as_deref() {
            Some("need_module") => rename(m, "file_sha256", "sha256"),
            Some("handlers") => each_handler(m, |h| {
                rename(h, "file_sha256", "module_sha256");
                h.remove("code_sha256");
            }),
            Some("result") => {
                if let Some(r) = m.get_mut("result").and_then(Value::as_object_mut) {
                    result_to_v1(r);
                }
            }
            // Version 1 has no stats or audit head in `status`.
            Some("status") => {
                m.remove("stats");
                m.remove("audit");
            }
            _ => {}
        }
    }

    fn from_v1(message: &mut Value) {
        let k = kind(message).map(str::to_string);
        let Some(m) = message.as_object_mut() else {
            return;
        };
        match k.as_deref() {
            Some("need_module") => rename(m, "sha256", "file_sha256"),
            Some("handlers") => each_handler(m, |h| rename(h, "module_sha256", "file_sha256")),
            Some("result") => {
                if let Some(r) = m.get_mut("result").and_then(Value::as_object_mut) {
                    result_from_v1(r);
                }
            }
            _ => {}
        }
    }

    fn uses_v1_name(message: &Value) -> Option<&str> {
        let in_result = message
            .get("result")
            .and_then(Value::as_object)
            .is_some_and(|r| r.contains_key(V1_ONLY_NAME));
        (kind(message) == Some("result") && in_result).then_some("result")
    }
}

impl Versioned for PlatformMessage {
    fn to_v1(message: &mut Value) {
        let k = kind(message).map(str::to_string);
        let Some(m) = message.as_object_mut() else {
            return;
        };
        match k.as_deref() {
            Some("run" | "install_handler") => rename(m, "file_sha256", "module_sha256"),
            // Version 1 has no audit chain.
            Some("welcome") => {
                m.remove("audit_seq");
            }
            _ => {}
        }
    }

    fn from_v1(message: &mut Value) {
        if matches!(kind(message), Some("run" | "install_handler")) {
            if let Some(m) = message.as_object_mut() {
                rename(m, "module_sha256", "file_sha256");
            }
        }
    }

    fn uses_v1_name(message: &Value) -> Option<&str> {
        let named = message
            .as_object()
            .is_some_and(|m| m.contains_key(V1_ONLY_NAME));
        match kind(message) {
            Some(k @ ("run" | "install_handler")) if named => Some(k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_version, encode_version};
    use crate::ErrorCode;
    use crate::{HandlerInfo, RunRequest, RunResult, Status};
    use serde_json::json;

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn platform_messages_rename_the_file_hash_both_ways() {
        let run = PlatformMessage::Run(RunRequest {
            id: "r1".into(),
            task_id: "t1".into(),
            file_sha256: Some(sha('a')),
            ..RunRequest::default()
        });
        let v1: Value = serde_json::from_str(&encode_version(&run, 1)).unwrap();
        assert_eq!(v1["module_sha256"], sha('a'));
        assert!(v1.get("file_sha256").is_none(), "{v1}");
        let v2: Value = serde_json::from_str(&encode_version(&run, 2)).unwrap();
        assert_eq!(v2["file_sha256"], sha('a'));
        assert!(v2.get("module_sha256").is_none(), "{v2}");
        assert_eq!(
            decode_version::<PlatformMessage>(&v1.to_string(), PlatformMessage::TYPES, 1).unwrap(),
            run
        );

        let install = PlatformMessage::InstallHandler {
            id: "i1".into(),
            name: "hello".into(),
            file_sha256: sha('b'),
            signature: None,
        };
        let v1 = encode_version(&install, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&v1).unwrap(),
            json!({"type": "install_handler", "id": "i1", "name": "hello", "module_sha256": sha('b')})
        );
        assert_eq!(
            decode_version::<PlatformMessage>(&v1, PlatformMessage::TYPES, 1).unwrap(),
            install
        );
        // A version-2 connection refuses the version-1 names, saying which name to use, even
        // where the types read them (a run's, for old journals); a string that merely holds
        // the name is fine.
        assert!(decode_version::<PlatformMessage>(&v1, PlatformMessage::TYPES, 2).is_err());
        let old_run =
            json!({"type": "run", "id": "r1", "task_id": "t1", "module_sha256": sha('a')});
        let e = decode_version::<PlatformMessage>(&old_run.to_string(), PlatformMessage::TYPES, 2)
            .unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::Malformed, Some("r1"))
        );
        assert!(
            e.message.contains("version 2 calls it `file_sha256`"),
            "{e}"
        );
        let input = json!({"type": "run", "id": "r2", "task_id": "t2", "command": "c", "input": {"module_sha256": 1}});
        assert!(
            decode_version::<PlatformMessage>(&input.to_string(), PlatformMessage::TYPES, 2)
                .is_ok()
        );
    }

    #[test]
    fn agent_messages_rename_hashes_drop_the_code_hash_and_map_the_deadline_reason() {
        let need = AgentMessage::NeedModule {
            id: "r1".into(),
            file_sha256: sha('c'),
        };
        let v1 = encode_version(&need, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&v1).unwrap(),
            json!({"type": "need_module", "id": "r1", "sha256": sha('c')})
        );
        assert_eq!(
            decode_version::<AgentMessage>(&v1, AgentMessage::TYPES, 1).unwrap(),
            need
        );
        assert!(decode_version::<AgentMessage>(&v1, AgentMessage::TYPES, 2).is_err());

        let handlers = AgentMessage::Handlers {
            id: "l1".into(),
            handlers: vec![HandlerInfo {
                name: "hello".into(),
                file_sha256: sha('d'),
                code_sha256: Some(sha('e')),
                installed_at: "2026-01-01T00:00:00Z".into(),
                key: Some("0".repeat(32)),
            }],
        };
        let v1: Value = serde_json::from_str(&encode_version(&handlers, 1)).unwrap();
        assert_eq!(
            v1["handlers"][0],
            json!({"name": "hello", "module_sha256": sha('d'),
                   "installed_at": "2026-01-01T00:00:00Z", "key": "0".repeat(32)})
        );
        let AgentMessage::Handlers { handlers: back, .. } =
            decode_version::<AgentMessage>(&v1.to_string(), AgentMessage::TYPES, 1).unwrap()
        else {
            panic!("handlers")
        };
        assert_eq!(
            (back[0].file_sha256.clone(), back[0].code_sha256.clone()),
            (sha('d'), None)
        );

        let mut deadline = RunResult::refused(
            Status::Rejected,
            "the task's not_after (2020-01-01T00:00:00Z) passed before it could start; it was not run",
        );
        deadline.reason = Some("deadline_passed".into());
        let mut signature =
            RunResult::refused(Status::Rejected, "the signature expired at unix time 5");
        signature.reason = Some("expired".into());
        signature.file_sha256 = Some(sha('f'));
        signature.code_sha256 = Some(sha('0'));
        for (result, v1_reason) in [(deadline, "expired"), (signature, "expired")] {
            let message = AgentMessage::Result {
                id: "r".into(),
                task_id: "t".into(),
                result: result.clone(),
            };
            let v1: Value = serde_json::from_str(&encode_version(&message, 1)).unwrap();
            assert_eq!(v1["result"]["reason"], v1_reason);
            assert!(v1["result"].get("code_sha256").is_none(), "{v1}");
            assert!(v1["result"].get("file_sha256").is_none(), "{v1}");
            assert_eq!(
                v1["result"].get("module_sha256").cloned(),
                result.file_sha256.clone().map(Value::from)
            );
            let AgentMessage::Result { result: back, .. } =
                decode_version::<AgentMessage>(&v1.to_string(), AgentMessage::TYPES, 1).unwrap()
            else {
                panic!("result")
            };
            // A version-2 connection refuses the version-1 name in a result.
            if result.file_sha256.is_some() {
                assert!(
                    decode_version::<AgentMessage>(&v1.to_string(), AgentMessage::TYPES, 2)
                        .is_err()
                );
            }
            // Everything comes back but the code hash, which version 1 does not carry.
            assert_eq!(
                back,
                RunResult {
                    code_sha256: None,
                    ..result
                }
            );
        }
    }

    #[test]
    fn version_1_has_no_stats_audit_head_or_audit_seq() {
        let status = AgentMessage::Status(crate::StatusReport {
            agent_id: sha('c'),
            agent_version: "0.1.0".into(),
            host: crate::HostFacts::default(),
            running: vec![],
            agent_uptime_secs: 5,
            stats: Some(crate::AgentStats::default()),
            audit: Some(crate::AuditHead {
                seq: 3,
                hash: sha('d'),
                at: None,
            }),
        });
        let v1: Value = serde_json::from_str(&encode_version(&status, 1)).unwrap();
        assert!(
            v1.get("stats").is_none() && v1.get("audit").is_none(),
            "{v1}"
        );
        assert_eq!(v1["agent_uptime_secs"], 5);
        let v2: Value = serde_json::from_str(&encode_version(&status, 2)).unwrap();
        assert_eq!(v2["audit"]["seq"], 3);
        assert!(v2["stats"]["link"].is_object(), "{v2}");

        let welcome = PlatformMessage::Welcome {
            version: 1,
            agent_id: sha('c'),
            enrolled: false,
            audit_seq: Some(7),
        };
        let v1: Value = serde_json::from_str(&encode_version(&welcome, 1)).unwrap();
        assert!(v1.get("audit_seq").is_none(), "{v1}");
        let v2: Value = serde_json::from_str(&encode_version(&welcome, 2)).unwrap();
        assert_eq!(v2["audit_seq"], 7);
    }

    #[test]
    fn version_1_has_no_self_update_messages() {
        // Each version-2-only type is one of the messages, and only those are not carried.
        for kind in V2_ONLY_TYPES {
            assert!(
                AgentMessage::TYPES.contains(kind) || PlatformMessage::TYPES.contains(kind),
                "{kind}"
            );
            assert!(!carries(1, kind) && carries(2, kind), "{kind}");
        }
        for kind in AgentMessage::TYPES.iter().chain(PlatformMessage::TYPES) {
            assert_eq!(carries(1, kind), !V2_ONLY_TYPES.contains(kind), "{kind}");
        }
        let platform = [
            json!({"type": "update", "id": "update-1", "manifest": "bridge-release 1\n"}),
            json!({"type": "update_ack", "id": "update-1"}),
        ];
        let agent = [
            json!({"type": "need_release", "id": "update-1", "offset": 0, "length": 4096}),
            json!({"type": "update_status", "id": "update-1", "state": "failed", "version": "0.2.0",
                   "agent_version": "0.1.0", "reason": "exited", "detail": "exited with status 1"}),
        ];
        let check = |e: crate::codec::DecodeError, kind: &str| {
            assert_eq!(
                (e.code, e.id.as_deref(), e.kind.as_deref()),
                (ErrorCode::UnknownType, Some("update-1"), Some(kind))
            );
            // The types it lists are version 1's.
            let (_, listed) = e.message.split_once("understands").unwrap();
            assert!(
                !listed.contains("update") && !listed.contains("release"),
                "{e}"
            );
        };
        for m in &platform {
            let (text, kind) = (m.to_string(), m["type"].as_str().unwrap());
            // Version 2 has them; on version 1 they are unknown types, answered with the id.
            let decoded =
                decode_version::<PlatformMessage>(&text, PlatformMessage::TYPES, 2).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&encode_version(&decoded, 2)).unwrap(),
                *m
            );
            check(
                decode_version::<PlatformMessage>(&text, PlatformMessage::TYPES, 1).unwrap_err(),
                kind,
            );
        }
        for m in &agent {
            let (text, kind) = (m.to_string(), m["type"].as_str().unwrap());
            let decoded = decode_version::<AgentMessage>(&text, AgentMessage::TYPES, 2).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&encode_version(&decoded, 2)).unwrap(),
                *m
            );
            check(
                decode_version::<AgentMessage>(&text, AgentMessage::TYPES, 1).unwrap_err(),
                kind,
            );
        }
        // The drain's refusal is `busy` in version 1: not recorded either, retry later.
        let mut updating = RunResult::refused(Status::Rejected, "the agent is updating");
        updating.reason = Some("updating".into());
        let message = AgentMessage::Result {
            id: "r".into(),
            task_id: "t".into(),
            result: updating,
        };
        let v1: Value = serde_json::from_str(&encode_version(&message, 1)).unwrap();
        assert_eq!(v1["result"]["reason"], "busy");
        let v2: Value = serde_json::from_str(&encode_version(&message, 2)).unwrap();
        assert_eq!(v2["result"]["reason"], "updating");
        assert!(crate::UNRECORDED_REASONS.contains(&"busy"));
        assert!(crate::UNRECORDED_REASONS.contains(&"updating"));
    }

    #[test]
    fn messages_version_1_leaves_alone_pass_unchanged() {
        for text in [
            r#"{"type":"ack","task_ids":["t1"]}"#,
            r#"{"type":"welcome","version":1,"agent_id":"a","enrolled":false}"#,
            r#"{"type":"cancel","id":"c","task_id":"t"}"#,
        ] {
            let m: PlatformMessage = decode_version(text, PlatformMessage::TYPES, 1).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&encode_version(&m, 1)).unwrap(),
                serde_json::from_str::<Value>(text).unwrap()
            );
        }
        // Errors keep their codes and ids whatever the version.
        let e = decode_version::<PlatformMessage>(
            r#"{"type":"run","id":"x"}"#,
            PlatformMessage::TYPES,
            1,
        )
        .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("x"));
    }
}
