//! The update files in the agent's state directory (`STATE/update/`), as the launcher reads and
//! writes them. The directory is the service user's: every access goes through [`Dir`] (no
//! symbolic link followed, reads bounded, regular files only), and what root writes there is
//! handed to the directory's owner.

use std::io;
use std::path::Path;

use anyhow::{Context, Result};

use super::dir::{Dir, Owner};
use super::files::{Outcome, Verdict};
use super::{CONFIRMED, OUTCOME, STAGED_DIR, UPDATE_DIR, VERDICT};

/// The largest `confirmed` read (a version and a line end).
const MAX_CONFIRMED_BYTES: u64 = 256;
/// The largest JSON file read (verdict, request).
pub(crate) const MAX_JSON_BYTES: u64 = 64 * 1024;

/// The agent's state directory, opened.
#[derive(Debug)]
pub struct AgentState {
    /// `None` when the directory does not exist (yet): nothing staged, nothing confirmed.
    state: Option<Dir>,
    /// Who files written here must belong to (root hands them to the directory's owner).
    owner: Option<Owner>,
}

impl AgentState {
    /// Opens the state directory at `path` (a missing one is empty: the agent has not
    /// started yet).
    pub fn open(path: &Path) -> Result<AgentState> {
        let state = match Dir::open(path) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("opening the agent's state directory {}", path.display())
                })
            }
        };
        let owner = match &state {
            Some(s) if crate::owner::euid() == 0 => Some(s.owner()?),
            _ => None,
        };
        Ok(AgentState { state, owner })
    }

    /// `STATE/update/`, if it exists.
    pub fn update(&self) -> io::Result<Option<Dir>> {
        match &self.state {
            Some(s) => s.subdir(UPDATE_DIR),
            None => Ok(None),
        }
    }

    /// `STATE/update/`, created (the owner's, 0700) when missing.
    pub fn update_or_create(&self) -> io::Result<Dir> {
        match &self.state {
            Some(s) => s.subdir_or_create(UPDATE_DIR, self.owner),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the agent's state directory does not exist",
            )),
        }
    }

    /// `STATE/update/NAME`, read up to `max` bytes; `None` when it is missing or cannot be
    /// read (logged).
    fn read(&self, name: &str, max: u64) -> Option<Vec<u8>> {
        self.update()
            .and_then(|u| match u {
                Some(u) => u.read(name, max),
                None => Ok(None),
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot read {UPDATE_DIR}/{name}"))
            .ok()
            .flatten()
    }

    /// `STATE/update/NAME` parsed as JSON; `None` when it is missing or cannot be read
    /// (logged).
    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Option<serde_json::Result<T>> {
        let bytes = self.read(name, MAX_JSON_BYTES)?;
        Some(serde_json::from_slice(&bytes))
    }

    /// The version in `STATE/update/confirmed`, if any (an unreadable file counts as none).
    pub fn confirmed(&self) -> Option<String> {
        let text = String::from_utf8(self.read(CONFIRMED, MAX_CONFIRMED_BYTES)?).ok()?;
        Some(text.trim_end_matches('\n').to_string())
    }

    /// Whether `STATE/update/confirmed` holds `version`.
    pub fn is_confirmed(&self, version: &str) -> bool {
        self.confirmed().as_deref() == Some(version)
    }

    /// Writes `STATE/update/confirmed` whole: `version` confirmed.
    pub fn write_confirmed(&self, version: &str) -> Result<()> {
        self.update_or_create()
            .and_then(|u| {
                u.write(
                    CONFIRMED,
                    format!("{version}\n").as_bytes(),
                    0o600,
                    self.owner,
                )
            })
            .with_context(|| {
                format!("writing {UPDATE_DIR}/{CONFIRMED} in the agent's state directory")
            })
    }

    /// The verdict `launcher run` recorded, if any (an unreadable one counts as none).
    pub fn verdict(&self) -> Option<Verdict> {
        self.read_json(VERDICT)?
            .map_err(|e| tracing::warn!(error = %e, "cannot parse {UPDATE_DIR}/{VERDICT}"))
            .ok()
    }

    /// The update's verdict the agent reports until the platform acknowledges it: `None` when
    /// there is none (an unreadable one counts as none), `Some(Err)` when it does not parse.
    pub fn outcome(&self) -> Option<serde_json::Result<Outcome>> {
        self.read_json(OUTCOME)
    }

    /// Writes `STATE/update/verdict` whole.
    pub fn write_verdict(&self, verdict: &Verdict) -> Result<()> {
        self.write_json(VERDICT, verdict)
    }

    /// Writes `STATE/update/outcome.json` whole (the owner's, 0600).
    pub fn write_outcome(&self, outcome: &Outcome) -> Result<()> {
        self.write_json(OUTCOME, outcome)
    }

    fn write_json(&self, name: &str, value: &impl serde::Serialize) -> Result<()> {
        let mut json = serde_json::to_vec(value)?;
        json.push(b'\n');
        self.update_or_create()
            .and_then(|u| u.write(name, &json, 0o600, self.owner))
            .with_context(|| format!("writing {UPDATE_DIR}/{name} in the agent's state directory"))
    }

    /// Removes `STATE/update/NAME` (a file, or a directory with everything below it).
    pub fn remove(&self, name: &str) -> Result<()> {
        if let Some(u) = self.update()? {
            u.remove_tree(name)
                .and_then(|()| u.sync())
                .with_context(|| {
                    format!("removing {UPDATE_DIR}/{name} in the agent's state directory")
                })?;
        }
        Ok(())
    }

    /// `STATE/update/staged/`, if it exists.
    pub fn staged(&self) -> io::Result<Option<Dir>> {
        match self.update()? {
            Some(u) => u.subdir(STAGED_DIR),
            None => Ok(None),
        }
    }

    /// Whether anything is at `STATE/update/staged` (a directory or not).
    pub fn has_staged(&self) -> io::Result<bool> {
        match self.update()? {
            Some(u) => u.exists(STAGED_DIR),
            None => Ok(false),
        }
    }
}
