//! What the platform saw of each agent's audit chain, one file per agent in the state directory
//! (`audit/<agent id>.json`), and the flag raised when the chain on the machine was rewritten
//! (docs/protocol.md, "The audit chain").
//!
//! Each `status` that carries `audit` is judged against what is stored ([`judge`]):
//! **backwards** when `audit.seq` is lower than the stored latest seq; **fork** when a hash given
//! for a seq the history holds differs from the stored one (`audit.hash` at the same seq, or
//! `audit.at.hash`); **unverifiable** when `audit.at.hash` is `null`. Then the head is stored:
//! the latest `{seq, hash}` and a history of the last [`HISTORY`] pairs, which follows the chain
//! the agent reports now (pairs past a lower head are dropped, a differing hash replaces the
//! stored one), so that once an operator clears a flag the same rewrite is not flagged again.
//!
//! Guarantees:
//!
//! * The first flag sticks: later statuses update the head and history, never the flag; only
//!   [`AuditStore::clear`] removes it.
//! * A state that changes is written (and synced) before the status is taken as judged:
//!   temporary file, sync, rename, sync the directory. A flag therefore survives a restart.
//! * Only agent ids of the form the platform derives (64 lowercase hex) name a file.
//! * Bounded: a file is read only up to [`MAX_FILE_BYTES`], and one that is larger, does not
//!   parse, holds more than [`HISTORY`] pairs or hashes that are not 64 lowercase hex is an
//!   error (reported, never a crash, never overwritten by a new status).
//!
//! What this cannot see: records rewritten between two statuses, before the platform saw them.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};
use bridge_protocol::status::is_sha256_hex;
use bridge_protocol::AuditHead;
use bridge_signing::timefmt::format_rfc3339;
use serde::{Deserialize, Serialize};

use crate::files::{cut, write_state_json};
use crate::timearg::now_unix;

/// The directory, inside the state directory, of the audit states.
pub const AUDIT_DIR: &str = "audit";
/// How many `(seq, hash)` pairs are kept per agent.
pub const HISTORY: usize = 64;
/// The largest state file read (64 pairs and a flag take about 10 KiB).
pub const MAX_FILE_BYTES: u64 = 32 * 1024;
/// The most bytes of a flag's detail stored.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// One `(seq, hash)` of an agent's audit chain, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqHash {
    /// The record's sequence number.
    pub seq: u64,
    /// SHA-256 (hex) of the record's line.
    pub hash: String,
}

/// Why an agent's chain is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// The head's seq went below one the platform stored.
    Backwards,
    /// A hash given for a stored seq differs from the stored one.
    Fork,
    /// The agent no longer has the record the platform asked about (`audit.at.hash` null).
    Unverifiable,
}

impl FlagKind {
    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            FlagKind::Backwards => "backwards",
            FlagKind::Fork => "fork",
            FlagKind::Unverifiable => "unverifiable",
        }
    }
}

/// A flag on an agent's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    /// Why.
    pub kind: FlagKind,
    /// What was seen, for people.
    pub detail: String,
    /// The sequence number concerned.
    pub seq: u64,
    /// When it was raised (RFC 3339, UTC).
    pub flagged_at: String,
}

/// What the platform stores of one agent's chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditState {
    /// The head of the last status that carried one.
    pub latest: Option<SeqHash>,
    /// The last [`HISTORY`] pairs seen, by increasing seq (the latest among them).
    pub history: Vec<SeqHash>,
    /// The flag, until an operator clears it.
    pub flag: Option<Flag>,
}

/// An agent's chain as `bridgectl agents` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditView {
    /// The latest seq stored.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// The flag, or `null`.
    pub flag: Option<Flag>,
}

impl AuditState {
    /// The stored hash of `seq`, if the history holds it.
    fn hash_of(&self, seq: u64) -> Option<&str> {
        self.history
            .iter()
            .find(|p| p.seq == seq)
            .map(|p| p.hash.as_str())
    }

    /// Sets `seq`'s hash in the history (replacing a different one), in seq order.
    fn put(&mut self, seq: u64, hash: &str) {
        match self.history.binary_search_by_key(&seq, |p| p.seq) {
            Ok(i) => self.history[i].hash = hash.to_string(),
            Err(i) => self.history.insert(
                i,
                SeqHash {
                    seq,
                    hash: hash.to_string(),
                },
            ),
        }
    }

    /// Takes in a head (already judged): it becomes the latest, and the history follows the
    /// chain it belongs to.
    fn take(&mut self, head: &AuditHead) {
        self.history.retain(|p| p.seq <= head.seq);
        if let Some(at) = &head.at {
            if let Some(hash) = at.hash.as_deref().filter(|_| at.seq <= head.seq) {
                self.put(at.seq, hash);
            }
        }
        self.put(head.seq, &head.hash);
        let excess = self.history.len().saturating_sub(HISTORY);
        self.history.drain(..excess);
        self.latest = Some(SeqHash {
            seq: head.seq,
            hash: head.hash.clone(),
        });
    }

    /// Checks a state read from a file.
    fn check(&self) -> Result<()> {
        if self.history.len() > HISTORY {
            bail!("holds {} pairs; at most {HISTORY}", self.history.len());
        }
        let pairs = self.latest.iter().chain(&self.history);
        if let Some(bad) = pairs.into_iter().find(|p| !is_sha256_hex(&p.hash)) {
            bail!("seq {}: the hash is not 64 lowercase hex", bad.seq);
        }
        if self.history.windows(2).any(|w| w[0].seq >= w[1].seq) {
            bail!("the history is not in increasing seq order");
        }
        Ok(())
    }
}

/// Judges a head against what is stored: the flag it raises (kind, seq, detail), if any.
pub fn judge(stored: &AuditState, head: &AuditHead) -> Option<(FlagKind, u64, String)> {
    if let Some(at) = head.at.as_ref().filter(|at| at.seq > 0) {
        match at.hash.as_deref() {
            None => {
                return Some((
                    FlagKind::Unverifiable,
                    at.seq,
                    format!(
                        "the agent no longer has record {}, whose hash was stored",
                        at.seq
                    ),
                ))
            }
            Some(hash) => {
                if let Some(before) = stored.hash_of(at.seq).filter(|&h| h != hash) {
                    return Some((
                        FlagKind::Fork,
                        at.seq,
                        format!("record {} has hash {hash}; {before} was stored", at.seq),
                    ));
                }
            }
        }
    }
    if let Some(latest) = stored.latest.as_ref().filter(|l| head.seq < l.seq) {
        return Some((
            FlagKind::Backwards,
            head.seq,
            format!(
                "the head is at seq {}; seq {} was stored",
                head.seq, latest.seq
            ),
        ));
    }
    if let Some(before) = stored.hash_of(head.seq).filter(|&h| h != head.hash) {
        return Some((
            FlagKind::Fork,
            head.seq,
            format!(
                "the head, record {}, has hash {}; {before} was stored",
                head.seq, head.hash
            ),
        ));
    }
    None
}

/// Whether `id` has the form of the agent ids the platform derives (64 lowercase hex): the
/// only ones that name a file.
pub fn is_agent_id(id: &str) -> bool {
    is_sha256_hex(id)
}

/// The agents' audit states in `STATE/audit/`.
#[derive(Debug)]
pub struct AuditStore {
    dir: PathBuf,
    /// Serializes read-modify-write of states.
    lock: Mutex<()>,
}

impl AuditStore {
    /// Opens (creating if needed, mode 0700) `state_dir/audit`.
    pub fn open(state_dir: &Path) -> Result<AuditStore> {
        let dir = state_dir.join(AUDIT_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the permissions of {}", dir.display()))?;
        Ok(AuditStore {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn path(&self, agent: &str) -> PathBuf {
        self.dir.join(format!("{agent}.json"))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is stored for `agent` (the default state when nothing is).
    pub fn get(&self, agent: &str) -> Result<AuditState> {
        if !is_agent_id(agent) {
            bail!("not an agent id: {agent:?}");
        }
        let path = self.path(agent);
        let bytes = match crate::files::read_at_most(&path, MAX_FILE_BYTES) {
            Ok(bytes) => bytes,
            Err(_) if !path.exists() => return Ok(AuditState::default()),
            Err(e) => return Err(e),
        };
        let state: AuditState = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an audit state", path.display()))?;
        state
            .check()
            .with_context(|| format!("{} is not an audit state", path.display()))?;
        Ok(state)
    }

    /// The latest seq stored for `agent`, for `welcome.audit_seq`: none when nothing is stored,
    /// when it is 0 (no record to ask about), or when the state cannot be read.
    pub fn audit_seq(&self, agent: &str) -> Option<u64> {
        match self.get(agent) {
            Ok(state) => state.latest.map(|l| l.seq).filter(|&seq| seq > 0),
            Err(e) => {
                tracing::error!(agent_id = agent, "cannot read the audit state: {e:#}");
                None
            }
        }
    }

    /// Judges and stores the head of a status from `agent`; returns the flag raised now, if
    /// any (the caller logs it). An unreadable state is an error and is left as it is.
    pub fn observe(&self, agent: &str, head: &AuditHead) -> Result<Option<Flag>> {
        let _guard = self.guard();
        let mut state = self.get(agent)?;
        let before = state.clone();
        let mut raised = None;
        if let Some((kind, seq, detail)) = judge(&state, head) {
            if state.flag.is_none() {
                let flag = Flag {
                    kind,
                    detail: cut(&detail, MAX_DETAIL_BYTES),
                    seq,
                    flagged_at: format_rfc3339(now_unix()),
                };
                state.flag = Some(flag.clone());
                raised = Some(flag);
            }
        }
        state.take(head);
        if state != before {
            write_state_json(&self.dir, agent, &state)?;
        }
        Ok(raised)
    }

    /// Clears `agent`'s flag; returns the flag cleared (none if there was none).
    pub fn clear(&self, agent: &str) -> Result<Option<Flag>> {
        let _guard = self.guard();
        let mut state = self.get(agent)?;
        let cleared = state.flag.take();
        if cleared.is_some() {
            write_state_json(&self.dir, agent, &state)?;
        }
        Ok(cleared)
    }

    /// `agent`'s chain as listed, `None` when nothing is stored.
    pub fn view(&self, agent: &str) -> Result<Option<AuditView>> {
        let state = self.get(agent)?;
        Ok(state.latest.map(|latest| AuditView {
            seq: latest.seq,
            hash: latest.hash,
            flag: state.flag,
        }))
    }
}

#[cfg(test)]
mod tests;
