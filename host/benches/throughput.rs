//! The throughput benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench
//! throughput` after `cargo build --release -p bridge-host -p bridge-platform` and
//! `cargo xtask build-examples`).
//!
//! Starts a real `bridgectl serve` and a real `bridge-daemon run` (release builds) on 127.0.0.1,
//! the agent with its durable journal (the real configuration: every task is on disk before
//! anything of it is reported, its result is recorded as it is sent, and acknowledged by the
//! platform), and measures tasks per second end to end: platform control request → `run` over
//! loopback TLS → journal → execution → journal → `result` → platform → response. Clients keep
//! `BRIDGE_BENCH_CONCURRENCY` tasks in flight (default 32), each on its own control connection,
//! all driven from one thread.
//!
//! Two commands, measured in alternating rounds so both see the same machine:
//! - `hello`: the installed, signed `hello` handler (warm: compiled once, then cached);
//! - `true`: the shell fallback running `/bin/true` (a process spawned per task).
//!
//! Prints each round and the median per command, and the ratio. `BRIDGE_BENCH_ONLY=hello` (or
//! `true`) measures one of the two alone, e.g. to profile it.

use std::io::{BufRead, BufReader, Write};

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

mod support;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{release_bin, serve, signed_hello, Proc};

/// A control connection carrying one request after another.
struct Control {
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl Control {
    fn connect(info: &Value) -> Control {
        let conn = TcpStream::connect(info["control"].as_str().unwrap()).unwrap();
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Control {
            write: conn.try_clone().unwrap(),
            read: BufReader::new(conn),
        }
    }

    fn request(&mut self, req: &Value) -> Value {
        let mut text = req.to_string();
        text.push('\n');
        self.write.write_all(text.as_bytes()).unwrap();
        let mut line = String::new();
        self.read.read_line(&mut line).unwrap();
        serde_json::from_str(line.trim()).unwrap()
    }
}

/// Whether a `run` response reports a successful result. Only the status is decoded (into
/// borrowed fields, the rest skipped): the load generator shares the two cores with what it
/// measures, and a JSON tree of every response (the whole result) was most of its own work.
fn succeeded(response: &str) -> bool {
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
        .is_some_and(|o| o.status == "ok")
}

/// Runs `command` from `concurrency` connections for `secs`; returns tasks per second.
///
/// The clients share one thread (an async runtime): the load generator runs on the same two
/// cores as the agent and the platform, and a thread per connection would spend a context
/// switch per response that the system under test could have used.
fn measure(info: &Value, id: &str, command: &str, concurrency: usize, secs: f64) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = info["control"].as_str().unwrap().to_string();
    // The same request every time, encoded once.
    let req = json!({"cmd": "run", "agent": id, "command": command, "input": {"name": "bench"}});
    let line: Arc<str> = format!("{req}\n").into();
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                let (addr, line) = (addr.clone(), line.clone());
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
                    conn.set_nodelay(true).unwrap();
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
                        assert!(succeeded(&response), "{response}");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Warm up the connections, then count over the window.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (n0, t0) = (done.load(Ordering::SeqCst), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let (n1, t1) = (done.load(Ordering::SeqCst), Instant::now());
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        (n1 - n0) as f64 / (t1 - t0).as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let concurrency: usize = std::env::var("BRIDGE_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let (rounds, secs) = if quick { (3, 2.0) } else { (5, 5.0) };
    let tmp = tempfile::tempdir().unwrap();
    let (_platform, info) = serve(&tmp.path().join("platform"), "127.0.0.1:0");

    let (key, signed) = signed_hello();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nmax_concurrent_tasks = {concurrency}\nqueue_capacity = {}\n\n[[shell.rules]]\nname = \"true\"\nprogram = \"/bin/true\"\n",
            concurrency * 4
        ),
    )
    .unwrap();
    let state = tmp.path().join("agent");
    let _agent = Proc(
        Command::new(release_bin("bridge-daemon"))
            .args([
                "run",
                "--server",
                info["url"].as_str().unwrap(),
                "--server-pin",
                info["server_pin"].as_str().unwrap(),
                "--token",
                info["token"].as_str().unwrap(),
                "--trusted-key",
            ])
            .arg(key.public_key().to_string())
            .arg("--config")
            .arg(&config)
            .arg("--state")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut control = Control::connect(&info);
    let start = Instant::now();
    let id = loop {
        let agents = control.request(&json!({"cmd": "agents"}));
        if let Some(a) = agents["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["connected"] == true))
        {
            break a["id"].as_str().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not connect"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&signed);
    let installed = control
        .request(&json!({"cmd": "install_handler", "agent": id, "name": "hello", "module": b64}));
    assert_eq!(installed["ok"], true, "{installed}");
    for command in ["hello", "true"] {
        let r = control.request(&json!({"cmd": "run", "agent": id, "command": command}));
        assert_eq!(r["result"]["status"], "ok", "{r}");
    }

    println!(
        "bridge throughput benchmark ({} mode): {concurrency} tasks in flight, journal on, {rounds} rounds of {secs} s each",
        if quick { "quick" } else { "full" }
    );
    let (mut wasm, mut shell) = (Vec::new(), Vec::new());
    // `BRIDGE_BENCH_ONLY=hello` (or `true`) measures one command alone, e.g. under a profiler.
    let only = std::env::var("BRIDGE_BENCH_ONLY").ok();
    let wanted = |c: &str| only.as_deref().is_none_or(|o| o == c);
    for round in 1..=rounds {
        let w = if wanted("hello") {
            measure(&info, &id, "hello", concurrency, secs)
        } else {
            0.0
        };
        let s = if wanted("true") {
            measure(&info, &id, "true", concurrency, secs)
        } else {
            0.0
        };
        println!("round {round}: hello handler {w:.0} tasks/s   shell /bin/true {s:.0} tasks/s");
        wasm.push(w);
        shell.push(s);
    }
    let (w, s) = (median(wasm), median(shell));
    println!();
    println!(
        "median: hello handler {w:.0} tasks/s (target: at least 2000)   shell /bin/true {s:.0} tasks/s   ratio {:.1}x (target: at least 5x)",
        w / s
    );
    if let Ok(bytes) = std::fs::metadata(state.join("journal.redb")).map(|m| m.len()) {
        println!(
            "journal size after the run: {:.1} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
}
