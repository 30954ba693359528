//! The daemon's status socket, `STATE/status.sock`: created after the journal opened (so a
//! second daemon on the same state directory, refused by the journal's lock, never replaces a
//! live socket), mode 0600, removed when the daemon stops.
//!
//! Every connection is hostile until checked: the peer's uid (`SO_PEERCRED`) must be the
//! daemon's effective uid or root, else it is closed and a warning logged; the request is one
//! line of at most [`MAX_REQUEST_BYTES`] read within [`REQUEST_TIMEOUT`] into a fixed buffer;
//! the answer is written within the same time. At most [`MAX_CONNECTIONS`] are served at once
//! (the next is not accepted until one ends), so a client that floods, trickles or never sends
//! holds one of four small slots for two seconds and nothing else: no task, no lock, no
//! memory beyond its buffer.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{LocalStatus, MAX_CONNECTIONS, MAX_REQUEST_BYTES, REQUEST_TIMEOUT};
use crate::agent::Agent;

/// What the socket answers with: the agent, and the facts about the daemon it does not hold.
pub struct StatusSource {
    agent: Arc<Agent>,
    platform: String,
    state_dir: PathBuf,
    metrics_listen: Mutex<Option<String>>,
}

impl StatusSource {
    /// The status of `agent`, connected to `platform`, with its state in `state_dir`.
    pub fn new(agent: Arc<Agent>, platform: String, state_dir: PathBuf) -> StatusSource {
        StatusSource {
            agent,
            platform,
            state_dir,
            metrics_listen: Mutex::new(None),
        }
    }

    /// The Prometheus endpoint is listening on `addr` (shown as `metrics_listen`).
    pub fn set_metrics_listen(&self, addr: Option<String>) {
        *self
            .metrics_listen
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// The status now (reads files: call it off the async threads).
    pub fn status(&self) -> LocalStatus {
        let report = self.agent.status_report();
        LocalStatus {
            running: true,
            version: report.agent_version,
            agent_id: Some(report.agent_id),
            platform: Some(self.platform.clone()),
            state_dir: self.state_dir.clone(),
            pid: Some(std::process::id()),
            uptime_secs: Some(report.agent_uptime_secs),
            stats: report.stats,
            on_disk: None,
            audit: report.audit,
            metrics_listen: self
                .metrics_listen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The status socket, served until the [`Served`] handle is dropped.
pub struct Served {
    path: PathBuf,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
        // Nobody answers there any more: `status` then says so at once (no stale socket).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the socket at `path` (replacing a stale socket; anything else there is an error)
/// and serves `source` on it in the background.
pub fn start(path: &Path, source: Arc<StatusSource>) -> Result<Served> {
    let listener = bind(path)?;
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, source, stop.clone()));
    tracing::info!(socket = %path.display(), "status socket ready");
    Ok(Served {
        path: path.to_path_buf(),
        stop,
    })
}

/// Binds the socket, mode 0600.
fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale status socket {}", path.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket: not replacing it (remove it to let the agent create its status socket)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("examining {}", path.display()));
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("creating the status socket {}", path.display()))?;
    // The state directory is 0700 already; the socket is the owner's alone too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting the status socket {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

async fn serve(listener: UnixListener, source: Arc<StatusSource>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first: beyond four, connections wait in the kernel's accept queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        match stream {
            Ok((stream, _)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    answer(stream, &source).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // E.g. out of descriptors: pause rather than spin on the error.
                tracing::warn!("status socket: accept failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Whether a peer of `uid` may ask: the daemon's own user, or root.
fn allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    uid == euid || uid == 0
}

/// Serves one connection: checks the peer, reads the request line, answers, closes.
async fn answer(mut stream: UnixStream, source: &Arc<StatusSource>) {
    match stream.peer_cred() {
        Ok(cred) if allowed(cred.uid()) => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = ?cred.pid(),
                "status socket: refusing a connection from another user"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("status socket: cannot read the peer's credentials: {e}");
            return;
        }
    }
    let mut buf = [0u8; MAX_REQUEST_BYTES];
    let request =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut stream, &mut buf)).await {
            Ok(Ok(line)) => line,
            Ok(Err(why)) => {
                tracing::debug!("status socket: closing a connection: {why}");
                return;
            }
            Err(_) => {
                tracing::debug!("status socket: closing a connection: no request line within 2 s");
                return;
            }
        };
    let mut answer = match request {
        b"status" => {
            let source = source.clone();
            match tokio::task::spawn_blocking(move || source.status()).await {
                Ok(status) => serde_json::to_vec(&status).unwrap_or_default(),
                Err(e) => {
                    tracing::error!("status socket: building the status failed: {e}");
                    return;
                }
            }
        }
        other => {
            let error = format!(
                "unknown request {:?}: send \"status\\n\"",
                String::from_utf8_lossy(other)
            );
            serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default()
        }
    };
    answer.push(b'\n');
    let written = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("status socket: the client did not take its answer");
    }
}

/// Reads one line into `buf` (which bounds it); the line without its `\n`.
async fn read_line<'b>(stream: &mut UnixStream, buf: &'b mut [u8]) -> Result<&'b [u8], String> {
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].iter().position(|b| *b == b'\n') {
            return Ok(&buf[..end]);
        }
        if len == buf.len() {
            return Err(format!(
                "the request line is longer than {} bytes",
                buf.len()
            ));
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) => return Err("the client closed before a full request line".into()),
            Ok(n) => len += n,
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("status.sock");
        std::fs::write(&path, "not a socket").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = bind(&path).expect_err("a file is not replaced").to_string();
            assert!(err.contains("not a socket"), "{err}");
            std::fs::remove_file(&path).unwrap();
            drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
            let listener = bind(&path).expect("a stale socket is replaced");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            drop(listener);
        });
    }

    #[test]
    fn the_daemons_user_and_root_are_allowed() {
        // SAFETY: as in `allowed`.
        let euid = unsafe { libc::geteuid() };
        assert!(allowed(euid));
        assert!(allowed(0));
        let other = if euid == 65534 { 65533 } else { 65534 };
        assert!(!allowed(other));
    }
}
