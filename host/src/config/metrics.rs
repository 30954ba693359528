//! `[metrics]`: the opt-in Prometheus endpoint (`docs/configuration.md`, `docs/operations.md`).

use std::net::SocketAddr;

use anyhow::Result;
use serde::Deserialize;

/// `[metrics]`: where the Prometheus endpoint listens; absent `listen`: no endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `IP:PORT` to serve `GET /metrics` on, e.g. `127.0.0.1:9464` (port 0: any free port, the
    /// bound address is logged and shown by `bridge-daemon status`).
    pub listen: Option<String>,
    /// Serve on an address that is not loopback. The endpoint has no authentication: off
    /// unless the operator turns it on.
    pub allow_non_loopback: bool,
}

impl MetricsSection {
    /// The address to listen on, validated; `None` when metrics are off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        let addr: SocketAddr = listen.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "metrics.listen {listen:?} is not an IP address and port (e.g. \"127.0.0.1:9464\" or \"[::1]:9464\")"
            )
        })?;
        anyhow::ensure!(
            addr.ip().is_loopback() || self.allow_non_loopback,
            "metrics.listen {addr} is not a loopback address: the metrics endpoint has no \
             authentication, so it listens on loopback unless [metrics] allow_non_loopback = true"
        );
        Ok(Some(addr))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::AgentConfig;

    #[test]
    fn metrics_are_off_unless_listen_is_set() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(c.metrics.listen_addr().unwrap(), None);
        assert!(c
            .agent_options(std::path::Path::new("/s"))
            .unwrap()
            .observer
            .metrics()
            .is_none());
        let c = AgentConfig::parse("[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(
            c.metrics.listen_addr().unwrap().unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert!(c
            .agent_options(std::path::Path::new("/s"))
            .unwrap()
            .observer
            .metrics()
            .is_some());
        let c = AgentConfig::parse("[metrics]\nlisten = \"[::1]:9464\"\n").unwrap();
        assert_eq!(c.metrics.listen_addr().unwrap().unwrap().port(), 9464);
    }

    #[test]
    fn a_non_loopback_address_needs_the_override() {
        for addr in ["0.0.0.0:9464", "192.0.2.7:9464", "[::]:9464"] {
            let err = format!(
                "{:#}",
                AgentConfig::parse(&format!("[metrics]\nlisten = \"{addr}\"\n")).unwrap_err()
            );
            assert!(
                err.contains("not a loopback address") && err.contains("allow_non_loopback"),
                "{err}"
            );
            let c = AgentConfig::parse(&format!(
                "[metrics]\nlisten = \"{addr}\"\nallow_non_loopback = true\n"
            ))
            .unwrap();
            assert!(c.metrics.listen_addr().unwrap().is_some());
        }
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused() {
        let err = format!(
            "{:#}",
            AgentConfig::parse("[metrics]\nlisten = \"localhost:9464\"\n").unwrap_err()
        );
        assert!(err.contains("not an IP address and port"), "{err}");
        assert!(AgentConfig::parse("[metrics]\nlisten = \"127.0.0.1\"\n").is_err());
        let err = format!(
            "{:#}",
            AgentConfig::parse("[metrics]\nlisen = \"127.0.0.1:1\"\n").unwrap_err()
        );
        assert!(err.contains("lisen"), "{err}");
        assert!(AgentConfig::parse("[metrics]\nlisten = 9464\n").is_err());
    }
}
