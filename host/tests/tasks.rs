//! The command framework end to end: a real `bridgectl serve`, real `bridge-daemon run` agents
//! over TLS on 127.0.0.1, signed modules compiled from `examples/` and the test fixtures, and
//! real shell commands. Executions are counted with marker files written by the commands
//! themselves. Every test ends by itself.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bridge_testkit::{wait_for, Agent, Platform, Proxy, Setup};
use serde_json::{json, Value};

const CONNECT: Duration = Duration::from_secs(30);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A platform, a publisher, and an agent with `config` (TOML) trusting the publisher,
/// reconnecting within a second.
fn setup(config: &str) -> Setup {
    Setup::builder()
        .config(config)
        .args(&["--reconnect-max-secs", "1"])
        .start()
}

/// Lines in a marker file: how many times a command ran.
fn runs(marker: &Path) -> usize {
    std::fs::read_to_string(marker)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A shell rule `mark` that appends a line to `marker`, sleeps `$1` seconds, prints `done`.
fn mark_rule(marker: &Path) -> String {
    format!(
        r#"
[[shell.rules]]
name = "mark"
program = "/bin/sh"
args = ["-c", "echo ran >> '{}'; sleep \"$1\"; echo done", "mark"]
extra_args = {{ max = 1, patterns = ['[0-9]+(\.[0-9]+)?'] }}
timeout_ms = 30000
"#,
        marker.display()
    )
}

fn status(r: &Value) -> &str {
    r["result"]["status"].as_str().unwrap_or("")
}

/// An agent with a shell rule `hello` (`/bin/echo from the shell`).
fn with_a_hello_rule() -> Setup {
    setup(
        "[[shell.rules]]\nname = \"hello\"\nprogram = \"/bin/echo\"\nargs = [\"from the shell\"]\n",
    )
}

#[test]
fn a_command_without_a_handler_runs_the_shell_rule_of_that_name() {
    let s = with_a_hello_rule();
    let r = s.run_command("hello", json!({}));
    assert_eq!(status(&r), "ok", "{r}");
    assert_eq!(r["result"]["stdout"], "from the shell\n");
}

#[test]
fn an_installed_handler_comes_before_the_shell_rule_until_it_is_removed() {
    let s = with_a_hello_rule();
    let installed = s.install("hello", &s.publisher.signed("hello"));
    assert_eq!(installed["ok"], true, "{installed}");
    assert_eq!(installed["handlers"][0]["name"], "hello");
    let r = s.run_command("hello", json!({"input": {"name": "bridge"}}));
    assert_eq!(status(&r), "ok", "{r}");
    assert_eq!(r["result"]["output"]["greeting"], "Hello, bridge!");

    // The list, then removal: back to the shell rule.
    let listed = s.request(json!({"cmd": "handlers", "agent": s.id}));
    assert_eq!(listed["handlers"].as_array().unwrap().len(), 1, "{listed}");
    let removed = s.request(json!({"cmd": "remove_handler", "agent": s.id, "name": "hello"}));
    assert_eq!(removed["ok"], true, "{removed}");
    assert_eq!(removed["handlers"], json!([]));
    let r = s.run_command("hello", json!({}));
    assert_eq!(r["result"]["stdout"], "from the shell\n", "{r}");
}

#[test]
fn a_command_with_neither_handler_nor_rule_is_refused_unknown_command() {
    let s = with_a_hello_rule();
    let r = s.run_command("nothing-here", json!({}));
    assert_eq!(status(&r), "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "unknown_command");
}

#[test]
fn a_module_signed_for_another_name_or_unsigned_is_not_installed() {
    let s = with_a_hello_rule();
    let r = s.install("checksum", &s.publisher.signed("hello"));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("name_mismatch"),
        "{r}"
    );
    let unsigned = std::fs::read(bridge_testkit::bins::wasm("hello")).unwrap();
    let r = s.install("hello", &unsigned);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("unsigned"), "{r}");
    // Nothing was installed: there is nothing to remove.
    let r = s.request(json!({"cmd": "remove_handler", "agent": s.id, "name": "hello"}));
    assert_eq!(r["ok"], false, "{r}");
}

#[test]
fn installed_handlers_survive_an_agent_restart() {
    let mut s = setup("");
    let r = s.install("hello", &s.publisher.signed("hello"));
    assert_eq!(r["ok"], true, "{r}");
    s.restart_agent(false);
    let listed = s.request(json!({"cmd": "handlers", "agent": s.id}));
    assert_eq!(listed["handlers"][0]["name"], "hello", "{listed}");
    let r = s.run_command("hello", json!({"input": {"name": "again"}}));
    assert_eq!(r["result"]["output"]["greeting"], "Hello, again!", "{r}");
    // The module came from the agent's store, not from the platform.
    assert_eq!(s.agent.log.count("need_module"), 0);
}

#[test]
fn expired_tasks_are_rejected_and_never_run() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = setup(&mark_rule(&marker));
    let r = s.run_command(
        "mark",
        json!({"args": ["0"], "not_after": "2020-01-01T00:00:00Z"}),
    );
    assert_eq!(status(&r), "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "deadline_passed");
    assert_eq!(runs(&marker), 0);
    // A future expiry runs.
    let r = s.run_command(
        "mark",
        json!({"args": ["0"], "not_after": "2999-01-01T00:00:00Z"}),
    );
    assert_eq!(status(&r), "ok", "{r}");
    assert_eq!(runs(&marker), 1);
}

/// One slot and one place in the queue, the shell rule `mark` writing to `marker`, and a
/// status report every second (so the platform sees what runs).
fn one_slot(marker: &Path) -> Setup {
    setup(&format!(
        "[platform]\nstatus_secs = 1\n[agent]\nmax_concurrent_tasks = 1\nqueue_capacity = 1\n{}",
        mark_rule(marker)
    ))
}

/// Sends `request` on its own connection in the background; joining gives the response.
fn in_background(s: &Setup, request: Value) -> std::thread::JoinHandle<Value> {
    let control = s.control();
    std::thread::spawn(move || control.try_request(&request))
}

/// A run of the `sleepy` handler (asleep in a host call for `ms`) as `task_id`.
fn sleepy(s: &Setup, task_id: &str, ms: u64) -> Value {
    json!({"cmd": "run", "agent": s.id, "module": b64(&s.publisher.signed("sleepy")),
           "input": {"ms": ms}, "task_id": task_id, "timeout_ms": 60000})
}

/// A run of the shell rule `mark` sleeping `secs` as `task_id`.
fn mark(s: &Setup, task_id: &str, secs: &str) -> Value {
    json!({"cmd": "run", "agent": s.id, "command": "mark", "args": [secs],
           "task_id": task_id, "timeout_ms": 60000})
}

/// Fills a [`one_slot`] agent: a WASM task (`t-wasm`) sleeping 60 s runs, a shell command
/// (`t-shell`) waits in the queue. Returns their pending responses.
fn fill(
    s: &Setup,
) -> (
    std::thread::JoinHandle<Value>,
    std::thread::JoinHandle<Value>,
) {
    let running = in_background(s, sleepy(s, "t-wasm", 60000));
    s.control().wait_running(&s.id, "t-wasm");
    let queued = in_background(s, mark(s, "t-shell", "30"));
    s.control().wait_task_state("t-shell", "queued");
    (running, queued)
}

#[test]
fn a_full_queue_refuses_with_busy() {
    let marker_dir = tempfile::tempdir().unwrap();
    let s = one_slot(&marker_dir.path().join("ran"));
    let _full = fill(&s);
    // One running + one queued is the bound.
    let r = s.run_command("mark", json!({"args": ["0"], "task_id": "t-third"}));
    assert_eq!(status(&r), "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "busy");
}

#[test]
fn cancelling_a_queued_task_removes_it_unrun() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = one_slot(&marker);
    let (_running, queued) = fill(&s);
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "t-shell"}));
    assert_eq!(c["outcome"], "dequeued", "{c}");
    let r = queued.join().unwrap();
    assert_eq!(status(&r), "cancelled", "{r}");
    assert_eq!(runs(&marker), 0);
}

#[test]
fn cancelling_a_running_wasm_task_interrupts_it_and_then_it_is_finished() {
    let marker_dir = tempfile::tempdir().unwrap();
    let s = one_slot(&marker_dir.path().join("ran"));
    let running = in_background(&s, sleepy(&s, "t-wasm", 60000));
    s.control().wait_running(&s.id, "t-wasm");
    // Interrupted long before its 60 s.
    let started = Instant::now();
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "t-wasm"}));
    assert_eq!(c["outcome"], "cancelling", "{c}");
    let r = running.join().unwrap();
    assert_eq!(status(&r), "cancelled", "{r}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Finished and unknown tasks.
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "t-wasm"}));
    assert_eq!(c["outcome"], "finished", "{c}");
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "never-sent"}));
    assert_eq!(c["outcome"], "unknown", "{c}");
}

#[test]
fn cancelling_a_running_shell_command_kills_it_and_a_wasm_task_queued_behind_is_dequeued() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = one_slot(&marker);
    let running = in_background(&s, mark(&s, "t-shell-2", "30"));
    wait_for("the shell command to run", CONNECT, || runs(&marker) == 1);
    let queued = in_background(&s, sleepy(&s, "t-wasm-queued", 1));
    s.control().wait_task_state("t-wasm-queued", "queued");
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "t-wasm-queued"}));
    assert_eq!(c["outcome"], "dequeued", "{c}");
    let r = queued.join().unwrap();
    assert_eq!(status(&r), "cancelled", "{r}");
    // The command's tree is killed: it ends long before its 30 s.
    let c = s.request(json!({"cmd": "cancel", "agent": s.id, "task_id": "t-shell-2"}));
    assert_eq!(c["outcome"], "cancelling", "{c}");
    let r = running.join().unwrap();
    assert_eq!(status(&r), "cancelled", "{r}");
    assert!(r["result"]["duration_ms"].as_f64().unwrap() < 10_000.0);
}

/// Runs `mark 0` as task `once`; checks it ran.
fn run_once(s: &Setup, marker: &Path) -> Value {
    let first = s.run_command("mark", json!({"args": ["0"], "task_id": "once"}));
    assert_eq!(status(&first), "ok", "{first}");
    assert_eq!(runs(marker), 1);
    first
}

/// Sends the `run` frame of task `once` to the agent raw (the platform answers a stored task
/// id itself; a raw frame reaches the agent) and waits for the agent's answer: one more
/// delivery of the stored result.
fn resend_raw(s: &Setup, n: usize) {
    let frame = json!({"type": "run", "id": format!("raw-again-{n}"), "task_id": "once",
                       "command": "mark", "args": ["0"]})
    .to_string();
    let before = s.request(json!({"cmd": "result", "task_id": "once"}))["deliveries"]
        .as_u64()
        .unwrap();
    let r = s.request(json!({"cmd": "send", "agent": s.id, "text": frame, "wait_ms": 10}));
    assert_eq!(r["ok"], true, "{r}");
    s.control().wait_deliveries("once", before);
}

#[test]
fn a_task_id_sent_twice_on_one_connection_runs_once() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = setup(&mark_rule(&marker));
    let first = run_once(&s, &marker);
    let second = s.run_command("mark", json!({"args": ["0"], "task_id": "once"}));
    assert_eq!(second["result"], first["result"]);
    assert_eq!(runs(&marker), 1);
}

#[test]
fn the_same_run_frame_twice_at_once_runs_once() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = setup(&mark_rule(&marker));
    let frame = json!({"type": "run", "id": "raw-1", "task_id": "raw-twice", "command": "mark", "args": ["0"]}).to_string();
    for _ in 0..2 {
        let r = s.request(json!({"cmd": "send", "agent": s.id, "text": frame, "wait_ms": 10}));
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = s.request(json!({"cmd": "result", "task_id": "raw-twice", "wait_ms": 20000}));
    assert_eq!(status(&r), "ok", "{r}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs(&marker), 1);
}

#[test]
fn after_the_platform_restarts_a_task_id_is_answered_not_run_again() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let mut s = setup(&mark_rule(&marker));
    let first = run_once(&s, &marker);
    // The platform restarted on the same port and state: the agent reconnects.
    s.platform.kill();
    s.platform = s.platform.restart();
    s.control().wait_connected(&s.id);
    let again = s.run_command("mark", json!({"args": ["0"], "task_id": "once"}));
    assert_eq!(again["result"], first["result"], "{again}");
    resend_raw(&s, 1);
    assert_eq!(runs(&marker), 1);
}

#[test]
fn after_the_agent_restarts_a_task_id_is_answered_from_its_journal_not_run_again() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let mut s = setup(&mark_rule(&marker));
    let first = run_once(&s, &marker);
    s.restart_agent(false);
    resend_raw(&s, 2);
    let again = s.run_command("mark", json!({"args": ["0"], "task_id": "once"}));
    assert_eq!(again["result"], first["result"], "{again}");
    assert_eq!(runs(&marker), 1);
}

#[test]
fn a_result_produced_while_the_platform_is_down_arrives_after_it_restarts() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let mut s = setup(&mark_rule(&marker));
    let addr = s.platform.control();
    let id = s.id.clone();
    let waiting = std::thread::spawn(move || {
        addr.try_request(&json!({"cmd": "run", "agent": id, "command": "mark", "args": ["2"], "task_id": "across"}),
        )
    });
    wait_for("the command to run", CONNECT, || runs(&marker) == 1);
    let pstate = s.platform.state.clone();
    let listen = s.platform.listen_addr();
    s.platform.kill();
    let lost = waiting.join().unwrap();
    assert_eq!(lost["ok"], false, "{lost}");
    s.agent.log.wait_for("task finished", CONNECT);
    s.platform = Platform::builder(&pstate).listen(&listen).start();
    let r = s.request(json!({"cmd": "result", "task_id": "across", "wait_ms": 30000}));
    assert_eq!(r["ok"], true, "{r}\n{}", s.agent.log.text());
    assert_eq!(status(&r), "ok", "{r}");
    assert_eq!(r["result"]["stdout"], "done\n");
    assert_eq!(runs(&marker), 1);
}

#[test]
fn a_connection_cut_mid_task_still_gives_exactly_one_result() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = Platform::start(&tmp.path().join("platform"));
    let proxy = Proxy::start(&platform.listen_addr());
    let marker = tmp.path().join("ran");
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, mark_rule(&marker)).unwrap();
    let mut args = platform.agent_args_with(Some(&platform.token()), None);
    args[1] = format!("wss://{}/agent", proxy.addr());
    args.extend([
        "--config".into(),
        config.display().to_string(),
        "--reconnect-max-secs".into(),
        "1".into(),
    ]);
    let agent = Agent::start(&tmp.path().join("agent"), &args);
    let id = agent.id();
    platform.control().wait_connected(&id);
    let addr = platform.control();
    let waiting = {
        let (addr, id) = (addr.clone(), id.clone());
        std::thread::spawn(move || {
            addr.try_request(&json!({"cmd": "run", "agent": id, "command": "mark", "args": ["2"], "task_id": "cut"}),
            )
        })
    };
    wait_for("the command to run", CONNECT, || runs(&marker) == 1);
    proxy.cut();
    agent.log.wait_for("link lost", CONNECT);
    // The waiting run gets its result over the next connection.
    let r = waiting.join().unwrap();
    assert_eq!(r["ok"], true, "{r}\nagent:\n{}", agent.log.text());
    assert_eq!(status(&r), "ok", "{r}");
    let stored = addr.try_request(&json!({"cmd": "result", "task_id": "cut"}));
    assert_eq!(stored["result"], r["result"]);
    assert_eq!(runs(&marker), 1);
}

#[test]
fn an_agent_killed_mid_task_reports_it_interrupted_once_and_does_not_rerun_it() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let mut s = setup(&mark_rule(&marker));
    for (task, idempotent) in [("killed", false), ("killed-idempotent", true)] {
        let addr = s.platform.control();
        let id = s.id.clone();
        let before = runs(&marker);
        let waiting = std::thread::spawn(move || {
            addr.try_request(
                &json!({"cmd": "run", "agent": id, "command": "mark", "args": ["3"],
                        "task_id": task, "idempotent": idempotent, "timeout_ms": 60000}),
            )
        });
        wait_for("the command to run", CONNECT, || {
            runs(&marker) == before + 1
        });
        s.restart_agent(true);
        let r = waiting.join().unwrap();
        assert_eq!(r["ok"], true, "{r}\nagent:\n{}", s.agent.log.text());
        let stored = s.request(json!({"cmd": "result", "task_id": task, "wait_ms": 30000}));
        if idempotent {
            assert_eq!(status(&r), "ok", "{r}");
            assert_eq!(runs(&marker), before + 2, "an idempotent task runs again");
        } else {
            assert_eq!(status(&r), "interrupted", "{r}");
            assert_eq!(runs(&marker), before + 1, "not run again");
        }
        assert_eq!(stored["result"], r["result"]);
    }
    // Another restart: nothing is reported or run again.
    let after = runs(&marker);
    s.restart_agent(false);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(runs(&marker), after);
    assert_eq!(s.agent.log.count("reporting it as interrupted"), 0);
}

#[test]
fn streamed_chunks_arrive_in_order_before_the_result() {
    let config = r#"
[[shell.rules]]
name = "count"
program = "/bin/sh"
args = ["-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done; echo oops >&2"]
"#;
    let s = setup(config);
    // A WASM handler printing a line every 100 ms.
    let (events, done) = s.platform.control().stream(
        &json!({"cmd": "run", "agent": s.id, "module": b64(&s.publisher.signed("ticker")),
                "input": {"lines": 8, "ms": 100}, "stream": true}),
    );
    assert_eq!(done["result"]["status"], "ok", "{done}");
    assert!(events.len() >= 2, "output came in one piece: {events:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let stdout: String = events
        .iter()
        .filter(|e| e["stream"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, done["result"]["stdout"].as_str().unwrap());
    assert!(stdout.starts_with("tick 0\ntick 1\n"), "{stdout}");

    // A shell command, stdout and stderr.
    let (events, done) = s
        .platform
        .control()
        .stream(&json!({"cmd": "run", "agent": s.id, "command": "count", "stream": true}));
    assert_eq!(done["result"]["status"], "ok", "{done}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    assert!(events.len() >= 3, "{events:?}");
    let stdout: String = events
        .iter()
        .filter(|e| e["stream"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, "line 1\nline 2\nline 3\nline 4\nline 5\n");
    assert!(events
        .iter()
        .any(|e| e["stream"] == "stderr" && e["data"] == "oops\n"));
}

#[test]
fn a_full_disk_refuses_new_tasks_with_storage_full() {
    // More free space required than any disk has: every new task is refused, nothing runs.
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let config = format!("[agent]\nmin_free_mib = 1000000000\n{}", mark_rule(&marker));
    let s = setup(&config);
    let r = s.run_command("mark", json!({"args": ["0"]}));
    assert_eq!(status(&r), "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "storage_full");
    assert_eq!(runs(&marker), 0);
}

#[test]
fn a_warm_handler_runs_while_its_task_is_recorded() {
    // A warm handler (installed, so compiled and verified) starts while the journal records
    // the task; its result goes out only once the task is on disk.
    let s = setup("");
    let installed = s.install("hello", &s.publisher.signed("hello"));
    assert_eq!(installed["ok"], true, "{installed}");
    let r = s.run_command("hello", json!({"input": {"name": "early"}}));
    assert_eq!(status(&r), "ok", "{r}");
    assert_eq!(r["result"]["output"]["greeting"], "Hello, early!");
    // (The agent's log is read asynchronously: wait for the line, then count.)
    let early = "task started (while its acceptance was recorded)";
    s.agent.log.wait_for(early, Duration::from_secs(20));
    assert_eq!(s.agent.log.count(early), 1, "{}", s.agent.log.text());
}

#[test]
fn a_warm_run_started_for_a_task_the_journal_refuses_shows_nothing_of_it() {
    // The journal refuses the task (storage full): the run that started meanwhile is thrown
    // away; the platform gets the refusal only, and stores no result for the task id.
    let full = setup("[agent]\nmin_free_mib = 1000000000\n");
    let installed = full.install("hello", &full.publisher.signed("hello"));
    assert_eq!(installed["ok"], true, "{installed}");
    let r = full.run_command(
        "hello",
        json!({"input": {"name": "never"}, "task_id": "refused-early"}),
    );
    assert_eq!(status(&r), "rejected", "{r}");
    assert_eq!(r["result"]["reason"], "storage_full", "{r}");
    assert!(!r.to_string().contains("Hello, never!"), "{r}");
    let stored = full.request(json!({"cmd": "result", "task_id": "refused-early"}));
    assert_ne!(stored["ok"], true, "{stored}");
    full.agent
        .log
        .wait_for("refusing a task", Duration::from_secs(20));
    assert_eq!(
        full.agent.log.count("task started"),
        0,
        "{}",
        full.agent.log.text()
    );
}

#[test]
fn a_burst_of_warm_tasks_records_results_with_their_acceptance_durably_and_once() {
    // Many tasks at once: while the journal commits the first acceptances, the others' runs
    // end, and their results are written with their acceptance (one commit per task, no
    // separate result write). Each task still gets exactly one result, and those results are
    // durable at once: an agent killed right after reports none of those tasks interrupted
    // (a result written later, without fsync, may be: the platform keeps the first), and
    // runs no task again.
    const BURST: usize = 48;
    let mut s = setup("[agent]\nmax_concurrent_tasks = 64\n");
    let installed = s.install("hello", &s.publisher.signed("hello"));
    assert_eq!(installed["ok"], true, "{installed}");
    let together = "task finished (recorded with its acceptance)";
    let mut ids = Vec::new();
    // Which tasks' runs end before their acceptance is written depends on timing; a few
    // bursts make at least one such task certain in practice.
    for round in 0..5 {
        let threads: Vec<_> = (0..BURST)
            .map(|i| {
                let (addr, id) = (s.platform.control(), s.id.clone());
                let task = format!("burst-{round}-{i}");
                std::thread::spawn(move || {
                    let r = addr
                        .try_request(&json!({"cmd": "run", "agent": id, "command": "hello",
                                "input": {"name": task}, "task_id": task, "timeout_ms": 60000}));
                    (task, r)
                })
            })
            .collect();
        for t in threads {
            let (task, r) = t.join().unwrap();
            assert_eq!(status(&r), "ok", "{r}");
            assert_eq!(r["result"]["output"]["greeting"], format!("Hello, {task}!"));
            ids.push(task);
        }
        if s.agent.log.count(together) > 0 {
            break;
        }
    }
    assert!(
        s.agent.log.count(together) > 0,
        "no result was recorded with its acceptance:\n{}",
        s.agent.log.text()
    );
    // The tasks whose result was recorded with their acceptance.
    let durable: Vec<String> = s
        .agent
        .log
        .text()
        .lines()
        .filter(|l| l.contains(together))
        .map(task_of)
        .collect();
    let ran = s.agent.log.count("task started");
    assert_eq!(ran, ids.len(), "one run per task");
    s.restart_agent(true);
    for task in &ids {
        let stored = s.request(json!({"cmd": "result", "task_id": task}));
        assert_eq!(status(&stored), "ok", "{stored}");
        let again = s.run_command(
            "hello",
            json!({"input": {"name": "again"}, "task_id": task}),
        );
        assert_eq!(again["result"], stored["result"], "{again}");
    }
    assert_eq!(s.agent.log.count("task started"), 0, "nothing ran again");
    for line in s.agent.log.text().lines() {
        if line.contains("reporting it as interrupted") {
            let task = task_of(line);
            assert!(
                !durable.contains(&task),
                "{task} was recorded with its acceptance, yet reported interrupted"
            );
        }
    }
}

/// The `task_id` field of an agent log line.
fn task_of(line: &str) -> String {
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("task_id="))
        .unwrap_or_else(|| panic!("no task_id in {line:?}"));
    field
        .trim_matches(|c: char| c == '"' || c == ':')
        .to_string()
}

#[test]
fn a_large_backlog_of_unacknowledged_results_is_delivered_at_connection_start() {
    // 3000 finished, unacknowledged results of 4 KiB each waiting in the agent's journal (as
    // after a long outage): the agent sends them all at once when it connects, while the
    // platform acknowledges them; neither end may stop reading while it writes.
    const N: usize = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("agent");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use bridge_host::journal::{Journal, JournalConfig};
        let (journal, _) = Journal::open(JournalConfig::new(state.join("journal.redb"))).unwrap();
        for i in 0..N {
            let req = bridge_protocol::RunRequest {
                id: format!("run-{i}"),
                task_id: format!("backlog-{i}"),
                command: Some("x".into()),
                ..Default::default()
            };
            journal.accept_running(&req).await.unwrap();
            let mut result = bridge_protocol::RunResult::refused(bridge_protocol::Status::Ok, "");
            result.error = None;
            result.stdout = format!("{i:05}{}", "y".repeat(4096));
            journal.finish(&req.task_id, &result).await.unwrap();
        }
    });
    let platform = Platform::start(&tmp.path().join("platform"));
    let agent = Agent::start(
        &state,
        &platform.agent_args_with(Some(&platform.token()), None),
    );
    let id = agent.id();
    platform.control().wait_connected(&id);
    let addr = platform.control();
    let last = addr.try_request(
        &json!({"cmd": "result", "task_id": format!("backlog-{}", N - 1), "wait_ms": 60000}),
    );
    assert_eq!(last["ok"], true, "{last}\nagent:\n{}", agent.log.text());
    for i in [0, N / 2, N - 1] {
        let r = addr.try_request(&json!({"cmd": "result", "task_id": format!("backlog-{i}")}));
        assert!(
            r["result"]["stdout"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{i:05}")),
            "{r}"
        );
    }
    // Every result acknowledged: a restarted agent has nothing left to send.
    let mut agent = agent;
    agent.terminate();
    let agent = Agent::start(&state, &platform.agent_args_with(None, None));
    platform.control().wait_connected(&id);
    agent.log.wait_for("journal opened", CONNECT);
    let opened = agent
        .log
        .text()
        .lines()
        .find(|l| l.contains("journal opened"))
        .unwrap()
        .to_string();
    assert!(opened.contains("unacked=0"), "{opened}");
}
