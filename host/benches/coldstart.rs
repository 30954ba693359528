//! The cold-start benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench
//! coldstart` after `cargo build --release -p bridge-host -p bridge-platform` and
//! `cargo xtask build-examples`).
//!
//! What a restarted agent costs before it does useful work: from starting the `bridge-daemon run`
//! process to the result of its first task, a `hello` whose module is already in the agent's
//! module store (the state directory of an agent that ran it once).
//!
//! A real `bridgectl serve` and real release agents on 127.0.0.1. The state directory is
//! prepared once (enrolment, one run of `hello`, a clean stop), then each run starts an agent
//! on a fresh copy of it, waits for the platform to see it (its `hello`, logged by the platform
//! as `session started`), sends a `run` of `hello` by its SHA-256 and waits for the result.
//! Per run:
//! - **connect**: process start → the platform sends `welcome` (it has seen `hello`);
//! - **first task**: the platform's own round trip of the `run` (send → result);
//! - **total**: connect + first task (the time the benchmark takes to notice the connection
//!   and send the `run` is in neither);
//! - **platform**: the platform's own time within the total: each of its turns, from the
//!   agent's last bytes reaching it to the last of its own going out before the agent's next,
//!   seen by a timestamping TCP relay between the two (the TLS handshake's server flights, the
//!   upgrade's response, `welcome`; during the task the agent holds the turn);
//! - **agent**: total − platform;
//! - **agent CPU**: the agent's on-CPU time (user + system, every thread, from
//!   `/proc/PID/task/*/schedstat`) when the result is in.
//!
//! The relay adds a hop to each message (tens of µs on loopback); it is counted in the agent's
//! time, not the platform's.
//!
//! `BRIDGE_BENCH_RUNS` sets the number of runs (default 30; `BRIDGE_BENCH_QUICK=1`: 10).
//! `BRIDGE_BENCH_RECORDS=N` first fills the journal with about N finished tasks (the journal
//! keeps up to 20 000), to show what a big journal adds to the start. The agent logs at `info`,
//! as a service does; its log's timestamps give the phases of the start (identity and settings,
//! sandbox engine, journal, link), printed as medians.
//!
//! Only CLI flags and control requests older than this benchmark are used, so that
//! `BRIDGE_BENCH_BIN_DIR` can point it at an older build.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bridge_testkit::load::keep_in_flight;
use bridge_testkit::{figures, Agent, Control, Log, Platform, Publisher};
use serde_json::json;

/// Which way bytes went through the relay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    /// Agent → platform.
    Up,
    /// Platform → agent.
    Down,
}

type Events = Arc<Mutex<Vec<(Instant, Dir)>>>;

/// A TCP relay from the agent to the platform that records when each read, in each direction,
/// arrived.
struct Relay {
    port: u16,
    events: Events,
}

impl Relay {
    fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let events: Events = Arc::default();
        let recorded = events.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { continue };
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                pump(
                    down.try_clone().unwrap(),
                    up.try_clone().unwrap(),
                    Dir::Up,
                    &recorded,
                );
                pump(up, down, Dir::Down, &recorded);
            }
        });
        Relay { port, events }
    }

    /// The events recorded since the last call.
    fn take(&self) -> Vec<(Instant, Dir)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, events: &Events) {
    let events = events.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            events.lock().unwrap().push((Instant::now(), dir));
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// The platform's own time in `events` up to `until`: each of its turns, from the agent's last
/// bytes reaching it to the last of its bytes going out before the agent's next ones.
fn platform_time(events: &[(Instant, Dir)], until: Instant) -> Duration {
    let mut sum = Duration::ZERO;
    let (mut last_up, mut last_down) = (None, None);
    for &(t, dir) in events.iter().take_while(|(t, _)| *t <= until) {
        match dir {
            Dir::Up => {
                if let (Some(up), Some(down)) = (last_up, last_down.take()) {
                    sum += down - up;
                }
                last_up = Some(t);
            }
            Dir::Down => last_down = last_up.map(|_| t),
        }
    }
    if let (Some(up), Some(down)) = (last_up, last_down) {
        sum += down - up;
    }
    sum
}

/// The wall-clock time a log line starts with (`2026-12-04T12:00:00.123456Z  INFO …`).
fn stamp(line: &str) -> Option<SystemTime> {
    let word = line.split_whitespace().next()?;
    let t =
        time::OffsetDateTime::parse(word, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64))
}

/// The time of the first line of `log` containing `needle`, as an offset from `start`.
fn offset_of(log: &Log, needle: &str, start: SystemTime) -> Option<f64> {
    let line = log.lines_with(needle).into_iter().next()?;
    let t = stamp(&line)?;
    Some(t.duration_since(start).ok()?.as_secs_f64() * 1000.0)
}

/// On-CPU time (ms) of every live thread of `pid`.
fn cpu_ms(pid: u32) -> f64 {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e6
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() as f64 * p) as usize).min(s.len() - 1)]
}

/// Copies directory `from` to `to` (files and directories only: a state directory), each file
/// synced: a restarted agent finds its files on disk, not dirty in the page cache, where the
/// first `fdatasync` of the journal's log would write all of its preallocated megabytes.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_dir(&src, &dst);
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).unwrap();
            std::fs::File::open(&dst).unwrap().sync_all().unwrap();
        }
    }
    let mode = std::fs::metadata(from).unwrap().permissions();
    std::fs::set_permissions(to, mode).unwrap();
}

/// One run's figures (ms).
#[derive(Default, Clone)]
struct Run {
    connect: f64,
    first_task: f64,
    platform: f64,
    agent_cpu: f64,
    /// Agent-log phases, from the process start: journal opened, link starting, connected
    /// (TLS and WebSocket up), `welcome` received.
    journal: f64,
    link: f64,
    upgraded: f64,
    welcomed: f64,
    records: Option<u64>,
}

impl Run {
    fn total(&self) -> f64 {
        self.connect + self.first_task
    }
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let runs: usize = std::env::var("BRIDGE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 10 } else { 30 });
    let prefill: u64 = std::env::var("BRIDGE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::builder(&tmp.path().join("platform"))
        .log_level("info")
        .start();
    let control = platform.control();
    let publisher = Publisher::new();
    let signed = publisher.signed("hello");

    // The prepared state: enrolled, `hello` in the module store, `prefill` finished tasks.
    let prepared = tmp.path().join("prepared");
    let mut agent = Agent::start_with(&prepared, &platform.agent_args(Some(&publisher)), |c| {
        c.env("RUST_LOG", "warn");
    });
    let id = control.wait_any_connected(bridge_testkit::CONNECT);
    let first = control.run_module(&id, &signed, json!({"name": "bench"}), None);
    assert_eq!(first["result"]["status"], "ok", "{first}");
    let sha = Control::module_sha256(&first);
    let run = json!({"cmd": "run", "agent": id, "module_sha256": sha, "input": {"name": "bench"}});
    let mut filled = 1;
    while filled < prefill {
        let w = keep_in_flight(control.socket(), &run, "ok", 32, 1.0, || ());
        // The warm-up's tasks finish too: the count is a lower bound.
        filled += w.tasks;
    }
    agent.terminate();
    control.wait_disconnected(&id);

    let relay = Relay::start(platform.listen_addr());
    let mut args = platform.agent_args_with(None, Some(&publisher.public()));
    args[1] = format!("wss://127.0.0.1:{}/agent", relay.port);

    let mut results = Vec::with_capacity(runs);
    for i in 0..runs {
        let state = tmp.path().join(format!("run-{i}"));
        copy_dir(&prepared, &state);
        relay.take();
        let seen = platform.log().count("session started");
        let (wall, start) = (SystemTime::now(), Instant::now());
        let mut agent = Agent::start_with(&state, &args, |_| {});
        let pid = agent.pid();
        // The platform saw `hello`: send the run at once.
        let deadline = start + Duration::from_secs(30);
        while platform.log().count("session started") <= seen {
            assert!(
                Instant::now() < deadline && agent.alive(),
                "the agent did not connect; its log:\n{}",
                agent.log.text()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        let sent_at = Instant::now();
        let r = control.request(&run);
        let cpu = cpu_ms(pid);
        assert_eq!(r["result"]["status"], "ok", "{r}");
        let first_task = r["round_trip_us"].as_f64().expect("round_trip_us") / 1000.0;
        let events = relay.take();
        // `welcome`: the platform's first bytes after it logged `session started` (sent before the
        // benchmark's run request, which comes after that log line).
        let greeted = platform
            .log()
            .lines_with("session started")
            .get(seen)
            .and_then(|l| stamp(l))
            .expect("a timestamped `session started` line");
        let greeted_at = start + greeted.duration_since(wall).unwrap_or_default();
        let welcome = events
            .iter()
            .find(|(t, d)| *d == Dir::Down && *t >= greeted_at && *t < sent_at)
            .map(|(t, _)| *t)
            .unwrap_or(greeted_at);
        let log = agent.log.clone();
        let records = log
            .lines_with("journal opened")
            .first()
            .and_then(|l| l.split("records=").nth(1))
            .and_then(|v| v.split_whitespace().next()?.parse().ok());
        results.push(Run {
            connect: (welcome - start).as_secs_f64() * 1000.0,
            first_task,
            platform: platform_time(&events, welcome).as_secs_f64() * 1000.0,
            agent_cpu: cpu,
            journal: offset_of(&log, "journal opened", wall).unwrap_or(f64::NAN),
            link: offset_of(&log, "starting the platform link", wall).unwrap_or(f64::NAN),
            upgraded: offset_of(&log, "connected to the platform", wall).unwrap_or(f64::NAN),
            welcomed: offset_of(&log, "session open", wall).unwrap_or(f64::NAN),
            records,
        });
        agent.terminate();
        control.wait_disconnected(&id);
        let _ = std::fs::remove_dir_all(&state);
    }

    let col = |f: fn(&Run) -> f64| results.iter().map(f).collect::<Vec<f64>>();
    let total = col(Run::total);
    let platform_ms = col(|r| r.platform);
    let agent_ms = col(|r| r.total() - r.platform);
    let connect = col(|r| r.connect);
    let first_task = col(|r| r.first_task);
    let agent_cpu = col(|r| r.agent_cpu);
    let records = results.iter().filter_map(|r| r.records).max();

    println!(
        "bridge cold-start benchmark: {runs} runs, journal of {} records at open",
        records.map_or("?".into(), |r| r.to_string())
    );
    println!();
    println!("{:<44} {:>9} {:>9} {:>9}", "(ms)", "median", "p90", "min");
    let row = |name: &str, v: &[f64]| {
        println!(
            "{name:<44} {:>9.1} {:>9.1} {:>9.1}",
            median(v),
            percentile(v, 0.9),
            percentile(v, 0.0)
        );
    };
    row("total: start → first result", &total);
    row("  agent (total − platform)", &agent_ms);
    row("  platform's own time", &platform_ms);
    row("connect: start → welcome sent", &connect);
    row("first task: run sent → result", &first_task);
    row("agent CPU until the result", &agent_cpu);
    println!();
    println!("phases from the agent's log (median time since the process start, ms):");
    for (name, v) in [
        ("journal opened", col(|r| r.journal)),
        ("starting the platform link", col(|r| r.link)),
        ("connected (TLS + WebSocket up)", col(|r| r.upgraded)),
        ("welcome received", col(|r| r.welcomed)),
    ] {
        println!("  {name:<40} {:>7.1}", median(&v));
    }
    println!();
    println!("target: agent's part under 50 ms");

    figures::record("coldstart.total_median_ms", median(&total), "ms");
    figures::record("coldstart.agent_median_ms", median(&agent_ms), "ms");
    figures::record("coldstart.connect_median_ms", median(&connect), "ms");
    figures::record("coldstart.first_task_median_ms", median(&first_task), "ms");
    figures::record("coldstart.platform_median_ms", median(&platform_ms), "ms");
    figures::record("coldstart.agent_cpu_median_ms", median(&agent_cpu), "ms");
}
