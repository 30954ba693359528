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
//! * Every `result` is stored before it is acknowledged (`ack`).
//! * Reading never waits for writing. After `welcome` the connection has one reader and one
//!   writer: the reader hands what it must send to the writer without waiting (acks are
//!   coalesced: a set of task ids the writer drains into `ack {task_ids: […]}` frames, so an
//!   agent that sends thousands of results before it reads anything costs memory bounded by
//!   the number of distinct task ids, and both sides never end up blocked writing). Replies to
//!   the agent's own messages (errors, module uploads) wait in a bounded queue.
//! * A write that takes longer than [`SEND_TIMEOUT`] (an agent that stopped reading) closes
//!   the connection.
//! * The connection is closed when the agent was silent for [`IDLE_TIMEOUT`], when a newer
//!   connection of the same agent replaces it, and when the server shuts down.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hub::{ChunkEvent, Hub, Outbound, Registration, Reply};
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
/// How long one write to the agent may take; an agent that does not read for this long is
/// disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many task ids in one `ack` frame…
const ACK_BATCH: usize = 1000;
/// …and at most this many bytes of task ids (even escaped, an `ack` stays far below
/// [`bridge_protocol::MAX_TEXT_BYTES`]).
const ACK_BATCH_BYTES: usize = 128 * 1024;
/// How many replies to the agent's messages (errors, module uploads) may wait for the writer.
/// Beyond that, errors are dropped, and a module request closes the connection (the agent
/// asks without reading the answers).
const REPLY_QUEUE: usize = 1024;

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
    let ended = match send(&mut sink, &welcome).await {
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

/// What the reader hands to the writer, never waiting for it.
#[derive(Debug, Default)]
struct Outgoing {
    inner: Mutex<Pending>,
    /// Notified when something is added.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// Task ids to acknowledge, in the order received, each once…
    acks: VecDeque<String>,
    /// …which this set ensures.
    acked: HashSet<String>,
    /// Replies to the agent's messages, in order (binary frames answer `need_module`s in
    /// the order they were asked).
    replies: VecDeque<Message>,
    /// Errors dropped because `replies` was full.
    dropped_errors: u64,
}

impl Outgoing {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an acknowledgement of `task_id` (merged with one already waiting).
    fn ack(&self, task_id: String) {
        let mut pending = self.lock();
        if pending.acked.insert(task_id.clone()) {
            pending.acks.push_back(task_id);
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Queues a reply; false if the queue is full.
    fn reply(&self, message: Message) -> bool {
        let mut pending = self.lock();
        if pending.replies.len() >= REPLY_QUEUE {
            return false;
        }
        pending.replies.push_back(message);
        drop(pending);
        self.wake.notify_one();
        true
    }

    /// Queues an `error` for the agent; dropped (and counted) if the queue is full.
    fn error(&self, agent_id: &str, message: &PlatformMessage) {
        if !self.reply(Message::Text(encode(message).into())) {
            let mut pending = self.lock();
            pending.dropped_errors += 1;
            if pending.dropped_errors == 1 {
                tracing::warn!(
                    agent_id,
                    "the agent does not read its error replies: dropping them"
                );
            }
        }
    }

    fn next_reply(&self) -> Option<Message> {
        self.lock().replies.pop_front()
    }

    /// The next `ack` frame to send: up to [`ACK_BATCH`] task ids.
    fn next_ack(&self) -> Option<Message> {
        let mut pending = self.lock();
        let mut task_ids = Vec::new();
        let mut bytes = 0;
        while task_ids.len() < ACK_BATCH {
            let Some(next) = pending.acks.front() else {
                break;
            };
            if !task_ids.is_empty() && bytes + next.len() > ACK_BATCH_BYTES {
                break;
            }
            let id = pending.acks.pop_front().expect("checked above");
            pending.acked.remove(&id);
            bytes += id.len();
            task_ids.push(id);
        }
        (!task_ids.is_empty())
            .then(|| Message::Text(encode(&PlatformMessage::Ack { task_ids }).into()))
    }
}

/// The most rounds of frames the writer queues before it flushes them, when more keep coming.
const FLUSH_EVERY: usize = 32;

/// Why the writer stopped.
enum WriterEnd {
    /// The hub dropped the connection's outbox: a newer connection replaced this one.
    Replaced,
    /// A write failed or timed out.
    Failed(String),
}

/// Queues one frame for writing (written once enough is buffered, or by [`flush`]), within
/// [`SEND_TIMEOUT`].
async fn write(sink: &mut Sink, message: Message) -> Result<(), WriterEnd> {
    within_send_timeout(sink.feed(message)).await
}

/// Writes out every queued frame, within [`SEND_TIMEOUT`].
async fn flush(sink: &mut Sink) -> Result<(), WriterEnd> {
    within_send_timeout(sink.flush()).await
}

async fn within_send_timeout(
    io: impl std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
) -> Result<(), WriterEnd> {
    match timeout(SEND_TIMEOUT, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriterEnd::Failed(format!("write failed: {e}"))),
        Err(_) => Err(WriterEnd::Failed(format!(
            "write timed out: the agent read nothing for {SEND_TIMEOUT:?}"
        ))),
    }
}

/// The connection's writer: first the runs to resend, then, taking turns, the replies to the
/// agent's messages, the coalesced acks and the hub's outbox. Frames are flushed when nothing
/// more is waiting, so a burst goes out in one write. Returns only when it must stop.
async fn write_loop(
    agent_id: &str,
    sink: &mut Sink,
    outbox: &mut mpsc::Receiver<Outbound>,
    out: &Outgoing,
    resend: Vec<String>,
) -> WriterEnd {
    if !resend.is_empty() {
        tracing::info!(
            agent_id,
            runs = resend.len(),
            "resending runs not acknowledged yet"
        );
    }
    let mut unflushed = 0;
    for text in resend {
        if let Err(end) = write(sink, Message::Text(text.into())).await {
            return end;
        }
        unflushed += 1;
    }
    loop {
        let mut wrote = false;
        if let Some(reply) = out.next_reply() {
            if let Err(end) = write(sink, reply).await {
                return end;
            }
            wrote = true;
        }
        if let Some(ack) = out.next_ack() {
            if let Err(end) = write(sink, ack).await {
                return end;
            }
            wrote = true;
        }
        match outbox.try_recv() {
            Ok(Outbound::Text(text)) => {
                if let Err(end) = write(sink, Message::Text(text.into())).await {
                    return end;
                }
                wrote = true;
            }
            Err(mpsc::error::TryRecvError::Empty) => {}
            Err(mpsc::error::TryRecvError::Disconnected) => return WriterEnd::Replaced,
        }
        if wrote {
            unflushed += 1;
        }
        // Flush once nothing more waits; a steady stream still goes out in bounded bursts.
        if unflushed > 0 && (!wrote || unflushed >= FLUSH_EVERY) {
            if let Err(end) = flush(sink).await {
                return end;
            }
            unflushed = 0;
        }
        if wrote {
            continue;
        }
        tokio::select! {
            () = out.wake.notified() => {}
            message = outbox.recv() => match message {
                Some(Outbound::Text(text)) => {
                    if let Err(end) = write(sink, Message::Text(text.into())).await {
                        return end;
                    }
                    unflushed += 1;
                }
                None => return WriterEnd::Replaced,
            },
        }
    }
}

/// How the session ends: why, and the close frame to send (none when the connection is gone
/// or unusable).
type Ending = (String, Option<(CloseCode, &'static str)>);

/// The connection's reader: handles every message the agent sends, handing what must be sent
/// to the writer without waiting. Returns when the session must end.
async fn read_loop(
    hub: &Hub,
    agent_id: &str,
    stream: &mut Stream,
    out: &Outgoing,
    kicked: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> Ending {
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            message = stream.next() => {
                let message = match message {
                    None => return ("the connection closed".into(), None),
                    Some(Err(e)) => return (format!("read failed: {e}"), None),
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                hub.seen(agent_id);
                let outcome = match message {
                    Message::Text(text) => on_text(hub, agent_id, out, &text),
                    Message::Binary(_) => {
                        out.error(agent_id, &binary_not_expected());
                        Ok(())
                    }
                    Message::Close(frame) => {
                        let why = match frame {
                            Some(f) => format!("closed by the agent ({}: {})", u16::from(f.code), f.reason),
                            None => "closed by the agent".into(),
                        };
                        return (why, None);
                    }
                    _ => Ok(()),
                };
                if let Err(e) = outcome {
                    return (format!("{e:#}"), Some((CloseCode::Policy, "the agent does not read its replies")));
                }
            }
            () = kicked.notified() => {
                return ("replaced by a newer connection".into(), Some((CloseCode::from(CLOSE_REPLACED), "replaced by a newer connection")));
            }
            _ = shutdown.changed() => {
                return ("the platform is shutting down".into(), Some((CloseCode::Away, "the platform is shutting down")));
            }
            () = sleep_until(last_heard + IDLE_TIMEOUT) => {
                return (format!("silent for {IDLE_TIMEOUT:?}"), Some((CloseCode::from(CLOSE_IDLE), "nothing received for 90 s")));
            }
        }
    }
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
) -> String {
    let out = Outgoing::default();
    let resend = std::mem::take(&mut reg.resend);
    let (why, close_with) = {
        let writer = write_loop(agent_id, sink, &mut reg.outbox, &out, resend);
        let reader = read_loop(hub, agent_id, stream, &out, &reg.kicked, shutdown);
        tokio::select! {
            ended = reader => ended,
            ended = writer => match ended {
                WriterEnd::Replaced => (
                    "replaced by a newer connection".to_string(),
                    Some((CloseCode::from(CLOSE_REPLACED), "replaced by a newer connection")),
                ),
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
    let dropped = out.lock().dropped_errors;
    if dropped > 0 {
        tracing::warn!(
            agent_id,
            dropped,
            "error replies dropped: the agent did not read them"
        );
    }
    why
}

/// Handles one text frame after `welcome`, never waiting: what must be sent goes to `out`. An
/// error ends the connection.
fn on_text(hub: &Hub, agent_id: &str, out: &Outgoing, text: &str) -> Result<()> {
    let message = match decode::<AgentMessage>(text, AgentMessage::TYPES) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                agent_id,
                code = e.code.as_str(),
                "undecodable message: {}",
                e.message
            );
            out.error(agent_id, &PlatformMessage::Error(e.body()));
            return Ok(());
        }
    };
    match message {
        AgentMessage::Hello { .. } => {
            let body = ErrorBody {
                id: None,
                code: ErrorCode::Unexpected,
                message: "`hello` was already received on this connection".into(),
            };
            out.error(agent_id, &PlatformMessage::Error(body));
            Ok(())
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
                if out.reply(Message::Binary(bytes)) {
                    Ok(())
                } else {
                    Err(anyhow!(
                        "the agent asked for more than {REPLY_QUEUE} modules without reading them"
                    ))
                }
            }
            None => {
                tracing::warn!(agent_id, run_id = %id, sha256 = %sha256, "agent asked for an unknown module");
                let body = ErrorBody {
                    id: Some(id),
                    code: ErrorCode::Unexpected,
                    message: format!("the platform has no module with SHA-256 {sha256}"),
                };
                // An error, but one the agent waits for: it must not be dropped.
                if out.reply(Message::Text(encode(&PlatformMessage::Error(body)).into())) {
                    Ok(())
                } else {
                    Err(anyhow!(
                        "the agent asked for more than {REPLY_QUEUE} modules without reading the answers"
                    ))
                }
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
            // Store first, then acknowledge: the agent forgets what we acknowledge. The ack is
            // queued for the writer (merged with others), never waited for here.
            if hub.on_result(agent_id, &id, &task_id, result) {
                out.ack(task_id);
            }
            Ok(())
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
