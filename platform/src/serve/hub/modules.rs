//! The module store: module bytes by SHA-256 (lowercase hex), uploaded by the control interface
//! and served to agents that ask (`need_module`). It only grows (this is a development server).

use std::collections::HashMap;
use std::sync::Mutex;

use bridge_protocol::MAX_BINARY_BYTES;
use sha2::{Digest as _, Sha256};
use tokio_tungstenite::tungstenite::Bytes;

use super::{lock, Hub, HubError};

/// Module bytes by SHA-256.
#[derive(Debug, Default)]
pub(super) struct ModuleStore {
    by_sha256: Mutex<HashMap<String, Bytes>>,
}

impl ModuleStore {
    /// Stores module bytes; returns their SHA-256 (hex).
    fn store(&self, bytes: Vec<u8>) -> String {
        let sha = hex::encode(Sha256::digest(&bytes));
        lock(&self.by_sha256)
            .entry(sha.clone())
            .or_insert_with(|| Bytes::from(bytes));
        sha
    }

    /// The bytes of the module with SHA-256 `sha256` (hex, any case).
    fn get(&self, sha256: &str) -> Option<Bytes> {
        lock(&self.by_sha256)
            .get(&sha256.to_ascii_lowercase())
            .cloned()
    }

    /// Stores `module` if given, else checks that `file_sha256` names a stored module; returns
    /// the module's SHA-256.
    pub(super) fn resolve(
        &self,
        module: Option<Vec<u8>>,
        file_sha256: Option<String>,
    ) -> Result<String, HubError> {
        match (module, file_sha256) {
            (Some(bytes), _) if bytes.len() > MAX_BINARY_BYTES => {
                Err(HubError::BadRequest(format!(
                    "the module is {} bytes; the limit is {}",
                    bytes.len(),
                    MAX_BINARY_BYTES
                )))
            }
            (Some(bytes), _) => Ok(self.store(bytes)),
            (None, Some(sha)) if self.get(&sha).is_some() => Ok(sha.to_ascii_lowercase()),
            (None, Some(sha)) => Err(HubError::BadRequest(format!(
                "no stored module {sha}: send its bytes in `module` once"
            ))),
            (None, None) => Err(HubError::BadRequest(
                "give `module` (base64) or `file_sha256`".into(),
            )),
        }
    }
}

impl Hub {
    /// The bytes of the module with SHA-256 `sha256` (hex, any case), for an agent's
    /// `need_module`.
    pub fn module(&self, sha256: &str) -> Option<Bytes> {
        self.modules.get(sha256)
    }
}
