//! The Prometheus metrics (`[metrics] listen`): one registry of `prometheus-client` series,
//! updated by the [`Observer`](super::Observer) as events happen and encoded in the
//! OpenMetrics text format for each scrape ([`Metrics::encode`]).
//!
//! Series that count or time events (tasks, commits, cache lookups) are updated on the event
//! with atomics only. Series that are states (tasks queued and running, the journal's size,
//! resident memory) are not kept up to date on every event: they are read from the agent's
//! [`AgentStats`] when a scrape encodes them. Every name starts with `bridge_` except the
//! standard `process_resident_memory_bytes`; `docs/operations.md` § Metrics lists them all.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use bridge_protocol::{AgentStats, RunResult};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::{CacheEvent, TaskKind};

/// The two exposition formats a scrape may ask for (by its `Accept` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, what Prometheus asks for: `prometheus-client`'s own encoding.
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for any other client (`curl`, `promtool check
    /// metrics`): the same text with a counter's `HELP` and `TYPE` naming its `_total` series
    /// and no `# EOF`.
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names it, else text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The answer's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    kind: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The task duration histogram's buckets, in seconds: 1 ms to an hour.
const TASK_SECONDS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// The journal commit histogram's buckets, in seconds: 50 µs to 2.5 s.
const COMMIT_SECONDS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

type FloatGauge = Gauge<f64, AtomicU64>;

/// The agent's Prometheus series (see the module's documentation).
pub struct Metrics {
    /// Every series below, registered once; locked by a scrape while it encodes (the state
    /// gauges are set and read under it).
    registry: Mutex<Registry>,
    tasks: Family<TaskLabels, Counter>,
    task_duration: Family<KindLabel, Histogram>,
    task_fuel: Histogram,
    link_connected: Gauge,
    link_reconnects: Counter,
    heartbeat_rtt: FloatGauge,
    journal_commit: Histogram,
    journal_committed: Counter,
    module_cache: Family<EventLabel, Counter>,
    // Read at scrape time from the agent's stats.
    tasks_queued: Gauge,
    tasks_running: Gauge,
    results_unacked: Gauge,
    journal_bytes: Gauge,
    journal_records: Gauge,
    resident: Gauge,
    /// Where the endpoint listens, once bound.
    listening: std::sync::OnceLock<std::net::SocketAddr>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A gauge's value from a `u64` (saturating: gauges are `i64`).
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Every series registered, at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            tasks: Family::default(),
            task_duration: Family::new_with_constructor(|| {
                Histogram::new(TASK_SECONDS.iter().copied())
            }),
            // 1000 to 10^10 fuel units, ×10 per bucket.
            task_fuel: Histogram::new(exponential_buckets(1e3, 10.0, 8)),
            link_connected: Gauge::default(),
            link_reconnects: Counter::default(),
            heartbeat_rtt: FloatGauge::default(),
            journal_commit: Histogram::new(COMMIT_SECONDS.iter().copied()),
            journal_committed: Counter::default(),
            module_cache: Family::default(),
            tasks_queued: Gauge::default(),
            tasks_running: Gauge::default(),
            results_unacked: Gauge::default(),
            journal_bytes: Gauge::default(),
            journal_records: Gauge::default(),
            resident: Gauge::default(),
            listening: std::sync::OnceLock::new(),
        };
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: crate::version::get(),
            })
            .set(1);
        // Every label value that can occur, at zero from the start: a rate over a series that
        // appears with its first event misses that event.
        for event in [CacheEvent::Hit, CacheEvent::Miss, CacheEvent::Compile] {
            drop(m.module_cache.get_or_create(&EventLabel {
                event: event.as_str(),
            }));
        }
        for kind in [TaskKind::Wasm, TaskKind::Shell] {
            drop(m.task_duration.get_or_create(&KindLabel {
                kind: kind.as_str(),
            }));
        }
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            let r = &mut *r;
            r.register(
                "bridge_build_info",
                "The agent's version (always 1)",
                build_info,
            );
            r.register(
                "bridge_tasks",
                "Tasks that ended, by kind (wasm, shell; none: refused before a command resolved) and final status",
                m.tasks.clone(),
            );
            r.register(
                "bridge_task_duration_seconds",
                "How long tasks ran, by kind, in seconds",
                m.task_duration.clone(),
            );
            r.register(
                "bridge_task_fuel",
                "Fuel units consumed by WASM tasks",
                m.task_fuel.clone(),
            );
            r.register(
                "bridge_tasks_queued",
                "Tasks accepted and waiting for a slot",
                m.tasks_queued.clone(),
            );
            r.register(
                "bridge_tasks_running",
                "Tasks running now",
                m.tasks_running.clone(),
            );
            r.register(
                "bridge_results_unacked",
                "Results recorded and not yet acknowledged by the platform",
                m.results_unacked.clone(),
            );
            r.register(
                "bridge_link_connected",
                "Whether the link to the platform is up (1) or not (0)",
                m.link_connected.clone(),
            );
            r.register(
                "bridge_link_reconnects",
                "Connections to the platform after the first since the agent started",
                m.link_reconnects.clone(),
            );
            r.register(
                "bridge_link_heartbeat_rtt_seconds",
                "The last heartbeat's round trip to the platform, in seconds",
                m.heartbeat_rtt.clone(),
            );
            r.register(
                "bridge_journal_commit_seconds",
                "Journal write transactions, from begin to commit (fsync included when durable), in seconds",
                m.journal_commit.clone(),
            );
            r.register(
                "bridge_journal_committed_bytes",
                "Bytes of journal values written by committed transactions",
                m.journal_committed.clone(),
            );
            r.register(
                "bridge_journal_bytes",
                "The journal file's size, in bytes",
                m.journal_bytes.clone(),
            );
            r.register(
                "bridge_journal_records",
                "Task records the journal holds",
                m.journal_records.clone(),
            );
            r.register(
                "bridge_module_cache_events",
                "Compiled-module cache lookups by event: hit (in memory or on disk), miss, compile",
                m.module_cache.clone(),
            );
            r.register(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                m.resident.clone(),
            );
        }
        m
    }

    /// Where the endpoint listens (the bound address, port 0 resolved), once it does: what
    /// `bridge-daemon status` shows as `metrics_listen`.
    pub fn listening(&self) -> Option<std::net::SocketAddr> {
        self.listening.get().copied()
    }

    /// Records where the endpoint listens (the first address set is kept).
    pub fn set_listening(&self, addr: std::net::SocketAddr) {
        let _ = self.listening.set(addr);
    }

    /// Every series in `format`, the state gauges set from `stats` first.
    pub fn encode(&self, stats: &AgentStats, format: Format) -> String {
        let text = self.encode_openmetrics(stats);
        match format {
            Format::OpenMetrics => text,
            Format::Text => to_text_format(&text),
        }
    }

    fn encode_openmetrics(&self, stats: &AgentStats) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.tasks_queued.set(gauge_value(stats.tasks.queued));
        self.tasks_running.set(gauge_value(stats.tasks.running));
        self.results_unacked.set(gauge_value(stats.tasks.unacked));
        self.journal_bytes.set(gauge_value(stats.journal.bytes));
        self.journal_records.set(gauge_value(stats.journal.records));
        self.resident.set(gauge_value(stats.rss_bytes));
        let mut text = String::with_capacity(8 << 10);
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub(super) fn link_connected(&self, reconnects: u64) {
        self.link_connected.set(1);
        let counted = self.link_reconnects.get();
        if reconnects > counted {
            self.link_reconnects.inc_by(reconnects - counted);
        }
    }

    pub(super) fn link_ended(&self) {
        self.link_connected.set(0);
    }

    pub(super) fn heartbeat(&self, rtt: Duration) {
        self.heartbeat_rtt.set(rtt.as_secs_f64());
    }

    pub(super) fn task_ended(&self, kind: TaskKind, result: &RunResult) {
        self.tasks
            .get_or_create(&TaskLabels {
                kind: kind.as_str(),
                status: result.status.as_str(),
            })
            .inc();
        if kind != TaskKind::Unresolved {
            self.task_duration
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .observe(result.duration_ms.max(0.0) / 1000.0);
        }
        if let (TaskKind::Wasm, Some(fuel)) = (kind, result.fuel_consumed) {
            self.task_fuel.observe(fuel as f64);
        }
    }

    pub(super) fn journal_commit(&self, latency: Duration, bytes: u64) {
        self.journal_commit.observe(latency.as_secs_f64());
        self.journal_committed.inc_by(bytes);
    }

    pub(super) fn module_cache(&self, event: CacheEvent) {
        self.module_cache
            .get_or_create(&EventLabel {
                event: event.as_str(),
            })
            .inc();
    }
}

/// The Prometheus text format 0.0.4 of `openmetrics` (the encoder's output for this registry:
/// counters, gauges and histograms, no units, no exemplars): a counter family's `HELP` and
/// `TYPE` lines name its `_total` samples, and the `# EOF` line goes.
fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once its TYPE line says whether it names a counter.
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" counter"))
        {
            if let Some(h) = help.take() {
                let text = h.strip_prefix(&format!("# HELP {name} ")).unwrap_or("");
                out.push_str(&format!("# HELP {name}_total {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}_total counter\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Observer;
    use bridge_protocol::Status;
    use bridge_testkit::metrics::{promtool_check, samples};

    /// The value of the sample `name` (with its labels, as encoded), if present.
    fn sample(text: &str, name: &str) -> Option<f64> {
        samples(text).get(name).copied()
    }

    #[test]
    fn every_series_is_encoded_with_help_and_type() {
        let o = Observer::new(Some(Metrics::new()));
        o.task_ended(TaskKind::Shell, &RunResult::refused(Status::Ok, ""));
        let text = format!(
            "\n{}",
            o.metrics()
                .unwrap()
                .encode(&AgentStats::default(), Format::OpenMetrics)
        );
        for name in [
            "bridge_build_info",
            "bridge_tasks",
            "bridge_task_duration_seconds",
            "bridge_task_fuel",
            "bridge_tasks_queued",
            "bridge_tasks_running",
            "bridge_results_unacked",
            "bridge_link_connected",
            "bridge_link_reconnects",
            "bridge_link_heartbeat_rtt_seconds",
            "bridge_journal_commit_seconds",
            "bridge_journal_committed_bytes",
            "bridge_journal_bytes",
            "bridge_journal_records",
            "bridge_module_cache_events",
            "process_resident_memory_bytes",
        ] {
            assert!(
                text.contains(&format!("\n# HELP {name} ")),
                "{name}:\n{text}"
            );
            assert!(
                text.contains(&format!("\n# TYPE {name} ")),
                "{name}:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let version = crate::version::get();
        assert_eq!(
            sample(
                &text,
                &format!("bridge_build_info{{version=\"{version}\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "bridge_module_cache_events_total{event=\"miss\"}"),
            Some(0.0),
            "every cache event is there from the start"
        );
    }

    #[test]
    fn the_text_format_names_counters_by_their_total_series() {
        let o = Observer::new(Some(Metrics::new()));
        o.module_cache(CacheEvent::Hit);
        let open = o
            .metrics()
            .unwrap()
            .encode(&AgentStats::default(), Format::OpenMetrics);
        let text = o
            .metrics()
            .unwrap()
            .encode(&AgentStats::default(), Format::Text);
        assert!(open.contains("\n# TYPE bridge_module_cache_events counter\n"));
        assert!(text.contains(
            "# HELP bridge_module_cache_events_total Compiled-module cache lookups by event"
        ));
        assert!(text.contains("\n# TYPE bridge_module_cache_events_total counter\n"));
        assert!(text.contains("\nbridge_module_cache_events_total{event=\"hit\"} 1\n"));
        assert!(text.contains("\n# TYPE bridge_journal_commit_seconds histogram\n"));
        assert!(!text.contains("# EOF") && open.ends_with("# EOF\n"));
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples(&open), samples(&text), "the same samples");
        assert_eq!(
            open.lines().filter(|l| l.starts_with("# HELP")).count(),
            text.lines().filter(|l| l.starts_with("# HELP")).count(),
        );
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
    }

    #[test]
    fn events_and_states_are_counted() {
        let o = Observer::new(Some(Metrics::new()));
        let mut ok = RunResult::refused(Status::Ok, "");
        ok.duration_ms = 1500.0;
        ok.fuel_consumed = Some(20_000);
        o.task_ended(TaskKind::Wasm, &ok);
        o.task_ended(TaskKind::Wasm, &ok);
        o.task_ended(
            TaskKind::Shell,
            &RunResult::refused(Status::Timeout, "slow"),
        );
        o.task_ended(
            TaskKind::Unresolved,
            &RunResult::refused(Status::Rejected, "unknown command"),
        );
        o.link_connected();
        o.link_ended("dead");
        o.link_connected();
        o.heartbeat(Duration::from_millis(250));
        o.journal_commit(Duration::from_micros(300), 1000);
        o.journal_commit(Duration::from_micros(700), 24);
        o.module_cache(CacheEvent::Miss);
        o.module_cache(CacheEvent::Compile);
        o.module_cache(CacheEvent::Hit);
        o.module_cache(CacheEvent::Hit);
        let mut stats = AgentStats::default();
        stats.tasks.queued = 3;
        stats.tasks.running = 2;
        stats.journal.bytes = 1 << 20;
        stats.rss_bytes = 42 << 20;
        let text = o.metrics().unwrap().encode(&stats, Format::OpenMetrics);
        let at = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert_eq!(at("bridge_tasks_total{kind=\"wasm\",status=\"ok\"}"), 2.0);
        assert_eq!(
            at("bridge_tasks_total{kind=\"shell\",status=\"timeout\"}"),
            1.0
        );
        assert_eq!(
            at("bridge_tasks_total{kind=\"none\",status=\"rejected\"}"),
            1.0
        );
        assert_eq!(
            at("bridge_task_duration_seconds_sum{kind=\"wasm\"}"),
            3.0,
            "seconds, not milliseconds"
        );
        assert_eq!(
            at("bridge_task_duration_seconds_count{kind=\"shell\"}"),
            1.0
        );
        assert_eq!(at("bridge_task_fuel_count"), 2.0);
        assert_eq!(at("bridge_task_fuel_sum"), 40_000.0);
        assert_eq!(at("bridge_link_connected"), 1.0);
        assert_eq!(at("bridge_link_reconnects_total"), 1.0);
        assert_eq!(at("bridge_link_heartbeat_rtt_seconds"), 0.25);
        assert_eq!(at("bridge_journal_commit_seconds_count"), 2.0);
        assert_eq!(at("bridge_journal_committed_bytes_total"), 1024.0);
        assert_eq!(at("bridge_module_cache_events_total{event=\"hit\"}"), 2.0);
        assert_eq!(
            at("bridge_module_cache_events_total{event=\"compile\"}"),
            1.0
        );
        assert_eq!(at("bridge_tasks_queued"), 3.0);
        assert_eq!(at("bridge_tasks_running"), 2.0);
        assert_eq!(at("bridge_journal_bytes"), 1048576.0);
        assert_eq!(at("process_resident_memory_bytes"), (42 << 20) as f64);
        promtool_check(&o.metrics().unwrap().encode(&stats, Format::Text));
        o.link_ended("gone");
        let text = o
            .metrics()
            .unwrap()
            .encode(&AgentStats::default(), Format::OpenMetrics);
        assert_eq!(sample(&text, "bridge_link_connected"), Some(0.0));
        assert_eq!(
            sample(&text, "bridge_tasks_queued"),
            Some(0.0),
            "states are read at each scrape"
        );
    }
}
