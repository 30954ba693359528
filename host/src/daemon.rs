//! `bridge-daemon run`: the agent service. Loads the identity, builds the settings from the
//! config file and flags, assembles sandbox, trust, agent and link, and runs until SIGINT or SIGTERM
//! (or until it has drained for a staged release: see [`crate::update::agent`]).

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::{AgentConfig, Settings};
use crate::sandbox::Sandbox;
use crate::status::{self, server::StatusSource};

/// Runs the agent until SIGINT/SIGTERM (or a staged release's restart), with `config` (layer 1: the file and the flags).
pub async fn run(config: AgentConfig) -> Result<()> {
    let state = config.state_dir()?;
    create_state_dir(&state)?;
    let identity = crate::identity::load_or_create(&state)?;
    if identity.created {
        tracing::info!(agent_id = %identity.agent_id, "created a new agent identity");
    }
    let Settings {
        link,
        sandbox,
        agent: mut options,
        trust,
    } = config.settings(&state, &identity)?;
    // Cancelled by SIGINT/SIGTERM, or by the agent once it has drained for a staged release.
    let shutdown = CancellationToken::new();
    options.update.shutdown = shutdown.clone();
    // The sandbox's engine and the journal are independent: built and opened side by side. A
    // journal another daemon holds still stops this one here, before the link starts.
    let building = tokio::task::spawn_blocking(move || Sandbox::new(sandbox));
    let journal_config = options.journal.clone();
    let opening = tokio::task::spawn_blocking(move || Agent::open_journal(journal_config));
    let (sandbox, journal) = (building.await?, opening.await?);
    let journal = journal?;
    let sandbox = sandbox?;
    if !options.shell.is_empty() {
        // Orphans of a shell run whose supervisor died come to the agent, not to init.
        if let Err(e) = crate::shell::supervise::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
        options.cgroup_root = crate::shell::resolve_cgroup_root(options.cgroup_root.take());
    }
    if options.max_concurrent_tasks > sandbox.config().max_concurrent_runs as usize {
        tracing::warn!(
            max_concurrent_tasks = options.max_concurrent_tasks,
            max_concurrent_runs = sandbox.config().max_concurrent_runs,
            "agent.max_concurrent_tasks exceeds sandbox.max_concurrent_runs: WASM tasks beyond it wait for a sandbox slot while recorded as running"
        );
    }
    let (agent, outbox, recovery) = Agent::with_journal(
        identity.agent_id.clone(),
        sandbox,
        trust,
        &state,
        options,
        journal,
    )?;
    // After the journal opened: a second daemon on this state directory stopped there, and
    // never replaces the first one's socket. Removed when this function returns.
    let status = Arc::new(StatusSource::new(
        agent.clone(),
        link.server.clone(),
        state.clone(),
    ));
    let _status_socket = status::server::start(&status::socket_path(&state), status.clone())?;
    let (records, unacked) = agent.journal().counts();
    tracing::info!(
        records,
        unacked,
        queued = recovery.queued.len(),
        interrupted = recovery.running.len(),
        "journal opened"
    );
    if let Some(addr) = config.metrics.listen_addr()? {
        let listener = crate::observe::endpoint::bind(addr).await?;
        let bound = listener
            .local_addr()
            .context("the metrics endpoint's address")?;
        let observer = agent.observer().clone();
        if let Some(m) = observer.metrics() {
            m.set_listening(bound);
        }
        status.set_metrics_listen(Some(bound.to_string()));
        tracing::info!(listen = %bound, "metrics endpoint listening (GET /metrics)");
        let source = agent.clone();
        tokio::spawn(crate::observe::endpoint::serve(
            listener,
            observer,
            std::sync::Arc::new(move || source.stats()),
            shutdown.clone(),
        ));
    }
    // In the background: results it produces wait in the outbox for the link.
    let recovering = agent.clone();
    tokio::spawn(async move { recovering.recover(recovery).await });
    agent.keep_trimmed();

    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("stopping (signal received)");
        signals.cancel();
    });
    crate::link::run(link, state, identity, agent, outbox, shutdown).await
}

/// Creates the state directory (mode 0700, whatever the umask) if it is missing; its parents get
/// the usual mode.
fn create_state_dir(state: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = state.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the state directory {}", state.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(state) {
        // Exactly 0700: the umask may have taken more away.
        Ok(()) => {
            std::fs::set_permissions(state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("restricting the state directory {}", state.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("creating the state directory {}", state.display()))
        }
    }
}
