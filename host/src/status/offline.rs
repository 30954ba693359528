//! What a stopped agent's state directory tells: its identity, its platform, and the sizes of
//! its journal, module store and compiled-module cache. Nothing is opened for writing and no
//! lock is taken (the journal is not opened: a daemon starting meanwhile must not find it
//! locked); directory counts are bounded ([`crate::observe::disk`]).

use bridge_protocol::{AuditHead, StoreStats};

use super::{LocalStatus, Location, OnDisk};
use crate::identity;
use crate::observe::disk;

/// The offline status of the agent at `location`.
pub fn read(location: &Location) -> LocalStatus {
    let state = &location.state;
    let agent_id = identity::agent_id(state).ok();
    let platform = location.platform.clone().or_else(|| {
        agent_id
            .as_deref()
            .and_then(|id| identity::enrollment(state, id))
            .map(|e| e.server)
    });
    let modules = disk::usage(&state.join("modules"), "wasm", 1);
    let compiled = disk::usage(&location.cache_root, "cwasm", 2);
    LocalStatus {
        running: false,
        version: crate::version::get().to_string(),
        agent_id,
        platform,
        state_dir: state.clone(),
        pid: None,
        uptime_secs: None,
        stats: None,
        on_disk: Some(OnDisk {
            journal_bytes: crate::journal::disk_bytes(&state.join("journal.redb")),
            store: StoreStats {
                modules: modules.files,
                module_bytes: modules.bytes,
                compiled: compiled.files,
                compiled_bytes: compiled.bytes,
            },
        }),
        // What the audit files hold (records still in the journal are exported at the next
        // start).
        audit: crate::audit::files_head(&state.join("audit")).map(|h| AuditHead {
            seq: h.seq,
            hash: h.hash,
            at: None,
        }),
        metrics_listen: None,
    }
}
