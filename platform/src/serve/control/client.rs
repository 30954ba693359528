//! The control interface's client: one request line to the socket, its response back (and, for
//! a streaming `run`, the event lines before it), as the `bridgectl` commands use it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

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
