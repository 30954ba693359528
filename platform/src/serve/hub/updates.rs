//! Updating an agent: the release in memory, the `update` sent, the agent's `need_release`
//! ranges answered from it, and its `update_status` up to the verdict.
//!
//! Guarantees:
//!
//! * A release is held in memory once ([`Release`], shared by every update of it in progress,
//!   e.g. a rollout's), at most [`MAX_BINARY`](crate::release::MAX_BINARY) bytes, and only
//!   while an update of it may still fetch it: until its agent reports `staged` or `refused`,
//!   or the update's wait ends.
//! * `update` goes to version-2 connections only, one update per agent at a time; its record
//!   is on disk ([`UpdateStore`](crate::serve::updates::UpdateStore)) before it is sent.
//! * A `need_release` is answered with one binary frame of exactly the bytes asked for, or an
//!   `error` with the update's id: `not_found` for an update id this agent is not fetching,
//!   `unexpected` for a range that is empty, larger than [`MAX_BINARY_BYTES`] or past the end
//!   of the binary.
//! * A verdict is stored before it is acknowledged ([`Hub::on_update_status`] says when to send
//!   `update_ack`); a verdict the platform cannot store is not acknowledged (the agent sends it
//!   again on its next connection).
//! * The wait for an update's verdict survives reconnections of the agent (it restarts to
//!   switch versions): it ends with `refused`, a verdict, or its time limit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Result;
use bridge_protocol::codec::encode;
use bridge_protocol::{
    ErrorCode, PlatformMessage, UpdateReason, UpdateState, UpdateStatus, MAX_BINARY_BYTES,
};
use bridge_signing::release::SignedManifest;
use bridge_signing::timefmt::format_rfc3339;
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Bytes;

use super::{lock, Hub, HubError, Outbound};
use crate::serve::updates::{is_verdict, new_id, Recorded, UpdateRecord};
use crate::timearg::now_unix;

/// A release: its signed manifest and what the agent fetches (checked against it): the
/// binary (format 1) or its gzip archive (format 2).
#[derive(Debug)]
pub struct Release {
    /// The manifest, as read (not verified here: the agent does that).
    pub manifest: SignedManifest,
    /// The bytes `need_release` ranges are answered from: the binary's, or the archive's.
    pub bytes: Bytes,
}

impl Release {
    /// Reads the manifest at `manifest` and the binary at `binary`, which must be the one it
    /// describes (size and SHA-256); for a format-2 manifest, also the archive beside the
    /// binary (`BINARY.gz`), which must be the manifest's and unpack to the binary: that is
    /// what the agent fetches. Blocking file I/O.
    pub fn load(manifest: &Path, binary: &Path) -> Result<Release> {
        let signed = crate::release::read_manifest(manifest)?;
        let m = signed.manifest();
        let bytes = crate::release::read_binary(m, binary)?;
        let bytes = if m.archive.is_some() {
            let path = crate::release::archive_path(binary);
            let archive = crate::release::read_archive(m, &path)?;
            if !crate::release::gunzip_matches(m, &archive) {
                anyhow::bail!(
                    "{} does not unpack to {}, the binary the manifest describes",
                    path.display(),
                    binary.display()
                );
            }
            archive
        } else {
            bytes
        };
        Ok(Release {
            manifest: signed,
            bytes: Bytes::from(bytes),
        })
    }

    /// The release's version.
    pub fn version(&self) -> &str {
        &self.manifest.manifest().version
    }
}

/// What to update, and how long to wait for the verdict.
#[derive(Debug, Clone)]
pub struct UpdateOrder {
    /// The agent id.
    pub agent: String,
    /// The release.
    pub release: Arc<Release>,
    /// Allow a release older than the agent's version (the agent's config must allow it too).
    pub allow_downgrade: bool,
    /// How long the agent lets running tasks finish (default: its config's).
    pub drain_timeout_ms: Option<u64>,
    /// How long to wait for the verdict.
    pub wait: Duration,
}

/// How an update ended, as far as the platform saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The agent refused it; nothing changed on its machine.
    Refused,
    /// The new version started and confirmed.
    Succeeded,
    /// The new version did not confirm; the previous one runs again.
    Failed,
    /// No verdict within the wait.
    Timeout,
}

/// What an update came to (the `update` control request's answer).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdateOutcome {
    /// The update id.
    pub id: String,
    /// The agent.
    pub agent: String,
    /// The release's version.
    pub version: String,
    /// How it ended.
    pub state: Ending,
    /// Whether the agent reported the release staged.
    pub staged: bool,
    /// Why (the agent's reason), for `refused` and `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<UpdateReason>,
    /// What happened, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The version of the agent that reported the ending (for `succeeded`, the new one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// Where an update in progress stands.
#[derive(Debug, Clone)]
enum Progress {
    Sent,
    Staged,
    Ended(UpdateStatus),
}

/// An update in progress.
#[derive(Debug)]
struct Active {
    agent: String,
    /// Until the agent has staged (or refused) it.
    release: Option<Arc<Release>>,
    progress: watch::Sender<Progress>,
}

/// The updates in progress, by update id, and the releases in memory.
#[derive(Debug, Default)]
pub(super) struct ActiveUpdates {
    by_id: Mutex<HashMap<String, Active>>,
    releases: Mutex<HashMap<String, Weak<Release>>>,
}

impl Hub {
    /// `release`, or the same release already in memory (same manifest): one copy per release.
    pub fn share_release(&self, release: Release) -> Arc<Release> {
        let mut releases = lock(&self.updates.releases);
        releases.retain(|_, r| r.strong_count() > 0);
        let key = release.manifest.manifest().sha256.clone();
        if let Some(existing) = releases.get(&key).and_then(Weak::upgrade) {
            if existing.manifest.text() == release.manifest.text() {
                return existing;
            }
        }
        let release = Arc::new(release);
        releases.insert(key, Arc::downgrade(&release));
        release
    }

    /// Sends `update` to the agent and waits for how it ends (see the module documentation).
    pub async fn update(&self, order: UpdateOrder) -> Result<UpdateOutcome, HubError> {
        let agent = order.agent.as_str();
        if !self.registry.is_enrolled(agent) {
            return Err(HubError::UnknownAgent(agent.to_string()));
        }
        match self.connections.version(agent) {
            None => return Err(HubError::NotConnected(agent.to_string())),
            Some(1) => {
                return Err(HubError::BadRequest(format!(
                    "agent {agent} is connected with protocol version 1, which has no self-update"
                )))
            }
            Some(_) => {}
        }
        let id = new_id();
        let (progress, mut watch) = watch::channel(Progress::Sent);
        {
            let mut by_id = lock(&self.updates.by_id);
            if let Some((other, _)) = by_id.iter().find(|(_, a)| a.agent == agent) {
                return Err(HubError::BadRequest(format!(
                    "an update of agent {agent} is in progress ({other})"
                )));
            }
            by_id.insert(
                id.clone(),
                Active {
                    agent: agent.to_string(),
                    release: Some(order.release.clone()),
                    progress,
                },
            );
        }
        // Forget the update however this ends (the caller may also stop waiting).
        let _forget = Forget { hub: self, id: &id };
        let manifest = order.release.manifest.manifest();
        let record = UpdateRecord {
            id: id.clone(),
            agent: agent.to_string(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
            sent_at: format_rfc3339(now_unix()),
            outcome: None,
        };
        if let Err(e) = self.update_store.create(&record) {
            tracing::error!(agent_id = agent, update = %id, "{e:#}");
            return Err(HubError::BadRequest(format!(
                "cannot record the update: {e:#}"
            )));
        }
        let message = PlatformMessage::Update {
            id: id.clone(),
            manifest: order.release.manifest.text().to_string(),
            allow_downgrade: order.allow_downgrade,
            drain_timeout_ms: order.drain_timeout_ms,
        };
        let (outbox, _) = self.connections.outbox(agent)?;
        tracing::info!(agent_id = agent, update = %id, version = %manifest.version, "sending update");
        if outbox.send(Outbound::Text(encode(&message))).await.is_err() {
            return Err(HubError::ConnectionLost("the connection closed".into()));
        }
        let mut staged = false;
        let ended = tokio::time::timeout(order.wait, async {
            loop {
                match &*watch.borrow_and_update() {
                    Progress::Ended(status) => return Some(status.clone()),
                    Progress::Staged => staged = true,
                    Progress::Sent => {}
                }
                if watch.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        let mut outcome = UpdateOutcome {
            id: id.clone(),
            agent: agent.to_string(),
            version: manifest.version.clone(),
            state: Ending::Timeout,
            staged,
            reason: None,
            detail: None,
            agent_version: None,
        };
        match ended {
            Ok(Some(status)) => {
                // A verdict comes from a release that was staged, even when `staged` and the
                // verdict came too close together to be seen apart here.
                outcome.staged |= is_verdict(status.state);
                outcome.state = match status.state {
                    UpdateState::Succeeded => Ending::Succeeded,
                    UpdateState::Failed => Ending::Failed,
                    _ => Ending::Refused,
                };
                outcome.reason = status.reason;
                outcome.detail = status.detail;
                outcome.agent_version = Some(status.agent_version);
            }
            Ok(None) => return Err(HubError::ShuttingDown),
            Err(_) => {
                outcome.detail = Some(format!(
                    "no verdict within {} ms{}",
                    super::millis(order.wait),
                    if staged {
                        " (the agent staged the release)"
                    } else {
                        ""
                    }
                ));
            }
        }
        tracing::info!(agent_id = agent, update = %id, state = ?outcome.state, reason = ?outcome.reason, "update ended");
        Ok(outcome)
    }

    /// The bytes `offset..offset + length` of the release that update `id` of `agent_id` is
    /// fetching, or the `error` to answer with.
    pub fn release_range(
        &self,
        agent_id: &str,
        id: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, (ErrorCode, String)> {
        let release = {
            let by_id = lock(&self.updates.by_id);
            by_id
                .get(id)
                .filter(|a| a.agent == agent_id)
                .and_then(|a| a.release.clone())
        };
        let Some(release) = release else {
            return Err((
                ErrorCode::NotFound,
                format!("no update {id} of this agent is fetching a release"),
            ));
        };
        let size = release.bytes.len() as u64;
        if length == 0 || length > MAX_BINARY_BYTES as u64 {
            return Err((
                ErrorCode::Unexpected,
                format!("`length` must be 1 to {MAX_BINARY_BYTES} bytes, not {length}"),
            ));
        }
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(release.bytes.slice(offset as usize..end as usize)),
            _ => Err((
                ErrorCode::Unexpected,
                format!(
                    "bytes {offset}..{} are past the end of the release ({size} bytes)",
                    offset.saturating_add(length)
                ),
            )),
        }
    }

    /// Handles an agent's `update_status`; returns true when the platform must answer
    /// `update_ack` (a verdict stored now or before, or one it has no record of).
    pub fn on_update_status(&self, agent_id: &str, status: UpdateStatus) -> bool {
        let verdict = is_verdict(status.state);
        let stored = match self.update_store.record(agent_id, &status) {
            Ok(Recorded::Unknown) if verdict => {
                tracing::warn!(agent_id, update = %status.id, "verdict for an update this platform has no record of (acknowledged, not stored)");
                true
            }
            Ok(Recorded::Already(_)) => {
                tracing::info!(agent_id, update = %status.id, "verdict repeated (stored before)");
                true
            }
            Ok(_) => true,
            Err(e) => {
                tracing::error!(agent_id, update = %status.id, "cannot store the update's status: {e:#}");
                false
            }
        };
        tracing::info!(agent_id, update = %status.id, state = ?status.state, reason = ?status.reason, "update status");
        let mut by_id = lock(&self.updates.by_id);
        if let Some(active) = by_id.get_mut(&status.id).filter(|a| a.agent == agent_id) {
            match status.state {
                UpdateState::Staged => {
                    active.release = None;
                    active.progress.send_replace(Progress::Staged);
                }
                // A verdict ends the wait only once it is stored.
                _ if verdict && !stored => {}
                _ => {
                    active.release = None;
                    active.progress.send_replace(Progress::Ended(status));
                }
            }
        }
        verdict && stored
    }
}

/// Removes an update from the ones in progress when dropped.
struct Forget<'a> {
    hub: &'a Hub,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.hub.updates.by_id).remove(self.id);
    }
}
