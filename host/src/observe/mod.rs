//! What the agent observes about itself, for `bridge-daemon status`, the platform's `status`
//! and the Prometheus endpoint: one [`Observer`] per agent, told of events by the link, the
//! agent, the journal and the sandbox, and read as a [`bridge_protocol::AgentStats`] snapshot.
//!
//! Counters that `status` needs are always kept (atomics and one small lock per event, nothing
//! allocated); histograms and the Prometheus registry exist only when `[metrics] listen` is set
//! ([`metrics`]).

pub mod disk;
pub mod endpoint;
pub mod metrics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bridge_protocol::{LinkStats, RunResult, Status};

pub use metrics::Metrics;

/// How a task ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// A WASM module (by hash, or an installed handler).
    Wasm,
    /// An allowlisted shell command.
    Shell,
    /// Refused before its command resolved to either (busy, updating, an unknown command…).
    Unresolved,
}

impl TaskKind {
    /// `wasm`, `shell` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Wasm => "wasm",
            TaskKind::Shell => "shell",
            TaskKind::Unresolved => "none",
        }
    }
}

/// What a compiled-module lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    /// Found compiled, in memory or on disk.
    Hit,
    /// Not found compiled.
    Miss,
    /// Compiled (after a miss).
    Compile,
}

impl CacheEvent {
    /// `hit`, `miss` or `compile`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheEvent::Hit => "hit",
            CacheEvent::Miss => "miss",
            CacheEvent::Compile => "compile",
        }
    }
}

fn status_index(status: Status) -> usize {
    Status::ALL
        .iter()
        .position(|s| *s == status)
        .expect("every status is listed")
}

/// The agent's observations (see the module's documentation).
pub struct Observer {
    link: Mutex<LinkStats>,
    /// Whether a connection was ever established (the next one is a reconnect).
    connected_once: std::sync::atomic::AtomicBool,
    finished: [AtomicU64; Status::ALL.len()],
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("link", &self.link())
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observer {
    /// An observer; `metrics` when the Prometheus endpoint is on.
    pub fn new(metrics: Option<Metrics>) -> Observer {
        Observer {
            link: Mutex::new(LinkStats::default()),
            connected_once: Default::default(),
            finished: Default::default(),
            metrics,
        }
    }

    /// The Prometheus metrics, when on.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The link finished a handshake (`welcome` received).
    pub fn link_connected(&self) {
        let mut link = lock(&self.link);
        if self.connected_once.swap(true, Ordering::Relaxed) {
            link.reconnects += 1;
        }
        link.connected = true;
        link.since_unix_ms = Some(now_unix_ms());
        if let Some(m) = &self.metrics {
            m.link_connected(link.reconnects);
        }
    }

    /// A connection, or an attempt, ended: `why` in words (cut to
    /// [`bridge_protocol::status::MAX_LAST_ERROR_BYTES`]).
    pub fn link_ended(&self, why: &str) {
        let mut link = lock(&self.link);
        if link.connected || link.since_unix_ms.is_none() {
            link.since_unix_ms = Some(now_unix_ms());
        }
        link.connected = false;
        link.last_error = Some(cut(why, bridge_protocol::status::MAX_LAST_ERROR_BYTES));
        if let Some(m) = &self.metrics {
            m.link_ended();
        }
    }

    /// A heartbeat was answered after `rtt`.
    pub fn heartbeat(&self, rtt: Duration) {
        lock(&self.link).heartbeat_rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
        if let Some(m) = &self.metrics {
            m.heartbeat(rtt);
        }
    }

    /// A task ended with `result` (recorded or not: refusals the agent does not record too).
    pub fn task_ended(&self, kind: TaskKind, result: &RunResult) {
        self.finished[status_index(result.status)].fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.task_ended(kind, result);
        }
    }

    /// The journal committed a batch of `bytes` in `latency` (durable or not).
    pub fn journal_commit(&self, latency: Duration, bytes: u64) {
        if let Some(m) = &self.metrics {
            m.journal_commit(latency, bytes);
        }
    }

    /// A compiled-module lookup.
    pub fn module_cache(&self, event: CacheEvent) {
        if let Some(m) = &self.metrics {
            m.module_cache(event);
        }
    }

    /// The link as observed now.
    pub fn link(&self) -> LinkStats {
        lock(&self.link).clone()
    }

    /// Tasks ended since start, by status (statuses with none left out).
    pub fn finished(&self) -> std::collections::BTreeMap<Status, u64> {
        Status::ALL
            .iter()
            .zip(&self.finished)
            .map(|(s, n)| (*s, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_count_connections_after_the_first() {
        let o = Observer::new(None);
        assert_eq!(o.link().reconnects, 0);
        o.link_ended("refused");
        o.link_connected();
        assert_eq!(
            o.link().reconnects,
            0,
            "the first connection after failed attempts"
        );
        o.link_ended("dead");
        o.link_ended("refused again");
        o.link_connected();
        let link = o.link();
        assert_eq!(link.reconnects, 1);
        assert!(link.connected);
        assert_eq!(link.last_error.as_deref(), Some("refused again"));
    }

    #[test]
    fn last_error_is_cut_on_a_character_boundary() {
        let o = Observer::new(None);
        o.link_ended(&"é".repeat(1000));
        let e = o.link().last_error.unwrap();
        assert!(e.len() <= 1024 && e.len() >= 1022, "{}", e.len());
    }

    #[test]
    fn finished_counts_by_status() {
        let o = Observer::new(None);
        let refused = RunResult::refused(Status::Rejected, "busy");
        o.task_ended(TaskKind::Wasm, &refused);
        o.task_ended(TaskKind::Shell, &refused);
        let f = o.finished();
        assert_eq!(f.get(&Status::Rejected), Some(&2));
        assert_eq!(f.len(), 1);
    }
}
