//! The control interface: newline-delimited JSON over a Unix socket in the state directory; this
//! file owns the socket, who may connect, and the connection's line loop.
//!
//! The parts: `requests` (the requests as parsed), `respond` (what each one does) and `client`
//! (the client side, [`request`]).
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
//! | `{"cmd":"agents"}` | `{"ok":true,"agents":[{"id","connected","enrolled_at","last_seen","status","audit":{"seq","hash","flag"}\|null,"audit_error"?}]}` (`flag`: null or `{"kind":"backwards"\|"fork"\|"unverifiable","detail","seq","flagged_at"}`) |
//! | `{"cmd":"audit_clear","agent"}` | `{"ok":true,"agent","cleared":{flag}\|null}`: the agent's audit flag cleared ([`crate::serve::audit`]) |
//! | `{"cmd":"token"}` | `{"ok":true,"token":"…"}` (a new enrollment token) |
//! | `{"cmd":"run","agent", one of "module"(base64) / "file_sha256" (or its old name "module_sha256") / "command", "input"?,"args"?,"task_id"?,"limits"?,"signature"?(base64),"not_after"?(RFC 3339),"idempotent"?,"stream"?,"wait_ms"?}` | `{"ok":true,"task_id":"…","result":{RunResult},"round_trip_us":…,"stored":false}` (send → result, measured here; `"stored":true` and no round trip: the task id's result was already stored, from this agent, and nothing was sent to it; a task id with another agent's result is refused); with `stream`, preceded by `{"event":"chunk","task_id","seq","stream","data","dropped_bytes"}` lines |
//! | `{"cmd":"result","task_id","wait_ms"?}` | `{"ok":true,"task_id","agent","result":{RunResult},"received_at","deliveries"}`: the stored result (waiting up to `wait_ms`, default 0, for it) |
//! | `{"cmd":"cancel","agent","task_id","wait_ms"?}` | `{"ok":true,"task_id","outcome":"cancelling"\|"dequeued"\|"finished"\|"unknown"}` |
//! | `{"cmd":"install_handler","agent","name", "module"(base64) or "file_sha256" (or "module_sha256"),"signature"?(base64),"wait_ms"?}` | `{"ok":true,"handlers":[{"name","file_sha256","code_sha256","installed_at","key"?}]}` (the list after the change) |
//! | `{"cmd":"remove_handler","agent","name","wait_ms"?}` | `{"ok":true,"handlers":[…]}` |
//! | `{"cmd":"handlers","agent","wait_ms"?}` | `{"ok":true,"handlers":[…]}` |
//! | `{"cmd":"send","agent","text","wait_ms"?}` | `{"ok":true,"reply":{ErrorBody}\|null}`: a raw frame to the agent, and its `error` answer (testing aid) |
//! | `{"cmd":"update","agent","manifest","binary"?,"allow_downgrade"?,"drain_timeout_ms"?,"wait_ms"?}` | `{"ok":true,"update":{"id","agent","version","state":"succeeded"\|"failed"\|"refused"\|"timeout","staged","reason"?,"detail"?,"agent_version"?}}` |
//! | `{"cmd":"rollout","manifest","binary"?,"canary","batch_percent","max_failures","allow_downgrade"?,"drain_timeout_ms"?,"agent_wait_ms"?}` | `{"ok":true,"rollout":{RolloutStatus}}`: started |
//! | `{"cmd":"rollout_status","wait_ms"?}` | `{"ok":true,"rollout":{RolloutStatus}\|null}` (waiting up to `wait_ms`, default 0, for it to be over) |
//!
//! `run` waits `wait_ms` (default [`DEFAULT_RUN_WAIT_MS`]; `timeout_ms` is an older name of the
//! same field) for the result, across reconnections of the agent; the other requests to an agent
//! wait [`DEFAULT_REQUEST_WAIT_MS`] for its reply (a module upload included) and fail if the
//! connection ends first.
//! `update` and `rollout` name files the server reads (absolute paths: a manifest, and the
//! binary, by default the manifest's path without `.manifest`); `update` waits `wait_ms`
//! (default [`DEFAULT_UPDATE_WAIT_MS`]) for the verdict, across the agent's restart.

mod client;
mod requests;
mod respond;

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use self::client::{request, request_with_events};
pub use self::requests::{
    ControlRequest, InstallCommand, RolloutCommand, RunCommand, UpdateCommand,
};
use self::respond::{failure, respond};
use super::hub::Hub;

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
/// How long `update` waits for the verdict (and a rollout for each agent's) unless told
/// otherwise.
pub const DEFAULT_UPDATE_WAIT_MS: u64 = 600_000;
/// How long `send` waits for the agent's error unless `wait_ms` says otherwise.
pub const DEFAULT_SEND_WAIT_MS: u64 = 2_000;
/// How many chunks of a streaming `run` may wait for the client.
pub const CHUNK_QUEUE: usize = 256;
/// How long writing one line to a client may take before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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
pub(super) async fn write_line(
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

#[cfg(test)]
mod tests {
    use super::*;

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
