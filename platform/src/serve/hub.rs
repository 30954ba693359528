//! The server's shared, in-memory state: live connections, latest statuses, the module store
//! and the runs waiting for a result.
//!
//! Guarantees:
//!
//! * At most one live connection per agent id: registering a new one kicks the old one, and an
//!   ending connection never unregisters its successor.
//! * Every pending run ends exactly once: with the agent's `result`, with the agent's `error`
//!   naming the run, when its connection goes away, or when the waiter gives up (timeout).
//! * The module store maps SHA-256 (lowercase hex) to exact bytes; it only grows (this is a
//!   development server).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bridge_protocol::codec::encode;
use bridge_protocol::{LimitRequest, PlatformMessage, RunRequest, RunResult, StatusReport};
use ring::rand::{SecureRandom as _, SystemRandom};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Bytes;

use super::registry::{AgentRecord, Registry};

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
}

/// Why a run did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// No enrolled agent has this id.
    UnknownAgent(String),
    /// The agent is enrolled but not connected.
    NotConnected(String),
    /// The connection closed (or was replaced) before the result came.
    ConnectionLost(String),
    /// The agent answered the run with an `error` message.
    Refused(String),
    /// No result within the time given.
    Timeout(u64),
    /// The request itself was unusable.
    BadRequest(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::UnknownAgent(a) => write!(f, "unknown agent {a}"),
            RunError::NotConnected(a) => write!(f, "agent {a} is not connected"),
            RunError::ConnectionLost(why) => {
                write!(f, "the agent's connection was lost while waiting: {why}")
            }
            RunError::Refused(why) => write!(f, "the agent refused the run: {why}"),
            RunError::Timeout(ms) => write!(f, "timeout: no result within {ms} ms"),
            RunError::BadRequest(why) => write!(f, "bad request: {why}"),
        }
    }
}

impl std::error::Error for RunError {}

/// A run waiting for its result.
#[derive(Debug)]
struct Pending {
    agent_id: String,
    conn_id: u64,
    task_id: String,
    reply: oneshot::Sender<Result<RunResult, RunError>>,
}

/// What the control interface asks to run.
#[derive(Debug, Clone, Default)]
pub struct RunOrder {
    /// The agent id.
    pub agent: String,
    /// The module's bytes; `None` to run a module the platform already stores, by `module_sha256`.
    pub module: Option<Vec<u8>>,
    /// The SHA-256 (hex) of a stored module, when `module` is `None`.
    pub module_sha256: Option<String>,
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
    /// How long to wait for the result.
    pub timeout: Duration,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The task id used.
    pub task_id: String,
    /// The agent's result.
    pub result: RunResult,
    /// From handing the `run` frame to the connection to receiving the `result`.
    pub round_trip: Duration,
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
    /// Lifetime of enrollment tokens issued by this server (`None`: no expiry).
    pub token_ttl_secs: Option<u64>,
    conns: Mutex<HashMap<String, Conn>>,
    statuses: Mutex<HashMap<String, StatusReport>>,
    modules: Mutex<HashMap<String, Bytes>>,
    pending: Mutex<HashMap<String, Pending>>,
    error_waiters: Mutex<HashMap<String, Vec<oneshot::Sender<bridge_protocol::ErrorBody>>>>,
    next_conn: AtomicU64,
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

impl Hub {
    /// A hub over `registry`.
    pub fn new(registry: Registry, token_ttl_secs: Option<u64>) -> Hub {
        Hub {
            registry,
            token_ttl_secs,
            conns: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            error_waiters: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
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
        let old = lock(&self.conns).insert(
            agent_id.to_string(),
            Conn {
                conn_id,
                outbox: tx,
                kick: kick.clone(),
            },
        );
        if let Some(old) = old {
            tracing::info!(
                agent_id,
                old_conn = old.conn_id,
                conn = conn_id,
                "replacing the agent's previous connection"
            );
            old.kick.notify_one();
            self.fail_pending(old.conn_id, || {
                RunError::ConnectionLost("replaced by a newer connection".into())
            });
        }
        Registration {
            conn_id,
            outbox: rx,
            kicked: kick,
        }
    }

    /// Unregisters connection `conn_id` of `agent_id` (if it is still the current one) and fails
    /// its pending runs with `why`.
    pub fn unregister(&self, agent_id: &str, conn_id: u64, why: &str) {
        {
            let mut conns = lock(&self.conns);
            if conns.get(agent_id).is_some_and(|c| c.conn_id == conn_id) {
                conns.remove(agent_id);
            }
        }
        self.fail_pending(conn_id, || RunError::ConnectionLost(why.to_string()));
    }

    fn fail_pending(&self, conn_id: u64, error: impl Fn() -> RunError) {
        let failed: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, p)| p.conn_id == conn_id)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in failed {
            tracing::warn!(agent_id = %p.agent_id, task_id = %p.task_id, "run failed: {}", error());
            let _ = p.reply.send(Err(error()));
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

    /// Completes the run whose `run` message had id `id` (called for the agent's `result`).
    /// Returns false if no such run is waiting on this connection.
    pub fn complete(&self, conn_id: u64, id: &str, task_id: &str, result: RunResult) -> bool {
        let Some(p) = self.take_pending(conn_id, id) else {
            return false;
        };
        if p.task_id != task_id {
            tracing::warn!(agent_id = %p.agent_id, task_id = %p.task_id, reported = task_id, "the result names another task id");
        }
        tracing::info!(agent_id = %p.agent_id, task_id = %p.task_id, status = %result.status, "run finished");
        let _ = p.reply.send(Ok(result));
        true
    }

    /// Ends the run whose `run` message had id `id` with the agent's `error`. Returns false if
    /// no such run is waiting on this connection.
    pub fn refuse(&self, conn_id: u64, id: &str, why: String) -> bool {
        let Some(p) = self.take_pending(conn_id, id) else {
            return false;
        };
        tracing::warn!(agent_id = %p.agent_id, task_id = %p.task_id, "the agent refused the run: {why}");
        let _ = p.reply.send(Err(RunError::Refused(why)));
        true
    }

    fn take_pending(&self, conn_id: u64, id: &str) -> Option<Pending> {
        let mut pending = lock(&self.pending);
        match pending.get(id) {
            Some(p) if p.conn_id == conn_id => pending.remove(id),
            _ => None,
        }
    }

    /// Sends a run to the agent's live connection and waits for its result.
    pub async fn run(&self, order: RunOrder) -> Result<RunOutcome, RunError> {
        if let Some(module) = &order.module {
            if module.len() > bridge_protocol::MAX_BINARY_BYTES {
                return Err(RunError::BadRequest(format!(
                    "the module is {} bytes; the limit is {}",
                    module.len(),
                    bridge_protocol::MAX_BINARY_BYTES
                )));
            }
        }
        if !self.registry.is_enrolled(&order.agent) {
            return Err(RunError::UnknownAgent(order.agent));
        }
        let module_sha256 = match (order.module, order.module_sha256) {
            (Some(bytes), _) => self.store_module(bytes),
            (None, Some(sha)) if self.module(&sha).is_some() => sha,
            (None, Some(sha)) => {
                return Err(RunError::BadRequest(format!(
                    "no stored module {sha}: send its bytes in `module` once"
                )))
            }
            (None, None) => {
                return Err(RunError::BadRequest(
                    "give `module` (base64) or `module_sha256`".into(),
                ))
            }
        };
        let task_id = order.task_id.unwrap_or_else(random_uuid);
        let id = format!("run-{}", random_hex(8));
        let (outbox, conn_id) = {
            let conns = lock(&self.conns);
            let conn = conns
                .get(&order.agent)
                .ok_or_else(|| RunError::NotConnected(order.agent.clone()))?;
            (conn.outbox.clone(), conn.conn_id)
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(
            id.clone(),
            Pending {
                agent_id: order.agent.clone(),
                conn_id,
                task_id: task_id.clone(),
                reply: tx,
            },
        );
        let message = PlatformMessage::Run(RunRequest {
            id: id.clone(),
            task_id: task_id.clone(),
            module_sha256,
            signature: order.signature,
            input: order.input,
            args: order.args,
            limits: order.limits,
        });
        tracing::info!(agent_id = %order.agent, task_id = %task_id, run_id = %id, "sending run");
        let timeout_ms = u64::try_from(order.timeout.as_millis()).unwrap_or(u64::MAX);
        let sent = std::time::Instant::now();
        let outcome = tokio::time::timeout(order.timeout, async {
            if outbox.send(Outbound::Text(encode(&message))).await.is_err() {
                return Err(RunError::ConnectionLost("the connection closed".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(RunError::ConnectionLost("the server is stopping".into())))
        })
        .await
        .unwrap_or(Err(RunError::Timeout(timeout_ms)));
        let round_trip = sent.elapsed();
        lock(&self.pending).remove(&id);
        outcome.map(|result| RunOutcome {
            task_id,
            result,
            round_trip,
        })
    }

    /// Development and test aid: sends `text` as one raw text frame to the agent's live
    /// connection and waits up to `wait` for the next `error` the agent reports that does not
    /// end a run (its answer to a malformed or unknown message). `Ok(None)`: no error came.
    pub async fn send_raw(
        &self,
        agent: &str,
        text: String,
        wait: Duration,
    ) -> Result<Option<bridge_protocol::ErrorBody>, RunError> {
        let outbox = {
            let conns = lock(&self.conns);
            let conn = conns
                .get(agent)
                .ok_or_else(|| RunError::NotConnected(agent.to_string()))?;
            conn.outbox.clone()
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.error_waiters)
            .entry(agent.to_string())
            .or_default()
            .push(tx);
        if outbox.send(Outbound::Text(text)).await.is_err() {
            return Err(RunError::ConnectionLost("the connection closed".into()));
        }
        Ok(tokio::time::timeout(wait, rx)
            .await
            .ok()
            .and_then(Result::ok))
    }

    /// Hands an agent's `error` (one that ended no run) to whoever waits in [`Hub::send_raw`];
    /// returns whether anyone did.
    pub fn deliver_error(&self, agent: &str, body: &bridge_protocol::ErrorBody) -> bool {
        let waiters = lock(&self.error_waiters).remove(agent).unwrap_or_default();
        let mut delivered = false;
        for w in waiters {
            delivered |= w.send(body.clone()).is_ok();
        }
        delivered
    }

    /// Fails every pending run (at shutdown).
    pub fn fail_all(&self, why: &str) {
        let all: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        for p in all {
            let _ = p.reply.send(Err(RunError::ConnectionLost(why.to_string())));
        }
    }

    /// Records activity from `agent_id` (in memory).
    pub fn seen(&self, agent_id: &str) {
        self.registry.touch(agent_id, false);
    }
}
