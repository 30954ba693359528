//! Who waits for a task's result, by task id: a control client's `run` (for its own run, on
//! one agent) or `result` (for any agent's), and how each is handed its answer or its error.

use std::collections::HashMap;
use std::sync::Mutex;

use bridge_protocol::RunResult;
use tokio::sync::oneshot;

use super::{lock, remove_keyed, HubError};
use crate::serve::results::StoredResult;

/// What ends a task's waiter, when it is not an error.
#[derive(Debug)]
pub(super) enum Delivery {
    /// The task's stored result.
    Stored(StoredResult),
    /// A refusal the agent did not record (nothing ran), answering the waiter's own `run`.
    Refused(RunResult),
}

/// What a task's waiter receives.
pub(super) type TaskReply = Result<Delivery, HubError>;

/// Someone waiting for a task's result.
#[derive(Debug)]
pub(super) struct TaskWaiter {
    /// Unique per waiter, to remove it when it gives up.
    key: u64,
    /// The `run` message it dispatched, if any: an agent `error` naming it ends this waiter,
    /// and so does a refusal answering it.
    run_id: Option<String>,
    /// The agent its `run` went to, if any: only that agent's result ends it (`None`: any
    /// agent's).
    agent: Option<String>,
    reply: oneshot::Sender<TaskReply>,
}

impl TaskWaiter {
    /// Whether a result from `agent` is an answer for this waiter.
    pub(super) fn waits_for(&self, agent: &str) -> bool {
        self.agent.as_deref().is_none_or(|a| a == agent)
    }

    /// Whether this waiter dispatched the `run` message `run_id`.
    pub(super) fn sent_run(&self, run_id: &str) -> bool {
        self.run_id.as_deref() == Some(run_id)
    }

    /// Whether this waiter's `run` went to `agent`.
    pub(super) fn sent_to(&self, agent: &str) -> bool {
        self.agent.as_deref() == Some(agent)
    }
}

/// The waiters by task id.
#[derive(Debug, Default)]
pub(super) struct TaskWaiters {
    by_task: Mutex<HashMap<String, Vec<TaskWaiter>>>,
}

impl TaskWaiters {
    /// Adds the waiter `key` for `task_id`; `run` is the `(run message id, agent)` it
    /// dispatched, if any. Returns where its answer comes.
    pub(super) fn add(
        &self,
        task_id: &str,
        key: u64,
        run: Option<(String, String)>,
    ) -> oneshot::Receiver<TaskReply> {
        let (tx, rx) = oneshot::channel();
        let (run_id, agent) = run.unzip();
        lock(&self.by_task)
            .entry(task_id.to_string())
            .or_default()
            .push(TaskWaiter {
                key,
                run_id,
                agent,
                reply: tx,
            });
        rx
    }

    /// Removes the waiter `key` of `task_id` (it gave up, or got its answer).
    pub(super) fn remove(&self, task_id: &str, key: u64) {
        remove_keyed(&mut lock(&self.by_task), task_id, |w| w.key != key);
    }

    /// Ends the waiters of `task_id` that `pick` selects with `reply`; returns how many.
    pub(super) fn answer(
        &self,
        task_id: &str,
        pick: impl Fn(&TaskWaiter) -> bool,
        reply: impl Fn() -> TaskReply,
    ) -> usize {
        let taken = {
            let mut by_task = lock(&self.by_task);
            let Some(list) = by_task.get_mut(task_id) else {
                return 0;
            };
            let (taken, kept): (Vec<_>, Vec<_>) = list.drain(..).partition(|w| pick(w));
            *list = kept;
            if list.is_empty() {
                by_task.remove(task_id);
            }
            taken
        };
        let answered = taken.len();
        for w in taken {
            let _ = w.reply.send(reply());
        }
        answered
    }

    /// Ends every waiter with `error` (at shutdown).
    pub(super) fn fail_all(&self, error: &HubError) {
        let waiters: Vec<TaskWaiter> = lock(&self.by_task)
            .drain()
            .flat_map(|(_, list)| list)
            .collect();
        for w in waiters {
            let _ = w.reply.send(Err(error.clone()));
        }
    }
}
