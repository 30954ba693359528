//! The messages: one enum for each direction, JSON with a `type` tag.

use serde::{Deserialize, Serialize};

use crate::limits::LimitRequest;
use crate::result::RunResult;

/// Machine-readable error codes carried by `error` messages (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or JSON that does not match the message's schema.
    Malformed,
    /// A `type` this end does not know.
    UnknownType,
    /// A frame larger than the limit for its kind.
    Oversize,
    /// JSON nested deeper than [`crate::MAX_DEPTH`].
    TooDeep,
    /// No protocol version both ends speak.
    UnsupportedVersion,
    /// A message that is valid but not expected now (e.g. module bytes nobody asked for).
    Unexpected,
    /// Module bytes whose SHA-256 is not the one announced.
    ModuleMismatch,
    /// A binary frame (this end only accepts binary frames for module uploads).
    BinaryNotExpected,
}

impl ErrorCode {
    /// The wire name, e.g. `"unknown_type"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Oversize => "oversize",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::ModuleMismatch => "module_mismatch",
            ErrorCode::BinaryNotExpected => "binary_not_expected",
        }
    }
}

/// An error reply: what went wrong with a message this end received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The `id` of the message this answers, when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What kind of error.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

/// Facts about the agent's host, sent in `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// The host name.
    pub hostname: String,
    /// Operating system (`linux`…).
    pub os: String,
    /// CPU architecture (`x86_64`, `aarch64`…).
    pub arch: String,
    /// Seconds since the host booted.
    pub uptime_secs: u64,
    /// The 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
}

/// The agent's periodic report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// The agent's id (hex SHA-256 of its public key).
    pub agent_id: String,
    /// The agent's version.
    pub agent_version: String,
    /// Facts about its host.
    pub host: HostFacts,
    /// Task ids running now.
    pub running: Vec<String>,
    /// Seconds since the agent started.
    pub agent_uptime_secs: u64,
}

/// A request to run a signed module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Correlates the reply (`result`, `error`, `need_module`).
    pub id: String,
    /// The platform's task id (reported back in the result).
    pub task_id: String,
    /// SHA-256 (hex) of the module bytes. The agent runs what it has under that hash, or
    /// answers `need_module` and waits for a binary frame holding exactly those bytes.
    pub module_sha256: String,
    /// A detached signature (base64 of the envelope), when the module has no embedded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The task input: any JSON value, given to the handler on stdin.
    #[serde(default)]
    pub input: serde_json::Value,
    /// argv\[1..\] for the handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Requested limits (clamped by the agent).
    #[serde(default)]
    pub limits: LimitRequest,
}

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First message on every connection: the versions the agent speaks.
    Hello {
        /// Protocol versions, in order of preference.
        versions: Vec<u32>,
        /// The agent's id.
        agent_id: String,
        /// The agent's software version.
        agent_version: String,
    },
    /// Periodic status (also right after `welcome`).
    Status(StatusReport),
    /// "Send me the bytes of this module" (answered with one binary frame).
    NeedModule {
        /// The `run` message this is for.
        id: String,
        /// The module wanted.
        sha256: String,
    },
    /// The outcome of a `run`.
    Result {
        /// The `run` message this answers.
        id: String,
        /// The platform's task id.
        task_id: String,
        /// What happened.
        result: RunResult,
    },
    /// Something the agent could not accept.
    Error(ErrorBody),
}

/// Messages the platform sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PlatformMessage {
    /// The answer to `hello`: the version chosen and the agent id the platform authenticated.
    Welcome {
        /// The protocol version both ends now speak.
        version: u32,
        /// The agent id the platform derived from the agent's TLS client certificate.
        agent_id: String,
        /// Whether this connection enrolled the agent (first contact with a token).
        enrolled: bool,
    },
    /// Run a module.
    Run(RunRequest),
    /// Something the platform could not accept.
    Error(ErrorBody),
}

impl AgentMessage {
    /// The `type` tags of every agent message.
    pub const TYPES: &'static [&'static str] =
        &["hello", "status", "need_module", "result", "error"];
}

impl PlatformMessage {
    /// The `type` tags of every platform message.
    pub const TYPES: &'static [&'static str] = &["welcome", "run", "error"];
}
