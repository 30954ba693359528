//! A task's phases as types. Each transition consumes the phase before it, so a task can be
//! neither run twice nor finished twice, and each phase holds the task's [`InProgress`] place:
//!
//! ```text
//! Admitted ──accept──▶ Queued ──start──▶ Running ──run──▶ Finished ──deliver──▶ (forgotten)
//!     │                  └─(cancelled, expired, not recorded)──────▶ Finished
//!     ├──(a slot is free)──────────────▶ Running
//!     └──(a compiled handler, a slot)──▶ run while the acceptance is recorded ──▶ Finished
//! ```

use std::sync::Arc;

use bridge_protocol::{AgentMessage, RunRequest, RunResult, TaskState};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::activity::InProgress;
use super::execute::Target;
use super::live::LiveState;
use super::order::Turn;
use super::refusal::Refusal;
use super::{lock, Agent};
use crate::audit::Facts;
use crate::journal::{Accept, EarlyResult, Recovery};
use crate::observe::TaskKind;
use crate::outbox::fit_to_frame;
use crate::stream::StreamTap;

/// A `run` that passed its checks, is new, holds its task id's turn and a place among the
/// tasks in progress, and resolved to something to run.
pub(super) struct Admitted {
    pub(super) req: RunRequest,
    pub(super) not_after: Option<time::OffsetDateTime>,
    pub(super) target: Target,
    pub(super) place: InProgress,
    pub(super) turn: Turn,
}

/// Recorded in the journal as queued and answered `accepted`; waits for a slot.
pub(super) struct Queued {
    req: RunRequest,
    /// What its command resolved to when it was accepted (resolved again when it starts).
    kind: TaskKind,
    not_after: Option<time::OffsetDateTime>,
    place: InProgress,
    cancel: CancellationToken,
}

/// Recorded as running, holding an execution slot.
pub(super) struct Running {
    req: RunRequest,
    place: InProgress,
    cancel: CancellationToken,
    slot: OwnedSemaphorePermit,
    target: Target,
}

/// Has its result; [`Finished::deliver`] records it and hands it to the outbox.
pub(super) struct Finished {
    req: RunRequest,
    kind: TaskKind,
    result: RunResult,
    /// What it ran, for its audit record.
    facts: Facts,
    ending: Ending,
    place: InProgress,
}

/// How a task came to its end, which decides how its result is recorded.
enum Ending {
    /// It ran (recorded as running): the result goes out without waiting for its commit.
    Ran,
    /// It never ran (cancelled or expired while queued, its start not recorded, interrupted):
    /// the result goes out once committed.
    NeverRan,
    /// Its result was recorded in the same commit as its acceptance; the next message about
    /// its task id waits for the result to be queued.
    RecordedWithAcceptance(Turn),
}

impl Admitted {
    /// Records the task (durably) and answers `accepted`, then takes it to its end: at once if
    /// a slot is free, else once one frees. A task the journal refuses (seen before, storage
    /// full) is answered so, and nothing runs.
    pub(super) async fn accept(self, agent: &Arc<Agent>) {
        let Admitted {
            req,
            not_after,
            target,
            place,
            turn,
        } = self;
        let kind = target.kind();
        // A free slot now: the task is recorded as running in the same commit that accepts it.
        let (slot, target) = match agent.slots.clone().try_acquire_owned().ok() {
            Some(slot) => match agent.ready_now(&req, &target) {
                Some(ready) => {
                    return run_while_accepting(agent, req, ready, slot, place, turn).await
                }
                None => (Some(slot), target),
            },
            None => (None, target),
        };
        let accepted = match &slot {
            Some(_) => agent.journal.accept_running(&req).await,
            None => agent.journal.accept(&req).await,
        };
        match accepted {
            Ok(Accept::New) => {}
            Ok(Accept::Seen(record)) => {
                drop(place);
                return agent.answer_record(&req, record).await;
            }
            Err(e) => {
                drop(place);
                return agent.refuse_unrecorded(&req, kind, e).await;
            }
        }
        let state = match slot {
            Some(_) => LiveState::Running,
            None => LiveState::Queued,
        };
        let cancel = lock(&agent.live).register(&req.task_id, state);
        tracing::info!(task_id = %req.task_id, "task accepted");
        agent
            .outbox
            .send(AgentMessage::Accepted {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                state: TaskState::from(state),
            })
            .await;
        // Accepted and registered: a `cancel` or `run` of this id that waited now finds it.
        drop(turn);
        let running = match slot {
            Some(slot) => Running {
                req,
                place,
                cancel,
                slot,
                target,
            },
            None => {
                let queued = Queued {
                    req,
                    kind,
                    not_after,
                    place,
                    cancel,
                };
                match queued.start(agent).await {
                    Ok(running) => running,
                    Err(finished) => return finished.deliver(agent).await,
                }
            }
        };
        running.run(agent).await.deliver(agent).await;
    }
}

impl Queued {
    /// Waits for a slot, checks the expiry, records the start, and resolves the command again
    /// ([`Agent::resolve_again_at_start`]: what runs is what the name means when it starts).
    async fn start(self, agent: &Arc<Agent>) -> Result<Running, Finished> {
        let Queued {
            req,
            kind,
            not_after,
            place,
            cancel,
        } = self;
        let slot = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            permit = agent.slots.clone().acquire_owned() => permit.ok(),
        };
        if slot.is_some() && agent.update.draining() {
            // Draining for a staged release: it stays queued (in the journal too) and runs
            // after the restart.
            drop(slot);
            tracing::info!(task_id = %req.task_id, "staying queued: the agent restarts into a new release");
            return std::future::pending().await;
        }
        let Some(slot) = slot else {
            let mut result = Refusal::CancelledQueued.into_result();
            result.file_sha256 = req.file_sha256.clone();
            return Err(Finished::never_ran(req, kind, result, place));
        };
        if let Some(refusal) = expired(not_after) {
            return Err(Finished::never_ran(req, kind, refusal.into_result(), place));
        }
        if let Err(e) = agent.journal.start(&req.task_id).await {
            tracing::error!(task_id = %req.task_id, "could not record the task's start: {e}");
            let result = Refusal::StartNotRecorded(e).into_result();
            return Err(Finished::never_ran(req, kind, result, place));
        }
        let Some(target) = agent.resolve_again_at_start(&req) else {
            let name = req.command.clone().unwrap_or_default();
            let result = Refusal::UnknownCommand(name).into_result();
            let facts = Facts::of_request(&req);
            return Err(Finished::ran(
                req,
                TaskKind::Unresolved,
                result,
                facts,
                place,
            ));
        };
        Ok(Running {
            req,
            place,
            cancel,
            slot,
            target,
        })
    }
}

impl Running {
    /// Runs the task to its result (streaming its output as `chunk`s if it asked to).
    async fn run(self, agent: &Arc<Agent>) -> Finished {
        let Running {
            req,
            place,
            cancel,
            slot,
            target,
        } = self;
        lock(&agent.live).set(&req.task_id, LiveState::Running);
        let kind = target.kind();
        tracing::info!(task_id = %req.task_id, command = ?req.command, module = ?req.file_sha256, "task started");
        let tap = req.stream.then(|| {
            let tap = StreamTap::new(&req.task_id, agent.outbox.channel());
            tokio::spawn(tap.clone().flusher());
            tap
        });
        let resolved = target.clone();
        let result = agent.execute(&req, target, cancel, tap.clone()).await;
        if let Some(tap) = tap {
            tap.finish();
        }
        drop(slot);
        let facts = agent.audit_facts(&req, &resolved);
        Finished::ran(req, kind, result, facts, place)
    }
}

impl Finished {
    fn ran(
        req: RunRequest,
        kind: TaskKind,
        result: RunResult,
        facts: Facts,
        place: InProgress,
    ) -> Finished {
        Finished {
            req,
            kind,
            result,
            facts,
            ending: Ending::Ran,
            place,
        }
    }

    fn never_ran(
        req: RunRequest,
        kind: TaskKind,
        result: RunResult,
        place: InProgress,
    ) -> Finished {
        Finished {
            facts: Facts::of_request(&req),
            req,
            kind,
            result,
            ending: Ending::NeverRan,
            place,
        }
    }

    /// The end of an accepted task: counted, its result recorded and queued for the platform
    /// (see [`crate::outbox::Sender::record_and_send`]), the task forgotten, its place given
    /// back.
    async fn deliver(self, agent: &Arc<Agent>) {
        let Finished {
            req,
            kind,
            result,
            facts,
            ending,
            place,
        } = self;
        // Before the result goes out: whoever sees the result sees it counted.
        agent.observer.task_ended(kind, &result);
        match ending {
            Ending::RecordedWithAcceptance(turn) => {
                tracing::info!(task_id = %req.task_id, status = %result.status, reason = ?result.reason, "task finished (recorded with its acceptance)");
                agent
                    .outbox
                    .send_recorded(&req.id, &req.task_id, result)
                    .await;
                // After the result is queued: a repeat of this id, answered from the journal,
                // goes out after it.
                drop(turn);
            }
            ending => {
                // From now on a repeat of this task id is told it finished, not that it runs.
                lock(&agent.live).set(&req.task_id, LiveState::Finished);
                tracing::info!(task_id = %req.task_id, status = %result.status, reason = ?result.reason, "task finished");
                let ran = matches!(ending, Ending::Ran);
                let recorded = agent
                    .outbox
                    .record_and_send(&req.id, &req.task_id, result, facts, ran)
                    .await;
                if let Err(e) = recorded {
                    tracing::error!(task_id = %req.task_id, "could not record the task's result (it was sent; a restart now would report the task interrupted or run it if it never started): {e}");
                }
                lock(&agent.live).forget(&req.task_id);
            }
        }
        drop(place);
    }
}

/// The tasks [`Agent::ready_now`] allows: the handler runs while the journal records the task
/// as accepted and running; once that is durable, `accepted` is sent (unless the run is over
/// by then: its result alone says the task was accepted), then the result. A run that ends
/// before the journal writer gets to the acceptance offers its result, which is then written in
/// the same commit ([`crate::journal::Journal::accept_running_with`]): one durable write for the
/// whole task, and no finish to record afterwards (the usual case under load, when the
/// acceptance waits for the commit before it). A task the journal refuses (seen before,
/// storage full) is answered as usual, and its run is stopped and discarded.
async fn run_while_accepting(
    agent: &Arc<Agent>,
    req: RunRequest,
    target: Target,
    slot: OwnedSemaphorePermit,
    place: InProgress,
    turn: Turn,
) {
    let mut turn = Some(turn);
    let facts = agent.audit_facts(&req, &target);
    let (result, ending) = {
        let stop = CancellationToken::new();
        let run = agent.execute(&req, target, stop.clone(), None);
        tokio::pin!(run);
        let offered = EarlyResult::audited(facts.clone());
        let accept = agent.journal.accept_running_with(&req, offered.clone());
        tokio::pin!(accept);
        // The run is over (its result offered to the journal, or kept here if it came late).
        let mut over = false;
        let mut early = None;
        let accepted = loop {
            tokio::select! {
                biased;
                a = &mut accept => break a,
                r = &mut run, if !over => {
                    over = true;
                    let mut r = r;
                    let _ = fit_to_frame(&mut r, &req.id, &req.task_id);
                    early = offered.offer(r);
                }
            }
        };
        let refused = match accepted {
            Ok(Accept::New) => None,
            Ok(Accept::Seen(record)) => Some(Err(record)),
            Err(e) => Some(Ok(e)),
        };
        if let Some(refused) = refused {
            stop.cancel();
            if !over {
                let _ = (&mut run).await;
            }
            drop((slot, place));
            return match refused {
                Err(record) => agent.answer_record(&req, record).await,
                Ok(e) => agent.refuse_unrecorded(&req, TaskKind::Wasm, e).await,
            };
        }
        tracing::info!(task_id = %req.task_id, "task accepted");
        tracing::info!(task_id = %req.task_id, command = ?req.command, module = ?req.file_sha256, "task started (while its acceptance was recorded)");
        match offered.take() {
            // Recorded with the acceptance: the journal shows the task done (a cancel now
            // answers `finished`), so it is never registered as live.
            Some((result, true)) => {
                let turn = turn.take().expect("held until here");
                (result, Ending::RecordedWithAcceptance(turn))
            }
            late => {
                if let Some((result, false)) = late {
                    early = Some(result);
                }
                let cancel = lock(&agent.live).register(&req.task_id, LiveState::Running);
                // A run already over needs no `accepted`: its result, sent next, says as much.
                if !over {
                    agent
                        .outbox
                        .send(AgentMessage::Accepted {
                            id: req.id.clone(),
                            task_id: req.task_id.clone(),
                            state: TaskState::Running,
                        })
                        .await;
                }
                drop(turn.take());
                let result = match early {
                    Some(r) => r,
                    None => tokio::select! {
                        r = &mut run => r,
                        _ = cancel.cancelled() => {
                            stop.cancel();
                            (&mut run).await
                        }
                    },
                };
                (result, Ending::Ran)
            }
        }
    };
    drop(slot);
    Finished {
        req,
        kind: TaskKind::Wasm,
        result,
        facts,
        ending,
        place,
    }
    .deliver(agent)
    .await;
}

/// The task's `not_after`, if it gives one.
pub(super) fn not_after(req: &RunRequest) -> Result<Option<time::OffsetDateTime>, String> {
    req.not_after
        .as_deref()
        .map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("not_after {t:?} is not an RFC 3339 time: {e}"))
        })
        .transpose()
}

/// `deadline_passed` when the task's `not_after` has passed.
pub(super) fn expired(not_after: Option<time::OffsetDateTime>) -> Option<Refusal> {
    let t = not_after?;
    (time::OffsetDateTime::now_utc() > t).then_some(Refusal::DeadlinePassed(t))
}

impl Agent {
    /// Picks up what the journal found unfinished at start: queued tasks run; tasks that were
    /// running end as `interrupted` (or run again if they said `idempotent`).
    pub async fn recover(self: &Arc<Self>, recovery: Recovery) {
        for record in recovery.running {
            let req = record.request;
            if req.idempotent {
                tracing::warn!(task_id = %req.task_id, "the agent stopped while this idempotent task ran; running it again");
                // It started before its expiry; running it again is finishing it.
                self.resume(req, false);
                continue;
            }
            tracing::warn!(task_id = %req.task_id, "the agent stopped while this task ran; reporting it as interrupted");
            let mut result = Refusal::Interrupted.into_result();
            result.file_sha256 = req.file_sha256.clone();
            let kind = self.kind_now(&req);
            Finished::never_ran(req, kind, result, self.activity.resume())
                .deliver(self)
                .await;
        }
        for record in recovery.queued {
            tracing::info!(task_id = %record.request.task_id, "resuming a task queued before the agent stopped");
            self.resume(record.request, true);
        }
    }

    /// Runs a task taken from the journal at start as a queued one; `check_expiry` is false
    /// for a task that had started already.
    fn resume(self: &Arc<Self>, req: RunRequest, check_expiry: bool) {
        let place = self.activity.resume();
        let cancel = lock(&self.live).register(&req.task_id, LiveState::Queued);
        let not_after = not_after(&req).ok().flatten().filter(|_| check_expiry);
        let queued = Queued {
            kind: self.kind_now(&req),
            req,
            not_after,
            place,
            cancel,
        };
        let this = self.clone();
        tokio::spawn(Box::pin(async move {
            match queued.start(&this).await {
                Ok(running) => running.run(&this).await.deliver(&this).await,
                Err(finished) => finished.deliver(&this).await,
            }
        }));
    }

    /// A queued task's command, resolved again as it starts: an install or removal while it
    /// waited changes what runs.
    fn resolve_again_at_start(&self, req: &RunRequest) -> Option<Target> {
        self.resolve(req)
    }

    /// What `req` would run as now, for a task taken from the journal at start (its command
    /// resolved before the agent stopped; it resolves again if it starts).
    fn kind_now(&self, req: &RunRequest) -> TaskKind {
        self.resolve(req).map_or(TaskKind::Unresolved, |t| t.kind())
    }
}
