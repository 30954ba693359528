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
    /// A record that would take a file past this many bytes starts a new one (default 8 MiB).
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

#[cfg(test)]
mod tests {
    use crate::config::AgentConfig;

    #[test]
    fn audit_settings_are_checked_at_their_bounds() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(
            c.audit.config().unwrap(),
            crate::audit::AuditConfig::default()
        );
        let c = AgentConfig::parse("[audit]\nmax_file_bytes = 1024\nmax_files = 1\nlog = true\n")
            .unwrap();
        let a = c.audit.config().unwrap();
        assert_eq!((a.max_file_bytes, a.max_files, a.log), (1024, 1, true));
        for bad in [
            "max_file_bytes = 1023",
            "max_file_bytes = 1073741825",
            "max_files = 0",
            "max_files = 1025",
        ] {
            let c = AgentConfig::parse(&format!("[audit]\n{bad}\n")).unwrap();
            assert!(c.audit.config().is_err(), "{bad}");
        }
        assert!(AgentConfig::parse("[audit]\nmax_bytes = 1\n").is_err());
    }
}
