//! The agent proper: what it does with the platform's requests, independent of the transport.
//!
//! ## A task's life
//!
//! 1. **Received.** A `run` is checked (a task id, exactly one of `command` / `module_sha256`,
//!    a readable `not_after`); a bad one is answered with an `error`.
//! 2. **Deduplicated.** A task id the agent has seen is never run again: a finished task is
//!    answered with its stored result, an unfinished one with `accepted` and its state.
//! 3. **Refused or accepted.** Beyond `max_concurrent_tasks + queue_capacity` tasks in progress
//!    the task is `rejected: busy`; an expired one `rejected: expired`; a command that resolves
//!    to nothing `rejected: unknown_command`; a full disk `rejected: storage_full`. These
//!    refusals are not recorded, so the platform may send the same task id again later.
//!    Otherwise the task is recorded in the [`Journal`] (durably) and only then answered with
//!    `accepted`.
//! 4. **Queued**, until one of `max_concurrent_tasks` slots is free. `cancel` removes it.
//! 5. **Running**, recorded durably before anything executes. A `command` resolves to the
//!    installed handler of that name, else to the shell rule of that name; a `module_sha256`
//!    runs that module. `cancel` interrupts a WASM handler at its next epoch tick or kills a
//!    shell command's process tree. With `stream`, output goes out as `chunk`s meanwhile.
//! 6. **Finished.** The result is stored in the journal (durably) and sent (for a task that
//!    ran, without waiting for the commit: see `Agent::finish`); it stays in the durable
//!    outbox until the platform's `ack`, and is sent again after every reconnect.
//!
//! When the agent starts, tasks recorded as queued run; tasks recorded as running are finished
//! as `interrupted` (or run again when the task said `idempotent`), exactly once, because
//! that ending is itself recorded.
//!
//! ## Modules
//!
//! A module is named by SHA-256. The agent runs it from its caches when it can (a warm run
//! reads no bytes and verifies nothing again), from its module store (`<state>/modules`, which
//! holds only modules that passed the trust policy) when it has the bytes, and otherwise asks
//! the platform for them (`need_module`) and waits for one binary frame whose SHA-256 is the one
//! asked for. Installed handlers (a signed module bound to a command name, which its signed
//! claims must carry) are kept in the journal; their modules stay in the store and their
//! compiled code in the disk cache, so they survive restarts.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use bridge_protocol::{
    AgentMessage, CancelOutcome, ErrorBody, ErrorCode, HandlerInfo, RunRequest, RunResult, Status,
    StatusReport, TaskState,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::journal::{
    Accept, EarlyResult, HandlerRecord, Journal, JournalConfig, JournalError, Recovery, TaskPhase,
    TaskRecord,
};
use crate::outbox::{Budget, Outgoing};
use crate::sandbox::Sandbox;
use crate::shell::{Allowlist, ShellRule};
use crate::stream::StreamTap;
use crate::trust::{grant, Prepared, Trust};

/// How many messages may wait for the platform before producers wait.
const OUTBOX_CAPACITY: usize = 4096;

/// How long the agent stays idle before it gives memory back ([`crate::memory::trim`]).
const TRIM_AFTER: Duration = Duration::from_secs(2);

/// While idle, how often the agent gives memory back again (heartbeats, status reports and
/// reconnect attempts touch a little code each time).
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Handler installations in progress at once; more are refused (`busy`).
const MAX_INSTALLS: usize = 4;

/// The longest task id accepted.
pub const MAX_TASK_ID_BYTES: usize = 256;

type Waiters = HashMap<String, Vec<oneshot::Sender<Arc<Vec<u8>>>>>;

/// How the agent runs tasks (the config's `[agent]` and `[shell]` sections, resolved).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Tasks running at once.
    pub max_concurrent_tasks: usize,
    /// Tasks waiting for a slot; beyond it, `busy`.
    pub queue_capacity: usize,
    /// The shell fallback's rules.
    pub shell: Allowlist,
    /// A delegated cgroup v2 directory for shell runs.
    pub cgroup_root: Option<PathBuf>,
    /// The journal's settings; `path` is set from the state directory.
    pub journal: JournalConfig,
}

impl AgentOptions {
    /// Defaults (32 running, 256 queued, no shell rules) with the journal in `state`.
    pub fn new(state: &std::path::Path) -> AgentOptions {
        AgentOptions {
            max_concurrent_tasks: 32,
            queue_capacity: 256,
            shell: Allowlist::default(),
            cgroup_root: None,
            journal: JournalConfig::new(state.join("journal.redb")),
        }
    }

    /// From a config file's sections.
    pub fn from_config(
        config: &crate::config::AgentConfig,
        state: &std::path::Path,
    ) -> Result<AgentOptions> {
        let a = &config.agent;
        let mut journal = JournalConfig::new(state.join("journal.redb"));
        journal.retention = Duration::from_secs(a.journal_retention_hours.saturating_mul(3600));
        journal.max_records = a.journal_max_records;
        journal.min_free_bytes = a.min_free_mib.saturating_mul(1 << 20);
        journal.max_bytes = a.journal_max_mib.saturating_mul(1 << 20);
        Ok(AgentOptions {
            max_concurrent_tasks: a.max_concurrent_tasks as usize,
            queue_capacity: a.queue_capacity as usize,
            shell: config.shell.allowlist()?,
            cgroup_root: config.shell.cgroup_root.clone(),
            journal,
        })
    }
}

/// Where a live task is (the agent's view; the journal's lags it by a commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiveState {
    Queued,
    Running,
    /// Its result is on its way out (its record may still be being written).
    Finished,
}

/// A task accepted and not yet forgotten.
struct Live {
    cancel: CancellationToken,
    state: LiveState,
}

/// Per task id, the `run` or `cancel` still taking effect. The next message for the same id
/// waits for it: messages on one connection take effect in the order they were sent, although
/// each is handled in a task of its own (a `run`'s acceptance waits for a journal commit, and a
/// `cancel` sent right behind it must find the task it names).
#[derive(Default)]
struct Turns {
    next: u64,
    /// The last turn taken for each task id, until it is over.
    last: HashMap<String, (u64, CancellationToken)>,
}

/// One message's turn for a task id: [`Turn::wait`] waits for the previous one to be over; the
/// turn is over when dropped.
struct Turn {
    turns: Arc<Mutex<Turns>>,
    task_id: String,
    seq: u64,
    over: CancellationToken,
    previous: Option<CancellationToken>,
}

impl Turns {
    /// The turn being taken for `key` now, if any: what a message that depends on it (but does
    /// not change it) waits for.
    fn pending(&self, key: &str) -> Option<CancellationToken> {
        self.last
            .get(key)
            .map(|(_, token)| token.clone())
            .filter(|t| !t.is_cancelled())
    }

    /// Every turn being taken now for a handler name.
    fn pending_handlers(&self) -> Vec<CancellationToken> {
        self.last
            .iter()
            .filter(|(key, (_, t))| key.starts_with(HANDLER_TURN) && !t.is_cancelled())
            .map(|(_, (_, t))| t.clone())
            .collect()
    }
}

/// The turns of `install_handler` and `remove_handler` are keyed by the handler name after this
/// prefix (a task id has no control characters, so the two never meet). A `run` naming the
/// command waits for the change in progress: an install followed by a run of it in one write
/// runs the new handler.
const HANDLER_TURN: &str = "\u{0}handler\u{0}";

fn handler_turn(name: &str) -> String {
    format!("{HANDLER_TURN}{name}")
}

impl Turn {
    /// Takes the next turn for `task_id`.
    fn take(turns: &Arc<Mutex<Turns>>, task_id: &str) -> Turn {
        let over = CancellationToken::new();
        let mut t = lock(turns);
        t.next += 1;
        let seq = t.next;
        let previous = t
            .last
            .insert(task_id.to_string(), (seq, over.clone()))
            .map(|(_, token)| token);
        Turn {
            turns: turns.clone(),
            task_id: task_id.to_string(),
            seq,
            over,
            previous,
        }
    }

    /// Whether an earlier message for the same task id is still taking effect.
    fn must_wait(&self) -> bool {
        self.previous.as_ref().is_some_and(|p| !p.is_cancelled())
    }

    /// Waits until the previous message for this task id has taken effect.
    async fn wait(&self) {
        if let Some(previous) = &self.previous {
            previous.cancelled().await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.over.cancel();
        let mut t = lock(&self.turns);
        if t.last
            .get(&self.task_id)
            .is_some_and(|(seq, _)| *seq == self.seq)
        {
            t.last.remove(&self.task_id);
        }
    }
}

/// The tasks accepted and not finished, and cancels that arrived for a recorded task before it
/// was registered here.
#[derive(Default)]
struct LiveTasks {
    tasks: HashMap<String, Live>,
    early_cancels: std::collections::HashSet<String>,
}

impl LiveTasks {
    /// Registers a task; returns its cancellation token, already cancelled if a cancel came
    /// first.
    fn register(&mut self, task_id: &str, running: bool) -> CancellationToken {
        let cancel = CancellationToken::new();
        if self.early_cancels.remove(task_id) {
            cancel.cancel();
        }
        self.tasks.insert(
            task_id.to_string(),
            Live {
                cancel: cancel.clone(),
                state: if running {
                    LiveState::Running
                } else {
                    LiveState::Queued
                },
            },
        );
        cancel
    }

    fn set(&mut self, task_id: &str, state: LiveState) {
        if let Some(l) = self.tasks.get_mut(task_id) {
            l.state = state;
        }
    }
}

/// The agent: sandbox, trust policy, journal, module store, and the outbox to the platform.
pub struct Agent {
    agent_id: String,
    sandbox: Sandbox,
    trust: Arc<Trust>,
    journal: Journal,
    shell: Allowlist,
    cgroup_root: Option<PathBuf>,
    modules_dir: PathBuf,
    module_wait: Duration,
    outbox: mpsc::Sender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Bytes of results waiting in the outbox ([`crate::outbox`]).
    budget: Budget,
    waiting: Mutex<Waiters>,
    /// Tasks accepted and not finished, by task id.
    live: Mutex<LiveTasks>,
    /// The message taking effect for each task id (see [`Turns`]).
    turns: Arc<Mutex<Turns>>,
    /// Execution slots (`max_concurrent_tasks`).
    slots: Arc<Semaphore>,
    /// Handler installations in progress (each may wait a minute for module bytes).
    installs: Arc<Semaphore>,
    /// Tasks accepted and not finished, plus those being accepted; bounded by `max_pending`.
    pending: AtomicUsize,
    max_pending: usize,
    /// Runs waiting for an earlier message about their task id or command (see [`Turns`]).
    waiting_runs: AtomicUsize,
    started: Instant,
    /// When the last task ended (none yet: `None`); a trim waits until it is [`TRIM_AFTER`] ago.
    last_task: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refused(status: Status, reason: Option<&str>, message: String) -> RunResult {
    let mut r = RunResult::refused(status, message);
    r.reason = reason.map(str::to_string);
    r
}

fn rejected(reason: &str, message: String) -> RunResult {
    refused(Status::Rejected, Some(reason), message)
}

/// The current time in RFC 3339 (UTC, seconds).
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Checks a `run` before anything else; the message explains what is wrong.
fn check_request(req: &RunRequest) -> Result<Option<time::OffsetDateTime>, String> {
    if req.task_id.is_empty() || req.task_id.len() > MAX_TASK_ID_BYTES {
        return Err(format!(
            "task_id must be 1 to {MAX_TASK_ID_BYTES} bytes (got {})",
            req.task_id.len()
        ));
    }
    if req.task_id.chars().any(char::is_control) {
        return Err("task_id contains control characters".into());
    }
    match (&req.command, &req.module_sha256) {
        (Some(_), Some(_)) => {
            return Err("give either `command` or `module_sha256`, not both".into())
        }
        (None, None) => return Err("give `command` or `module_sha256`".into()),
        _ => {}
    }
    req.not_after
        .as_deref()
        .map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("not_after {t:?} is not an RFC 3339 time: {e}"))
        })
        .transpose()
}

fn expired(not_after: Option<time::OffsetDateTime>) -> Option<RunResult> {
    let t = not_after?;
    (time::OffsetDateTime::now_utc() > t).then(|| {
        rejected(
            "expired",
            format!(
                "the task's not_after ({}) passed before it could start; it was not run",
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        )
    })
}

fn handler_info(h: HandlerRecord) -> HandlerInfo {
    HandlerInfo {
        name: h.name,
        module_sha256: h.module_sha256,
        installed_at: h.installed_at,
        key: h.key,
    }
}

fn refusal(id: &str, code: ErrorCode, message: String) -> AgentMessage {
    AgentMessage::Error(ErrorBody {
        id: Some(id.to_string()),
        code,
        message,
    })
}

/// Where a command resolves.
enum Target {
    Module {
        sha256: String,
        signature: Option<String>,
    },
    Shell(ShellRule),
}

impl Agent {
    /// An agent with its module store under `state/modules` and its journal per `options`.
    /// Returns what the journal found unfinished; pass it to [`Agent::recover`] once a tokio
    /// runtime runs.
    pub fn new(
        agent_id: String,
        sandbox: Sandbox,
        trust: Trust,
        state: &std::path::Path,
        options: AgentOptions,
    ) -> Result<(Arc<Agent>, Recovery)> {
        let modules_dir = state.join("modules");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&modules_dir)
            .with_context(|| format!("creating the module store {}", modules_dir.display()))?;
        let (journal, recovery) = Journal::open(options.journal.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("opening the journal {}", options.journal.path.display()))?;
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let slots = options.max_concurrent_tasks.max(1);
        Ok((
            Arc::new(Agent {
                agent_id,
                sandbox,
                trust: Arc::new(trust),
                journal,
                shell: options.shell,
                cgroup_root: options.cgroup_root,
                modules_dir,
                module_wait: Duration::from_secs(60),
                outbox: tx,
                outbox_rx: Mutex::new(Some(rx)),
                budget: Budget::default(),
                waiting: Mutex::new(HashMap::new()),
                live: Mutex::new(LiveTasks::default()),
                turns: Arc::new(Mutex::new(Turns::default())),
                slots: Arc::new(Semaphore::new(slots)),
                installs: Arc::new(Semaphore::new(MAX_INSTALLS)),
                pending: AtomicUsize::new(0),
                waiting_runs: AtomicUsize::new(0),
                max_pending: slots + options.queue_capacity,
                started: Instant::now(),
                last_task: Mutex::new(None),
            }),
            recovery,
        ))
    }

    /// The agent id.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The receiving end of the outbox (taken once, by the link).
    pub fn take_outbox(&self) -> Option<mpsc::Receiver<Outgoing>> {
        lock(&self.outbox_rx).take()
    }

    /// The status report sent to the platform.
    pub fn status_report(&self) -> StatusReport {
        let mut running: Vec<String> = lock(&self.live)
            .tasks
            .iter()
            .filter(|(_, l)| l.state == LiveState::Running)
            .map(|(id, _)| id.clone())
            .collect();
        running.sort();
        StatusReport {
            agent_id: self.agent_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            host: crate::facts::collect(),
            running,
            agent_uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The task ids of the results waiting for the platform's `ack`, oldest first (sent at
    /// every connection, a batch at a time, with [`Agent::results_of`]).
    pub fn unacked_ids(&self) -> Vec<String> {
        self.journal.unacked_ids()
    }

    /// How many of the first `ids` to read from the journal at once: at most `count`, and no
    /// more than `bytes` of stored results (at least one).
    pub fn backlog_batch(
        &self,
        ids: &std::collections::VecDeque<String>,
        count: usize,
        bytes: usize,
    ) -> usize {
        self.journal
            .batch_within(ids.iter().take(count), bytes as u64)
    }

    /// The `result` messages of those of `task_ids` still waiting for an `ack`.
    pub fn results_of(&self, task_ids: &[String]) -> Vec<AgentMessage> {
        self.journal
            .unacked_of(task_ids)
            .into_iter()
            .filter_map(|r| {
                Some(AgentMessage::Result {
                    id: r.request.id,
                    task_id: r.request.task_id,
                    result: r.result?,
                })
            })
            .collect()
    }

    /// The platform stored these results.
    pub fn ack(&self, task_ids: &[String]) {
        self.journal.ack(task_ids);
    }

    async fn send(&self, msg: AgentMessage) {
        let _ = self.outbox.send(msg.into()).await;
    }

    /// Queues a result of `bytes` that is recorded in the journal: in memory if it fits the
    /// outbox's byte budget, else by task id (the link reads it from the journal to send it).
    async fn send_stored_result(&self, msg: AgentMessage, bytes: usize) {
        let queued = match self.budget.try_charge(bytes) {
            Some(charge) => Outgoing::Message(msg, Some(charge)),
            None => match msg {
                AgentMessage::Result { task_id, .. } => Outgoing::Stored(task_id),
                other => other.into(),
            },
        };
        let _ = self.outbox.send(queued).await;
    }

    /// Queues a result of `bytes` that is not (or not yet) in the outbox's journal copy,
    /// waiting for room in the byte budget.
    async fn send_result(&self, msg: AgentMessage, bytes: usize) {
        let charge = self.budget.charge(bytes).await;
        let _ = self.outbox.send(Outgoing::Message(msg, charge)).await;
    }

    /// Queues a message without waiting (an answer to a bad frame); returns false when the
    /// outbox is full and it was dropped (the caller says so in its log).
    pub fn report(&self, msg: AgentMessage) -> bool {
        self.outbox.try_send(msg.into()).is_ok()
    }

    /// Picks up what the journal found unfinished at start: queued tasks run; tasks that were
    /// running end as `interrupted` (or run again if they said `idempotent`).
    pub async fn recover(self: &Arc<Self>, recovery: Recovery) {
        for record in recovery.running {
            let req = record.request;
            if req.idempotent {
                tracing::warn!(task_id = %req.task_id, "the agent stopped while this idempotent task ran; running it again");
                // It started before its expiry; running it again is finishing it.
                self.spawn_task(req, false);
                continue;
            }
            tracing::warn!(task_id = %req.task_id, "the agent stopped while this task ran; reporting it as interrupted");
            let mut result = RunResult::refused(
                Status::Interrupted,
                "the agent stopped (killed, crashed or the host rebooted) while this task ran; \
                 it was not run again (a task may declare itself idempotent to be re-run)",
            );
            result.module_sha256 = req.module_sha256.clone();
            self.finish(&req, result, false).await;
        }
        for record in recovery.queued {
            tracing::info!(task_id = %record.request.task_id, "resuming a task queued before the agent stopped");
            self.spawn_task(record.request, true);
        }
    }

    /// Handles a `run` in the background: dedup, refusal or durable acceptance, then the run.
    /// Called in the order messages arrive: the run takes its task id's turn here, so a later
    /// `cancel` or `run` of the same id takes effect after this one's acceptance.
    pub fn start_run(self: &Arc<Self>, req: RunRequest) {
        let this = self.clone();
        let checked = check_request(&req);
        let turn = checked
            .is_ok()
            .then(|| Turn::take(&self.turns, &req.task_id));
        let handler_change = req
            .command
            .as_deref()
            .and_then(|name| lock(&self.turns).pending(&handler_turn(name)));
        // Boxed: the task's state machine is large (the run, the journal and the send are
        // all inlined in it), and the runtime moves a task's future several times on its way
        // in and out; a box moves as a pointer.
        tokio::spawn(Box::pin(this.receive(req, checked, turn, handler_change)));
    }

    async fn receive(
        self: Arc<Self>,
        req: RunRequest,
        checked: Result<Option<time::OffsetDateTime>, String>,
        turn: Option<Turn>,
        handler_change: Option<CancellationToken>,
    ) {
        let (not_after, turn) = match (checked, turn) {
            (Ok(t), Some(turn)) => (t, turn),
            (Ok(_), None) => unreachable!("a run that passes its checks takes a turn"),
            (Err(message), _) => {
                tracing::warn!(id = %req.id, "refusing a run: {message}");
                return self
                    .send(refusal(&req.id, ErrorCode::Malformed, message))
                    .await;
            }
        };
        let change = handler_change.filter(|c| !c.is_cancelled());
        if turn.must_wait() || change.is_some() {
            // Waiting runs hold their requests: as many as may be in progress, then `busy`.
            if self.waiting_runs.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
                self.waiting_runs.fetch_sub(1, Ordering::SeqCst);
                let result = rejected(
                    "busy",
                    format!(
                        "{} runs already wait for an earlier message about their task id or command; try again later",
                        self.max_pending
                    ),
                );
                return self.reply_unrecorded(&req, result).await;
            }
            turn.wait().await;
            if let Some(change) = change {
                change.cancelled().await;
            }
            self.waiting_runs.fetch_sub(1, Ordering::SeqCst);
        }
        if self.answer_seen(&req).await {
            return;
        }
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(task_id = %req.task_id, "refusing a task: {} already in progress", self.max_pending);
            let result = rejected(
                "busy",
                format!(
                    "the agent already has {} tasks running or queued; try again later",
                    self.max_pending
                ),
            );
            return self.reply_unrecorded(&req, result).await;
        }
        let refusal = match expired(not_after) {
            Some(r) => Some(r),
            None => self.unresolvable(&req),
        };
        if let Some(result) = refusal {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return self.reply_unrecorded(&req, result).await;
        }
        // A free slot now: the task is recorded as running in the same commit that accepts it.
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_some() {
            if let Some(target) = self.runnable_early(&req) {
                return self.run_while_accepting(req, target, slot, turn).await;
            }
        }
        let accepted = match &slot {
            Some(_) => self.journal.accept_running(&req).await,
            None => self.journal.accept(&req).await,
        };
        match accepted {
            Ok(Accept::New) => {}
            Ok(Accept::Seen(record)) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                return self.answer_record(&req, record).await;
            }
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                return self.refuse_unrecorded(&req, e).await;
            }
        }
        let cancel = lock(&self.live).register(&req.task_id, slot.is_some());
        tracing::info!(task_id = %req.task_id, "task accepted");
        self.send(AgentMessage::Accepted {
            id: req.id.clone(),
            task_id: req.task_id.clone(),
            state: if slot.is_some() {
                TaskState::Running
            } else {
                TaskState::Queued
            },
        })
        .await;
        // Accepted and registered: a `cancel` or `run` of this id that waited now finds it.
        drop(turn);
        self.clone().run_task(req, cancel, not_after, slot).await;
    }

    /// The journal could not record the task: `storage_full` or `storage_error`, nothing ran.
    async fn refuse_unrecorded(&self, req: &RunRequest, e: JournalError) {
        let reason = match e {
            JournalError::StorageFull(_) => "storage_full",
            JournalError::Io(_) => "storage_error",
        };
        tracing::error!(task_id = %req.task_id, "refusing a task: {e}");
        let result = rejected(reason, format!("the task could not be recorded: {e}"));
        self.reply_unrecorded(req, result).await
    }

    /// Runs a task taken from the journal (at start), outside of `receive`; `check_expiry`
    /// is false for a task that had started already.
    fn spawn_task(self: &Arc<Self>, req: RunRequest, check_expiry: bool) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let cancel = lock(&self.live).register(&req.task_id, false);
        let not_after = check_request(&req).ok().flatten().filter(|_| check_expiry);
        let this = self.clone();
        tokio::spawn(Box::pin(this.run_task(req, cancel, not_after, None)));
    }

    /// A repeated task id: answers from memory or the journal. Returns whether it answered.
    async fn answer_seen(&self, req: &RunRequest) -> bool {
        let live = lock(&self.live).tasks.get(&req.task_id).map(|l| l.state);
        if let Some(state) = live {
            let state = match state {
                LiveState::Queued => TaskState::Queued,
                LiveState::Running => TaskState::Running,
                LiveState::Finished => TaskState::Finished,
            };
            self.send(AgentMessage::Accepted {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                state,
            })
            .await;
            return true;
        }
        match self.journal.get(&req.task_id) {
            Some(record) => {
                self.answer_record(req, record).await;
                true
            }
            None => false,
        }
    }

    async fn answer_record(&self, req: &RunRequest, record: TaskRecord) {
        tracing::info!(task_id = %req.task_id, phase = ?record.phase, "task id seen before: not running it again");
        let msg = match (record.phase, record.result) {
            (TaskPhase::Done, Some(result)) => {
                let bytes = measure_result(&result, &req.id, &req.task_id).0;
                let msg = AgentMessage::Result {
                    id: req.id.clone(),
                    task_id: req.task_id.clone(),
                    result,
                };
                // Repeats of large results wait for room: a platform that repeats task ids
                // and does not read cannot make the agent hold their copies.
                return self.send_result(msg, bytes).await;
            }
            (phase, _) => AgentMessage::Accepted {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                state: match phase {
                    TaskPhase::Queued => TaskState::Queued,
                    TaskPhase::Running => TaskState::Running,
                    TaskPhase::Done => TaskState::Finished,
                },
            },
        };
        self.send(msg).await;
    }

    /// A refusal that is not recorded: the same task id may be sent again later.
    async fn reply_unrecorded(&self, req: &RunRequest, result: RunResult) {
        tracing::info!(task_id = %req.task_id, reason = ?result.reason, "task refused");
        self.send(AgentMessage::Result {
            id: req.id.clone(),
            task_id: req.task_id.clone(),
            result,
        })
        .await;
    }

    /// `rejected: unknown_command` when a command names neither a handler nor a shell rule.
    fn unresolvable(&self, req: &RunRequest) -> Option<RunResult> {
        let name = req.command.as_deref()?;
        match self.resolve(name) {
            Some(_) => None,
            None => Some(self.unknown_command(name)),
        }
    }

    fn unknown_command(&self, name: &str) -> RunResult {
        rejected(
            "unknown_command",
            format!(
                "no handler is installed as {name:?} and no shell rule has that name; nothing was run"
            ),
        )
    }

    /// Resolution order: installed handler, then shell rule.
    fn resolve(&self, name: &str) -> Option<Target> {
        if let Some(h) = self.journal.handler(name) {
            return Some(Target::Module {
                sha256: h.module_sha256,
                signature: h.signature,
            });
        }
        self.shell.get(name).cloned().map(Target::Shell)
    }

    /// Waits for a slot (unless it holds one already: then the task was recorded as running
    /// when it was accepted), checks the expiry, records the start, runs, records the result.
    async fn run_task(
        self: Arc<Self>,
        req: RunRequest,
        cancel: CancellationToken,
        not_after: Option<time::OffsetDateTime>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let recorded_running = slot.is_some();
        let slot = match slot {
            Some(permit) => Some(permit),
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                permit = self.slots.clone().acquire_owned() => permit.ok(),
            },
        };
        let result = match slot {
            None => {
                let mut r =
                    RunResult::refused(Status::Cancelled, "cancelled while queued; it never ran");
                r.module_sha256 = req.module_sha256.clone();
                Some(r)
            }
            Some(_) if recorded_running => None, // checked on receipt, an instant ago
            Some(_) => expired(not_after),
        };
        let started = match (&result, recorded_running) {
            (Some(_), _) => Ok(()),
            (None, true) => Ok(()),
            (None, false) => self.journal.start(&req.task_id).await,
        };
        let mut ran = false;
        let result = match result {
            Some(r) => r,
            None => match started {
                Err(e) => {
                    tracing::error!(task_id = %req.task_id, "could not record the task's start: {e}");
                    rejected(
                        "storage_error",
                        format!("the task's start could not be recorded, so it was not run: {e}"),
                    )
                }
                Ok(()) => {
                    ran = true;
                    lock(&self.live).set(&req.task_id, LiveState::Running);
                    tracing::info!(task_id = %req.task_id, command = ?req.command, module = ?req.module_sha256, "task started");
                    let tap = req.stream.then(|| {
                        let tap = StreamTap::new(&req.task_id, self.outbox.clone());
                        tokio::spawn(tap.clone().flusher());
                        tap
                    });
                    let r = self.execute(&req, cancel, tap.clone()).await;
                    if let Some(tap) = tap {
                        tap.finish();
                    }
                    r
                }
            },
        };
        drop(slot);
        self.complete(&req, result, ran).await;
    }

    /// The end of an accepted task: its result recorded and sent, the task forgotten.
    async fn complete(self: &Arc<Self>, req: &RunRequest, result: RunResult, ran: bool) {
        self.finish(req, result, ran).await;
        lock(&self.live).tasks.remove(&req.task_id);
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.went_idle();
        }
    }

    /// The handler a task resolves to, if it may run while its acceptance is being recorded:
    /// a WASM handler already verified and compiled (no module to fetch), for a task that does
    /// not stream. A handler run by the agent gets no directories and no environment (see
    /// [`Agent::run_module`]): its only effect is its result, and that is not sent before the
    /// acceptance is on disk. If the agent dies first, nothing of the run was seen by anyone,
    /// and the platform, which got no `accepted`, sends the task again: it runs as if for the
    /// first time. Shell commands, module fetches and streamed output are effects: those wait.
    fn runnable_early(&self, req: &RunRequest) -> Option<Target> {
        if req.stream {
            return None;
        }
        let target = self.target_of(req)?;
        let Target::Module { sha256, signature } = &target else {
            return None;
        };
        let sha = parse_sha(sha256)?;
        let detached = decode_signature(signature.as_deref()).ok()?;
        self.trust
            .cached(&self.sandbox, &sha, detached.as_deref())
            .map(|_| target)
    }

    /// [`Agent::runnable_early`]'s tasks: the handler runs while the journal records the task
    /// as accepted and running; once that is durable, `accepted` is sent (unless the run is
    /// over by then: its result alone says the task was accepted), then the result.
    /// A run that ends before the journal writer gets to the acceptance offers its result,
    /// which is then written in the same commit ([`Journal::accept_running_with`]): one
    /// durable write for the whole task, and no `finish` to record afterwards (the usual case
    /// under load, when the acceptance waits for the commit before it).
    /// A task the journal refuses (seen before, storage full) is answered as `receive` would,
    /// and its run is stopped and discarded.
    async fn run_while_accepting(
        self: Arc<Self>,
        req: RunRequest,
        target: Target,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        turn: Turn,
    ) {
        let stop = CancellationToken::new();
        let run = self.execute_target(&req, target, stop.clone(), None);
        tokio::pin!(run);
        let offered = EarlyResult::default();
        let accept = self.journal.accept_running_with(&req, offered.clone());
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
        let refusal = match accepted {
            Ok(Accept::New) => None,
            Ok(Accept::Seen(record)) => Some(Err(record)),
            Err(e) => Some(Ok(e)),
        };
        if let Some(refusal) = refusal {
            stop.cancel();
            if !over {
                let _ = (&mut run).await;
            }
            drop(slot);
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return match refusal {
                Err(record) => self.answer_record(&req, record).await,
                Ok(e) => self.refuse_unrecorded(&req, e).await,
            };
        }
        tracing::info!(task_id = %req.task_id, "task accepted");
        tracing::info!(task_id = %req.task_id, command = ?req.command, module = ?req.module_sha256, "task started (while its acceptance was recorded)");
        match offered.take() {
            Some((result, true)) => {
                // Recorded with the acceptance: the journal shows the task done (a cancel now
                // answers `finished`), so it is never registered as live.
                drop(slot);
                self.announce(&req, result).await;
                // After the result is queued: a repeat of this id, answered from the journal,
                // goes out after it.
                drop(turn);
                if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.went_idle();
                }
                return;
            }
            Some((result, false)) => early = Some(result),
            None => {}
        }
        let cancel = lock(&self.live).register(&req.task_id, true);
        // A run already over needs no `accepted`: its result, sent next, says as much.
        if !over {
            self.send(AgentMessage::Accepted {
                id: req.id.clone(),
                task_id: req.task_id.clone(),
                state: TaskState::Running,
            })
            .await;
        }
        drop(turn);
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
        drop(slot);
        self.complete(&req, result, true).await;
    }

    /// The last task finished: once the agent has stayed idle for [`TRIM_AFTER`], give memory
    /// back ([`crate::memory::trim`]), so an idle agent holds what it uses, not what its
    /// busiest moment needed.
    fn went_idle(self: &Arc<Self>) {
        *lock(&self.last_task) = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            // A task that ended meanwhile makes this a no-op; its own timer trims later.
            this.trim_if_idle("idle after tasks").await;
        });
    }

    /// Gives memory back shortly after start (once connecting is done) and then every
    /// [`TRIM_EVERY`] while no task runs: what heartbeats, status reports and reconnect
    /// attempts touch is released again, so an idle agent's memory stays flat. Runs until the
    /// runtime stops.
    pub fn keep_trimmed(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            loop {
                this.trim_if_idle("idle").await;
                tokio::time::sleep(TRIM_EVERY).await;
            }
        });
    }

    /// The link failed and waits to reconnect: give back what the attempt touched (connecting,
    /// TLS, logging), so an agent cut off from its platform for hours stays as small as an idle
    /// connected one, whatever the backoff.
    pub fn trim_while_waiting(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move { this.trim_if_idle("waiting to reconnect").await });
    }

    /// Trims memory unless a task is in progress or ended less than [`TRIM_AFTER`] ago (its
    /// code will likely be needed again soon).
    async fn trim_if_idle(&self, why: &'static str) {
        let recent = lock(&self.last_task).is_some_and(|t| t.elapsed() < TRIM_AFTER);
        if recent || self.pending.load(Ordering::SeqCst) != 0 {
            return;
        }
        let before = crate::memory::resident_kib();
        let Ok(trimmed) = tokio::task::spawn_blocking(crate::memory::trim).await else {
            return;
        };
        tracing::debug!(
            why,
            before_kib = before,
            after_kib = crate::memory::resident_kib(),
            code_kib = trimmed.kib,
            mappings = trimmed.mappings,
            "memory trimmed"
        );
    }

    /// Records the result and sends it.
    ///
    /// For a task recorded as running (`ran`), sending does not wait for the commit, and the
    /// commit does not wait for the disk (it is made durable by the next durable commit, at
    /// most [`crate::journal::FLUSH_AFTER`] later): the result is in the journal's write queue
    /// before it is in the outbox (so the platform's `ack` is applied after it), and if the
    /// agent dies before it is on disk, the restarted agent finds the task running and reports
    /// it `interrupted`. The platform keeps the first result it receives for a task id, so it
    /// keeps the real one if it got it; if it did not, `interrupted` is the truth. Either way
    /// one result, and neither the round trip nor the next task's accept waits for a second
    /// fsync. A task that never ran (cancelled or expired while queued) is still
    /// recorded as queued, and a restart would run it: its result is sent only once committed.
    async fn finish(&self, req: &RunRequest, mut result: RunResult, ran: bool) {
        let bytes = fit_to_frame(&mut result, &req.id, &req.task_id);
        // From now on a repeat of this task id is told it finished, not that it runs.
        lock(&self.live).set(&req.task_id, LiveState::Finished);
        tracing::info!(task_id = %req.task_id, status = %result.status, reason = ?result.reason, "task finished");
        let message = |result: RunResult| AgentMessage::Result {
            id: req.id.clone(),
            task_id: req.task_id.clone(),
            result,
        };
        let recorded = match self.budget.try_charge(bytes) {
            Some(charge) if ran => {
                let record = self.journal.finish_lazily(&req.task_id, &result);
                let msg = message(result.clone());
                let send = self.outbox.send(Outgoing::Message(msg, Some(charge)));
                let (recorded, _) = tokio::join!(record, send);
                recorded
            }
            charge => {
                // Not sent before it is recorded: a task that never ran (see above), or a
                // result that does not fit in memory, which then waits in the journal (and is
                // not copied meanwhile). Either way the journal's is the only copy: durably.
                let recorded = self.journal.finish(&req.task_id, &result).await;
                let queued = match (charge, &recorded) {
                    (Some(charge), _) => Outgoing::Message(message(result), Some(charge)),
                    (None, Ok(())) => Outgoing::Stored(req.task_id.clone()),
                    // Not recorded: this message is the only copy.
                    (None, Err(_)) => message(result).into(),
                };
                let _ = self.outbox.send(queued).await;
                recorded
            }
        };
        if let Err(e) = recorded {
            tracing::error!(task_id = %req.task_id, "could not record the task's result (it was sent; a restart now would report the task interrupted or run it if it never started): {e}");
        }
    }

    /// Sends the result of a task whose result is recorded already (with its acceptance).
    async fn announce(&self, req: &RunRequest, result: RunResult) {
        tracing::info!(task_id = %req.task_id, status = %result.status, reason = ?result.reason, "task finished (recorded with its acceptance)");
        let bytes = measure_result(&result, &req.id, &req.task_id).0;
        let msg = AgentMessage::Result {
            id: req.id.clone(),
            task_id: req.task_id.clone(),
            result,
        };
        self.send_stored_result(msg, bytes).await;
    }

    async fn execute(
        &self,
        req: &RunRequest,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        let target = match self.target_of(req) {
            Some(t) => t,
            None => match &req.command {
                Some(name) => return self.unknown_command(name),
                None => unreachable!("checked on receipt: a command or a module"),
            },
        };
        self.execute_target(req, target, cancel, tap).await
    }

    /// What a task runs: its command resolved ([`Agent::resolve`]), or the module it names.
    /// `None` for a command that resolves to nothing.
    fn target_of(&self, req: &RunRequest) -> Option<Target> {
        match (&req.command, &req.module_sha256) {
            (Some(name), _) => self.resolve(name),
            (None, Some(sha)) => Some(Target::Module {
                sha256: sha.clone(),
                signature: req.signature.clone(),
            }),
            (None, None) => None,
        }
    }

    async fn execute_target(
        &self,
        req: &RunRequest,
        target: Target,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        match target {
            Target::Shell(rule) => self.run_shell(rule, req, cancel, tap).await,
            Target::Module { sha256, signature } => {
                let run = self.run_module(req, &sha256, signature.as_deref(), cancel.clone(), tap);
                tokio::select! {
                    biased;
                    r = run => r,
                    _ = cancel.cancelled() => {
                        let mut r = RunResult::refused(Status::Cancelled, "cancelled before the handler started");
                        r.module_sha256 = Some(sha256);
                        r
                    }
                }
            }
        }
    }

    async fn run_shell(
        &self,
        mut rule: ShellRule,
        req: &RunRequest,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        // A task may ask for less time or output than the rule allows, never more.
        let mut clamped = Vec::new();
        if let Some(t) = req.limits.timeout_ms {
            if t < rule.timeout_ms {
                rule.timeout_ms = t.max(1);
            } else if t > rule.timeout_ms {
                clamped.push("timeout_ms".to_string());
            }
        }
        if let Some(o) = req.limits.output_bytes {
            if o < rule.output_bytes {
                rule.output_bytes = o;
            } else if o > rule.output_bytes {
                clamped.push("output_bytes".to_string());
            }
        }
        let mut result =
            crate::shell::run_streamed(&rule, &req.args, cancel, self.cgroup_root.as_deref(), tap)
                .await;
        if let Some(l) = result.limits.as_mut() {
            l.clamped.extend(clamped);
        }
        result
    }

    async fn run_module(
        &self,
        req: &RunRequest,
        sha_hex: &str,
        signature: Option<&str>,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        let sha = match parse_sha(sha_hex) {
            Some(sha) => sha,
            None => {
                return refused(
                    Status::InvalidModule,
                    None,
                    "module_sha256 is not 64 hex characters".into(),
                )
            }
        };
        let detached = match decode_signature(signature) {
            Ok(d) => d,
            Err(r) => return *r,
        };
        let prepared = match self.trust.cached(&self.sandbox, &sha, detached.as_deref()) {
            Some(p) => p,
            None => match self.prepare(&req.id, sha, detached).await {
                Ok(p) => p,
                Err(r) => return *r,
            },
        };
        let defaults = self.sandbox.config().limits.defaults;
        let verified = prepared.verified.as_deref();
        let name = verified.map_or_else(|| "handler".to_string(), |v| v.claims.name.clone());
        let input = serde_json::to_vec(&req.input).unwrap_or_else(|_| b"null".to_vec());
        let (mut spec, _denied) = grant(verified, req.limits, &defaults, Vec::new(), Vec::new())
            .into_spec(input, name, &req.args);
        spec.cancel = Some(cancel);
        spec.tap = tap;
        match self.sandbox.run(&prepared.handler, spec).await {
            Ok(r) => r,
            Err(e) => refused(
                Status::Trap,
                None,
                format!("the run could not be set up: {e:#}"),
            ),
        }
    }

    /// Gets the module's bytes, checks and compiles them (off the async threads), and keeps
    /// them in the store when they passed.
    async fn prepare(
        &self,
        request_id: &str,
        sha: [u8; 32],
        detached: Option<Vec<u8>>,
    ) -> Result<Prepared, Box<RunResult>> {
        let bytes = self
            .module_bytes(request_id, &sha)
            .await
            .map_err(Box::new)?;
        let (trust, sandbox) = (self.trust.clone(), self.sandbox.clone());
        let store = self.store_path(&hex::encode(sha));
        let dir = self.modules_dir.clone();
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let prepared = trust.prepare(&sandbox, &bytes, detached.as_deref())?;
            // Only modules that passed the trust policy and compiled are kept on disk.
            if !store.exists() {
                let stored = tempfile::NamedTempFile::new_in(&dir)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).map(|_| f))
                    .and_then(|f| f.persist(&store).map_err(|e| e.error));
                match stored {
                    Ok(_) => {
                        let installed: std::collections::HashSet<String> = journal
                            .handlers()
                            .into_iter()
                            .map(|h| format!("{}.wasm", h.module_sha256))
                            .collect();
                        prune_store(&dir, MODULE_STORE_BYTES, &installed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not store the module; it will be fetched again next time")
                    }
                }
            }
            Ok(prepared)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Box::new(refused(
                Status::Trap,
                None,
                format!("module preparation failed: {e}"),
            )))
        })
    }

    fn store_path(&self, sha_hex: &str) -> PathBuf {
        self.modules_dir.join(format!("{sha_hex}.wasm"))
    }

    /// The module's bytes from the store, or from the platform (`need_module`).
    async fn module_bytes(
        &self,
        request_id: &str,
        sha: &[u8; 32],
    ) -> Result<Arc<Vec<u8>>, RunResult> {
        let sha_hex = hex::encode(sha);
        if let Ok(bytes) = std::fs::read(self.store_path(&sha_hex)) {
            if Sha256::digest(&bytes).as_slice() == sha {
                return Ok(Arc::new(bytes));
            }
            tracing::warn!(module = %sha_hex, "a stored module does not match its hash; fetching it again");
            let _ = std::fs::remove_file(self.store_path(&sha_hex));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting)
            .entry(sha_hex.clone())
            .or_default()
            .push(tx);
        let ask = AgentMessage::NeedModule {
            id: request_id.to_string(),
            sha256: sha_hex.clone(),
        };
        self.send(ask).await;
        match tokio::time::timeout(self.module_wait, rx).await {
            Ok(Ok(bytes)) => Ok(bytes),
            _ => {
                let mut waiting = lock(&self.waiting);
                if let Some(list) = waiting.get_mut(&sha_hex) {
                    list.retain(|s| !s.is_closed());
                    if list.is_empty() {
                        waiting.remove(&sha_hex);
                    }
                }
                Err(rejected(
                    "module_unavailable",
                    format!(
                        "the platform did not send module {sha_hex} within {} s",
                        self.module_wait.as_secs()
                    ),
                ))
            }
        }
    }

    /// A binary frame arrived: module bytes, valid only if some run asked for that hash.
    pub fn module_arrived(&self, bytes: Vec<u8>) -> Result<(), ErrorBody> {
        let max = self.sandbox.config().max_module_bytes;
        if bytes.len() as u64 > max {
            return Err(ErrorBody {
                id: None,
                code: ErrorCode::Oversize,
                message: format!(
                    "a module of {} bytes exceeds the agent's limit of {max} bytes",
                    bytes.len()
                ),
            });
        }
        let sha_hex = hex::encode(Sha256::digest(&bytes));
        let Some(waiters) = lock(&self.waiting).remove(&sha_hex) else {
            let asked = lock(&self.waiting).keys().cloned().collect::<Vec<_>>();
            let code = if asked.is_empty() {
                ErrorCode::Unexpected
            } else {
                ErrorCode::ModuleMismatch
            };
            return Err(ErrorBody {
                id: None,
                code,
                message: format!("received {} bytes hashing to {sha_hex}, which no run asked for (waiting for {asked:?})", bytes.len()),
            });
        };
        let bytes = Arc::new(bytes);
        for w in waiters {
            let _ = w.send(bytes.clone());
        }
        Ok(())
    }

    /// `cancel`: removes a queued task or stops a running one; answers `cancel_reply`.
    pub fn cancel(self: &Arc<Self>, id: String, task_id: String) {
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
            // Under the `live` lock: `receive` registers a task under it too, so a cancel that
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
                None => match self.journal.get(&task_id).map(|r| r.phase) {
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
        let this = self.clone();
        tokio::spawn(async move { this.send(msg).await });
    }

    fn handler_list(&self) -> Vec<HandlerInfo> {
        self.journal
            .handlers()
            .into_iter()
            .map(handler_info)
            .collect()
    }

    /// `list_handlers`.
    pub fn list_handlers(self: &Arc<Self>, id: String) {
        let this = self.clone();
        let changes = lock(&self.turns).pending_handlers();
        tokio::spawn(async move {
            for change in changes {
                change.cancelled().await;
            }
            let handlers = this.handler_list();
            this.send(AgentMessage::Handlers { id, handlers }).await;
        });
    }

    /// `remove_handler`.
    pub fn remove_handler(self: &Arc<Self>, id: String, name: String) {
        let this = self.clone();
        let turn = Turn::take(&self.turns, &handler_turn(&name));
        tokio::spawn(async move {
            turn.wait().await;
            let msg = match this.journal.remove_handler(&name).await {
                Ok(true) => {
                    tracing::info!(name = %name, "handler removed");
                    AgentMessage::Handlers {
                        id,
                        handlers: this.handler_list(),
                    }
                }
                Ok(false) => refusal(
                    &id,
                    ErrorCode::NotFound,
                    format!("no handler is installed as {name:?}"),
                ),
                Err(e) => refusal(&id, ErrorCode::Refused, format!("storage_error: {e}")),
            };
            this.send(msg).await;
            drop(turn);
        });
    }

    /// `install_handler`: fetch, verify, compile and store the module, check that its signed
    /// claims name the command, record it.
    pub fn install_handler(
        self: &Arc<Self>,
        id: String,
        name: String,
        module_sha256: String,
        signature: Option<String>,
    ) {
        let Ok(permit) = self.installs.clone().try_acquire_owned() else {
            let msg = refusal(
                &id,
                ErrorCode::Refused,
                format!("busy: {MAX_INSTALLS} handler installations are already in progress"),
            );
            let this = self.clone();
            tokio::spawn(async move { this.send(msg).await });
            return;
        };
        let this = self.clone();
        let turn = Turn::take(&self.turns, &handler_turn(&name));
        tokio::spawn(async move {
            let _permit = permit;
            turn.wait().await;
            let msg = match this
                .install(&id, &name, &module_sha256, signature.clone())
                .await
            {
                Ok(()) => AgentMessage::Handlers {
                    id,
                    handlers: this.handler_list(),
                },
                Err(message) => {
                    tracing::warn!(name = %name, module = %module_sha256, "refusing to install a handler: {message}");
                    refusal(&id, ErrorCode::Refused, message)
                }
            };
            this.send(msg).await;
            drop(turn);
        });
    }

    async fn install(
        &self,
        id: &str,
        name: &str,
        sha_hex: &str,
        signature: Option<String>,
    ) -> Result<(), String> {
        if !crate::shell::rules::valid_name(name) {
            return Err(format!(
                "bad_name: {name:?} is not a valid command name (letters, digits, '-', '_', '.', at most 64)"
            ));
        }
        let sha = parse_sha(sha_hex)
            .ok_or_else(|| "bad_module: module_sha256 is not 64 hex characters".to_string())?;
        let detached = decode_signature(signature.as_deref()).map_err(|r| describe(&r))?;
        let prepared = match self.trust.cached(&self.sandbox, &sha, detached.as_deref()) {
            Some(p) => p,
            None => self
                .prepare(id, sha, detached)
                .await
                .map_err(|r| describe(&r))?,
        };
        let Some(verified) = prepared.verified.as_deref() else {
            return Err(
                "unsigned: an installed handler must be signed, with claims naming its command"
                    .into(),
            );
        };
        if verified.claims.name != name {
            return Err(format!(
                "name_mismatch: the module is signed for {:?}, not {name:?}",
                verified.claims.name
            ));
        }
        let record = HandlerRecord {
            name: name.to_string(),
            module_sha256: hex::encode(sha),
            signature,
            installed_at: now_rfc3339(),
            key: Some(verified.key_id.to_string()),
        };
        self.journal
            .put_handler(record)
            .await
            .map_err(|e| format!("storage_error: {e}"))?;
        tracing::info!(name = %name, module = %sha_hex, key = %verified.key_id, "handler installed");
        Ok(())
    }
}

/// The module store's size bound: beyond it, the least recently stored modules that no
/// installed handler uses are removed (the platform sends them again if a task needs them).
const MODULE_STORE_BYTES: u64 = 256 << 20;

/// Removes the oldest `*.wasm` files of `dir` not named in `keep` until the total is at most
/// `limit` bytes. Returns how many were removed.
fn prune_store(
    dir: &std::path::Path,
    limit: u64,
    keep: &std::collections::HashSet<String>,
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf, bool)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".wasm") {
                return None;
            }
            let meta = e.metadata().ok()?;
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            Some((mtime, meta.len(), e.path(), keep.contains(&name)))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= limit {
        return 0;
    }
    files.sort_by_key(|f| f.0);
    let mut removed = 0;
    for (_, len, path, kept) in files {
        if total <= limit {
            break;
        }
        if kept {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            removed += 1;
            tracing::info!(module = %path.display(), "module store over its bound: removed the oldest unused module");
        }
    }
    removed
}

fn parse_sha(hex_text: &str) -> Option<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
}

fn decode_signature(signature: Option<&str>) -> Result<Option<Vec<u8>>, Box<RunResult>> {
    match signature.map(|s| base64::engine::general_purpose::STANDARD.decode(s)) {
        None => Ok(None),
        Some(Ok(bytes)) => Ok(Some(bytes)),
        Some(Err(e)) => Err(Box::new(rejected(
            "malformed_signature",
            format!("the detached signature is not base64: {e}"),
        ))),
    }
}

/// "reason: message" for a refused module.
fn describe(r: &RunResult) -> String {
    let reason = r.reason.clone().unwrap_or_else(|| r.status.to_string());
    format!("{reason}: {}", r.error.as_deref().unwrap_or("refused"))
}

/// Makes a result fit in one text frame: the platform refuses frames over
/// [`bridge_protocol::MAX_TEXT_BYTES`] or nested deeper than [`bridge_protocol::MAX_DEPTH`], and
/// a result it refuses is a result lost. First `output` goes (it repeats stdout, parsed), then
/// stdout and stderr are cut (marked truncated; their total byte counts stay exact).
pub fn fit_to_frame(result: &mut RunResult, id: &str, task_id: &str) -> usize {
    let size = |r: &RunResult| measure_result(r, id, task_id);
    let (len, depth) = size(result);
    if len <= bridge_protocol::MAX_TEXT_BYTES && depth <= bridge_protocol::MAX_DEPTH {
        return len;
    }
    if !result.output.is_null() {
        result.output = serde_json::Value::Null;
        let note = "the output was too large or too deep for one message; it is in `stdout`";
        result.error = Some(match result.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
    // Escaping can grow text up to 6×; halve the streams until the frame fits.
    while size(result).0 > bridge_protocol::MAX_TEXT_BYTES {
        for (text, flag) in [
            (&mut result.stdout, &mut result.truncated.stdout),
            (&mut result.stderr, &mut result.truncated.stderr),
        ] {
            if text.len() > 1024 {
                let mut cut = text.len() / 2;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                *flag = true;
            }
        }
        if result.stdout.len() <= 1024 && result.stderr.len() <= 1024 {
            // Only the error text can still be large; cut it too.
            if let Some(e) = result.error.as_mut() {
                let mut cut = e.len().min(4096);
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
            break;
        }
    }
    size(result).0
}

/// The length and nesting depth of the `result` message carrying `result`, as
/// `encode(&AgentMessage::Result { .. })` would write it, without copying the result or
/// keeping the text.
fn measure_result(result: &RunResult, id: &str, task_id: &str) -> (usize, usize) {
    /// `AgentMessage::Result`, borrowed: the same JSON.
    #[derive(serde::Serialize)]
    #[serde(tag = "type", rename = "result")]
    struct View<'a> {
        id: &'a str,
        task_id: &'a str,
        result: &'a RunResult,
    }
    let mut m = bridge_protocol::codec::Measure::default();
    serde_json::to_writer(
        &mut m,
        &View {
            id,
            task_id,
            result,
        },
    )
    .expect("results always serialize");
    (m.len(), m.max_depth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_results_are_cut_to_fit_one_frame() {
        let mut r = RunResult::refused(Status::Ok, "x");
        r.error = None;
        r.stdout = "\u{1}".repeat(900_000); // escapes to ~5.4 MB of JSON
        r.stderr = "é".repeat(400_000);
        r.output = serde_json::json!({"big": "y".repeat(600_000)});
        let _ = fit_to_frame(&mut r, "run-1", "task-1");
        let msg = AgentMessage::Result {
            id: "run-1".into(),
            task_id: "task-1".into(),
            result: r.clone(),
        };
        let text = bridge_protocol::codec::encode(&msg);
        assert!(
            text.len() <= bridge_protocol::MAX_TEXT_BYTES,
            "{}",
            text.len()
        );
        assert!(r.output.is_null());
        assert!(r.truncated.stdout && r.truncated.stderr);
        assert!(r.error.unwrap().contains("too large"));
    }

    #[test]
    fn the_module_store_drops_the_oldest_unused_modules_first() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, secs: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        write("a.wasm", 1); // oldest, but installed
        write("b.wasm", 2);
        write("c.wasm", 3);
        write("d.wasm", 4);
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 1000]).unwrap();
        let keep = ["a.wasm".to_string()].into_iter().collect();
        assert_eq!(prune_store(dir.path(), 250, &keep), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.wasm", "d.wasm", "notes.txt"]);
        assert_eq!(prune_store(dir.path(), 250, &keep), 0);
    }

    #[test]
    fn a_result_is_measured_as_its_message_encodes() {
        use bridge_protocol::codec::{encode, json_depth};
        let mut r = RunResult::refused(Status::Error, "quote \" backslash \\ ] } done");
        r.stdout = "line\n\u{1}[[{\"é\"".into();
        r.output = serde_json::json!({"a": [1, {"b": "]]]"}], "c": null});
        for (id, task_id) in [("run-1", "task-1"), ("\"odd\" [id]", "t\\")] {
            let text = encode(&AgentMessage::Result {
                id: id.into(),
                task_id: task_id.into(),
                result: r.clone(),
            });
            assert_eq!(
                measure_result(&r, id, task_id),
                (text.len(), json_depth(&text)),
                "{text}"
            );
        }
    }

    #[test]
    fn too_deep_output_is_dropped_and_small_results_are_untouched() {
        let mut deep = RunResult::refused(Status::Ok, "x");
        deep.error = None;
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        deep.output = serde_json::from_str(&nested).unwrap();
        let _ = fit_to_frame(&mut deep, "i", "t");
        assert!(deep.output.is_null());

        let mut small = RunResult::refused(Status::Ok, "x");
        small.output = serde_json::json!({"a": 1});
        let before = small.clone();
        let _ = fit_to_frame(&mut small, "i", "t");
        assert_eq!(small, before);
    }
}
