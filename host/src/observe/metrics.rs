//! The Prometheus metrics (`[metrics] listen`): the registry and its series. Filled in by the
//! metrics work; until then every call is a no-op.

use std::time::Duration;

use bridge_protocol::RunResult;

use super::{CacheEvent, TaskKind};

/// The agent's Prometheus series.
pub struct Metrics {}

impl Metrics {
    pub(super) fn link_connected(&self, _reconnects: u64) {}
    pub(super) fn link_ended(&self) {}
    pub(super) fn heartbeat(&self, _rtt: Duration) {}
    pub(super) fn task_ended(&self, _kind: TaskKind, _result: &RunResult) {}
    pub(super) fn journal_commit(&self, _latency: Duration, _bytes: u64) {}
    pub(super) fn module_cache(&self, _event: CacheEvent) {}
}
