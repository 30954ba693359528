//! The agent proper: what it does with the platform's requests, independent of the transport.
//!
//! A `run` names a module by SHA-256. The agent runs it from its caches when it can (a warm run
//! reads no bytes and verifies nothing again), from its module store (`<state>/modules`, which
//! holds only modules that passed the trust policy) when it has the bytes, and otherwise asks the
//! platform for them (`need_module`) and waits for one binary frame whose SHA-256 is the one
//! asked for. Every `run` produces exactly one `result`
//! in the outbox, whatever happens (refusal, missing module, any ending of the handler).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Task ids in progress, with how many runs of each (a task id can arrive twice).
    running: Mutex<BTreeMap<String, usize>>,
    /// Runs accepted and not finished (queued or executing); bounded by `max_pending`.
    pending: AtomicUsize,
    max_pending: usize,
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
        let max_pending = 4 * sandbox.config().max_concurrent_runs as usize;
        Ok(Arc::new(Agent {
            agent_id,
            sandbox,
            trust: Arc::new(trust),
            modules_dir,
            module_wait: Duration::from_secs(60),
            outbox: tx,
            outbox_rx: Mutex::new(Some(rx)),
            waiting: Mutex::new(HashMap::new()),
            running: Mutex::new(BTreeMap::new()),
            pending: AtomicUsize::new(0),
            max_pending,
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
            running: lock(&self.running).keys().cloned().collect(),
            agent_uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// Starts a `run` in the background; its `result` goes to the outbox. Beyond `max_pending`
    /// runs in progress the run is refused at once (`rejected`, reason `busy`): a platform cannot
    /// make the agent hold an unbounded number of requests.
    pub fn start_run(self: &Arc<Self>, req: RunRequest) {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(task_id = %req.task_id, "refusing a run: {} already in progress", self.max_pending);
            let result = refused(
                Status::Rejected,
                Some("busy"),
                format!(
                    "the agent already has {} runs in progress",
                    self.max_pending
                ),
            );
            let msg = AgentMessage::Result {
                id: req.id,
                task_id: req.task_id,
                result,
            };
            if self.outbox.try_send(msg).is_err() {
                tracing::warn!("the outbox is full; the busy refusal was dropped");
            }
            return;
        }
        let this = self.clone();
        *lock(&self.running).entry(req.task_id.clone()).or_insert(0) += 1;
        tokio::spawn(async move {
            tracing::info!(task_id = %req.task_id, module = %req.module_sha256, "task started");
            let mut result = this.execute(&req).await;
            tracing::info!(task_id = %req.task_id, status = %result.status, "task finished");
            {
                let mut running = lock(&this.running);
                if let Some(n) = running.get_mut(&req.task_id) {
                    *n -= 1;
                    if *n == 0 {
                        running.remove(&req.task_id);
                    }
                }
            }
            fit_to_frame(&mut result, &req.id, &req.task_id);
            let msg = AgentMessage::Result {
                id: req.id,
                task_id: req.task_id,
                result,
            };
            let _ = this.outbox.send(msg).await;
            this.pending.fetch_sub(1, Ordering::SeqCst);
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
        let store = self.store_path(&hex::encode(sha));
        let dir = self.modules_dir.clone();
        tokio::task::spawn_blocking(move || {
            let prepared = trust.prepare(&sandbox, &bytes, detached.as_deref())?;
            // Only modules that passed the trust policy and compiled are kept on disk.
            if !store.exists() {
                let stored = tempfile::NamedTempFile::new_in(&dir)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).map(|_| f))
                    .and_then(|f| f.persist(&store).map_err(|e| e.error));
                if let Err(e) = stored {
                    tracing::warn!(error = %e, "could not store the module; it will be fetched again next time");
                }
            }
            Ok(prepared)
        })
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
        let max = self.sandbox.config().max_module_bytes;
        if bytes.len() as u64 > max {
            return Err(ErrorBody {
                id: None,
                code: ErrorCode::Oversize,
                message: format!(
                    "a module of {} bytes exceeds the agent's limit of {max} bytes",
                    bytes.len()
                ),
            });
        }
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
        let bytes = Arc::new(bytes);
        for w in waiters {
            let _ = w.send(bytes.clone());
        }
        Ok(())
    }
}

/// Makes a result fit in one text frame: the platform refuses frames over
/// [`bridge_protocol::MAX_TEXT_BYTES`] or nested deeper than [`bridge_protocol::MAX_DEPTH`], and
/// a result it refuses is a result lost. First `output` goes (it repeats stdout, parsed), then
/// stdout and stderr are cut (marked truncated; their total byte counts stay exact).
pub fn fit_to_frame(result: &mut RunResult, id: &str, task_id: &str) {
    use bridge_protocol::codec::{encode, json_depth};
    let size = |r: &RunResult| {
        let msg = AgentMessage::Result {
            id: id.to_string(),
            task_id: task_id.to_string(),
            result: r.clone(),
        };
        let text = encode(&msg);
        (text.len(), json_depth(&text))
    };
    let (len, depth) = size(result);
    if len <= bridge_protocol::MAX_TEXT_BYTES && depth <= bridge_protocol::MAX_DEPTH {
        return;
    }
    if !result.output.is_null() {
        result.output = serde_json::Value::Null;
        let note = "the output was too large or too deep for one message; it is in `stdout`";
        result.error = Some(match result.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
    // Escaping can grow text up to 6×; halve the streams until the frame fits.
    while size(result).0 > bridge_protocol::MAX_TEXT_BYTES {
        for (text, flag) in [
            (&mut result.stdout, &mut result.truncated.stdout),
            (&mut result.stderr, &mut result.truncated.stderr),
        ] {
            if text.len() > 1024 {
                let mut cut = text.len() / 2;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                *flag = true;
            }
        }
        if result.stdout.len() <= 1024 && result.stderr.len() <= 1024 {
            // Only the error text can still be large; cut it too.
            if let Some(e) = result.error.as_mut() {
                let mut cut = e.len().min(4096);
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_results_are_cut_to_fit_one_frame() {
        let mut r = RunResult::refused(Status::Ok, "x");
        r.error = None;
        r.stdout = "\u{1}".repeat(900_000); // escapes to ~5.4 MB of JSON
        r.stderr = "é".repeat(400_000);
        r.output = serde_json::json!({"big": "y".repeat(600_000)});
        fit_to_frame(&mut r, "run-1", "task-1");
        let msg = AgentMessage::Result {
            id: "run-1".into(),
            task_id: "task-1".into(),
            result: r.clone(),
        };
        let text = bridge_protocol::codec::encode(&msg);
        assert!(
            text.len() <= bridge_protocol::MAX_TEXT_BYTES,
            "{}",
            text.len()
        );
        assert!(r.output.is_null());
        assert!(r.truncated.stdout && r.truncated.stderr);
        assert!(r.error.unwrap().contains("too large"));
    }

    #[test]
    fn too_deep_output_is_dropped_and_small_results_are_untouched() {
        let mut deep = RunResult::refused(Status::Ok, "x");
        deep.error = None;
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        deep.output = serde_json::from_str(&nested).unwrap();
        fit_to_frame(&mut deep, "i", "t");
        assert!(deep.output.is_null());

        let mut small = RunResult::refused(Status::Ok, "x");
        small.output = serde_json::json!({"a": 1});
        let before = small.clone();
        fit_to_frame(&mut small, "i", "t");
        assert_eq!(small, before);
    }
}
