//! The agent's periodic `status` report: its host, what it is doing, what it has done since it
//! started and what it holds, and the head of its audit chain. `bridge-daemon status` prints
//! the same facts locally.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::result::Status;

/// The longest `last_error` a status carries, in bytes (longer ones are cut on a character
/// boundary by the agent and refused by the codec).
pub const MAX_LAST_ERROR_BYTES: usize = 1024;

/// Facts about the agent's host, sent in `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// The host name.
    pub hostname: String,
    /// Operating system (`linux`…).
    pub os: String,
    /// CPU architecture (`x86_64`, `aarch64`…).
    pub arch: String,
    /// Seconds since the host booted.
    pub uptime_secs: u64,
    /// The 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
}

/// The agent's periodic report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// The agent's id (hex SHA-256 of its public key).
    pub agent_id: String,
    /// The agent's version.
    pub agent_version: String,
    /// Facts about its host.
    pub host: HostFacts,
    /// Task ids running now.
    pub running: Vec<String>,
    /// Seconds since the agent started.
    pub agent_uptime_secs: u64,
    /// What the agent is doing, has done since it started, and holds (absent from agents
    /// older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<AgentStats>,
    /// The head of the agent's audit chain (absent from agents older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditHead>,
}

impl StatusReport {
    /// Checks what the types cannot: `stats.link.last_error` is at most
    /// [`MAX_LAST_ERROR_BYTES`], and the audit head's hashes (`audit.hash`, `audit.at.hash`)
    /// are 64 lowercase hex. The error names the field. Run after decoding: a platform stores
    /// and compares these.
    pub fn check(&self) -> Result<(), String> {
        if let Some(error) = self
            .stats
            .as_ref()
            .and_then(|s| s.link.last_error.as_deref())
        {
            if error.len() > MAX_LAST_ERROR_BYTES {
                return Err(format!(
                    "`stats.link.last_error` is {} bytes; the limit is {MAX_LAST_ERROR_BYTES} bytes",
                    error.len()
                ));
            }
        }
        if let Some(audit) = &self.audit {
            if !is_sha256_hex(&audit.hash) {
                return Err("`audit.hash` is not 64 lowercase hex".into());
            }
            if let Some(hash) = audit.at.as_ref().and_then(|at| at.hash.as_deref()) {
                if !is_sha256_hex(hash) {
                    return Err("`audit.at.hash` is not 64 lowercase hex".into());
                }
            }
        }
        Ok(())
    }
}

/// Whether `text` is a SHA-256 as the protocol writes it: exactly 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What the agent is doing, has done since it started, and holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentStats {
    /// The platform connection.
    pub link: LinkStats,
    /// Tasks now and since the agent started.
    pub tasks: TaskStats,
    /// The task journal.
    pub journal: JournalStats,
    /// The module store and the compiled-module cache.
    pub store: StoreStats,
    /// The agent process's resident memory, in bytes.
    pub rss_bytes: u64,
}

/// The platform connection, as the agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkStats {
    /// Whether the agent is connected (handshake done) now.
    pub connected: bool,
    /// Since when (Unix time, milliseconds) it has been connected, or disconnected; `null`
    /// before the first attempt ended.
    pub since_unix_ms: Option<u64>,
    /// The round trip of the last answered heartbeat (WebSocket ping to pong), in
    /// milliseconds; `null` before the first.
    pub heartbeat_rtt_ms: Option<f64>,
    /// Connections established since the agent started, after the first.
    pub reconnects: u64,
    /// Why the last connection or attempt ended (at most 1024 bytes); `null` if none has.
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
}

/// Tasks now and since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskStats {
    /// Tasks running now.
    pub running: u64,
    /// Tasks accepted and waiting for a slot.
    pub queued: u64,
    /// Results recorded and not yet acknowledged by the platform.
    pub unacked: u64,
    /// Tasks that ended since the agent started, by final status (statuses with none are
    /// absent). Refusals the agent does not record count under `rejected` too.
    #[schemars(schema_with = "finished_schema")]
    pub finished: BTreeMap<Status, u64>,
}

/// The schema of `finished`: an object whose keys are statuses and whose values are counts.
fn finished_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let statuses = generator.subschema_for::<Status>();
    schemars::json_schema!({
        "type": "object",
        "propertyNames": statuses,
        "additionalProperties": { "type": "integer", "minimum": 0 }
    })
}

/// The task journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JournalStats {
    /// The journal file's size, in bytes.
    pub bytes: u64,
    /// Task records it holds.
    pub records: u64,
}

/// The module store and the compiled-module cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreStats {
    /// Module files kept in the store.
    pub modules: u64,
    /// Their size, in bytes.
    pub module_bytes: u64,
    /// Compiled artifacts kept on disk.
    pub compiled: u64,
    /// Their size, in bytes.
    pub compiled_bytes: u64,
}

/// The head of the agent's audit chain: the last record made durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// The last record's sequence number (the first record is 1; 0: none yet).
    pub seq: u64,
    /// SHA-256 (hex) of the last record's line (64 zeros when there is none).
    #[schemars(length(min = 64, max = 64))]
    pub hash: String,
    /// The agent's answer to the `audit_seq` of this connection's `welcome`: the hash of its
    /// record of that sequence number as the chain now holds it. Absent when the `welcome`
    /// named none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<AuditAt>,
}

/// The hash of one record of the audit chain, as the agent now holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditAt {
    /// The record's sequence number (the `welcome`'s `audit_seq`).
    pub seq: u64,
    /// SHA-256 (hex) of that record's line; `null` when the agent no longer has it (its file
    /// was rotated away) or never had it.
    #[schemars(length(min = 64, max = 64))]
    pub hash: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(last_error: Option<String>, audit: Option<AuditHead>) -> StatusReport {
        let mut stats = AgentStats::default();
        stats.link.last_error = last_error;
        StatusReport {
            agent_id: "a".into(),
            agent_version: "0.1.0".into(),
            host: HostFacts::default(),
            running: vec![],
            agent_uptime_secs: 1,
            stats: Some(stats),
            audit,
        }
    }

    fn head(hash: &str, at: Option<Option<&str>>) -> Option<AuditHead> {
        Some(AuditHead {
            seq: 3,
            hash: hash.into(),
            at: at.map(|hash| AuditAt {
                seq: 2,
                hash: hash.map(str::to_string),
            }),
        })
    }

    #[test]
    fn last_error_is_checked_up_to_its_limit() {
        let at_limit = "é".repeat(MAX_LAST_ERROR_BYTES / 2);
        assert_eq!(report(Some(at_limit), None).check(), Ok(()));
        let over = "x".repeat(MAX_LAST_ERROR_BYTES + 1);
        let err = report(Some(over), None).check().unwrap_err();
        assert!(err.contains("last_error"), "{err}");
    }

    #[test]
    fn audit_hashes_are_64_lowercase_hex() {
        let good = "0a".repeat(32);
        assert_eq!(report(None, head(&good, Some(Some(&good)))).check(), Ok(()));
        assert_eq!(report(None, head(&good, Some(None))).check(), Ok(()));
        for bad in [
            "0A".repeat(32),
            "0a".repeat(31),
            "0a".repeat(33),
            "zz".repeat(32),
        ] {
            let err = report(None, head(&bad, None)).check().unwrap_err();
            assert!(err.contains("`audit.hash`"), "{err}");
            let err = report(None, head(&good, Some(Some(&bad))))
                .check()
                .unwrap_err();
            assert!(err.contains("`audit.at.hash`"), "{err}");
        }
    }
}
