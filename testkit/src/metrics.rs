//! The agent's Prometheus endpoint as a scraper sees it: where it listens, what `promtool`
//! says of a scrape, and a scrape's samples.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::{wait_until, Agent, CONNECT};

/// Where `agent`'s metrics endpoint listens: the address it logs once bound.
pub fn endpoint(agent: &Agent) -> SocketAddr {
    wait_until("the metrics endpoint's address in the log", CONNECT, || {
        let log = agent.log.text();
        log.lines()
            .find(|l| l.contains("metrics endpoint listening"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or(log)
    })
}

/// `promtool check metrics` on `text` (either format); panics with promtool's words and the
/// text unless it passes. promtool is required (Debian's `prometheus` package, installed by
/// `.ci/run`).
#[track_caller]
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The samples of a scrape (text format or OpenMetrics): `name{labels}` as encoded → value.
/// Comment lines (`# HELP`, `# TYPE`, `# EOF`) and empty lines are skipped; a sample line that
/// does not end in a space and a number panics.
#[track_caller]
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            let value = value.parse().unwrap_or_else(|_| panic!("{l:?}"));
            (name.to_string(), value)
        })
        .collect()
}
