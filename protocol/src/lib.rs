//! # bridge-protocol: what the agent and its platform say to each other
//!
//! One WebSocket over TLS, opened by the agent. Text frames carry one JSON message each, tagged
//! by `type`; binary frames carry module bytes or pieces of an agent release, and only when
//! the agent asked for them (`need_module`, `need_release`). The full specification, with an example of every message, is
//! `docs/protocol.md`; its examples are checked against these types by this crate's tests.
//!
//! - [`AgentMessage`] / [`PlatformMessage`]: the two directions.
//! - [`codec::decode`]: size, depth and type checks before serde, each failure an [`ErrorCode`].
//! - [`RunResult`] and the limit types: the result of a run, as `bridge-daemon call` prints it.
//! - [`v1`]: protocol version 1, served by rewriting the version-2 messages at the wire.
//! - [`schema`]: the JSON Schema of both directions (`protocol/schema/*.schema.json`).

pub mod codec;
pub mod identity;
pub mod limits;
pub mod messages;
pub mod result;
pub mod schema;
pub mod status;
pub mod v1;

pub use limits::{AppliedLimits, LimitRequest, Limits};
pub use messages::{
    AgentMessage, CancelOutcome, ErrorBody, ErrorCode, HandlerInfo, PlatformMessage, RunRequest,
    StreamName, TaskState, UpdateReason, UpdateState, UpdateStatus,
};
pub use result::{RunResult, Status, Truncation, REASONS, UNRECORDED_REASONS};
pub use status::{
    AgentStats, AuditAt, AuditHead, HostFacts, JournalStats, LinkStats, StatusReport, StoreStats,
    TaskStats,
};

/// The protocol version of this crate's types: the newest version either end speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// Every protocol version the agent and `bridgectl serve` speak, in order of preference (the
/// agent's `hello.versions`). Version 1 is served by translation at the wire ([`v1`]) until
/// 2027-12-31.
pub const VERSIONS: &[u32] = &[2, 1];

/// The largest text frame either end accepts, in bytes.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// The largest binary frame (a module upload) either end accepts, in bytes.
pub const MAX_BINARY_BYTES: usize = 32 << 20;

/// The longest identifier (`id`, `task_id`, each of an `ack`'s `task_ids`, a handler `name`)
/// either end accepts, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// The deepest nesting of JSON arrays and objects accepted in a message.
pub const MAX_DEPTH: usize = 64;

/// The WebSocket path agents connect to.
pub const AGENT_PATH: &str = "/agent";
