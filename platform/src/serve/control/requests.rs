//! The control requests as parsed from a line (unknown commands and fields are errors), and a
//! `run` request checked and turned into the hub's [`RunOrder`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use bridge_protocol::LimitRequest;
use bridge_signing::timefmt::{format_rfc3339, parse_rfc3339};
use serde::Deserialize;
use serde_json::Value;

use super::DEFAULT_RUN_WAIT_MS;
use crate::serve::hub::RunOrder;

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// List the enrolled agents.
    Agents {},
    /// Issue a new enrollment token.
    Token {},
    /// Run a task on an agent and wait for the result.
    Run(Box<RunCommand>),
    /// The stored result of a task.
    Result {
        /// The task id.
        task_id: String,
        /// How long to wait for a result that is not stored yet (default 0: do not wait).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// What the platform knows of a task: where a run of it was sent, the state the agent last
    /// reported for it, whether its result is stored.
    Task {
        /// The task id.
        task_id: String,
    },
    /// Ask an agent to cancel a task.
    Cancel {
        /// The agent id.
        agent: String,
        /// The task id.
        task_id: String,
        /// How long to wait for the reply (default
        /// [`DEFAULT_REQUEST_WAIT_MS`](super::DEFAULT_REQUEST_WAIT_MS)).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Install (or replace) a named handler on an agent.
    InstallHandler(Box<InstallCommand>),
    /// Remove a named handler from an agent.
    RemoveHandler {
        /// The agent id.
        agent: String,
        /// The handler's name.
        name: String,
        /// How long to wait for the reply (default
        /// [`DEFAULT_REQUEST_WAIT_MS`](super::DEFAULT_REQUEST_WAIT_MS)).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// List an agent's installed handlers.
    Handlers {
        /// The agent id.
        agent: String,
        /// How long to wait for the reply (default
        /// [`DEFAULT_REQUEST_WAIT_MS`](super::DEFAULT_REQUEST_WAIT_MS)).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Update an agent to a release and wait for the verdict.
    Update(Box<UpdateCommand>),
    /// Start a staged rollout of a release across the connected agents.
    Rollout(Box<RolloutCommand>),
    /// The rollout's status (null if none was started), waiting up to `wait_ms` (default 0)
    /// for it to be over.
    RolloutStatus {
        /// How long to wait for the rollout to be over.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Clear the audit flag of an agent (the operator has looked into it).
    AuditClear {
        /// The agent id.
        agent: String,
    },
    /// Development and test aid: send one raw text frame to an agent and report the `error` it
    /// answers with, if any (within `wait_ms`, default
    /// [`DEFAULT_SEND_WAIT_MS`](super::DEFAULT_SEND_WAIT_MS)).
    Send {
        /// The agent id.
        agent: String,
        /// The frame's text, sent as is.
        text: String,
        /// How long to wait for the agent's error reply.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
}

/// The fields of a `run` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// The agent id.
    pub agent: String,
    /// The module's bytes, base64 (standard alphabet, padded). Exactly one of `module`,
    /// `file_sha256` and `command` is given.
    #[serde(default)]
    pub module: Option<String>,
    /// SHA-256 (hex) of a module file the platform already stores (`module_sha256` is
    /// accepted too).
    #[serde(default, alias = "module_sha256")]
    pub file_sha256: Option<String>,
    /// A command: a handler installed on the agent, or one of its shell rules.
    #[serde(default)]
    pub command: Option<String>,
    /// The task input (default `null`).
    #[serde(default)]
    pub input: Value,
    /// argv\[1..\].
    #[serde(default)]
    pub args: Vec<String>,
    /// The task id (default: a fresh UUID).
    #[serde(default)]
    pub task_id: Option<String>,
    /// Requested limits (`limits.timeout_ms` is the task's time limit).
    #[serde(default)]
    pub limits: LimitRequest,
    /// A detached signature envelope, base64 (with a module only).
    #[serde(default)]
    pub signature: Option<String>,
    /// RFC 3339 time after which the task must not start; sent to the agent in UTC.
    #[serde(default)]
    pub not_after: Option<String>,
    /// The task may run again if the agent dies while running it.
    #[serde(default)]
    pub idempotent: bool,
    /// Stream the task's output as event lines before the response.
    #[serde(default)]
    pub stream: bool,
    /// How long to wait for the result (default [`DEFAULT_RUN_WAIT_MS`]).
    #[serde(default, alias = "timeout_ms")]
    pub wait_ms: Option<u64>,
}

/// The fields of an `install_handler` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallCommand {
    /// The agent id.
    pub agent: String,
    /// The command name the handler answers to.
    pub name: String,
    /// The module's bytes, base64; or `file_sha256`.
    #[serde(default)]
    pub module: Option<String>,
    /// SHA-256 (hex) of a module file the platform already stores (`module_sha256` is
    /// accepted too).
    #[serde(default, alias = "module_sha256")]
    pub file_sha256: Option<String>,
    /// A detached signature envelope, base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// How long to wait for the reply (default
    /// [`DEFAULT_REQUEST_WAIT_MS`](super::DEFAULT_REQUEST_WAIT_MS)).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// The manifest's and the binary's paths of an `update` or `rollout` request (the binary
/// defaults to the manifest's path without `.manifest`); `Err` says what is wrong with them.
fn release_paths(manifest: &Path, binary: Option<&Path>) -> Result<(PathBuf, PathBuf), String> {
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => {
            crate::release::default_binary(manifest).map_err(|e| format!("bad request: {e}"))?
        }
    };
    for (field, path) in [("manifest", manifest), ("binary", &binary)] {
        if !path.is_absolute() {
            return Err(format!(
                "bad request: `{field}` must be an absolute path (the server reads it), not {}",
                path.display()
            ));
        }
    }
    Ok((manifest.to_path_buf(), binary))
}

/// The fields of an `update` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCommand {
    /// The agent id.
    pub agent: String,
    /// The release manifest file (absolute path).
    pub manifest: PathBuf,
    /// The binary (absolute path; default: `manifest` without `.manifest`).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Allow a release older than the agent's version (its config must allow it too).
    #[serde(default)]
    pub allow_downgrade: bool,
    /// How long the agent lets running tasks finish (default: its config's).
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
    /// How long to wait for the verdict (default
    /// [`DEFAULT_UPDATE_WAIT_MS`](super::DEFAULT_UPDATE_WAIT_MS)).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// The fields of a `rollout` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutCommand {
    /// The release manifest file (absolute path).
    pub manifest: PathBuf,
    /// The binary (absolute path; default: `manifest` without `.manifest`).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// How many agents are updated first.
    pub canary: usize,
    /// Each later batch, in percent of the targets (1 to 100).
    pub batch_percent: u32,
    /// The failure count that halts the rollout (at least 1).
    pub max_failures: usize,
    /// Allow a release older than the agents' versions (their configs must allow it too).
    #[serde(default)]
    pub allow_downgrade: bool,
    /// How long each agent lets running tasks finish (default: its config's).
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
    /// How long to wait for each agent's verdict (default
    /// [`DEFAULT_UPDATE_WAIT_MS`](super::DEFAULT_UPDATE_WAIT_MS)); no
    /// verdict in that time is a failure.
    #[serde(default)]
    pub agent_wait_ms: Option<u64>,
}

impl UpdateCommand {
    /// The manifest's and the binary's paths; `Err` says what is wrong with them.
    pub(super) fn paths(&self) -> Result<(PathBuf, PathBuf), String> {
        release_paths(&self.manifest, self.binary.as_deref())
    }
}

impl RolloutCommand {
    /// The manifest's and the binary's paths; `Err` says what is wrong with them.
    pub(super) fn paths(&self) -> Result<(PathBuf, PathBuf), String> {
        release_paths(&self.manifest, self.binary.as_deref())
    }
}

/// Checks a `run` request and turns it into an order; `Err` says what is wrong with it.
pub(super) fn run_order(run: RunCommand) -> Result<RunOrder, String> {
    let given = [
        run.module.is_some(),
        run.file_sha256.is_some(),
        run.command.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(
            "bad request: give exactly one of `module` (base64), `file_sha256` and `command`"
                .into(),
        );
    }
    let module = decode_b64("module", run.module.as_deref())?;
    decode_b64("signature", run.signature.as_deref())?;
    let not_after = match run.not_after.as_deref().map(parse_rfc3339) {
        None => None,
        Some(Ok(unix)) => Some(format_rfc3339(unix)),
        Some(Err(e)) => return Err(format!("bad request: `not_after`: {e}")),
    };
    Ok(RunOrder {
        agent: run.agent,
        module,
        file_sha256: run.file_sha256,
        command: run.command,
        input: run.input,
        args: run.args,
        task_id: run.task_id,
        limits: run.limits,
        signature: run.signature,
        not_after,
        idempotent: run.idempotent,
        stream: run.stream,
        wait: wait(run.wait_ms, DEFAULT_RUN_WAIT_MS),
    })
}

/// The bytes of a base64 field, if given; `Err` says what is wrong with it.
pub(super) fn decode_b64(field: &str, text: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    text.map(|t| b64.decode(t.as_bytes()))
        .transpose()
        .map_err(|e| format!("bad request: `{field}` is not base64: {e}"))
}

/// `wait_ms`, or `default_ms` when not given.
pub(super) fn wait(wait_ms: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(wait_ms.unwrap_or(default_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"agents"}"#).unwrap();
        assert!(matches!(r, ControlRequest::Agents {}));
        let r: ControlRequest = serde_json::from_str(
            r#"{"cmd":"run","agent":"a","module":"AA==","limits":{"fuel":5},"timeout_ms":7}"#,
        )
        .unwrap();
        let ControlRequest::Run(run) = r else {
            panic!()
        };
        assert_eq!(run.limits.fuel, Some(5));
        assert_eq!(
            run.wait_ms,
            Some(7),
            "timeout_ms is the older name of wait_ms"
        );
        assert!(run.input.is_null());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"nope"}"#).is_err());
        for unknown_field in [r#"{"cmd":"token","x":1}"#, r#"{"cmd":"agents","x":1}"#] {
            assert!(serde_json::from_str::<ControlRequest>(unknown_field).is_err());
        }
    }
}
