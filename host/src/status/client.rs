//! The command's end of the status socket: ask the daemon; when nobody answers, read the state
//! directory instead.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};

use super::{offline, socket_path, LocalStatus, Location, MAX_ANSWER_BYTES, REQUEST_TIMEOUT};

/// What asking found.
#[derive(Debug)]
pub enum Answer {
    /// The daemon answered.
    Running(LocalStatus),
    /// Nobody answers on the socket (`why`); what the state directory tells.
    NotRunning {
        /// Why the daemon is taken not to run (no socket, connection refused).
        why: String,
        /// The offline facts.
        status: LocalStatus,
    },
}

/// Asks the daemon of `location` for its status. An error is anything but an answer or a
/// daemon that is clearly not running: e.g. permission denied on the state directory or the
/// socket, or a daemon that closed without answering (the peer is not its user or root).
pub fn ask(location: &Location) -> Result<Answer> {
    let path = socket_path(&location.state);
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Answer::NotRunning {
                why: format!("nothing answers on {}: {e}", path.display()),
                status: offline::read(location),
            });
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", path.display()));
        }
    };
    // The daemon answers within its own 2 s bound once it takes the connection; it may take
    // it late when four others are being served.
    stream.set_read_timeout(Some(REQUEST_TIMEOUT * 5))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream
        .write_all(b"status\n")
        .with_context(|| format!("asking {}", path.display()))?;
    let mut text = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES + 1)
        .read_to_end(&mut text)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    if text.is_empty() {
        bail!(
            "the daemon closed {} without answering: only its own user and root may ask",
            path.display()
        );
    }
    if text.len() as u64 > MAX_ANSWER_BYTES {
        bail!(
            "the answer from {} exceeds {MAX_ANSWER_BYTES} bytes",
            path.display()
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("the answer from {} is not JSON", path.display()))?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("the daemon refused the request: {error}");
    }
    let status = serde_json::from_value(value)
        .with_context(|| format!("the answer from {} is not a status", path.display()))?;
    Ok(Answer::Running(status))
}
