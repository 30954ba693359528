//! Every way the agent says no, as one typed enum, and the one place each is mapped to what the
//! platform sees: a task's result (`status`, `reason`, `error`) or an `error` message's code.

use std::time::Duration;

use bridge_protocol::{AgentMessage, ErrorBody, ErrorCode, RunResult, Status};

use crate::journal::JournalError;

/// Why a task did not run (or did not run to its end), or why a request was not carried out.
#[derive(Debug)]
pub enum Refusal {
    /// `run` was malformed (no task id, both or neither of `command` and `file_sha256`…).
    Malformed(String),
    /// Every place for a task in progress is taken.
    Busy { limit: usize },
    /// As many runs as may be in progress already wait for an earlier message about their
    /// task id or command.
    BusyWaiting { limit: usize },
    /// Handler installations in progress at once.
    BusyInstalling { limit: usize },
    /// The agent is draining for a staged release: it takes no new task until it restarts.
    Updating,
    /// The task's `not_after` passed before it could start.
    DeadlinePassed(time::OffsetDateTime),
    /// The command names neither an installed handler nor a shell rule.
    UnknownCommand(String),
    /// The journal could not record the task (so nothing ran).
    NotRecorded(JournalError),
    /// The journal could not record the task's start (so it did not run).
    StartNotRecorded(JournalError),
    /// Cancelled while waiting for a slot.
    CancelledQueued,
    /// Cancelled while its module was being fetched or prepared.
    CancelledBeforeStart,
    /// The agent stopped while the task ran, and the task is not idempotent.
    Interrupted,
    /// `file_sha256` is not a SHA-256 in hex.
    BadModuleHash,
    /// The detached signature is not base64.
    MalformedSignature(String),
    /// The platform did not send the module asked for.
    ModuleUnavailable { sha256: String, waited: Duration },
    /// Preparing the module failed unexpectedly (a panic in the compile thread).
    PreparationFailed(String),
    /// The run could not be set up in the sandbox.
    SetupFailed(String),
    /// `install_handler` named a command that is not a valid name.
    BadHandlerName(String),
    /// `install_handler`'s module is unsigned.
    Unsigned,
    /// `install_handler`'s module is signed for another command.
    NameMismatch { signed_for: String, name: String },
    /// `remove_handler` named no installed handler.
    NoSuchHandler(String),
    /// The journal could not record a handler change.
    HandlerNotRecorded(JournalError),
    /// A refusal a module check made (trust policy, signature, compile), as it reported it.
    Module(Box<RunResult>),
}

impl Refusal {
    /// The task's status.
    fn status(&self) -> Status {
        match self {
            Refusal::CancelledQueued | Refusal::CancelledBeforeStart => Status::Cancelled,
            Refusal::Interrupted => Status::Interrupted,
            Refusal::BadModuleHash => Status::InvalidModule,
            Refusal::PreparationFailed(_) | Refusal::SetupFailed(_) => Status::Trap,
            Refusal::Module(r) => r.status,
            _ => Status::Rejected,
        }
    }

    /// The machine-readable reason (`reason` of a result, the prefix of an `error`'s message).
    pub fn reason(&self) -> Option<&str> {
        Some(match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Busy { .. } | Refusal::BusyWaiting { .. } | Refusal::BusyInstalling { .. } => {
                "busy"
            }
            Refusal::Updating => "updating",
            Refusal::DeadlinePassed(_) => "deadline_passed",
            Refusal::UnknownCommand(_) => "unknown_command",
            Refusal::NotRecorded(JournalError::StorageFull(_)) => "storage_full",
            Refusal::NotRecorded(JournalError::Io(_))
            | Refusal::StartNotRecorded(_)
            | Refusal::HandlerNotRecorded(_) => "storage_error",
            Refusal::MalformedSignature(_) => "malformed_signature",
            Refusal::ModuleUnavailable { .. } => "module_unavailable",
            Refusal::BadHandlerName(_) => "bad_name",
            Refusal::Unsigned => "unsigned",
            Refusal::NameMismatch { .. } => "name_mismatch",
            Refusal::NoSuchHandler(_) => "not_found",
            Refusal::Module(r) => return r.reason.as_deref(),
            Refusal::CancelledQueued
            | Refusal::CancelledBeforeStart
            | Refusal::Interrupted
            | Refusal::BadModuleHash
            | Refusal::PreparationFailed(_)
            | Refusal::SetupFailed(_) => return None,
        })
    }

    /// What happened, for a person.
    pub fn message(&self) -> String {
        match self {
            Refusal::Malformed(m) => m.clone(),
            Refusal::Busy { limit } => {
                format!("the agent already has {limit} tasks running or queued; try again later")
            }
            Refusal::BusyWaiting { limit } => format!(
                "{limit} runs already wait for an earlier message about their task id or command; try again later"
            ),
            Refusal::BusyInstalling { limit } => {
                format!("{limit} handler installations are already in progress")
            }
            Refusal::Updating => "the agent is restarting into a new release and takes no new \
                 task now; nothing was run or recorded: send it again once the agent reconnects"
                .into(),
            Refusal::DeadlinePassed(t) => format!(
                "the task's not_after ({}) passed before it could start; it was not run",
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
            Refusal::UnknownCommand(name) => format!(
                "no handler is installed as {name:?} and no shell rule has that name; nothing was run"
            ),
            Refusal::NotRecorded(e) => format!("the task could not be recorded: {e}"),
            Refusal::StartNotRecorded(e) => {
                format!("the task's start could not be recorded, so it was not run: {e}")
            }
            Refusal::CancelledQueued => "cancelled while queued; it never ran".into(),
            Refusal::CancelledBeforeStart => "cancelled before the handler started".into(),
            Refusal::Interrupted => {
                "the agent stopped (killed, crashed or the host rebooted) while this task ran; \
                 it was not run again (a task may declare itself idempotent to be re-run)"
                    .into()
            }
            Refusal::BadModuleHash => "file_sha256 is not 64 hex characters".into(),
            Refusal::MalformedSignature(e) => {
                format!("the detached signature is not base64: {e}")
            }
            Refusal::ModuleUnavailable { sha256, waited } => format!(
                "the platform did not send module {sha256} within {} s",
                waited.as_secs()
            ),
            Refusal::PreparationFailed(e) => format!("module preparation failed: {e}"),
            Refusal::SetupFailed(e) => format!("the run could not be set up: {e}"),
            Refusal::BadHandlerName(name) => format!(
                "{name:?} is not a valid command name (letters, digits, '-', '_', '.', at most 64)"
            ),
            Refusal::Unsigned => {
                "an installed handler must be signed, with claims naming its command".into()
            }
            Refusal::NameMismatch { signed_for, name } => {
                format!("the module is signed for {signed_for:?}, not {name:?}")
            }
            Refusal::NoSuchHandler(name) => format!("no handler is installed as {name:?}"),
            Refusal::HandlerNotRecorded(e) => e.to_string(),
            Refusal::Module(r) => r.error.clone().unwrap_or_else(|| "refused".into()),
        }
    }

    /// The task's result.
    pub fn into_result(self) -> RunResult {
        if let Refusal::Module(r) = self {
            return *r;
        }
        let mut r = RunResult::refused(self.status(), self.message());
        r.reason = self.reason().map(str::to_string);
        r
    }

    /// The `error` answering request `id` (a malformed `run`, a handler request).
    pub fn into_error(self, id: &str) -> AgentMessage {
        let (code, message) = match &self {
            Refusal::Malformed(m) => (ErrorCode::Malformed, m.clone()),
            Refusal::NoSuchHandler(_) => (ErrorCode::NotFound, self.message()),
            // A task with a bad hash is `invalid_module`; a handler with one, `bad_module`.
            Refusal::BadModuleHash => (
                ErrorCode::Refused,
                format!("bad_module: {}", self.message()),
            ),
            _ => {
                let reason = self
                    .reason()
                    .map_or_else(|| self.status().to_string(), str::to_string);
                (ErrorCode::Refused, format!("{reason}: {}", self.message()))
            }
        };
        AgentMessage::Error(ErrorBody {
            id: Some(id.to_string()),
            code,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_maps_to_the_reason_and_status_the_platform_knows() {
        let r = Refusal::Busy { limit: 3 }.into_result();
        assert_eq!(
            (r.status, r.reason.as_deref()),
            (Status::Rejected, Some("busy"))
        );
        assert!(r.error.unwrap().contains("3 tasks"));
        let r = Refusal::NotRecorded(JournalError::StorageFull("disk".into())).into_result();
        assert_eq!(r.reason.as_deref(), Some("storage_full"));
        let r = Refusal::CancelledQueued.into_result();
        assert_eq!((r.status, r.reason), (Status::Cancelled, None));
        let r = Refusal::Updating.into_result();
        assert_eq!(
            (r.status, r.reason.as_deref()),
            (Status::Rejected, Some("updating"))
        );
        let AgentMessage::Error(e) = Refusal::Unsigned.into_error("req-1") else {
            panic!("an error")
        };
        assert_eq!(e.code, ErrorCode::Refused);
        assert!(e.message.starts_with("unsigned: "), "{}", e.message);
        let AgentMessage::Error(e) = Refusal::NoSuchHandler("x".into()).into_error("r") else {
            panic!("an error")
        };
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "no handler is installed as \"x\"");
    }

    #[test]
    fn every_reason_a_result_carries_is_one_the_protocol_lists() {
        use bridge_protocol::{REASONS, UNRECORDED_REASONS};
        use bridge_signing::RejectReason;
        // The trust policy's.
        for r in [
            RejectReason::Unsigned,
            RejectReason::BadSignature,
            RejectReason::UnknownKey,
            RejectReason::RevokedKey,
            RejectReason::Expired,
            RejectReason::NotYetValid,
            RejectReason::OutOfScope,
            RejectReason::MalformedSignature,
        ] {
            assert!(REASONS.contains(&r.as_str()), "{r}");
        }
        // The agent's, and which of them it does not record.
        let now = time::OffsetDateTime::now_utc();
        let storage = |full: bool| match full {
            true => JournalError::StorageFull("disk".into()),
            false => JournalError::Io("io".into()),
        };
        for (refusal, recorded) in [
            (Refusal::Busy { limit: 1 }, false),
            (Refusal::Updating, false),
            (Refusal::BusyWaiting { limit: 1 }, false),
            (Refusal::DeadlinePassed(now), false),
            (Refusal::UnknownCommand("x".into()), false),
            (Refusal::NotRecorded(storage(true)), false),
            (Refusal::NotRecorded(storage(false)), false),
            (Refusal::MalformedSignature("x".into()), true),
            (
                Refusal::ModuleUnavailable {
                    sha256: "ab".repeat(32),
                    waited: Duration::from_secs(60),
                },
                true,
            ),
        ] {
            let r = refusal.into_result();
            let reason = r.reason.as_deref().unwrap();
            assert!(REASONS.contains(&reason), "{reason}");
            assert_eq!(UNRECORDED_REASONS.contains(&reason), !recorded, "{reason}");
        }
        assert_eq!(
            Refusal::DeadlinePassed(now).into_result().reason.as_deref(),
            Some("deadline_passed")
        );
    }
}
