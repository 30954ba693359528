//! The agent's side of a self-update ([`Updater`]): checks an `update`, fetches the release
//! over the link, stages it for the launcher, drains and stops; after a switch, confirms the
//! new version once it has stayed up for the health window; reports an update's verdict
//! (`outcome.json`) after every reconnect until the platform acknowledges it.
//!
//! An `update` is refused (`update_status refused` with a reason, nothing left on disk) when
//! another one is in progress, when this agent cannot update itself (not started by the
//! launcher, or no release keys), when the manifest does not parse or verify, is for another
//! OS or architecture, is larger than `max_binary_bytes` or not newer than this version (unless
//! both the platform and the config allow a downgrade), or when the bytes received do not come
//! in time or do not match the manifest.
//!
//! A format-2 manifest names a gzip archive: the agent fetches the archive, checks its size and
//! SHA-256 against the manifest *before* unpacking it, unpacks it off the async threads with
//! the output capped at the binary's size ([`super::unpack`]), then checks the binary as for
//! format 1. It stages the format-1 manifest of the binary, which any launcher reads. Nothing
//! reaches `staged/` unless every check passed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_protocol::{
    AgentMessage, ErrorBody, ErrorCode, UpdateReason, UpdateState, UpdateStatus,
};
use bridge_signing::release::{compare_versions, ReleaseError, SignedManifest};
use bridge_signing::PublicKey;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::files::{Outcome, Pending, Phase, StagedRequest};
use super::layout::Layout;
use super::state::AgentState;
use super::{
    OUTCOME, STAGED_BINARY, STAGED_DIR, STAGED_MANIFEST, STAGED_REQUEST, STAGING_ARCHIVE,
    STAGING_DIR, UPDATE_DIR,
};
use crate::outbox;

/// The most bytes one `need_release` asks for.
pub const CHUNK_BYTES: u64 = 8 << 20;

/// The longest `detail` sent in an `update_status`.
const MAX_DETAIL_BYTES: usize = 1024;

/// The agent's update settings (the config's `[update]`, resolved).
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// Keys a release manifest must be signed by; none: updates are refused.
    pub release_keys: Vec<PublicKey>,
    /// Whether a downgrade the platform asks for is carried out.
    pub allow_downgrade: bool,
    /// How long a new version stays up, after its first `welcome`, before it confirms.
    pub health_window: Duration,
    /// How long running tasks get to finish before the agent stops for a staged release.
    pub drain_timeout: Duration,
    /// The largest release binary accepted.
    pub max_binary_bytes: u64,
    /// How long each part asked for with `need_release` may take to arrive.
    pub chunk_timeout: Duration,
    /// The launcher's layout directory (`BRIDGE_LAUNCHER_LAYOUT`); `None`: not started by the
    /// launcher, so updates are refused (`unsupported`).
    pub layout: Option<PathBuf>,
    /// Cancelled to stop the agent once it has drained for a staged release.
    pub shutdown: CancellationToken,
}

impl Default for UpdateOptions {
    fn default() -> UpdateOptions {
        UpdateOptions {
            release_keys: Vec::new(),
            allow_downgrade: false,
            health_window: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(60),
            max_binary_bytes: 512 << 20,
            chunk_timeout: Duration::from_secs(60),
            layout: None,
            shutdown: CancellationToken::new(),
        }
    }
}

/// An `update` as the platform sent it.
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    /// Its id.
    pub id: String,
    /// The signed manifest's text.
    pub manifest: String,
    /// The platform asks for a downgrade.
    pub allow_downgrade: bool,
    /// The platform's drain timeout, if it gave one.
    pub drain_timeout_ms: Option<u64>,
}

/// Why an update was refused.
#[derive(Debug)]
struct Refused {
    reason: UpdateReason,
    detail: String,
}

fn refused(reason: UpdateReason, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

fn storage(what: &str, e: std::io::Error) -> Refused {
    refused(UpdateReason::Storage, format!("{what}: {e}"))
}

/// The agent's update machinery.
pub struct Updater {
    options: UpdateOptions,
    /// `STATE/update`.
    dir: PathBuf,
    /// `STATE`.
    state: PathBuf,
    outbox: outbox::Sender,
    /// The agent's execution slots, and how many there are: the drain waits until all are free.
    slots: Arc<Semaphore>,
    slot_count: usize,
    /// An update is being checked, fetched or drained for.
    busy: AtomicBool,
    /// Staged: new tasks are refused (`updating`) and queued ones stay queued.
    draining: AtomicBool,
    /// A release is being fetched: binary frames are its parts.
    fetching: AtomicBool,
    /// The update whose part is asked for, and where the part (or the platform's `error`
    /// instead of it) goes when it arrives.
    part: Mutex<Option<Part>>,
    /// A switch to this version awaiting its confirmation (taken at the first `welcome`).
    confirm: Mutex<Option<Pending>>,
    /// What runs once this version is confirmed ([`Updater::when_confirmed`]).
    on_confirmed: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// A part of the release asked for: the update's id, and where its bytes (or the message of
/// the platform's `error` instead) go.
type Part = (String, oneshot::Sender<Result<Vec<u8>, String>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Updater {
    /// The updater for the agent whose state directory is `state`. Removes what an earlier
    /// process left half received, and finds whether this start is a new version's one start
    /// that must confirm.
    pub fn new(
        options: UpdateOptions,
        state: &Path,
        outbox: outbox::Sender,
        slots: Arc<Semaphore>,
        slot_count: usize,
    ) -> Updater {
        let dir = state.join(UPDATE_DIR);
        match std::fs::remove_dir_all(dir.join(STAGING_DIR)) {
            Ok(()) => tracing::info!("removed a release an earlier run left half received"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the update staging directory"),
        }
        let confirm = options
            .layout
            .as_deref()
            .and_then(|layout| to_confirm(layout, state));
        if let Some(p) = &confirm {
            tracing::info!(
                version = %p.version,
                from = %p.from_version,
                health_window_secs = options.health_window.as_secs(),
                "this is a new version's first start: it confirms once it has stayed connected for the health window"
            );
        }
        Updater {
            options,
            dir,
            state: state.to_path_buf(),
            outbox,
            slots,
            slot_count,
            busy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            fetching: AtomicBool::new(false),
            part: Mutex::new(None),
            confirm: Mutex::new(confirm),
            on_confirmed: Mutex::new(None),
        }
    }

    /// Runs `f` once this version is confirmed: at once if it is (or needs no confirmation),
    /// else when it confirms after its health window (never, if it is rolled back).
    pub fn when_confirmed(&self, f: impl FnOnce() + Send + 'static) {
        if lock(&self.confirm).is_none() {
            f();
        } else {
            *lock(&self.on_confirmed) = Some(Box::new(f));
        }
    }

    /// Whether the agent drains for a staged release (new tasks are refused, queued tasks
    /// wait for the next start).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// An `update` from the platform: checked, fetched, staged, drained for, in the
    /// background.
    pub fn start(self: &Arc<Self>, req: UpdateRequest) {
        let this = self.clone();
        if self.busy.swap(true, Ordering::SeqCst) {
            tokio::spawn(async move {
                let r = refused(
                    UpdateReason::InProgress,
                    "another update is in progress on this agent",
                );
                let version = SignedManifest::parse(&req.manifest)
                    .map(|m| m.manifest().version.clone())
                    .unwrap_or_default();
                this.report_refusal(&req.id, version, r).await;
            });
            return;
        }
        tokio::spawn(async move { this.run(req).await });
    }

    async fn run(self: Arc<Self>, req: UpdateRequest) {
        let mut version = String::new();
        let staged = self.stage(&req, &mut version).await;
        self.fetching.store(false, Ordering::SeqCst);
        lock(&self.part).take();
        if let Err(r) = staged {
            // Nothing stays on disk for a refused update.
            let _ = std::fs::remove_dir_all(self.dir.join(STAGING_DIR));
            let _ = std::fs::remove_dir(&self.dir);
            self.report_refusal(&req.id, version, r).await;
            self.busy.store(false, Ordering::SeqCst);
            return;
        }
        super::files::failpoint("agent_staged");
        tracing::info!(update_id = %req.id, %version, "release staged: draining, then restarting into it");
        self.outbox
            .send(AgentMessage::UpdateStatus(UpdateStatus {
                id: req.id.clone(),
                state: UpdateState::Staged,
                version,
                agent_version: crate::version::get().to_string(),
                reason: None,
                detail: None,
            }))
            .await;
        let drain = req
            .drain_timeout_ms
            .map_or(self.options.drain_timeout, Duration::from_millis)
            .min(Duration::from_secs(86_400));
        self.drain(drain).await;
    }

    async fn report_refusal(&self, id: &str, version: String, r: Refused) {
        tracing::warn!(update_id = %id, reason = ?r.reason, "update refused: {}", r.detail);
        self.outbox
            .send(AgentMessage::UpdateStatus(UpdateStatus {
                id: id.to_string(),
                state: UpdateState::Refused,
                version,
                agent_version: crate::version::get().to_string(),
                reason: Some(r.reason),
                detail: Some(cut(r.detail)),
            }))
            .await;
    }

    /// The checks, the fetch and the staging; `version` is set once the manifest parsed.
    async fn stage(&self, req: &UpdateRequest, version: &mut String) -> Result<(), Refused> {
        let own = crate::version::get();
        let parsed = SignedManifest::parse(&req.manifest);
        if let Ok(m) = &parsed {
            *version = m.manifest().version.clone();
        }
        if self.options.layout.is_none() {
            return Err(refused(
                UpdateReason::Unsupported,
                "this agent was not started by the launcher (BRIDGE_LAUNCHER_LAYOUT is not set): nothing would switch to a staged release",
            ));
        }
        if self.options.release_keys.is_empty() {
            return Err(refused(
                UpdateReason::Unsupported,
                "this agent has no release keys ([update] release_keys)",
            ));
        }
        let signed = parsed.map_err(|e| refused(UpdateReason::MalformedManifest, e.to_string()))?;
        let m = signed
            .verify(&self.options.release_keys)
            .map_err(|e| match e {
                ReleaseError::UnknownKey(_) => refused(UpdateReason::UnknownKey, e.to_string()),
                ReleaseError::BadSignature => refused(UpdateReason::BadSignature, e.to_string()),
                ReleaseError::Malformed(_) => {
                    refused(UpdateReason::MalformedManifest, e.to_string())
                }
            })?
            .clone();
        let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
        if m.os != os || m.arch != arch {
            return Err(refused(
                UpdateReason::WrongPlatform,
                format!(
                    "the release is for {}/{}; this agent runs on {os}/{arch}",
                    m.os, m.arch
                ),
            ));
        }
        if m.size > self.options.max_binary_bytes {
            return Err(refused(
                UpdateReason::TooLarge,
                format!(
                    "the release is {} bytes; this agent accepts at most {} ([update] max_binary_bytes)",
                    m.size, self.options.max_binary_bytes
                ),
            ));
        }
        let order = compare_versions(&m.version, own).map_err(|e| {
            refused(
                UpdateReason::MalformedManifest,
                format!(
                    "cannot compare version {} with this agent's {own}: {e}",
                    m.version
                ),
            )
        })?;
        if order != std::cmp::Ordering::Greater
            && !(req.allow_downgrade && self.options.allow_downgrade)
        {
            let why = match (req.allow_downgrade, self.options.allow_downgrade) {
                (false, _) => "the platform did not ask for a downgrade",
                (true, false) => {
                    "this agent's config does not allow downgrades ([update] allow_downgrade)"
                }
                (true, true) => unreachable!(),
            };
            return Err(refused(
                UpdateReason::Downgrade,
                format!(
                    "release {} is not newer than this agent's {own}, and {why}",
                    m.version
                ),
            ));
        }
        let staging = self.dir.join(STAGING_DIR);
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging)
            .map_err(|e| storage("creating the update staging directory", e))?;
        let create = |name: &str, what: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(staging.join(name))
                .map_err(|e| storage(&format!("creating the {what}"), e))
        };
        match &m.archive {
            None => {
                let binary = create(STAGED_BINARY, "staged binary")?;
                let binary = self.fetch(&req.id, m.size, &m.sha256, binary).await?;
                binary
                    .sync_all()
                    .map_err(|e| storage("writing the staged binary", e))?;
            }
            Some(archive) => {
                let file = create(STAGING_ARCHIVE, "release archive")?;
                // Size and SHA-256 of the archive are checked here, before it is unpacked.
                let file = self
                    .fetch(&req.id, archive.size, &archive.sha256, file)
                    .await?;
                let binary = create(STAGED_BINARY, "staged binary")?;
                let (size, sha256) = (m.size, m.sha256.clone());
                tokio::task::spawn_blocking(move || {
                    use std::io::Seek as _;
                    let mut file = file;
                    file.rewind()?;
                    let mut out = std::io::BufWriter::new(binary);
                    let unpacked = super::unpack::gunzip_capped(file, &mut out, size, &sha256);
                    let binary = out.into_inner().map_err(|e| e.into_error())?;
                    Ok::<_, std::io::Error>(unpacked.map(|()| binary))
                })
                .await
                .map_err(|e| refused(UpdateReason::Storage, e.to_string()))?
                .map_err(|e| storage("unpacking the release archive", e))?
                .map_err(|e| match e {
                    super::unpack::UnpackError::Invalid(why) => {
                        refused(UpdateReason::Mismatch, why)
                    }
                    super::unpack::UnpackError::Storage(e) => {
                        storage("unpacking the release archive", e)
                    }
                })?
                .sync_all()
                .map_err(|e| storage("writing the staged binary", e))?;
                std::fs::remove_file(staging.join(STAGING_ARCHIVE))
                    .map_err(|e| storage("removing the unpacked release archive", e))?;
            }
        }
        let request = StagedRequest {
            update_id: req.id.clone(),
            version: m.version.clone(),
            from_version: own.to_string(),
            allow_downgrade: req.allow_downgrade,
        };
        let request = serde_json::to_vec_pretty(&request).expect("a request serializes");
        // The format-1 manifest of the binary: what a launcher of any version verifies.
        write_new(
            &staging.join(STAGED_MANIFEST),
            signed.format1_text().as_bytes(),
        )
        .map_err(|e| storage("writing the staged manifest", e))?;
        write_new(&staging.join(STAGED_REQUEST), &request)
            .map_err(|e| storage("writing the staged request", e))?;
        sync_dir(&staging).map_err(|e| storage("syncing the staging directory", e))?;
        let staged = self.dir.join(STAGED_DIR);
        match std::fs::remove_dir_all(&staged) {
            Ok(()) => tracing::warn!("replacing a staged release the launcher never took"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage("removing an earlier staged release", e)),
        }
        std::fs::rename(&staging, &staged).map_err(|e| storage("staging the release", e))?;
        sync_dir(&self.dir).map_err(|e| storage("syncing the update directory", e))?;
        Ok(())
    }

    /// Asks for the `size` bytes of the release (the binary, or its archive), one part at a
    /// time, writing them to `file` and checking that they hash to `sha256`.
    async fn fetch(
        &self,
        id: &str,
        size: u64,
        sha256: &str,
        file: std::fs::File,
    ) -> Result<std::fs::File, Refused> {
        self.fetching.store(true, Ordering::SeqCst);
        let mut file = Some(file);
        let mut hasher = Some(Sha256::new());
        let mut offset = 0u64;
        while offset < size {
            let length = (size - offset).min(CHUNK_BYTES);
            let (tx, rx) = oneshot::channel();
            *lock(&self.part) = Some((id.to_string(), tx));
            self.outbox
                .send(AgentMessage::NeedRelease {
                    id: id.to_string(),
                    offset,
                    length,
                })
                .await;
            let part = match tokio::time::timeout(self.options.chunk_timeout, rx).await {
                Ok(Ok(Ok(part))) => part,
                Ok(Ok(Err(message))) => {
                    return Err(refused(
                        UpdateReason::Unavailable,
                        format!(
                            "the platform answered the request for bytes {offset}..{} of the release with an error: {message}",
                            offset + length
                        ),
                    ))
                }
                _ => {
                    return Err(refused(
                        UpdateReason::Unavailable,
                        format!(
                        "the platform did not send bytes {offset}..{} of the release within {} s",
                        offset + length,
                        self.options.chunk_timeout.as_secs()
                    ),
                    ))
                }
            };
            if part.len() as u64 != length {
                return Err(refused(
                    UpdateReason::Mismatch,
                    format!(
                        "asked for {length} bytes of the release at {offset}, received {}",
                        part.len()
                    ),
                ));
            }
            let (mut f, mut h) = (file.take().unwrap(), hasher.take().unwrap());
            let (f, h, written) = tokio::task::spawn_blocking(move || {
                h.update(&part);
                let written = f.write_all(&part);
                (f, h, written)
            })
            .await
            .map_err(|e| refused(UpdateReason::Storage, e.to_string()))?;
            written.map_err(|e| storage("writing the staged binary", e))?;
            (file, hasher) = (Some(f), Some(h));
            offset += length;
        }
        self.fetching.store(false, Ordering::SeqCst);
        let sha = hex::encode(hasher.take().unwrap().finalize());
        if sha != sha256 {
            return Err(refused(
                UpdateReason::Mismatch,
                format!("the release received hashes to {sha}; the manifest says {sha256}"),
            ));
        }
        Ok(file.take().unwrap())
    }

    /// A binary frame: taken as the part of the release asked for while a release is being
    /// fetched (`Ok(None)`), refused when no part is asked for then, and handed back
    /// (`Ok(Some)`) when no release is being fetched (it is the module store's).
    pub fn take_part(&self, bytes: Vec<u8>) -> Result<Option<Vec<u8>>, ErrorBody> {
        if !self.fetching.load(Ordering::SeqCst) {
            return Ok(Some(bytes));
        }
        let Some((_, tx)) = lock(&self.part).take() else {
            return Err(ErrorBody {
                id: None,
                code: ErrorCode::Unexpected,
                message: format!(
                    "a binary frame of {} bytes while a release is fetched, and no part of it asked for",
                    bytes.len()
                ),
            });
        };
        let _ = tx.send(Ok(bytes));
        Ok(None)
    }

    /// An `error` from the platform: when it answers the part of the release asked for (it
    /// names the update), the update ends at once (`unavailable`, with the platform's message)
    /// instead of after the part's timeout.
    pub fn platform_error(&self, error: &ErrorBody) {
        let mut part = lock(&self.part);
        if part
            .as_ref()
            .is_some_and(|(id, _)| error.id.as_deref() == Some(id.as_str()))
        {
            if let Some((_, tx)) = part.take() {
                let _ = tx.send(Err(format!("{}: {}", error.code.as_str(), error.message)));
            }
        }
    }

    /// New tasks are refused and queued ones wait; running ones get up to `timeout` to end;
    /// then the agent stops (tasks still running end `interrupted` at the next start).
    async fn drain(&self, timeout: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .slot_count
                .saturating_sub(self.slots.available_permits());
            if busy == 0 {
                tracing::info!("drained: no task is running");
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    running = busy,
                    timeout_ms = timeout.as_millis() as u64,
                    "the drain timeout passed: tasks still running end interrupted at the next start"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What is queued for the platform (`staged`, results) goes out first when it can.
        let channel = self.outbox.channel();
        let flushed = Instant::now() + Duration::from_secs(5);
        while channel.capacity() < channel.max_capacity() && Instant::now() < flushed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tracing::info!("stopping to restart into the staged release");
        self.options.shutdown.cancel();
    }

    /// A session opened (protocol `version`): the first one starts the health window of a new
    /// version; every one reports a kept verdict.
    pub fn welcomed(self: &Arc<Self>, version: u32) {
        if version < 2 {
            return;
        }
        if let Some(pending) = lock(&self.confirm).take() {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(this.options.health_window).await;
                match this.confirm_now(&pending) {
                    Ok(()) => {
                        tracing::info!(version = %pending.version, "update confirmed: stayed up for the health window");
                        if let Some(f) = lock(&this.on_confirmed).take() {
                            f();
                        }
                        this.report_outcome().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot confirm the update; the launcher will roll it back")
                    }
                }
            });
        }
        let this = self.clone();
        tokio::spawn(async move { this.report_outcome().await });
    }

    /// Writes the verdict (succeeded), then the confirmation the launcher waits for.
    fn confirm_now(&self, pending: &Pending) -> anyhow::Result<()> {
        let state = self.agent_state()?;
        state.write_outcome(&Outcome {
            update_id: pending.update_id.clone(),
            state: UpdateState::Succeeded,
            version: pending.version.clone(),
            from_version: pending.from_version.clone(),
            reason: None,
            detail: None,
        })?;
        state.write_confirmed(crate::version::get())
    }

    /// The state directory's update files.
    fn agent_state(&self) -> anyhow::Result<AgentState> {
        AgentState::open(&self.state)
    }

    /// Sends the kept verdict, if there is one.
    async fn report_outcome(&self) {
        let Some(outcome) = self.outcome() else {
            return;
        };
        self.outbox
            .send(AgentMessage::UpdateStatus(UpdateStatus {
                id: outcome.update_id,
                state: outcome.state,
                version: outcome.version,
                agent_version: crate::version::get().to_string(),
                reason: outcome.reason,
                detail: outcome.detail.map(cut),
            }))
            .await;
    }

    /// The kept verdict; one that does not parse is removed (it could never be reported).
    fn outcome(&self) -> Option<Outcome> {
        let state = self
            .agent_state()
            .map_err(
                |e| tracing::warn!(error = %format!("{e:#}"), "cannot open the state directory"),
            )
            .ok()?;
        match state.outcome()? {
            Ok(outcome) => Some(outcome),
            Err(e) => {
                tracing::warn!(error = %e, "the update outcome does not parse; removing it");
                let _ = state.remove(OUTCOME);
                None
            }
        }
    }

    /// `update_ack {id}`: the platform recorded the verdict of update `id`.
    pub fn acked(&self, id: &str) {
        match self.outcome() {
            Some(o) if o.update_id == id => {
                match self.agent_state().and_then(|s| s.remove(OUTCOME)) {
                    Ok(()) => {
                        tracing::info!(update_id = %id, "the platform recorded the update's verdict")
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot remove the update outcome")
                    }
                }
            }
            _ => tracing::debug!(update_id = %id, "an update_ack for no kept verdict"),
        }
    }
}

/// The switch to this version awaiting confirmation, if the layout records one and it is not
/// confirmed yet.
fn to_confirm(layout: &Path, state: &Path) -> Option<Pending> {
    let recorded = Layout::new(layout)
        .read_state()
        .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot read the launcher's state"))
        .ok()?;
    let own = crate::version::get();
    let pending = recorded
        .pending
        .filter(|p| p.phase == Phase::Switched && p.version == own)?;
    let confirmed = AgentState::open(state).is_ok_and(|s| s.is_confirmed(own));
    (!confirmed).then_some(pending)
}

/// Creates `path` with `bytes`, synced.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `detail` cut to [`MAX_DETAIL_BYTES`] at a character boundary.
fn cut(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detail_is_cut_to_its_bound_at_a_character_boundary() {
        assert_eq!(cut("short".into()), "short");
        let exact = "x".repeat(MAX_DETAIL_BYTES);
        assert_eq!(cut(exact.clone()), exact);
        // 1023 one-byte characters, then two-byte ones: the cut falls inside the first é.
        let long = format!("{}{}", "x".repeat(MAX_DETAIL_BYTES - 1), "é".repeat(10));
        let cut_ = cut(long);
        assert_eq!(cut_.len(), MAX_DETAIL_BYTES - 1);
        assert!(cut_.chars().all(|c| c == 'x'));
    }
}
