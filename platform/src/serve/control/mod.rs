//! The control interface: newline-delimited JSON over a Unix socket in the state directory.
//!
//! Whoever can use this interface controls every agent (enrollment tokens, modules and shell
//! rules run on them, handlers installed), so it is reachable by the server's own user only:
//!
//! * The socket is `<state>/control.sock` ([`SOCKET_NAME`], mode 0600), inside the state
//!   directory, which the server keeps at mode 0700 and owned by its user
//!   ([`super::tls::ensure_state_dir`]).
//! * Each connection's peer credentials (`SO_PEERCRED`) are checked: only the server's
//!   effective uid and root are served. Anyone else gets one error line
//!   (`{"ok":false,"error":"refused: …"}`) and the connection is closed.
//! * There is no TCP listener, so a web page cannot reach the interface; and a line that looks
//!   like HTTP ([`looks_like_http`]) is refused anyway.
//!
//! One request per line, one response line per request, in order; a connection may carry any
//! number of requests (they are handled one after the other: open several connections to run
//! tasks in parallel). Every response has `"ok": true` plus the command's fields, or
//! `"ok": false, "error": "…"`. A line that does not parse as a request (not JSON, unknown
//! `cmd`, a missing or unknown field, or a line that looks like HTTP) gets one error response
//! and the connection is closed. A request that parses but cannot be carried out (bad base64,
//! unknown agent…) gets an error response and the connection goes on. Blank lines are
//! ignored. Lines are limited to [`MAX_LINE_BYTES`].
//! A `run` with `"stream": true` is the one request answered with more than one line: zero or
//! more event lines (`{"event":"chunk",…}`, no `ok` field) come before its response. At most
//! [`CHUNK_QUEUE`] chunks wait for a client that reads slowly; beyond that chunks are dropped
//! (the next event line counts their bytes in `dropped_bytes`; its `seq` skips). Every line is
//! written within [`WRITE_TIMEOUT`], or the connection is closed (a client that stopped reading
//! does not hold a request forever).
//!
//! | request | response |
//! | --- | --- |
//! | `{"cmd":"agents"}` | `{"ok":true,"agents":[{"id","connected","enrolled_at","last_seen","status"}]}` |
//! | `{"cmd":"token"}` | `{"ok":true,"token":"…"}` (a new enrollment token) |
//! | `{"cmd":"run","agent", one of "module"(base64) / "module_sha256" / "command", "input"?,"args"?,"task_id"?,"limits"?,"signature"?(base64),"not_after"?(RFC 3339),"idempotent"?,"stream"?,"wait_ms"?}` | `{"ok":true,"task_id":"…","result":{RunResult},"round_trip_us":…,"stored":false}` (send → result, measured here; `"stored":true` and no round trip: the task id's result was already stored, from this agent, and nothing was sent to it; a task id with another agent's result is refused); with `stream`, preceded by `{"event":"chunk","task_id","seq","stream","data","dropped_bytes"}` lines |
//! | `{"cmd":"result","task_id","wait_ms"?}` | `{"ok":true,"task_id","agent","result":{RunResult},"received_at","deliveries"}`: the stored result (waiting up to `wait_ms`, default 0, for it) |
//! | `{"cmd":"cancel","agent","task_id","wait_ms"?}` | `{"ok":true,"task_id","outcome":"cancelling"\|"dequeued"\|"finished"\|"unknown"}` |
//! | `{"cmd":"install_handler","agent","name", "module"(base64) or "module_sha256","signature"?(base64),"wait_ms"?}` | `{"ok":true,"handlers":[{"name","module_sha256","installed_at","key"?}]}` (the list after the change) |
//! | `{"cmd":"remove_handler","agent","name","wait_ms"?}` | `{"ok":true,"handlers":[…]}` |
//! | `{"cmd":"handlers","agent","wait_ms"?}` | `{"ok":true,"handlers":[…]}` |
//! | `{"cmd":"send","agent","text","wait_ms"?}` | `{"ok":true,"reply":{ErrorBody}\|null}`: a raw frame to the agent, and its `error` answer (testing aid) |
//!
//! `run` waits `wait_ms` (default [`DEFAULT_RUN_WAIT_MS`]; `timeout_ms` is an older name of the
//! same field) for the result, across reconnections of the agent; the other requests to an agent
//! wait [`DEFAULT_REQUEST_WAIT_MS`] for its reply (a module upload included) and fail if the
//! connection ends first.

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use bridge_protocol::{LimitRequest, RunResult};
use bridge_signing::timefmt::{format_rfc3339, parse_rfc3339};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::hub::{ChunkEvent, Hub, RunOrder};

/// The control socket's file name in the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// The control socket's mode (the state directory around it is 0700).
pub const SOCKET_MODE: u32 = 0o600;
/// The longest path a Unix socket can have (`sun_path` is 108 bytes with its final NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The longest request line accepted (a 32 MiB module is about 43 MiB of base64).
pub const MAX_LINE_BYTES: u64 = 64 << 20;
/// How long a `run` waits for its result unless `wait_ms` says otherwise.
pub const DEFAULT_RUN_WAIT_MS: u64 = 60_000;
/// How long the other requests to an agent wait for its reply unless `wait_ms` says otherwise.
pub const DEFAULT_REQUEST_WAIT_MS: u64 = 30_000;
/// How long `send` waits for the agent's error unless `wait_ms` says otherwise.
pub const DEFAULT_SEND_WAIT_MS: u64 = 2_000;
/// How many chunks of a streaming `run` may wait for the client.
pub const CHUNK_QUEUE: usize = 256;
/// How long writing one line to a client may take before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// List the enrolled agents.
    Agents {},
    /// Issue a new enrollment token.
    Token {},
    /// Run a task on an agent and wait for the result.
    Run(Box<RunCommand>),
    /// The stored result of a task.
    Result {
        /// The task id.
        task_id: String,
        /// How long to wait for a result that is not stored yet (default 0: do not wait).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Ask an agent to cancel a task.
    Cancel {
        /// The agent id.
        agent: String,
        /// The task id.
        task_id: String,
        /// How long to wait for the reply (default [`DEFAULT_REQUEST_WAIT_MS`]).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Install (or replace) a named handler on an agent.
    InstallHandler(Box<InstallCommand>),
    /// Remove a named handler from an agent.
    RemoveHandler {
        /// The agent id.
        agent: String,
        /// The handler's name.
        name: String,
        /// How long to wait for the reply (default [`DEFAULT_REQUEST_WAIT_MS`]).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// List an agent's installed handlers.
    Handlers {
        /// The agent id.
        agent: String,
        /// How long to wait for the reply (default [`DEFAULT_REQUEST_WAIT_MS`]).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Development and test aid: send one raw text frame to an agent and report the `error` it
    /// answers with, if any (within `wait_ms`, default [`DEFAULT_SEND_WAIT_MS`]).
    Send {
        /// The agent id.
        agent: String,
        /// The frame's text, sent as is.
        text: String,
        /// How long to wait for the agent's error reply.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
}

/// The fields of a `run` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// The agent id.
    pub agent: String,
    /// The module's bytes, base64 (standard alphabet, padded). Exactly one of `module`,
    /// `module_sha256` and `command` is given.
    #[serde(default)]
    pub module: Option<String>,
    /// SHA-256 (hex) of a module the platform already stores.
    #[serde(default)]
    pub module_sha256: Option<String>,
    /// A command: a handler installed on the agent, or one of its shell rules.
    #[serde(default)]
    pub command: Option<String>,
    /// The task input (default `null`).
    #[serde(default)]
    pub input: Value,
    /// argv\[1..\].
    #[serde(default)]
    pub args: Vec<String>,
    /// The task id (default: a fresh UUID).
    #[serde(default)]
    pub task_id: Option<String>,
    /// Requested limits (`limits.timeout_ms` is the task's time limit).
    #[serde(default)]
    pub limits: LimitRequest,
    /// A detached signature envelope, base64 (with a module only).
    #[serde(default)]
    pub signature: Option<String>,
    /// RFC 3339 time after which the task must not start; sent to the agent in UTC.
    #[serde(default)]
    pub not_after: Option<String>,
    /// The task may run again if the agent dies while running it.
    #[serde(default)]
    pub idempotent: bool,
    /// Stream the task's output as event lines before the response.
    #[serde(default)]
    pub stream: bool,
    /// How long to wait for the result (default [`DEFAULT_RUN_WAIT_MS`]).
    #[serde(default, alias = "timeout_ms")]
    pub wait_ms: Option<u64>,
}

/// The fields of an `install_handler` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallCommand {
    /// The agent id.
    pub agent: String,
    /// The command name the handler answers to.
    pub name: String,
    /// The module's bytes, base64; or `module_sha256`.
    #[serde(default)]
    pub module: Option<String>,
    /// SHA-256 (hex) of a module the platform already stores.
    #[serde(default)]
    pub module_sha256: Option<String>,
    /// A detached signature envelope, base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// How long to wait for the reply (default [`DEFAULT_REQUEST_WAIT_MS`]).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// The control socket of the server whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// The effective uid of this process: the user the control interface serves (with root).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The control socket's file, removed when this is dropped (unless another socket has replaced
/// it by then).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// Binds the control socket in `state_dir` (a directory [`super::tls::ensure_state_dir`]
/// checked) with mode [`SOCKET_MODE`]. A socket left there by a server that is gone is
/// replaced; a socket that answers (another `bridgectl serve` uses this state directory) or a
/// file of another kind is an error.
pub fn bind(state_dir: &Path) -> Result<(UnixListener, SocketFile)> {
    let path = socket_path(state_dir);
    if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        bail!(
            "the control socket's path {} is longer than {MAX_SOCKET_PATH_BYTES} bytes, the most a Unix socket can have: use a shorter --state path",
            path.display()
        );
    }
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => bail!(
                    "another bridgectl serve is using the state directory {} (its control socket {} answers)",
                    state_dir.display(),
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    fs::remove_file(&path).with_context(|| {
                        format!("cannot remove the stale control socket {}", path.display())
                    })?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot tell whether {} is in use", path.display())
                    })
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: it is where the control socket goes; remove it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {} (control)", path.display()))?;
    let meta = fs::symlink_metadata(&path)
        .with_context(|| format!("cannot inspect {}", path.display()))?;
    let file = SocketFile {
        path,
        inode: (meta.dev(), meta.ino()),
    };
    fs::set_permissions(&file.path, fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("cannot set the permissions of {}", file.path.display()))?;
    Ok((listener, file))
}

/// Serves control connections on `listener` until `shutdown` changes.
pub async fn serve(listener: UnixListener, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(admit(stream, hub.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!("control accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    // Connections see the shutdown too; give them a moment to answer, then drop them.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

/// Serves a connection whose peer is the server's user or root; refuses anyone else with one
/// error line.
async fn admit(stream: UnixStream, hub: Arc<Hub>, shutdown: watch::Receiver<bool>) {
    let euid = effective_uid();
    let refusal = match stream.peer_cred() {
        Ok(peer) if peer.uid() == euid || peer.uid() == 0 => {
            tracing::debug!(uid = peer.uid(), pid = ?peer.pid(), "control connection");
            return connection(stream, hub, shutdown).await;
        }
        Ok(peer) => {
            tracing::warn!(
                uid = peer.uid(),
                pid = ?peer.pid(),
                "control connection refused: not the server's user"
            );
            format!(
                "refused: the control interface serves its own user (uid {euid}) and root only, not uid {}",
                peer.uid()
            )
        }
        Err(e) => {
            tracing::warn!("control connection refused: no peer credentials: {e}");
            format!("refused: cannot check who is connecting: {e}")
        }
    };
    let (_, mut write) = stream.into_split();
    let _ = write_line(&mut write, &failure(refusal)).await;
}

/// The HTTP methods a request line may start with.
const HTTP_METHODS: [&str; 9] = [
    "GET ", "POST ", "PUT ", "HEAD ", "OPTIONS ", "CONNECT ", "DELETE ", "PATCH ", "TRACE ",
];

/// Whether `line` looks like part of an HTTP request (a request line such as `POST / HTTP/1.1`)
/// rather than a control request. A line that starts with `{` never does: a request may carry
/// such text in its strings.
pub fn looks_like_http(line: &[u8]) -> bool {
    let start = line.trim_ascii_start();
    if start.starts_with(b"{") {
        return false;
    }
    let head = &start[..start.len().min(8192)];
    HTTP_METHODS.iter().any(|m| head.starts_with(m.as_bytes()))
        || head.windows(6).any(|w| w == b" HTTP/")
}

async fn connection(stream: UnixStream, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE_BYTES + 1);
        let read = tokio::select! {
            r = limited.read_until(b'\n', &mut line) => r,
            _ = shutdown.changed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() as u64 > MAX_LINE_BYTES {
            let response = failure(format!(
                "request line longer than {MAX_LINE_BYTES} bytes; closing the connection"
            ));
            let _ = write_line(&mut write, &response).await;
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // A line that is not a request ends the connection: nothing after it is executed (the
        // JSON lines in the body of an HTTP request, say).
        if looks_like_http(&line) {
            let response = failure(
                "bad request: this is the control interface of bridgectl serve (one JSON request per line), not an HTTP server; closing the connection",
            );
            let _ = write_line(&mut write, &response).await;
            return;
        }
        let request: ControlRequest = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(e) => {
                let response = failure(format!("bad request: {e}; closing the connection"));
                let _ = write_line(&mut write, &response).await;
                return;
            }
        };
        let response = tokio::select! {
            r = respond(&hub, request, &mut write) => r,
            _ = shutdown.changed() => json!({"ok": false, "error": "the platform is shutting down"}).into(),
        };
        if write_line(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// Writes one line, within [`WRITE_TIMEOUT`].
async fn write_line(
    write: &mut OwnedWriteHalf,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(value).expect("responses serialize");
    text.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&text).await?;
        write.flush().await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the control client read nothing for 30 s",
        )
    })?
}

fn failure(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}

fn decode_b64(field: &str, text: Option<&str>) -> Result<Option<Vec<u8>>, Value> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    text.map(|t| b64.decode(t.as_bytes()))
        .transpose()
        .map_err(|e| failure(format!("bad request: `{field}` is not base64: {e}")))
}

fn wait(wait_ms: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(wait_ms.unwrap_or(default_ms))
}

/// A response: a `run`'s, serialized straight from its result (the hot path of a busy
/// platform), or any other as a JSON value.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Response {
    Run(Box<RunResponse>),
    Other(Value),
}

impl From<Value> for Response {
    fn from(value: Value) -> Response {
        Response::Other(value)
    }
}

/// A successful `run`'s response.
#[derive(serde::Serialize)]
struct RunResponse {
    ok: bool,
    task_id: String,
    result: RunResult,
    round_trip_us: f64,
    stored: bool,
}

/// Answers one request; a streaming `run` writes its event lines to `write` first.
async fn respond(hub: &Hub, request: ControlRequest, write: &mut OwnedWriteHalf) -> Response {
    let response = match request {
        ControlRequest::Agents {} => json!({"ok": true, "agents": hub.agents()}),
        ControlRequest::Token {} => match hub.issue_token() {
            Ok(token) => json!({"ok": true, "token": token}),
            Err(e) => failure(format!("{e:#}")),
        },
        ControlRequest::Run(run) => {
            return match run_order(*run) {
                Ok(order) => run_task(hub, order, write).await,
                Err(response) => response.into(),
            }
        }
        ControlRequest::Result { task_id, wait_ms } => {
            match hub.wait_result(&task_id, wait(wait_ms, 0)).await {
                Ok(stored) => {
                    let mut response = json!(stored);
                    response["ok"] = json!(true);
                    response
                }
                Err(e) => failure(e),
            }
        }
        ControlRequest::Cancel {
            agent,
            task_id,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            match hub.cancel(&agent, task_id.clone(), wait).await {
                Ok(outcome) => json!({"ok": true, "task_id": task_id, "outcome": outcome}),
                Err(e) => failure(e),
            }
        }
        ControlRequest::InstallHandler(install) => {
            let install = *install;
            let module = match decode_b64("module", install.module.as_deref()) {
                Ok(m) => m,
                Err(response) => return response.into(),
            };
            if let Err(response) = decode_b64("signature", install.signature.as_deref()) {
                return response.into();
            }
            let wait = wait(install.wait_ms, DEFAULT_REQUEST_WAIT_MS);
            let installed = hub
                .install_handler(
                    &install.agent,
                    install.name,
                    module,
                    install.module_sha256,
                    install.signature,
                    wait,
                )
                .await;
            handlers_response(installed)
        }
        ControlRequest::RemoveHandler {
            agent,
            name,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            handlers_response(hub.remove_handler(&agent, name, wait).await)
        }
        ControlRequest::Handlers { agent, wait_ms } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            handlers_response(hub.handlers(&agent, wait).await)
        }
        ControlRequest::Send {
            agent,
            text,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_SEND_WAIT_MS);
            match hub.send_raw(&agent, text, wait).await {
                Ok(reply) => json!({"ok": true, "reply": reply}),
                Err(e) => failure(e),
            }
        }
    };
    Response::Other(response)
}

fn handlers_response(
    handlers: Result<Vec<bridge_protocol::HandlerInfo>, super::hub::HubError>,
) -> Value {
    match handlers {
        Ok(handlers) => json!({"ok": true, "handlers": handlers}),
        Err(e) => failure(e),
    }
}

/// Checks a `run` request and turns it into an order; `Err` is the response to give.
fn run_order(run: RunCommand) -> Result<RunOrder, Value> {
    let given = [
        run.module.is_some(),
        run.module_sha256.is_some(),
        run.command.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(failure(
            "bad request: give exactly one of `module` (base64), `module_sha256` and `command`",
        ));
    }
    let module = decode_b64("module", run.module.as_deref())?;
    decode_b64("signature", run.signature.as_deref())?;
    let not_after = match run.not_after.as_deref().map(parse_rfc3339) {
        None => None,
        Some(Ok(unix)) => Some(format_rfc3339(unix)),
        Some(Err(e)) => return Err(failure(format!("bad request: `not_after`: {e}"))),
    };
    Ok(RunOrder {
        agent: run.agent,
        module,
        module_sha256: run.module_sha256,
        command: run.command,
        input: run.input,
        args: run.args,
        task_id: run.task_id,
        limits: run.limits,
        signature: run.signature,
        not_after,
        idempotent: run.idempotent,
        stream: run.stream,
        wait: wait(run.wait_ms, DEFAULT_RUN_WAIT_MS),
    })
}

/// The event line of one chunk.
fn chunk_line(chunk: &ChunkEvent) -> Value {
    json!({
        "event": "chunk",
        "task_id": chunk.task_id,
        "seq": chunk.seq,
        "stream": chunk.stream,
        "data": chunk.data,
        "dropped_bytes": chunk.dropped_bytes,
    })
}

/// Runs a task; with `order.stream`, writes each chunk as an event line while waiting (at most
/// [`CHUNK_QUEUE`] wait; more are dropped, see the module documentation).
async fn run_task(hub: &Hub, order: RunOrder, write: &mut OwnedWriteHalf) -> Response {
    let (tx, mut rx) = mpsc::channel(CHUNK_QUEUE);
    let chunks = order.stream.then_some(tx);
    let run = hub.run(order, chunks);
    tokio::pin!(run);
    // Once the client is gone, stop writing events but still wait for the result (it is
    // stored either way).
    let mut writable = true;
    let outcome = loop {
        tokio::select! {
            biased;
            Some(chunk) = rx.recv() => {
                if writable && write_line(write, &chunk_line(&chunk)).await.is_err() {
                    writable = false;
                }
            }
            outcome = &mut run => break outcome,
        }
    };
    // Chunks are forwarded before the result that ends the run: drain what is left.
    while let Ok(chunk) = rx.try_recv() {
        if writable && write_line(write, &chunk_line(&chunk)).await.is_err() {
            writable = false;
        }
    }
    match outcome {
        Ok(outcome) => Response::Run(Box::new(RunResponse {
            ok: true,
            task_id: outcome.task_id,
            result: outcome.result,
            round_trip_us: outcome.round_trip.as_secs_f64() * 1e6,
            stored: outcome.stored,
        })),
        Err(e) => failure(e).into(),
    }
}

/// Sends one request to the control socket at `socket` and returns the response, waiting at
/// most `wait` for it. A response with `"ok": false` is returned as an error holding its
/// `error` text.
pub fn request(socket: impl AsRef<Path>, request: &Value, wait: Duration) -> Result<Value> {
    request_with_events(socket, request, wait, |_| {})
}

/// Like [`request`], handing each event line that comes before the response (a streaming
/// `run`'s chunks) to `on_event`; `wait` bounds the wait for each line.
pub fn request_with_events(
    socket: impl AsRef<Path>,
    request: &Value,
    wait: Duration,
    mut on_event: impl FnMut(&Value),
) -> Result<Value> {
    let socket = socket.as_ref();
    let at = socket.display();
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        let hint = if socket.to_str().is_some_and(|s| s.parse::<std::net::SocketAddr>().is_ok()) {
            " (--control takes the path of the control socket, <state>/control.sock, as `bridgectl serve` prints it in `control`)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot connect to the control socket {at}: {e}{hint}")
    })?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let mut text = serde_json::to_vec(request).expect("requests serialize");
    text.push(b'\n');
    // A server that refuses us answers one line and closes, perhaps before the request is
    // written: then that line, if there is one, says why.
    let sent = (&stream).write_all(&text);
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        if line.trim().is_empty() {
            if let Err(e) = sent {
                return Err(e).with_context(|| format!("cannot send to {at}"));
            }
            read.with_context(|| format!("no response from {at}"))?;
            bail!("the control interface at {at} closed the connection without answering");
        }
        let response: Value = serde_json::from_str(&line).with_context(|| {
            format!("the control interface at {at} answered something else than JSON")
        })?;
        if response.get("event").is_some() && response.get("ok").is_none() {
            on_event(&response);
            continue;
        }
        if response["ok"] != Value::Bool(true) {
            let error = response["error"].as_str().unwrap_or("unknown error");
            bail!("{error}");
        }
        return Ok(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"agents"}"#).unwrap();
        assert!(matches!(r, ControlRequest::Agents {}));
        let r: ControlRequest = serde_json::from_str(
            r#"{"cmd":"run","agent":"a","module":"AA==","limits":{"fuel":5},"timeout_ms":7}"#,
        )
        .unwrap();
        let ControlRequest::Run(run) = r else {
            panic!()
        };
        assert_eq!(run.limits.fuel, Some(5));
        assert_eq!(
            run.wait_ms,
            Some(7),
            "timeout_ms is the older name of wait_ms"
        );
        assert!(run.input.is_null());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"nope"}"#).is_err());
        for unknown_field in [r#"{"cmd":"token","x":1}"#, r#"{"cmd":"agents","x":1}"#] {
            assert!(serde_json::from_str::<ControlRequest>(unknown_field).is_err());
        }
    }

    #[test]
    fn http_is_recognised() {
        for line in [
            "GET / HTTP/1.1\r\n",
            "POST /x HTTP/1.0\r\n",
            "OPTIONS * HTTP/1.1\r\n",
            "CONNECT 127.0.0.1:1 HTTP/1.1\r\n",
            "  PUT /\n",
            "PRI * HTTP/2.0\r\n",
            "whatever /path HTTP/1.1\r\n",
        ] {
            assert!(looks_like_http(line.as_bytes()), "{line:?}");
        }
        for line in [
            r#"{"cmd":"agents"}"#,
            r#"{"cmd":"run","agent":"a","command":"c","input":"GET / HTTP/1.1"}"#,
            " {\"cmd\":\"token\"}",
            "not json",
            "Host: example",
        ] {
            assert!(!looks_like_http(line.as_bytes()), "{line:?}");
        }
    }
}
