//! The server's shared, in-memory state: live connections, latest statuses, the module store,
//! the stored results and everyone waiting for something from an agent.
//!
//! Guarantees:
//!
//! * At most one live connection per agent id: registering a new one kicks the old one, and an
//!   ending connection never unregisters its successor.
//! * Tasks are keyed by task id, not by connection. A `run` waits for its task's result across
//!   reconnections of the agent: losing the connection does not end it; its result, its
//!   `error`, its wait timeout or the server's shutdown does.
//! * A `run` the agent has not acknowledged yet (neither `accepted` nor `result`) is sent again,
//!   unchanged, on the agent's next connection (the agent runs a task id at most once, so this
//!   is safe). Such runs are kept in memory only: a platform restart forgets them.
//! * Every result the agent delivers is stored ([`ResultStore`], first wins) before it is
//!   acknowledged, and whoever waits for that task id gets the stored result. Task ids are
//!   global: a result for a task id whose result another agent delivered is acknowledged but
//!   neither stored nor counted.
//! * A refusal the agent does not record ([`is_unrecorded_refusal`]: `busy`, `storage_full`…;
//!   nothing ran) ends the run it answers, is acknowledged, and is not stored: the same task id
//!   may be sent again, and its real result is stored then.
//! * A `run` naming a task id whose result is stored (from the same agent) is answered with the
//!   stored result at once, without sending anything to the agent: a retried run never
//!   executes twice, even after the agent forgot the task id. One whose result came from
//!   another agent is refused.
//! * Streaming waiters get a task's chunks through a bounded queue: a waiter that does not keep
//!   up loses chunks (the next chunk it gets counts their bytes in `dropped_bytes`), the
//!   connection's reader never waits for it.
//! * Other requests to an agent (`cancel`, the handler commands) belong to the connection they
//!   were sent on: they end with the agent's reply (matched by message id), its `error`, the
//!   connection's end, or their timeout.
//! * The module store maps SHA-256 (lowercase hex) to exact bytes; it only grows (this is a
//!   development server).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bridge_protocol::codec::encode;
use bridge_protocol::{
    CancelOutcome, ErrorBody, HandlerInfo, LimitRequest, PlatformMessage, RunRequest, RunResult,
    StatusReport, StreamName, TaskState,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Bytes;

use super::registry::{AgentRecord, Registry};
use super::results::{is_unrecorded_refusal, Recorded, ResultStore, StoredResult};

/// How many outgoing messages may queue for one connection.
const OUTBOX: usize = 64;

/// A message for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// One text frame (an encoded [`PlatformMessage`]).
    Text(String),
}

/// The hub's handle on one live connection.
#[derive(Debug)]
struct Conn {
    conn_id: u64,
    outbox: mpsc::Sender<Outbound>,
    kick: Arc<Notify>,
}

/// What a session holds for its own registration.
#[derive(Debug)]
pub struct Registration {
    /// Unique per connection.
    pub conn_id: u64,
    /// Messages to send on the connection.
    pub outbox: mpsc::Receiver<Outbound>,
    /// Notified when a newer connection of the same agent replaces this one.
    pub kicked: Arc<Notify>,
    /// The `run` messages the agent has not acknowledged (sent on an earlier connection, or
    /// while it was away), in dispatch order: to send right after `welcome`, before anything
    /// from `outbox`.
    pub resend: Vec<String>,
}

/// Why a request to an agent produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// No enrolled agent has this id.
    UnknownAgent(String),
    /// The agent is enrolled but not connected.
    NotConnected(String),
    /// The connection closed (or was replaced) before the reply came (requests other than
    /// `run`, which wait across reconnections).
    ConnectionLost(String),
    /// The agent answered with an `error` message (`code: message`).
    Refused(String),
    /// No result within the time given (milliseconds).
    Timeout(u64),
    /// No reply within the time given (milliseconds).
    NoReply(u64),
    /// No stored result for this task id (within the time given, in milliseconds).
    NoResult(String, u64),
    /// The task id (first field) already has a result, from another agent (second field).
    TaskIdTaken(String, String),
    /// The request itself was unusable.
    BadRequest(String),
    /// The agent answered with a reply of another kind than the request calls for.
    Unexpected(String),
    /// The server is stopping.
    ShuttingDown,
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubError::UnknownAgent(a) => write!(f, "unknown agent {a}"),
            HubError::NotConnected(a) => write!(f, "agent {a} is not connected"),
            HubError::ConnectionLost(why) => {
                write!(f, "the agent's connection was lost while waiting: {why}")
            }
            HubError::Refused(why) => write!(f, "the agent refused: {why}"),
            HubError::Timeout(ms) => write!(f, "timeout: no result within {ms} ms"),
            HubError::NoReply(ms) => write!(f, "timeout: no reply within {ms} ms"),
            HubError::NoResult(task, 0) => write!(f, "no result for task {task}"),
            HubError::NoResult(task, ms) => {
                write!(f, "no result for task {task} (waited {ms} ms)")
            }
            HubError::TaskIdTaken(task, agent) => write!(
                f,
                "task id {task} already has a result, from agent {agent}: task ids are global on \
                 this platform, use another one"
            ),
            HubError::BadRequest(why) => write!(f, "bad request: {why}"),
            HubError::Unexpected(reply) => write!(f, "the agent answered unexpectedly: {reply}"),
            HubError::ShuttingDown => f.write_str("the platform is shutting down"),
        }
    }
}

impl std::error::Error for HubError {}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where one streaming waiter (by its key) receives a task's chunks.
#[derive(Debug)]
struct ChunkSink {
    key: u64,
    tx: mpsc::Sender<ChunkEvent>,
    /// Bytes of the chunks dropped (the queue was full) since the last one delivered, added to
    /// the next one's `dropped_bytes`.
    dropped_bytes: u64,
    /// Chunks dropped in all.
    dropped_chunks: u64,
}

/// Someone waiting in [`Hub::send_raw`] (by its key) for an agent's error.
type ErrorWaiter = (u64, oneshot::Sender<ErrorBody>);

/// What ends a task's waiter, when it is not an error.
#[derive(Debug)]
enum Delivery {
    /// The task's stored result.
    Stored(StoredResult),
    /// A refusal the agent did not record (nothing ran), answering the waiter's own `run`.
    Refused(RunResult),
}

/// What a task's waiter receives.
type TaskReply = Result<Delivery, HubError>;

/// Someone waiting for a task's result.
#[derive(Debug)]
struct TaskWaiter {
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
    fn waits_for(&self, agent: &str) -> bool {
        self.agent.as_deref().is_none_or(|a| a == agent)
    }
}

/// A `run` sent to an agent and not finished with.
#[derive(Debug)]
struct Dispatched {
    /// Dispatch order, to resend in the same order.
    seq: u64,
    agent_id: String,
    task_id: String,
    /// The encoded `run` message, resent as is.
    text: String,
    /// The agent sent `accepted` for the task: no resend needed.
    accepted: bool,
    /// The control request that dispatched it still waits (for error correlation).
    waiting: bool,
}

/// A reply to a request other than `run`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer to `cancel`.
    Cancel {
        /// The task id.
        task_id: String,
        /// What the agent found.
        outcome: CancelOutcome,
    },
    /// The installed handlers (the answer to the handler commands).
    Handlers(Vec<HandlerInfo>),
}

/// A request other than `run` waiting for the agent's reply.
#[derive(Debug)]
struct PendingRequest {
    agent_id: String,
    conn_id: u64,
    reply: oneshot::Sender<Result<Reply, HubError>>,
}

/// One `chunk` of a task's output, as forwarded to whoever streams the task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkEvent {
    /// The task id.
    pub task_id: String,
    /// 0, 1, 2… per task, across both streams.
    pub seq: u64,
    /// stdout or stderr.
    pub stream: StreamName,
    /// The text.
    pub data: String,
    /// Bytes the agent did not stream since the previous chunk.
    pub dropped_bytes: u64,
}

/// What the control interface asks to run.
#[derive(Debug, Clone, Default)]
pub struct RunOrder {
    /// The agent id.
    pub agent: String,
    /// The module's bytes; `None` to run a module the platform already stores, by
    /// `module_sha256`, or a `command`.
    pub module: Option<Vec<u8>>,
    /// The SHA-256 (hex) of a stored module.
    pub module_sha256: Option<String>,
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

/// One agent as listed by the control interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentView {
    /// The agent id.
    pub id: String,
    /// Whether it has a live connection.
    pub connected: bool,
    /// When it enrolled.
    pub enrolled_at: String,
    /// When it was last heard from.
    pub last_seen: String,
    /// Its latest status report since this server started, if any.
    pub status: Option<StatusReport>,
}

/// The shared state; see the module documentation.
#[derive(Debug)]
pub struct Hub {
    /// Enrolled agents and tokens.
    pub registry: Registry,
    /// Results by task id.
    pub results: ResultStore,
    /// Lifetime of enrollment tokens issued by this server (`None`: no expiry).
    pub token_ttl_secs: Option<u64>,
    conns: Mutex<HashMap<String, Conn>>,
    statuses: Mutex<HashMap<String, StatusReport>>,
    modules: Mutex<HashMap<String, Bytes>>,
    /// By task id.
    waiters: Mutex<HashMap<String, Vec<TaskWaiter>>>,
    /// By `run` message id.
    dispatched: Mutex<HashMap<String, Dispatched>>,
    /// By task id: who streams its output.
    streams: Mutex<HashMap<String, Vec<ChunkSink>>>,
    /// By message id.
    requests: Mutex<HashMap<String, PendingRequest>>,
    /// By agent id, keyed: who waits in [`Hub::send_raw`].
    error_waiters: Mutex<HashMap<String, Vec<ErrorWaiter>>>,
    next_conn: AtomicU64,
    next_key: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    hex::encode(bytes)
}

/// A random UUID (version 4 layout).
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system random generator works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Removes a key from a multimap entry, dropping the entry when it is empty.
fn remove_keyed<T>(map: &mut HashMap<String, Vec<T>>, id: &str, keep: impl FnMut(&T) -> bool) {
    if let Some(list) = map.get_mut(id) {
        list.retain(keep);
        if list.is_empty() {
            map.remove(id);
        }
    }
}

impl Hub {
    /// A hub over `registry` and `results`.
    pub fn new(registry: Registry, results: ResultStore, token_ttl_secs: Option<u64>) -> Hub {
        Hub {
            registry,
            results,
            token_ttl_secs,
            conns: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            dispatched: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            error_waiters: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            next_key: AtomicU64::new(1),
        }
    }

    fn key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Issues an enrollment token with the server's lifetime.
    pub fn issue_token(&self) -> anyhow::Result<String> {
        self.registry.issue_token(self.token_ttl_secs)
    }

    /// Registers a live connection for `agent_id`, kicking any previous one.
    pub fn register(&self, agent_id: &str) -> Registration {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(OUTBOX);
        let kick = Arc::new(Notify::new());
        let (old, resend) = {
            // Under the connections lock, which `run` also holds from choosing a connection to
            // recording its dispatch: a run is either in this snapshot (and goes out right
            // after `welcome`) or sent on this connection's outbox, never both.
            let mut conns = lock(&self.conns);
            let old = conns.insert(
                agent_id.to_string(),
                Conn {
                    conn_id,
                    outbox: tx,
                    kick: kick.clone(),
                },
            );
            (old, self.unacknowledged_runs(agent_id))
        };
        if let Some(old) = old {
            tracing::info!(
                agent_id,
                old_conn = old.conn_id,
                conn = conn_id,
                "replacing the agent's previous connection"
            );
            old.kick.notify_one();
            self.fail_requests(old.conn_id, "replaced by a newer connection");
        }
        Registration {
            conn_id,
            outbox: rx,
            kicked: kick,
            resend,
        }
    }

    /// Unregisters connection `conn_id` of `agent_id` (if it is still the current one) and fails
    /// the requests (not the runs) waiting on it with `why`.
    pub fn unregister(&self, agent_id: &str, conn_id: u64, why: &str) {
        {
            let mut conns = lock(&self.conns);
            if conns.get(agent_id).is_some_and(|c| c.conn_id == conn_id) {
                conns.remove(agent_id);
            }
        }
        self.fail_requests(conn_id, why);
    }

    fn fail_requests(&self, conn_id: u64, why: &str) {
        let failed: Vec<(String, PendingRequest)> = {
            let mut requests = lock(&self.requests);
            let ids: Vec<String> = requests
                .iter()
                .filter(|(_, r)| r.conn_id == conn_id)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| requests.remove(&id).map(|r| (id, r)))
                .collect()
        };
        for (id, r) in failed {
            tracing::warn!(agent_id = %r.agent_id, request = %id, "request failed: the connection ended: {why}");
            let _ = r.reply.send(Err(HubError::ConnectionLost(why.to_string())));
        }
    }

    /// Whether `agent_id` has a live connection.
    pub fn is_connected(&self, agent_id: &str) -> bool {
        lock(&self.conns).contains_key(agent_id)
    }

    /// Stores the agent's latest status.
    pub fn set_status(&self, agent_id: &str, status: StatusReport) {
        lock(&self.statuses).insert(agent_id.to_string(), status);
    }

    /// Stores module bytes; returns their SHA-256 (hex).
    pub fn store_module(&self, bytes: Vec<u8>) -> String {
        let sha = hex::encode(Sha256::digest(&bytes));
        lock(&self.modules)
            .entry(sha.clone())
            .or_insert_with(|| Bytes::from(bytes));
        sha
    }

    /// The bytes of the module with SHA-256 `sha256` (hex, any case).
    pub fn module(&self, sha256: &str) -> Option<Bytes> {
        lock(&self.modules)
            .get(&sha256.to_ascii_lowercase())
            .cloned()
    }

    /// Every enrolled agent with its connection state and latest status.
    pub fn agents(&self) -> Vec<AgentView> {
        let records: Vec<AgentRecord> = self.registry.agents();
        let conns = lock(&self.conns);
        let statuses = lock(&self.statuses);
        records
            .into_iter()
            .map(|r| AgentView {
                connected: conns.contains_key(&r.id),
                status: statuses.get(&r.id).cloned(),
                id: r.id,
                enrolled_at: r.enrolled_at,
                last_seen: r.last_seen,
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // What the agent sends (called by the session)

    /// Removes and returns the waiters of `task_id` that `pick` selects.
    fn take_waiters(&self, task_id: &str, pick: impl Fn(&TaskWaiter) -> bool) -> Vec<TaskWaiter> {
        let mut waiters = lock(&self.waiters);
        let Some(list) = waiters.get_mut(task_id) else {
            return Vec::new();
        };
        let (taken, kept): (Vec<_>, Vec<_>) = list.drain(..).partition(|w| pick(w));
        *list = kept;
        if list.is_empty() {
            waiters.remove(task_id);
        }
        taken
    }

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
        {
            // The agent has the task: its runs of this task id need no resending.
            let mut dispatched = lock(&self.dispatched);
            if let Some(d) = dispatched.get(id) {
                if d.task_id != task_id {
                    tracing::warn!(agent_id, run_id = id, task_id = %d.task_id, reported = task_id, "the result names another task id than its run");
                }
            }
            dispatched.retain(|_, d| !(d.agent_id == agent_id && d.task_id == task_id));
        }
        let stored = match &recorded {
            Recorded::Foreign(stored) => {
                tracing::warn!(
                    agent_id,
                    task_id,
                    stored_from = %stored.agent,
                    %status,
                    "a result for a task id whose result another agent delivered: acknowledged, not stored (task ids are global; the first is kept)"
                );
                let ended = self.take_waiters(task_id, |w| w.agent.as_deref() == Some(agent_id));
                for w in ended {
                    let _ = w.reply.send(Err(HubError::TaskIdTaken(
                        task_id.to_string(),
                        stored.agent.clone(),
                    )));
                }
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
        let waiters = self.take_waiters(task_id, |w| w.waits_for(agent_id));
        if !waiters.is_empty() {
            tracing::debug!(
                agent_id,
                task_id,
                waiters = waiters.len(),
                "result handed over"
            );
        }
        for w in waiters {
            let _ = w.reply.send(Ok(Delivery::Stored(stored.clone())));
        }
        recorded.durable()
    }

    /// A refusal the agent did not record (nothing ran): ends the run `id` (no resending) and
    /// hands the refusal to whoever waits for that run; the task id stays free.
    fn on_refusal(&self, agent_id: &str, id: &str, task_id: &str, result: RunResult) {
        let run = {
            let mut dispatched = lock(&self.dispatched);
            match dispatched.get(id) {
                Some(d) if d.agent_id == agent_id => dispatched.remove(id),
                _ => None,
            }
        };
        if let Some(run) = &run {
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
        let waiters = self.take_waiters(task_id, |w| w.run_id.as_deref() == Some(id));
        for w in waiters {
            let reply = match &stored {
                Some(s) => Delivery::Stored(s.clone()),
                None => Delivery::Refused(result.clone()),
            };
            let _ = w.reply.send(Ok(reply));
        }
    }

    /// Notes the agent's `accepted`: the task is recorded on the agent, so its `run` needs no
    /// resending. With `finished` and a result from this agent stored here, the waiters get that
    /// result (the agent may have dropped it from its outbox after our `ack`).
    pub fn on_accepted(&self, agent_id: &str, id: &str, task_id: &str, state: TaskState) {
        tracing::info!(agent_id, run_id = id, task_id, state = ?state, "task accepted");
        lock(&self.dispatched).retain(|_, d| {
            if d.agent_id == agent_id && d.task_id == task_id {
                d.accepted = true;
                d.waiting
            } else {
                true
            }
        });
        if state == TaskState::Finished {
            if let Some(stored) = self.results.get(task_id).filter(|s| s.agent == agent_id) {
                for w in self.take_waiters(task_id, |w| w.waits_for(agent_id)) {
                    let _ = w.reply.send(Ok(Delivery::Stored(stored.clone())));
                }
            }
        }
    }

    /// Forwards a `chunk` to whoever streams its task, never waiting: a streaming waiter whose
    /// queue is full loses the chunk (its bytes are added to the `dropped_bytes` of the next
    /// chunk it gets). Returns how many stream the task.
    pub fn on_chunk(&self, chunk: ChunkEvent) -> usize {
        let mut streams = lock(&self.streams);
        let Some(list) = streams.get_mut(&chunk.task_id) else {
            return 0;
        };
        list.retain_mut(|sink| {
            let mut event = chunk.clone();
            event.dropped_bytes = event.dropped_bytes.saturating_add(sink.dropped_bytes);
            match sink.tx.try_send(event) {
                Ok(()) => {
                    sink.dropped_bytes = 0;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if sink.dropped_chunks == 0 {
                        tracing::warn!(task_id = %chunk.task_id, "a streaming client does not keep up: dropping chunks");
                    }
                    sink.dropped_chunks += 1;
                    sink.dropped_bytes = sink
                        .dropped_bytes
                        .saturating_add(chunk.data.len() as u64)
                        .saturating_add(chunk.dropped_bytes);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let n = list.len();
        if n == 0 {
            streams.remove(&chunk.task_id);
        }
        n
    }

    /// Removes the streaming waiter `key` of `task_id`.
    fn remove_stream(&self, task_id: &str, key: u64) {
        let mut streams = lock(&self.streams);
        if let Some(list) = streams.get(task_id) {
            for sink in list.iter().filter(|s| s.key == key && s.dropped_chunks > 0) {
                tracing::warn!(
                    task_id,
                    chunks = sink.dropped_chunks,
                    "chunks dropped for a streaming client that did not keep up"
                );
            }
        }
        remove_keyed(&mut streams, task_id, |s| s.key != key);
    }

    /// Hands a reply (`cancel_reply`, `handlers`) to the request with message id `id` sent to
    /// `agent_id`; returns false if no such request waits.
    pub fn on_reply(&self, agent_id: &str, id: &str, reply: Reply) -> bool {
        let Some(r) = self.take_request(agent_id, id) else {
            return false;
        };
        let _ = r.reply.send(Ok(reply));
        true
    }

    fn take_request(&self, agent_id: &str, id: &str) -> Option<PendingRequest> {
        let mut requests = lock(&self.requests);
        match requests.get(id) {
            Some(r) if r.agent_id == agent_id => requests.remove(id),
            _ => None,
        }
    }

    /// Ends the run or request whose message had id `id` with the agent's `error`. Returns
    /// false if `id` names nothing sent to this agent.
    pub fn on_error(&self, agent_id: &str, id: &str, why: String) -> bool {
        if let Some(r) = self.take_request(agent_id, id) {
            tracing::warn!(
                agent_id,
                request = id,
                "the agent refused the request: {why}"
            );
            let _ = r.reply.send(Err(HubError::Refused(why)));
            return true;
        }
        let run = {
            let mut dispatched = lock(&self.dispatched);
            match dispatched.get(id) {
                Some(d) if d.agent_id == agent_id => dispatched.remove(id),
                _ => None,
            }
        };
        let Some(run) = run else {
            return false;
        };
        tracing::warn!(agent_id, run_id = id, task_id = %run.task_id, "the agent refused the run: {why}");
        let ended: Vec<TaskWaiter> = {
            let mut waiters = lock(&self.waiters);
            let mut ended = Vec::new();
            if let Some(list) = waiters.get_mut(&run.task_id) {
                let (mine, others): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|w| w.run_id.as_deref() == Some(id));
                *list = others;
                ended = mine;
                if list.is_empty() {
                    waiters.remove(&run.task_id);
                }
            }
            ended
        };
        for w in ended {
            let _ = w.reply.send(Err(HubError::Refused(why.clone())));
        }
        true
    }

    /// The `run` messages sent to `agent_id` that it has not acknowledged (neither `accepted`
    /// nor `result`), in the order they were first sent.
    fn unacknowledged_runs(&self, agent_id: &str) -> Vec<String> {
        let dispatched = lock(&self.dispatched);
        let mut runs: Vec<&Dispatched> = dispatched
            .values()
            .filter(|d| d.agent_id == agent_id && !d.accepted)
            .collect();
        runs.sort_by_key(|d| d.seq);
        runs.into_iter().map(|d| d.text.clone()).collect()
    }

    // -----------------------------------------------------------------------------------------
    // What the control interface asks

    fn outbox_of(&self, agent: &str) -> Result<(mpsc::Sender<Outbound>, u64), HubError> {
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()));
        }
        let conns = lock(&self.conns);
        let conn = conns
            .get(agent)
            .ok_or_else(|| HubError::NotConnected(agent.to_string()))?;
        Ok((conn.outbox.clone(), conn.conn_id))
    }

    /// Stores `module` if given, else checks that `module_sha256` names a stored module; returns
    /// the module's SHA-256.
    fn resolve_module(
        &self,
        module: Option<Vec<u8>>,
        module_sha256: Option<String>,
    ) -> Result<String, HubError> {
        match (module, module_sha256) {
            (Some(bytes), _) if bytes.len() > bridge_protocol::MAX_BINARY_BYTES => {
                Err(HubError::BadRequest(format!(
                    "the module is {} bytes; the limit is {}",
                    bytes.len(),
                    bridge_protocol::MAX_BINARY_BYTES
                )))
            }
            (Some(bytes), _) => Ok(self.store_module(bytes)),
            (None, Some(sha)) if self.module(&sha).is_some() => Ok(sha.to_ascii_lowercase()),
            (None, Some(sha)) => Err(HubError::BadRequest(format!(
                "no stored module {sha}: send its bytes in `module` once"
            ))),
            (None, None) => Err(HubError::BadRequest(
                "give `module` (base64) or `module_sha256`".into(),
            )),
        }
    }

    fn add_waiter(
        &self,
        task_id: &str,
        key: u64,
        run: Option<(String, String)>,
    ) -> oneshot::Receiver<TaskReply> {
        let (tx, rx) = oneshot::channel();
        let (run_id, agent) = run.unzip();
        lock(&self.waiters)
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

    fn remove_waiter(&self, task_id: &str, key: u64) {
        remove_keyed(&mut lock(&self.waiters), task_id, |w| w.key != key);
    }

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
        let (command, module_sha256) = match order.command {
            Some(_) if order.module.is_some() || order.module_sha256.is_some() => {
                return Err(HubError::BadRequest(
                    "give one of `module`, `module_sha256` and `command`".into(),
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
                Some(self.resolve_module(order.module, order.module_sha256)?),
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
            module_sha256,
            signature: order.signature,
            input: order.input,
            args: order.args,
            limits: order.limits,
            not_after: order.not_after,
            idempotent: order.idempotent,
            stream: order.stream,
        });
        let text = encode(&message);
        let key = self.key();
        let rx = self.add_waiter(&task_id, key, Some((id.clone(), order.agent.clone())));
        // A result stored between the first look and the waiter's registration: answer with it
        // rather than dispatch (a result stored after this look reaches the waiter).
        let answer = self.answer_stored(&order.agent, &task_id);
        if !matches!(answer, Ok(None)) {
            self.remove_waiter(&task_id, key);
        }
        match answer {
            Ok(None) => {}
            Ok(Some(outcome)) => return Ok(outcome),
            Err(e) => return Err(e),
        }
        if let Some(tx) = chunks {
            lock(&self.streams)
                .entry(task_id.clone())
                .or_default()
                .push(ChunkSink {
                    key,
                    tx,
                    dropped_bytes: 0,
                    dropped_chunks: 0,
                });
        }
        let outbox = {
            // See `register`: choosing the connection and recording the dispatch are one step.
            let conns = lock(&self.conns);
            match conns.get(&order.agent) {
                Some(conn) => {
                    lock(&self.dispatched).insert(
                        id.clone(),
                        Dispatched {
                            seq: key,
                            agent_id: order.agent.clone(),
                            task_id: task_id.clone(),
                            text: text.clone(),
                            accepted: false,
                            waiting: true,
                        },
                    );
                    Ok(conn.outbox.clone())
                }
                None => Err(HubError::NotConnected(order.agent.clone())),
            }
        };
        let outbox = match outbox {
            Ok(o) => o,
            Err(e) => {
                self.remove_waiter(&task_id, key);
                self.remove_stream(&task_id, key);
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
        self.remove_waiter(&task_id, key);
        self.remove_stream(&task_id, key);
        {
            // An accepted run needs no resend; once nobody waits for it, forget it.
            let mut dispatched = lock(&self.dispatched);
            if let Some(d) = dispatched.get_mut(&id) {
                d.waiting = false;
                if d.accepted {
                    dispatched.remove(&id);
                }
            }
        }
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
        let key = self.key();
        let rx = self.add_waiter(task_id, key, None);
        // A result stored between the first look and the waiter's registration.
        if let Some(stored) = self.results.get(task_id) {
            self.remove_waiter(task_id, key);
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
        self.remove_waiter(task_id, key);
        outcome
    }

    /// Sends the message `make(id)` (with a fresh message id starting with `prefix`) to the
    /// agent's live connection and waits up to `wait` for the reply carrying that id.
    async fn request(
        &self,
        agent: &str,
        prefix: &str,
        make: impl FnOnce(String) -> PlatformMessage,
        wait: Duration,
    ) -> Result<Reply, HubError> {
        let (outbox, conn_id) = self.outbox_of(agent)?;
        let id = format!("{prefix}-{}", random_hex(8));
        let (tx, rx) = oneshot::channel();
        lock(&self.requests).insert(
            id.clone(),
            PendingRequest {
                agent_id: agent.to_string(),
                conn_id,
                reply: tx,
            },
        );
        let text = encode(&make(id.clone()));
        tracing::info!(agent_id = agent, request = %id, "sending request");
        let outcome = tokio::time::timeout(wait, async {
            if outbox.send(Outbound::Text(text)).await.is_err() {
                return Err(HubError::ConnectionLost("the connection closed".into()));
            }
            rx.await.unwrap_or(Err(HubError::ShuttingDown))
        })
        .await
        .unwrap_or(Err(HubError::NoReply(millis(wait))));
        lock(&self.requests).remove(&id);
        outcome
    }

    fn expect_handlers(reply: Reply) -> Result<Vec<HandlerInfo>, HubError> {
        match reply {
            Reply::Handlers(h) => Ok(h),
            other => Err(HubError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Installs (or replaces) handler `name` on the agent: the module is `module`'s bytes (stored
    /// here to answer the agent's `need_module`) or a module stored before, by `module_sha256`.
    /// Returns the agent's handler list after the change.
    pub async fn install_handler(
        &self,
        agent: &str,
        name: String,
        module: Option<Vec<u8>>,
        module_sha256: Option<String>,
        signature: Option<String>,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        if name.is_empty() {
            return Err(HubError::BadRequest("`name` is empty".into()));
        }
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()));
        }
        let module_sha256 = self.resolve_module(module, module_sha256)?;
        let make = |id| PlatformMessage::InstallHandler {
            id,
            name,
            module_sha256,
            signature,
        };
        Self::expect_handlers(self.request(agent, "install", make, wait).await?)
    }

    /// Removes handler `name` from the agent; returns the list after the change.
    pub async fn remove_handler(
        &self,
        agent: &str,
        name: String,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        let make = |id| PlatformMessage::RemoveHandler { id, name };
        Self::expect_handlers(self.request(agent, "remove", make, wait).await?)
    }

    /// The agent's installed handlers.
    pub async fn handlers(
        &self,
        agent: &str,
        wait: Duration,
    ) -> Result<Vec<HandlerInfo>, HubError> {
        let make = |id| PlatformMessage::ListHandlers { id };
        Self::expect_handlers(self.request(agent, "handlers", make, wait).await?)
    }

    /// Asks the agent to cancel `task_id`; returns what it found.
    pub async fn cancel(
        &self,
        agent: &str,
        task_id: String,
        wait: Duration,
    ) -> Result<CancelOutcome, HubError> {
        let make = |id| PlatformMessage::Cancel { id, task_id };
        match self.request(agent, "cancel", make, wait).await? {
            Reply::Cancel { outcome, .. } => Ok(outcome),
            other => Err(HubError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Development and test aid: sends `text` as one raw text frame to the agent's live
    /// connection and waits up to `wait` for the next `error` the agent reports that does not
    /// end a run or request (its answer to a malformed or unknown message). `Ok(None)`: no
    /// error came.
    pub async fn send_raw(
        &self,
        agent: &str,
        text: String,
        wait: Duration,
    ) -> Result<Option<ErrorBody>, HubError> {
        let outbox = {
            let conns = lock(&self.conns);
            let conn = conns
                .get(agent)
                .ok_or_else(|| HubError::NotConnected(agent.to_string()))?;
            conn.outbox.clone()
        };
        let (tx, rx) = oneshot::channel();
        let key = self.key();
        lock(&self.error_waiters)
            .entry(agent.to_string())
            .or_default()
            .push((key, tx));
        let outcome = if outbox.send(Outbound::Text(text)).await.is_err() {
            Err(HubError::ConnectionLost("the connection closed".into()))
        } else {
            Ok(tokio::time::timeout(wait, rx)
                .await
                .ok()
                .and_then(Result::ok))
        };
        // No error came (or the frame was not sent): stop waiting for one.
        remove_keyed(&mut lock(&self.error_waiters), agent, |(k, _)| *k != key);
        outcome
    }

    /// Hands an agent's `error` (one that ended no run) to whoever waits in [`Hub::send_raw`];
    /// returns whether anyone did.
    pub fn deliver_error(&self, agent: &str, body: &ErrorBody) -> bool {
        let waiters = lock(&self.error_waiters).remove(agent).unwrap_or_default();
        let mut delivered = false;
        for (_, w) in waiters {
            delivered |= w.send(body.clone()).is_ok();
        }
        delivered
    }

    /// Ends everything still waiting (at shutdown).
    pub fn fail_all(&self) {
        let waiters: Vec<TaskWaiter> = lock(&self.waiters)
            .drain()
            .flat_map(|(_, list)| list)
            .collect();
        for w in waiters {
            let _ = w.reply.send(Err(HubError::ShuttingDown));
        }
        let requests: Vec<PendingRequest> = lock(&self.requests).drain().map(|(_, r)| r).collect();
        for r in requests {
            let _ = r.reply.send(Err(HubError::ShuttingDown));
        }
    }

    /// Records activity from `agent_id` (in memory).
    pub fn seen(&self, agent_id: &str) {
        self.registry.touch(agent_id, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(dir: &std::path::Path) -> Hub {
        Hub::new(
            Registry::open(dir).unwrap(),
            ResultStore::open(dir).unwrap(),
            None,
        )
    }

    fn chunk(seq: u64, data: &str) -> ChunkEvent {
        ChunkEvent {
            task_id: "t".into(),
            seq,
            stream: StreamName::Stdout,
            data: data.into(),
            dropped_bytes: 0,
        }
    }

    #[test]
    fn a_slow_streaming_client_loses_chunks_with_a_count_and_never_blocks_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::channel(2);
        lock(&hub.streams)
            .entry("t".into())
            .or_default()
            .push(ChunkSink {
                key: 1,
                tx,
                dropped_bytes: 0,
                dropped_chunks: 0,
            });
        for seq in 0..5 {
            assert_eq!(hub.on_chunk(chunk(seq, "abcd")), 1);
        }
        assert_eq!(rx.try_recv().unwrap().seq, 0);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        assert!(rx.try_recv().is_err());
        // The next chunk delivered counts the bytes of the three dropped.
        let mut next = chunk(5, "ef");
        next.dropped_bytes = 10;
        hub.on_chunk(next);
        let got = rx.try_recv().unwrap();
        assert_eq!((got.seq, got.dropped_bytes), (5, 10 + 3 * 4));
        hub.on_chunk(chunk(6, "g"));
        assert_eq!(rx.try_recv().unwrap().dropped_bytes, 0);
        hub.remove_stream("t", 1);
        assert!(lock(&hub.streams).is_empty());
        // A client gone: its sink goes.
        let (tx, rx) = mpsc::channel(2);
        lock(&hub.streams)
            .entry("t".into())
            .or_default()
            .push(ChunkSink {
                key: 2,
                tx,
                dropped_bytes: 0,
                dropped_chunks: 0,
            });
        drop(rx);
        assert_eq!(hub.on_chunk(chunk(0, "x")), 0);
        assert!(lock(&hub.streams).is_empty());
    }

    #[tokio::test]
    async fn send_raw_forgets_its_waiter_when_no_error_comes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let mut reg = hub.register("agent-a");
        for _ in 0..3 {
            let reply = hub
                .send_raw("agent-a", "{}".into(), Duration::from_millis(10))
                .await
                .unwrap();
            assert!(reply.is_none());
            assert!(reg.outbox.try_recv().is_ok());
        }
        assert!(lock(&hub.error_waiters).is_empty());
        // An error that comes is handed over.
        let body = ErrorBody {
            id: None,
            code: bridge_protocol::ErrorCode::Malformed,
            message: "no".into(),
        };
        let (reply, delivered) = tokio::join!(
            hub.send_raw("agent-a", "{".into(), Duration::from_secs(5)),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                hub.deliver_error("agent-a", &body)
            }
        );
        assert!(delivered);
        assert_eq!(reply.unwrap(), Some(body));
        assert!(lock(&hub.error_waiters).is_empty());
    }
}
