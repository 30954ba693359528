//! Bounded capture of a handler's stdout and stderr.
//!
//! wasmtime-wasi's `MemoryOutputPipe` fails the guest's write once its capacity is reached, which
//! turns "too much output" into a trap (Rust's `println!` panics on a write error). A handler
//! that prints a lot is not broken, so [`CappedPipe`] accepts every write, keeps the first
//! `cap` bytes, counts the rest and drops it: memory stays bounded whatever the guest does.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one call; any value works, this one keeps chunks moderate.
const WRITE_BUDGET: usize = 1 << 20;

#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

/// A write-only pipe that keeps at most `cap` bytes and counts everything written to it.
/// Clones share the same buffer, so the host keeps one clone to read what the guest wrote.
#[derive(Debug, Clone)]
pub struct CappedPipe {
    cap: usize,
    inner: Arc<Mutex<Captured>>,
}

impl CappedPipe {
    /// A pipe keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        CappedPipe {
            cap,
            inner: Arc::new(Mutex::new(Captured::default())),
        }
    }

    fn push(&self, data: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.total += data.len() as u64;
        let room = self.cap.saturating_sub(c.kept.len());
        let take = room.min(data.len());
        c.kept.extend_from_slice(&data[..take]);
    }

    /// What was kept, and the total number of bytes written (kept or dropped).
    pub fn snapshot(&self) -> (Vec<u8>, u64) {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (c.kept.clone(), c.total)
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
    fn keeps_what_fits_and_counts_the_rest() {
        let pipe = CappedPipe::new(10);
        let mut writer = pipe.clone();
        OutputStream::write(&mut writer, Bytes::from_static(b"hello ")).unwrap();
        OutputStream::write(&mut writer, Bytes::from_static(b"world, and more")).unwrap();
        let (kept, total) = pipe.snapshot();
        assert_eq!(kept, b"hello worl");
        assert_eq!(total, 21);
        // Writes past the cap still succeed: the guest never sees an error for printing a lot.
        assert!(OutputStream::write(&mut writer, Bytes::from(vec![b'x'; 1 << 20])).is_ok());
        assert_eq!(pipe.snapshot().1, 21 + (1 << 20));
        assert_eq!(pipe.snapshot().0.len(), 10);
    }
}
