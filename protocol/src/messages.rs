//! The messages: one enum for each direction, JSON with a `type` tag.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits::LimitRequest;
use crate::result::RunResult;
use crate::status::StatusReport;

/// Machine-readable error codes carried by `error` messages (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or JSON that does not match the message's schema.
    Malformed,
    /// A `type` this end does not know.
    UnknownType,
    /// A frame larger than the limit for its kind.
    Oversize,
    /// JSON nested deeper than `MAX_DEPTH` (64).
    TooDeep,
    /// No protocol version both ends speak.
    UnsupportedVersion,
    /// A message that is valid but not expected now (e.g. module bytes nobody asked for).
    Unexpected,
    /// Module bytes whose SHA-256 is not the one announced.
    ModuleMismatch,
    /// A binary frame (this end only accepts binary frames for module uploads).
    BinaryNotExpected,
    /// A request the agent understood and refuses (e.g. installing a handler whose signature
    /// does not name the command); the message starts with the machine-readable reason.
    Refused,
    /// The request names something this end does not have (e.g. removing an unknown handler).
    NotFound,
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
            ErrorCode::Refused => "refused",
            ErrorCode::NotFound => "not_found",
        }
    }
}

/// An error reply: what went wrong with a message this end received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The `id` of the message this answers, when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub id: Option<String>,
    /// What kind of error.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A task: run a named command, or a signed module by its hash.
///
/// Exactly one of `command` and `file_sha256` is given. A `command` resolves to the handler
/// installed under that name, else to the agent's allowlisted shell rule of that name, else
/// the task is `rejected` with reason `unknown_command`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Correlates the replies (`accepted`, `result`, `error`, `need_module`).
    #[schemars(length(max = 256))]
    pub id: String,
    /// The platform's task id. The agent runs a task id at most once: a `run` repeating a task
    /// id it has seen is answered from its journal (the stored result, or the current state).
    #[schemars(length(max = 256))]
    pub task_id: String,
    /// The command to run (an installed handler or a shell rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// SHA-256 (hex) of the exact bytes of a module file to run directly (the signed file,
    /// embedded signature included). The agent runs what it has under that hash, or answers
    /// `need_module` and waits for a binary frame holding exactly those bytes. (Version 1 and
    /// journals written before version 2 call it `module_sha256`.)
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "module_sha256"
    )]
    pub file_sha256: Option<String>,
    /// A detached signature (base64 of the envelope), when the module has no embedded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The task input: any JSON value, given to a handler on stdin (shell commands get
    /// `/dev/null`).
    #[serde(default)]
    pub input: serde_json::Value,
    /// argv\[1..\] for the handler, or the extra arguments for a shell rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Requested limits (clamped by the agent).
    #[serde(default)]
    pub limits: LimitRequest,
    /// RFC 3339 time after which the task must not start (`rejected`, reason
    /// `deadline_passed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// The task may run again after the agent died while running it (instead of ending as
    /// `interrupted`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub idempotent: bool,
    /// Send stdout/stderr as `chunk` messages while the task runs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
}

/// Where a task is, as the agent reports it in `accepted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Recorded, waiting for a free slot.
    Queued,
    /// Running now.
    Running,
    /// Finished: the result is in the agent's outbox (or was acknowledged).
    Finished,
}

/// Which output stream a `chunk` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a `cancel` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The task was running and is being stopped; its `result` (`cancelled`) follows.
    Cancelling,
    /// The task was queued and was removed; its `result` (`cancelled`) follows.
    Dequeued,
    /// The task had already finished; nothing changes.
    Finished,
    /// The agent has no record of this task id.
    Unknown,
}

/// One installed handler, as `handlers` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HandlerInfo {
    /// The command name.
    pub name: String,
    /// SHA-256 (hex) of the module file as uploaded (what `install_handler` named).
    pub file_sha256: String,
    /// SHA-256 (hex) of the module without its signature sections: what the signature covers.
    /// Always sent by a version-2 agent; absent only when read from a version-1 agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required, with = "String")]
    pub code_sha256: Option<String>,
    /// When it was installed (RFC 3339, UTC).
    pub installed_at: String,
    /// The id of the key that signed the module (32 hex characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
        /// SHA-256 (hex) of the module file wanted: the binary frame answering must hash to it.
        file_sha256: String,
    },
    /// The task is recorded in the agent's journal (sent only after the record is durable) and
    /// will produce exactly one `result`. Also the answer to a repeated task id that has not
    /// finished yet.
    Accepted {
        /// The `run` message this answers.
        id: String,
        /// The platform's task id.
        task_id: String,
        /// Where the task is.
        state: TaskState,
    },
    /// Output of a running task that asked for `stream`: in order per task (`seq` from 0),
    /// all before its `result`. `data` is UTF-8 (invalid bytes replaced).
    Chunk {
        /// The platform's task id.
        task_id: String,
        /// 0, 1, 2… per task, across both streams.
        seq: u64,
        /// stdout or stderr.
        stream: StreamName,
        /// The bytes, as text.
        data: String,
        /// Bytes not streamed since the previous chunk (rate or size bound); they are still in
        /// the final result's head/tail capture when they fit there.
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped_bytes: u64,
    },
    /// The answer to `cancel`.
    CancelReply {
        /// The `cancel` message this answers.
        id: String,
        /// The task id.
        task_id: String,
        /// What the agent found.
        outcome: CancelOutcome,
    },
    /// The installed handlers: the answer to `install_handler`, `remove_handler` and
    /// `list_handlers` (the list after the change).
    Handlers {
        /// The message this answers.
        id: String,
        /// Every installed handler, by name.
        handlers: Vec<HandlerInfo>,
    },
    /// The outcome of a `run`. Kept in the agent's durable outbox and sent again after every
    /// reconnect until the platform acknowledges it (`ack`).
    Result {
        /// The `run` message this answers.
        id: String,
        /// The platform's task id.
        task_id: String,
        /// What happened.
        result: RunResult,
    },
    /// "Send me these bytes of the release being updated to" (answered with one binary frame
    /// holding exactly `length` bytes of the binary from `offset`).
    NeedRelease {
        /// The `update` this is for.
        id: String,
        /// Where the bytes start in the release binary.
        offset: u64,
        /// How many bytes (at most `MAX_BINARY_BYTES`, 32 MiB, and never past the manifest's `size`).
        #[schemars(range(min = 1, max = 33554432))]
        length: u64,
    },
    /// Where an update stands: `refused` and `staged` answer an `update`; `succeeded` and
    /// `failed` are its verdict, kept by the agent and sent after every reconnect until the
    /// platform answers `update_ack`.
    UpdateStatus(UpdateStatus),
    /// Something the agent could not accept.
    Error(ErrorBody),
}

/// Where an update stands (the body of `update_status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateStatus {
    /// The `update` message's id.
    #[schemars(length(max = 256))]
    pub id: String,
    /// Where it stands.
    pub state: UpdateState,
    /// The version the update is to (from its manifest; empty when the manifest did not parse).
    #[schemars(length(max = 64))]
    pub version: String,
    /// The version of the agent sending this.
    pub agent_version: String,
    /// Why, for `refused` and `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<UpdateReason>,
    /// What happened, for people (at most 1024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub detail: Option<String>,
}

/// The states an update reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Not carried out; nothing changed on the agent's machine.
    Refused,
    /// Verified and handed to the launcher: the agent drains its tasks and restarts into it.
    Staged,
    /// The new version started, connected and stayed up for the health window (sent by it).
    Succeeded,
    /// The new version did not confirm; the previous one runs again (sent by it).
    Failed,
}

/// Why an update was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateReason {
    /// Refused: the manifest does not parse (format, field order, size).
    MalformedManifest,
    /// Refused: the manifest's signature does not verify under the key it names.
    BadSignature,
    /// Refused: the manifest is signed by a key that is not one of the agent's release keys.
    UnknownKey,
    /// Refused: the release is for another OS or architecture.
    WrongPlatform,
    /// Refused: the release is not newer than the running version (and a downgrade was not
    /// both asked for and allowed by the agent's config).
    Downgrade,
    /// Refused: the release is larger than the agent's `update.max_binary_bytes`.
    TooLarge,
    /// Refused: the bytes received do not match the manifest's size or SHA-256.
    Mismatch,
    /// Refused: the platform did not send the bytes asked for in time.
    Unavailable,
    /// Refused: this agent cannot update itself (it was not started by the launcher, or has
    /// no release keys configured).
    Unsupported,
    /// Refused: another update is in progress.
    InProgress,
    /// Refused: the release could not be written to the agent's state directory.
    Storage,
    /// Failed: the new version exited before confirming.
    Exited,
    /// Failed: the new version did not confirm within the launcher's confirm timeout.
    NotConfirmed,
    /// Failed: the new version could not be started (not an executable, wrong format…).
    NotStarted,
    /// Failed: the launcher's own check of the staged release refused it, or switching failed.
    SwitchFailed,
}

/// Messages the platform sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
        /// The sequence number of the newest audit record whose hash the platform has stored
        /// for this agent (from an earlier `status`). The agent answers with that record's hash
        /// as its chain now holds it (`status.audit.at`), so a rewritten chain shows. Absent
        /// when the platform has stored none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_seq: Option<u64>,
    },
    /// Run a task.
    Run(RunRequest),
    /// Stop a task: remove it from the queue, or stop it running.
    Cancel {
        /// Correlates the `cancel_reply`.
        #[schemars(length(max = 256))]
        id: String,
        /// The task to stop.
        #[schemars(length(max = 256))]
        task_id: String,
    },
    /// "I have stored these results": the agent drops them from its outbox.
    Ack {
        /// Task ids whose `result` the platform has stored.
        #[schemars(inner(length(max = 256)))]
        task_ids: Vec<String>,
    },
    /// Install (or replace) a named handler: a signed module whose claims name the command.
    InstallHandler {
        /// Correlates the reply (`handlers` or `error`; `need_module` first if the agent lacks the bytes).
        #[schemars(length(max = 256))]
        id: String,
        /// The command name.
        #[schemars(length(max = 256))]
        name: String,
        /// SHA-256 (hex) of the module file (the signed file, as uploaded).
        file_sha256: String,
        /// A detached signature (base64), when the module has no embedded one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// Remove a named handler.
    RemoveHandler {
        /// Correlates the reply.
        #[schemars(length(max = 256))]
        id: String,
        /// The command name.
        #[schemars(length(max = 256))]
        name: String,
    },
    /// List the installed handlers.
    ListHandlers {
        /// Correlates the reply.
        #[schemars(length(max = 256))]
        id: String,
    },
    /// Update the agent to the release this signed manifest describes; the agent fetches the
    /// binary with `need_release` and answers `update_status`.
    Update {
        /// Correlates `need_release` and `update_status`.
        #[schemars(length(max = 256))]
        id: String,
        /// The signed release manifest, as `bridgectl release sign` wrote it (at most 4096 bytes).
        #[schemars(length(max = 4096))]
        manifest: String,
        /// Allow a release older than the running version (the agent's config must allow it too).
        #[serde(default, skip_serializing_if = "is_false")]
        allow_downgrade: bool,
        /// How long running tasks may take to finish before the agent restarts (default: the
        /// agent's `update.drain_timeout_secs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain_timeout_ms: Option<u64>,
    },
    /// "I have recorded this update's verdict": the agent stops sending its `update_status`.
    UpdateAck {
        /// The update's id.
        #[schemars(length(max = 256))]
        id: String,
    },
    /// Something the platform could not accept.
    Error(ErrorBody),
}

impl AgentMessage {
    /// The `type` tags of every agent message.
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "status",
        "need_module",
        "accepted",
        "chunk",
        "cancel_reply",
        "handlers",
        "result",
        "need_release",
        "update_status",
        "error",
    ];
}

impl PlatformMessage {
    /// Checks the message's identifiers against [`crate::MAX_ID_BYTES`]; the error names the
    /// field. Run after decoding: an id is echoed in replies and logs, so it must be small.
    pub fn check_ids(&self) -> Result<(), String> {
        let check = |field: &str, value: &str| {
            if value.len() > crate::MAX_ID_BYTES {
                Err(format!(
                    "`{field}` is {} bytes; the limit is {} bytes",
                    value.len(),
                    crate::MAX_ID_BYTES
                ))
            } else {
                Ok(())
            }
        };
        match self {
            PlatformMessage::Welcome { agent_id, .. } => check("agent_id", agent_id),
            PlatformMessage::Run(r) => {
                check("id", &r.id)?;
                check("task_id", &r.task_id)
            }
            PlatformMessage::Cancel { id, task_id } => {
                check("id", id)?;
                check("task_id", task_id)
            }
            PlatformMessage::Ack { task_ids } => {
                task_ids.iter().try_for_each(|t| check("task_ids", t))
            }
            PlatformMessage::InstallHandler { id, name, .. }
            | PlatformMessage::RemoveHandler { id, name } => {
                check("id", id)?;
                check("name", name)
            }
            PlatformMessage::ListHandlers { id }
            | PlatformMessage::Update { id, .. }
            | PlatformMessage::UpdateAck { id } => check("id", id),
            PlatformMessage::Error(e) => e.id.as_deref().map_or(Ok(()), |id| check("id", id)),
        }
    }

    /// The `id` of this message, if it has one that is short enough to echo.
    pub fn echo_id(&self) -> Option<&str> {
        let id: &str = match self {
            PlatformMessage::Run(r) => &r.id,
            PlatformMessage::Cancel { id, .. }
            | PlatformMessage::InstallHandler { id, .. }
            | PlatformMessage::RemoveHandler { id, .. }
            | PlatformMessage::ListHandlers { id }
            | PlatformMessage::Update { id, .. }
            | PlatformMessage::UpdateAck { id } => id,
            PlatformMessage::Error(e) => e.id.as_deref()?,
            PlatformMessage::Welcome { .. } | PlatformMessage::Ack { .. } => return None,
        };
        (id.len() <= crate::MAX_ID_BYTES).then_some(id)
    }

    /// The `type` tags of every platform message.
    pub const TYPES: &'static [&'static str] = &[
        "welcome",
        "run",
        "cancel",
        "ack",
        "install_handler",
        "remove_handler",
        "list_handlers",
        "update",
        "update_ack",
        "error",
    ];
}
