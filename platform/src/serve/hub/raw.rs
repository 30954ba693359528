//! Development and test aid: one raw text frame sent to an agent, and the `error` it answers
//! with (an agent's error that ends no run or request goes to whoever waits here).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bridge_protocol::ErrorBody;
use tokio::sync::oneshot;

use super::{lock, remove_keyed, Hub, HubError, Outbound};

/// Someone waiting in [`Hub::send_raw`] (by its key) for an agent's error.
type ErrorWaiter = (u64, oneshot::Sender<ErrorBody>);

/// Who waits in [`Hub::send_raw`] for an agent's error, by agent id.
#[derive(Debug, Default)]
pub(super) struct ErrorWaiters {
    by_agent: Mutex<HashMap<String, Vec<ErrorWaiter>>>,
}

impl Hub {
    /// Sends `text` as one raw text frame to the agent's live connection and waits up to `wait`
    /// for the next `error` the agent reports that does not end a run or request (its answer
    /// to a malformed or unknown message). `Ok(None)`: no error came.
    pub async fn send_raw(
        &self,
        agent: &str,
        text: String,
        wait: Duration,
    ) -> Result<Option<ErrorBody>, HubError> {
        let (outbox, _) = self.connections.outbox(agent)?;
        let (tx, rx) = oneshot::channel();
        let key = self.next_key();
        lock(&self.error_waiters.by_agent)
            .entry(agent.to_string())
            .or_default()
            .push((key, tx));
        let outcome = if outbox.send(Outbound::Text(text)).await.is_err() {
            Err(HubError::ConnectionLost("the connection closed".into()))
        } else {
            Ok(tokio::time::timeout(wait, rx)
                .await
                .ok()
                .and_then(Result::ok))
        };
        // No error came (or the frame was not sent): stop waiting for one.
        remove_keyed(&mut lock(&self.error_waiters.by_agent), agent, |(k, _)| {
            *k != key
        });
        outcome
    }

    /// Hands an agent's `error` (one that ended no run or request) to whoever waits in
    /// [`Hub::send_raw`]; returns whether anyone did.
    pub fn deliver_error(&self, agent: &str, body: &ErrorBody) -> bool {
        let waiters = lock(&self.error_waiters.by_agent)
            .remove(agent)
            .unwrap_or_default();
        let mut delivered = false;
        for (_, w) in waiters {
            delivered |= w.send(body.clone()).is_ok();
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::registry::Registry;
    use crate::serve::results::ResultStore;

    #[tokio::test]
    async fn send_raw_forgets_its_waiter_when_no_error_comes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::new(
            Registry::open(dir.path()).unwrap(),
            ResultStore::open(dir.path()).unwrap(),
            crate::serve::updates::UpdateStore::open(dir.path()).unwrap(),
            crate::serve::audit::AuditStore::open(dir.path()).unwrap(),
            None,
        );
        let mut reg = hub.register("agent-a", 2, "0.1.0");
        for _ in 0..3 {
            let reply = hub
                .send_raw("agent-a", "{}".into(), Duration::from_millis(10))
                .await
                .unwrap();
            assert!(reply.is_none());
            assert!(reg.outbox.try_recv().is_ok());
        }
        assert!(lock(&hub.error_waiters.by_agent).is_empty());
        // An error that comes is handed over.
        let body = ErrorBody {
            id: None,
            code: bridge_protocol::ErrorCode::Malformed,
            message: "no".into(),
        };
        let (reply, delivered) = tokio::join!(
            hub.send_raw("agent-a", "{".into(), Duration::from_secs(5)),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                hub.deliver_error("agent-a", &body)
            }
        );
        assert!(delivered);
        assert_eq!(reply.unwrap(), Some(body));
        assert!(lock(&hub.error_waiters.by_agent).is_empty());
    }
}
