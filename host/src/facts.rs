//! Facts about the host for the agent's status report: read from the kernel, never from a shell.

use bridge_protocol::HostFacts;

/// Collects hostname, OS, architecture, uptime and load averages. Missing sources give zeros
/// rather than errors: a status report is never worth failing over.
pub fn collect() -> HostFacts {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let hostname = read("/proc/sys/kernel/hostname").trim().to_string();
    let uptime_secs = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| s as u64);
    let loadavg = read("/proc/loadavg");
    let mut load = [0.0; 3];
    for (slot, field) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    HostFacts {
        hostname,
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        uptime_secs,
        load,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_come_from_this_host() {
        let f = super::collect();
        assert_eq!(f.os, std::env::consts::OS);
        assert!(!f.hostname.is_empty());
        assert!(f.uptime_secs > 0);
    }
}
