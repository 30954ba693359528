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
//! And, at the largest level only, a command the agent does not know, refused before the
//! journal (`rejected`, `unknown_command`): the link's own share of a task (TLS, the messages'
//! JSON, admission, the result's way back), with no task record and no run (the refusal's
//! audit record is still journalled). Its agent CPU per task is the floor under a `hello`
//! task's in this design.
//!
//! **Where things run.** The agent gets the first half of the CPUs, the platform and the
//! clients the other half, as when the platform runs on another host (it always does in
//! production): the agent's rate is then what its own CPUs afford, not what is left after the
//! platform and the load generator took their share of the same cores. On two cores that is
//! one core each. `BRIDGE_BENCH_COLOCATE=1` lets all three share every CPU instead (the platform
//! and the clients then cost about a third of a `hello` task).
//!
//! **How many in flight.** Each command is measured at each level of
//! `BRIDGE_BENCH_CONCURRENCY` (comma-separated, default `32,64,128`; the agent's
//! `max_concurrent_tasks` is the largest; tasks are not queued). The targets are judged at the
//! largest level, the same for both commands: the journal makes the tasks that arrive during a
//! commit durable with one `fdatasync`, so the WASM path needs many tasks in flight to keep the
//! agent's CPU busy, where the spawn-bound shell path keeps it busy at any level.
//!
//! Prints each measurement (tasks per second, the CPU time each process spent per task, how
//! busy the agent's CPUs and the others were, the share the hypervisor stole), the medians,
//! the ratio at each level, and the verdict at the largest. `BRIDGE_BENCH_ONLY=hello` (or
//! `true`, or `refused`) measures one of the three alone, e.g. to profile it;
//! `BRIDGE_BENCH_QUICK=1` runs 3 rounds of 2 s instead of 5 of 5 s.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bridge_testkit::cpus::{allowed_cpus, pin};
use bridge_testkit::load::{cpu_secs, keep_in_flight};
use bridge_testkit::{figures, Agent, Platform, Publisher};
use serde_json::json;

/// Busy and stolen time (seconds) of `cpus` from `/proc/stat`'s per-CPU lines. Busy counts
/// whatever ran there (processes, kernel threads such as writeback, interrupts); stolen is
/// time the CPU wanted to run but the hypervisor gave the core to another guest.
fn cpu_busy(cpus: &[usize]) -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let (mut busy, mut steal) = (0.0, 0.0);
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(n) = fields.next().and_then(|f| f.strip_prefix("cpu")) else {
            continue;
        };
        if !n.parse().is_ok_and(|n: usize| cpus.contains(&n)) {
            continue;
        }
        // user nice system idle iowait irq softirq steal
        let t: Vec<f64> = fields.take(8).map(|f| f.parse().unwrap()).collect();
        busy += t[0] + t[1] + t[2] + t[5] + t[6];
        steal += t[7];
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (busy / hz, steal / hz)
}

/// The processes and CPUs a measurement accounts for.
struct Setup {
    agent: u32,
    platform: u32,
    /// The agent's CPUs, and the platform's and the clients' (the same when co-located).
    agent_cpus: Vec<usize>,
    other_cpus: Vec<usize>,
}

impl Setup {
    fn colocated(&self) -> bool {
        self.agent_cpus == self.other_cpus
    }

    /// Every CPU the measurement uses: the agent's and the others, each once.
    fn all_cpus(&self) -> Vec<usize> {
        let mut all = self.agent_cpus.clone();
        all.extend(
            self.other_cpus
                .iter()
                .filter(|c| !self.agent_cpus.contains(c)),
        );
        all
    }
}

/// What one measurement saw: tasks per second; CPU time per task (µs) of the agent (with its
/// children), the platform and the clients (this process); the share of time the agent's CPUs
/// and the others were busy (`/proc/stat`, so kernel work that landed there counts too); the
/// share stolen by the hypervisor from all of them.
#[derive(Clone, Copy, Default)]
struct Round {
    rate: f64,
    agent_us: f64,
    platform_us: f64,
    clients_us: f64,
    agent_busy: f64,
    other_busy: f64,
    steal: f64,
}

impl Round {
    fn show(&self, colocated: bool) -> String {
        let busy = if colocated {
            format!("all CPUs {:3.0} % busy", self.agent_busy * 100.0)
        } else {
            format!(
                "agent's CPUs {:3.0} % busy, the others {:3.0} %",
                self.agent_busy * 100.0,
                self.other_busy * 100.0
            )
        };
        format!(
            "{:5.0} tasks/s   CPU per task: agent {:4.0} µs, platform {:3.0} µs, clients {:2.0} µs; {busy}, {:2.0} % stolen",
            self.rate,
            self.agent_us,
            self.platform_us,
            self.clients_us,
            self.steal * 100.0
        )
    }
}

/// Runs `command` from `concurrency` connections for `secs`, each result ending as `status`;
/// returns tasks per second and the CPU each process spent per task over the same window.
fn measure(
    socket: &Path,
    setup: &Setup,
    id: &str,
    command: &str,
    status: &str,
    concurrency: usize,
    secs: f64,
) -> Round {
    let req = json!({"cmd": "run", "agent": id, "command": command, "input": {"name": "bench"}});
    let all_cpus = setup.all_cpus();
    let cpu = || {
        (
            [
                cpu_secs(setup.agent),
                cpu_secs(setup.platform),
                cpu_secs(std::process::id()),
            ],
            [cpu_busy(&setup.agent_cpus), cpu_busy(&setup.other_cpus)],
            cpu_busy(&all_cpus),
        )
    };
    let w = keep_in_flight(socket, &req, status, concurrency, secs, cpu);
    let (c0, c1, elapsed) = (&w.before, &w.after, w.elapsed.as_secs_f64());
    let tasks = w.tasks as f64;
    let per_task = |i: usize| (c1.0[i] - c0.0[i]) / tasks * 1e6;
    let share = |i: usize, n: usize| (c1.1[i].0 - c0.1[i].0) / (elapsed * n as f64);
    Round {
        rate: w.rate(),
        agent_us: per_task(0),
        platform_us: per_task(1),
        clients_us: per_task(2),
        agent_busy: share(0, setup.agent_cpus.len()),
        other_busy: share(1, setup.other_cpus.len()),
        steal: (c1.2 .1 - c0.2 .1) / (elapsed * all_cpus.len() as f64),
    }
}

/// A command the agent does not know: refused before the journal.
const REFUSED: &str = "no-such-command";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let mut levels: Vec<usize> = match std::env::var("BRIDGE_BENCH_CONCURRENCY") {
        Ok(v) => v
            .split(',')
            .map(|n| match n.trim().parse() {
                Ok(n) if n > 0 => n,
                _ => panic!("BRIDGE_BENCH_CONCURRENCY: {n:?} is not a positive number"),
            })
            .collect(),
        Err(_) => vec![32, 64, 128],
    };
    levels.sort_unstable();
    levels.dedup();
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
    let platform = Platform::builder(&tmp.path().join("platform"))
        .log_level("warn")
        .start();

    let publisher = Publisher::new();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nmax_concurrent_tasks = {most}\nqueue_capacity = {}\n\n[[shell.rules]]\nname = \"true\"\nprogram = \"/bin/true\"\n",
            most * 4
        ),
    )
    .unwrap();
    let mut args = platform.agent_args(Some(&publisher));
    args.extend(["--config".into(), config.display().to_string()]);
    let state = tmp.path().join("agent");
    pin(&agent_cpus);
    let agent = Agent::start_with(&state, &args, |cmd| {
        cmd.env("RUST_LOG", "warn");
    });
    pin(&rest);
    let control = platform.control();
    let id = control.wait_any_connected(bridge_testkit::CONNECT);
    let installed = control.request(
        &json!({"cmd": "install_handler", "agent": id, "name": "hello",
                                             "module": STANDARD.encode(publisher.signed("hello"))}),
    );
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
    let setup = Setup {
        agent: agent.pid(),
        platform: platform.pid(),
        agent_cpus,
        other_cpus: rest,
    };
    let colocated = setup.colocated();
    // `BRIDGE_BENCH_ONLY=hello` (or `true`, or `refused`) measures one alone, e.g. under a
    // profiler.
    let only = std::env::var("BRIDGE_BENCH_ONLY").ok();
    if let Some(o) = &only {
        assert!(
            ["hello", "true", "refused"].contains(&o.as_str()),
            "BRIDGE_BENCH_ONLY: {o:?} is none of \"hello\", \"true\" and \"refused\""
        );
    }
    let commands: Vec<(&str, &str)> = [("hello", "hello handler  "), ("true", "shell /bin/true")]
        .into_iter()
        .filter(|(c, _)| only.as_deref().is_none_or(|o| o == *c))
        .collect();
    // seen[level][command]: one `Round` per round; `refused`: the unknown command's.
    let mut seen = vec![vec![Vec::new(); commands.len()]; levels.len()];
    let mut refused = Vec::new();
    for round in 1..=rounds {
        println!("round {round}:");
        for (l, &level) in levels.iter().enumerate() {
            for (c, (command, label)) in commands.iter().enumerate() {
                let r = measure(
                    platform.control_socket(),
                    &setup,
                    &id,
                    command,
                    "ok",
                    level,
                    secs,
                );
                println!("  {level:3} in flight  {label} {}", r.show(colocated));
                seen[l][c].push(r);
            }
        }
        if only.as_deref().is_none_or(|o| o == "refused") {
            let r = measure(
                platform.control_socket(),
                &setup,
                &id,
                REFUSED,
                "rejected",
                most,
                secs,
            );
            println!(
                "  {most:3} in flight  refused         {}",
                r.show(colocated)
            );
            refused.push(r);
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
            other_busy: med(|r| r.other_busy),
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
            println!(
                "  {level:3} in flight  {label} {}",
                medians[l][c].show(colocated)
            );
        }
    }
    if !refused.is_empty() {
        let m = summary(&refused);
        println!(
            "  {most:3} in flight  refused         {}",
            m.show(colocated)
        );
    }
    println!();
    if commands.len() == 2 {
        for (l, &level) in levels.iter().enumerate() {
            println!(
                "at {level:3} in flight: hello / shell = {:.1}x",
                medians[l][0].rate / medians[l][1].rate
            );
        }
        // The targets are judged at the largest level, where the agent is saturated.
        let l = levels.len() - 1;
        let (w, s) = (medians[l][0], medians[l][1]);
        println!(
            "at {} in flight: hello handler {:.0} tasks/s (target: at least 2000), shell /bin/true {:.0} tasks/s: ratio {:.1}x (target: at least 5x)",
            levels[l],
            w.rate,
            s.rate,
            w.rate / s.rate
        );
        println!(
            "the agent's own CPU time per task there, shell / hello: {:.1}x",
            s.agent_us / w.agent_us
        );
        figures::record("throughput.ratio", w.rate / s.rate, "x");
        figures::record("throughput.cpu_ratio", s.agent_us / w.agent_us, "x");
    }
    // The figures at the largest level, for `cargo xtask bench`'s summary.
    let l = levels.len() - 1;
    for (c, (command, _)) in commands.iter().enumerate() {
        let m = medians[l][c];
        figures::record(
            &format!("throughput.{command}_tasks_per_s"),
            m.rate,
            "tasks/s",
        );
        figures::record(
            &format!("throughput.{command}_agent_cpu_us"),
            m.agent_us,
            "us",
        );
    }
    if !refused.is_empty() {
        let m = summary(&refused);
        println!(
            "the link alone (a task refused before the journal), {most} in flight: {:.0} tasks/s, agent CPU per task {:.0} µs: the floor under a hello task's",
            m.rate, m.agent_us
        );
        figures::record("throughput.refused_tasks_per_s", m.rate, "tasks/s");
        figures::record("throughput.refused_agent_cpu_us", m.agent_us, "us");
    }
    let bytes = bridge_host::journal::disk_bytes(&state.join("journal.redb"));
    println!(
        "journal size after the run (the redb file and its log): {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
}
