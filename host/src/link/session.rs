//! One connection's life: the version handshake, then frames both ways until the link dies.
//!
//! - The agent speaks first (`hello` with the versions it knows) and waits for `welcome`.
//! - It sends a `status` at once and then every `status_interval`, and a WebSocket ping every
//!   `heartbeat`.
//! - Any frame from the platform proves the link alive; none within `heartbeat_timeout` ends the
//!   session as dead, which catches partitions TCP never reports.
//! - Each text frame is decoded with limits ([`bridge_protocol::codec::decode`]); a bad one is
//!   answered with an `error` message and the session goes on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bridge_protocol::codec::{decode, encode};
use bridge_protocol::{AgentMessage, ErrorBody, ErrorCode, PlatformMessage, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{LinkConfig, Socket};
use crate::agent::Agent;

/// How long the platform has to answer `hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// The agent is shutting down.
    Shutdown,
    /// The platform closed the connection.
    Closed(String),
    /// No frame arrived within the heartbeat timeout.
    Dead(Duration),
    /// A transport error.
    Error(String),
    /// The version handshake failed.
    Handshake(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Shutdown => write!(f, "shutting down"),
            End::Closed(why) => write!(f, "the platform closed the connection ({why})"),
            End::Dead(t) => write!(
                f,
                "no frame from the platform for {} s: the link is dead",
                t.as_secs()
            ),
            End::Error(e) => write!(f, "connection error: {e}"),
            End::Handshake(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

/// Messages waiting to go to the platform; what a dead session could not send is kept for the
/// next one.
pub struct Outbox {
    rx: mpsc::Receiver<AgentMessage>,
    /// Encoded messages, each flagged when it is a `result` (those are also in the journal).
    unsent: VecDeque<(bool, String)>,
}

impl Outbox {
    /// Wraps the agent's outbox receiver.
    pub fn new(rx: mpsc::Receiver<AgentMessage>) -> Outbox {
        Outbox {
            rx,
            unsent: VecDeque::new(),
        }
    }
}

fn entry(msg: &AgentMessage) -> (bool, String) {
    (matches!(msg, AgentMessage::Result { .. }), encode(msg))
}

/// How long one frame may take to send. A send that blocks longer means the platform stopped
/// reading (or the network stopped moving): the same verdict as a missed heartbeat. Without this
/// bound, a send stuck on a full socket buffer would keep the loop from noticing anything.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

async fn send_frame(ws: &mut Socket, frame: Message) -> Result<(), String> {
    match tokio::time::timeout(SEND_TIMEOUT, ws.send(frame)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "a send did not complete within {} s",
            SEND_TIMEOUT.as_secs()
        )),
    }
}

async fn send_text(ws: &mut Socket, text: String) -> Result<(), String> {
    send_frame(ws, Message::Text(text.into())).await
}

/// Sends `hello` and waits for `welcome`.
async fn handshake(ws: &mut Socket, agent: &Agent) -> Result<(), End> {
    let hello = AgentMessage::Hello {
        versions: vec![PROTOCOL_VERSION],
        agent_id: agent.agent_id().to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    send_text(ws, encode(&hello)).await.map_err(End::Error)?;
    let deadline = Instant::now() + WELCOME_TIMEOUT;
    loop {
        let frame = tokio::select! {
            f = ws.next() => f,
            _ = sleep_until(deadline) => return Err(End::Handshake("no welcome within 10 s".into())),
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                match decode::<PlatformMessage>(&text, PlatformMessage::TYPES) {
                    Ok(PlatformMessage::Welcome {
                        version,
                        agent_id,
                        enrolled,
                    }) => {
                        if version != PROTOCOL_VERSION {
                            return Err(End::Handshake(format!(
                                "the platform chose protocol version {version}"
                            )));
                        }
                        if agent_id != agent.agent_id() {
                            tracing::warn!(platform_says = %agent_id, "the platform derived another agent id");
                        }
                        if enrolled {
                            tracing::info!(agent_id = %agent_id, "enrolled with the platform");
                        }
                        return Ok(());
                    }
                    Ok(PlatformMessage::Error(e)) => {
                        return Err(End::Handshake(format!(
                            "{}: {}",
                            e.code.as_str(),
                            e.message
                        )));
                    }
                    Ok(other) => tracing::warn!("ignoring {other:?} before welcome"),
                    Err(e) => tracing::warn!("bad message before welcome: {e}"),
                }
            }
            Some(Ok(Message::Close(frame))) => return Err(End::Closed(format!("{frame:?}"))),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(End::Error(e.to_string())),
            None => return Err(End::Closed("end of stream".into())),
        }
    }
}

/// Runs one session until the link dies or the agent shuts down.
pub async fn run(
    mut ws: Socket,
    config: &LinkConfig,
    agent: &Arc<Agent>,
    outbox: &mut Outbox,
    shutdown: &CancellationToken,
) -> End {
    if let Err(end) = handshake(&mut ws, agent).await {
        return end;
    }
    let mut last_rx = Instant::now();
    let mut ping = tokio::time::interval(config.heartbeat);
    ping.tick().await;
    let mut status = tokio::time::interval(config.status_interval);
    let mut ping_seq: u64 = 0;

    // Whatever an earlier session could not send goes first, then what queued up while the
    // link was down (chunks before their results), then every result the platform has not
    // acknowledged yet (the durable outbox: some may be sent twice; the platform keeps the
    // first and acknowledges each).
    let queued = outbox.rx.len();
    for _ in 0..queued {
        match outbox.rx.try_recv() {
            Ok(msg) => outbox.unsent.push_back(entry(&msg)),
            Err(_) => break,
        }
    }
    // Results come from the journal, once each, whatever earlier sessions left behind.
    outbox.unsent.retain(|(is_result, _)| !is_result);
    outbox
        .unsent
        .extend(agent.unacked_results().iter().map(entry));
    while let Some((is_result, text)) = outbox.unsent.pop_front() {
        if let Err(e) = send_text(&mut ws, text.clone()).await {
            outbox.unsent.push_front((is_result, text));
            return End::Error(e);
        }
    }

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                return End::Shutdown;
            }
            _ = sleep_until(last_rx + config.heartbeat_timeout) => {
                return End::Dead(config.heartbeat_timeout);
            }
            _ = ping.tick() => {
                ping_seq += 1;
                if let Err(e) = send_frame(&mut ws, Message::Ping(ping_seq.to_be_bytes().to_vec().into())).await {
                    return End::Error(e.to_string());
                }
            }
            _ = status.tick() => {
                let report = AgentMessage::Status(agent.status_report());
                if let Err(e) = send_text(&mut ws, encode(&report)).await {
                    return End::Error(e);
                }
            }
            msg = outbox.rx.recv() => {
                let Some(msg) = msg else { return End::Shutdown };
                let (is_result, text) = entry(&msg);
                if let Err(e) = send_text(&mut ws, text.clone()).await {
                    outbox.unsent.push_back((is_result, text));
                    return End::Error(e);
                }
            }
            frame = ws.next() => {
                last_rx = Instant::now();
                let reply = match frame {
                    Some(Ok(Message::Text(text))) => match decode::<PlatformMessage>(&text, PlatformMessage::TYPES) {
                        Ok(PlatformMessage::Run(req)) => {
                            agent.start_run(req);
                            None
                        }
                        Ok(PlatformMessage::Ack { task_ids }) => {
                            agent.ack(&task_ids);
                            None
                        }
                        Ok(PlatformMessage::Cancel { id, task_id }) => {
                            agent.cancel(id, task_id);
                            None
                        }
                        Ok(PlatformMessage::InstallHandler { id, name, module_sha256, signature }) => {
                            agent.install_handler(id, name, module_sha256, signature);
                            None
                        }
                        Ok(PlatformMessage::RemoveHandler { id, name }) => {
                            agent.remove_handler(id, name);
                            None
                        }
                        Ok(PlatformMessage::ListHandlers { id }) => {
                            agent.list_handlers(id);
                            None
                        }
                        Ok(PlatformMessage::Error(e)) => {
                            tracing::warn!(code = e.code.as_str(), id = ?e.id, "the platform reports an error: {}", e.message);
                            None
                        }
                        Ok(PlatformMessage::Welcome { .. }) => Some(ErrorBody {
                            id: None,
                            code: ErrorCode::Unexpected,
                            message: "welcome after the handshake".into(),
                        }),
                        Err(e) => {
                            tracing::warn!("refusing a message from the platform: {e}");
                            Some(e.body())
                        }
                    },
                    Some(Ok(Message::Binary(bytes))) => agent.module_arrived(bytes.to_vec()).err(),
                    Some(Ok(Message::Close(frame))) => return End::Closed(format!("{frame:?}")),
                    Some(Ok(_)) => None, // ping (answered by tungstenite), pong, raw frame
                    Some(Err(e)) => return End::Error(e.to_string()),
                    None => return End::Closed("end of stream".into()),
                };
                if let Some(body) = reply {
                    if let Err(e) = send_text(&mut ws, encode(&AgentMessage::Error(body))).await {
                        return End::Error(e);
                    }
                }
            }
        }
    }
}
