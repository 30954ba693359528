//! The agent's settings, in two layers: what the operator wrote, then what the agent runs with.
//!
//! **Layer 1**, plain data: the configuration file (TOML, one typed struct, defaults and
//! validation in one place) with the command line's flags applied once ([`AgentConfig::resolve`]).
//! Unknown keys are an error (every table is `deny_unknown_fields`), so a typo is reported
//! instead of silently ignored. See `docs/configuration.md` for every key.
//!
//! **Layer 2**, built once from layer 1 (and, for the daemon, its identity): the settings of the
//! link ([`LinkConfig`]), the sandbox ([`SandboxConfig`]), the agent ([`AgentOptions`]) and its
//! [`Trust`], gathered in [`Settings`]. Those modules take their settings; none reads this one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::agent::AgentOptions;
use crate::identity::Identity;
use crate::journal::JournalConfig;
use crate::limits::{LimitPolicy, Limits};
use crate::link::LinkConfig;
use crate::sandbox::cache::CacheDir;
use crate::sandbox::SandboxConfig;
use crate::trust::{Trust, TrustSection};

mod audit;
mod metrics;
mod update;
pub use audit::AuditSection;
pub use metrics::MetricsSection;
pub use update::UpdateSection;

/// The config file the installer writes, read by `status` and `audit` when given neither
/// `--state` nor `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/bridge/agent.toml";

/// The flags of `bridge-daemon run`: each overrides the file's value when given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunFlags {
    /// Agent config file (TOML); see docs/configuration.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The platform's agent endpoint, e.g. wss://platform.example:8443/agent.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,

    /// One-time enrollment token (first connection only). Prefer --token-file: arguments are
    /// visible to other users in the process list.
    // Tokens are base64url and may start with '-'.
    #[arg(long, value_name = "TOKEN", allow_hyphen_values = true)]
    pub token: Option<String>,

    /// A file holding the enrollment token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// SHA-256 fingerprint of the platform's TLS key (64 hex characters); repeatable, so the
    /// platform can rotate keys. Replaces the config's pins.
    #[arg(long = "server-pin", value_name = "SHA256")]
    pub server_pins: Vec<String>,

    /// PEM file of CA certificates to validate the platform's certificate chain.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// State directory (identity, module store, compiled-module cache).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,

    /// A publisher key to trust (`ed25519:…`, or @FILE / a path); repeatable.
    #[arg(long = "trusted-key", value_name = "PUB|@FILE")]
    pub trusted_keys: Vec<String>,

    /// WebSocket ping interval in seconds (default 30); the link is declared dead after
    /// 2 × interval + 10 s without a frame.
    #[arg(long, value_name = "N")]
    pub heartbeat_secs: Option<u64>,

    /// Longest wait between reconnect attempts, in seconds (default 60).
    #[arg(long, value_name = "N")]
    pub reconnect_max_secs: Option<u64>,

    /// Development only: allow a plaintext ws:// platform URL (no TLS, no authentication).
    #[arg(long)]
    pub dev_allow_plaintext: bool,

    /// Development only: run modules that carry no signature. Refused with a --config file
    /// unless it sets `[trust] allow_unsigned_override = true`.
    #[arg(long)]
    pub allow_unsigned: bool,
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `[sandbox]`: how handlers run.
    #[serde(default)]
    pub sandbox: SandboxSection,
    /// `[trust]`: which publishers' modules may run.
    #[serde(default)]
    pub trust: TrustSection,
    /// `[agent]`: where the agent keeps its state.
    #[serde(default)]
    pub agent: AgentSection,
    /// `[platform]`: how the agent reaches its platform.
    #[serde(default)]
    pub platform: PlatformSection,
    /// `[shell]`: the allowlisted shell commands (the fallback for what no handler does).
    #[serde(default)]
    pub shell: ShellSection,
    /// `[update]`: self-update (release keys, health window, drain).
    #[serde(default)]
    pub update: UpdateSection,
    /// `[metrics]`: the opt-in Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[audit]`: the audit files' rotation and logging.
    #[serde(default)]
    pub audit: AuditSection,
    /// The file this configuration was read from; `None` when there is no file (all defaults).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[shell]`: the shell fallback's allowlist.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellSection {
    /// The allowlisted commands; none means the fallback is off.
    #[serde(default)]
    pub rules: Vec<crate::shell::ShellRule>,
    /// A delegated cgroup v2 directory the agent may create one child cgroup per run in, or
    /// `"auto"`: the cgroup the agent was started in, delegated to it by its unit (the agent
    /// moves itself into `<it>/agent` and creates task cgroups under `<it>/tasks`). Without it
    /// (or when it cannot be used) a run's tree is bounded by its supervisor alone.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
}

impl ShellSection {
    /// The rules, validated (names unique, paths absolute, patterns compile, limits in range).
    pub fn allowlist(&self) -> Result<crate::shell::Allowlist> {
        if let Some(root) = &self.cgroup_root {
            anyhow::ensure!(
                root.is_absolute() || root.as_os_str() == crate::shell::exec::AUTO,
                "shell.cgroup_root {} must be an absolute path or \"auto\"",
                root.display()
            );
        }
        crate::shell::Allowlist::new(self.rules.iter().cloned()).map_err(anyhow::Error::msg)
    }
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// The state directory: identity, journal, module store, compiled-module cache.
    pub state_dir: Option<PathBuf>,
    /// Tasks running at once (WASM handlers and shell commands together).
    pub max_concurrent_tasks: u32,
    /// Tasks accepted and waiting for a slot; beyond it a task is refused as `busy`.
    pub queue_capacity: u32,
    /// Finished, acknowledged tasks are remembered (for deduplication) this many hours.
    pub journal_retention_hours: u64,
    /// At most this many finished, acknowledged tasks are remembered.
    pub journal_max_records: usize,
    /// New tasks are refused (`storage_full`) when the state directory's filesystem has less
    /// free space than this, in MiB.
    pub min_free_mib: u64,
    /// New tasks are refused (`storage_full`) when the journal grows beyond this, in MiB.
    pub journal_max_mib: u64,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            state_dir: None,
            max_concurrent_tasks: 32,
            queue_capacity: 256,
            journal_retention_hours: 7 * 24,
            journal_max_records: 20_000,
            min_free_mib: 64,
            journal_max_mib: 256,
        }
    }
}

impl AgentSection {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            (1..=4096).contains(&self.max_concurrent_tasks),
            "agent.max_concurrent_tasks must be between 1 and 4096"
        );
        anyhow::ensure!(
            self.queue_capacity <= 1_000_000,
            "agent.queue_capacity must be at most 1000000"
        );
        anyhow::ensure!(
            self.journal_retention_hours >= 1,
            "agent.journal_retention_hours must be at least 1"
        );
        anyhow::ensure!(
            self.journal_max_records >= 1000,
            "agent.journal_max_records must be at least 1000"
        );
        anyhow::ensure!(
            self.journal_max_mib >= 1,
            "agent.journal_max_mib must be at least 1"
        );
        Ok(())
    }
}

/// `[platform]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformSection {
    /// `wss://host:port/agent`.
    pub server: Option<String>,
    /// The one-time enrollment token (prefer `token_file`: config files get copied around).
    pub token: Option<String>,
    /// A file holding the enrollment token.
    pub token_file: Option<PathBuf>,
    /// Accepted SHA-256 fingerprints of the platform's TLS key.
    pub server_pins: Vec<String>,
    /// CA certificates (PEM) to validate the platform's certificate chain.
    pub ca_file: Option<PathBuf>,
    /// Development only: allow `ws://`.
    pub dev_allow_plaintext: bool,
    /// WebSocket ping interval, seconds.
    pub heartbeat_secs: u64,
    /// No frame from the platform for this long means the link is dead; default 2 × heartbeat + 10.
    pub heartbeat_timeout_secs: Option<u64>,
    /// First reconnect wait cap, milliseconds.
    pub reconnect_base_ms: u64,
    /// Longest reconnect wait, seconds.
    pub reconnect_max_secs: u64,
    /// A connection up this long resets the backoff, seconds.
    pub healthy_after_secs: u64,
    /// Status report interval, seconds.
    pub status_secs: u64,
}

impl Default for PlatformSection {
    fn default() -> Self {
        PlatformSection {
            server: None,
            token: None,
            token_file: None,
            server_pins: Vec::new(),
            ca_file: None,
            dev_allow_plaintext: false,
            heartbeat_secs: 30,
            heartbeat_timeout_secs: None,
            reconnect_base_ms: 1000,
            reconnect_max_secs: 60,
            healthy_after_secs: 30,
            status_secs: 60,
        }
    }
}

impl PlatformSection {
    /// The link settings, validated. `server` must be set by now (config or flag).
    pub fn link_config(&self) -> Result<LinkConfig> {
        let server = self.server.clone().ok_or_else(|| {
            anyhow::anyhow!("no platform address: set [platform] server or pass --server")
        })?;
        crate::link::endpoint(&server, self.dev_allow_plaintext)?;
        anyhow::ensure!(
            self.heartbeat_secs >= 1,
            "platform.heartbeat_secs must be at least 1"
        );
        anyhow::ensure!(
            self.reconnect_max_secs >= 1,
            "platform.reconnect_max_secs must be at least 1"
        );
        anyhow::ensure!(
            self.status_secs >= 1,
            "platform.status_secs must be at least 1"
        );
        let timeout = self
            .heartbeat_timeout_secs
            .unwrap_or(2 * self.heartbeat_secs + 10);
        anyhow::ensure!(
            timeout > self.heartbeat_secs,
            "platform.heartbeat_timeout_secs must be longer than heartbeat_secs"
        );
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        let pins = self
            .server_pins
            .iter()
            .map(|p| bridge_protocol::identity::parse_pin(p).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?;
        let mut link = LinkConfig::new(server);
        link.token = token;
        link.trust = crate::link::ServerTrust {
            pins,
            ca_file: self.ca_file.clone(),
        };
        link.allow_plaintext = self.dev_allow_plaintext;
        link.heartbeat = Duration::from_secs(self.heartbeat_secs);
        link.heartbeat_timeout = Duration::from_secs(timeout);
        link.reconnect_base = Duration::from_millis(self.reconnect_base_ms.max(1));
        link.reconnect_max = Duration::from_secs(self.reconnect_max_secs);
        link.healthy_after = Duration::from_secs(self.healthy_after_secs);
        link.status_interval = Duration::from_secs(self.status_secs);
        Ok(link)
    }
}

/// `[sandbox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSection {
    /// Runs executing at once.
    pub max_concurrent_runs: u32,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    /// Compiled modules kept in memory.
    pub memory_cache_entries: usize,
    /// Directory for precompiled artifacts (omit to disable the disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Elements a wasm table may hold.
    pub table_elements: u32,
    /// Native stack wasm may use, in bytes.
    pub max_wasm_stack: usize,
    /// `[sandbox.defaults]`: limits for runs that ask for nothing.
    pub defaults: LimitsSection,
    /// `[sandbox.maximums]`: ceilings; larger requests are clamped.
    pub maximums: LimitsSection,
}

/// A table of the four per-run limits; keys left out keep the built-in value.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Fuel units.
    pub fuel: Option<u64>,
    /// Linear memory in MiB.
    pub memory_mib: Option<u64>,
    /// Wall-clock timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Captured bytes per output stream.
    pub output_bytes: Option<u64>,
}

impl LimitsSection {
    fn over(self, base: Limits) -> Limits {
        Limits {
            fuel: self.fuel.unwrap_or(base.fuel),
            memory_bytes: self
                .memory_mib
                .map_or(base.memory_bytes, |m| m.saturating_mul(1 << 20)),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            output_bytes: self.output_bytes.unwrap_or(base.output_bytes),
        }
    }
}

impl Default for SandboxSection {
    fn default() -> Self {
        let d = SandboxConfig::default();
        SandboxSection {
            max_concurrent_runs: d.max_concurrent_runs,
            max_module_bytes: d.max_module_bytes,
            memory_cache_entries: d.memory_cache_entries,
            cache_dir: None,
            table_elements: d.table_elements,
            max_wasm_stack: d.max_wasm_stack,
            defaults: LimitsSection::default(),
            maximums: LimitsSection::default(),
        }
    }
}

impl AgentConfig {
    /// Layer 1 for `bridge-daemon run`: the file named by `--config` (or all defaults) with
    /// the flags applied.
    pub fn resolve(flags: &RunFlags) -> Result<AgentConfig> {
        let mut c = match &flags.config {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
        let p = &mut c.platform;
        if flags.server.is_some() {
            p.server = flags.server.clone();
        }
        if flags.token.is_some() {
            p.token = flags.token.clone();
        }
        if flags.token_file.is_some() {
            p.token_file = flags.token_file.clone();
        }
        if !flags.server_pins.is_empty() {
            p.server_pins = flags.server_pins.clone();
        }
        if flags.ca_file.is_some() {
            p.ca_file = flags.ca_file.clone();
        }
        if let Some(h) = flags.heartbeat_secs {
            p.heartbeat_secs = h;
            p.heartbeat_timeout_secs = None;
        }
        if let Some(r) = flags.reconnect_max_secs {
            p.reconnect_max_secs = r;
        }
        p.dev_allow_plaintext |= flags.dev_allow_plaintext;
        if flags.state.is_some() {
            c.agent.state_dir = flags.state.clone();
        }
        c.trust.flag_keys = flags.trusted_keys.clone();
        c.trust.allow_unsigned = flags.allow_unsigned;
        Ok(c)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut config =
            Self::parse(&text).with_context(|| format!("in config file {}", path.display()))?;
        config.file = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<AgentConfig> {
        let config: AgentConfig = toml::from_str(text)?;
        config.sandbox_config()?;
        config.trust.policy()?;
        config.shell.allowlist()?;
        config.agent.validate()?;
        config.update.validate()?;
        config.metrics.listen_addr()?;
        Ok(config)
    }

    /// The sandbox settings this config describes, validated.
    pub fn sandbox_config(&self) -> Result<SandboxConfig> {
        let s = &self.sandbox;
        let limits = LimitPolicy {
            defaults: s.defaults.over(Limits::DEFAULTS),
            maximums: s.maximums.over(Limits::MAXIMUMS),
        };
        // A lowered maximum also lowers a default that would now exceed it.
        let limits = LimitPolicy {
            defaults: Limits {
                fuel: limits.defaults.fuel.min(limits.maximums.fuel),
                memory_bytes: limits
                    .defaults
                    .memory_bytes
                    .min(limits.maximums.memory_bytes),
                timeout_ms: limits.defaults.timeout_ms.min(limits.maximums.timeout_ms),
                output_bytes: limits
                    .defaults
                    .output_bytes
                    .min(limits.maximums.output_bytes),
            },
            ..limits
        };
        limits.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            s.max_concurrent_runs >= 1,
            "sandbox.max_concurrent_runs must be at least 1"
        );
        anyhow::ensure!(
            s.max_module_bytes >= 8,
            "sandbox.max_module_bytes is too small"
        );
        anyhow::ensure!(
            (64 << 10..=64 << 20).contains(&s.max_wasm_stack),
            "sandbox.max_wasm_stack must be between 64 KiB and 64 MiB"
        );
        Ok(SandboxConfig {
            limits,
            max_concurrent_runs: s.max_concurrent_runs,
            max_module_bytes: s.max_module_bytes,
            memory_cache_entries: s.memory_cache_entries,
            cache_dir: s.cache_dir.clone().map(CacheDir::with_key_file),
            table_elements: s.table_elements,
            max_wasm_stack: s.max_wasm_stack,
            fuel_metering: true,
        })
    }
}

/// Layer 2: what the daemon runs with, built once from the configuration and its identity.
pub struct Settings {
    /// How the link reaches the platform (the enrollment token dropped once enrolled).
    pub link: LinkConfig,
    /// The sandbox, its compiled-module cache in the state directory keyed by the identity.
    pub sandbox: SandboxConfig,
    /// How the agent admits and runs tasks.
    pub agent: AgentOptions,
    /// Which modules may run.
    pub trust: Trust,
}

impl AgentConfig {
    /// The state directory (`[agent] state_dir` or `--state`).
    pub fn state_dir(&self) -> Result<PathBuf> {
        self.agent
            .state_dir
            .clone()
            .context("no state directory: set [agent] state_dir or pass --state")
    }

    /// The daemon's [`Settings`], for the agent whose identity and state directory are given.
    pub fn settings(&self, state: &Path, identity: &Identity) -> Result<Settings> {
        let mut platform = self.platform.clone();
        if let Some(enrolled) = crate::identity::enrollment(state, &identity.agent_id) {
            if platform.token.is_some() || platform.token_file.is_some() {
                tracing::info!(
                    agent_id = %enrolled.agent_id,
                    enrolled_at = %enrolled.enrolled_at,
                    record = %crate::identity::enrollment_file(state).display(),
                    "already enrolled: the enrollment token is ignored (neither read nor sent)"
                );
            }
            platform.token = None;
            platform.token_file = None;
        }
        let link = platform.link_config()?;
        let mut sandbox = self.sandbox_config()?;
        // The daemon's cache key is derived from its identity: no key file anywhere.
        let cache_root = sandbox
            .cache_dir
            .take()
            .map_or_else(|| state.join("cache"), |c| c.root().to_path_buf());
        sandbox.cache_dir = Some(CacheDir::with_key(cache_root, identity.module_cache_key()));
        let trust = Trust::from_settings(&self.trust, self.file.as_deref())?;
        let agent = self.agent_options(state)?;
        Ok(Settings {
            link,
            sandbox,
            agent,
            trust,
        })
    }

    /// The agent's options (`[agent]` and `[shell]`), its journal in `state`.
    pub fn agent_options(&self, state: &Path) -> Result<AgentOptions> {
        let a = &self.agent;
        let mut journal = JournalConfig::new(state.join("journal.redb"));
        journal.retention = Duration::from_secs(a.journal_retention_hours.saturating_mul(3600));
        journal.max_records = a.journal_max_records;
        journal.min_free_bytes = a.min_free_mib.saturating_mul(1 << 20);
        journal.max_bytes = a.journal_max_mib.saturating_mul(1 << 20);
        Ok(AgentOptions {
            max_concurrent_tasks: a.max_concurrent_tasks as usize,
            queue_capacity: a.queue_capacity as usize,
            shell: self.shell.allowlist()?,
            cgroup_root: self.shell.cgroup_root.clone(),
            journal,
            update: self.update.options(
                std::env::var_os(crate::update::ENV_LAYOUT)
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from),
            )?,
            observer: std::sync::Arc::new(crate::observe::Observer::new(
                self.metrics
                    .listen_addr()?
                    .map(|_| crate::observe::Metrics::new()),
            )),
            audit: self.audit.config()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = AgentConfig::parse("").unwrap();
        let s = c.sandbox_config().unwrap();
        assert_eq!(s.limits, LimitPolicy::default());
        assert_eq!(s.max_concurrent_runs, 32);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = AgentConfig::parse("[sandbox]\nmax_concurent_runs = 3\n").unwrap_err();
        assert!(format!("{err:#}").contains("max_concurent_runs"), "{err:#}");
        assert!(AgentConfig::parse("[sandbox.defaults]\nfuell = 1\n").is_err());
        assert!(AgentConfig::parse("[sandboxx]\n").is_err());
    }

    #[test]
    fn limits_override_and_lower_defaults() {
        let c = AgentConfig::parse(
            "[sandbox.maximums]\nmemory_mib = 32\ntimeout_ms = 2000\n[sandbox.defaults]\nfuel = 5000\n",
        )
        .unwrap();
        let s = c.sandbox_config().unwrap();
        assert_eq!(s.limits.maximums.memory_bytes, 32 << 20);
        assert_eq!(
            s.limits.defaults.memory_bytes,
            32 << 20,
            "default lowered to the maximum"
        );
        assert_eq!(s.limits.defaults.timeout_ms, 2000);
        assert_eq!(s.limits.defaults.fuel, 5000);
    }

    #[test]
    fn the_trust_table_is_checked() {
        let c = AgentConfig::parse("[trust]\nallow_unsigned_override = true\n").unwrap();
        assert!(c.trust.allow_unsigned_override);
        let c = AgentConfig::parse("").unwrap();
        assert!(
            !c.trust.allow_unsigned_override,
            "the development override is off unless the file turns it on"
        );
        assert!(c.trust.policy().unwrap().keys().is_empty());
        assert!(AgentConfig::parse("[trust]\nkeys = [{ key = \"ed25519:nope\" }]\n").is_err());
        assert!(AgentConfig::parse("[trust]\nrevoked = [\"zz\"]\n").is_err());
    }

    #[test]
    fn the_platform_table_is_checked() {
        let c = AgentConfig::parse(
            "[platform]\nserver = \"wss://p.example/agent\"\nserver_pins = [\"sha256:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB\"]\nheartbeat_secs = 5\n",
        )
        .unwrap();
        let link = c.platform.link_config().unwrap();
        assert_eq!(link.heartbeat.as_secs(), 5);
        assert_eq!(link.heartbeat_timeout.as_secs(), 20);
        assert_eq!(link.trust.pins, vec!["ab".repeat(32)]);
        let plain = AgentConfig::parse("[platform]\nserver = \"ws://p.example/agent\"\n").unwrap();
        assert!(
            plain.platform.link_config().is_err(),
            "ws:// without the development flag"
        );
        assert!(AgentConfig::parse("[platform]\nserver_pin = []\n").is_err());
        let bad_pin =
            AgentConfig::parse("[platform]\nserver = \"wss://x/agent\"\nserver_pins = [\"abc\"]\n")
                .unwrap();
        assert!(bad_pin.platform.link_config().is_err());
    }

    #[test]
    fn the_shell_table_is_checked() {
        let c = AgentConfig::parse(
            r#"
[shell]
cgroup_root = "/sys/fs/cgroup/bridge"
rules = [
  { name = "disk-usage", program = "/usr/bin/du", args = ["-sh"], extra_args = { max = 1, patterns = ["/var/log(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*"] }, timeout_ms = 10000, output_bytes = 65536, cwd = "/", env = { LANG = "C" }, user = "nobody", group = "nogroup" },
  { name = "uptime", program = "/usr/bin/uptime" },
]
"#,
        )
        .unwrap();
        let list = c.shell.allowlist().unwrap();
        assert_eq!(list.names(), ["disk-usage", "uptime"]);
        let du = list.get("disk-usage").unwrap();
        assert_eq!(du.args, ["-sh"]);
        assert_eq!(du.extra_args.max, 1);
        assert_eq!(du.env["LANG"], "C");
        assert_eq!(du.user.as_deref(), Some("nobody"));
        let up = list.get("uptime").unwrap();
        assert_eq!(up.timeout_ms, 10_000);
        assert_eq!(up.output_bytes, 1 << 20);
        assert_eq!(up.cwd, Path::new("/"));
        assert!(up.env.is_empty() && up.args.is_empty() && up.extra_args.max == 0);
        assert!(AgentConfig::parse("")
            .unwrap()
            .shell
            .allowlist()
            .unwrap()
            .is_empty());

        let rule = |body: &str| AgentConfig::parse(&format!("[[shell.rules]]\n{body}\n"));
        assert!(rule("name = \"x\"\nprogram = \"/bin/true\"").is_ok());
        for (bad, says) in [
            ("name = \"x\"\nprogram = \"/bin/true\"\nshell = true", "unknown field"),
            ("name = \"x\"\nprogram = \"true\"", "absolute"),
            ("name = \"X y\"\nprogram = \"/bin/true\"", "name"),
            ("name = \"x\"\nprogram = \"/bin/true\"\nextra_args = { max = 1, patterns = [\"(\"] }", "invalid pattern"),
            ("name = \"x\"\nprogram = \"/bin/true\"\nextra_args = { max = 2 }", "pattern"),
            ("name = \"x\"\nprogram = \"/bin/true\"\nextra_args = { max = 1, pattern = [\"a\"] }", "unknown field"),
            ("name = \"x\"\nprogram = \"/bin/true\"\ntimeout_ms = 0", "timeout_ms"),
            ("name = \"x\"\nprogram = \"/bin/true\"\noutput_bytes = 1000000000", "output_bytes"),
            ("name = \"x\"\nprogram = \"/bin/true\"\ncwd = \"tmp\"", "cwd"),
        ] {
            let err = format!("{:#}", rule(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
        let twice = "[[shell.rules]]\nname = \"x\"\nprogram = \"/bin/true\"\n[[shell.rules]]\nname = \"x\"\nprogram = \"/bin/false\"\n";
        assert!(format!("{:#}", AgentConfig::parse(twice).unwrap_err()).contains("twice"));
        assert!(AgentConfig::parse("[shell]\ncgroup_root = \"rel\"\n").is_err());
        assert!(AgentConfig::parse("[shell]\ncgroup_root = \"auto\"\n").is_ok());
        assert!(AgentConfig::parse("[shell]\nrule = []\n").is_err());
    }

    #[test]
    fn the_documented_shell_example_parses() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n[shell]").expect("the [shell] example") + 8;
        let example = &doc[start..start + doc[start..].find("```").unwrap()];
        let c = AgentConfig::parse(example).unwrap();
        let list = c.shell.allowlist().unwrap();
        assert_eq!(list.names(), ["disk-usage", "service-status", "uptime"]);
        let du = list.get("disk-usage").unwrap();
        let ok = |rule, arg: &str| crate::shell::check_args(rule, &[arg.to_string()]).is_ok();
        assert!(ok(du, "/var/log/nginx"));
        assert!(!ok(du, "/var/log/../../etc/shadow"));
        let status = list.get("service-status").unwrap();
        assert!(ok(status, "ssh.service"));
        assert!(!ok(status, "--help"));
    }

    #[test]
    fn flags_override_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(
            &file,
            "[platform]\nserver = \"wss://file/agent\"\nheartbeat_secs = 5\nheartbeat_timeout_secs = 9\nserver_pins = [\"sha256:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB\"]\n[agent]\nstate_dir = \"/var/lib/file\"\nqueue_capacity = 7\n",
        )
        .unwrap();
        let c = AgentConfig::resolve(&RunFlags {
            config: Some(file.clone()),
            server: Some("wss://flag/agent".into()),
            heartbeat_secs: Some(3),
            trusted_keys: vec!["@/k.pub".into()],
            allow_unsigned: true,
            ..RunFlags::default()
        })
        .unwrap();
        assert_eq!(c.file.as_deref(), Some(file.as_path()));
        assert_eq!(c.platform.server.as_deref(), Some("wss://flag/agent"));
        assert_eq!(
            c.platform.server_pins.len(),
            1,
            "no --server-pin: the file's"
        );
        let link = c.platform.link_config().unwrap();
        assert_eq!(link.heartbeat.as_secs(), 3);
        assert_eq!(
            link.heartbeat_timeout.as_secs(),
            16,
            "--heartbeat-secs drops the file's timeout for the derived one"
        );
        assert_eq!(c.state_dir().unwrap(), Path::new("/var/lib/file"));
        assert_eq!((c.trust.flag_keys.len(), c.trust.allow_unsigned), (1, true));
        let options = c.agent_options(Path::new("/s")).unwrap();
        assert_eq!(options.queue_capacity, 7);
        assert_eq!(options.journal.path, Path::new("/s/journal.redb"));
        let none = AgentConfig::resolve(&RunFlags::default()).unwrap();
        let err = none.state_dir().unwrap_err().to_string();
        assert!(err.contains("pass --state"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(AgentConfig::parse("[sandbox]\nmax_concurrent_runs = 0\n").is_err());
        assert!(AgentConfig::parse("[sandbox.maximums]\nfuel = 0\n").is_err());
        assert!(AgentConfig::parse("[sandbox]\nmax_wasm_stack = 10\n").is_err());
    }
}
