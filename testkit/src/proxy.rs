//! A TCP proxy on 127.0.0.1 between an agent and its platform, for network faults: cut the
//! connections open now (both ends closed at once), or freeze all forwarding (a silent
//! partition: nothing is closed, nothing passes).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    frozen: AtomicBool,
    /// The proxy was dropped: frozen forwarders give up.
    closed: AtomicBool,
    /// Both sockets of each connection accepted so far.
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
}

/// A proxy forwarding each connection to `upstream`, until dropped.
pub struct Proxy {
    addr: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1; forwards each connection to `upstream`.
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared::default());
        let (upstream, state) = (upstream.to_string(), shared.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                state
                    .open
                    .lock()
                    .unwrap()
                    .push((conn.try_clone().unwrap(), up.try_clone().unwrap()));
                for (from, to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    let state = state.clone();
                    std::thread::spawn(move || forward(from, to, &state));
                }
            }
        });
        Proxy { addr, shared }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Closes both ends of every connection open now; later connections go through.
    pub fn cut(&self) {
        for (a, b) in self.shared.open.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Stops forwarding (`true`) or resumes it (`false`); the data held meanwhile passes then.
    pub fn freeze(&self, frozen: bool) {
        self.shared.frozen.store(frozen, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.cut();
    }
}

/// Copies `from` to `to` until either ends, holding the data while the proxy is frozen.
fn forward(mut from: TcpStream, mut to: TcpStream, state: &Shared) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        while state.frozen.load(Ordering::SeqCst) {
            if state.closed.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
