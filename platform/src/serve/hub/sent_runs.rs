//! The `run` messages sent to agents and not finished with, by message id: resent unchanged on
//! the agent's next connection until it acknowledges the task, and matched to its refusals.

use std::collections::HashMap;
use std::sync::Mutex;

use bridge_protocol::TaskState;

use super::{lock, take_if};

/// A `run` sent to an agent and not finished with.
#[derive(Debug)]
pub(super) struct SentRun {
    /// Dispatch order, to resend in the same order.
    pub(super) seq: u64,
    pub(super) agent_id: String,
    pub(super) task_id: String,
    /// The encoded `run` message, resent as is.
    pub(super) text: String,
    /// The state the agent gave in its `accepted` for the task (then no resend is needed).
    pub(super) accepted: Option<TaskState>,
    /// The control request that dispatched it still waits (for error correlation).
    pub(super) waiting: bool,
}

/// The sent runs by `run` message id. Kept in memory only: a platform restart forgets them.
#[derive(Debug, Default)]
pub(super) struct SentRuns {
    by_id: Mutex<HashMap<String, SentRun>>,
}

impl SentRuns {
    /// Records the run `id`, just handed to a connection (or about to be).
    pub(super) fn record(&self, id: String, run: SentRun) {
        lock(&self.by_id).insert(id, run);
    }

    /// Removes and returns the run `id` if it was sent to `agent_id`: an agent's `error` or
    /// refusal ends it.
    pub(super) fn take(&self, agent_id: &str, id: &str) -> Option<SentRun> {
        take_if(&mut lock(&self.by_id), id, |run| run.agent_id == agent_id)
    }

    /// The agent has a result for `task_id`, reported as the answer to run `id`: its runs of
    /// that task id need no resending.
    pub(super) fn finish(&self, agent_id: &str, id: &str, task_id: &str) {
        let mut by_id = lock(&self.by_id);
        if let Some(run) = by_id.get(id) {
            if run.task_id != task_id {
                tracing::warn!(agent_id, run_id = id, task_id = %run.task_id, reported = task_id, "the result names another task id than its run");
            }
        }
        by_id.retain(|_, run| !(run.agent_id == agent_id && run.task_id == task_id));
    }

    /// The agent recorded `task_id` (and says where it is): its runs of it need no resending,
    /// and those nobody waits for any more are forgotten.
    pub(super) fn accepted(&self, agent_id: &str, task_id: &str, state: TaskState) {
        lock(&self.by_id).retain(|_, run| {
            if run.agent_id == agent_id && run.task_id == task_id {
                run.accepted = Some(state);
                run.waiting
            } else {
                true
            }
        });
    }

    /// Nobody waits for run `id` any more: forgotten if accepted, else kept for resending.
    pub(super) fn stop_waiting(&self, id: &str) {
        let mut by_id = lock(&self.by_id);
        if let Some(run) = by_id.get_mut(id) {
            run.waiting = false;
            if run.accepted.is_some() {
                by_id.remove(id);
            }
        }
    }

    /// The `run` messages sent to `agent_id` that it has not acknowledged (neither `accepted`
    /// nor `result`), in the order they were first sent.
    pub(super) fn unacknowledged(&self, agent_id: &str) -> Vec<String> {
        let by_id = lock(&self.by_id);
        let mut runs: Vec<&SentRun> = by_id
            .values()
            .filter(|run| run.agent_id == agent_id && run.accepted.is_none())
            .collect();
        runs.sort_by_key(|run| run.seq);
        runs.into_iter().map(|run| run.text.clone()).collect()
    }

    /// Where a sent run of `task_id` is, as far as the platform knows: the agent it was sent to
    /// and the state of its latest `accepted` (`None`: not acknowledged yet).
    pub(super) fn state_of(&self, task_id: &str) -> Option<(String, Option<TaskState>)> {
        lock(&self.by_id)
            .values()
            .filter(|run| run.task_id == task_id)
            .max_by_key(|run| run.seq)
            .map(|run| (run.agent_id.clone(), run.accepted))
    }
}
