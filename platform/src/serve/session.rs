//! One agent connection, from the TLS handshake to the close.
//!
//! Guarantees:
//!
//! * The agent id is derived from the TLS client certificate, never from what the agent says.
//! * The WebSocket upgrade is accepted only on [`AGENT_PATH`] and only for an enrolled agent or
//!   one presenting a good token (refusals: HTTP 401 with `X-Bridge-Refusal`).
//! * No message but `hello` is processed before `welcome`; a connection without a usable
//!   `hello` within [`HELLO_TIMEOUT`] is closed.
//! * A frame that fails to decode is answered with an `error` and the connection goes on.
//! * Right after `welcome`, the runs the agent has not acknowledged yet are sent again.
//! * Every `result` is stored before it is acknowledged (`ack`), once per delivery.
//! * The connection is closed when the agent was silent for [`IDLE_TIMEOUT`], when a newer
//!   connection of the same agent replaces it, and when the server shuts down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use bridge_protocol::codec::{decode, encode};
use bridge_protocol::{
    AgentMessage, ErrorBody, ErrorCode, PlatformMessage, AGENT_PATH, MAX_BINARY_BYTES,
    PROTOCOL_VERSION,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hub::{ChunkEvent, Hub, Outbound, Reply};
use super::registry::{Admission, AdmitError};
use super::tls::agent_id_of;

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

type Ws = WebSocketStream<TlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;

/// The WebSocket configuration of agent connections.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// Serves one accepted TCP connection until it ends; never fails (problems are logged).
pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = serve_connection(tcp, peer, acceptor, hub, shutdown).await {
        tracing::info!(%peer, "connection ended: {e:#}");
    }
}

/// The bearer token of the upgrade request: `Ok(None)` without an `Authorization` header,
/// `Err(())` with one that is not `Bearer <token>`.
fn bearer(request: &Request) -> Result<Option<String>, ()> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ())?.trim();
    let (scheme, token) = text.split_once(' ').ok_or(())?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(());
    }
    Ok(Some(token.to_string()))
}

fn http_error(status: u16, refusal: Option<&str>, body: &str) -> ErrorResponse {
    let mut builder = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    if let Some(r) = refusal {
        builder = builder.header(REFUSAL_HEADER, r);
    }
    builder
        .body(Some(format!("{body}\n")))
        .expect("static response parts are valid")
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let tls = timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake failed")?;
    serve_tls(tls, peer, hub, shutdown).await
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
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .cloned()
        .ok_or_else(|| anyhow!("no client certificate"))?;
    let agent_id = agent_id_of(&cert)?;

    let admission: Mutex<Option<Admission>> = Mutex::new(None);
    // The error type is tungstenite's HTTP response: large, but not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != AGENT_PATH {
            return Err(http_error(
                404,
                None,
                &format!("not found: agents connect to {AGENT_PATH}"),
            ));
        }
        let decision = match bearer(request) {
            Ok(token) => hub.registry.admit(&agent_id, token.as_deref()),
            Err(()) if hub.registry.is_enrolled(&agent_id) => Ok(Admission::Known),
            Err(()) => Err(AdmitError::Refused(super::registry::Refusal::TokenInvalid)),
        };
        match decision {
            Ok(a) => {
                *admission.lock().unwrap_or_else(|e| e.into_inner()) = Some(a);
                Ok(response)
            }
            Err(AdmitError::Refused(r)) => {
                tracing::warn!(agent_id = %agent_id, %peer, reason = r.as_str(), "refused the upgrade");
                Err(http_error(401, Some(r.as_str()), r.explanation()))
            }
            Err(AdmitError::Internal(e)) => {
                tracing::error!(agent_id = %agent_id, "cannot enroll: {e:#}");
                Err(http_error(
                    500,
                    None,
                    "the platform could not record the enrollment",
                ))
            }
        }
    };
    let ws = timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(ws_config())),
    )
    .await
    .map_err(|_| anyhow!("WebSocket upgrade timed out"))?
    .context("WebSocket upgrade failed")?;
    let enrolled =
        admission.into_inner().unwrap_or_else(|e| e.into_inner()) == Some(Admission::Enrolled);
    if enrolled {
        tracing::info!(agent_id = %agent_id, %peer, "enrolled a new agent");
    }
    tracing::info!(agent_id = %agent_id, %peer, "agent connected");

    let (mut sink, mut stream) = ws.split();
    let hello = tokio::select! {
        hello = timeout(HELLO_TIMEOUT, wait_hello(&mut sink, &mut stream)) => hello,
        _ = shutdown.changed() => {
            close(&mut sink, &mut stream, CloseCode::Away, "the platform is shutting down").await;
            return Ok(());
        }
    };
    let (versions, said_id, agent_version) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            close(
                &mut sink,
                &mut stream,
                CloseCode::Policy,
                "no hello within 10 s",
            )
            .await;
            return Err(anyhow!(
                "agent {agent_id} sent no hello within {HELLO_TIMEOUT:?}"
            ));
        }
    };
    if said_id != agent_id {
        tracing::warn!(agent_id = %agent_id, claimed = %said_id, "hello names another agent id; using the certificate's");
    }
    if !versions.contains(&PROTOCOL_VERSION) {
        let body = ErrorBody {
            id: None,
            code: ErrorCode::UnsupportedVersion,
            message: format!(
                "this platform speaks protocol version {PROTOCOL_VERSION}; the agent offered {versions:?}"
            ),
        };
        send(&mut sink, &PlatformMessage::Error(body)).await?;
        close(
            &mut sink,
            &mut stream,
            CloseCode::Policy,
            "unsupported protocol version",
        )
        .await;
        return Err(anyhow!(
            "agent {agent_id} offered no supported version ({versions:?})"
        ));
    }

    let mut reg = hub.register(&agent_id);
    hub.registry.touch(&agent_id, true);
    tracing::info!(agent_id = %agent_id, agent_version = %agent_version, conn = reg.conn_id, "session started");
    let welcome = PlatformMessage::Welcome {
        version: PROTOCOL_VERSION,
        agent_id: agent_id.clone(),
        enrolled,
    };
    let resend = std::mem::take(&mut reg.resend);
    let ended = match send_welcome(&agent_id, &mut sink, &welcome, resend).await {
        Ok(()) => {
            session_loop(
                &hub,
                &agent_id,
                &mut reg,
                &mut sink,
                &mut stream,
                &mut shutdown,
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

/// Sends `welcome`, then the runs the agent has not acknowledged yet (sent on an earlier
/// connection, or while it was reconnecting): the agent deduplicates by task id.
async fn send_welcome(
    agent_id: &str,
    sink: &mut Sink,
    welcome: &PlatformMessage,
    resend: Vec<String>,
) -> Result<()> {
    send(sink, welcome).await?;
    if !resend.is_empty() {
        tracing::info!(
            agent_id,
            runs = resend.len(),
            "resending runs not acknowledged yet"
        );
    }
    for text in resend {
        sink.send(Message::Text(text.into()))
            .await
            .context("write failed")?;
    }
    Ok(())
}

/// Reads until a valid `hello`, answering anything else with an `error`.
async fn wait_hello(sink: &mut Sink, stream: &mut Stream) -> Result<(Vec<u32>, String, String)> {
    loop {
        let message = match stream.next().await {
            None => return Err(anyhow!("closed before hello")),
            Some(Err(e)) => return Err(anyhow!("read failed before hello: {e}")),
            Some(Ok(m)) => m,
        };
        match message {
            Message::Text(text) => match decode::<AgentMessage>(&text, AgentMessage::TYPES) {
                Ok(AgentMessage::Hello {
                    versions,
                    agent_id,
                    agent_version,
                }) => return Ok((versions, agent_id, agent_version)),
                Ok(_) => {
                    let body = ErrorBody {
                        id: None,
                        code: ErrorCode::Unexpected,
                        message: "the first message must be `hello`".into(),
                    };
                    send(sink, &PlatformMessage::Error(body)).await?;
                }
                Err(e) => send(sink, &PlatformMessage::Error(e.body())).await?,
            },
            Message::Binary(_) => send(sink, &binary_not_expected()).await?,
            Message::Close(_) => return Err(anyhow!("closed before hello")),
            _ => {}
        }
    }
}

fn binary_not_expected() -> PlatformMessage {
    PlatformMessage::Error(ErrorBody {
        id: None,
        code: ErrorCode::BinaryNotExpected,
        message: "the platform accepts no binary frames".into(),
    })
}

/// Runs the session after `welcome`; returns why it ended.
async fn session_loop(
    hub: &Hub,
    agent_id: &str,
    reg: &mut super::hub::Registration,
    sink: &mut Sink,
    stream: &mut Stream,
    shutdown: &mut watch::Receiver<bool>,
) -> String {
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            message = stream.next() => {
                let message = match message {
                    None => return "the connection closed".into(),
                    Some(Err(e)) => return format!("read failed: {e}"),
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                hub.seen(agent_id);
                let outcome = match message {
                    Message::Text(text) => on_text(hub, agent_id, sink, &text).await,
                    Message::Binary(_) => send(sink, &binary_not_expected()).await,
                    Message::Close(frame) => {
                        return match frame {
                            Some(f) => format!("closed by the agent ({}: {})", u16::from(f.code), f.reason),
                            None => "closed by the agent".into(),
                        };
                    }
                    _ => Ok(()),
                };
                if let Err(e) = outcome {
                    return format!("{e:#}");
                }
            }
            out = reg.outbox.recv() => {
                let Some(Outbound::Text(text)) = out else {
                    close(sink, stream, CloseCode::from(CLOSE_REPLACED), "replaced by a newer connection").await;
                    return "replaced by a newer connection".into();
                };
                if let Err(e) = sink.send(Message::Text(text.into())).await {
                    return format!("write failed: {e}");
                }
            }
            () = reg.kicked.notified() => {
                close(sink, stream, CloseCode::from(CLOSE_REPLACED), "replaced by a newer connection").await;
                return "replaced by a newer connection".into();
            }
            _ = shutdown.changed() => {
                close(sink, stream, CloseCode::Away, "the platform is shutting down").await;
                return "the platform is shutting down".into();
            }
            () = sleep_until(last_heard + IDLE_TIMEOUT) => {
                close(sink, stream, CloseCode::from(CLOSE_IDLE), "nothing received for 90 s").await;
                return format!("silent for {IDLE_TIMEOUT:?}");
            }
        }
    }
}

/// Handles one text frame after `welcome`.
async fn on_text(hub: &Hub, agent_id: &str, sink: &mut Sink, text: &str) -> Result<()> {
    let message = match decode::<AgentMessage>(text, AgentMessage::TYPES) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                agent_id,
                code = e.code.as_str(),
                "undecodable message: {}",
                e.message
            );
            return send(sink, &PlatformMessage::Error(e.body())).await;
        }
    };
    match message {
        AgentMessage::Hello { .. } => {
            let body = ErrorBody {
                id: None,
                code: ErrorCode::Unexpected,
                message: "`hello` was already received on this connection".into(),
            };
            send(sink, &PlatformMessage::Error(body)).await
        }
        AgentMessage::Status(status) => {
            if status.agent_id != agent_id {
                tracing::warn!(agent_id, claimed = %status.agent_id, "status names another agent id");
            }
            tracing::debug!(agent_id, running = status.running.len(), "status");
            hub.set_status(agent_id, status);
            Ok(())
        }
        AgentMessage::NeedModule { id, sha256 } => match hub.module(&sha256) {
            Some(bytes) => {
                tracing::info!(agent_id, run_id = %id, sha256 = %sha256, bytes = bytes.len(), "sending module");
                sink.send(Message::Binary(bytes))
                    .await
                    .context("cannot send the module")
            }
            None => {
                tracing::warn!(agent_id, run_id = %id, sha256 = %sha256, "agent asked for an unknown module");
                let body = ErrorBody {
                    id: Some(id),
                    code: ErrorCode::Unexpected,
                    message: format!("the platform has no module with SHA-256 {sha256}"),
                };
                send(sink, &PlatformMessage::Error(body)).await
            }
        },
        AgentMessage::Accepted { id, task_id, state } => {
            hub.on_accepted(agent_id, &id, &task_id, state);
            Ok(())
        }
        AgentMessage::Chunk {
            task_id,
            seq,
            stream,
            data,
            dropped_bytes,
        } => {
            let chunk = ChunkEvent {
                task_id,
                seq,
                stream,
                data,
                dropped_bytes,
            };
            if hub.on_chunk(chunk) == 0 {
                tracing::debug!(agent_id, "chunk for a task nobody streams (ignored)");
            }
            Ok(())
        }
        AgentMessage::CancelReply {
            id,
            task_id,
            outcome,
        } => {
            if !hub.on_reply(agent_id, &id, Reply::Cancel { task_id, outcome }) {
                tracing::warn!(agent_id, request = %id, "cancel_reply for no waiting request (ignored)");
            }
            Ok(())
        }
        AgentMessage::Handlers { id, handlers } => {
            if !hub.on_reply(agent_id, &id, Reply::Handlers(handlers)) {
                tracing::warn!(agent_id, request = %id, "handlers for no waiting request (ignored)");
            }
            Ok(())
        }
        AgentMessage::Result {
            id,
            task_id,
            result,
        } => {
            // Store first, then acknowledge: the agent forgets what we acknowledge.
            if hub.on_result(agent_id, &id, &task_id, result) {
                let ack = PlatformMessage::Ack {
                    task_ids: vec![task_id],
                };
                send(sink, &ack).await
            } else {
                Ok(())
            }
        }
        AgentMessage::Error(body) => {
            let why = format!("{}: {}", body.code.as_str(), body.message);
            let ended = body
                .id
                .as_deref()
                .is_some_and(|id| hub.on_error(agent_id, id, why.clone()));
            if !ended {
                tracing::warn!(agent_id, id = ?body.id, "the agent reported an error: {why}");
                hub.deliver_error(agent_id, &body);
            }
            Ok(())
        }
    }
}

async fn send(sink: &mut Sink, message: &PlatformMessage) -> Result<()> {
    sink.send(Message::Text(encode(message).into()))
        .await
        .context("write failed")
}

/// Sends a close frame and waits (briefly) for the agent to close too.
async fn close(sink: &mut Sink, stream: &mut Stream, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_string().into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
