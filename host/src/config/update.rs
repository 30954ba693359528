//! `[update]`: the agent's self-update settings (`docs/configuration.md`, `docs/updates.md`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;

use crate::update::agent::UpdateOptions;

/// `[update]`: self-update. The launcher reads the same table (leniently: only the keys it
/// uses); the agent validates all of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateSection {
    /// Release keys (`ed25519:…`) a release manifest must be signed by; none: updates are
    /// refused (`unsupported`).
    pub release_keys: Vec<String>,
    /// Whether a downgrade the platform asks for explicitly is carried out.
    pub allow_downgrade: bool,
    /// How long a new version must stay up, connected, before it confirms, in seconds.
    pub health_window_secs: u64,
    /// How long the launcher gives a new version, from its start, to confirm, in seconds.
    pub confirm_timeout_secs: u64,
    /// How long running tasks may take to finish before the agent restarts into a staged
    /// release, in seconds (an `update` may ask for another).
    pub drain_timeout_secs: u64,
    /// The largest release binary accepted, in bytes.
    pub max_binary_bytes: u64,
    /// How long the agent waits for each part of a release it asked for, in seconds.
    pub chunk_timeout_secs: u64,
}

impl Default for UpdateSection {
    fn default() -> Self {
        UpdateSection {
            release_keys: Vec::new(),
            allow_downgrade: false,
            health_window_secs: 60,
            confirm_timeout_secs: 300,
            drain_timeout_secs: 60,
            max_binary_bytes: 512 << 20,
            chunk_timeout_secs: 60,
        }
    }
}

impl UpdateSection {
    /// The release keys, parsed.
    pub fn release_keys(&self) -> Result<Vec<bridge_signing::PublicKey>> {
        self.release_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                k.parse()
                    .map_err(|e| anyhow::anyhow!("update.release_keys[{i}]: {e}"))
            })
            .collect()
    }

    /// Checks the keys and the ranges.
    pub fn validate(&self) -> Result<()> {
        self.release_keys()?;
        anyhow::ensure!(
            (1..=86_400).contains(&self.health_window_secs),
            "update.health_window_secs must be between 1 and 86400"
        );
        anyhow::ensure!(
            self.confirm_timeout_secs > self.health_window_secs
                && self.confirm_timeout_secs <= 86_400,
            "update.confirm_timeout_secs must be longer than update.health_window_secs ({} s) and at most 86400",
            self.health_window_secs
        );
        anyhow::ensure!(
            self.drain_timeout_secs <= 86_400,
            "update.drain_timeout_secs must be at most 86400"
        );
        anyhow::ensure!(
            (1..=4 << 30).contains(&self.max_binary_bytes),
            "update.max_binary_bytes must be between 1 and 4294967296"
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.chunk_timeout_secs),
            "update.chunk_timeout_secs must be between 1 and 3600"
        );
        Ok(())
    }

    /// The agent's update settings; `layout` is the launcher's layout directory
    /// (`BRIDGE_LAUNCHER_LAYOUT`), when the launcher started this agent.
    pub fn options(&self, layout: Option<PathBuf>) -> Result<UpdateOptions> {
        self.validate()?;
        Ok(UpdateOptions {
            release_keys: self.release_keys()?,
            allow_downgrade: self.allow_downgrade,
            health_window: Duration::from_secs(self.health_window_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            max_binary_bytes: self.max_binary_bytes,
            chunk_timeout: Duration::from_secs(self.chunk_timeout_secs),
            layout,
            shutdown: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::AgentConfig;

    #[test]
    fn the_update_table_is_checked() {
        let c = AgentConfig::parse("").unwrap();
        let o = c.update.options(None).unwrap();
        assert!(o.release_keys.is_empty() && !o.allow_downgrade);
        assert_eq!(
            (o.health_window.as_secs(), o.drain_timeout.as_secs()),
            (60, 60)
        );
        assert_eq!(o.max_binary_bytes, 512 << 20);
        assert_eq!(c.update.confirm_timeout_secs, 300);
        let key = bridge_signing::KeyPair::from_seed(&[7; 32]).public_key();
        let c = AgentConfig::parse(&format!(
            "[update]\nrelease_keys = [\"{key}\"]\nallow_downgrade = true\nhealth_window_secs = 2\nconfirm_timeout_secs = 30\ndrain_timeout_secs = 0\nmax_binary_bytes = 1000\nchunk_timeout_secs = 3\n"
        ))
        .unwrap();
        let o = c.update.options(Some("/l".into())).unwrap();
        assert_eq!(o.release_keys, [key]);
        assert!(o.allow_downgrade);
        assert_eq!(o.health_window.as_secs(), 2);
        assert_eq!(o.drain_timeout.as_secs(), 0);
        assert_eq!(o.chunk_timeout.as_secs(), 3);
        assert_eq!(o.max_binary_bytes, 1000);
        assert_eq!(o.layout.as_deref(), Some(Path::new("/l")));
        for (bad, says) in [
            (
                "release_keys = [\"ed25519:nope\"]",
                "update.release_keys[0]",
            ),
            ("release_key = []", "unknown field"),
            ("health_window_secs = 0", "health_window_secs"),
            ("health_window_secs = 300", "confirm_timeout_secs"),
            ("confirm_timeout_secs = 10", "confirm_timeout_secs"),
            ("drain_timeout_secs = 100000", "drain_timeout_secs"),
            ("max_binary_bytes = 0", "max_binary_bytes"),
            ("chunk_timeout_secs = 0", "chunk_timeout_secs"),
        ] {
            let err = format!(
                "{:#}",
                AgentConfig::parse(&format!("[update]\n{bad}\n")).unwrap_err()
            );
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
