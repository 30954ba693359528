//! The control interface: newline-delimited JSON over plain TCP on loopback.
//!
//! One request per line, one response line per request, in order; a connection may carry any
//! number of requests (they are handled one after the other: open several connections to run
//! tasks in parallel). Every response has `"ok": true` plus the command's fields, or
//! `"ok": false, "error": "…"`. A bad line (not JSON, unknown `cmd`, missing field) gets an
//! error response and the connection goes on. Lines are limited to [`MAX_LINE_BYTES`].
//!
//! | request | response |
//! | --- | --- |
//! | `{"cmd":"agents"}` | `{"ok":true,"agents":[{"id","connected","enrolled_at","last_seen","status"}]}` |
//! | `{"cmd":"token"}` | `{"ok":true,"token":"…"}` (a new enrollment token) |
//! | `{"cmd":"run","agent","module"(base64) or "module_sha256","input"?,"args"?,"task_id"?,"limits"?,"signature"?(base64),"timeout_ms"?}` | `{"ok":true,"task_id":"…","result":{RunResult},"round_trip_us":…}` (send → result, measured here) |
//! | `{"cmd":"send","agent","text","wait_ms"?}` | `{"ok":true,"reply":{ErrorBody}\|null}`: a raw frame to the agent, and its `error` answer (testing aid) |
//!
//! The listener only binds loopback addresses ([`check_loopback`]): the interface has no
//! authentication.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use bridge_protocol::LimitRequest;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::hub::{Hub, RunOrder};

/// The longest request line accepted (a 32 MiB module is about 43 MiB of base64).
pub const MAX_LINE_BYTES: u64 = 64 << 20;
/// How long a `run` waits for its result unless `timeout_ms` says otherwise.
pub const DEFAULT_RUN_TIMEOUT_MS: u64 = 60_000;

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// List the enrolled agents.
    Agents,
    /// Issue a new enrollment token.
    Token,
    /// Run a module on an agent and wait for the result.
    Run(Box<RunCommand>),
    /// Development and test aid: send one raw text frame to an agent and report the `error` it
    /// answers with, if any (within `wait_ms`, default 2000).
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
    /// The module's bytes, base64 (standard alphabet, padded). Optional when `module_sha256`
    /// names a module sent before.
    #[serde(default)]
    pub module: Option<String>,
    /// SHA-256 (hex) of a module the platform already stores.
    #[serde(default)]
    pub module_sha256: Option<String>,
    /// The task input (default `null`).
    #[serde(default)]
    pub input: Value,
    /// argv\[1..\].
    #[serde(default)]
    pub args: Vec<String>,
    /// The task id (default: a fresh UUID).
    #[serde(default)]
    pub task_id: Option<String>,
    /// Requested limits.
    #[serde(default)]
    pub limits: LimitRequest,
    /// A detached signature envelope, base64.
    #[serde(default)]
    pub signature: Option<String>,
    /// How long to wait for the result (default [`DEFAULT_RUN_TIMEOUT_MS`]).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Fails unless `addr` is a loopback address.
pub fn check_loopback(addr: &SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!("the control interface has no authentication: it binds loopback addresses only, not {addr}");
    }
    Ok(())
}

/// Serves control connections on `listener` until `shutdown` changes.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "control connection");
                    connections.spawn(connection(stream, hub.clone(), shutdown.clone()));
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

async fn connection(stream: TcpStream, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
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
            let response = json!({"ok": false, "error": format!("request line longer than {MAX_LINE_BYTES} bytes")});
            let _ = write_line(&mut write, &response).await;
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = tokio::select! {
            r = respond(&hub, &line) => r,
            _ = shutdown.changed() => json!({"ok": false, "error": "the platform is shutting down"}),
        };
        if write_line(&mut write, &response).await.is_err() {
            return;
        }
    }
}

async fn write_line(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    value: &Value,
) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(value).expect("responses serialize");
    text.push(b'\n');
    write.write_all(&text).await?;
    write.flush().await
}

fn failure(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}

/// Answers one request line.
async fn respond(hub: &Hub, line: &[u8]) -> Value {
    let request: ControlRequest = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return failure(format!("bad request: {e}")),
    };
    match request {
        ControlRequest::Agents => json!({"ok": true, "agents": hub.agents()}),
        ControlRequest::Token => match hub.issue_token() {
            Ok(token) => json!({"ok": true, "token": token}),
            Err(e) => failure(format!("{e:#}")),
        },
        ControlRequest::Run(run) => {
            let run = *run;
            let b64 = &base64::engine::general_purpose::STANDARD;
            let module = match run.module.as_deref().map(|m| b64.decode(m.as_bytes())) {
                None => None,
                Some(Ok(m)) => Some(m),
                Some(Err(e)) => {
                    return failure(format!("bad request: `module` is not base64: {e}"))
                }
            };
            if let Some(sig) = &run.signature {
                if let Err(e) = b64.decode(sig.as_bytes()) {
                    return failure(format!("bad request: `signature` is not base64: {e}"));
                }
            }
            let order = RunOrder {
                agent: run.agent,
                module,
                module_sha256: run.module_sha256,
                input: run.input,
                args: run.args,
                task_id: run.task_id,
                limits: run.limits,
                signature: run.signature,
                timeout: Duration::from_millis(run.timeout_ms.unwrap_or(DEFAULT_RUN_TIMEOUT_MS)),
            };
            match hub.run(order).await {
                Ok(outcome) => json!({
                    "ok": true,
                    "task_id": outcome.task_id,
                    "result": outcome.result,
                    "round_trip_us": outcome.round_trip.as_secs_f64() * 1e6,
                }),
                Err(e) => failure(e),
            }
        }
        ControlRequest::Send {
            agent,
            text,
            wait_ms,
        } => {
            let wait = Duration::from_millis(wait_ms.unwrap_or(2000));
            match hub.send_raw(&agent, text, wait).await {
                Ok(reply) => json!({"ok": true, "reply": reply}),
                Err(e) => failure(e),
            }
        }
    }
}

/// Sends one request to the control interface at `addr` and returns the response, waiting at
/// most `wait` for it. A response with `"ok": false` is returned as an error holding its
/// `error` text.
pub fn request(addr: &str, request: &Value, wait: Duration) -> Result<Value> {
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("bad control address {addr:?}"))?
        .next()
        .ok_or_else(|| anyhow!("bad control address {addr:?}"))?;
    let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to the control interface at {addr}"))?;
    stream.set_read_timeout(Some(wait))?;
    let mut text = serde_json::to_vec(request).expect("requests serialize");
    text.push(b'\n');
    (&stream)
        .write_all(&text)
        .with_context(|| format!("cannot send to {addr}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("no response from {addr}"))?;
    if line.trim().is_empty() {
        bail!("the control interface at {addr} closed the connection without answering");
    }
    let response: Value = serde_json::from_str(&line).with_context(|| {
        format!("the control interface at {addr} answered something else than JSON")
    })?;
    if response["ok"] != Value::Bool(true) {
        let error = response["error"].as_str().unwrap_or("unknown error");
        bail!("{error}");
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"agents"}"#).unwrap();
        assert!(matches!(r, ControlRequest::Agents));
        let r: ControlRequest = serde_json::from_str(
            r#"{"cmd":"run","agent":"a","module":"AA==","limits":{"fuel":5},"timeout_ms":7}"#,
        )
        .unwrap();
        let ControlRequest::Run(run) = r else {
            panic!()
        };
        assert_eq!(run.limits.fuel, Some(5));
        assert_eq!(run.timeout_ms, Some(7));
        assert!(run.input.is_null());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"nope"}"#).is_err());
        assert!(check_loopback(&"127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(check_loopback(&"[::1]:1".parse().unwrap()).is_ok());
        assert!(check_loopback(&"0.0.0.0:1".parse().unwrap()).is_err());
    }
}
