//! The tasks in progress by task id, as the agent sees them (the journal's view lags by a
//! commit), and `cancel`, which finds a task there or in the journal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bridge_protocol::{AgentMessage, CancelOutcome, TaskState};
use tokio_util::sync::CancellationToken;

use super::order::Turn;
use super::{lock, Agent};
use crate::journal::TaskPhase;

/// Where a live task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LiveState {
    Queued,
    Running,
    /// Its result is on its way out (its record may still be being written).
    Finished,
}

impl From<LiveState> for TaskState {
    fn from(state: LiveState) -> TaskState {
        match state {
            LiveState::Queued => TaskState::Queued,
            LiveState::Running => TaskState::Running,
            LiveState::Finished => TaskState::Finished,
        }
    }
}

/// A task accepted and not yet forgotten.
struct Live {
    cancel: CancellationToken,
    state: LiveState,
}

/// The tasks accepted and not finished, and cancels that arrived for a recorded task before it
/// was registered here.
#[derive(Default)]
pub(super) struct LiveTasks {
    tasks: HashMap<String, Live>,
    early_cancels: HashSet<String>,
}

impl LiveTasks {
    /// Registers a task; returns its cancellation token, already cancelled if a cancel came
    /// first.
    pub(super) fn register(&mut self, task_id: &str, state: LiveState) -> CancellationToken {
        let cancel = CancellationToken::new();
        if self.early_cancels.remove(task_id) {
            cancel.cancel();
        }
        self.tasks.insert(
            task_id.to_string(),
            Live {
                cancel: cancel.clone(),
                state,
            },
        );
        cancel
    }

    pub(super) fn set(&mut self, task_id: &str, state: LiveState) {
        if let Some(l) = self.tasks.get_mut(task_id) {
            l.state = state;
        }
    }

    pub(super) fn state(&self, task_id: &str) -> Option<LiveState> {
        self.tasks.get(task_id).map(|l| l.state)
    }

    pub(super) fn forget(&mut self, task_id: &str) {
        self.tasks.remove(task_id);
    }

    /// How many tasks run and how many wait for a slot.
    pub(super) fn counts(&self) -> (u64, u64) {
        self.tasks
            .values()
            .fold((0, 0), |(running, queued), l| match l.state {
                LiveState::Running => (running + 1, queued),
                LiveState::Queued => (running, queued + 1),
                LiveState::Finished => (running, queued),
            })
    }

    /// The running tasks' ids, sorted (for the status report).
    pub(super) fn running(&self) -> Vec<String> {
        let mut running: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, l)| l.state == LiveState::Running)
            .map(|(id, _)| id.clone())
            .collect();
        running.sort();
        running
    }
}

impl Agent {
    /// `cancel`: removes a queued task or stops a running one; answers `cancel_reply`.
    pub(super) fn cancel(self: &Arc<Self>, id: String, task_id: String) {
        if task_id.chars().any(char::is_control) {
            // Never a task id (a run with it is refused), so never a task.
            return self.cancel_now(id, task_id);
        }
        let turn = Turn::take(&self.turns, &task_id);
        if turn.must_wait() {
            // A `run` of this id sent before is still being accepted: the cancel applies to it
            // once it is (a cancel's reply may wait for a journal commit).
            let this = self.clone();
            tokio::spawn(async move {
                turn.wait().await;
                this.cancel_now(id, task_id);
                drop(turn);
            });
            return;
        }
        self.cancel_now(id, task_id);
    }

    fn cancel_now(self: &Arc<Self>, id: String, task_id: String) {
        let outcome = {
            // Under the `live` lock: admission registers a task under it too, so a cancel that
            // arrives between the accept commit and that registration is not lost.
            let mut live = lock(&self.live);
            match live.tasks.get(&task_id) {
                Some(l) if l.state == LiveState::Finished => CancelOutcome::Finished,
                Some(l) => {
                    l.cancel.cancel();
                    if l.state == LiveState::Running {
                        CancelOutcome::Cancelling
                    } else {
                        CancelOutcome::Dequeued
                    }
                }
                // Read under the lock, blocking this worker until the writer answers: a task
                // not yet registered must not be registered between this read and the
                // `early_cancels` entry. A cancel of an unregistered task is rare.
                None => match self.journal.get_blocking(&task_id).map(|r| r.phase) {
                    Some(TaskPhase::Done) => CancelOutcome::Finished,
                    Some(phase) => {
                        // Recorded and about to be registered (or to start again at recovery).
                        live.early_cancels.insert(task_id.clone());
                        if phase == TaskPhase::Running {
                            CancelOutcome::Cancelling
                        } else {
                            CancelOutcome::Dequeued
                        }
                    }
                    None => CancelOutcome::Unknown,
                },
            }
        };
        tracing::info!(task_id = %task_id, outcome = ?outcome, "cancel requested");
        let msg = AgentMessage::CancelReply {
            id,
            task_id,
            outcome,
        };
        let outbox = self.outbox.clone();
        tokio::spawn(async move { outbox.send(msg).await });
    }
}
