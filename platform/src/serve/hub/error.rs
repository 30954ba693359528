//! Why a request to an agent, or a wait for a task's result, produced no answer: the one error
//! type of the hub, which the control interface turns into its `error` text.

/// Why a request to an agent produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// No enrolled agent has this id.
    UnknownAgent(String),
    /// The agent is enrolled but not connected.
    NotConnected(String),
    /// The connection closed (or was replaced) before the reply came (requests other than
    /// `run`, which wait across reconnections).
    ConnectionLost(String),
    /// The agent answered with an `error` message (`code: message`).
    Refused(String),
    /// No result within the time given (milliseconds).
    Timeout(u64),
    /// No reply within the time given (milliseconds).
    NoReply(u64),
    /// No stored result for this task id (within the time given, in milliseconds).
    NoResult(String, u64),
    /// The task id (first field) already has a result, from another agent (second field).
    TaskIdTaken(String, String),
    /// The request itself was unusable.
    BadRequest(String),
    /// The agent answered with a reply of another kind than the request calls for.
    Unexpected(String),
    /// The server is stopping.
    ShuttingDown,
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubError::UnknownAgent(a) => write!(f, "unknown agent {a}"),
            HubError::NotConnected(a) => write!(f, "agent {a} is not connected"),
            HubError::ConnectionLost(why) => {
                write!(f, "the agent's connection was lost while waiting: {why}")
            }
            HubError::Refused(why) => write!(f, "the agent refused: {why}"),
            HubError::Timeout(ms) => write!(f, "timeout: no result within {ms} ms"),
            HubError::NoReply(ms) => write!(f, "timeout: no reply within {ms} ms"),
            HubError::NoResult(task, 0) => write!(f, "no result for task {task}"),
            HubError::NoResult(task, ms) => {
                write!(f, "no result for task {task} (waited {ms} ms)")
            }
            HubError::TaskIdTaken(task, agent) => write!(
                f,
                "task id {task} already has a result, from agent {agent}: task ids are global on \
                 this platform, use another one"
            ),
            HubError::BadRequest(why) => write!(f, "bad request: {why}"),
            HubError::Unexpected(reply) => write!(f, "the agent answered unexpectedly: {reply}"),
            HubError::ShuttingDown => f.write_str("the platform is shutting down"),
        }
    }
}

impl std::error::Error for HubError {}
