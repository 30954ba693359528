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
    /// SHA-256 (hex) of the module.
    pub module_sha256: String,
    /// The detached signature (base64), when the module has no embedded one.
    pub signature: Option<String>,
    /// When it was installed (RFC 3339, UTC).
    pub installed_at: String,
    /// The signing key's fingerprint, when known.
    pub key: Option<String>,
}
