//! The agent proper: what it does with the platform's requests, independent of the transport.
//! It owns the task life cycle, the module store and installed handlers; the link calls it as a [`crate::link::Peer`].
//!
//! A task's path through these files, in order (`docs/architecture.md` draws it):
//!
//! 1. [`admission`]: a `run` is checked, takes its task id's [`order::Turn`], is answered from
//!    memory or the journal if its id was seen, takes a place among the tasks in progress
//!    ([`activity::InProgress`]) or is refused ([`refusal::Refusal`]), and its command is
//!    resolved ([`execute::Target`]): an [`task::Admitted`] task.
//! 2. [`task`]: the phases as types. `Admitted::accept` records it in the journal (durably) and
//!    answers `accepted`: [`task::Queued`], or [`task::Running`] when a slot is free. A queued
//!    task `start`s when a slot frees; `Running::run` executes it; the [`task::Finished`] task
//!    is `deliver`ed: its result recorded and handed to the [`crate::outbox`].
//! 3. [`execute`]: where a command resolves (installed handler, then shell rule) and the run
//!    itself, in the WASM sandbox or as a shell command; [`modules`] fetches, checks and keeps
//!    module bytes.
//! 4. [`live`]: the tasks in progress by id, and `cancel`.
//!
//! When the agent starts, tasks recorded as queued run; tasks recorded as running end as
//! `interrupted` (or run again when the task said `idempotent`), exactly once, because that
//! ending is itself recorded ([`Agent::recover`]). [`handlers`] installs and removes handlers;
//! [`activity`] gives memory back while idle.

mod activity;
mod admission;
mod execute;
mod handlers;
mod live;
mod modules;
mod order;
pub mod refusal;
mod task;

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bridge_protocol::{
    AgentStats, AuditAt, AuditHead, ErrorBody, JournalStats, PlatformMessage, StatusReport,
    StoreStats, TaskStats,
};
use tokio::sync::Semaphore;

use crate::journal::{Journal, JournalConfig, Recovery};
use crate::observe::{disk, Observer};
use crate::outbox::{self, Outbox};
use crate::sandbox::Sandbox;
use crate::shell::Allowlist;
use crate::trust::Trust;
use crate::update::agent::{UpdateOptions, UpdateRequest, Updater};
use activity::Activity;
use live::LiveTasks;
use modules::ModuleStore;
use order::Turns;

/// Handler installations in progress at once; more are refused (`busy`).
const MAX_INSTALLS: usize = 4;

/// The longest task id accepted.
pub const MAX_TASK_ID_BYTES: usize = 256;

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
    /// Self-update (the config's `[update]`, and the daemon's shutdown token).
    pub update: UpdateOptions,
    /// What the agent observes about itself (for `status` and the metrics).
    pub observer: Arc<Observer>,
    /// `[audit]`: the audit files under `state/audit`.
    pub audit: crate::audit::AuditConfig,
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
            update: UpdateOptions::default(),
            observer: Arc::new(Observer::new(None)),
            audit: crate::audit::AuditConfig::default(),
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
    modules: ModuleStore,
    outbox: outbox::Sender,
    /// Tasks accepted and not finished, by task id.
    live: Mutex<LiveTasks>,
    /// The message taking effect for each task id (see [`order`]).
    turns: Arc<Mutex<Turns>>,
    /// Execution slots (`max_concurrent_tasks`).
    slots: Arc<Semaphore>,
    /// Handler installations in progress (each may wait a minute for module bytes).
    installs: Arc<Semaphore>,
    /// Tasks in progress (bounded by `max_concurrent_tasks + queue_capacity`), and idleness.
    activity: Arc<Activity>,
    /// Runs waiting for an earlier message about their task id or command (see [`order`]).
    waiting_runs: AtomicUsize,
    /// Self-update: staging a release, draining, confirming, reporting the verdict.
    update: Arc<Updater>,
    observer: Arc<Observer>,
    started: Instant,
    /// The audit files' directory (`state/audit`).
    audit_dir: PathBuf,
    /// This connection's answer to `welcome.audit_seq`.
    audit_at: Mutex<Option<AuditAt>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// An agent with its module store under `state/modules` and its journal per `options`.
    /// Returns the link's end of its outbox, and what the journal found unfinished: pass that
    /// to [`Agent::recover`] once a tokio runtime runs.
    pub fn new(
        agent_id: String,
        sandbox: Sandbox,
        trust: Trust,
        state: &std::path::Path,
        options: AgentOptions,
    ) -> Result<(Arc<Agent>, Outbox, Recovery)> {
        let opened = Agent::open_journal(options.journal.clone())?;
        Agent::with_journal(agent_id, sandbox, trust, state, options, opened)
    }

    /// Opens the journal (what [`Agent::new`] does first): independent of the sandbox, so a
    /// caller may open it while the sandbox's engine is built.
    pub fn open_journal(config: JournalConfig) -> Result<(Journal, Recovery)> {
        let path = config.path.clone();
        Journal::open(config)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("opening the journal {}", path.display()))
    }

    /// [`Agent::new`] with the journal already opened by [`Agent::open_journal`].
    pub fn with_journal(
        agent_id: String,
        sandbox: Sandbox,
        trust: Trust,
        state: &std::path::Path,
        options: AgentOptions,
        (journal, recovery): (Journal, Recovery),
    ) -> Result<(Arc<Agent>, Outbox, Recovery)> {
        let modules_dir = state.join("modules");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&modules_dir)
            .with_context(|| format!("creating the module store {}", modules_dir.display()))?;
        // The journal's commits and the compiled-module cache's lookups, for the metrics.
        journal.observe(options.observer.clone());
        sandbox.observe(options.observer.clone());
        let feed = journal
            .audit_feed()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("starting the audit log")?;
        crate::audit::start(state.join("audit"), options.audit.clone(), feed, |t| {
            journal.attach_exporter(t)
        })
        .context("starting the audit log")?;
        let (sender, outbox) = outbox::channel(journal.clone());
        let slots = options.max_concurrent_tasks.max(1);
        let semaphore = Arc::new(Semaphore::new(slots));
        let update = Arc::new(Updater::new(
            options.update,
            state,
            sender.clone(),
            semaphore.clone(),
            slots,
        ));
        // The journal's write-ahead log: only once this version is confirmed (an older one,
        // rolled back to, does not read it).
        update.when_confirmed({
            let journal = journal.clone();
            move || journal.use_log()
        });
        let agent = Arc::new(Agent {
            agent_id,
            sandbox,
            trust: Arc::new(trust),
            journal,
            shell: options.shell,
            cgroup_root: options.cgroup_root,
            modules: ModuleStore::new(modules_dir),
            outbox: sender,
            live: Mutex::new(LiveTasks::default()),
            turns: Arc::new(Mutex::new(Turns::default())),
            slots: semaphore,
            installs: Arc::new(Semaphore::new(MAX_INSTALLS)),
            activity: Activity::new(slots + options.queue_capacity),
            waiting_runs: AtomicUsize::new(0),
            update,
            observer: options.observer,
            started: Instant::now(),
            audit_dir: state.join("audit"),
            audit_at: Mutex::new(None),
        });
        Ok((agent, outbox, recovery))
    }

    /// The agent id.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// What the agent observes about itself.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// The status report sent to the platform.
    pub fn status_report(&self) -> StatusReport {
        // Apart: a lock taken inside a struct literal is held to its end.
        let stats = self.stats();
        let running = lock(&self.live).running();
        StatusReport {
            agent_id: self.agent_id.clone(),
            agent_version: crate::version::get().to_string(),
            host: crate::facts::collect(),
            running,
            agent_uptime_secs: self.started.elapsed().as_secs(),
            stats: Some(stats),
            audit: Some(self.audit_head()),
        }
    }

    /// The audit chain's head for the platform: its last durable record, and the answer to
    /// this connection's `welcome.audit_seq`.
    pub fn audit_head(&self) -> AuditHead {
        let head = self.journal.audit_head();
        AuditHead {
            seq: head.seq,
            hash: head.hash,
            at: lock(&self.audit_at).clone(),
        }
    }

    /// The hash of audit record `seq` as the chain holds it now: in the journal (not yet
    /// exported, or the head), else in the audit files; `None` when neither has it.
    fn audit_hash_of(&self, seq: u64) -> Option<String> {
        if seq == 0 || seq > self.journal.audit_head().seq {
            return None;
        }
        let in_journal = || {
            self.journal
                .audit_line(seq)
                .map(|l| crate::audit::hash_line(&l))
        };
        // Checked again after the files: the exporter may move it between the two reads.
        in_journal()
            .or_else(|| crate::audit::hash_of(&self.audit_dir, seq))
            .or_else(in_journal)
    }

    /// What the agent is doing, has done since it started, and holds. Cheap enough for every
    /// status: counters, the journal's in-memory index, two bounded directory counts
    /// ([`crate::observe::disk`]) and one read of `/proc/self/status`.
    pub fn stats(&self) -> AgentStats {
        let (running, queued) = lock(&self.live).counts();
        let (records, unacked) = self.journal.counts();
        let modules = disk::usage(self.modules.dir(), "wasm", 1);
        // Every engine's artifacts: what is on disk, whichever build compiled it.
        let compiled = self
            .sandbox
            .disk_cache()
            .and_then(|c| c.dir().parent())
            .map(|root| disk::usage(root, "cwasm", 2))
            .unwrap_or_default();
        AgentStats {
            link: self.observer.link(),
            tasks: TaskStats {
                running,
                queued,
                unacked: unacked as u64,
                finished: self.observer.finished(),
            },
            journal: JournalStats {
                bytes: crate::journal::disk_bytes(&self.journal.config().path),
                records: records as u64,
            },
            store: StoreStats {
                modules: modules.files,
                module_bytes: modules.bytes,
                compiled: compiled.files,
                compiled_bytes: compiled.bytes,
            },
            rss_bytes: crate::memory::resident_kib().saturating_mul(1024),
        }
    }

    /// Gives memory back shortly after start and then regularly while idle (see [`activity`]).
    pub fn keep_trimmed(self: &Arc<Self>) {
        self.activity.keep_trimmed();
    }
}

impl crate::link::Peer for Agent {
    fn agent_id(&self) -> &str {
        &self.agent_id
    }

    fn status(&self) -> StatusReport {
        self.status_report()
    }

    fn deliver(self: &Arc<Self>, msg: PlatformMessage) {
        match msg {
            PlatformMessage::Run(req) => self.start_run(req),
            PlatformMessage::Ack { task_ids } => self.journal.ack(&task_ids),
            PlatformMessage::Cancel { id, task_id } => self.cancel(id, task_id),
            PlatformMessage::InstallHandler {
                id,
                name,
                file_sha256,
                signature,
            } => self.install_handler(id, name, file_sha256, signature),
            PlatformMessage::RemoveHandler { id, name } => self.remove_handler(id, name),
            PlatformMessage::ListHandlers { id } => self.list_handlers(id),
            PlatformMessage::Update {
                id,
                manifest,
                allow_downgrade,
                drain_timeout_ms,
            } => self.update.start(UpdateRequest {
                id,
                manifest,
                allow_downgrade,
                drain_timeout_ms,
            }),
            PlatformMessage::UpdateAck { id } => self.update.acked(&id),
            // An `error` may answer a part of a release the update waits for.
            PlatformMessage::Error(e) => self.update.platform_error(&e),
            // The link's own business (answered there).
            PlatformMessage::Welcome { .. } => {}
        }
    }

    fn welcomed(self: &Arc<Self>, version: u32, audit_seq: Option<u64>) {
        *lock(&self.audit_at) = audit_seq.map(|seq| AuditAt {
            seq,
            hash: self.audit_hash_of(seq),
        });
        self.update.welcomed(version);
    }

    fn module_arrived(&self, bytes: Vec<u8>) -> Result<(), ErrorBody> {
        // While a release is fetched, binary frames are its parts.
        let Some(bytes) = self.update.take_part(bytes)? else {
            return Ok(());
        };
        self.modules
            .arrived(bytes, self.sandbox.config().max_module_bytes)
    }

    fn observer(&self) -> &Observer {
        &self.observer
    }

    fn waiting_to_reconnect(self: &Arc<Self>) {
        // Give back what the attempt touched (connecting, TLS, logging), so an agent cut off
        // from its platform for hours stays as small as an idle connected one.
        self.activity.trim_soon("waiting to reconnect");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use bridge_protocol::{RunRequest, Status};
    use serde_json::Value;

    use super::*;
    use crate::link::Peer;
    use crate::sandbox::SandboxConfig;

    /// The messages of `kinds` the agent sends, read from the link's end of its outbox until
    /// `n` came.
    async fn sent(outbox: &mut Outbox, kinds: &[&str], n: usize) -> Vec<Value> {
        let mut results = Vec::new();
        let read = async {
            while results.len() < n {
                assert!(outbox.ready().await, "the agent is gone");
                let mut batch = outbox.next_batch().await;
                for text in batch.take_texts() {
                    let msg: Value = serde_json::from_str(&text).unwrap();
                    if kinds.contains(&msg["type"].as_str().unwrap()) {
                        results.push(msg);
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the results within 30 s");
        results
    }

    fn run(task_id: &str, fill: impl FnOnce(&mut RunRequest)) -> PlatformMessage {
        let mut req = RunRequest {
            id: format!("req-{task_id}"),
            task_id: task_id.into(),
            ..RunRequest::default()
        };
        fill(&mut req);
        PlatformMessage::Run(req)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_ending_is_counted_once_and_a_repeat_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
        let trust = Trust::new(bridge_signing::TrustPolicy::new(), false);
        let options = AgentOptions::new(tmp.path());
        let (agent, mut outbox, _) =
            Agent::new("agent".into(), sandbox, trust, tmp.path(), options).unwrap();
        outbox.start_session(bridge_protocol::PROTOCOL_VERSION);

        // Refused before anything resolved: not recorded, counted.
        agent.deliver(run("unknown", |r| r.command = Some("nothing-here".into())));
        agent.deliver(run("late", |r| {
            r.command = Some("nothing-here".into());
            r.not_after = Some("2001-01-01T00:00:00Z".into());
        }));
        // Accepted, recorded, and ended by its run (the hash is not one): counted.
        agent.deliver(run("bad-hash", |r| r.file_sha256 = Some("zz".into())));
        let got = sent(&mut outbox, &["result"], 3).await;
        let reasons: BTreeMap<String, Value> = got
            .iter()
            .map(|m| {
                (
                    m["task_id"].as_str().unwrap().to_string(),
                    m["result"]["reason"].clone(),
                )
            })
            .collect();
        assert_eq!(reasons["unknown"], "unknown_command");
        assert_eq!(reasons["late"], "deadline_passed");
        let counted = BTreeMap::from([(Status::Rejected, 2), (Status::InvalidModule, 1)]);
        assert_eq!(agent.observer().finished(), counted);

        // A repeat is answered from memory or the journal: the task ended once, it counts once.
        agent.deliver(run("bad-hash", |r| r.file_sha256 = Some("zz".into())));
        let again = sent(&mut outbox, &["result", "accepted"], 1).await;
        assert_eq!(again[0]["task_id"], "bad-hash");
        assert_eq!(agent.observer().finished(), counted);

        let stats = agent
            .status_report()
            .stats
            .expect("a status carries the stats");
        assert_eq!(stats.tasks.finished, counted);
        assert_eq!((stats.tasks.running, stats.tasks.queued), (0, 0));
        assert_eq!(
            stats.journal.records, 1,
            "only the accepted task is recorded"
        );
        assert!(stats.journal.bytes > 0);
        assert!(stats.rss_bytes > 0);
    }
}
