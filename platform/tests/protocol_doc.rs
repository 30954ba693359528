//! Every example message in `docs/protocol.md` decodes into the wire types, and every message
//! type has at least one example.
//!
//! An example is a fenced block whose info string is `json agent:<type>` or
//! `json platform:<type>` (protocol version 2), or `json v1 agent:<type>` / `json v1
//! platform:<type>` (version 1, decoded through the translation both ends use); its content is
//! one message.

use std::collections::BTreeMap;

use bridge_protocol::codec::{decode, decode_version};
use bridge_protocol::{AgentMessage, PlatformMessage};

/// One tagged block.
struct Example {
    line: usize,
    version: u32,
    direction: String,
    kind: String,
    body: String,
}

/// Every tagged block of `doc`.
fn examples(doc: &str) -> Vec<Example> {
    let mut found = Vec::new();
    let mut lines = doc.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let info = info.trim();
        let (version, tag) = match info.strip_prefix("json ").map(str::trim) {
            Some(rest) => match rest.strip_prefix("v1 ") {
                Some(v1) => (1, Some(v1.trim())),
                None => (2, Some(rest)),
            },
            None => (2, None),
        };
        let tagged = tag.and_then(|t| t.split_once(':'));
        let mut body = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                closed = true;
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        assert!(closed, "line {}: unterminated code block", n + 1);
        if let Some((direction, kind)) = tagged {
            found.push(Example {
                line: n + 1,
                version,
                direction: direction.to_string(),
                kind: kind.to_string(),
                body,
            });
        } else {
            assert!(
                !info.contains("agent:") && !info.contains("platform:"),
                "line {}: malformed example tag {info:?} (use `json agent:<type>` or `json platform:<type>`)",
                n + 1
            );
        }
    }
    found
}

/// The `type` of a decoded message, as it serializes.
fn type_of<M: serde::Serialize>(message: &M) -> String {
    serde_json::to_value(message).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_example_decodes_and_every_type_has_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md exists");
    let found = examples(&doc);
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for Example {
        line,
        version,
        direction,
        kind,
        body,
    } in &found
    {
        let text = body.trim();
        // The wire types accept the version-1 names as aliases (old journals): a version-2
        // example must not use them.
        if *version == 2 {
            for old in ["\"module_sha256\"", "\"sha256\""] {
                if text.contains(old) {
                    failures.push(format!(
                        "line {line}: a version-2 example uses the version-1 name {old}"
                    ));
                }
            }
        }
        let decoded = match direction.as_str() {
            "agent" => decode_version::<AgentMessage>(text, AgentMessage::TYPES, *version)
                .map_err(|e| e.to_string())
                .and_then(|m| match &m {
                    // What the platform checks beyond the types holds in the examples too.
                    AgentMessage::Status(status) => status.check().map(|()| type_of(&m)),
                    _ => Ok(type_of(&m)),
                }),
            "platform" => decode_version::<PlatformMessage>(text, PlatformMessage::TYPES, *version)
                .map(|m| type_of(&m))
                .map_err(|e| e.to_string()),
            other => {
                failures.push(format!("line {line}: unknown direction {other:?}"));
                continue;
            }
        };
        match decoded {
            Ok(t) if &t == kind => {
                if *version == 2 {
                    *seen.entry((direction.clone(), kind.clone())).or_default() += 1;
                }
            }
            Ok(t) => failures.push(format!(
                "line {line}: tagged {direction}:{kind} but decodes as {t}"
            )),
            Err(e) => failures.push(format!(
                "line {line}: {direction}:{kind} does not decode: {e}"
            )),
        }
    }
    for (direction, types) in [
        ("agent", AgentMessage::TYPES),
        ("platform", PlatformMessage::TYPES),
    ] {
        for kind in types {
            if !seen.contains_key(&(direction.to_string(), kind.to_string())) {
                failures.push(format!("no example of {direction}:{kind}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "docs/protocol.md:\n{}",
        failures.join("\n")
    );
    assert!(found.len() >= AgentMessage::TYPES.len() + PlatformMessage::TYPES.len());
}

#[test]
fn a_wrong_example_is_caught() {
    let doc = "```json agent:status\n{\"type\":\"status\",\"extra\":1}\n```\n```json\n{}\n```\n";
    let found = examples(doc);
    assert_eq!(found.len(), 1);
    assert!(decode::<AgentMessage>(found[0].body.trim(), AgentMessage::TYPES).is_err());
    // Version-1 examples are told apart by their tag.
    let doc = "```json v1 agent:need_module\n{}\n```\n";
    let found = examples(doc);
    assert_eq!(
        (found[0].version, found[0].kind.as_str()),
        (1, "need_module")
    );
}

/// Every wire name of `values` appears as the first cell of a table row of the document
/// (`| \`name\` |`, alone or in a list such as `| \`a\`, \`b\` |`).
fn missing_rows<T: serde::Serialize>(doc: &str, values: &[T]) -> Vec<String> {
    let firsts: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .collect();
    values
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .filter(|name| {
            let quoted = format!("`{name}`");
            !firsts
                .iter()
                .any(|cell| cell.split(", ").any(|c| c == quoted))
        })
        .collect()
}

/// The part of `doc` under the heading line `heading`, up to the next heading (`## ` or
/// `### `); empty when there is no such heading.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let Some(start) = doc.find(&format!("\n{heading}\n")) else {
        return "";
    };
    let body = &doc[start + heading.len() + 2..];
    let end = body
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| body[i..].starts_with("## ") || body[i..].starts_with("### "))
        .unwrap_or(body.len());
    &body[..end]
}

#[test]
fn every_error_code_status_outcome_state_and_update_reason_is_documented() {
    use bridge_protocol::{CancelOutcome, ErrorCode, Status, TaskState, UpdateReason, UpdateState};
    // Exhaustive matches: a new variant fails to compile here until it is listed (and then
    // documented).
    fn _codes(c: ErrorCode) {
        match c {
            ErrorCode::Malformed
            | ErrorCode::UnknownType
            | ErrorCode::Oversize
            | ErrorCode::TooDeep
            | ErrorCode::UnsupportedVersion
            | ErrorCode::Unexpected
            | ErrorCode::ModuleMismatch
            | ErrorCode::BinaryNotExpected
            | ErrorCode::Refused
            | ErrorCode::NotFound => {}
        }
    }
    fn _statuses(s: Status) {
        match s {
            Status::Ok
            | Status::Error
            | Status::FuelExhausted
            | Status::MemoryLimit
            | Status::Timeout
            | Status::StackOverflow
            | Status::Trap
            | Status::InvalidModule
            | Status::Rejected
            | Status::Cancelled
            | Status::Interrupted => {}
        }
    }
    fn _outcomes(o: CancelOutcome) {
        match o {
            CancelOutcome::Cancelling
            | CancelOutcome::Dequeued
            | CancelOutcome::Finished
            | CancelOutcome::Unknown => {}
        }
    }
    fn _states(s: TaskState) {
        match s {
            TaskState::Queued | TaskState::Running | TaskState::Finished => {}
        }
    }
    fn _update_states(s: UpdateState) {
        match s {
            UpdateState::Refused
            | UpdateState::Staged
            | UpdateState::Succeeded
            | UpdateState::Failed => {}
        }
    }
    fn _update_reasons(r: UpdateReason) {
        match r {
            UpdateReason::MalformedManifest
            | UpdateReason::BadSignature
            | UpdateReason::UnknownKey
            | UpdateReason::WrongPlatform
            | UpdateReason::Downgrade
            | UpdateReason::TooLarge
            | UpdateReason::Mismatch
            | UpdateReason::Unavailable
            | UpdateReason::Unsupported
            | UpdateReason::InProgress
            | UpdateReason::Storage
            | UpdateReason::Exited
            | UpdateReason::NotConfirmed
            | UpdateReason::NotStarted
            | UpdateReason::SwitchFailed => {}
        }
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md exists");
    let mut missing = Vec::new();
    missing.extend(missing_rows(
        &doc,
        &[
            ErrorCode::Malformed,
            ErrorCode::UnknownType,
            ErrorCode::Oversize,
            ErrorCode::TooDeep,
            ErrorCode::UnsupportedVersion,
            ErrorCode::Unexpected,
            ErrorCode::ModuleMismatch,
            ErrorCode::BinaryNotExpected,
            ErrorCode::Refused,
            ErrorCode::NotFound,
        ],
    ));
    missing.extend(missing_rows(&doc, &Status::ALL));
    missing.extend(missing_rows(
        &doc,
        &[
            CancelOutcome::Cancelling,
            CancelOutcome::Dequeued,
            CancelOutcome::Finished,
            CancelOutcome::Unknown,
        ],
    ));
    // The update states and reasons in their own tables (some of their names are also
    // another table's: `refused`, `failed`, `bad_signature`…).
    missing.extend(
        missing_rows(
            section(&doc, "### `update_status`"),
            &[
                UpdateState::Refused,
                UpdateState::Staged,
                UpdateState::Succeeded,
                UpdateState::Failed,
            ],
        )
        .into_iter()
        .map(|s| format!("{s} (update state, under `update_status`)")),
    );
    missing.extend(
        missing_rows(
            section(&doc, "### Update reasons"),
            &[
                UpdateReason::MalformedManifest,
                UpdateReason::BadSignature,
                UpdateReason::UnknownKey,
                UpdateReason::WrongPlatform,
                UpdateReason::Downgrade,
                UpdateReason::TooLarge,
                UpdateReason::Mismatch,
                UpdateReason::Unavailable,
                UpdateReason::Unsupported,
                UpdateReason::InProgress,
                UpdateReason::Storage,
                UpdateReason::Exited,
                UpdateReason::NotConfirmed,
                UpdateReason::NotStarted,
                UpdateReason::SwitchFailed,
            ],
        )
        .into_iter()
        .map(|r| format!("{r} (update reason, under \"Update reasons\")")),
    );
    // The task states are documented in a sentence, not a table.
    for state in [TaskState::Queued, TaskState::Running, TaskState::Finished] {
        let name = serde_json::to_value(state).unwrap();
        let quoted = format!("`{}`", name.as_str().unwrap());
        if !doc.contains(&quoted) {
            missing.push(quoted);
        }
    }
    // Every reason a `rejected` result can carry (the trust policy's, the agent's, the shell
    // rules').
    missing.extend(missing_rows(&doc, bridge_protocol::REASONS));
    // The ones the agent does not record are exactly those the table says are not.
    let unrecorded: Vec<&str> = section(&doc, "### `result`")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` | "))
        .filter(|(_, rest)| rest.starts_with("no |") || rest.starts_with("no ("))
        .map(|(reason, _)| reason)
        .collect();
    assert_eq!(
        unrecorded,
        bridge_protocol::UNRECORDED_REASONS,
        "the reasons docs/protocol.md says are not recorded"
    );
    assert!(
        missing.is_empty(),
        "docs/protocol.md has no table row for {missing:?}"
    );
}
