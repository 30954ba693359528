//! What waits to be sent to the platform, bounded in bytes as well as in messages.
//!
//! The agent queues messages on a channel the link drains ([`Outgoing`]). Results are the only
//! large messages (up to a frame, 1 MiB), so they are charged against [`MAX_QUEUED_BYTES`]
//! while they wait. A finishing task's result that finds no room is not queued in memory: its
//! task id is ([`Outgoing::Stored`]), and the link reads the result from the journal when it
//! sends it, as it does for the backlog after a reconnect. So a platform that stops reading
//! costs the agent at most [`MAX_QUEUED_BYTES`] of results, not one megabyte per task.

use std::sync::Arc;

use bridge_protocol::AgentMessage;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most bytes of results that wait in memory for the platform.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// A message waiting for the platform.
// Messages travel by value, as they did before results could be stored; boxing them for the
// rare `Stored` would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outgoing {
    /// To send as it is; a result's [`Charge`] keeps its bytes counted until it is sent or
    /// dropped.
    Message(AgentMessage, Option<Charge>),
    /// A result recorded in the journal, read from there when it is sent (nothing is sent if
    /// the platform acknowledged it meanwhile).
    Stored(String),
}

impl From<AgentMessage> for Outgoing {
    fn from(msg: AgentMessage) -> Outgoing {
        Outgoing::Message(msg, None)
    }
}

impl Outgoing {
    /// The task id, when this is a result.
    pub fn result_of(&self) -> Option<&str> {
        match self {
            Outgoing::Message(AgentMessage::Result { task_id, .. }, _)
            | Outgoing::Stored(task_id) => Some(task_id),
            Outgoing::Message(..) => None,
        }
    }
}

/// Bytes of a queued message, given back when it is dropped.
#[derive(Debug)]
pub struct Charge(#[allow(dead_code)] OwnedSemaphorePermit);

/// The byte budget of queued results.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::new(MAX_QUEUED_BYTES)
    }
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Budget {
        Budget {
            bytes: Arc::new(Semaphore::new(bytes)),
            total: bytes,
        }
    }

    fn permits(&self, bytes: usize) -> u32 {
        // A message larger than the whole budget takes all of it.
        u32::try_from(bytes.clamp(1, self.total.max(1))).unwrap_or(u32::MAX)
    }

    /// A charge for `bytes` if they fit now.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.permits(bytes))
            .ok()
            .map(Charge)
    }

    /// A charge for `bytes`, waiting until they fit.
    pub async fn charge(&self, bytes: usize) -> Option<Charge> {
        self.bytes
            .clone()
            .acquire_many_owned(self.permits(bytes))
            .await
            .ok()
            .map(Charge)
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_given_back() {
        let budget = Budget::new(MAX_QUEUED_BYTES);
        let a = budget.try_charge(MAX_QUEUED_BYTES / 2).unwrap();
        let b = budget.try_charge(MAX_QUEUED_BYTES / 2).unwrap();
        assert!(budget.try_charge(1).is_none());
        drop(a);
        assert_eq!(budget.available(), MAX_QUEUED_BYTES / 2);
        drop(b);
        // Larger than the budget: takes all of it, never blocks for ever.
        let all = budget.try_charge(usize::MAX).unwrap();
        assert_eq!(budget.available(), 0);
        drop(all);
    }
}
