//! Agents connected now: at most one live connection per agent id (its outbox and the signal
//! that replaces it), and the latest status each agent reported since the server started (the
//! audit head a status carries is kept across restarts, in [`AuditStore`](crate::serve::audit::AuditStore)).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bridge_protocol::StatusReport;
use tokio::sync::{mpsc, Notify};

use super::{lock, Hub, HubError};
use crate::serve::audit::{AuditView, Flag};
use crate::serve::registry::AgentRecord;

/// How many outgoing messages may queue for one connection.
const OUTBOX: usize = 64;

/// A message for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// One text frame (an encoded [`bridge_protocol::PlatformMessage`]).
    Text(String),
}

/// The hub's handle on one live connection.
#[derive(Debug)]
struct Conn {
    conn_id: u64,
    outbox: mpsc::Sender<Outbound>,
    kick: Arc<Notify>,
    /// The protocol version the connection speaks.
    version: u32,
    /// The version the agent reported in its `hello`.
    agent_version: String,
}

/// An agent connected now, as a rollout chooses its targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    /// The agent id.
    pub id: String,
    /// The protocol version of its connection.
    pub version: u32,
    /// The version it reported in its `hello`.
    pub agent_version: String,
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
    /// Its audit chain as the platform stored it (`{seq, hash, flag}`), `null` when no status
    /// carried one.
    pub audit: Option<AuditView>,
    /// Why its stored audit state cannot be read (absent when it can).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_error: Option<String>,
}

/// The live connections by agent id, and the agents' latest statuses.
#[derive(Debug)]
pub(super) struct Connections {
    live: Mutex<HashMap<String, Conn>>,
    statuses: Mutex<HashMap<String, StatusReport>>,
    next_conn: AtomicU64,
}

impl Connections {
    pub(super) fn new() -> Connections {
        Connections {
            live: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Makes a new connection `agent_id`'s live one and kicks the one it replaces, whose id it
    /// returns. `resend` runs under the connections lock (see [`Connections::dispatch`]) and
    /// gives the registration's [`Registration::resend`].
    fn register(
        &self,
        agent_id: &str,
        version: u32,
        agent_version: &str,
        resend: impl FnOnce() -> Vec<String>,
    ) -> (Registration, Option<u64>) {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(OUTBOX);
        let kick = Arc::new(Notify::new());
        let (old, resend) = {
            // Under the connections lock, which `run` also holds from choosing a connection to
            // recording its dispatch: a run is either in this snapshot (and goes out right
            // after `welcome`) or sent on this connection's outbox, never both.
            let mut live = lock(&self.live);
            let old = live.insert(
                agent_id.to_string(),
                Conn {
                    conn_id,
                    outbox: tx,
                    kick: kick.clone(),
                    version,
                    agent_version: agent_version.to_string(),
                },
            );
            (old, resend())
        };
        let replaced = old.map(|old| {
            tracing::info!(
                agent_id,
                old_conn = old.conn_id,
                conn = conn_id,
                "replacing the agent's previous connection"
            );
            old.kick.notify_one();
            old.conn_id
        });
        let registration = Registration {
            conn_id,
            outbox: rx,
            kicked: kick,
            resend,
        };
        (registration, replaced)
    }

    /// Removes connection `conn_id` of `agent_id` if it is still the live one.
    fn unregister(&self, agent_id: &str, conn_id: u64) {
        let mut live = lock(&self.live);
        if live.get(agent_id).is_some_and(|c| c.conn_id == conn_id) {
            live.remove(agent_id);
        }
    }

    /// The outbox and id of `agent_id`'s live connection.
    pub(super) fn outbox(&self, agent_id: &str) -> Result<(mpsc::Sender<Outbound>, u64), HubError> {
        self.dispatch(agent_id, |_| ())
            .map(|(outbox, conn_id, ())| (outbox, conn_id))
    }

    /// Like [`Connections::outbox`], running `record` (given the connection id) under the
    /// connections lock: a message recorded there is either sent on this connection's outbox
    /// or resent to the connection that replaces it, never both (see
    /// [`Connections::register`]).
    pub(super) fn dispatch<R>(
        &self,
        agent_id: &str,
        record: impl FnOnce(u64) -> R,
    ) -> Result<(mpsc::Sender<Outbound>, u64, R), HubError> {
        let live = lock(&self.live);
        let conn = live
            .get(agent_id)
            .ok_or_else(|| HubError::NotConnected(agent_id.to_string()))?;
        let recorded = record(conn.conn_id);
        Ok((conn.outbox.clone(), conn.conn_id, recorded))
    }

    /// The protocol version of `agent_id`'s live connection.
    pub(super) fn version(&self, agent_id: &str) -> Option<u32> {
        lock(&self.live).get(agent_id).map(|c| c.version)
    }

    /// The agents connected now, by id.
    pub(super) fn live(&self) -> Vec<LiveAgent> {
        let mut live: Vec<LiveAgent> = lock(&self.live)
            .iter()
            .map(|(id, c)| LiveAgent {
                id: id.clone(),
                version: c.version,
                agent_version: c.agent_version.clone(),
            })
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }

    /// The enrolled agents `records` with their connection state and latest status.
    pub(super) fn views(&self, records: Vec<AgentRecord>) -> Vec<AgentView> {
        let live = lock(&self.live);
        let statuses = lock(&self.statuses);
        records
            .into_iter()
            .map(|r| AgentView {
                connected: live.contains_key(&r.id),
                status: statuses.get(&r.id).cloned(),
                audit: None,
                audit_error: None,
                id: r.id,
                enrolled_at: r.enrolled_at,
                last_seen: r.last_seen,
            })
            .collect()
    }
}

impl Hub {
    /// Registers a live connection for `agent_id` speaking protocol `version`, kicking any
    /// previous one (whose requests fail); `agent_version` is what its `hello` said.
    pub fn register(&self, agent_id: &str, version: u32, agent_version: &str) -> Registration {
        let (registration, replaced) =
            self.connections
                .register(agent_id, version, agent_version, || {
                    self.sent_runs.unacknowledged(agent_id)
                });
        if let Some(old) = replaced {
            self.requests
                .fail_connection(old, "replaced by a newer connection");
        }
        registration
    }

    /// Unregisters connection `conn_id` of `agent_id` (if it is still the current one) and fails
    /// the requests (not the runs) waiting on it with `why`.
    pub fn unregister(&self, agent_id: &str, conn_id: u64, why: &str) {
        self.connections.unregister(agent_id, conn_id);
        self.requests.fail_connection(conn_id, why);
    }

    /// Stores the agent's latest status (checked by the caller), and judges and stores the
    /// audit head it carries ([`AuditStore::observe`](crate::serve::audit::AuditStore::observe)): a flag raised now is logged as a
    /// warning naming the agent and the kind.
    pub fn set_status(&self, agent_id: &str, status: StatusReport) {
        if let Some(head) = &status.audit {
            match self.audit.observe(agent_id, head) {
                Ok(Some(flag)) => tracing::warn!(
                    agent_id,
                    kind = flag.kind.as_str(),
                    seq = flag.seq,
                    "audit chain flagged {}: {}",
                    flag.kind.as_str(),
                    flag.detail
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(agent_id, "cannot store the audit head: {e:#}"),
            }
        }
        lock(&self.connections.statuses).insert(agent_id.to_string(), status);
    }

    /// The agents connected now, sorted by id.
    pub fn live_agents(&self) -> Vec<LiveAgent> {
        self.connections.live()
    }

    /// Every enrolled agent with its connection state, latest status and audit chain.
    pub fn agents(&self) -> Vec<AgentView> {
        let mut views = self.connections.views(self.registry.agents());
        for view in &mut views {
            match self.audit.view(&view.id) {
                Ok(audit) => view.audit = audit,
                Err(e) => view.audit_error = Some(format!("{e:#}")),
            }
        }
        views
    }

    /// Clears the audit flag of `agent`, an enrolled agent; returns the flag cleared (none if
    /// there was none).
    pub fn clear_audit_flag(&self, agent: &str) -> anyhow::Result<Option<Flag>> {
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()).into());
        }
        let cleared = self.audit.clear(agent)?;
        if let Some(flag) = &cleared {
            tracing::info!(
                agent_id = agent,
                kind = flag.kind.as_str(),
                "audit flag cleared by an operator"
            );
        }
        Ok(cleared)
    }

    /// The outbox and id of the live connection of `agent`, an enrolled agent.
    pub(super) fn outbox_of(&self, agent: &str) -> Result<(mpsc::Sender<Outbound>, u64), HubError> {
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()));
        }
        self.connections.outbox(agent)
    }
}
