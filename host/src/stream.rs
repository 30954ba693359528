//! Streaming a running task's output to the platform as `chunk` messages.
//!
//! A task that asks for `stream` gets a [`StreamTap`]: the sandbox's output pipes and the shell
//! executor's readers hand it every byte the task writes, next to the bounded capture that
//! makes the final result. The tap turns them into `chunk` messages:
//!
//! - **In order.** One sequence (`seq` 0, 1, 2…) per task across stdout and stderr; every chunk
//!   is queued on the agent's outbox before the task's `result`, which the agent queues only
//!   after [`StreamTap::finish`], so the platform sees them in order and before the result.
//! - **Bounded in size.** A chunk carries at most [`CHUNK_BYTES`] bytes; bytes are sent at least
//!   every [`FLUSH_EVERY`] while the task runs (see [`StreamTap::flusher`]).
//! - **Bounded in rate.** A token bucket allows [`RATE_BYTES_PER_SEC`] per task with a burst of
//!   [`BURST_BYTES`]; bytes beyond it, or that find the outbox full, are not streamed and are
//!   counted in the next chunk's `dropped_bytes` (they still reach the final result's head/tail
//!   capture when they fit there). Streaming never blocks the task and never grows memory
//!   beyond two chunk buffers.
//! - **Text.** `data` is UTF-8: a multi-byte character split across writes is held back until
//!   it is complete; invalid bytes become U+FFFD.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_protocol::{AgentMessage, StreamName};
use tokio::sync::mpsc;

use crate::outbox::Outgoing;

/// The most bytes one `chunk` carries.
pub const CHUNK_BYTES: usize = 16 << 10;
/// How often buffered output is sent while a task runs.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Streamed bytes per second per task (sustained).
pub const RATE_BYTES_PER_SEC: u64 = 256 << 10;
/// Streamed bytes a task may send at once before the rate applies.
pub const BURST_BYTES: u64 = 256 << 10;

/// Receives a task's output and sends it as `chunk` messages. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct StreamTap {
    inner: Arc<Mutex<Tap>>,
}

struct Tap {
    task_id: String,
    outbox: mpsc::Sender<Outgoing>,
    seq: u64,
    buffers: [Vec<u8>; 2],
    dropped: u64,
    tokens: f64,
    refilled: Instant,
    finished: bool,
}

fn index(stream: StreamName) -> usize {
    match stream {
        StreamName::Stdout => 0,
        StreamName::Stderr => 1,
    }
}

const STREAMS: [StreamName; 2] = [StreamName::Stdout, StreamName::Stderr];

/// How many bytes at the end of `bytes` are the start of a UTF-8 character still incomplete.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0, // ASCII or invalid: nothing to wait for
        };
        return if needed > back { back } else { 0 };
    }
    0
}

impl Tap {
    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * RATE_BYTES_PER_SEC as f64;
        self.tokens = (self.tokens + earned).min(BURST_BYTES as f64);
        self.refilled = now;
    }

    /// Sends up to `CHUNK_BYTES` of `stream`'s buffer; with `all`, also an incomplete tail.
    fn emit(&mut self, stream: StreamName, all: bool) -> bool {
        let buf = &mut self.buffers[index(stream)];
        let mut n = buf.len().min(CHUNK_BYTES);
        if !all || n < buf.len() {
            n -= incomplete_tail(&buf[..n]);
        }
        if n == 0 {
            return false;
        }
        let bytes: Vec<u8> = buf.drain(..n).collect();
        let msg = AgentMessage::Chunk {
            task_id: self.task_id.clone(),
            seq: self.seq,
            stream,
            data: String::from_utf8_lossy(&bytes).into_owned(),
            dropped_bytes: self.dropped,
        };
        match self.outbox.try_send(msg.into()) {
            Ok(()) => {
                self.seq += 1;
                self.dropped = 0;
            }
            Err(_) => self.dropped += n as u64,
        }
        true
    }
}

impl std::fmt::Debug for StreamTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTap").finish_non_exhaustive()
    }
}

impl StreamTap {
    /// A tap for `task_id` sending on `outbox`.
    pub fn new(task_id: &str, outbox: mpsc::Sender<Outgoing>) -> StreamTap {
        StreamTap {
            inner: Arc::new(Mutex::new(Tap {
                task_id: task_id.to_string(),
                outbox,
                seq: 0,
                buffers: [Vec::new(), Vec::new()],
                dropped: 0,
                tokens: BURST_BYTES as f64,
                refilled: Instant::now(),
                finished: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tap> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Output the task wrote. Never blocks on the network.
    pub fn push(&self, stream: StreamName, data: &[u8]) {
        let mut tap = self.lock();
        if tap.finished || data.is_empty() {
            return;
        }
        tap.refill();
        let allowed = (tap.tokens.max(0.0) as usize).min(data.len());
        tap.tokens -= allowed as f64;
        tap.dropped += (data.len() - allowed) as u64;
        tap.buffers[index(stream)].extend_from_slice(&data[..allowed]);
        while tap.buffers[index(stream)].len() >= CHUNK_BYTES {
            if !tap.emit(stream, false) {
                break;
            }
        }
    }

    /// Sends whatever is buffered (except an incomplete character).
    pub fn flush(&self) {
        let mut tap = self.lock();
        if tap.finished {
            return;
        }
        for stream in STREAMS {
            while tap.emit(stream, false) {}
        }
    }

    /// Sends everything left and stops: later output is ignored. Call before queuing the
    /// task's result.
    pub fn finish(&self) {
        let mut tap = self.lock();
        if tap.finished {
            return;
        }
        for stream in STREAMS {
            while tap.emit(stream, true) {}
        }
        if tap.dropped > 0 {
            // Report bytes dropped after the last chunk with an empty one.
            let msg = AgentMessage::Chunk {
                task_id: tap.task_id.clone(),
                seq: tap.seq,
                stream: StreamName::Stdout,
                data: String::new(),
                dropped_bytes: tap.dropped,
            };
            if tap.outbox.try_send(msg.into()).is_ok() {
                tap.seq += 1;
            }
        }
        tap.finished = true;
    }

    /// Chunks sent so far.
    pub fn sent(&self) -> u64 {
        self.lock().seq
    }

    /// Flushes every [`FLUSH_EVERY`] until [`StreamTap::finish`]; spawn it beside the task.
    pub async fn flusher(self) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            if self.lock().finished {
                return;
            }
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<(u64, StreamName, String, u64)> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Outgoing::Message(
                AgentMessage::Chunk {
                    seq,
                    stream,
                    data,
                    dropped_bytes,
                    ..
                },
                _,
            ) = m
            {
                out.push((seq, stream, data, dropped_bytes));
            }
        }
        out
    }

    #[test]
    fn chunks_are_ordered_bounded_and_whole_characters() {
        let (tx, mut rx) = mpsc::channel(1024);
        let tap = StreamTap::new("t", tx);
        tap.push(StreamName::Stdout, b"hello ");
        // "é" split across two writes is sent whole.
        tap.push(StreamName::Stdout, &[0xC3]);
        tap.flush();
        tap.push(StreamName::Stdout, &[0xA9]);
        tap.push(StreamName::Stderr, b"oops");
        tap.push(StreamName::Stdout, &vec![b'x'; 40 << 10]);
        tap.finish();
        tap.push(StreamName::Stdout, b"after finish: ignored");
        let got = chunks(&mut rx);
        let seqs: Vec<u64> = got.iter().map(|c| c.0).collect();
        assert_eq!(seqs, (0..got.len() as u64).collect::<Vec<_>>());
        assert!(got.iter().all(|c| c.2.len() <= CHUNK_BYTES));
        let stdout: String = got
            .iter()
            .filter(|c| c.1 == StreamName::Stdout)
            .map(|c| c.2.as_str())
            .collect();
        assert!(stdout.starts_with("hello é"), "{stdout:.20}");
        assert_eq!(stdout.len(), "hello é".len() + (40 << 10));
        assert!(!stdout.contains('\u{FFFD}'));
        assert!(got
            .iter()
            .any(|c| c.1 == StreamName::Stderr && c.2 == "oops"));
        assert!(!stdout.contains("after finish"));
    }

    #[test]
    fn the_rate_bound_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(1024);
        let tap = StreamTap::new("t", tx);
        let big = vec![b'y'; (BURST_BYTES as usize) * 4];
        tap.push(StreamName::Stdout, &big);
        tap.finish();
        let got = chunks(&mut rx);
        let sent: usize = got.iter().map(|c| c.2.len()).sum();
        let dropped: u64 = got.iter().map(|c| c.3).sum();
        assert!(sent as u64 <= BURST_BYTES + 1024, "{sent}");
        assert_eq!(sent as u64 + dropped, big.len() as u64);
    }

    #[test]
    fn a_full_outbox_drops_instead_of_blocking() {
        let (tx, mut rx) = mpsc::channel(1);
        let tap = StreamTap::new("t", tx);
        for _ in 0..4 {
            tap.push(StreamName::Stdout, &vec![b'z'; CHUNK_BYTES]);
        }
        tap.finish();
        let got = chunks(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 0);
    }

    #[test]
    fn incomplete_tails() {
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[b'a', 0xC3]), 1);
        assert_eq!(incomplete_tail(&[0xE2, 0x82]), 2);
        assert_eq!(incomplete_tail(&[0xE2, 0x82, 0xAC]), 0);
        assert_eq!(incomplete_tail(&[0xF0, 0x9F, 0x98]), 3);
        assert_eq!(incomplete_tail(&[0xFF]), 0);
    }
}
