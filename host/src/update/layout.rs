//! The root-owned release layout (`LAYOUT`, by default `/usr/local/lib/bridge`):
//!
//! ```text
//! LAYOUT/bridge-launcher             the launcher (never replaced by an update)
//! LAYOUT/releases/VERSION/bridge-daemon
//! LAYOUT/current -> releases/VERSION  the release the service runs
//! LAYOUT/previous -> releases/VERSION the one before (one manual rollback)
//! LAYOUT/state.json                  the launcher's record (files::LayoutState)
//! ```
//!
//! Only root writes here; the service user reads. A link is switched by creating the new link
//! under a temporary name and renaming it over the old one, so `current` always names a
//! release; `state.json` is written whole.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::dir::Dir;
use super::files::LayoutState;
use super::{CURRENT_LINK, LAYOUT_STATE, PREVIOUS_LINK, RELEASES_DIR, STAGED_BINARY};

/// The largest `state.json` read.
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// A release layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// Whether `version` can name a release directory: a semantic version (so only letters,
/// digits and `. _ - +`, never `.` or `..`).
pub fn is_release_name(version: &str) -> bool {
    bridge_signing::release::compare_versions(version, version).is_ok()
}

impl Layout {
    /// The layout at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `LAYOUT/releases`.
    pub fn releases(&self) -> PathBuf {
        self.root.join(RELEASES_DIR)
    }

    /// `LAYOUT/releases/VERSION`.
    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.releases().join(version)
    }

    /// `LAYOUT/releases/VERSION/bridge-daemon`.
    pub fn binary(&self, version: &str) -> PathBuf {
        self.release_dir(version).join(STAGED_BINARY)
    }

    /// `LAYOUT/current/bridge-daemon`: what the service runs.
    pub fn current_binary(&self) -> PathBuf {
        self.root.join(CURRENT_LINK).join(STAGED_BINARY)
    }

    /// The launcher's record; the default (nothing pending) when there is none.
    pub fn read_state(&self) -> Result<LayoutState> {
        let path = self.root.join(LAYOUT_STATE);
        let dir = Dir::open(&self.root)
            .with_context(|| format!("opening the layout {}", self.root.display()))?;
        let Some(bytes) = dir
            .read(LAYOUT_STATE, MAX_STATE_BYTES)
            .with_context(|| format!("reading {}", path.display()))?
        else {
            return Ok(LayoutState::default());
        };
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the launcher's record whole (root's, 0644).
    pub fn write_state(&self, state: &LayoutState) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(state)?;
        json.push(b'\n');
        Dir::open(&self.root)
            .and_then(|d| d.write(LAYOUT_STATE, &json, 0o644, None))
            .with_context(|| format!("writing {}", self.root.join(LAYOUT_STATE).display()))
    }

    /// The version a link (`current`, `previous`) points at; `None` when there is no link.
    pub fn link_version(&self, link: &str) -> Result<Option<String>> {
        let path = self.root.join(link);
        let target = match std::fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading the link {}", path.display()))
            }
        };
        let version = target
            .strip_prefix(RELEASES_DIR)
            .ok()
            .and_then(|v| v.to_str())
            .filter(|v| is_release_name(v));
        match version {
            Some(v) => Ok(Some(v.to_string())),
            None => bail!(
                "{} points at {}, not at {RELEASES_DIR}/VERSION",
                path.display(),
                target.display()
            ),
        }
    }

    /// Points `link` at `releases/VERSION` (relative), replacing it whole.
    pub fn set_link(&self, link: &str, version: &str) -> Result<()> {
        if !is_release_name(version) {
            bail!("{version:?} is not a release version");
        }
        let target = Path::new(RELEASES_DIR).join(version);
        let tmp_name = format!(".{link}.tmp");
        let tmp = self.root.join(&tmp_name);
        let linked = (|| {
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::os::unix::fs::symlink(&target, &tmp)?;
            let dir = Dir::open(&self.root)?;
            dir.rename(&tmp_name, link)?;
            dir.sync()
        })();
        linked.with_context(|| {
            format!(
                "pointing {} at {}",
                self.root.join(link).display(),
                target.display()
            )
        })
    }

    /// Removes `link`; a missing one is fine.
    pub fn remove_link(&self, link: &str) -> Result<()> {
        Dir::open(&self.root)
            .and_then(|d| {
                d.remove_file(link)?;
                d.sync()
            })
            .with_context(|| format!("removing {}", self.root.join(link).display()))
    }

    /// Removes `releases/NAME` (a release or a leftover temporary copy); a missing one is fine.
    pub fn remove_release(&self, name: &str) -> Result<()> {
        Dir::open(&self.releases())
            .and_then(|d| {
                d.remove_tree(name)?;
                d.sync()
            })
            .with_context(|| format!("removing {}", self.releases().join(name).display()))
    }

    /// Removes every entry of `releases/` that neither `current` nor `previous` points at
    /// (older releases, leftovers of an interrupted copy), and returns their names. Removes
    /// nothing unless `current` names an installed release.
    pub fn prune(&self) -> Result<Vec<String>> {
        let Some(current) = self.link_version(CURRENT_LINK)? else {
            return Ok(Vec::new());
        };
        if !self.binary(&current).is_file() {
            return Ok(Vec::new());
        }
        let previous = self.link_version(PREVIOUS_LINK).ok().flatten();
        let mut pruned = Vec::new();
        let entries = std::fs::read_dir(self.releases())
            .with_context(|| format!("listing {}", self.releases().display()))?;
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name == current || Some(&name) == previous.as_ref() {
                continue;
            }
            self.remove_release(&name)?;
            pruned.push(name);
        }
        pruned.sort();
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_with(versions: &[&str]) -> (tempfile::TempDir, Layout) {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        for v in versions {
            std::fs::create_dir_all(layout.release_dir(v)).unwrap();
            std::fs::write(layout.binary(v), v).unwrap();
        }
        (tmp, layout)
    }

    #[test]
    fn links_are_relative_and_replaced_whole() {
        let (_tmp, layout) = layout_with(&["0.1.0", "0.2.0"]);
        assert_eq!(layout.link_version(CURRENT_LINK).unwrap(), None);
        layout.set_link(CURRENT_LINK, "0.1.0").unwrap();
        layout.set_link(CURRENT_LINK, "0.2.0").unwrap();
        assert_eq!(
            std::fs::read_link(layout.root().join(CURRENT_LINK)).unwrap(),
            Path::new("releases/0.2.0")
        );
        assert_eq!(std::fs::read(layout.current_binary()).unwrap(), b"0.2.0");
        assert_eq!(
            layout.link_version(CURRENT_LINK).unwrap().as_deref(),
            Some("0.2.0")
        );
        assert!(layout.set_link(CURRENT_LINK, "../../etc").is_err());
    }

    #[test]
    fn a_link_elsewhere_is_an_error() {
        let (_tmp, layout) = layout_with(&[]);
        std::os::unix::fs::symlink("/usr/bin", layout.root().join(CURRENT_LINK)).unwrap();
        assert!(layout.link_version(CURRENT_LINK).is_err());
    }

    #[test]
    fn pruning_keeps_current_and_previous_only() {
        let (_tmp, layout) = layout_with(&["0.1.0", "0.2.0", "0.3.0"]);
        std::fs::create_dir_all(layout.releases().join("0.4.0.tmp")).unwrap();
        layout.set_link(PREVIOUS_LINK, "0.2.0").unwrap();
        layout.set_link(CURRENT_LINK, "0.3.0").unwrap();
        assert_eq!(layout.prune().unwrap(), vec!["0.1.0", "0.4.0.tmp"]);
        assert!(layout.binary("0.2.0").is_file() && layout.binary("0.3.0").is_file());
        assert!(!layout.release_dir("0.1.0").exists());
    }

    #[test]
    fn nothing_is_pruned_without_an_installed_current_release() {
        let (_tmp, layout) = layout_with(&["0.1.0"]);
        assert!(layout.prune().unwrap().is_empty());
        layout.set_link(CURRENT_LINK, "0.9.0").unwrap();
        assert!(layout.prune().unwrap().is_empty());
        assert!(layout.binary("0.1.0").is_file());
    }

    #[test]
    fn the_state_round_trips_and_defaults_to_nothing_pending() {
        let (_tmp, layout) = layout_with(&[]);
        assert_eq!(layout.read_state().unwrap(), LayoutState::default());
        let state = LayoutState {
            pending: Some(super::super::files::Pending {
                update_id: "u1".into(),
                version: "0.2.0".into(),
                from_version: "0.1.0".into(),
                phase: super::super::files::Phase::Switching,
                confirm_timeout_secs: 3,
            }),
        };
        layout.write_state(&state).unwrap();
        assert_eq!(layout.read_state().unwrap(), state);
    }
}
