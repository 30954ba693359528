//! What the launcher reads from the agent's config file, read leniently: only `[agent]
//! state_dir` and `[update] release_keys, allow_downgrade, confirm_timeout_secs`; every other
//! key is ignored, so a newer agent's config never stops an older launcher (the launcher is
//! not replaced by updates).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bridge_signing::PublicKey;

/// The largest config file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The default `[update] confirm_timeout_secs`.
pub const DEFAULT_CONFIRM_TIMEOUT_SECS: u64 = 300;

/// The launcher's settings.
#[derive(Debug, Clone)]
pub struct LauncherSettings {
    /// `[agent] state_dir`: the agent's state directory.
    pub state_dir: PathBuf,
    /// `[update] release_keys`: the keys a release manifest may be signed by (invalid entries
    /// are skipped with a warning).
    pub release_keys: Vec<PublicKey>,
    /// `[update] allow_downgrade`.
    pub allow_downgrade: bool,
    /// `[update] confirm_timeout_secs`: how long a switched version has to confirm.
    pub confirm_timeout_secs: u64,
}

impl LauncherSettings {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<LauncherSettings> {
        // Root's own file (a symbolic link to it is the administrator's choice): read plainly,
        // but bounded.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            bail!("{} is larger than {MAX_CONFIG_BYTES} bytes", path.display());
        }
        let text = String::from_utf8(bytes)
            .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Reads a config file's text.
    pub fn parse(text: &str) -> Result<LauncherSettings> {
        let value: toml::Table = toml::from_str(text).context("not TOML")?;
        let state_dir = match value.get("agent").and_then(|a| a.get("state_dir")) {
            Some(toml::Value::String(s)) if !s.is_empty() => PathBuf::from(s),
            Some(_) => bail!("[agent] state_dir must be a path"),
            None => bail!("no [agent] state_dir: the launcher needs the agent's state directory"),
        };
        let update = value.get("update");
        let mut release_keys = Vec::new();
        match update.and_then(|u| u.get("release_keys")) {
            None => {}
            Some(toml::Value::Array(keys)) => {
                for key in keys {
                    match key.as_str().map(str::parse::<PublicKey>) {
                        Some(Ok(k)) => release_keys.push(k),
                        _ => {
                            tracing::warn!(key = %key, "[update] release_keys: not an ed25519 public key, skipped")
                        }
                    }
                }
            }
            Some(_) => tracing::warn!("[update] release_keys is not a list, ignored"),
        }
        let allow_downgrade = match update.and_then(|u| u.get("allow_downgrade")) {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                tracing::warn!("[update] allow_downgrade is not a boolean: false");
                false
            }
        };
        let confirm_timeout_secs = match update.and_then(|u| u.get("confirm_timeout_secs")) {
            None => DEFAULT_CONFIRM_TIMEOUT_SECS,
            Some(toml::Value::Integer(n)) if *n > 0 => *n as u64,
            Some(_) => {
                tracing::warn!(
                    default = DEFAULT_CONFIRM_TIMEOUT_SECS,
                    "[update] confirm_timeout_secs is not a positive integer: the default applies"
                );
                DEFAULT_CONFIRM_TIMEOUT_SECS
            }
        };
        Ok(LauncherSettings {
            state_dir,
            release_keys,
            allow_downgrade,
            confirm_timeout_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_tables_are_ignored() {
        let key = bridge_signing::KeyPair::from_seed(&[7; 32]).public_key();
        let s = LauncherSettings::parse(&format!(
            "[agent]\nstate_dir = \"/var/lib/bridge\"\nfuture_key = 1\n[update]\nrelease_keys = [\"{key}\", \"nonsense\"]\nallow_downgrade = true\nconfirm_timeout_secs = 9\nhealth_window_secs = 5\n[future]\nx = true\n"
        ))
        .unwrap();
        assert_eq!(s.state_dir, Path::new("/var/lib/bridge"));
        assert_eq!(s.release_keys, vec![key]);
        assert!(s.allow_downgrade);
        assert_eq!(s.confirm_timeout_secs, 9);
    }

    #[test]
    fn defaults_without_an_update_table() {
        let s = LauncherSettings::parse("[agent]\nstate_dir = \"/s\"\n").unwrap();
        assert!(s.release_keys.is_empty() && !s.allow_downgrade);
        assert_eq!(s.confirm_timeout_secs, DEFAULT_CONFIRM_TIMEOUT_SECS);
    }

    #[test]
    fn the_state_dir_is_required() {
        let e = LauncherSettings::parse("[update]\n").unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");
    }
}
