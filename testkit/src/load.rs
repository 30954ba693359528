//! Load for the benchmarks: a number of tasks kept in flight on the platform's control socket,
//! and the CPU time a process spent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// What [`keep_in_flight`] saw over its window: the tasks that ended in it, how long it lasted,
/// and what `sample` returned at its start and at its end.
pub struct Window<T> {
    pub tasks: u64,
    pub elapsed: Duration,
    pub before: T,
    pub after: T,
}

impl<T> Window<T> {
    /// Tasks per second over the window.
    pub fn rate(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends `request` (a control request, e.g. a `run`) from `concurrency` connections to the
/// platform's control socket, each sending it again as soon as its response comes, and counts
/// the responses over a window of `secs` after 300 ms of warm-up; `sample` is called at the
/// window's start and end (CPU counters). Every response must report a result with `status`
/// (`ok` for a task that runs, `rejected` for one the agent refuses) within 60 s; panics
/// otherwise, or when no task ended in the window.
///
/// The clients share one thread (an async runtime): a thread per connection would spend a
/// context switch per response on the CPUs the platform needs.
pub fn keep_in_flight<T>(
    socket: &Path,
    request: &Value,
    status: &str,
    concurrency: usize,
    secs: f64,
    sample: impl Fn() -> T,
) -> Window<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the clients");
    let socket = socket.to_path_buf();
    // The same request every time, encoded once.
    let line: Arc<str> = format!("{request}\n").into();
    let status: Arc<str> = status.into();
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                let (socket, line, status) = (socket.clone(), line.clone(), status.clone());
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
                    let (read, mut write) = conn.into_split();
                    let mut read = tokio::io::BufReader::new(read);
                    let mut response = String::new();
                    while !stop.load(Ordering::Relaxed) {
                        write.write_all(line.as_bytes()).await.unwrap();
                        response.clear();
                        let n = tokio::time::timeout(
                            Duration::from_secs(60),
                            read.read_line(&mut response),
                        )
                        .await
                        .expect("no response within 60 s")
                        .unwrap();
                        assert!(n > 0, "the platform closed the control connection");
                        assert!(ended_as(&response, &status), "{response}");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (n0, t0, before) = (done.load(Ordering::SeqCst), Instant::now(), sample());
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let (n1, t1, after) = (done.load(Ordering::SeqCst), Instant::now(), sample());
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        let tasks = n1 - n0;
        assert!(tasks > 0, "no task finished in {secs} s: {request}");
        Window {
            tasks,
            elapsed: t1 - t0,
            before,
            after,
        }
    })
}

/// Whether a `run` response reports a result with `status`. Only the status is decoded (into
/// borrowed fields, the rest skipped): a JSON tree of every response (the whole result) was
/// most of the load generator's own work, on CPUs it shares with the platform.
pub fn ended_as(response: &str, status: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Response<'a> {
        #[serde(borrow)]
        result: Option<Outcome<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Outcome<'a> {
        #[serde(borrow)]
        status: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<Response<'_>>(response)
        .ok()
        .and_then(|r| r.result)
        .is_some_and(|o| o.status == status)
}

/// CPU time (seconds) process `pid` used, from `/proc/<pid>/stat`: user and system time, its
/// own and that of the children it waited for (the shell fallback's processes count for the
/// agent).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime, stime, cutime, cstime are fields 14-17 of the line, 12-15 after the name.
    let ticks: f64 = fields[11..15]
        .iter()
        .map(|f| f.parse::<f64>().unwrap())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
