//! `bridge-daemon run`: the agent service. Assembles identity, sandbox, trust and the platform
//! link from the config file and flags, and runs until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::sandbox::cache::CacheDir;
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
    create_state_dir(&state)?;
    let identity = crate::identity::load_or_create(&state)?;
    if identity.created {
        tracing::info!(agent_id = %identity.agent_id, "created a new agent identity");
    }
    let mut platform = config.platform.clone();
    if let Some(enrolled) = crate::identity::enrollment(&state, &identity.agent_id) {
        if platform.token.is_some() || platform.token_file.is_some() {
            tracing::info!(
                agent_id = %enrolled.agent_id,
                enrolled_at = %enrolled.enrolled_at,
                record = %crate::identity::enrollment_file(&state).display(),
                "already enrolled: the enrollment token is ignored (neither read nor sent)"
            );
        }
        platform.token = None;
        platform.token_file = None;
    }
    let link = platform.link_config()?;
    let mut sandbox_config = config.sandbox_config()?;
    // The daemon's cache key is derived from its identity: no key file anywhere.
    let cache_root = sandbox_config
        .cache_dir
        .take()
        .map_or_else(|| state.join("cache"), |c| c.root().to_path_buf());
    sandbox_config.cache_dir = Some(CacheDir::with_key(cache_root, identity.module_cache_key()));
    let sandbox = tokio::task::spawn_blocking(move || Sandbox::new(sandbox_config)).await??;
    let trust = Trust::from_settings(
        &config.trust,
        config.file.as_deref(),
        &overrides.trusted_keys,
        overrides.allow_unsigned,
    )?;
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
    let (agent, outbox, recovery) =
        Agent::new(identity.agent_id.clone(), sandbox, trust, &state, options)?;
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
    crate::link::run(link, state, agent, outbox, shutdown).await
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
