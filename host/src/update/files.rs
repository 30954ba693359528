//! The update files' contents (see the parent module for where each lives and who writes it).

use serde::{Deserialize, Serialize};

/// What the agent staged besides the manifest and binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedRequest {
    /// The platform's `update` id (reported with the verdict).
    pub update_id: String,
    /// The version staged (from the verified manifest).
    pub version: String,
    /// The version that staged it.
    pub from_version: String,
    /// The platform asked for a downgrade (honoured only if the config allows it too).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// The unprivileged launcher's finding about a pending version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// The pending version it is about.
    pub version: String,
    /// `exited`, `not_confirmed` or `not_started` (an `UpdateReason`).
    pub reason: bridge_protocol::UpdateReason,
    /// For people: "exited with status 3 before confirming".
    pub detail: String,
}

/// An update's verdict, kept until the platform acknowledges it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The platform's `update` id.
    pub update_id: String,
    /// `succeeded` or `failed`.
    pub state: bridge_protocol::UpdateState,
    /// The version updated to (or not).
    pub version: String,
    /// The version updated from.
    pub from_version: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<bridge_protocol::UpdateReason>,
    /// For people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The launcher's record in the layout (`LAYOUT/state.json`), written only by root.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutState {
    /// The switch in progress or awaiting confirmation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// A switch in progress or awaiting confirmation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// The platform's `update` id.
    pub update_id: String,
    /// The version switched to.
    pub version: String,
    /// The version switched from (what a rollback restores).
    pub from_version: String,
    /// `switching` (links may be half done: finish them) or `switched` (its one start is
    /// under way or over).
    pub phase: Phase,
    /// How long the new version has, from its start, to confirm.
    pub confirm_timeout_secs: u64,
}

/// How far a switch got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded; the links may not point at the new release yet.
    Switching,
    /// The links point at the new release; it has its one start.
    Switched,
}

/// Kills this process with SIGKILL when `BRIDGE_FAILPOINT` names `step`: how tests stop a
/// switch at each named step, as `kill -9` would.
pub fn failpoint(step: &str) {
    if std::env::var(super::ENV_FAILPOINT).as_deref() == Ok(step) {
        eprintln!("bridge: failpoint {step}: killing this process");
        // SAFETY: kill(2) on this process's own id has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
