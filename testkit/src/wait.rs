//! Waiting for a state, with a deadline and the last state seen in the failure.

use std::time::{Duration, Instant};

/// How long an agent may take to connect, a task to start, a result to arrive.
pub const CONNECT: Duration = Duration::from_secs(30);

/// Polls `probe` (every 50 ms) until it returns `Ok`, at most `within`; then panics naming
/// `what` and the last state `probe` described in its `Err`.
#[track_caller]
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if start.elapsed() >= within => {
                panic!("timed out after {within:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// [`wait_until`] for a condition with nothing to show but whether it holds.
#[track_caller]
pub fn wait_for(what: &str, within: Duration, mut holds: impl FnMut() -> bool) {
    wait_until(what, within, || {
        if holds() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
}
