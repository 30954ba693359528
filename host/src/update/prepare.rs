//! `bridge-daemon launcher prepare`: the root step before every start of the service
//! (systemd's `ExecStartPre=+`). It finishes or judges a pending switch, installs and switches
//! to a staged release after verifying it again itself, and prunes old releases. And
//! `bridge-daemon rollback`, the manual rollback to the previous release.
//!
//! Every step is written so that a crash (kill -9, power loss) at any point leaves a layout the
//! next `prepare` completes: `current` always names an installed release, and
//! `state.json` says whether a switch is under way ([`Phase::Switching`]: finish the links) or
//! done and waiting for its one start to be judged ([`Phase::Switched`]). The failpoints
//! ([`files::failpoint`]) sit after each durable step.
//!
//! The staged release comes from the agent's state directory, which the service user owns:
//! nothing there is trusted (see [`super::dir`]); the manifest is verified against the config's
//! release keys, and the binary is copied into root's layout and hashed as it is copied, so
//! the bytes checked are the bytes installed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

use anyhow::{bail, Context, Result};
use bridge_protocol::{UpdateReason, UpdateState};
use bridge_signing::release::{compare_versions, ReleaseError, SignedManifest, MAX_MANIFEST_BYTES};
use sha2::{Digest, Sha256};

use super::dir::Dir;
use super::files::{self, LayoutState, Outcome, Pending, Phase, StagedRequest};
use super::layout::Layout;
use super::settings::LauncherSettings;
use super::state::{AgentState, MAX_JSON_BYTES};
use super::{CONFIRMED, CURRENT_LINK, PREVIOUS_LINK, STAGED_BINARY, STAGED_DIR, STAGED_MANIFEST};
use super::{STAGED_REQUEST, VERDICT};

/// What a `prepare` did, in order (logged; the tests read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// A switch interrupted half way was finished: the links now point at `version`.
    Finished {
        /// The version switched to.
        version: String,
    },
    /// The pending version confirmed: it stays.
    Confirmed {
        /// The confirmed version.
        version: String,
    },
    /// The pending version had its start without confirming: `current` is `to` again.
    RolledBack {
        /// The version rolled back from (its release removed).
        version: String,
        /// The version running again.
        to: String,
        /// Why (from the launcher's verdict).
        reason: UpdateReason,
    },
    /// The staged release was installed and switched to; it has its one start next.
    Switched {
        /// The version before.
        from: String,
        /// The version switched to.
        version: String,
    },
    /// The staged release failed the check or could not be installed; it was removed and the
    /// refusal written to `outcome.json`.
    Refused {
        /// The version staged (as far as known).
        version: String,
        /// Why.
        detail: String,
    },
    /// An old release (or a leftover copy) was removed from `releases/`.
    Pruned {
        /// Its directory name.
        name: String,
    },
}

/// Runs the root step. An `Err` is a problem with the layout itself (the caller logs it and
/// lets the service start anyway: what runs is whatever `current` names); a refused release is
/// not an error but a [`Done::Refused`].
pub fn prepare(layout: &Layout, settings: &LauncherSettings) -> Result<Vec<Done>> {
    let mut done = Vec::new();
    let agent = AgentState::open(&settings.state_dir)?;
    let state = layout.read_state()?;
    if let Some(pending) = state.pending {
        match pending.phase {
            Phase::Switching => {
                let version = pending.version.clone();
                finish_switch(layout, &agent, pending)?;
                done.push(Done::Finished { version });
                // Its one start is next; nothing else happens before it.
                return Ok(done);
            }
            Phase::Switched if agent.is_confirmed(&pending.version) => {
                layout.write_state(&LayoutState::default())?;
                done.push(Done::Confirmed {
                    version: pending.version,
                });
            }
            Phase::Switched => done.push(rollback(layout, &agent, pending)?),
        }
    }
    if agent.has_staged().context("looking for a staged release")? {
        done.push(take_staged(layout, settings, &agent)?);
    }
    if layout.read_state()?.pending.is_none() {
        for name in layout.prune()? {
            done.push(Done::Pruned { name });
        }
    }
    Ok(done)
}

/// The links, from a recorded [`Phase::Switching`] to [`Phase::Switched`]; each step is
/// idempotent, so an interrupted switch is finished by running this again.
fn finish_switch(layout: &Layout, agent: &AgentState, mut pending: Pending) -> Result<()> {
    agent.remove(STAGED_DIR)?;
    files::failpoint("prepare_unstaged");
    layout.set_link(PREVIOUS_LINK, &pending.from_version)?;
    layout.set_link(CURRENT_LINK, &pending.version)?;
    files::failpoint("prepare_linked");
    // Stale marks from an earlier update must not judge this one; removed before the phase
    // says "switched", so no crash can leave an old `confirmed` standing for this version.
    agent.remove(CONFIRMED)?;
    agent.remove(VERDICT)?;
    pending.phase = Phase::Switched;
    layout.write_state(&LayoutState {
        pending: Some(pending),
    })?;
    files::failpoint("prepare_switched");
    Ok(())
}

/// Puts back the version switched from: reports why (`outcome.json`), points `current` at it,
/// removes the failed release, clears the pending switch.
fn rollback(layout: &Layout, agent: &AgentState, pending: Pending) -> Result<Done> {
    let (reason, detail) = match agent.verdict() {
        Some(v) if v.version == pending.version => (v.reason, v.detail),
        _ => (
            UpdateReason::Exited,
            "stopped before confirming".to_string(),
        ),
    };
    tracing::warn!(
        version = %pending.version,
        back_to = %pending.from_version,
        ?reason,
        %detail,
        "rolling back: the new version did not confirm"
    );
    let outcome = Outcome {
        update_id: pending.update_id.clone(),
        state: UpdateState::Failed,
        version: pending.version.clone(),
        from_version: pending.from_version.clone(),
        reason: Some(reason),
        detail: Some(detail),
    };
    // A report that cannot be written never keeps the previous version from coming back.
    if let Err(e) = agent.write_outcome(&outcome) {
        tracing::error!(error = %format!("{e:#}"), "cannot record the rollback's outcome");
    }
    files::failpoint("rollback_reported");
    layout.set_link(CURRENT_LINK, &pending.from_version)?;
    layout.remove_link(PREVIOUS_LINK)?;
    files::failpoint("rollback_linked");
    layout.remove_release(&pending.version)?;
    layout.write_state(&LayoutState::default())?;
    agent.remove(VERDICT)?;
    Ok(Done::RolledBack {
        version: pending.version,
        to: pending.from_version,
        reason,
    })
}

/// Why a staged release is not installed (reported as `switch_failed`).
struct Refusal {
    update_id: String,
    version: String,
    detail: String,
}

/// Verifies the staged release, installs it and switches to it; or refuses it. Either way
/// `staged/` is gone afterwards.
fn take_staged(layout: &Layout, settings: &LauncherSettings, agent: &AgentState) -> Result<Done> {
    let from = layout.link_version(CURRENT_LINK)?;
    let accepted = check_and_install(layout, settings, agent, from.as_deref());
    let (request, version) = match accepted {
        Ok(accepted) => accepted,
        Err(refusal) => {
            tracing::warn!(version = %refusal.version, detail = %refusal.detail, "staged release refused");
            let outcome = Outcome {
                update_id: refusal.update_id,
                state: UpdateState::Failed,
                version: refusal.version.clone(),
                from_version: from.unwrap_or_default(),
                reason: Some(UpdateReason::SwitchFailed),
                detail: Some(refusal.detail.clone()),
            };
            if let Err(e) = agent.write_outcome(&outcome) {
                tracing::error!(error = %format!("{e:#}"), "cannot record the refusal");
            }
            agent.remove(STAGED_DIR)?;
            return Ok(Done::Refused {
                version: refusal.version,
                detail: refusal.detail,
            });
        }
    };
    let from = from.context("no current release")?;
    files::failpoint("prepare_copied");
    let pending = Pending {
        update_id: request.update_id,
        version: version.clone(),
        from_version: from.clone(),
        phase: Phase::Switching,
        confirm_timeout_secs: settings.confirm_timeout_secs,
    };
    layout.write_state(&LayoutState {
        pending: Some(pending.clone()),
    })?;
    files::failpoint("prepare_recorded");
    finish_switch(layout, agent, pending)?;
    tracing::info!(%from, %version, "switched to the staged release; it must confirm");
    Ok(Done::Switched { from, version })
}

/// The checks of the staged release, then the copy into `releases/VERSION` (hashed as it is
/// copied). Returns the request and the version installed.
fn check_and_install(
    layout: &Layout,
    settings: &LauncherSettings,
    agent: &AgentState,
    from: Option<&str>,
) -> Result<(StagedRequest, String), Refusal> {
    let mut refusal = Refusal {
        update_id: String::new(),
        version: String::new(),
        detail: String::new(),
    };
    let refuse = |r: &Refusal, detail: String| Refusal {
        update_id: r.update_id.clone(),
        version: r.version.clone(),
        detail,
    };
    let staged = match agent.staged() {
        Ok(Some(s)) => s,
        Ok(None) => return Err(refuse(&refusal, "staged is not a directory".into())),
        Err(e) => return Err(refuse(&refusal, format!("cannot open staged/: {e}"))),
    };
    let request: StagedRequest = match staged.read(STAGED_REQUEST, MAX_JSON_BYTES) {
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => return Err(refuse(&refusal, format!("{STAGED_REQUEST}: {e}"))),
        },
        Ok(None) => return Err(refuse(&refusal, format!("no {STAGED_REQUEST}"))),
        Err(e) => return Err(refuse(&refusal, format!("{STAGED_REQUEST}: {e}"))),
    };
    refusal.update_id = request.update_id.clone();
    refusal.version = request.version.clone();
    let text = match staged.read(STAGED_MANIFEST, MAX_MANIFEST_BYTES as u64) {
        Ok(Some(bytes)) => String::from_utf8(bytes).unwrap_or_default(),
        Ok(None) => return Err(refuse(&refusal, format!("no {STAGED_MANIFEST}"))),
        Err(e) => return Err(refuse(&refusal, format!("{STAGED_MANIFEST}: {e}"))),
    };
    let signed = SignedManifest::parse(&text).map_err(|e| refuse(&refusal, e.to_string()))?;
    let manifest = match signed.verify(&settings.release_keys) {
        Ok(m) => m,
        Err(ReleaseError::UnknownKey(_)) if settings.release_keys.is_empty() => {
            return Err(refuse(
                &refusal,
                "no release keys are configured ([update] release_keys)".into(),
            ))
        }
        Err(e) => return Err(refuse(&refusal, e.to_string())),
    };
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    if manifest.os != os || manifest.arch != arch {
        return Err(refuse(
            &refusal,
            format!(
                "the release is for {}/{}, this machine is {os}/{arch}",
                manifest.os, manifest.arch
            ),
        ));
    }
    if manifest.version != request.version {
        return Err(refuse(
            &refusal,
            format!(
                "{STAGED_REQUEST} names version {}, the manifest {}",
                request.version, manifest.version
            ),
        ));
    }
    let Some(from) = from else {
        return Err(refuse(&refusal, "the layout has no current release".into()));
    };
    let version = manifest.version.clone();
    if version == from {
        return Err(refuse(
            &refusal,
            format!("{version} is the current release already"),
        ));
    }
    let newer = compare_versions(&version, from)
        .map(|o| o.is_gt())
        .map_err(|e| refuse(&refusal, e.to_string()))?;
    let downgrade_allowed = request.allow_downgrade && settings.allow_downgrade;
    if !newer && !downgrade_allowed {
        return Err(refuse(
            &refusal,
            format!(
                "{version} is not newer than the current {from} (a downgrade must be asked for and allowed by [update] allow_downgrade)"
            ),
        ));
    }
    install(layout, &staged, &version, manifest.size, &manifest.sha256)
        .map_err(|e| refuse(&refusal, format!("{e:#}")))?;
    Ok((request, version))
}

/// Copies the staged binary into `releases/VERSION.tmp/`, checks what was copied against the
/// manifest, and renames it to `releases/VERSION`.
fn install(layout: &Layout, staged: &Dir, version: &str, size: u64, sha256: &str) -> Result<()> {
    let releases = layout.releases();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&releases)
        .and_then(|()| std::fs::set_permissions(&releases, std::fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("creating {}", releases.display()))?;
    let tmp_name = format!("{version}.tmp");
    layout.remove_release(&tmp_name)?;
    let tmp = releases.join(&tmp_name);
    // Exactly 0755 whatever the umask (the unit's is 0077): the service user runs what is
    // installed here.
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("creating {}", tmp.display()))?;
    let copied = copy_checked(staged, &tmp.join(STAGED_BINARY), size, sha256);
    if let Err(e) = copied {
        let _ = layout.remove_release(&tmp_name);
        return Err(e);
    }
    File::open(&tmp)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    // A directory of that name is an earlier copy that never became current (an interrupted
    // switch, or the previous release when going back to it): replaced.
    layout.remove_release(version)?;
    let dir = Dir::open(&releases)?;
    dir.rename(&tmp_name, version)?;
    dir.sync()?;
    Ok(())
}

fn copy_checked(staged: &Dir, dest: &std::path::Path, size: u64, sha256: &str) -> Result<()> {
    let (file, meta) = staged
        .open_regular(STAGED_BINARY)
        .with_context(|| format!("the staged {STAGED_BINARY}"))?
        .with_context(|| format!("no staged {STAGED_BINARY}"))?;
    if meta.len() != size {
        bail!(
            "the staged binary has {} bytes, the manifest says {size}",
            meta.len()
        );
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    let mut hasher = Sha256::new();
    let mut reader = file.take(size);
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = reader.read(&mut buf).context("reading the staged binary")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
        copied += n as u64;
    }
    if copied != size {
        bail!("the staged binary ended after {copied} of {size} bytes");
    }
    if hex::encode(hasher.finalize()) != sha256 {
        bail!("the staged binary's SHA-256 does not match the manifest");
    }
    out.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    out.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    Ok(())
}

/// `bridge-daemon rollback`: points `current` back at `previous`, removes the `previous` link and
/// clears any pending switch. Returns what it did, for people.
pub fn rollback_manual(layout: &Layout) -> Result<String> {
    let previous = layout.link_version(PREVIOUS_LINK)?.with_context(|| {
        format!(
            "no previous release to roll back to ({} does not exist)",
            layout.root().join(PREVIOUS_LINK).display()
        )
    })?;
    if !layout.binary(&previous).is_file() {
        bail!(
            "the previous release is not installed: {} is missing",
            layout.binary(&previous).display()
        );
    }
    let current = layout.link_version(CURRENT_LINK)?;
    layout.set_link(CURRENT_LINK, &previous)?;
    layout.remove_link(PREVIOUS_LINK)?;
    layout.write_state(&LayoutState::default())?;
    Ok(format!(
        "rolled back: {} now points at {previous} (it pointed at {}); restart the service to run it: systemctl restart bridge-daemon",
        layout.root().join(CURRENT_LINK).display(),
        current.as_deref().unwrap_or("nothing"),
    ))
}

#[cfg(test)]
mod tests;
