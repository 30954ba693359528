//! The server's shared, in-memory state: live connections and statuses, the module store, the
//! stored results, and everyone waiting for something from an agent, behind one facade, `Hub`.
//!
//! `Hub` holds one part per concept, each in its own file:
//!
//! * `connections`: the live connection of each agent and its latest status
//!   ([`Hub::register`], [`Hub::agents`]); the audit head a status carries is judged and
//!   stored in [`AuditStore`] ([`Hub::set_status`]).
//! * `tasks`: a `run` from the control interface to its result ([`Hub::run`],
//!   [`Hub::wait_result`]) and what the agent says of it ([`Hub::on_result`],
//!   [`Hub::on_accepted`]); with `waiters` (who waits for a task's result) and `sent_runs`
//!   (the `run` messages to resend until the agent acknowledges them).
//! * `streams`: a task's `chunk`s, forwarded to whoever streams it ([`Hub::on_chunk`]).
//! * `requests`: `cancel` and the handler commands, waiting for the agent's reply
//!   ([`Hub::on_reply`]).
//! * `modules`: the module store ([`Hub::module`]).
//! * `raw`: a raw frame to an agent and its `error` answer ([`Hub::send_raw`]).
//! * `updates`: an agent's self-update, from `update` to its verdict ([`Hub::update`],
//!   [`Hub::release_range`], [`Hub::on_update_status`]); the verdicts are stored in
//!   [`UpdateStore`].
//! * `error`: [`HubError`], why a request or a wait produced no answer.
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
//! * A refusal the agent does not record
//!   ([`is_unrecorded_refusal`](super::results::is_unrecorded_refusal): `busy`,
//!   `storage_full`…; nothing ran) ends the run it answers, is acknowledged, and is not stored:
//!   the same task id may be sent again, and its real result is stored then.
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

mod connections;
mod error;
mod modules;
mod raw;
mod requests;
mod sent_runs;
mod streams;
mod tasks;
mod updates;
mod waiters;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ring::rand::{SecureRandom as _, SystemRandom};

use super::audit::AuditStore;
use super::registry::Registry;
use super::results::ResultStore;
use super::rollout::RolloutSlot;
use super::updates::UpdateStore;

pub use self::connections::{AgentView, LiveAgent, Outbound, Registration};
pub use self::error::HubError;
pub use self::requests::Reply;
pub use self::streams::ChunkEvent;
pub use self::tasks::{RunOrder, RunOutcome, TaskView};
pub use self::updates::{Ending, Release, UpdateOrder, UpdateOutcome};

/// The shared state; see the module documentation.
#[derive(Debug)]
pub struct Hub {
    /// Enrolled agents and tokens.
    pub registry: Registry,
    /// Results by task id.
    pub results: ResultStore,
    /// Lifetime of enrollment tokens issued by this server (`None`: no expiry).
    pub token_ttl_secs: Option<u64>,
    /// The updates sent and their verdicts.
    pub update_store: UpdateStore,
    /// The rollout of this server, if one was started.
    pub rollout: RolloutSlot,
    /// What the platform saw of each agent's audit chain, and its flags.
    pub audit: AuditStore,
    connections: connections::Connections,
    modules: modules::ModuleStore,
    waiters: waiters::TaskWaiters,
    sent_runs: sent_runs::SentRuns,
    streams: streams::ChunkStreams,
    requests: requests::PendingRequests,
    error_waiters: raw::ErrorWaiters,
    updates: updates::ActiveUpdates,
    /// Keys of waiters (unique per hub); also the dispatch order of runs.
    next_key: AtomicU64,
}

impl Hub {
    /// A hub over `registry`, `results`, `update_store` and `audit`.
    pub fn new(
        registry: Registry,
        results: ResultStore,
        update_store: UpdateStore,
        audit: AuditStore,
        token_ttl_secs: Option<u64>,
    ) -> Hub {
        Hub {
            registry,
            results,
            token_ttl_secs,
            update_store,
            audit,
            rollout: RolloutSlot::default(),
            connections: connections::Connections::new(),
            modules: Default::default(),
            waiters: Default::default(),
            sent_runs: Default::default(),
            streams: Default::default(),
            requests: Default::default(),
            error_waiters: Default::default(),
            updates: Default::default(),
            next_key: AtomicU64::new(1),
        }
    }

    fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Issues an enrollment token with the server's lifetime.
    pub fn issue_token(&self) -> anyhow::Result<String> {
        self.registry.issue_token(self.token_ttl_secs)
    }

    /// Records activity from `agent_id` (in memory).
    pub fn seen(&self, agent_id: &str) {
        self.registry.touch(agent_id, false);
    }

    /// Ends the run or request whose message had id `id` with the agent's `error`. Returns
    /// false if `id` names nothing sent to this agent.
    pub fn on_error(&self, agent_id: &str, id: &str, why: String) -> bool {
        self.refuse_request(agent_id, id, &why) || self.refuse_run(agent_id, id, &why)
    }

    /// Ends everything still waiting (at shutdown).
    pub fn fail_all(&self) {
        self.waiters.fail_all(&HubError::ShuttingDown);
        self.requests.fail_all(&HubError::ShuttingDown);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// Removes and returns the entry `id` if `belongs` says it is the one asked for (sent to the
/// agent that answers).
fn take_if<T>(map: &mut HashMap<String, T>, id: &str, belongs: impl Fn(&T) -> bool) -> Option<T> {
    match map.get(id) {
        Some(entry) if belongs(entry) => map.remove(id),
        _ => None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
