//! The agent proper: what it does with the platform's requests, independent of the transport.
//!
//! A `run` names a module by SHA-256. The agent runs it from its caches when it can (a warm run
//! reads no bytes and verifies nothing again), from its module store (`<state>/modules`) when it
//! has the bytes, and otherwise asks the platform for them (`need_module`) and waits for one
//! binary frame whose SHA-256 is the one asked for. Every `run` produces exactly one `result`
//! in the outbox, whatever happens (refusal, missing module, any ending of the handler).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use bridge_protocol::{
    AgentMessage, ErrorBody, ErrorCode, RunRequest, RunResult, Status, StatusReport,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::sandbox::Sandbox;
use crate::trust::{grant, Prepared, Trust};

/// How many messages may wait for the platform before producers wait.
const OUTBOX_CAPACITY: usize = 1024;

type Waiters = HashMap<String, Vec<oneshot::Sender<Arc<Vec<u8>>>>>;

/// The agent: sandbox, trust policy, module store, and the outbox to the platform.
pub struct Agent {
    agent_id: String,
    sandbox: Sandbox,
    trust: Arc<Trust>,
    modules_dir: PathBuf,
    module_wait: Duration,
    outbox: mpsc::Sender<AgentMessage>,
    outbox_rx: Mutex<Option<mpsc::Receiver<AgentMessage>>>,
    waiting: Mutex<Waiters>,
    running: Mutex<BTreeSet<String>>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refused(status: Status, reason: Option<&str>, message: String) -> RunResult {
    let mut r = RunResult::refused(status, message);
    r.reason = reason.map(str::to_string);
    r
}

impl Agent {
    /// An agent with its module store under `state/modules`.
    pub fn new(
        agent_id: String,
        sandbox: Sandbox,
        trust: Trust,
        state: &std::path::Path,
    ) -> Result<Arc<Agent>> {
        let modules_dir = state.join("modules");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&modules_dir)
            .with_context(|| format!("creating the module store {}", modules_dir.display()))?;
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        Ok(Arc::new(Agent {
            agent_id,
            sandbox,
            trust: Arc::new(trust),
            modules_dir,
            module_wait: Duration::from_secs(60),
            outbox: tx,
            outbox_rx: Mutex::new(Some(rx)),
            waiting: Mutex::new(HashMap::new()),
            running: Mutex::new(BTreeSet::new()),
            started: Instant::now(),
        }))
    }

    /// The agent id.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The receiving end of the outbox (taken once, by the link).
    pub fn take_outbox(&self) -> Option<mpsc::Receiver<AgentMessage>> {
        lock(&self.outbox_rx).take()
    }

    /// The status report sent to the platform.
    pub fn status_report(&self) -> StatusReport {
        StatusReport {
            agent_id: self.agent_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            host: crate::facts::collect(),
            running: lock(&self.running).iter().cloned().collect(),
            agent_uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// Starts a `run` in the background; its `result` goes to the outbox.
    pub fn start_run(self: &Arc<Self>, req: RunRequest) {
        let this = self.clone();
        lock(&self.running).insert(req.task_id.clone());
        tokio::spawn(async move {
            tracing::info!(task_id = %req.task_id, module = %req.module_sha256, "task started");
            let result = this.execute(&req).await;
            tracing::info!(task_id = %req.task_id, status = %result.status, "task finished");
            lock(&this.running).remove(&req.task_id);
            let msg = AgentMessage::Result {
                id: req.id,
                task_id: req.task_id,
                result,
            };
            let _ = this.outbox.send(msg).await;
        });
    }

    async fn execute(&self, req: &RunRequest) -> RunResult {
        let sha = match hex::decode(&req.module_sha256)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
        {
            Some(sha) => sha,
            None => {
                return refused(
                    Status::InvalidModule,
                    None,
                    "module_sha256 is not 64 hex characters".into(),
                )
            }
        };
        let detached = match req
            .signature
            .as_deref()
            .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
        {
            None => None,
            Some(Ok(bytes)) => Some(bytes),
            Some(Err(e)) => {
                return refused(
                    Status::Rejected,
                    Some("malformed_signature"),
                    format!("the detached signature is not base64: {e}"),
                )
            }
        };
        let prepared = match self.trust.cached(&self.sandbox, &sha, detached.as_deref()) {
            Some(p) => p,
            None => match self.prepare(req, sha, detached).await {
                Ok(p) => p,
                Err(r) => return *r,
            },
        };
        let defaults = self.sandbox.config().limits.defaults;
        let verified = prepared.verified.as_deref();
        let name = verified.map_or_else(|| "handler".to_string(), |v| v.claims.name.clone());
        let input = serde_json::to_vec(&req.input).unwrap_or_else(|_| b"null".to_vec());
        let (spec, _denied) = grant(verified, req.limits, &defaults, Vec::new(), Vec::new())
            .into_spec(input, name, &req.args);
        match self.sandbox.run(&prepared.handler, spec).await {
            Ok(r) => r,
            Err(e) => refused(
                Status::Trap,
                None,
                format!("the run could not be set up: {e:#}"),
            ),
        }
    }

    /// Gets the module's bytes, checks and compiles them (off the async threads).
    async fn prepare(
        &self,
        req: &RunRequest,
        sha: [u8; 32],
        detached: Option<Vec<u8>>,
    ) -> Result<Prepared, Box<RunResult>> {
        let bytes = self.module_bytes(req, &sha).await.map_err(Box::new)?;
        let (trust, sandbox) = (self.trust.clone(), self.sandbox.clone());
        tokio::task::spawn_blocking(move || trust.prepare(&sandbox, &bytes, detached.as_deref()))
            .await
            .unwrap_or_else(|e| {
                Err(Box::new(refused(
                    Status::Trap,
                    None,
                    format!("module preparation failed: {e}"),
                )))
            })
    }

    fn store_path(&self, sha_hex: &str) -> PathBuf {
        self.modules_dir.join(format!("{sha_hex}.wasm"))
    }

    /// The module's bytes from the store, or from the platform (`need_module`).
    async fn module_bytes(
        &self,
        req: &RunRequest,
        sha: &[u8; 32],
    ) -> Result<Arc<Vec<u8>>, RunResult> {
        let sha_hex = hex::encode(sha);
        if let Ok(bytes) = std::fs::read(self.store_path(&sha_hex)) {
            if Sha256::digest(&bytes).as_slice() == sha {
                return Ok(Arc::new(bytes));
            }
            tracing::warn!(module = %sha_hex, "a stored module does not match its hash; fetching it again");
            let _ = std::fs::remove_file(self.store_path(&sha_hex));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting)
            .entry(sha_hex.clone())
            .or_default()
            .push(tx);
        let ask = AgentMessage::NeedModule {
            id: req.id.clone(),
            sha256: sha_hex.clone(),
        };
        let _ = self.outbox.send(ask).await;
        match tokio::time::timeout(self.module_wait, rx).await {
            Ok(Ok(bytes)) => Ok(bytes),
            _ => {
                let mut waiting = lock(&self.waiting);
                if let Some(list) = waiting.get_mut(&sha_hex) {
                    list.retain(|s| !s.is_closed());
                    if list.is_empty() {
                        waiting.remove(&sha_hex);
                    }
                }
                Err(refused(
                    Status::Rejected,
                    Some("module_unavailable"),
                    format!(
                        "the platform did not send module {sha_hex} within {} s",
                        self.module_wait.as_secs()
                    ),
                ))
            }
        }
    }

    /// A binary frame arrived: module bytes, valid only if some run asked for that hash.
    pub fn module_arrived(&self, bytes: Vec<u8>) -> Result<(), ErrorBody> {
        let sha_hex = hex::encode(Sha256::digest(&bytes));
        let Some(waiters) = lock(&self.waiting).remove(&sha_hex) else {
            let asked = lock(&self.waiting).keys().cloned().collect::<Vec<_>>();
            let code = if asked.is_empty() {
                ErrorCode::Unexpected
            } else {
                ErrorCode::ModuleMismatch
            };
            return Err(ErrorBody {
                id: None,
                code,
                message: format!("received {} bytes hashing to {sha_hex}, which no run asked for (waiting for {asked:?})", bytes.len()),
            });
        };
        let path = self.store_path(&sha_hex);
        let stored = tempfile::NamedTempFile::new_in(&self.modules_dir)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).map(|_| f))
            .and_then(|f| f.persist(&path).map_err(|e| e.error));
        if let Err(e) = stored {
            tracing::warn!(module = %sha_hex, error = %e, "could not store the module; it will be fetched again next time");
        }
        let bytes = Arc::new(bytes);
        for w in waiters {
            let _ = w.send(bytes.clone());
        }
        Ok(())
    }
}
