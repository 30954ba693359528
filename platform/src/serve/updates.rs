//! The updates this platform sent to agents and what came of them, one file per update in the
//! state directory (`updates/ID.json`), so a verdict the agent reports after a restart of
//! either side finds its update.
//!
//! Guarantees:
//!
//! * An update's record is written (and synced) before the `update` message is sent, so every
//!   update id an agent can report on was recorded here first. Ids are
//!   `update-` + 16 lowercase hex ([`new_id`]); only such ids ever name a file.
//! * A verdict (`succeeded`, `failed`) is written and synced ([`UpdateStore::record`]) before
//!   the platform acknowledges it (`update_ack`); it is stored once: a verdict repeated after
//!   a reconnect finds the record complete and changes nothing. A `refused` answer is kept
//!   too (nothing to acknowledge), unless a verdict is already there.
//! * Only the agent the update was sent to can complete its record; statuses for ids this
//!   platform did not record are not stored.
//! * Bounded: a record file is read only up to [`MAX_RECORD_BYTES`]; what the agent reports is
//!   cut to [`MAX_DETAIL_BYTES`] (detail) and [`MAX_VERSION_BYTES`] (versions) before it is
//!   stored.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use bridge_protocol::{UpdateReason, UpdateState, UpdateStatus};
use bridge_signing::timefmt::format_rfc3339;
use serde::{Deserialize, Serialize};

use crate::files::{cut, write_state_json};
use crate::timearg::now_unix;

/// The directory, inside the state directory, of the update records.
pub const UPDATES_DIR: &str = "updates";
/// The largest record file read.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// The most bytes of an agent's `detail` stored.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// The most bytes of a version an agent reports stored.
pub const MAX_VERSION_BYTES: usize = 128;
/// The prefix of update ids.
pub const ID_PREFIX: &str = "update-";

/// One update as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRecord {
    /// The update id (the `update` message's `id`).
    pub id: String,
    /// The agent it was sent to.
    pub agent: String,
    /// The release's version (from its manifest).
    pub version: String,
    /// The release binary's SHA-256 (hex).
    pub sha256: String,
    /// When it was sent (RFC 3339, UTC).
    pub sent_at: String,
    /// How it ended, once the agent said: `refused`, or a verdict (`succeeded`, `failed`).
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// How an update ended, as the agent reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// `refused`, `succeeded` or `failed`.
    pub state: UpdateState,
    /// The agent's version when it reported this.
    pub agent_version: String,
    /// Why, for `refused` and `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<UpdateReason>,
    /// What happened, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the platform received it (RFC 3339, UTC).
    pub received_at: String,
}

impl Outcome {
    /// Whether this is a verdict (`succeeded` or `failed`), which the agent keeps sending until
    /// it is acknowledged.
    pub fn is_verdict(&self) -> bool {
        is_verdict(self.state)
    }
}

/// Whether `state` is a verdict: `succeeded` or `failed`.
pub fn is_verdict(state: UpdateState) -> bool {
    matches!(state, UpdateState::Succeeded | UpdateState::Failed)
}

/// What [`UpdateStore::record`] did with a status.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Stored now (the record as it is now).
    Stored(UpdateRecord),
    /// The record already had its verdict: nothing changed.
    Already(UpdateRecord),
    /// No record of this id for this agent: nothing stored.
    Unknown,
}

/// A fresh update id: `update-` and 16 lowercase hex.
pub fn new_id() -> String {
    use ring::rand::{SecureRandom as _, SystemRandom};
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    format!("{ID_PREFIX}{}", hex::encode(bytes))
}

/// Whether `id` has the form of the ids [`new_id`] makes (the only ones that name a file).
pub fn is_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX).is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The update records in `STATE/updates/`.
#[derive(Debug)]
pub struct UpdateStore {
    dir: PathBuf,
    /// Serializes read-modify-write of records.
    lock: Mutex<()>,
}

impl UpdateStore {
    /// Opens (creating if needed, mode 0700) `state_dir/updates`.
    pub fn open(state_dir: &Path) -> Result<UpdateStore> {
        let dir = state_dir.join(UPDATES_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the permissions of {}", dir.display()))?;
        Ok(UpdateStore {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a new update's record (synced), before its `update` is sent.
    pub fn create(&self, record: &UpdateRecord) -> Result<()> {
        anyhow::ensure!(is_id(&record.id), "not an update id: {:?}", record.id);
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        write_state_json(&self.dir, &record.id, record)
    }

    /// The record of update `id`, if there is one.
    pub fn get(&self, id: &str) -> Result<Option<UpdateRecord>> {
        if !is_id(id) {
            return Ok(None);
        }
        let path = self.path(id);
        let bytes = match crate::files::read_at_most(&path, MAX_RECORD_BYTES) {
            Ok(bytes) => bytes,
            Err(_) if !path.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        let record = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an update record", path.display()))?;
        Ok(Some(record))
    }

    /// Records what agent `agent` reports of an update (`refused`, `succeeded` or `failed`;
    /// `staged` is not stored); a verdict only once. `Err`: it could not be written (do not
    /// acknowledge it: the agent reports it again).
    pub fn record(&self, agent: &str, status: &UpdateStatus) -> Result<Recorded> {
        if status.state == UpdateState::Staged {
            return Ok(Recorded::Unknown);
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut record) = self.get(&status.id)? else {
            return Ok(Recorded::Unknown);
        };
        if record.agent != agent {
            return Ok(Recorded::Unknown);
        }
        let keep = match &record.outcome {
            None => false,
            Some(o) if o.is_verdict() => true,
            // A refusal is replaced only by a verdict.
            Some(_) => !is_verdict(status.state),
        };
        if keep {
            return Ok(Recorded::Already(record));
        }
        record.outcome = Some(Outcome {
            state: status.state,
            agent_version: cut(&status.agent_version, MAX_VERSION_BYTES),
            reason: status.reason,
            detail: status.detail.as_deref().map(|d| cut(d, MAX_DETAIL_BYTES)),
            received_at: format_rfc3339(now_unix()),
        });
        write_state_json(&self.dir, &record.id, &record)?;
        Ok(Recorded::Stored(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, state: UpdateState) -> UpdateStatus {
        UpdateStatus {
            id: id.to_string(),
            state,
            version: "0.2.0".into(),
            agent_version: "0.2.0".into(),
            reason: None,
            detail: Some("é".repeat(1000)),
        }
    }

    /// A store in a new directory, holding one update sent to agent-a (no verdict yet).
    fn store_with_one_update() -> (tempfile::TempDir, UpdateStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = UpdateStore::open(dir.path()).unwrap();
        let id = new_id();
        store.create(&record(&id)).unwrap();
        (dir, store, id)
    }

    fn record(id: &str) -> UpdateRecord {
        UpdateRecord {
            id: id.to_string(),
            agent: "agent-a".into(),
            version: "0.2.0".into(),
            sha256: "ab".repeat(32),
            sent_at: format_rfc3339(now_unix()),
            outcome: None,
        }
    }

    #[test]
    fn ids_name_files_only_in_their_own_form() {
        let id = new_id();
        assert!(is_id(&id), "{id}");
        for bad in [
            "update-",
            "update-0123456789abcdeF",
            "update-0123456789abcde",
            "update-../../etc/passw",
            "x-0123456789abcdef",
        ] {
            assert!(!is_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_verdict_is_stored_once_and_only_for_the_agent_updated() {
        let (dir, store, id) = store_with_one_update();
        assert_eq!(
            store
                .record("agent-b", &status(&id, UpdateState::Succeeded))
                .unwrap(),
            Recorded::Unknown
        );
        assert_eq!(
            store
                .record("agent-a", &status(&new_id(), UpdateState::Succeeded))
                .unwrap(),
            Recorded::Unknown
        );
        // Progress is not stored.
        assert_eq!(
            store
                .record("agent-a", &status(&id, UpdateState::Staged))
                .unwrap(),
            Recorded::Unknown
        );
        let Recorded::Stored(stored) = store
            .record("agent-a", &status(&id, UpdateState::Succeeded))
            .unwrap()
        else {
            panic!("not stored")
        };
        let outcome = stored.outcome.clone().unwrap();
        assert_eq!(outcome.state, UpdateState::Succeeded);
        assert_eq!(outcome.detail.unwrap().len(), MAX_DETAIL_BYTES);
        // Repeated (after a reconnect), or contradicted: the first verdict stays.
        for again in [UpdateState::Succeeded, UpdateState::Failed] {
            assert_eq!(
                store.record("agent-a", &status(&id, again)).unwrap(),
                Recorded::Already(stored.clone())
            );
        }
        assert_eq!(store.get(&id).unwrap(), Some(stored));
        // Read back by a new store (a restarted platform).
        let reopened = UpdateStore::open(dir.path()).unwrap();
        assert_eq!(
            reopened.get(&id).unwrap().unwrap().outcome.unwrap().state,
            UpdateState::Succeeded
        );
        assert_eq!(reopened.get("update-../x").unwrap(), None);
    }

    #[test]
    fn a_refusal_gives_way_to_a_verdict_only() {
        let (_dir, store, id) = store_with_one_update();
        let refused = store
            .record("agent-a", &status(&id, UpdateState::Refused))
            .unwrap();
        assert!(matches!(refused, Recorded::Stored(_)));
        assert!(matches!(
            store
                .record("agent-a", &status(&id, UpdateState::Refused))
                .unwrap(),
            Recorded::Already(_)
        ));
        assert!(matches!(
            store
                .record("agent-a", &status(&id, UpdateState::Failed))
                .unwrap(),
            Recorded::Stored(_)
        ));
    }
}
