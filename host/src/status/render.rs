//! The human form of a [`LocalStatus`]: a headline, then one aligned `Label: value` line per
//! fact, as `systemctl status` prints a unit. `--json` prints the [`LocalStatus`] itself.

use std::fmt::Write as _;

use super::LocalStatus;

/// The text `bridge-daemon status` prints; `why` says why a stopped daemon is taken to be
/// stopped.
pub fn text(status: &LocalStatus, why: Option<&str>) -> String {
    let mut out = String::new();
    match (status.running, status.pid, status.uptime_secs) {
        (true, pid, uptime) => {
            let _ = write!(out, "● bridge-daemon {}: running", status.version);
            let mut facts = Vec::new();
            if let Some(pid) = pid {
                facts.push(format!("pid {pid}"));
            }
            if let Some(secs) = uptime {
                facts.push(format!("up {}", duration(secs)));
            }
            if !facts.is_empty() {
                let _ = write!(out, " ({})", facts.join(", "));
            }
            out.push('\n');
        }
        (false, ..) => {
            out.push_str("○ bridge-daemon: not running\n");
            if let Some(why) = why {
                line(&mut out, "Why", why);
            }
        }
    }
    line(
        &mut out,
        "Agent",
        status.agent_id.as_deref().unwrap_or("no identity yet"),
    );
    line(
        &mut out,
        "Platform",
        status.platform.as_deref().unwrap_or("unknown"),
    );
    line(&mut out, "State", &status.state_dir.display().to_string());
    if let Some(stats) = &status.stats {
        let link = &stats.link;
        let since = link
            .since_unix_ms
            .map(|ms| format!(" since {}", when(ms)))
            .unwrap_or_default();
        let state = match (link.connected, link.since_unix_ms) {
            (true, _) => format!("connected{since}"),
            (false, None) => "not connected yet".to_string(),
            (false, Some(_)) => format!("disconnected{since}"),
        };
        line(&mut out, "Link", &state);
        if let Some(rtt) = link.heartbeat_rtt_ms {
            line(&mut out, "Heartbeat", &format!("{rtt:.1} ms round trip"));
        }
        line(&mut out, "Reconnects", &link.reconnects.to_string());
        if let Some(e) = &link.last_error {
            line(&mut out, "Last error", e);
        }
        let t = &stats.tasks;
        line(
            &mut out,
            "Tasks",
            &format!(
                "{} running, {} queued, {} waiting for acknowledgement",
                t.running, t.queued, t.unacked
            ),
        );
        let finished = if t.finished.is_empty() {
            "none since start".to_string()
        } else {
            let counts: Vec<String> = t.finished.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!("{} since start", counts.join(", "))
        };
        line(&mut out, "Finished", &finished);
        line(
            &mut out,
            "Journal",
            &format!(
                "{}, {} records",
                size(stats.journal.bytes),
                stats.journal.records
            ),
        );
        store(&mut out, &stats.store);
        line(
            &mut out,
            "Memory",
            &format!("{} resident", size(stats.rss_bytes)),
        );
    }
    if let Some(disk) = &status.on_disk {
        line(&mut out, "Journal", &size(disk.journal_bytes));
        store(&mut out, &disk.store);
    }
    if let Some(audit) = &status.audit {
        let head = audit.hash.get(..16).unwrap_or(&audit.hash);
        line(
            &mut out,
            "Audit",
            &format!("{} records, head {head}…", audit.seq),
        );
    }
    if let Some(addr) = &status.metrics_listen {
        line(&mut out, "Metrics", &format!("http://{addr}/metrics"));
    }
    out
}

fn store(out: &mut String, store: &bridge_protocol::StoreStats) {
    line(
        out,
        "Modules",
        &format!("{} ({})", store.modules, size(store.module_bytes)),
    );
    line(
        out,
        "Compiled",
        &format!("{} ({})", store.compiled, size(store.compiled_bytes)),
    );
}

/// One `Label: value` line, labels right-aligned.
fn line(out: &mut String, label: &str, value: &str) {
    let _ = writeln!(out, "{label:>12}: {value}");
}

/// Bytes in the largest binary unit that keeps a figure of at least 1.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds as `3d 4h`, `2h 3m`, `5m 2s` or `7s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A Unix time in milliseconds as `2026-12-04 01:02:03 UTC`.
fn when(unix_ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp((unix_ms / 1000) as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix_ms} ms after the epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 << 20), "5.0 MiB");
        assert_eq!(duration(7), "7s");
        assert_eq!(duration(302), "5m 2s");
        assert_eq!(duration(7380), "2h 3m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d 4h");
        assert_eq!(when(1_796_346_123_000), "2026-12-04 01:02:03 UTC");
    }

    #[test]
    fn a_running_agent_reads_as_aligned_lines() {
        let mut stats = bridge_protocol::AgentStats::default();
        stats.link.connected = true;
        stats.link.since_unix_ms = Some(1_796_346_123_000);
        stats.tasks.finished.insert(bridge_protocol::Status::Ok, 3);
        let status = LocalStatus {
            running: true,
            version: "1.2.3".into(),
            agent_id: Some("ab".repeat(32)),
            platform: Some("wss://p.example/agent".into()),
            state_dir: "/var/lib/bridge".into(),
            pid: Some(42),
            uptime_secs: Some(65),
            stats: Some(stats),
            on_disk: None,
            audit: None,
            metrics_listen: None,
        };
        let text = text(&status, None);
        assert!(
            text.starts_with("● bridge-daemon 1.2.3: running (pid 42, up 1m 5s)\n"),
            "{text}"
        );
        assert!(
            text.contains("        Link: connected since 2026-12-04 01:02:03 UTC\n"),
            "{text}"
        );
        assert!(text.contains("    Finished: 3 ok since start\n"), "{text}");
    }
}
