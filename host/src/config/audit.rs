//! `[audit]`: the audit files' rotation and logging (see `crate::audit`).

use anyhow::Result;
use serde::Deserialize;

use crate::audit::AuditConfig;

/// The smallest `max_file_bytes` accepted: a few records.
pub const MIN_FILE_BYTES: u64 = 1024;

/// `[audit]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// A file is rotated once it holds this many bytes (default 8 MiB).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// The most files kept (default 8), the oldest removed.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Each record is also logged at info under the target `bridge::audit`.
    #[serde(default)]
    pub log: bool,
}

fn default_max_file_bytes() -> u64 {
    AuditConfig::default().max_file_bytes
}

fn default_max_files() -> usize {
    AuditConfig::default().max_files
}

impl Default for AuditSection {
    fn default() -> AuditSection {
        AuditSection {
            max_file_bytes: default_max_file_bytes(),
            max_files: default_max_files(),
            log: false,
        }
    }
}

impl AuditSection {
    /// The settings, checked.
    pub fn config(&self) -> Result<AuditConfig> {
        let max = crate::audit::MAX_FILE_BYTES_LIMIT;
        anyhow::ensure!(
            (MIN_FILE_BYTES..=max).contains(&self.max_file_bytes),
            "audit.max_file_bytes {} must be between {MIN_FILE_BYTES} and {max}",
            self.max_file_bytes
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.max_files),
            "audit.max_files {} must be between 1 and 1024",
            self.max_files
        );
        Ok(AuditConfig {
            max_file_bytes: self.max_file_bytes,
            max_files: self.max_files,
            log: self.log,
        })
    }
}
