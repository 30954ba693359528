//! The metrics benchmark: what collecting Prometheus metrics costs the agent, per warm WASM
//! task. `cargo xtask bench` (or `cargo bench -p bridge-host --bench metrics` after `cargo
//! build --release -p bridge-host -p bridge-platform` and `cargo xtask build-examples`).
//!
//! A real `bridgectl serve` and a real `bridge-daemon run` (release builds) on 127.0.0.1, the
//! signed `hello` handler installed. The agent is restarted for each run, on the same state
//! directory, with `[metrics] listen` off or on (and then scraped every second while measured,
//! fifteen times as often as Prometheus's default interval): nothing else differs. Runs
//! alternate (off then on, then on then off, …) so both sides see the same machine; each run
//! warms the handler, keeps 32 tasks in flight for a fixed window and takes the agent's CPU
//! time (`/proc/<pid>/stat`, user + system) over the tasks that ended in it. Prints every run side by side, the medians, the difference and the verdict against
//! the target (under 2 % of the agent's CPU per task).
//!
//! The agent runs on the first half of the CPUs, the platform and the clients on the other half
//! (one core each on two), as in the throughput benchmark. `BRIDGE_BENCH_QUICK=1` runs 4 runs of
//! 3 s per side instead of 8 of 5 s.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bridge_testkit::cpus::{allowed_cpus, pin};
use bridge_testkit::load::{cpu_secs, keep_in_flight};
use bridge_testkit::metrics::endpoint;
use bridge_testkit::{Agent, Platform, Publisher};
use serde_json::json;

const IN_FLIGHT: usize = 32;

/// One scrape of `GET /metrics`; the body's length.
fn scrape(addr: SocketAddr) -> usize {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(
        body.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&body)
    );
    body.len()
}

/// Keeps [`IN_FLIGHT`] warm `hello` tasks running on agent `id` for `secs` (scraping
/// `metrics` every second if given); returns the agent's CPU microseconds per task.
fn measure(socket: &Path, id: &str, pid: u32, secs: f64, metrics: Option<SocketAddr>) -> f64 {
    let req = json!({"cmd": "run", "agent": id, "command": "hello", "input": {"name": "bench"}});
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = metrics.map(|addr| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                scrape(addr);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    });
    let w = keep_in_flight(socket, &req, "ok", IN_FLIGHT, secs, || cpu_secs(pid));
    stop.store(true, Ordering::SeqCst);
    if let Some(s) = scraper {
        s.join().unwrap();
    }
    (w.after - w.before) / w.tasks as f64 * 1e6
}

/// The observer's work for one warm WASM task (a cache hit, two journal commits, the task's
/// end), timed directly over many tasks: nanoseconds per task with metrics `on` or not.
fn observer_ns_per_task(on: bool) -> f64 {
    use bridge_host::observe::{CacheEvent, Observer, TaskKind};
    let observer = Observer::new(on.then(bridge_host::observe::Metrics::new));
    let mut result = bridge_protocol::RunResult::refused(bridge_protocol::Status::Ok, "");
    result.duration_ms = 0.4;
    result.fuel_consumed = Some(120_000);
    const TASKS: u32 = 200_000;
    let started = Instant::now();
    for _ in 0..TASKS {
        observer.module_cache(CacheEvent::Hit);
        observer.journal_commit(Duration::from_micros(300), 400);
        observer.journal_commit(Duration::from_micros(80), 200);
        observer.task_ended(TaskKind::Wasm, std::hint::black_box(&result));
    }
    started.elapsed().as_nanos() as f64 / f64::from(TASKS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let (runs, secs) = if quick { (4, 3.0) } else { (8, 5.0) };
    let cpus = allowed_cpus();
    let (agent_cpus, rest) = if cpus.len() >= 2 {
        let (a, r) = cpus.split_at(cpus.len() / 2);
        (a.to_vec(), r.to_vec())
    } else {
        (cpus.clone(), cpus.clone())
    };
    pin(&rest);
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::builder(&tmp.path().join("platform"))
        .log_level("warn")
        .start();
    let publisher = Publisher::new();
    let control = platform.control();
    let config = tmp.path().join("agent.toml");
    let state = tmp.path().join("agent");
    let args = {
        let mut a = platform.agent_args(Some(&publisher));
        a.extend(["--config".into(), config.display().to_string()]);
        a
    };
    // One agent, one state directory, restarted for each run with metrics off or on: nothing
    // but the `[metrics]` table differs between the two sides.
    let start = |metrics: bool| {
        let table = if metrics {
            "[metrics]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!("{table}[agent]\nmax_concurrent_tasks = {IN_FLIGHT}\n"),
        )
        .unwrap();
        pin(&agent_cpus);
        let agent = Agent::start_with(&state, &args, |cmd| {
            cmd.env("RUST_LOG", "warn,bridge_host::daemon=info");
        });
        pin(&rest);
        let id = agent.id();
        control.wait_connected(&id);
        (agent, id)
    };
    {
        let (_agent, id) = start(false);
        let installed = control.request(&json!({"cmd": "install_handler", "agent": id,
            "name": "hello", "module": STANDARD.encode(publisher.signed("hello"))}));
        assert_eq!(installed["ok"], true, "{installed}");
    }
    println!(
        "bridge metrics benchmark ({} mode): agent CPU per warm hello task, metrics off vs on \
         (scraped every second), {IN_FLIGHT} in flight, {runs} runs of {secs} s per side, \
         alternating, the agent restarted for each",
        if quick { "quick" } else { "full" }
    );
    println!("the agent on CPUs {agent_cpus:?}; the platform and the clients on CPUs {rest:?}");
    let socket = platform.control_socket().to_path_buf();
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    let mut scrape_bytes = 0;
    let started = Instant::now();
    for run in 0..runs {
        let mut pair = [0.0; 2];
        // Off first in even runs, on first in odd ones: neither always follows the other.
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let metrics = side == 1;
            let (mut agent, id) = start(metrics);
            let addr = metrics.then(|| endpoint(&agent));
            // Warm: the handler compiled (or loaded from the disk cache) before the window.
            let r = control.request(&json!({"cmd": "run", "agent": id, "command": "hello"}));
            assert_eq!(r["result"]["status"], "ok", "{r}");
            pair[side] = measure(&socket, &id, agent.pid(), secs, addr);
            if let Some(addr) = addr {
                scrape_bytes = scrape(addr);
            }
            agent.terminate();
            control.wait_disconnected(&id);
        }
        println!(
            "  run {}: off {:6.1} µs  on {:6.1} µs  ({:+.1} %)",
            run + 1,
            pair[0],
            pair[1],
            (pair[1] / pair[0] - 1.0) * 100.0
        );
        offs.push(pair[0]);
        ons.push(pair[1]);
    }
    let (off_med, on_med) = (median(offs), median(ons));
    let cost = (on_med / off_med - 1.0) * 100.0;
    println!();
    println!("medians: off {off_med:.1} µs  on {on_med:.1} µs per task: {cost:+.1} % (target: under 2 %)");
    let direct: Vec<(f64, f64)> = (0..5)
        .map(|_| (observer_ns_per_task(false), observer_ns_per_task(true)))
        .collect();
    let direct_off = median(direct.iter().map(|d| d.0).collect());
    let direct_on = median(direct.iter().map(|d| d.1).collect());
    println!(
        "the observer's own work per task, timed directly: {direct_off:.0} ns off, {direct_on:.0} ns on: \
         {:.2} % of the {off_med:.1} µs the agent spends per task",
        (direct_on - direct_off) / 1000.0 / off_med * 100.0
    );
    println!(
        "verdict: {} ({:.0} s; a scrape is {} bytes)",
        if cost < 2.0 { "met" } else { "NOT met" },
        started.elapsed().as_secs_f64(),
        scrape_bytes
    );
}
