//! What waits to be sent to the platform, and the one place that decides how a result gets there:
//! in memory or from the journal, in what order, and which copy wins after a reconnect.
//!
//! The agent queues messages through a [`Sender`]; the link drains the [`Outbox`] a batch at a
//! time ([`Outbox::next_batch`]). Results are the only large messages (up to a frame, 1 MiB, see
//! [`fit`]), so they are charged against [`MAX_QUEUED_BYTES`] while they wait ([`budget`]). A
//! finishing task's result that finds no room is not queued in memory: its task id is
//! ([`Outgoing::Stored`]), and the result is read from the journal when it is sent, as the backlog
//! of unacknowledged results is after every reconnect. So a platform that stops reading costs the
//! agent at most [`MAX_QUEUED_BYTES`] of results, not one megabyte per task.
//!
//! - [`budget`]: the byte budget and the charge a queued result holds.
//! - [`fit`]: cutting a result down to one frame, and measuring it.
//! - [`sender`]: the agent's end: how a finished task's result is recorded and queued.
//! - [`delivery`]: the link's end: what goes out next, the backlog after a reconnect.

pub mod budget;
pub mod delivery;
pub mod fit;
pub mod sender;

use bridge_protocol::AgentMessage;
use tokio::sync::mpsc;

use crate::journal::Journal;
pub use budget::{Budget, Charge, MAX_QUEUED_BYTES};
pub use delivery::{Batch, Outbox, Replies};
pub use fit::{fit_to_frame, measure_result};
pub use sender::Sender;

/// How many messages may wait for the platform before producers wait.
const CAPACITY: usize = 4096;

/// A message waiting for the platform.
// Messages travel by value; boxing them for the rare `Stored` would cost an allocation per
// message.
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

/// An outbox for results recorded in `journal`: the agent's end and the link's end.
pub fn channel(journal: Journal) -> (Sender, Outbox) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let replies = tx.downgrade();
    (
        Sender::new(tx, Budget::default(), journal.clone()),
        Outbox::new(rx, replies, journal),
    )
}
