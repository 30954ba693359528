//! Requests to an agent other than `run` (`cancel`, handler commands), by message id: each ends
//! with the reply, the agent's `error`, the end of the connection it was sent on, or a timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bridge_protocol::codec::encode;
use bridge_protocol::{CancelOutcome, HandlerInfo, PlatformMessage};
use tokio::sync::oneshot;

use super::{lock, millis, random_hex, take_if, Hub, HubError, Outbound};

/// A reply to a request other than `run`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer to `cancel`.
    Cancel {
        /// The task id.
        task_id: String,
        /// What the agent found.
        outcome: CancelOutcome,
    },
    /// The installed handlers (the answer to the handler commands).
    Handlers(Vec<HandlerInfo>),
}

/// A request other than `run` waiting for the agent's reply.
#[derive(Debug)]
struct PendingRequest {
    agent_id: String,
    conn_id: u64,
    reply: oneshot::Sender<Result<Reply, HubError>>,
}

/// The requests waiting for a reply, by message id.
#[derive(Debug, Default)]
pub(super) struct PendingRequests {
    by_id: Mutex<HashMap<String, PendingRequest>>,
}

impl PendingRequests {
    /// Removes and returns the request `id` if it was sent to `agent_id`.
    fn take(&self, agent_id: &str, id: &str) -> Option<PendingRequest> {
        take_if(&mut lock(&self.by_id), id, |r| r.agent_id == agent_id)
    }

    /// Fails the requests sent on connection `conn_id`, which ended (`why`).
    pub(super) fn fail_connection(&self, conn_id: u64, why: &str) {
        let failed: Vec<(String, PendingRequest)> = {
            let mut by_id = lock(&self.by_id);
            let ids: Vec<String> = by_id
                .iter()
                .filter(|(_, r)| r.conn_id == conn_id)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| by_id.remove(&id).map(|r| (id, r)))
                .collect()
        };
        for (id, r) in failed {
            tracing::warn!(agent_id = %r.agent_id, request = %id, "request failed: the connection ended: {why}");
            let _ = r.reply.send(Err(HubError::ConnectionLost(why.to_string())));
        }
    }

    /// Ends every request with `error` (at shutdown).
    pub(super) fn fail_all(&self, error: &HubError) {
        let requests: Vec<PendingRequest> = lock(&self.by_id).drain().map(|(_, r)| r).collect();
        for r in requests {
            let _ = r.reply.send(Err(error.clone()));
        }
    }
}

impl Hub {
    /// Sends the message `make(id)` (with a fresh message id starting with `prefix`) to the
    /// agent's live connection and waits up to `wait` for the reply carrying that id.
    async fn request(
        &self,
        agent: &str,
        prefix: &str,
        make: impl FnOnce(String) -> PlatformMessage,
        wait: Duration,
    ) -> Result<Reply, HubError> {
        let (outbox, conn_id) = self.outbox_of(agent)?;
        let id = format!("{prefix}-{}", random_hex(8));
        let (tx, rx) = oneshot::channel();
        lock(&self.requests.by_id).insert(
            id.clone(),
            PendingRequest {
                agent_id: agent.to_string(),
                conn_id,
                reply: tx,
            },
        );
        let text = encode(&make(id.clone()));
        tracing::info!(agent_id = agent, request = %id, "sending request");
        let outcome = tokio::time::timeout(wait, async {
            if outbox.send(Outbound::Text(text)).await.is_err() {
                return Err(HubError::ConnectionLost("the connection closed".into()));
            }
            rx.await.unwrap_or(Err(HubError::ShuttingDown))
        })
        .await
        .unwrap_or(Err(HubError::NoReply(millis(wait))));
        lock(&self.requests.by_id).remove(&id);
        outcome
    }

    /// Installs (or replaces) handler `name` on the agent: the module is `module`'s bytes (stored
    /// here to answer the agent's `need_module`) or a module stored before, by `file_sha256`.
    /// Returns the agent's handler list after the change.
    pub async fn install_handler(
        &self,
        agent: &str,
        name: String,
        module: Option<Vec<u8>>,
        file_sha256: Option<String>,
        signature: Option<String>,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        if name.is_empty() {
            return Err(HubError::BadRequest("`name` is empty".into()));
        }
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()));
        }
        let file_sha256 = self.modules.resolve(module, file_sha256)?;
        let make = |id| PlatformMessage::InstallHandler {
            id,
            name,
            file_sha256,
            signature,
        };
        expect_handlers(self.request(agent, "install", make, wait).await?)
    }

    /// Removes handler `name` from the agent; returns the list after the change.
    pub async fn remove_handler(
        &self,
        agent: &str,
        name: String,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        let make = |id| PlatformMessage::RemoveHandler { id, name };
        expect_handlers(self.request(agent, "remove", make, wait).await?)
    }

    /// The agent's installed handlers.
    pub async fn handlers(
        &self,
        agent: &str,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        let make = |id| PlatformMessage::ListHandlers { id };
        expect_handlers(self.request(agent, "handlers", make, wait).await?)
    }

    /// Asks the agent to cancel `task_id`; returns what it found.
    pub async fn cancel(
        &self,
        agent: &str,
        task_id: String,
        wait: Duration,
    ) -> Result<CancelOutcome, HubError> {
        let make = |id| PlatformMessage::Cancel { id, task_id };
        match self.request(agent, "cancel", make, wait).await? {
            Reply::Cancel { outcome, .. } => Ok(outcome),
            other => Err(HubError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Hands a reply (`cancel_reply`, `handlers`) to the request with message id `id` sent to
    /// `agent_id`; returns false if no such request waits.
    pub fn on_reply(&self, agent_id: &str, id: &str, reply: Reply) -> bool {
        let Some(r) = self.requests.take(agent_id, id) else {
            return false;
        };
        let _ = r.reply.send(Ok(reply));
        true
    }

    /// Ends the request `id` sent to `agent_id` with the agent's `error` (`why`); returns false
    /// if no such request waits.
    pub(super) fn refuse_request(&self, agent_id: &str, id: &str, why: &str) -> bool {
        let Some(r) = self.requests.take(agent_id, id) else {
            return false;
        };
        tracing::warn!(
            agent_id,
            request = id,
            "the agent refused the request: {why}"
        );
        let _ = r.reply.send(Err(HubError::Refused(why.to_string())));
        true
    }
}

fn expect_handlers(reply: Reply) -> Result<Vec<HandlerInfo>, HubError> {
    match reply {
        Reply::Handlers(h) => Ok(h),
        other => Err(HubError::Unexpected(format!("{other:?}"))),
    }
}
