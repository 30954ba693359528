//! Bounded capture of a handler's stdout and stderr.
//!
//! wasmtime-wasi's `MemoryOutputPipe` fails the guest's write once its capacity is reached, which
//! turns "too much output" into a trap (Rust's `println!` panics on a write error). A handler
//! that prints a lot is not broken, so [`CappedPipe`] accepts every write and keeps a
//! [`HeadTail`] of it (the first half of the cap and the last half, everything counted): memory
//! stays bounded whatever the guest does. With a [`StreamTap`], every write is also streamed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bridge_protocol::StreamName;
use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::capture::HeadTail;
use crate::stream::StreamTap;

/// How much a guest may write in one call; any value works, this one keeps chunks moderate.
const WRITE_BUDGET: usize = 1 << 20;

/// A write-only pipe that keeps at most `cap` bytes (head and tail) and counts everything
/// written to it. Clones share the same buffer, so the host keeps one clone to read what the
/// guest wrote.
#[derive(Clone)]
pub struct CappedPipe {
    inner: Arc<Mutex<HeadTail>>,
    tap: Option<(StreamTap, StreamName)>,
}

impl CappedPipe {
    /// A pipe keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        CappedPipe {
            inner: Arc::new(Mutex::new(HeadTail::new(cap))),
            tap: None,
        }
    }

    /// A pipe keeping at most `cap` bytes and streaming every write to `tap` as `stream`.
    pub fn streamed(cap: usize, tap: Option<StreamTap>, stream: StreamName) -> Self {
        CappedPipe {
            inner: Arc::new(Mutex::new(HeadTail::new(cap))),
            tap: tap.map(|t| (t, stream)),
        }
    }

    fn push(&self, data: &[u8]) {
        if let Some((tap, stream)) = &self.tap {
            tap.push(*stream, data);
        }
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(data);
    }

    /// The capture so far.
    pub fn snapshot(&self) -> HeadTail {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for CappedPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedPipe")
            .field("streamed", &self.tap.is_some())
            .finish_non_exhaustive()
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_head_and_tail_and_counts_the_rest() {
        let pipe = CappedPipe::new(10);
        let mut writer = pipe.clone();
        OutputStream::write(&mut writer, Bytes::from_static(b"hello ")).unwrap();
        OutputStream::write(&mut writer, Bytes::from_static(b"world, and more")).unwrap();
        let kept = pipe.snapshot();
        assert_eq!(kept.bytes(), b"hello more");
        assert_eq!(kept.total(), 21);
        // Writes past the cap still succeed: the guest never sees an error for printing a lot.
        assert!(OutputStream::write(&mut writer, Bytes::from(vec![b'x'; 1 << 20])).is_ok());
        assert_eq!(pipe.snapshot().total(), 21 + (1 << 20));
        assert_eq!(pipe.snapshot().held(), 10);
    }
}
