//! A task's path through the hub: a control client's `run` is answered from the result store or
//! dispatched to the agent and awaited; the agent's `accepted`, `result` or refusal ends it.

use std::time::{Duration, Instant};

use bridge_protocol::codec::encode;
use bridge_protocol::{LimitRequest, PlatformMessage, RunRequest, RunResult, TaskState};
use tokio::sync::mpsc;

use super::sent_runs::SentRun;
use super::waiters::Delivery;
use super::{millis, random_hex, random_uuid, ChunkEvent, Hub, HubError, Outbound};
use crate::serve::results::{is_unrecorded_refusal, Recorded, StoredResult};

/// What the control interface asks to run.
#[derive(Debug, Clone, Default)]
pub struct RunOrder {
    /// The agent id.
    pub agent: String,
    /// The module's bytes; `None` to run a module the platform already stores, by
    /// `file_sha256`, or a `command`.
    pub module: Option<Vec<u8>>,
    /// The SHA-256 (hex) of a stored module.
    pub file_sha256: Option<String>,
    /// A command name (an installed handler or a shell rule), instead of a module.
    pub command: Option<String>,
    /// The task input.
    pub input: serde_json::Value,
    /// argv\[1..\].
    pub args: Vec<String>,
    /// The task id; a fresh one if `None`.
    pub task_id: Option<String>,
    /// Requested limits.
    pub limits: LimitRequest,
    /// Detached signature, base64.
    pub signature: Option<String>,
    /// RFC 3339 time after which the task must not start.
    pub not_after: Option<String>,
    /// The task may run again after an agent crash.
    pub idempotent: bool,
    /// Ask the agent to stream the output (`chunk` messages).
    pub stream: bool,
    /// How long to wait for the result.
    pub wait: Duration,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The task id used.
    pub task_id: String,
    /// The agent's result (the stored one: the first received for this task id), or a refusal
    /// the agent did not record (the task id may be run again).
    pub result: RunResult,
    /// From handing the `run` frame to the connection to receiving the `result` (zero when
    /// `stored`).
    pub round_trip: Duration,
    /// The result was already stored: nothing was sent to the agent.
    pub stored: bool,
}

impl Hub {
    // -----------------------------------------------------------------------------------------
    // What the control interface asks

    /// Sends a run to the agent and waits for its result, across reconnections, up to
    /// `order.wait`. With `chunks`, the task's `chunk` messages are forwarded there as they
    /// arrive (those that fit: see [`Hub::on_chunk`]), all before this returns. A task id
    /// whose result is stored is answered from the store (see the module documentation).
    pub async fn run(
        &self,
        order: RunOrder,
        chunks: Option<mpsc::Sender<ChunkEvent>>,
    ) -> Result<RunOutcome, HubError> {
        if !self.registry.is_enrolled(&order.agent) {
            return Err(HubError::UnknownAgent(order.agent));
        }
        let (command, file_sha256) = match order.command {
            Some(_) if order.module.is_some() || order.file_sha256.is_some() => {
                return Err(HubError::BadRequest(
                    "give one of `module`, `file_sha256` and `command`".into(),
                ))
            }
            Some(c) if c.is_empty() => {
                return Err(HubError::BadRequest("`command` is empty".into()))
            }
            Some(_) if order.signature.is_some() => {
                return Err(HubError::BadRequest(
                    "a `signature` goes with a module, not with a `command`".into(),
                ))
            }
            Some(c) => (Some(c), None),
            None => (
                None,
                Some(self.modules.resolve(order.module, order.file_sha256)?),
            ),
        };
        if let Some(task_id) = &order.task_id {
            if let Some(outcome) = self.answer_stored(&order.agent, task_id)? {
                return Ok(outcome);
            }
        }
        let task_id = order.task_id.unwrap_or_else(random_uuid);
        let id = format!("run-{}", random_hex(8));
        let message = PlatformMessage::Run(RunRequest {
            id: id.clone(),
            task_id: task_id.clone(),
            command,
            file_sha256,
            signature: order.signature,
            input: order.input,
            args: order.args,
            limits: order.limits,
            not_after: order.not_after,
            idempotent: order.idempotent,
            stream: order.stream,
        });
        let text = encode(&message);
        let key = self.next_key();
        let rx = self
            .waiters
            .add(&task_id, key, Some((id.clone(), order.agent.clone())));
        // A result stored between the first look and the waiter's registration: answer with it
        // rather than dispatch (a result stored after this look reaches the waiter).
        let answer = self.answer_stored(&order.agent, &task_id);
        if !matches!(answer, Ok(None)) {
            self.waiters.remove(&task_id, key);
        }
        match answer {
            Ok(None) => {}
            Ok(Some(outcome)) => return Ok(outcome),
            Err(e) => return Err(e),
        }
        if let Some(tx) = chunks {
            self.streams.add(&task_id, key, tx);
        }
        // Choosing the connection and recording the dispatch are one step: see `register`.
        let dispatched = self.connections.dispatch(&order.agent, |_| {
            self.sent_runs.record(
                id.clone(),
                SentRun {
                    seq: key,
                    agent_id: order.agent.clone(),
                    task_id: task_id.clone(),
                    text: text.clone(),
                    accepted: None,
                    waiting: true,
                },
            )
        });
        let outbox = match dispatched {
            Ok((outbox, _, ())) => outbox,
            Err(e) => {
                self.waiters.remove(&task_id, key);
                self.streams.remove(&task_id, key);
                return Err(e);
            }
        };
        tracing::info!(agent_id = %order.agent, task_id = %task_id, run_id = %id, "sending run");
        let sent = Instant::now();
        let outcome = tokio::time::timeout(order.wait, async {
            if outbox.send(Outbound::Text(text)).await.is_err() {
                tracing::info!(agent_id = %order.agent, task_id = %task_id, "the connection closed before the run was sent; it is sent when the agent reconnects");
            }
            rx.await.unwrap_or(Err(HubError::ShuttingDown))
        })
        .await
        .unwrap_or(Err(HubError::Timeout(millis(order.wait))));
        let round_trip = sent.elapsed();
        self.waiters.remove(&task_id, key);
        self.streams.remove(&task_id, key);
        // An accepted run needs no resend; once nobody waits for it, forget it.
        self.sent_runs.stop_waiting(&id);
        if let Err(e) = &outcome {
            tracing::warn!(agent_id = %order.agent, task_id = %task_id, "run ended without a result: {e}");
        }
        outcome.map(|delivery| RunOutcome {
            task_id,
            result: match delivery {
                Delivery::Stored(stored) => stored.result,
                Delivery::Refused(result) => result,
            },
            round_trip,
            stored: false,
        })
    }

    /// The answer to a `run` of `task_id` on `agent` when the task id has a stored result:
    /// that result if `agent` delivered it, an error if another agent did.
    fn answer_stored(&self, agent: &str, task_id: &str) -> Result<Option<RunOutcome>, HubError> {
        let Some(stored) = self.results.get(task_id) else {
            return Ok(None);
        };
        if stored.agent != agent {
            tracing::warn!(agent_id = agent, task_id, stored_from = %stored.agent, "run refused: the task id has a result from another agent");
            return Err(HubError::TaskIdTaken(task_id.to_string(), stored.agent));
        }
        tracing::info!(
            agent_id = agent,
            task_id,
            "run answered with the stored result (not sent to the agent)"
        );
        Ok(Some(RunOutcome {
            task_id: task_id.to_string(),
            result: stored.result,
            round_trip: Duration::ZERO,
            stored: true,
        }))
    }

    /// The stored result of `task_id`, waiting up to `wait` for one to arrive.
    pub async fn wait_result(
        &self,
        task_id: &str,
        wait: Duration,
    ) -> Result<StoredResult, HubError> {
        if let Some(stored) = self.results.get(task_id) {
            return Ok(stored);
        }
        if wait.is_zero() {
            return Err(HubError::NoResult(task_id.to_string(), 0));
        }
        let key = self.next_key();
        let rx = self.waiters.add(task_id, key, None);
        // A result stored between the first look and the waiter's registration.
        if let Some(stored) = self.results.get(task_id) {
            self.waiters.remove(task_id, key);
            return Ok(stored);
        }
        let outcome = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(Delivery::Stored(stored)))) => Ok(stored),
            // Refusals go to the run they answer only, never here.
            Ok(Ok(Ok(Delivery::Refused(_)))) => Err(HubError::NoResult(task_id.to_string(), 0)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(HubError::ShuttingDown),
            Err(_) => Err(HubError::NoResult(task_id.to_string(), millis(wait))),
        };
        self.waiters.remove(task_id, key);
        outcome
    }

    // -----------------------------------------------------------------------------------------
    // What the agent sends (called by the session)

    /// Stores a `result` the agent sent (first wins), ends the task's dispatch and hands the
    /// stored result to everyone waiting for the task. A refusal the agent did not record is not
    /// stored: it only ends the run it answers. A result for a task id another agent's result is
    /// stored for is dropped. Returns whether the session must acknowledge the result (false
    /// only when storing it failed).
    pub fn on_result(&self, agent_id: &str, id: &str, task_id: &str, result: RunResult) -> bool {
        if is_unrecorded_refusal(&result) {
            self.on_refusal(agent_id, id, task_id, result);
            return true;
        }
        let status = result.status;
        let recorded = self.results.record(agent_id, task_id, result);
        // The agent has the task: its runs of this task id need no resending.
        self.sent_runs.finish(agent_id, id, task_id);
        let stored = match &recorded {
            Recorded::Foreign(stored) => {
                tracing::warn!(
                    agent_id,
                    task_id,
                    stored_from = %stored.agent,
                    %status,
                    "a result for a task id whose result another agent delivered: acknowledged, not stored (task ids are global; the first is kept)"
                );
                let taken = || {
                    Err(HubError::TaskIdTaken(
                        task_id.to_string(),
                        stored.agent.clone(),
                    ))
                };
                self.waiters.answer(task_id, |w| w.sent_to(agent_id), taken);
                return true;
            }
            Recorded::First { stored, .. } => {
                tracing::info!(agent_id, task_id, %status, "result stored");
                stored
            }
            Recorded::Again(stored) => {
                tracing::info!(
                    agent_id,
                    task_id,
                    deliveries = stored.deliveries,
                    "result delivered again (the first is kept)"
                );
                stored
            }
        };
        let handed = self.hand_over(agent_id, task_id, stored);
        if handed > 0 {
            tracing::debug!(agent_id, task_id, waiters = handed, "result handed over");
        }
        recorded.durable()
    }

    /// Hands `stored`, `agent_id`'s result for `task_id`, to everyone waiting for it; returns
    /// how many did.
    fn hand_over(&self, agent_id: &str, task_id: &str, stored: &StoredResult) -> usize {
        self.waiters.answer(
            task_id,
            |w| w.waits_for(agent_id),
            || Ok(Delivery::Stored(stored.clone())),
        )
    }

    /// A refusal the agent did not record (nothing ran): ends the run `id` (no resending) and
    /// hands the refusal to whoever waits for that run; the task id stays free.
    fn on_refusal(&self, agent_id: &str, id: &str, task_id: &str, result: RunResult) {
        if let Some(run) = self.sent_runs.take(agent_id, id) {
            if run.task_id != task_id {
                tracing::warn!(agent_id, run_id = id, task_id = %run.task_id, reported = task_id, "the refusal names another task id than its run");
            }
        }
        tracing::info!(
            agent_id,
            task_id,
            run_id = id,
            reason = result.reason.as_deref().unwrap_or_default(),
            "task refused; the agent did not record it, so neither does the platform (the task id may be sent again)"
        );
        // Should the task id have a result from this agent after all, that is the answer.
        let stored = self.results.get(task_id).filter(|s| s.agent == agent_id);
        let reply = || match &stored {
            Some(s) => Ok(Delivery::Stored(s.clone())),
            None => Ok(Delivery::Refused(result.clone())),
        };
        self.waiters.answer(task_id, |w| w.sent_run(id), reply);
    }

    /// What the platform knows of `task_id`: the agent a run of it was last sent to, the state
    /// that agent last reported in `accepted` (while the run is in flight), and whether a result
    /// is stored.
    pub fn task_view(&self, task_id: &str) -> TaskView {
        let sent = self.sent_runs.state_of(task_id);
        TaskView {
            task_id: task_id.to_string(),
            agent: sent.as_ref().map(|(agent, _)| agent.clone()),
            state: sent.and_then(|(_, state)| state),
            result_stored: self.results.get(task_id).is_some(),
        }
    }

    /// Notes the agent's `accepted`: the task is recorded on the agent, so its `run` needs no
    /// resending. With `finished` and a result from this agent stored here, the waiters get that
    /// result (the agent may have dropped it from its outbox after our `ack`).
    pub fn on_accepted(&self, agent_id: &str, id: &str, task_id: &str, state: TaskState) {
        tracing::info!(agent_id, run_id = id, task_id, state = ?state, "task accepted");
        self.sent_runs.accepted(agent_id, task_id, state);
        if state == TaskState::Finished {
            if let Some(stored) = self.results.get(task_id).filter(|s| s.agent == agent_id) {
                self.hand_over(agent_id, task_id, &stored);
            }
        }
    }

    /// Ends the run `id` sent to `agent_id` with the agent's `error` (`why`); returns false if
    /// no such run was sent.
    pub(super) fn refuse_run(&self, agent_id: &str, id: &str, why: &str) -> bool {
        let Some(run) = self.sent_runs.take(agent_id, id) else {
            return false;
        };
        tracing::warn!(agent_id, run_id = id, task_id = %run.task_id, "the agent refused the run: {why}");
        let refused = || Err(HubError::Refused(why.to_string()));
        self.waiters
            .answer(&run.task_id, |w| w.sent_run(id), refused);
        true
    }
}

/// A task as the platform sees it (the control interface's `task`).
#[derive(Debug, serde::Serialize)]
pub struct TaskView {
    /// The task id.
    pub task_id: String,
    /// The agent a run of it was last sent to, while that run is in flight.
    pub agent: Option<String>,
    /// The state the agent last reported in `accepted` (`queued`, `running`, `finished`).
    pub state: Option<TaskState>,
    /// Whether the task's result is stored.
    pub result_stored: bool,
}
