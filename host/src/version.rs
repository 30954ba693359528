//! The version this agent reports: in `hello`, in `status`, and to decide whether a release is
//! newer. The binary sets it once at start ([`set`]) from its own build (`src/main.rs`: the
//! `BRIDGE_VERSION_OVERRIDE` build variable, else the crate's version), so a build that reports
//! another version recompiles only the binary crate. The compiled-module cache's key does not
//! use it (a rebuild with another version keeps its cache).

use std::sync::OnceLock;

static VERSION: OnceLock<&'static str> = OnceLock::new();

/// Sets the version this process reports; the first call wins.
pub fn set(version: &'static str) {
    let _ = VERSION.set(version);
}

/// The version this process reports: what [`set`] was given, else the crate's version.
pub fn get() -> &'static str {
    VERSION.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"))
}
