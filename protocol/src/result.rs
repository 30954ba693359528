//! The result of one handler run, as the agent reports it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits::AppliedLimits;

/// Every way a handler run can end. Serialized in `snake_case` (`"fuel_exhausted"`…).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The handler exited 0.
    Ok,
    /// The handler exited with a non-zero code (its own error).
    Error,
    /// The handler used all the fuel it was given.
    FuelExhausted,
    /// The handler tried to grow linear memory (or a table) past its limit.
    MemoryLimit,
    /// The wall-clock deadline passed.
    Timeout,
    /// The wasm call stack overflowed.
    StackOverflow,
    /// Any other wasm trap (unreachable, out-of-bounds access, a Rust panic…).
    Trap,
    /// The module was not run: not wasm, failed validation, imports something the agent does not
    /// provide, or exports no `_start`.
    InvalidModule,
    /// The module was refused by the trust policy before anything of it was compiled.
    Rejected,
    /// The run was cancelled before it finished (a WASM handler interrupted, a shell command's
    /// tree killed) or while it was queued.
    Cancelled,
    /// The agent stopped (killed, host rebooted) while the task ran; it was not run again.
    Interrupted,
}

impl Status {
    /// Every status, in declaration order (the order of the agent's per-status counters).
    pub const ALL: [Status; 11] = [
        Status::Ok,
        Status::Error,
        Status::FuelExhausted,
        Status::MemoryLimit,
        Status::Timeout,
        Status::StackOverflow,
        Status::Trap,
        Status::InvalidModule,
        Status::Rejected,
        Status::Cancelled,
        Status::Interrupted,
    ];

    /// The `snake_case` name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::FuelExhausted => "fuel_exhausted",
            Status::MemoryLimit => "memory_limit",
            Status::Timeout => "timeout",
            Status::StackOverflow => "stack_overflow",
            Status::Trap => "trap",
            Status::InvalidModule => "invalid_module",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
            Status::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which captured streams lost bytes to the output cap, and how many bytes each produced in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Truncation {
    /// stdout produced more than the cap.
    pub stdout: bool,
    /// stderr produced more than the cap.
    pub stderr: bool,
    /// Everything the handler wrote to stdout, kept or not.
    pub stdout_total_bytes: u64,
    /// Everything the handler wrote to stderr, kept or not.
    pub stderr_total_bytes: u64,
}

/// Every `reason` a `rejected` result can carry.
///
/// The agent does not record (and a platform may send again under the same task id) the
/// refusals in [`UNRECORDED_REASONS`]; every other one is the task's result.
pub const REASONS: &[&str] = &[
    // The agent could not take the task (not recorded).
    "busy",
    "updating",
    "storage_full",
    "storage_error",
    "unknown_command",
    "deadline_passed",
    // The module (recorded).
    "module_unavailable",
    "unsigned",
    "bad_signature",
    "unknown_key",
    "revoked_key",
    "expired",
    "not_yet_valid",
    "out_of_scope",
    "malformed_signature",
    // A shell rule (recorded).
    "invalid_rule",
    "bad_argument",
    "rule_unavailable",
];

/// The refusals the agent does not record: nothing ran, and the same task id may be sent again
/// later and run then.
pub const UNRECORDED_REASONS: &[&str] = &[
    "busy",
    "updating",
    "storage_full",
    "storage_error",
    "unknown_command",
    "deadline_passed",
];

/// The result of one handler run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunResult {
    /// How the run ended.
    pub status: Status,
    /// The handler's exit code, when it exited (`ok` and `error`); `null` otherwise.
    pub exit_code: Option<i32>,
    /// The handler's stdout parsed as JSON, or `null` when it is empty, truncated or not JSON.
    pub output: serde_json::Value,
    /// What was kept of stdout (lossy UTF-8).
    pub stdout: String,
    /// What was kept of stderr (lossy UTF-8).
    pub stderr: String,
    /// Whether output was cut, with the total byte counts.
    pub truncated: Truncation,
    /// Fuel the run consumed (`null` when the module never started).
    pub fuel_consumed: Option<u64>,
    /// Peak linear memory the run reached, in bytes.
    pub memory_peak_bytes: u64,
    /// Wall-clock time from instantiation to the end of the run, in milliseconds.
    pub duration_ms: f64,
    /// The limits in force (`null` when the module was refused before limits were resolved).
    pub limits: Option<AppliedLimits>,
    /// A human-readable reason when `status` is not `ok`.
    pub error: Option<String>,
    /// With `status: rejected`, the machine-readable refusal reason (`unsigned`,
    /// `bad_signature`…; the list is `REASONS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "reason_schema")]
    pub reason: Option<String>,
    /// SHA-256 (hex) of the module file that was run or refused (the bytes as uploaded), when
    /// the task named a module. (Version 1 and journals written before version 2 call it
    /// `module_sha256`.)
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "module_sha256"
    )]
    pub file_sha256: Option<String>,
    /// SHA-256 (hex) of the module without its signature sections (what a signature covers),
    /// when the agent parsed the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
    /// `true` when the agent no longer holds this result's output: `output`, `stdout` and
    /// `stderr` are empty, everything else is as the run ended. The agent answers so to a
    /// repeated task id whose result was acknowledged and then evicted to keep its journal
    /// within its size limit, and stores a result so when the journal has no room for its
    /// output. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub evicted: bool,
    /// `true` when a cgroup bounded the run: a shell command that ran inside a task cgroup of
    /// its own, killed as a whole when the run ended. Absent (false) for WASM handlers and for
    /// shell commands bounded by their supervisor alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cgroup: bool,
}

/// The schema of `reason`: one of [`REASONS`] (or null, which reads as absent).
fn reason_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut values: Vec<serde_json::Value> = REASONS.iter().map(|r| (*r).into()).collect();
    values.push(serde_json::Value::Null);
    schemars::json_schema!({ "type": ["string", "null"], "enum": values })
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl RunResult {
    /// A result for a module that never ran (`invalid_module`, `rejected`): no output, no fuel.
    pub fn refused(status: Status, error: impl Into<String>) -> RunResult {
        RunResult {
            status,
            exit_code: None,
            output: serde_json::Value::Null,
            stdout: String::new(),
            stderr: String::new(),
            truncated: Truncation::default(),
            fuel_consumed: None,
            memory_peak_bytes: 0,
            duration_ms: 0.0,
            limits: None,
            error: Some(error.into()),
            reason: None,
            file_sha256: None,
            code_sha256: None,
            evicted: false,
            cgroup: false,
        }
    }

    /// This result without its output (`output`, `stdout`, `stderr` emptied, `evicted` set):
    /// what the agent keeps of a result it no longer has room for.
    pub fn without_output(&self) -> RunResult {
        RunResult {
            output: serde_json::Value::Null,
            stdout: String::new(),
            stderr: String::new(),
            evicted: true,
            ..self.clone()
        }
    }

    /// Whether the run succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Status::ALL`] holds every status once, in declaration order: the match below stops
    /// compiling when a status is added, until it (and so `ALL`) names it.
    #[test]
    fn all_lists_every_status_once_in_order() {
        let position = |s: Status| match s {
            Status::Ok => 0,
            Status::Error => 1,
            Status::FuelExhausted => 2,
            Status::MemoryLimit => 3,
            Status::Timeout => 4,
            Status::StackOverflow => 5,
            Status::Trap => 6,
            Status::InvalidModule => 7,
            Status::Rejected => 8,
            Status::Cancelled => 9,
            Status::Interrupted => 10,
        };
        for (i, s) in Status::ALL.into_iter().enumerate() {
            assert_eq!(position(s), i, "{s}");
        }
    }
}
