//! Self-update: a signed release, staged by the agent, switched to by the launcher, confirmed by
//! the new version or rolled back by the launcher.
//!
//! Who does what (`docs/updates.md` tells it end to end):
//!
//! - The agent (unprivileged) verifies an `update` (manifest signature against its release keys,
//!   OS, arch, version), fetches the binary over the link (`need_release`; for a format-2
//!   manifest its gzip archive, checked before it is unpacked with its output capped at the
//!   binary's size: [`unpack`]), checks its size and SHA-256, writes it to
//!   `STATE/update/staged/`, drains its tasks and exits.
//! - `bridge-daemon launcher prepare` (root, before every start: systemd's
//!   `ExecStartPre=+`): verifies the staged release again itself, installs it into the
//!   root-owned layout (`LAYOUT/releases/VERSION/bridge-daemon`), switches `current`, and
//!   rolls back a pending version that had its one start without confirming.
//! - `bridge-daemon launcher run` (unprivileged, the service's main process): starts
//!   `LAYOUT/current/bridge-daemon run`; while a switched version is unconfirmed, it watches it
//!   and records a verdict when it exits, cannot start, or does not confirm in time.
//! - The new version confirms (writes [`CONFIRMED`]) once it has connected, passed the handshake
//!   and stayed up for the health window, and reports `update_status succeeded`; a rolled-back
//!   agent reports `failed` from [`OUTCOME`].
//!
//! The launcher is a copy of the agent binary the installer puts at `LAYOUT/bridge-launcher`;
//! an update never replaces it, so rollback never depends on the code being installed.
//!
//! Files in the agent's state directory (`STATE/update/`, the service user's), the interface
//! between the agent, the launcher and the root step; each is written whole (temporary file,
//! fsync, rename):

pub mod agent;
pub mod dir;
pub mod files;
pub mod launcher;
pub mod layout;
pub mod prepare;
pub mod settings;
pub mod state;
pub mod unpack;

/// `STATE/update/`: everything below.
pub const UPDATE_DIR: &str = "update";
/// `STATE/update/staged/`: a verified release the agent hands to `launcher prepare`
/// ([`STAGED_MANIFEST`], [`STAGED_BINARY`], [`STAGED_REQUEST`]), renamed into place whole.
pub const STAGED_DIR: &str = "staged";
/// The agent's work directory while it receives a release; removed at start.
pub const STAGING_DIR: &str = "staging";
/// In `staged/`: the signed manifest in format 1 (as received, or for a format-2 release the
/// format-1 manifest of its binary, which a launcher of any version reads).
pub const STAGED_MANIFEST: &str = "manifest";
/// In `staged/`: the release binary.
pub const STAGED_BINARY: &str = "bridge-daemon";
/// In `staging/`: the gzip archive of a format-2 release while it is received; removed once
/// it is unpacked into [`STAGED_BINARY`].
pub const STAGING_ARCHIVE: &str = "bridge-daemon.gz";
/// In `staged/`: a [`files::StagedRequest`] (JSON).
pub const STAGED_REQUEST: &str = "request.json";
/// `STATE/update/confirmed`: the version that confirmed, one line (written by the new version).
pub const CONFIRMED: &str = "confirmed";
/// `STATE/update/verdict`: a [`files::Verdict`] (JSON) the unprivileged launcher writes when
/// the pending version exits, cannot start or does not confirm; `prepare` reads it as the
/// rollback's reason.
pub const VERDICT: &str = "verdict";
/// `STATE/update/outcome.json`: a [`files::Outcome`], the update's verdict the agent reports
/// (`update_status`) after every reconnect until `update_ack`, then removes.
pub const OUTCOME: &str = "outcome.json";

/// In the layout (root-owned): `releases/VERSION/bridge-daemon`.
pub const RELEASES_DIR: &str = "releases";
/// In the layout: the symlink to the release the service runs (`releases/VERSION`).
pub const CURRENT_LINK: &str = "current";
/// In the layout: the symlink to the release before it (kept for one manual rollback).
pub const PREVIOUS_LINK: &str = "previous";
/// In the layout: the launcher's own record ([`files::LayoutState`], JSON, root's, 0644).
pub const LAYOUT_STATE: &str = "state.json";
/// In the layout: the launcher binary (a copy of the agent the installer installed).
pub const LAUNCHER: &str = "bridge-launcher";

/// Set by `launcher run` on the agent it starts: the layout directory. Without it an agent
/// refuses updates (`unsupported`): nothing would switch to a staged release.
pub const ENV_LAYOUT: &str = "BRIDGE_LAUNCHER_LAYOUT";
/// Failpoints for tests: `BRIDGE_FAILPOINT=STEP` makes the process kill itself (SIGKILL) when
/// it reaches the named step (see [`files::failpoint`]).
pub const ENV_FAILPOINT: &str = "BRIDGE_FAILPOINT";
