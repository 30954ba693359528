//! The module store (`<state>/modules`, only modules that passed the trust policy, bounded in
//! bytes) and how a module's bytes are found: the caches, the store, or asked of the platform.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bridge_protocol::{AgentMessage, ErrorBody, ErrorCode};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::refusal::Refusal;
use super::{lock, Agent};
use crate::trust::Prepared;

type Waiters = HashMap<String, Vec<oneshot::Sender<Arc<Vec<u8>>>>>;

/// The module store, and the runs waiting for module bytes from the platform.
pub(super) struct ModuleStore {
    dir: PathBuf,
    /// How long a run waits for the bytes it asked for.
    wait: Duration,
    waiting: Mutex<Waiters>,
}

impl ModuleStore {
    pub(super) fn new(dir: PathBuf) -> ModuleStore {
        ModuleStore {
            dir,
            wait: Duration::from_secs(60),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// The store's directory.
    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn path(&self, sha_hex: &str) -> PathBuf {
        self.dir.join(format!("{sha_hex}.wasm"))
    }

    /// The code hash (what a signature covers) of the stored module file `file_sha256`, for a
    /// handler recorded before records kept it; `None` when the store no longer has it.
    pub(super) fn code_sha256(&self, file_sha256: &str) -> Option<String> {
        let bytes = std::fs::read(self.path(file_sha256)).ok()?;
        let inspection = bridge_signing::inspect(&bytes, None).ok()?;
        Some(hex::encode(inspection.module_sha256))
    }

    /// A binary frame arrived: module bytes, valid only if some run asked for that hash and no
    /// larger than `max` bytes.
    pub(super) fn arrived(&self, bytes: Vec<u8>, max: u64) -> Result<(), ErrorBody> {
        if bytes.len() as u64 > max {
            return Err(ErrorBody {
                id: None,
                code: ErrorCode::Oversize,
                message: format!(
                    "a module of {} bytes exceeds the agent's limit of {max} bytes",
                    bytes.len()
                ),
            });
        }
        let sha_hex = hex::encode(Sha256::digest(&bytes));
        let Some(waiters) = lock(&self.waiting).remove(&sha_hex) else {
            let asked = lock(&self.waiting).keys().cloned().collect::<Vec<_>>();
            let code = if asked.is_empty() {
                ErrorCode::Unexpected
            } else {
                ErrorCode::ModuleMismatch
            };
            return Err(ErrorBody {
                id: None,
                code,
                message: format!("received {} bytes hashing to {sha_hex}, which no run asked for (waiting for {asked:?})", bytes.len()),
            });
        };
        let bytes = Arc::new(bytes);
        for w in waiters {
            let _ = w.send(bytes.clone());
        }
        Ok(())
    }
}

impl Agent {
    /// The module `sha_hex`, verified against `signature` and compiled: from the caches (a
    /// warm run reads no bytes and verifies nothing again), else from the store or the
    /// platform, checked and compiled off the async threads, and kept in the store when it
    /// passed. `request_id` names the request a `need_module` answers.
    pub(super) async fn prepare(
        &self,
        request_id: &str,
        sha_hex: &str,
        signature: Option<&str>,
    ) -> Result<Prepared, Refusal> {
        let sha = parse_sha(sha_hex).ok_or(Refusal::BadModuleHash)?;
        let detached = decode_signature(signature)?;
        if let Some(prepared) = self.trust.cached(&self.sandbox, &sha, detached.as_deref()) {
            return Ok(prepared);
        }
        let bytes = self.module_bytes(request_id, &sha).await?;
        let (trust, sandbox) = (self.trust.clone(), self.sandbox.clone());
        let store = self.modules.path(&hex::encode(sha));
        let dir = self.modules.dir.clone();
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let prepared = trust
                .prepare(&sandbox, &bytes, detached.as_deref())
                .map_err(Refusal::Module)?;
            // Only modules that passed the trust policy and compiled are kept on disk.
            if !store.exists() {
                let stored = tempfile::NamedTempFile::new_in(&dir)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).map(|_| f))
                    .and_then(|f| f.persist(&store).map_err(|e| e.error));
                match stored {
                    Ok(_) => {
                        let installed: std::collections::HashSet<String> = journal
                            .handlers()
                            .into_iter()
                            .map(|h| format!("{}.wasm", h.file_sha256))
                            .collect();
                        prune_store(&dir, MODULE_STORE_BYTES, &installed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not store the module; it will be fetched again next time")
                    }
                }
            }
            Ok(prepared)
        })
        .await
        .unwrap_or_else(|e| Err(Refusal::PreparationFailed(e.to_string())))
    }

    /// The module's bytes from the store, or from the platform (`need_module`).
    async fn module_bytes(
        &self,
        request_id: &str,
        sha: &[u8; 32],
    ) -> Result<Arc<Vec<u8>>, Refusal> {
        let sha_hex = hex::encode(sha);
        let stored = self.modules.path(&sha_hex);
        if let Ok(bytes) = std::fs::read(&stored) {
            if Sha256::digest(&bytes).as_slice() == sha {
                return Ok(Arc::new(bytes));
            }
            tracing::warn!(module = %sha_hex, "a stored module does not match its hash; fetching it again");
            let _ = std::fs::remove_file(&stored);
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.modules.waiting)
            .entry(sha_hex.clone())
            .or_default()
            .push(tx);
        let ask = AgentMessage::NeedModule {
            id: request_id.to_string(),
            file_sha256: sha_hex.clone(),
        };
        self.outbox.send(ask).await;
        let wait = self.modules.wait;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(bytes)) => Ok(bytes),
            _ => {
                let mut waiting = lock(&self.modules.waiting);
                if let Some(list) = waiting.get_mut(&sha_hex) {
                    list.retain(|s| !s.is_closed());
                    if list.is_empty() {
                        waiting.remove(&sha_hex);
                    }
                }
                Err(Refusal::ModuleUnavailable {
                    sha256: sha_hex,
                    waited: wait,
                })
            }
        }
    }
}

/// The module store's size bound: beyond it, the least recently stored modules that no
/// installed handler uses are removed (the platform sends them again if a task needs them).
const MODULE_STORE_BYTES: u64 = 256 << 20;

/// Removes the oldest `*.wasm` files of `dir` not named in `keep` until the total is at most
/// `limit` bytes. Returns how many were removed.
fn prune_store(
    dir: &std::path::Path,
    limit: u64,
    keep: &std::collections::HashSet<String>,
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf, bool)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".wasm") {
                return None;
            }
            let meta = e.metadata().ok()?;
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            Some((mtime, meta.len(), e.path(), keep.contains(&name)))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= limit {
        return 0;
    }
    files.sort_by_key(|f| f.0);
    let mut removed = 0;
    for (_, len, path, kept) in files {
        if total <= limit {
            break;
        }
        if kept {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            removed += 1;
            tracing::info!(module = %path.display(), "module store over its bound: removed the oldest unused module");
        }
    }
    removed
}

/// The 32 bytes of a SHA-256 given in hex.
pub(super) fn parse_sha(hex_text: &str) -> Option<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
}

/// A detached signature, given in base64.
pub(super) fn decode_signature(signature: Option<&str>) -> Result<Option<Vec<u8>>, Refusal> {
    match signature.map(|s| base64::engine::general_purpose::STANDARD.decode(s)) {
        None => Ok(None),
        Some(Ok(bytes)) => Ok(Some(bytes)),
        Some(Err(e)) => Err(Refusal::MalformedSignature(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_store_drops_the_oldest_unused_modules_first() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, secs: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        write("a.wasm", 1); // oldest, but installed
        write("b.wasm", 2);
        write("c.wasm", 3);
        write("d.wasm", 4);
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 1000]).unwrap();
        let keep = ["a.wasm".to_string()].into_iter().collect();
        assert_eq!(prune_store(dir.path(), 250, &keep), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.wasm", "d.wasm", "notes.txt"]);
        assert_eq!(prune_store(dir.path(), 250, &keep), 0);
    }
}
