//! One connection's life: the version handshake, then frames both ways until the link dies.
//!
//! - The agent speaks first (`hello` with the versions it knows) and waits for `welcome`.
//! - It sends a `status` at once and then every `status_interval`, and a WebSocket ping every
//!   `heartbeat`.
//! - Any frame from the platform proves the link alive; none within `heartbeat_timeout` ends the
//!   session as dead, which catches partitions TCP never reports.
//! - Each text frame is decoded with limits ([`bridge_protocol::codec::decode`]); a bad one is
//!   answered with an `error` message and the session goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::codec::{decode, decode_version, encode, encode_version};
use bridge_protocol::{AgentMessage, ErrorBody, ErrorCode, PlatformMessage, VERSIONS};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{LinkConfig, Peer, Socket};
use crate::outbox::{Batch, Outbox, Replies};

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
    /// The platform broke the WebSocket framing (a frame over the size limit, invalid UTF-8,
    /// a protocol violation): the agent says why in a close frame, then drops the connection.
    Violation(CloseCode, String),
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
            End::Violation(code, e) => {
                write!(f, "the platform broke the WebSocket protocol ({code}): {e}")
            }
            End::Handshake(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

/// How long one frame may take to send. A send that blocks longer means the platform stopped
/// reading (or the network stopped moving): the same verdict as a missed heartbeat. Without this
/// bound, a send stuck on a full socket buffer would keep the loop from noticing anything.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a send (write and flush) within [`SEND_TIMEOUT`]; a timeout is an error like any other.
async fn within_send_timeout(
    send: impl std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
) -> Result<(), String> {
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "a send did not complete within {} s",
            SEND_TIMEOUT.as_secs()
        )),
    }
}

async fn send_frame<S>(ws: &mut S, frame: Message) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    within_send_timeout(ws.send(frame)).await
}

async fn send_text<S>(ws: &mut S, text: String) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    send_frame(ws, Message::Text(text.into())).await
}

/// Sends `messages` as one write where they fit (one TLS flush, one system call, instead of
/// one per message), within [`SEND_TIMEOUT`] as a whole.
async fn send_batch<S>(ws: &mut S, batch: &mut Batch) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    within_send_timeout(async {
        for text in batch.take_texts() {
            ws.feed(Message::Text(text.into())).await?;
        }
        ws.flush().await
    })
    .await
}

/// Sends `hello` and waits for `welcome`; returns the protocol version the platform chose, and
/// the audit sequence number it names (`audit_seq`).
async fn handshake(ws: &mut Socket, expected: &str) -> Result<(u32, Option<u64>), End> {
    let hello = AgentMessage::Hello {
        versions: VERSIONS.to_vec(),
        agent_id: expected.to_string(),
        agent_version: crate::version::get().to_string(),
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
                        audit_seq,
                        ..
                    }) => {
                        if !VERSIONS.contains(&version) {
                            return Err(End::Handshake(format!(
                                "the platform chose protocol version {version}; this agent speaks {VERSIONS:?}"
                            )));
                        }
                        if agent_id != expected {
                            tracing::warn!(platform_says = %agent_id, "the platform derived another agent id");
                        }
                        if enrolled {
                            tracing::info!(agent_id = %agent_id, "enrolled with the platform");
                        }
                        return Ok((version, audit_seq));
                    }
                    Ok(PlatformMessage::Error(e)) => {
                        return Err(End::Handshake(format!(
                            "{}: {}",
                            e.code.as_str(),
                            e.message
                        )));
                    }
                    Ok(other) => {
                        // Nothing is acted on before the session opens; the platform hears so.
                        tracing::warn!("refusing a message before welcome: {}", kind_of(&other));
                        let body = ErrorBody {
                            id: other.echo_id().map(str::to_string),
                            code: ErrorCode::Unexpected,
                            message: format!(
                                "`{}` before `welcome`: nothing is accepted until the session opens; send it again after `welcome`",
                                kind_of(&other)
                            ),
                        };
                        reply_before_welcome(ws, body).await?;
                    }
                    Err(e) if e.was_error() => {
                        tracing::warn!("the platform sent an `error` that does not decode: {e}")
                    }
                    Err(e) => {
                        tracing::warn!("bad message before welcome: {e}");
                        reply_before_welcome(ws, e.body()).await?;
                    }
                }
            }
            Some(Ok(Message::Binary(bytes))) => {
                tracing::warn!(
                    bytes = bytes.len(),
                    "refusing a binary frame before welcome"
                );
                let body = ErrorBody {
                    id: None,
                    code: ErrorCode::Unexpected,
                    message: "a binary frame before `welcome`: no module was asked for".into(),
                };
                reply_before_welcome(ws, body).await?;
            }
            Some(Ok(Message::Close(frame))) => return Err(End::Closed(format!("{frame:?}"))),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(violation(&e).unwrap_or_else(|| End::Error(e.to_string()))),
            None => return Err(End::Closed("end of stream".into())),
        }
    }
}

/// The `type` tag of a platform message, for logs.
fn kind_of(msg: &PlatformMessage) -> &'static str {
    match msg {
        PlatformMessage::Welcome { .. } => "welcome",
        PlatformMessage::Run(_) => "run",
        PlatformMessage::Cancel { .. } => "cancel",
        PlatformMessage::Ack { .. } => "ack",
        PlatformMessage::InstallHandler { .. } => "install_handler",
        PlatformMessage::RemoveHandler { .. } => "remove_handler",
        PlatformMessage::ListHandlers { .. } => "list_handlers",
        PlatformMessage::Update { .. } => "update",
        PlatformMessage::UpdateAck { .. } => "update_ack",
        PlatformMessage::Error(_) => "error",
    }
}

async fn reply_before_welcome(ws: &mut Socket, body: ErrorBody) -> Result<(), End> {
    send_text(ws, encode(&AgentMessage::Error(body)))
        .await
        .map_err(End::Error)
}

/// A read error that is the platform breaking the WebSocket protocol, with the close code that
/// says so (RFC 6455 § 7.4.1); `None` for transport errors, after which nothing can be sent.
fn violation(e: &tokio_tungstenite::tungstenite::Error) -> Option<End> {
    use tokio_tungstenite::tungstenite::Error;
    let code = match e {
        Error::Capacity(_) => CloseCode::Size,
        Error::Utf8(_) => CloseCode::Invalid,
        Error::Protocol(_) => CloseCode::Protocol,
        _ => return None,
    };
    Some(End::Violation(code, e.to_string()))
}

/// Warnings about what the platform sends, at most [`Throttle::BURST`] in a
/// [`Throttle::WINDOW`]: a platform that floods bad frames must not flood the log too. What was
/// left out is counted in the next line that is written.
#[derive(Debug)]
pub struct Throttle {
    window: Instant,
    written: u32,
    suppressed: u64,
}

impl Throttle {
    /// Lines written per window.
    pub const BURST: u32 = 20;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A throttle with a fresh window.
    pub fn new() -> Throttle {
        Throttle {
            window: Instant::now(),
            written: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written now; `Some(n)` with the lines left out before it.
    pub fn admit(&mut self) -> Option<u64> {
        if self.window.elapsed() >= Self::WINDOW {
            self.window = Instant::now();
            self.written = 0;
        }
        if self.written >= Self::BURST {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

/// Logs a warning through `throttle`, noting how many similar ones were left out.
macro_rules! throttled_warn {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(left_out) = $throttle.admit() {
            if left_out > 0 {
                tracing::warn!(left_out, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
}

/// Runs one session until the link dies or the agent shuts down.
///
/// Reading and writing are independent: a reader task hands every frame to the agent as it
/// arrives (none of the agent's handlers block), while this task writes. So a long backlog of
/// results sent at connection start never stops the agent from reading the platform's `ack`s:
/// neither end can fill the other's buffers while both wait to write.
pub async fn run<P: Peer>(
    mut ws: Socket,
    config: &LinkConfig,
    peer: &Arc<P>,
    outbox: &mut Outbox,
    shutdown: &CancellationToken,
) -> End {
    let (version, audit_seq) = match handshake(&mut ws, peer.agent_id()).await {
        Ok(welcome) => welcome,
        Err(end) => return end,
    };
    tracing::info!(version, "the platform welcomed the agent: session open");
    peer.observer().link_connected();
    super::welcomed(config, peer.agent_id());
    let started = Instant::now();
    let mut ping = tokio::time::interval(config.heartbeat);
    ping.tick().await;
    let mut status = tokio::time::interval(config.status_interval);
    let mut ping_seq: u64 = 0;
    outbox.start_session(version);
    peer.welcomed(version, audit_seq);

    let (mut sink, stream) = ws.split();
    let last_rx = Arc::new(AtomicU64::new(0));
    let last_ping = Arc::new(LastPing::default());
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel();
    let reader = AbortOnDrop(tokio::spawn(read_loop(
        stream,
        peer.clone(),
        outbox.replies(),
        started,
        last_rx.clone(),
        last_ping.clone(),
        ended_tx,
        version,
    )));

    let end = loop {
        let deadline = started
            + Duration::from_millis(last_rx.load(Ordering::Relaxed))
            + config.heartbeat_timeout;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
                break End::Shutdown;
            }
            end = &mut ended => {
                let end = end.unwrap_or_else(|_| End::Error("the reader stopped".into()));
                if let End::Violation(code, why) = &end {
                    // Best effort: the platform learns why before the connection drops.
                    let mut reason = why.clone();
                    let mut cut = reason.len().min(120);
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    let frame = Message::Close(Some(CloseFrame { code: *code, reason: reason.into() }));
                    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(frame)).await;
                }
                break end;
            }
            _ = sleep_until(deadline) => {
                let silent = started.elapsed()
                    .saturating_sub(Duration::from_millis(last_rx.load(Ordering::Relaxed)));
                if silent >= config.heartbeat_timeout {
                    break End::Dead(config.heartbeat_timeout);
                }
            }
            _ = ping.tick() => {
                ping_seq += 1;
                let frame = Message::Ping(ping_seq.to_be_bytes().to_vec().into());
                last_ping.sent(ping_seq);
                if let Err(e) = send_frame(&mut sink, frame).await {
                    break End::Error(e);
                }
            }
            _ = status.tick() => {
                let report = AgentMessage::Status(peer.status());
                if let Err(e) = send_text(&mut sink, encode_version(&report, version)).await {
                    break End::Error(e);
                }
            }
            more = outbox.ready() => {
                if !more {
                    break End::Shutdown;
                }
                let mut batch = outbox.next_batch().await;
                if batch.is_empty() {
                    continue;
                }
                if let Err(e) = send_batch(&mut sink, &mut batch).await {
                    outbox.put_back(batch);
                    break End::Error(e);
                }
            }
        }
    };
    drop(reader);
    end
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The last heartbeat sent (its sequence number, the ping's payload, and when), to time the
/// pong that answers it. A pong for an older ping, or one the agent never sent, times nothing.
#[derive(Default)]
struct LastPing(Mutex<Option<(u64, Instant)>>);

impl LastPing {
    /// Ping `seq` is being sent now.
    fn sent(&self, seq: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((seq, Instant::now()));
    }

    /// A pong with `payload` arrived: the round trip, if it answers the last ping (each is
    /// timed once).
    fn answered(&self, payload: &[u8]) -> Option<Duration> {
        let seq = u64::from_be_bytes(payload.try_into().ok()?);
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((sent, at)) if sent == seq => {
                *last = None;
                Some(at.elapsed())
            }
            _ => None,
        }
    }
}

/// Reads frames until the link ends, handing each to the agent; reports how it ended.
#[allow(clippy::too_many_arguments)]
async fn read_loop<P: Peer>(
    mut stream: futures_util::stream::SplitStream<Socket>,
    peer: Arc<P>,
    replies: Replies,
    started: Instant,
    last_rx: Arc<AtomicU64>,
    last_ping: Arc<LastPing>,
    ended: tokio::sync::oneshot::Sender<End>,
    version: u32,
) {
    let mut throttle = Throttle::new();
    let end = loop {
        let frame = stream.next().await;
        last_rx.store(
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let reply = match frame {
            Some(Ok(Message::Text(text))) => {
                let decoded =
                    decode_version::<PlatformMessage>(&text, PlatformMessage::TYPES, version);
                let decoded = match decoded {
                    Ok(msg) => match msg.check_ids() {
                        Ok(()) => Ok(msg),
                        Err(why) => Err(bridge_protocol::codec::DecodeError {
                            id: msg.echo_id().map(str::to_string),
                            code: ErrorCode::Malformed,
                            message: format!("bad `{}` message: {why}", kind_of(&msg)),
                            kind: Some(kind_of(&msg).to_string()),
                        }),
                    },
                    Err(e) => Err(e),
                };
                match decoded {
                    Ok(PlatformMessage::Error(e)) => {
                        throttled_warn!(throttle, code = e.code.as_str(), id = ?e.id, "the platform reports an error: {}", e.message);
                        // The agent may be waiting for what this error answers.
                        peer.deliver(PlatformMessage::Error(e));
                        None
                    }
                    Ok(PlatformMessage::Welcome { .. }) => Some(ErrorBody {
                        id: None,
                        code: ErrorCode::Unexpected,
                        message: "welcome after the handshake".into(),
                    }),
                    Ok(msg) => {
                        peer.deliver(msg);
                        None
                    }
                    // Never answer an `error` with an `error`, even one that does not decode:
                    // two strict ends would answer each other for ever.
                    Err(e) if e.was_error() => {
                        throttled_warn!(
                            throttle,
                            "the platform sent an `error` that does not decode: {e}"
                        );
                        None
                    }
                    Err(e) => {
                        throttled_warn!(throttle, "refusing a message from the platform: {e}");
                        Some(e.body())
                    }
                }
            }
            Some(Ok(Message::Binary(bytes))) => {
                let r = peer.module_arrived(bytes.to_vec()).err();
                if let Some(e) = &r {
                    throttled_warn!(throttle, "refusing a binary frame: {}", e.message);
                }
                r
            }
            Some(Ok(Message::Close(frame))) => break End::Closed(format!("{frame:?}")),
            Some(Ok(Message::Pong(payload))) => {
                if let Some(rtt) = last_ping.answered(&payload) {
                    peer.observer().heartbeat(rtt);
                }
                None
            }
            Some(Ok(_)) => None, // ping (answered by tungstenite), raw frame
            Some(Err(e)) => break violation(&e).unwrap_or_else(|| End::Error(e.to_string())),
            None => break End::Closed("end of stream".into()),
        };
        if let Some(body) = reply {
            if !replies.try_send(AgentMessage::Error(body)) {
                throttled_warn!(
                    throttle,
                    "the outbox is full; an error reply to the platform was dropped"
                );
            }
        }
    };
    let _ = ended.send(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pong_of_the_last_ping_is_timed_once() {
        let last = LastPing::default();
        assert_eq!(last.answered(&1u64.to_be_bytes()), None, "no ping sent");
        last.sent(1);
        last.sent(2);
        assert_eq!(last.answered(&1u64.to_be_bytes()), None, "an older ping");
        assert_eq!(last.answered(b"junk"), None, "not a sequence number");
        assert!(last.answered(&2u64.to_be_bytes()).is_some());
        assert_eq!(last.answered(&2u64.to_be_bytes()), None, "timed once");
    }
}
