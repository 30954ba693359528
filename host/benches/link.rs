//! The link benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench link` after
//! `cargo build --release -p bridge-platform`).
//!
//! Starts a real `bridgectl serve` and a real `bridge-daemon run` (release builds) on 127.0.0.1
//! and prints:
//! - the round trip of a warm `hello` task over loopback TLS, measured by the platform from
//!   sending `run` to receiving `result` (median, p99);
//! - the same for a task the agent refuses before its journal (an unknown command): the link's
//!   own share of the round trip, without a commit or a run;
//! - the agent's resident memory when idle and connected;
//! - its resident memory sampled across an outage of failed reconnects (platform gone, 1 s
//!   backoff ceiling, so the agent tries as often as it ever will): minimum, maximum, spread.
//!
//! `BRIDGE_BENCH_OUTAGE_SECS` sets the outage length (default 600 = ten minutes; the quick mode,
//! `BRIDGE_BENCH_QUICK=1`, uses 20).

use std::time::{Duration, Instant};

use bridge_testkit::{figures, Agent, Control, Platform, Publisher};
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The round trip the platform measured for a `run` answer, in milliseconds.
fn round_trip_ms(answer: &serde_json::Value) -> f64 {
    answer["round_trip_us"]
        .as_f64()
        .expect("round_trip_us in the control response")
        / 1000.0
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
    let platform = Platform::builder(&tmp.path().join("platform"))
        .log_level("warn")
        .start();
    let control = platform.control();

    let publisher = Publisher::new();
    let signed = publisher.signed("hello");
    let mut args = platform.agent_args(Some(&publisher));
    args.extend(["--reconnect-max-secs".into(), "1".into()]);
    let agent = Agent::start_with(&tmp.path().join("agent"), &args, |cmd| {
        cmd.env("RUST_LOG", "warn");
    });
    let pid = agent.pid();
    let id = control.wait_any_connected(bridge_testkit::CONNECT);

    // The first run uploads and compiles; the rest are warm.
    let first = control.run_module(&id, &signed, json!({"name": "bench"}), None);
    assert_eq!(first["result"]["status"], "ok", "{first}");
    let sha = Control::module_sha256(&first);
    let mut rtts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let r = control.request(
            &json!({"cmd": "run", "agent": id, "module_sha256": sha, "input": {"name": "bench"}}),
        );
        assert_eq!(r["result"]["status"], "ok", "{r}");
        rtts.push(round_trip_ms(&r));
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // The link's own share: a task the agent refuses before its journal (an unknown command)
    // goes the same way (TLS, WebSocket, JSON, the platform, the agent's admission) without a
    // commit or a run.
    let mut refused = Vec::with_capacity(runs);
    for _ in 0..runs {
        let r = control.request(&json!({"cmd": "run", "agent": id, "command": "no-such-command"}));
        assert_eq!(r["result"]["reason"], "unknown_command", "{r}");
        refused.push(round_trip_ms(&r));
    }
    refused.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "bridge link benchmark ({} mode)",
        if quick { "quick" } else { "full" }
    );
    println!();
    println!(
        "warm hello task round trip over loopback TLS (platform send → result): median {:.3} ms   p99 {:.3} ms   (n={runs}; target: median under 0.5 ms)",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );
    println!(
        "the link alone, a task refused before the journal (unknown command): median {:.3} ms   p99 {:.3} ms   (n={runs})",
        percentile(&refused, 0.5),
        percentile(&refused, 0.99)
    );

    figures::record("link.round_trip_median_ms", percentile(&rtts, 0.5), "ms");
    figures::record("link.round_trip_p99_ms", percentile(&rtts, 0.99), "ms");
    figures::record(
        "link.refused_round_trip_median_ms",
        percentile(&refused, 0.5),
        "ms",
    );

    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(pid);
    figures::record("link.idle_rss_mib", idle as f64 / 1024.0, "MiB");
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
    figures::record("link.outage_rss_max_mib", max as f64 / 1024.0, "MiB");
    figures::record(
        "link.outage_rss_spread_mib",
        (max - min) as f64 / 1024.0,
        "MiB",
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
