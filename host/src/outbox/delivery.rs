//! The link's end of the outbox: what goes out next, a batch per write. After every reconnect it
//! sends what an earlier session could not, then what queued while the link was down, then the
//! backlog of results the platform has not acknowledged, read from the journal a batch at a time.

use std::collections::{HashSet, VecDeque};

use bridge_protocol::codec::encode_version;
use bridge_protocol::AgentMessage;
use tokio::sync::mpsc;

use super::{Charge, Outgoing};
use crate::journal::Journal;

/// The most messages written with one flush.
const SEND_BATCH: usize = 64;

/// A batch stops taking messages once it holds this many bytes: results read from the journal
/// for a write stay few while the platform is slow to read them.
const BATCH_BYTES: usize = 256 << 10;

/// Results read from the journal at a time while a backlog is sent.
const BACKLOG_BATCH: usize = 64;

/// Messages waiting to go to the platform; what a dead session could not send is kept for the
/// next one.
pub struct Outbox {
    rx: mpsc::Receiver<Outgoing>,
    replies: mpsc::WeakSender<Outgoing>,
    journal: Journal,
    /// Messages taken from the channel and not sent yet (encoded when sent).
    unsent: VecDeque<Outgoing>,
    /// Unacknowledged results still to send this session, oldest first, read from the journal
    /// a batch at a time as they are sent.
    backlog: VecDeque<String>,
    /// The first of `unsent` came from the channel just now (more may follow it at once).
    fresh: bool,
    /// The protocol version of the session open now: how messages are encoded.
    version: u32,
}

/// Messages to write at once, encoded.
#[derive(Default)]
pub struct Batch {
    /// What each is, what keeps its bytes counted until it is sent, and its text.
    items: Vec<(AgentMessage, Option<Charge>, String)>,
    bytes: usize,
    /// The protocol version the texts are encoded in.
    version: u32,
}

impl Batch {
    fn new(version: u32) -> Batch {
        Batch {
            version,
            ..Batch::default()
        }
    }

    fn push(&mut self, msg: AgentMessage, charge: Option<Charge>) {
        let text = encode_version(&msg, self.version);
        self.bytes += text.len();
        self.items.push((msg, charge, text));
    }

    fn full(&self) -> bool {
        self.items.len() >= SEND_BATCH || self.bytes >= BATCH_BYTES
    }

    /// Takes the texts out, in order, to write them (the messages stay, in case the write
    /// fails and they go back to the outbox).
    pub fn take_texts(&mut self) -> impl Iterator<Item = String> + '_ {
        self.items
            .iter_mut()
            .map(|(_, _, text)| std::mem::take(text))
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Queues replies of the link's own (an `error` answering a bad frame) without waiting.
#[derive(Clone)]
pub struct Replies(mpsc::WeakSender<Outgoing>);

impl Replies {
    /// Queues `msg`; false when the outbox is full (or gone) and it was dropped.
    pub fn try_send(&self, msg: AgentMessage) -> bool {
        self.0
            .upgrade()
            .is_some_and(|tx| tx.try_send(msg.into()).is_ok())
    }
}

impl Outbox {
    pub(super) fn new(
        rx: mpsc::Receiver<Outgoing>,
        replies: mpsc::WeakSender<Outgoing>,
        journal: Journal,
    ) -> Outbox {
        Outbox {
            rx,
            replies,
            journal,
            unsent: VecDeque::new(),
            backlog: VecDeque::new(),
            fresh: false,
            version: bridge_protocol::PROTOCOL_VERSION,
        }
    }

    /// A handle for the link's own replies.
    pub fn replies(&self) -> Replies {
        Replies(self.replies.clone())
    }

    /// A session opened: whatever an earlier session could not send goes first, then what
    /// queued up while the link was down (chunks before their results), then every result the
    /// platform has not acknowledged yet. A result is sent once per session: the journal's
    /// copy replaces a queued one; a queued one whose commit is still in flight is kept.
    /// Messages are encoded in protocol `version`, the one the session negotiated.
    pub fn start_session(&mut self, version: u32) {
        self.version = version;
        for _ in 0..self.rx.len() {
            match self.rx.try_recv() {
                Ok(msg) => self.unsent.push_back(msg),
                Err(_) => break,
            }
        }
        self.backlog = self.journal.unacked_ids().into();
        let in_journal: HashSet<&str> = self.backlog.iter().map(String::as_str).collect();
        self.unsent.retain(|m| {
            m.result_of()
                .is_none_or(|task_id| !in_journal.contains(task_id))
        });
        self.fresh = false;
    }

    /// Waits until there is something to send; false once the agent is gone. Cancel-safe: a
    /// message taken from the channel stays in the outbox.
    pub async fn ready(&mut self) -> bool {
        if !self.unsent.is_empty() || !self.backlog.is_empty() {
            return true;
        }
        match self.rx.recv().await {
            Some(msg) => {
                self.unsent.push_back(msg);
                self.fresh = true;
                true
            }
            None => false,
        }
    }

    /// The messages to write now (after [`Outbox::ready`]): what waits from earlier, or the
    /// backlog's next batch, or what has queued with the message just received. May be empty
    /// (a stored result acknowledged meanwhile).
    pub async fn next_batch(&mut self) -> Batch {
        let mut batch = Batch::new(self.version);
        if std::mem::take(&mut self.fresh) {
            // Let the tasks that are ready run first: the results of one journal commit become
            // ready together, and each would otherwise wake the link (tokio runs a task woken
            // by the running one next) and go out in a write of its own.
            tokio::task::yield_now().await;
            while let Some(item) = self.unsent.pop_front() {
                self.add(item, &mut batch);
            }
            while !batch.full() {
                match self.rx.try_recv() {
                    Ok(item) => self.add(item, &mut batch),
                    Err(_) => break,
                }
            }
            return batch;
        }
        if self.unsent.is_empty() {
            let n = self
                .journal
                .batch_within(self.backlog.iter().take(BACKLOG_BATCH), BATCH_BYTES as u64);
            let ids: Vec<String> = self.backlog.drain(..n).collect();
            self.unsent
                .extend(self.stored(&ids).into_iter().map(Outgoing::from));
        }
        while !batch.full() {
            let Some(item) = self.unsent.pop_front() else {
                break;
            };
            self.add(item, &mut batch);
        }
        batch
    }

    /// A write failed: its messages go first in the next session (some may have gone out:
    /// the platform ignores a result it has).
    pub fn put_back(&mut self, batch: Batch) {
        for (msg, charge, _) in batch.items.into_iter().rev() {
            self.unsent.push_front(Outgoing::Message(msg, charge));
        }
    }

    /// Encodes `item` into `batch`; a stored result is read from the journal (nothing if the
    /// platform acknowledged it meanwhile).
    fn add(&self, item: Outgoing, batch: &mut Batch) {
        match item {
            Outgoing::Message(msg, charge) => batch.push(msg, charge),
            Outgoing::Stored(task_id) => {
                if let Some(msg) = self.stored(std::slice::from_ref(&task_id)).pop() {
                    batch.push(msg, None);
                }
            }
        }
    }

    /// The `result` messages of those of `task_ids` still waiting for an `ack`.
    fn stored(&self, task_ids: &[String]) -> Vec<AgentMessage> {
        self.journal
            .unacked_of(task_ids)
            .into_iter()
            .filter_map(|r| {
                Some(AgentMessage::Result {
                    id: r.request.id,
                    task_id: r.request.task_id,
                    result: r.result?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JournalConfig;
    use bridge_protocol::{RunRequest, RunResult, Status, TaskState};

    /// Everything the outbox has to send now, as (type, task id) pairs.
    async fn drain(outbox: &mut Outbox) -> Vec<(String, String)> {
        let mut sent = Vec::new();
        while tokio::time::timeout(std::time::Duration::from_millis(200), outbox.ready())
            .await
            .is_ok_and(|more| more)
        {
            let mut batch = outbox.next_batch().await;
            for text in batch.take_texts() {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                sent.push((
                    v["type"].as_str().unwrap().into(),
                    v["task_id"].as_str().unwrap().into(),
                ));
            }
        }
        sent
    }

    #[tokio::test]
    async fn after_a_reconnect_the_journal_copy_of_a_result_replaces_the_queued_one() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(JournalConfig::new(dir.path().join("j.redb"))).unwrap();
        let (sender, mut outbox) = super::super::channel(journal.clone());
        let req: RunRequest =
            serde_json::from_value(serde_json::json!({"id": "r1", "task_id": "a", "command": "x"}))
                .unwrap();
        journal.accept(&req).await.unwrap();
        let accepted = AgentMessage::Accepted {
            id: "r1".into(),
            task_id: "a".into(),
            state: TaskState::Queued,
        };
        sender.send(accepted).await;
        let result = RunResult::refused(Status::Cancelled, "cancelled while queued");
        sender
            .record_and_send("r1", "a", result, Default::default(), false)
            .await
            .unwrap();

        // Queued in memory and recorded: sent once, from the journal, after what queued before.
        outbox.start_session(bridge_protocol::PROTOCOL_VERSION);
        let once = vec![
            ("accepted".into(), "a".into()),
            ("result".into(), "a".into()),
        ];
        assert_eq!(drain(&mut outbox).await, once);
        // A session that ends before the ack sends it again, from the journal; acked, never.
        outbox.start_session(bridge_protocol::PROTOCOL_VERSION);
        assert_eq!(drain(&mut outbox).await, once[1..]);
        journal.ack(&["a".into()]);
        outbox.start_session(bridge_protocol::PROTOCOL_VERSION);
        assert_eq!(drain(&mut outbox).await, []);
    }
}
