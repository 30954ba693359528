//! The agent's end of the outbox: small messages go as they are; a finished task's result is
//! recorded in the journal and queued in memory, or left in the journal when it does not fit.

use bridge_protocol::{AgentMessage, RunResult};
use tokio::sync::mpsc;

use super::{fit_to_frame, measure_result, Budget, Outgoing};
use crate::journal::{Journal, JournalError};

/// Queues messages for the platform (cloned freely; the link drains them).
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::Sender<Outgoing>,
    /// Bytes of results waiting in memory.
    budget: Budget,
    journal: Journal,
}

fn result(id: &str, task_id: &str, result: RunResult) -> AgentMessage {
    AgentMessage::Result {
        id: id.to_string(),
        task_id: task_id.to_string(),
        result,
    }
}

impl Sender {
    pub(super) fn new(tx: mpsc::Sender<Outgoing>, budget: Budget, journal: Journal) -> Sender {
        Sender {
            tx,
            budget,
            journal,
        }
    }

    /// The raw channel, for a task's streamed output ([`crate::stream::StreamTap`]), which
    /// bounds its own bytes.
    pub fn channel(&self) -> mpsc::Sender<Outgoing> {
        self.tx.clone()
    }

    /// Queues a small message (waits while the outbox is full of messages).
    pub async fn send(&self, msg: AgentMessage) {
        let _ = self.tx.send(msg.into()).await;
    }

    /// Queues a result that is not in the journal as a result of this request (a refusal, or a
    /// repeat of a stored result), waiting for room in the byte budget: a platform that repeats
    /// task ids and does not read cannot make the agent hold their copies.
    pub async fn send_result(&self, id: &str, task_id: &str, run: RunResult) {
        let bytes = measure_result(&run, id, task_id).0;
        let charge = self.budget.charge(bytes).await;
        let _ = self
            .tx
            .send(Outgoing::Message(result(id, task_id, run), charge))
            .await;
    }

    /// Queues a result that is recorded in the journal already: in memory if it fits the byte
    /// budget, else by task id (read from the journal when it is sent).
    pub async fn send_recorded(&self, id: &str, task_id: &str, run: RunResult) {
        let bytes = measure_result(&run, id, task_id).0;
        let queued = match self.budget.try_charge(bytes) {
            Some(charge) => Outgoing::Message(result(id, task_id, run), Some(charge)),
            None => Outgoing::Stored(task_id.to_string()),
        };
        let _ = self.tx.send(queued).await;
    }

    /// Records a finished task's result (cut to fit one frame) and queues it.
    ///
    /// For a task recorded as running (`ran`), sending does not wait for the commit, and the
    /// commit does not wait for the disk (it is made durable by the next durable commit, at
    /// most [`crate::journal::FLUSH_AFTER`] later): the result is in the journal's write queue
    /// before it is in the outbox (so the platform's `ack` is applied after it), and if the
    /// agent dies before it is on disk, the restarted agent finds the task running and reports
    /// it `interrupted`. The platform keeps the first result it receives for a task id, so it
    /// keeps the real one if it got it; if it did not, `interrupted` is the truth. Either way
    /// one result, and neither the round trip nor the next task's accept waits for a second
    /// fsync. A task that never ran (cancelled or expired while queued) is still recorded as
    /// queued, and a restart would run it: its result is sent only once committed.
    pub async fn record_and_send(
        &self,
        id: &str,
        task_id: &str,
        mut run: RunResult,
        facts: crate::audit::Facts,
        ran: bool,
    ) -> Result<(), JournalError> {
        let bytes = fit_to_frame(&mut run, id, task_id);
        match self.budget.try_charge(bytes) {
            Some(charge) if ran => {
                let record = self.journal.finish_audited(task_id, &run, facts, false);
                let msg = result(id, task_id, run.clone());
                let send = self.tx.send(Outgoing::Message(msg, Some(charge)));
                let (recorded, _) = tokio::join!(record, send);
                recorded
            }
            charge => {
                // Not sent before it is recorded: a task that never ran (see above), or a
                // result that does not fit in memory, which then waits in the journal (and is
                // not copied meanwhile). Either way the journal's is the only copy: durably.
                let recorded = self
                    .journal
                    .finish_audited(task_id, &run, facts, true)
                    .await;
                let queued = match (charge, &recorded) {
                    (Some(charge), _) => Outgoing::Message(result(id, task_id, run), Some(charge)),
                    (None, Ok(())) => Outgoing::Stored(task_id.to_string()),
                    // Not recorded: this message is the only copy.
                    (None, Err(_)) => result(id, task_id, run).into(),
                };
                let _ = self.tx.send(queued).await;
                recorded
            }
        }
    }
}
