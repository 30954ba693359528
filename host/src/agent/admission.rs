//! A `run`'s admission: checked, in order behind earlier messages about its task id or command,
//! answered from memory or the journal if its id was seen, refused, or [`Admitted`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bridge_protocol::{AgentMessage, RunRequest};
use tokio_util::sync::CancellationToken;

use super::order::{handler_turn, Turn};
use super::refusal::Refusal;
use super::task::{expired, not_after, Admitted};
use super::{lock, Agent, MAX_TASK_ID_BYTES};
use crate::journal::{JournalError, TaskPhase, TaskRecord};
use crate::observe::TaskKind;

/// Checks a `run` before anything else; the message explains what is wrong.
pub(super) fn check_request(req: &RunRequest) -> Result<Option<time::OffsetDateTime>, String> {
    if req.task_id.is_empty() || req.task_id.len() > MAX_TASK_ID_BYTES {
        return Err(format!(
            "task_id must be 1 to {MAX_TASK_ID_BYTES} bytes (got {})",
            req.task_id.len()
        ));
    }
    if req.task_id.chars().any(char::is_control) {
        return Err("task_id contains control characters".into());
    }
    match (&req.command, &req.file_sha256) {
        (Some(_), Some(_)) => return Err("give either `command` or `file_sha256`, not both".into()),
        (None, None) => return Err("give `command` or `file_sha256`".into()),
        _ => {}
    }
    not_after(req)
}

/// A run waiting for an earlier message about its task id or command; counted while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// A place among the waiting runs, if fewer than `limit` wait.
    fn enter(count: &'a AtomicUsize, limit: usize) -> Option<Waiting<'a>> {
        if count.fetch_add(1, Ordering::SeqCst) >= limit {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Agent {
    /// Handles a `run` in the background: admission, then acceptance and the run. Called in
    /// the order messages arrive: the run takes its task id's turn here, so a later `cancel`
    /// or `run` of the same id takes effect after this one's acceptance.
    pub(super) fn start_run(self: &Arc<Self>, req: RunRequest) {
        let checked = check_request(&req);
        let turn = checked
            .is_ok()
            .then(|| Turn::take(&self.turns, &req.task_id));
        let handler_change = req
            .command
            .as_deref()
            .and_then(|name| lock(&self.turns).pending(&handler_turn(name)));
        let this = self.clone();
        // Boxed: the task's state machine is large (the run, the journal and the send are
        // all inlined in it), and the runtime moves a task's future several times on its way
        // in and out; a box moves as a pointer.
        tokio::spawn(Box::pin(async move {
            if let Some(admitted) = this.admit(req, checked, turn, handler_change).await {
                admitted.accept(&this).await;
            }
        }));
    }

    /// The checks a new task passes before it is recorded; `None` when it was answered
    /// (malformed, seen before, refused).
    async fn admit(
        &self,
        req: RunRequest,
        checked: Result<Option<time::OffsetDateTime>, String>,
        turn: Option<Turn>,
        handler_change: Option<CancellationToken>,
    ) -> Option<Admitted> {
        let (not_after, turn) = match (checked, turn) {
            (Ok(t), Some(turn)) => (t, turn),
            (Ok(_), None) => unreachable!("a run that passes its checks takes a turn"),
            (Err(message), _) => {
                tracing::warn!(id = %req.id, "refusing a run: {message}");
                self.outbox
                    .send(Refusal::Malformed(message).into_error(&req.id))
                    .await;
                return None;
            }
        };
        let change = handler_change.filter(|c| !c.is_cancelled());
        if turn.must_wait() || change.is_some() {
            // Waiting runs hold their requests: as many as may be in progress, then `busy`.
            let limit = self.activity.limit();
            let Some(waiting) = Waiting::enter(&self.waiting_runs, limit) else {
                self.refuse(&req, TaskKind::Unresolved, Refusal::BusyWaiting { limit })
                    .await;
                return None;
            };
            turn.wait().await;
            if let Some(change) = change {
                change.cancelled().await;
            }
            drop(waiting);
        }
        if self.answer_seen(&req).await {
            return None;
        }
        if self.update.draining() {
            self.refuse(&req, TaskKind::Unresolved, Refusal::Updating)
                .await;
            return None;
        }
        let Some(place) = self.activity.admit() else {
            let limit = self.activity.limit();
            tracing::warn!(task_id = %req.task_id, "refusing a task: {limit} already in progress");
            self.refuse(&req, TaskKind::Unresolved, Refusal::Busy { limit })
                .await;
            return None;
        };
        if let Some(refusal) = expired(not_after) {
            drop(place);
            self.refuse(&req, TaskKind::Unresolved, refusal).await;
            return None;
        }
        let Some(target) = self.resolve(&req) else {
            drop(place);
            let name = req.command.clone().unwrap_or_default();
            self.refuse(&req, TaskKind::Unresolved, Refusal::UnknownCommand(name))
                .await;
            return None;
        };
        Some(Admitted {
            req,
            not_after,
            target,
            place,
            turn,
        })
    }

    /// The journal could not record the task (resolved to `kind`): `storage_full` or
    /// `storage_error`, nothing ran.
    pub(super) async fn refuse_unrecorded(
        &self,
        req: &RunRequest,
        kind: TaskKind,
        e: JournalError,
    ) {
        tracing::error!(task_id = %req.task_id, "refusing a task: {e}");
        self.refuse(req, kind, Refusal::NotRecorded(e)).await
    }

    /// A refusal that is not recorded (the same task id may be sent again later), counted as
    /// a task of `kind` that ended.
    async fn refuse(&self, req: &RunRequest, kind: TaskKind, refusal: Refusal) {
        let result = refusal.into_result();
        self.observer.task_ended(kind, &result);
        tracing::info!(task_id = %req.task_id, reason = ?result.reason, "task refused");
        let facts = crate::audit::Facts::of_request(req);
        self.journal.audit_refusal(&req.task_id, facts, &result);
        self.outbox
            .send(AgentMessage::Result {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                result,
            })
            .await;
    }

    /// A repeated task id: answers from memory or the journal. Returns whether it answered.
    async fn answer_seen(&self, req: &RunRequest) -> bool {
        let live = lock(&self.live).state(&req.task_id);
        if let Some(state) = live {
            self.outbox
                .send(AgentMessage::Accepted {
                    id: req.id.clone(),
                    task_id: req.task_id.clone(),
                    state: state.into(),
                })
                .await;
            return true;
        }
        match self.journal.get(&req.task_id).await {
            Some(record) => {
                self.answer_record(req, record).await;
                true
            }
            None => false,
        }
    }

    /// Answers a task id the journal has: its result if it finished, else where it is.
    pub(super) async fn answer_record(&self, req: &RunRequest, record: TaskRecord) {
        tracing::info!(task_id = %req.task_id, phase = ?record.phase, "task id seen before: not running it again");
        let state = match (record.phase, record.result) {
            (TaskPhase::Done, Some(result)) => {
                return self.outbox.send_result(&req.id, &req.task_id, result).await;
            }
            (TaskPhase::Queued, _) => bridge_protocol::TaskState::Queued,
            (TaskPhase::Running, _) => bridge_protocol::TaskState::Running,
            (TaskPhase::Done, None) => bridge_protocol::TaskState::Finished,
        };
        self.outbox
            .send(AgentMessage::Accepted {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                state,
            })
            .await;
    }
}
