//! Per-run limits as they travel: what a task asks for, and what a run got.

use serde::{Deserialize, Serialize};

/// One value for each per-run limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Fuel units (roughly one per executed wasm instruction).
    pub fuel: u64,
    /// Linear memory, in bytes, summed over the module's memories.
    pub memory_bytes: u64,
    /// Wall-clock time, in milliseconds.
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr; the rest is counted and dropped.
    pub output_bytes: u64,
}

impl Limits {
    /// The defaults a run gets when neither the task nor the handler asks for anything.
    pub const DEFAULTS: Limits = Limits {
        fuel: 1_000_000_000,
        memory_bytes: 64 << 20,
        timeout_ms: 10_000,
        output_bytes: 1 << 20,
    };

    /// The local maximums an agent allows unless its config says otherwise.
    pub const MAXIMUMS: Limits = Limits {
        fuel: 50_000_000_000,
        memory_bytes: 512 << 20,
        timeout_ms: 15 * 60 * 1000,
        output_bytes: 16 << 20,
    };
}

/// What a task (or a handler's signed claims) asks for; `None` means "the default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    /// Requested fuel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Requested linear memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Requested wall-clock timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Requested output cap in bytes (per stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

/// The limits a run got, and which of them were lowered from what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLimits {
    /// The values in force.
    #[serde(flatten)]
    pub limits: Limits,
    /// Names of the limits (`fuel`, `memory_bytes`, `timeout_ms`, `output_bytes`) that were
    /// clamped below the request, by the local maximum or by the handler's signed capabilities.
    pub clamped: Vec<String>,
}
