//! The record types the journal hands out: a task's phase, its record (request, result,
//! acknowledgement), what an acceptance did, and an installed handler's record.

use bridge_protocol::RunRequest;
use serde::{Deserialize, Serialize};

use crate::outcome::RunResult;

/// Where a recorded task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskPhase {
    /// Accepted, not started.
    Queued,
    /// Started: it may have had effects.
    Running,
    /// Finished: the result is stored.
    Done,
}

/// Everything the journal keeps about one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The full request (its `id`, the `run` message id, is what the result answers).
    pub request: RunRequest,
    /// Where the task is.
    pub phase: TaskPhase,
    /// The result, once [`TaskPhase::Done`].
    pub result: Option<RunResult>,
    /// The platform acknowledged the result.
    pub acked: bool,
    /// When the task was accepted (unix milliseconds).
    pub accepted_at_ms: u64,
    /// When the result was stored (unix milliseconds).
    pub finished_at_ms: Option<u64>,
}

/// What [`Journal::accept`](super::Journal::accept) did.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per task; unboxed for callers' ease
pub enum Accept {
    /// The task is now recorded (durably), in phase [`TaskPhase::Queued`].
    New,
    /// The task id was already recorded: here is its record. Nothing was written.
    Seen(TaskRecord),
}

/// An installed handler: a signed module bound to a command name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerRecord {
    /// The command name.
    pub name: String,
    /// SHA-256 (hex) of the module file (the bytes as uploaded, what the module store keeps it
    /// under). Records written before protocol version 2 call it `module_sha256`.
    #[serde(alias = "module_sha256")]
    pub file_sha256: String,
    /// SHA-256 (hex) of the module without its signature sections (what the signature covers);
    /// absent in records written before protocol version 2.
    #[serde(default)]
    pub code_sha256: Option<String>,
    /// The detached signature (base64), when the module has no embedded one.
    pub signature: Option<String>,
    /// When it was installed (RFC 3339, UTC).
    pub installed_at: String,
    /// The signing key's fingerprint, when known.
    pub key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_before_protocol_version_2_still_read() {
        let old = format!(
            r#"{{"name":"hello","module_sha256":"{}","signature":null,"installed_at":"2024-01-01T00:00:00Z","key":null}}"#,
            "ab".repeat(32)
        );
        let h: HandlerRecord = serde_json::from_str(&old).unwrap();
        assert_eq!((h.file_sha256, h.code_sha256), ("ab".repeat(32), None));

        let old = format!(
            r#"{{"request":{{"id":"r","task_id":"t","module_sha256":"{sha}"}},"phase":"done",
                "result":{{"status":"rejected","exit_code":null,"output":null,"stdout":"","stderr":"",
                  "truncated":{{"stdout":false,"stderr":false,"stdout_total_bytes":0,"stderr_total_bytes":0}},
                  "fuel_consumed":null,"memory_peak_bytes":0,"duration_ms":0.0,"limits":null,
                  "error":"the signature expired","reason":"expired","module_sha256":"{sha}"}},
                "acked":false,"accepted_at_ms":1,"finished_at_ms":2}}"#,
            sha = "cd".repeat(32)
        );
        let t: TaskRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(t.request.file_sha256, Some("cd".repeat(32)));
        let result = t.result.unwrap();
        assert_eq!(result.file_sha256, Some("cd".repeat(32)));
        assert_eq!(result.code_sha256, None);
    }
}
