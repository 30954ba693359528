//! `bridge-daemon run`: the agent service. Assembles identity, sandbox, trust and the platform
//! link from the config file and flags, and runs until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::sandbox::Sandbox;
use crate::trust::Trust;

/// Flags that override the config file (`None`/empty: keep the file's value).
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    /// `--server`.
    pub server: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--server-pin` (replaces the config's pins when given).
    pub server_pins: Vec<String>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--state`.
    pub state: Option<PathBuf>,
    /// `--trusted-key` (added to the config's keys).
    pub trusted_keys: Vec<String>,
    /// `--heartbeat-secs`.
    pub heartbeat_secs: Option<u64>,
    /// `--reconnect-max-secs`.
    pub reconnect_max_secs: Option<u64>,
    /// `--dev-allow-plaintext`.
    pub dev_allow_plaintext: bool,
    /// `--allow-unsigned`.
    pub allow_unsigned: bool,
}

/// The effective configuration: the file (if any) with the flags applied.
pub fn resolve(config: Option<&std::path::Path>, o: &RunOverrides) -> Result<AgentConfig> {
    let mut c = match config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let p = &mut c.platform;
    if o.server.is_some() {
        p.server = o.server.clone();
    }
    if o.token.is_some() {
        p.token = o.token.clone();
    }
    if o.token_file.is_some() {
        p.token_file = o.token_file.clone();
    }
    if !o.server_pins.is_empty() {
        p.server_pins = o.server_pins.clone();
    }
    if o.ca_file.is_some() {
        p.ca_file = o.ca_file.clone();
    }
    if let Some(h) = o.heartbeat_secs {
        p.heartbeat_secs = h;
        p.heartbeat_timeout_secs = None;
    }
    if let Some(r) = o.reconnect_max_secs {
        p.reconnect_max_secs = r;
    }
    p.dev_allow_plaintext |= o.dev_allow_plaintext;
    if o.state.is_some() {
        c.agent.state_dir = o.state.clone();
    }
    Ok(c)
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(config: AgentConfig, overrides: &RunOverrides) -> Result<()> {
    let state = config
        .agent
        .state_dir
        .clone()
        .context("no state directory: set [agent] state_dir or pass --state")?;
    std::fs::create_dir_all(&state)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    let link = config.platform.link_config()?;
    let identity = crate::identity::load_or_create(&state)?;
    if identity.created {
        tracing::info!(agent_id = %identity.agent_id, "created a new agent identity");
    }
    let mut sandbox_config = config.sandbox_config()?;
    if sandbox_config.cache_dir.is_none() {
        sandbox_config.cache_dir = Some(state.join("cache"));
    }
    let sandbox = tokio::task::spawn_blocking(move || Sandbox::new(sandbox_config)).await??;
    let call_like = crate::call::CallRequest {
        trusted_keys: overrides.trusted_keys.clone(),
        allow_unsigned: overrides.allow_unsigned,
        ..Default::default()
    };
    let trust: Trust = crate::call::trust(&call_like, &config)?;
    let mut options = crate::agent::AgentOptions::from_config(&config, &state)?;
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
    let (agent, recovery) = Agent::new(identity.agent_id.clone(), sandbox, trust, &state, options)?;
    let (records, unacked) = agent.journal().counts();
    tracing::info!(
        records,
        unacked,
        queued = recovery.queued.len(),
        interrupted = recovery.running.len(),
        "journal opened"
    );
    // In the background: results it produces wait in the outbox for the link.
    let recovering = agent.clone();
    tokio::spawn(async move { recovering.recover(recovery).await });
    agent.keep_trimmed();

    let shutdown = CancellationToken::new();
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
    crate::link::run(link, state, agent, shutdown).await
}
