//! `bridge-daemon status`: what the agent is doing, asked of the running daemon over a Unix
//! socket in its state directory, or read from the state directory when it is not running.
//!
//! - [`server`]: the daemon's end, `STATE/status.sock` (mode 0600; only the daemon's user and
//!   root are answered, by the peer's credentials): one request line, `status\n`, answered with
//!   one [`LocalStatus`] in JSON; bounded in connections, bytes and time.
//! - [`client`]: the command's end: asks the socket, and when nobody answers there reads what
//!   the state directory tells ([`offline`]).
//! - [`render`]: the human form of a [`LocalStatus`], a short aligned text.

pub mod client;
pub mod offline;
pub mod render;
pub mod server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge_protocol::{AgentStats, AuditHead, StoreStats};
use serde::{Deserialize, Serialize};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "status.sock";

/// The longest request line, its `\n` included.
pub const MAX_REQUEST_BYTES: usize = 64;

/// How long a client has to send its request line, and the daemon to write its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections served at once; more wait in the socket's accept queue.
pub const MAX_CONNECTIONS: usize = 4;

/// The longest answer the client reads (a status is a few KiB).
pub const MAX_ANSWER_BYTES: u64 = 256 << 10;

/// The socket in state directory `state`.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join(SOCKET)
}

/// The agent's status as `bridge-daemon status --json` prints it: from the running daemon
/// (`running: true`), or what its state directory tells (`running: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalStatus {
    /// Whether the daemon answered.
    pub running: bool,
    /// The daemon's version (not running: this command's).
    pub version: String,
    /// The agent id; `null` before the first start created the identity.
    pub agent_id: Option<String>,
    /// The platform's address (not running: from the config file, else the enrollment
    /// record; `null` when neither tells).
    pub platform: Option<String>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The daemon's process id (`null` when not running).
    pub pid: Option<u32>,
    /// Seconds since the daemon started (`null` when not running).
    pub uptime_secs: Option<u64>,
    /// What the daemon is doing, has done since it started and holds (`null` when not
    /// running).
    pub stats: Option<AgentStats>,
    /// What the state directory holds, read from the files (only when not running).
    pub on_disk: Option<OnDisk>,
    /// The head of the audit chain (`null` when there is none).
    pub audit: Option<AuditHead>,
    /// The Prometheus endpoint's bound address (`null` when off or not running).
    pub metrics_listen: Option<String>,
}

/// What a stopped agent's state directory holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OnDisk {
    /// The journal file's size, in bytes (0 when there is none).
    pub journal_bytes: u64,
    /// The module store and the compiled-module cache.
    pub store: StoreStats,
}

/// Where an agent keeps its state, and what its config says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The state directory.
    pub state: PathBuf,
    /// The platform's address from the config file, if one was read.
    pub platform: Option<String>,
    /// The compiled-module cache's directory (`[sandbox] cache_dir`, else `STATE/cache`).
    pub cache_root: PathBuf,
}

impl Location {
    /// The agent whose state directory is `state` (no config read).
    pub fn of_state(state: &Path) -> Location {
        Location {
            state: state.to_path_buf(),
            platform: None,
            cache_root: state.join("cache"),
        }
    }

    /// The agent the config file at `path` describes.
    pub fn of_config(path: &Path) -> anyhow::Result<Location> {
        let config = crate::config::AgentConfig::load(path)?;
        let state = config.state_dir()?;
        Ok(Location {
            platform: config.platform.server.clone(),
            cache_root: config
                .sandbox
                .cache_dir
                .clone()
                .unwrap_or_else(|| state.join("cache")),
            state,
        })
    }
}
