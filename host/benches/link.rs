//! The link benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench link` after
//! `cargo build --release -p bridge-platform`).
//!
//! Starts a real `bridgectl serve` and a real `bridge-daemon run` (release builds) on 127.0.0.1
//! and prints:
//! - the round trip of a warm `hello` task over loopback TLS, measured by the platform from
//!   sending `run` to receiving `result` (median, p99);
//! - the agent's resident memory when idle and connected;
//! - its resident memory sampled across an outage of failed reconnects (platform gone, 1 s
//!   backoff ceiling, so the agent tries as often as it ever will): minimum, maximum, spread.
//!
//! `BRIDGE_BENCH_OUTAGE_SECS` sets the outage length (default 600 = ten minutes; the quick mode,
//! `BRIDGE_BENCH_QUICK=1`, uses 20).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{release_bin, serve, signed_hello, Proc};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn control(info: &Value, req: Value) -> Value {
    let mut conn = UnixStream::connect(info["control"].as_str().unwrap()).unwrap();
    writeln!(conn, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    serde_json::from_str(line.trim()).unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let outage_secs: u64 = std::env::var("BRIDGE_BENCH_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20 } else { 600 });
    let runs = if quick { 200 } else { 2000 };
    let tmp = tempfile::tempdir().unwrap();
    let (platform, info) = serve(&tmp.path().join("platform"), "127.0.0.1:0");

    let (key, signed) = signed_hello();
    let state = tmp.path().join("agent");
    let agent = Proc(
        Command::new(release_bin("bridge-daemon"))
            .args([
                "run",
                "--server",
                info["url"].as_str().unwrap(),
                "--server-pin",
                info["server_pin"].as_str().unwrap(),
            ])
            .args([
                "--token",
                info["token"].as_str().unwrap(),
                "--reconnect-max-secs",
                "1",
                "--trusted-key",
            ])
            .arg(key.public_key().to_string())
            .arg("--state")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    let start = Instant::now();
    let id = loop {
        let agents = control(&info, json!({"cmd": "agents"}));
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

    // The first run uploads and compiles; the rest are warm.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&signed);
    let first = control(
        &info,
        json!({"cmd": "run", "agent": id, "module": b64, "input": {"name": "bench"}}),
    );
    assert_eq!(first["result"]["status"], "ok", "{first}");
    let sha = first["result"]["module_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rtts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let r = control(
            &info,
            json!({"cmd": "run", "agent": id, "module_sha256": sha, "input": {"name": "bench"}}),
        );
        assert_eq!(r["result"]["status"], "ok", "{r}");
        rtts.push(
            r["round_trip_us"]
                .as_f64()
                .expect("round_trip_us in the control response")
                / 1000.0,
        );
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "bridge link benchmark ({} mode)",
        if quick { "quick" } else { "full" }
    );
    println!();
    println!(
        "warm hello task round trip over loopback TLS (platform send → result): median {:.3} ms   p99 {:.3} ms   (n={runs}; target: median under 1 ms)",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );

    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(pid);
    println!(
        "agent resident memory, idle and connected: {:.1} MiB   (target: under 10 MiB)",
        idle as f64 / 1024.0
    );

    drop(platform);
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(outage_secs) {
        std::thread::sleep(Duration::from_secs(if quick { 1 } else { 10 }));
        samples.push(rss_kib(pid));
    }
    let (min, max) = (
        *samples.iter().min().unwrap(),
        *samples.iter().max().unwrap(),
    );
    println!(
        "agent resident memory across {outage_secs} s of failed reconnects (1 s ceiling): min {:.1} MiB, max {:.1} MiB, first {:.1}, last {:.1}, spread {:.2} MiB   (target: flat within ±1 MiB)",
        min as f64 / 1024.0,
        max as f64 / 1024.0,
        samples[0] as f64 / 1024.0,
        samples[samples.len() - 1] as f64 / 1024.0,
        (max - min) as f64 / 1024.0
    );
}
