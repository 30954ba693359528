//! The connection's writer and what the reader hands it without waiting: coalesced acks, a
//! bounded queue of replies to the agent's messages, and the hub's outbox for the connection.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use bridge_protocol::codec::{encode, text_for_version};
use bridge_protocol::PlatformMessage;
use futures_util::SinkExt as _;
use tokio::sync::{mpsc, Notify};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use super::{Sink, SEND_TIMEOUT};
use crate::serve::hub::Outbound;

/// At most this many task ids in one `ack` frame…
const ACK_BATCH: usize = 1000;
/// …and at most this many bytes of task ids (even escaped, an `ack` stays far below
/// [`bridge_protocol::MAX_TEXT_BYTES`]).
const ACK_BATCH_BYTES: usize = 128 * 1024;
/// How many replies to the agent's messages (errors, module uploads) may wait for the writer.
/// Beyond that, errors are dropped, and a module request closes the connection (the agent
/// asks without reading the answers).
pub(super) const REPLY_QUEUE: usize = 1024;
/// The most rounds of frames the writer queues before it flushes them, when more keep coming.
const FLUSH_EVERY: usize = 32;

/// What the reader hands to the writer, never waiting for it.
#[derive(Debug, Default)]
pub(super) struct Outgoing {
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
    pub(super) fn ack(&self, task_id: String) {
        let mut pending = self.lock();
        if pending.acked.insert(task_id.clone()) {
            pending.acks.push_back(task_id);
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Queues a reply; false if the queue is full.
    pub(super) fn reply(&self, message: Message) -> bool {
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
    pub(super) fn error(&self, agent_id: &str, message: &PlatformMessage) {
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

    /// How many errors were dropped because the agent did not read its replies.
    pub(super) fn dropped_errors(&self) -> u64 {
        self.lock().dropped_errors
    }

    fn next_reply(&self) -> Option<Message> {
        self.lock().replies.pop_front()
    }

    /// The next `ack` frame to send: up to [`ACK_BATCH`] task ids.
    pub(super) fn next_ack(&self) -> Option<Message> {
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

/// Why the writer stopped.
pub(super) enum WriterEnd {
    /// The hub dropped the connection's outbox: a newer connection replaced this one.
    Replaced,
    /// A write failed or timed out.
    Failed(String),
}

/// The connection's writer: first the runs to resend, then, taking turns, the replies to the
/// agent's messages, the coalesced acks and the hub's outbox. Frames are flushed when nothing
/// more is waiting, so a burst goes out in one write. Returns only when it must stop.
pub(super) async fn write_loop(
    agent_id: &str,
    sink: &mut Sink,
    outbox: &mut mpsc::Receiver<Outbound>,
    out: &Outgoing,
    resend: Vec<String>,
    version: u32,
) -> WriterEnd {
    // The hub encodes its messages in the current version; a version-1 session rewrites them.
    let frame =
        |text: String| Message::Text(text_for_version::<PlatformMessage>(text, version).into());
    if !resend.is_empty() {
        tracing::info!(
            agent_id,
            runs = resend.len(),
            "resending runs not acknowledged yet"
        );
    }
    let mut unflushed = 0;
    for text in resend {
        if let Err(end) = write(sink, frame(text)).await {
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
                if let Err(end) = write(sink, frame(text)).await {
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
                    if let Err(end) = write(sink, frame(text)).await {
                        return end;
                    }
                    unflushed += 1;
                }
                None => return WriterEnd::Replaced,
            },
        }
    }
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
