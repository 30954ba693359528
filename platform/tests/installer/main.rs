//! The installer (`installers/install.sh`) run for real, with dash, against the real
//! `bridgectl serve` (or a fake platform serving chosen files) on 127.0.0.1, into `--root`
//! staging directories. One test binary; the topics:
//!
//! - [`lifecycle`]: first install, idempotent re-run, new settings, the installed agent
//!   enrolling and running a task, upgrade (identity kept), uninstall, purge; the one-line
//!   install the platform prints.
//! - [`layout`]: the root-owned release layout (`releases/VERSION`, `current`, `previous`, the
//!   launcher, `bin/bridge-daemon`), upgrades between versions, a pending self-update cleared,
//!   the unit that runs the launcher (`systemd-analyze verify`, exposure score).
//! - [`release`]: signed release manifests (`--release-key`): accepted, and every mismatch
//!   refused with nothing installed; `--run-as-root`.
//! - [`failures`]: checksum mismatch, wrong pin, unreachable platform, usage errors.
//! - [`ownership`]: root-owned policy files, the enrollment token removed once spent.

mod failures;
mod layout;
mod lifecycle;
mod ownership;
mod release;
mod support;
