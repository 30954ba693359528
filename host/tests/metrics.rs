//! The Prometheus endpoint on the real binary: a real `bridgectl serve`, a real `bridge-daemon
//! run` over TLS on 127.0.0.1 with `[metrics] listen`, real tasks (the hello example's WASM, a
//! shell rule), scraped over HTTP and parsed; every scrape passes `promtool check metrics`
//! (Debian's `prometheus` package; required, installed by `.ci/run`). Hostile clients (a head
//! too large, one never finished, more connections than served at once) are closed and the
//! endpoint keeps serving. Every test ends by itself.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bridge_testkit::metrics::{endpoint, promtool_check, samples};
use bridge_testkit::{bins, Setup};
use serde_json::{json, Value};

/// An agent with metrics on (port 0) and a shell rule `say`.
fn setup() -> Setup {
    Setup::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[[shell.rules]]\nname = \"say\"\nprogram = \"/bin/echo\"\nargs = [\"said\"]\n",
    )
}

/// An HTTP answer: status code, headers (names lowercased), body.
struct Answer {
    code: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `request` as is and reads the answer to its end (the server closes).
fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    read_answer(&mut s)
}

fn read_answer(s: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Answer {
        code,
        headers,
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
}

/// One scrape in the Prometheus text format: checked by promtool, parsed.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let a = get(addr, "/metrics");
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(
        a.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        a.headers.get("connection").map(String::as_str),
        Some("close")
    );
    assert_eq!(a.headers["content-length"], a.body.len().to_string());
    promtool_check(&a.body);
    samples(&a.body)
}

/// A scrape as Prometheus makes it (OpenMetrics asked for), parsed.
fn scrape_openmetrics(addr: SocketAddr) -> BTreeMap<String, f64> {
    let a = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(
        a.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(a.body.ends_with("# EOF\n"), "{}", a.body);
    samples(&a.body)
}

fn value(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no {name} in the scrape: {m:#?}"))
}

fn status(r: &Value) -> &str {
    r["result"]["status"].as_str().unwrap_or("")
}

/// TCP sockets process `pid` listens on (its descriptors matched against /proc/net/tcp{,6}).
fn listening_sockets(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f[3].to_string(), f[9].to_string())
                })
                .collect::<Vec<_>>()
        })
        .filter(|(state, inode)| state == "0A" && inodes.contains(inode))
        .count()
}

#[test]
fn a_scrape_shows_the_module_cache_and_journal_and_passes_promtool() {
    let s = setup();
    let addr = endpoint(&s.agent);
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    // `bridge-daemon status` names the address bound.
    let out = bins::daemon()
        .args(["status", "--json", "--state"])
        .arg(&s.agent.state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(local["metrics_listen"], addr.to_string(), "{local}");
    let control = s.control();
    let hello = s.publisher.signed("hello");
    for name in ["a", "b", "c"] {
        let r = control.run_module(&s.id, &hello, json!({"name": name}), None);
        assert_eq!(status(&r), "ok", "{r}");
    }
    let r = s.run_command("say", json!({}));
    assert_eq!(status(&r), "ok", "{r}");

    let m = scrape(addr);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&m, &format!("bridge_build_info{{version=\"{version}\"}}")),
        1.0
    );
    // One module: compiled once (after its one miss), then found in memory.
    assert_eq!(
        value(&m, "bridge_module_cache_events_total{event=\"miss\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "bridge_module_cache_events_total{event=\"compile\"}"),
        1.0
    );
    assert!(value(&m, "bridge_module_cache_events_total{event=\"hit\"}") >= 2.0);
    // Each task is at least one journal commit.
    assert!(
        value(&m, "bridge_journal_commit_seconds_count") >= 4.0,
        "{m:#?}"
    );
    assert!(value(&m, "bridge_journal_committed_bytes_total") > 0.0);
    assert!(value(&m, "bridge_journal_bytes") > 0.0);
    assert!(value(&m, "bridge_journal_records") >= 4.0);
    assert!(value(&m, "process_resident_memory_bytes") > 1e6);
    assert_eq!(value(&m, "bridge_tasks_running"), 0.0);
    assert_eq!(value(&m, "bridge_tasks_queued"), 0.0);

    // Counters only grow: another task, another scrape.
    let r = control.run_module(&s.id, &hello, json!({"name": "d"}), None);
    assert_eq!(status(&r), "ok", "{r}");
    let again = scrape(addr);
    let open = scrape_openmetrics(addr);
    assert_eq!(
        open.keys().collect::<Vec<_>>(),
        again.keys().collect::<Vec<_>>(),
        "the same series in both formats"
    );
    assert_eq!(
        open["bridge_module_cache_events_total{event=\"compile\"}"],
        1.0
    );
    assert!(
        value(&again, "bridge_module_cache_events_total{event=\"hit\"}")
            > value(&m, "bridge_module_cache_events_total{event=\"hit\"}")
    );
    assert_eq!(
        value(
            &again,
            "bridge_module_cache_events_total{event=\"compile\"}"
        ),
        1.0
    );
}

/// The task and link series: filled by the observer's task and link events, which the agent
/// and the link report.
#[test]
fn tasks_by_kind_and_status_and_the_link_state_match_what_ran() {
    let s = setup();
    let addr = endpoint(&s.agent);
    let control = s.control();
    let hello = s.publisher.signed("hello");
    for name in ["a", "b"] {
        let r = control.run_module(&s.id, &hello, json!({"name": name}), None);
        assert_eq!(status(&r), "ok", "{r}");
    }
    let r = s.run_command("say", json!({}));
    assert_eq!(status(&r), "ok", "{r}");
    let r = s.run_command("nothing-here", json!({}));
    assert_eq!(status(&r), "rejected", "{r}");
    let m = scrape(addr);
    assert_eq!(value(&m, "bridge_link_connected"), 1.0);
    assert_eq!(value(&m, "bridge_link_reconnects_total"), 0.0);
    assert_eq!(
        value(&m, "bridge_tasks_total{kind=\"wasm\",status=\"ok\"}"),
        2.0
    );
    assert_eq!(
        value(&m, "bridge_tasks_total{kind=\"shell\",status=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "bridge_tasks_total{kind=\"none\",status=\"rejected\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "bridge_task_duration_seconds_count{kind=\"wasm\"}"),
        2.0
    );
    assert_eq!(value(&m, "bridge_task_fuel_count"), 2.0);
    assert!(value(&m, "bridge_task_fuel_sum") > 0.0);
}

#[test]
fn only_get_metrics_is_served() {
    let s = setup();
    let addr = endpoint(&s.agent);
    let a = get(addr, "/");
    assert_eq!(a.code, 404);
    assert_eq!(a.headers["connection"], "close");
    assert_eq!(get(addr, "/metrics/x").code, 404);
    let a = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(a.code, 405);
    assert_eq!(a.headers["allow"], "GET");
    assert_eq!(exchange(addr, b"DELETE / HTTP/1.1\r\n\r\n").code, 405);
    assert_eq!(exchange(addr, b"\x16\x03\x01\x00\xa5\r\n\r\n").code, 400);
    // A query string names the same resource.
    assert_eq!(get(addr, "/metrics?x=1").code, 200);
}

#[test]
fn hostile_clients_are_closed_and_the_endpoint_keeps_serving() {
    let s = setup();
    let addr = endpoint(&s.agent);

    // A head past 8 KiB: answered 431 and closed, the rest never read.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(8 << 10, b'a');
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&big).unwrap();
    let a = read_answer(&mut c);
    assert_eq!(a.code, 431, "{}", a.body);
    // Just under the bound is a head like any other.
    let mut fits = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    fits.resize((8 << 10) - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    assert_eq!(exchange(addr, &fits).code, 200);

    // Sixteen clients that never finish their head hold every slot: a seventeenth waits in
    // the accept queue until their 5 s are up, then is served; they are closed.
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.read(&mut byte);
    assert!(
        early.is_err() || started.elapsed() >= Duration::from_secs(5),
        "answered while sixteen connections held every slot: {early:?}"
    );
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let a = read_answer(&mut waiting);
    assert_eq!(a.code, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for c in &mut silent {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        // Closed by the agent: end of stream (or a reset), no answer.
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    assert_eq!(get(addr, "/metrics").code, 200);
}

#[test]
fn a_non_loopback_listen_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
    let out = bins::daemon()
        .arg("run")
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&config)
        .args(["--server", "wss://127.0.0.1:1/agent"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics.listen 0.0.0.0:9464 is not a loopback address")
            && err.contains("allow_non_loopback = true"),
        "{err}"
    );
}

#[test]
fn with_metrics_off_nothing_listens() {
    let on = setup();
    endpoint(&on.agent);
    assert_eq!(
        listening_sockets(on.agent.pid()),
        1,
        "the endpoint's socket"
    );
    let off = Setup::start();
    assert_eq!(listening_sockets(off.agent.pid()), 0);
    assert_eq!(off.agent.log.count("metrics endpoint"), 0);
}
