//! Chunk streams: who streams a task's output, by task id, fed the agent's `chunk`s through
//! bounded queues (a client that does not keep up loses chunks; the reader never waits).

use std::collections::HashMap;
use std::sync::Mutex;

use bridge_protocol::StreamName;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{lock, remove_keyed, Hub};

/// One `chunk` of a task's output, as forwarded to whoever streams the task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkEvent {
    /// The task id.
    pub task_id: String,
    /// 0, 1, 2… per task, across both streams.
    pub seq: u64,
    /// stdout or stderr.
    pub stream: StreamName,
    /// The text.
    pub data: String,
    /// Bytes the agent did not stream since the previous chunk.
    pub dropped_bytes: u64,
}

/// Where one streaming waiter (by its key) receives a task's chunks.
#[derive(Debug)]
struct ChunkSink {
    key: u64,
    tx: mpsc::Sender<ChunkEvent>,
    /// Bytes of the chunks dropped (the queue was full) since the last one delivered, added to
    /// the next one's `dropped_bytes`.
    dropped_bytes: u64,
    /// Chunks dropped in all.
    dropped_chunks: u64,
}

/// The streaming waiters by task id.
#[derive(Debug, Default)]
pub(super) struct ChunkStreams {
    by_task: Mutex<HashMap<String, Vec<ChunkSink>>>,
}

impl ChunkStreams {
    /// Adds the streaming waiter `key` of `task_id`, which receives its chunks on `tx`.
    pub(super) fn add(&self, task_id: &str, key: u64, tx: mpsc::Sender<ChunkEvent>) {
        lock(&self.by_task)
            .entry(task_id.to_string())
            .or_default()
            .push(ChunkSink {
                key,
                tx,
                dropped_bytes: 0,
                dropped_chunks: 0,
            });
    }

    /// Forwards `chunk` to every streaming waiter of its task, never waiting; returns how many
    /// stream the task.
    fn forward(&self, chunk: ChunkEvent) -> usize {
        let mut by_task = lock(&self.by_task);
        let Some(list) = by_task.get_mut(&chunk.task_id) else {
            return 0;
        };
        list.retain_mut(|sink| {
            let mut event = chunk.clone();
            event.dropped_bytes = event.dropped_bytes.saturating_add(sink.dropped_bytes);
            match sink.tx.try_send(event) {
                Ok(()) => {
                    sink.dropped_bytes = 0;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if sink.dropped_chunks == 0 {
                        tracing::warn!(task_id = %chunk.task_id, "a streaming client does not keep up: dropping chunks");
                    }
                    sink.dropped_chunks += 1;
                    sink.dropped_bytes = sink
                        .dropped_bytes
                        .saturating_add(chunk.data.len() as u64)
                        .saturating_add(chunk.dropped_bytes);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let n = list.len();
        if n == 0 {
            by_task.remove(&chunk.task_id);
        }
        n
    }

    /// Removes the streaming waiter `key` of `task_id`.
    pub(super) fn remove(&self, task_id: &str, key: u64) {
        let mut by_task = lock(&self.by_task);
        if let Some(list) = by_task.get(task_id) {
            for sink in list.iter().filter(|s| s.key == key && s.dropped_chunks > 0) {
                tracing::warn!(
                    task_id,
                    chunks = sink.dropped_chunks,
                    "chunks dropped for a streaming client that did not keep up"
                );
            }
        }
        remove_keyed(&mut by_task, task_id, |s| s.key != key);
    }
}

impl Hub {
    /// Forwards a `chunk` to whoever streams its task, never waiting: a streaming waiter whose
    /// queue is full loses the chunk (its bytes are added to the `dropped_bytes` of the next
    /// chunk it gets). Returns how many stream the task.
    pub fn on_chunk(&self, chunk: ChunkEvent) -> usize {
        self.streams.forward(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, data: &str) -> ChunkEvent {
        ChunkEvent {
            task_id: "t".into(),
            seq,
            stream: StreamName::Stdout,
            data: data.into(),
            dropped_bytes: 0,
        }
    }

    #[test]
    fn a_slow_streaming_client_loses_chunks_with_a_count_and_never_blocks_the_reader() {
        let streams = ChunkStreams::default();
        let (tx, mut rx) = mpsc::channel(2);
        streams.add("t", 1, tx);
        for seq in 0..5 {
            assert_eq!(streams.forward(chunk(seq, "abcd")), 1);
        }
        assert_eq!(rx.try_recv().unwrap().seq, 0);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        assert!(rx.try_recv().is_err());
        // The next chunk delivered counts the bytes of the three dropped.
        let mut next = chunk(5, "ef");
        next.dropped_bytes = 10;
        streams.forward(next);
        let got = rx.try_recv().unwrap();
        assert_eq!((got.seq, got.dropped_bytes), (5, 10 + 3 * 4));
        streams.forward(chunk(6, "g"));
        assert_eq!(rx.try_recv().unwrap().dropped_bytes, 0);
        streams.remove("t", 1);
        assert!(lock(&streams.by_task).is_empty());
        // A client gone: its sink goes.
        let (tx, rx) = mpsc::channel(2);
        streams.add("t", 2, tx);
        drop(rx);
        assert_eq!(streams.forward(chunk(0, "x")), 0);
        assert!(lock(&streams.by_task).is_empty());
    }
}
