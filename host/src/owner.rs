//! Whether a file is the agent user's own: owned by the effective uid, with no permission bit
//! for group or others beyond those a caller allows. The state directory, the identity key and
//! the compiled-code cache are each checked with it before they are trusted.

use std::os::unix::fs::MetadataExt;

/// The effective uid: who must own what the agent trusts.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What keeps a file from being the agent user's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// It belongs to this other uid.
    Owner(u32),
    /// Group or others have a permission bit beyond those allowed; the file's mode (0o7777 bits).
    Mode(u32),
}

/// `None` when `meta` is owned by the effective uid and gives group and others nothing beyond
/// `allowed` (e.g. `0o055` lets them read and search, never write).
pub fn exposure(meta: &std::fs::Metadata, allowed: u32) -> Option<Exposure> {
    if meta.uid() != euid() {
        return Some(Exposure::Owner(meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    (mode & 0o077 & !allowed != 0).then_some(Exposure::Mode(mode))
}
