//! The throughput benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench
//! throughput` after `cargo build --release -p bridge-host -p bridge-platform` and
//! `cargo xtask build-examples`).
//!
//! Starts a real `bridgectl serve` and a real `bridge-daemon run` (release builds) on 127.0.0.1,
//! the agent with its durable journal (the real configuration: every task is on disk before
//! anything of it is reported, its result is recorded as it is sent, and acknowledged by the
//! platform), and measures tasks per second end to end: platform control request → `run` over
//! loopback TLS → journal → execution → journal → `result` → platform → response. Clients keep
//! a number of tasks in flight, each on its own control connection, all driven from one
//! thread.
//!
//! Two commands, measured in alternating rounds so both see the same machine:
//! - `hello`: the installed, signed `hello` handler (warm: compiled once, then cached);
//! - `true`: the shell fallback running `/bin/true` (a process spawned per task).
//!
//! **Where things run.** The agent gets the first half of the CPUs, the platform and the
//! clients the other half, as when the platform runs on another host (it always does in
//! production): the agent's rate is then what its own CPUs afford, not what is left after the
//! platform and the load generator took their share of the same cores. On two cores that is
//! one core each. `BRIDGE_BENCH_COLOCATE=1` lets all three share every CPU instead (the only
//! mode before session 7; the platform and the clients then cost a third of a `hello` task).
//!
//! **How many in flight.** Each command is measured at each level of
//! `BRIDGE_BENCH_CONCURRENCY` (comma-separated, default `32,64,128`; the agent's
//! `max_concurrent_tasks` is the largest). A command's throughput is its best median over the
//! levels: the journal commits the tasks that arrive together in one fsync, so the WASM path
//! needs more in flight to keep its CPU busy than a spawn-bound shell path does.
//!
//! Prints each measurement (tasks per second, the CPU time each process spent per task, how
//! busy the agent's CPUs and the machine were, the share the hypervisor stole), the medians,
//! the ratio at each level and of the two throughputs. `BRIDGE_BENCH_ONLY=hello` (or `true`)
//! measures one of the two alone, e.g. to profile it; `BRIDGE_BENCH_QUICK=1` runs 3 rounds of
//! 2 s instead of 5 of 5 s.

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

/// CPU time (seconds) a process used, from `/proc/<pid>/stat`: user and system time, its own
/// and that of the children it waited for (the shell fallback's `/bin/true` processes count
/// for the agent).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
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

/// The machine's CPU time (seconds, all cores) from `/proc/stat`: busy, and stolen by the
/// hypervisor (time this machine wanted to run but another guest had the core).
fn machine_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (busy / hz, cpu[7] / hz)
}

/// The processes whose CPU time a measurement accounts for.
#[derive(Clone, Copy)]
struct Pids {
    agent: u32,
    platform: u32,
    /// How many CPUs the agent may run on.
    agent_cpus: usize,
}

/// What one measurement saw: tasks per second; CPU time per task (µs) of the agent (with its
/// children), the platform and the clients (this process); the share of its CPUs the agent
/// kept busy; the machine's share of busy and stolen time.
#[derive(Clone, Copy, Default)]
struct Round {
    rate: f64,
    agent_us: f64,
    platform_us: f64,
    clients_us: f64,
    agent_busy: f64,
    busy: f64,
    steal: f64,
}

impl Round {
    fn show(&self) -> String {
        format!(
            "{:5.0} tasks/s   CPU per task: agent {:4.0} µs ({:3.0} % of its CPUs), platform {:3.0} µs, clients {:2.0} µs; machine {:3.0} % busy, {:2.0} % stolen",
            self.rate,
            self.agent_us,
            self.agent_busy * 100.0,
            self.platform_us,
            self.clients_us,
            self.busy * 100.0,
            self.steal * 100.0
        )
    }
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain old data; the pointer is valid for the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Restricts the calling thread, and the processes and threads it starts from now on, to
/// `cpus`.
fn pin(cpus: &[usize]) {
    // SAFETY: as above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `command` from `concurrency` connections for `secs`; returns tasks per second and the
/// CPU each process spent per task over the same window.
///
/// The clients share one thread (an async runtime): the load generator runs on the same two
/// cores as the agent and the platform, and a thread per connection would spend a context
/// switch per response that the system under test could have used.
fn measure(
    info: &Value,
    pids: Pids,
    id: &str,
    command: &str,
    concurrency: usize,
    secs: f64,
) -> Round {
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
        let cpu = || {
            (
                [
                    cpu_secs(pids.agent),
                    cpu_secs(pids.platform),
                    cpu_secs(std::process::id()),
                ],
                machine_secs(),
            )
        };
        let (n0, t0, c0) = (done.load(Ordering::SeqCst), Instant::now(), cpu());
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let (n1, t1, c1) = (done.load(Ordering::SeqCst), Instant::now(), cpu());
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        let (tasks, elapsed) = ((n1 - n0) as f64, (t1 - t0).as_secs_f64());
        let per_task = |i: usize| (c1.0[i] - c0.0[i]) / tasks * 1e6;
        // SAFETY: sysconf has no preconditions.
        let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
        Round {
            rate: tasks / elapsed,
            agent_busy: (c1.0[0] - c0.0[0]) / (elapsed * pids.agent_cpus as f64),
            agent_us: per_task(0),
            platform_us: per_task(1),
            clients_us: per_task(2),
            busy: (c1.1 .0 - c0.1 .0) / (elapsed * cores),
            steal: (c1.1 .1 - c0.1 .1) / (elapsed * cores),
        }
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let levels: Vec<usize> = match std::env::var("BRIDGE_BENCH_CONCURRENCY") {
        Ok(v) => v
            .split(',')
            .map(|n| match n.trim().parse() {
                Ok(n) if n > 0 => n,
                _ => panic!("BRIDGE_BENCH_CONCURRENCY: {n:?} is not a positive number"),
            })
            .collect(),
        Err(_) => vec![32, 64, 128],
    };
    let most = *levels.iter().max().unwrap();
    let (rounds, secs) = if quick { (3, 2.0) } else { (5, 5.0) };
    // The agent on its own CPUs (the first half), the platform and the clients on the others,
    // as when the platform runs on another host; `BRIDGE_BENCH_COLOCATE=1` lets all three
    // share every CPU.
    let cpus = allowed_cpus();
    let split = std::env::var_os("BRIDGE_BENCH_COLOCATE").is_none() && cpus.len() >= 2;
    let (agent_cpus, rest) = if split {
        let (a, r) = cpus.split_at(cpus.len() / 2);
        (a.to_vec(), r.to_vec())
    } else {
        (cpus.clone(), cpus.clone())
    };
    pin(&rest);
    let tmp = tempfile::tempdir().unwrap();
    let (platform, info) = serve(&tmp.path().join("platform"), "127.0.0.1:0");

    let (key, signed) = signed_hello();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nmax_concurrent_tasks = {most}\nqueue_capacity = {}\n\n[[shell.rules]]\nname = \"true\"\nprogram = \"/bin/true\"\n",
            most * 4
        ),
    )
    .unwrap();
    let state = tmp.path().join("agent");
    pin(&agent_cpus);
    let agent = Proc(
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
    pin(&rest);
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
        "bridge throughput benchmark ({} mode): journal on, {rounds} rounds of {secs} s per command and concurrency",
        if quick { "quick" } else { "full" }
    );
    if split {
        println!("the agent on CPUs {agent_cpus:?}; the platform and the clients on CPUs {rest:?}");
    } else {
        println!("the agent, the platform and the clients share CPUs {cpus:?}");
    }
    let pids = Pids {
        agent: agent.0.id(),
        platform: platform.0.id(),
        agent_cpus: agent_cpus.len(),
    };
    // `BRIDGE_BENCH_ONLY=hello` (or `true`) measures one command alone, e.g. under a profiler.
    let only = std::env::var("BRIDGE_BENCH_ONLY").ok();
    let commands: Vec<(&str, &str)> = [("hello", "hello handler  "), ("true", "shell /bin/true")]
        .into_iter()
        .filter(|(c, _)| only.as_deref().is_none_or(|o| o == *c))
        .collect();
    // seen[level][command]: one `Round` per round.
    let mut seen = vec![vec![Vec::new(); commands.len()]; levels.len()];
    for round in 1..=rounds {
        println!("round {round}:");
        for (l, &level) in levels.iter().enumerate() {
            for (c, (command, label)) in commands.iter().enumerate() {
                let r = measure(&info, pids, &id, command, level, secs);
                println!("  {level:3} in flight  {label} {}", r.show());
                seen[l][c].push(r);
            }
        }
    }
    // Each figure's median on its own (the rounds are noisy, each in its own way).
    let summary = |rounds: &[Round]| {
        let med = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        Round {
            rate: med(|r| r.rate),
            agent_us: med(|r| r.agent_us),
            platform_us: med(|r| r.platform_us),
            clients_us: med(|r| r.clients_us),
            agent_busy: med(|r| r.agent_busy),
            busy: med(|r| r.busy),
            steal: med(|r| r.steal),
        }
    };
    let medians: Vec<Vec<Round>> = seen
        .iter()
        .map(|per_command| per_command.iter().map(|r| summary(r)).collect())
        .collect();
    println!();
    println!("medians:");
    for (l, &level) in levels.iter().enumerate() {
        for (c, (_, label)) in commands.iter().enumerate() {
            println!("  {level:3} in flight  {label} {}", medians[l][c].show());
        }
    }
    // Each command at the concurrency where it does best: its throughput.
    let best = |c: usize| {
        (0..levels.len())
            .map(|l| (medians[l][c], levels[l]))
            .max_by(|a, b| a.0.rate.total_cmp(&b.0.rate))
            .unwrap()
    };
    println!();
    if commands.len() == 2 {
        let ((w, wl), (s, sl)) = (best(0), best(1));
        for (l, &level) in levels.iter().enumerate() {
            println!(
                "at {level:3} in flight: hello / shell = {:.1}x",
                medians[l][0].rate / medians[l][1].rate
            );
        }
        println!(
            "throughput: hello handler {:.0} tasks/s (at {wl} in flight; target: at least 2000), shell /bin/true {:.0} tasks/s (at {sl} in flight): ratio {:.1}x (target: at least 5x)",
            w.rate,
            s.rate,
            w.rate / s.rate
        );
        println!(
            "the agent's own CPU time per task, shell / hello: {:.1}x",
            s.agent_us / w.agent_us
        );
    }
    if let Ok(bytes) = std::fs::metadata(state.join("journal.redb")).map(|m| m.len()) {
        println!(
            "journal size after the run: {:.1} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
}
