//! One agent connection, from the TLS handshake to the close: the handshake (`handshake`),
//! then a reader (`reader`) and a writer (`writer`) side by side until the session ends.
//!
//! Guarantees:
//!
//! * The agent id is derived from the TLS client certificate, never from what the agent says.
//! * The WebSocket upgrade is accepted only on [`AGENT_PATH`](bridge_protocol::AGENT_PATH) and
//!   only for an enrolled agent or one presenting a good token (refusals: HTTP 401 with
//!   `X-Bridge-Refusal`).
//! * No message but `hello` is processed before `welcome`; a connection without a usable
//!   `hello` within [`HELLO_TIMEOUT`] is closed.
//! * A frame that fails to decode is answered with an `error` and the connection goes on.
//! * Right after `welcome`, the runs the agent has not acknowledged yet are sent again.
//! * Every `result` is stored before it is acknowledged (`ack`).
//! * A `status` is checked ([`StatusReport::check`](bridge_protocol::StatusReport::check): the
//!   audit hashes, the size of `last_error`) before anything of it is stored; one that fails is
//!   answered with a `malformed` error, like a message that does not decode. The `welcome`
//!   names the latest audit seq stored for the agent (`audit_seq`).
//! * Reading never waits for writing. After `welcome` the connection has one reader and one
//!   writer: the reader hands what it must send to the writer without waiting (acks are
//!   coalesced: a set of task ids the writer drains into `ack {task_ids: […]}` frames, so an
//!   agent that sends thousands of results before it reads anything costs memory bounded by
//!   the number of distinct task ids, and both sides never end up blocked writing). Replies to
//!   the agent's own messages (errors, module uploads, release pieces, `update_ack`) wait in a
//!   bounded queue, in the order asked.
//! * A verdict (`update_status`) is stored before its `update_ack` is queued (see the hub's
//!   `updates`); a version-1 connection carries no self-update messages (the codec refuses
//!   them).
//! * A write that takes longer than [`SEND_TIMEOUT`] (an agent that stopped reading) closes
//!   the connection.
//! * The connection is closed when the agent was silent for [`IDLE_TIMEOUT`], when a newer
//!   connection of the same agent replaces it, and when the server shuts down.

mod handshake;
mod reader;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use bridge_protocol::codec::encode;
use bridge_protocol::{ErrorBody, ErrorCode, PlatformMessage, MAX_BINARY_BYTES};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use self::handshake::Greeted;
use self::writer::{Outgoing, WriterEnd};
use super::hub::{Hub, Registration};

/// How long the TLS handshake and the WebSocket upgrade may each take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the upgrade the agent has to send `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's heartbeat interval (it sends WebSocket pings this often).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// An agent silent for this long (three heartbeats) is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3 * 30);
/// The largest WebSocket message and frame accepted: a module upload plus some slack.
pub const MAX_WS_MESSAGE: usize = MAX_BINARY_BYTES + 64 * 1024;
/// The response header naming why an upgrade was refused.
pub const REFUSAL_HEADER: &str = "X-Bridge-Refusal";
/// Close code sent to a connection replaced by a newer one of the same agent.
pub const CLOSE_REPLACED: u16 = 4000;
/// Close code sent to a connection that was silent for [`IDLE_TIMEOUT`].
pub const CLOSE_IDLE: u16 = 4001;
/// How long one write to the agent may take; an agent that does not read for this long is
/// disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<TlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;

/// The WebSocket configuration of agent connections.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// Serves one connection whose TLS handshake is done (the caller checked that it carries a
/// client certificate) until it ends; never fails (problems are logged).
pub async fn handle_tls(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = serve_tls(tls, peer, hub, shutdown).await {
        tracing::info!(%peer, "connection ended: {e:#}");
    }
}

async fn serve_tls(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let Some(Greeted {
        agent_id,
        enrolled,
        agent_version,
        version,
        mut sink,
        mut stream,
    }) = handshake::greet(tls, peer, &hub, &mut shutdown).await?
    else {
        return Ok(());
    };
    let mut reg = hub.register(&agent_id, version, &agent_version);
    hub.registry.touch(&agent_id, true);
    tracing::info!(agent_id = %agent_id, agent_version = %agent_version, version, conn = reg.conn_id, "session started");
    let welcome = PlatformMessage::Welcome {
        version,
        agent_id: agent_id.clone(),
        enrolled,
        audit_seq: hub.audit.audit_seq(&agent_id),
    };
    let ended = match send(&mut sink, &welcome).await {
        Ok(()) => {
            session_loop(
                &hub,
                &agent_id,
                &mut reg,
                &mut sink,
                &mut stream,
                &mut shutdown,
                version,
            )
            .await
        }
        Err(e) => format!("{e:#}"),
    };
    hub.unregister(&agent_id, reg.conn_id, &ended);
    hub.registry.touch(&agent_id, true);
    tracing::info!(agent_id = %agent_id, conn = reg.conn_id, "agent disconnected: {ended}");
    Ok(())
}

/// How the session ends: why, and the close frame to send (none when the connection is gone
/// or unusable).
type Ending = (String, Option<(CloseCode, &'static str)>);

/// The ending of a connection a newer one of the same agent replaced.
fn replaced() -> Ending {
    (
        "replaced by a newer connection".to_string(),
        Some((
            CloseCode::from(CLOSE_REPLACED),
            "replaced by a newer connection",
        )),
    )
}

/// Runs the session after `welcome` (the reader and the writer side by side); returns why it
/// ended.
async fn session_loop(
    hub: &Hub,
    agent_id: &str,
    reg: &mut Registration,
    sink: &mut Sink,
    stream: &mut Stream,
    shutdown: &mut watch::Receiver<bool>,
    version: u32,
) -> String {
    let out = Outgoing::default();
    let resend = std::mem::take(&mut reg.resend);
    let (why, close_with) = {
        let writer = writer::write_loop(agent_id, sink, &mut reg.outbox, &out, resend, version);
        let reader = reader::read_loop(hub, agent_id, stream, &out, &reg.kicked, shutdown, version);
        tokio::select! {
            ended = reader => ended,
            ended = writer => match ended {
                WriterEnd::Replaced => replaced(),
                WriterEnd::Failed(why) => (why, None),
            },
        }
    };
    if let Some((code, reason)) = close_with {
        // Acknowledge what is stored before saying goodbye (briefly: the agent resends the
        // rest on its next connection anyway).
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(ack) = out.next_ack() {
                if sink.send(ack).await.is_err() {
                    break;
                }
            }
        })
        .await;
        close(sink, stream, code, reason).await;
    }
    let dropped = out.dropped_errors();
    if dropped > 0 {
        tracing::warn!(
            agent_id,
            dropped,
            "error replies dropped: the agent did not read them"
        );
    }
    why
}

/// An `error` message for the agent (`id`: the message it answers, if any).
fn error_message(
    id: Option<String>,
    code: ErrorCode,
    message: impl Into<String>,
) -> PlatformMessage {
    PlatformMessage::Error(ErrorBody {
        id,
        code,
        message: message.into(),
    })
}

/// The answer to a binary frame the agent sent unasked.
fn binary_not_expected() -> PlatformMessage {
    error_message(
        None,
        ErrorCode::BinaryNotExpected,
        "the platform accepts no binary frames",
    )
}

/// Sends one message directly (before the session's writer runs), within [`SEND_TIMEOUT`].
async fn send(sink: &mut Sink, message: &PlatformMessage) -> Result<()> {
    timeout(
        SEND_TIMEOUT,
        sink.send(Message::Text(encode(message).into())),
    )
    .await
    .map_err(|_| anyhow!("write timed out after {SEND_TIMEOUT:?}"))?
    .context("write failed")
}

/// Sends a close frame and waits (briefly) for the agent to close too.
async fn close(sink: &mut Sink, stream: &mut Stream, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_string().into(),
    };
    let sent = timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
