//! The root step's state machine on temporary layouts and state directories.

use super::*;
use crate::update::{OUTCOME, RELEASES_DIR, STAGED_DIR, UPDATE_DIR};
use bridge_signing::release::sign_manifest;
use bridge_signing::KeyPair;
use std::path::PathBuf;

struct Fixture {
    _tmp: tempfile::TempDir,
    layout: Layout,
    state: PathBuf,
    settings: LauncherSettings,
    key: KeyPair,
}

impl Fixture {
    /// A layout running 0.1.0, an agent state directory, a release key.
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("layout"));
        std::fs::create_dir_all(layout.release_dir("0.1.0")).unwrap();
        std::fs::write(layout.binary("0.1.0"), "binary 0.1.0").unwrap();
        layout.set_link(CURRENT_LINK, "0.1.0").unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join(UPDATE_DIR)).unwrap();
        let key = KeyPair::from_seed(&[3; 32]);
        let settings = LauncherSettings {
            state_dir: state.clone(),
            release_keys: vec![key.public_key()],
            allow_downgrade: false,
            confirm_timeout_secs: 3,
        };
        Fixture {
            _tmp: tmp,
            layout,
            state,
            settings,
            key,
        }
    }

    fn update(&self) -> PathBuf {
        self.state.join(UPDATE_DIR)
    }

    fn staged(&self) -> PathBuf {
        self.update().join(STAGED_DIR)
    }

    /// Stages `binary` as `version` with a manifest signed by `key`.
    fn stage_signed(&self, version: &str, arch: &str, binary: &[u8], key: &KeyPair) {
        let manifest = sign_manifest(version, "linux", arch, binary, key).unwrap();
        std::fs::create_dir_all(self.staged()).unwrap();
        std::fs::write(self.staged().join(STAGED_MANIFEST), manifest).unwrap();
        std::fs::write(self.staged().join(STAGED_BINARY), binary).unwrap();
        self.write_request(version, false);
    }

    fn stage(&self, version: &str) {
        let binary = format!("binary {version}");
        self.stage_signed(
            version,
            std::env::consts::ARCH,
            binary.as_bytes(),
            &self.key,
        );
    }

    fn write_request(&self, version: &str, allow_downgrade: bool) {
        let request = StagedRequest {
            update_id: format!("u-{version}"),
            version: version.into(),
            from_version: "0.1.0".into(),
            allow_downgrade,
        };
        std::fs::write(
            self.staged().join(STAGED_REQUEST),
            serde_json::to_vec(&request).unwrap(),
        )
        .unwrap();
    }

    fn prepare(&self) -> Vec<Done> {
        prepare(&self.layout, &self.settings).unwrap()
    }

    fn current(&self) -> Option<String> {
        self.layout.link_version(CURRENT_LINK).unwrap()
    }

    fn previous(&self) -> Option<String> {
        self.layout.link_version(PREVIOUS_LINK).unwrap()
    }

    fn releases(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.layout.root().join(RELEASES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn pending(&self) -> Option<Pending> {
        self.layout.read_state().unwrap().pending
    }

    fn outcome(&self) -> Outcome {
        serde_json::from_slice(&std::fs::read(self.update().join(OUTCOME)).unwrap()).unwrap()
    }

    fn confirm(&self, version: &str) {
        std::fs::write(self.update().join(CONFIRMED), format!("{version}\n")).unwrap();
    }

    /// Asserts the staged release was refused (`detail_has` in the detail) and nothing
    /// changed in the layout.
    fn assert_refused(&self, detail_has: &str) {
        let before = (self.current(), self.previous(), self.releases());
        let done = self.prepare();
        assert!(
            matches!(&done[..], [Done::Refused { detail, .. }] if detail.contains(detail_has)),
            "{done:?}"
        );
        assert_eq!((self.current(), self.previous(), self.releases()), before);
        assert_eq!(self.pending(), None);
        assert!(!self.staged().exists(), "staged/ is removed");
        let outcome = self.outcome();
        assert_eq!(outcome.state, UpdateState::Failed);
        assert_eq!(outcome.reason, Some(UpdateReason::SwitchFailed));
        assert!(outcome.detail.unwrap().contains(detail_has));
    }
}

#[test]
fn nothing_staged_nothing_pending_changes_nothing() {
    let f = Fixture::new();
    assert_eq!(f.prepare(), vec![]);
    assert_eq!(f.current().as_deref(), Some("0.1.0"));
}

#[test]
fn a_staged_release_is_installed_and_switched_to() {
    let f = Fixture::new();
    f.confirm("0.2.0"); // stale: must not confirm the new switch
    f.stage("0.2.0");
    assert_eq!(
        f.prepare(),
        vec![Done::Switched {
            from: "0.1.0".into(),
            version: "0.2.0".into()
        }]
    );
    assert_eq!(f.current().as_deref(), Some("0.2.0"));
    assert_eq!(f.previous().as_deref(), Some("0.1.0"));
    assert_eq!(
        std::fs::read(f.layout.current_binary()).unwrap(),
        b"binary 0.2.0"
    );
    let pending = f.pending().unwrap();
    assert_eq!(
        (
            pending.phase,
            pending.version.as_str(),
            pending.from_version.as_str()
        ),
        (Phase::Switched, "0.2.0", "0.1.0")
    );
    assert_eq!(pending.update_id, "u-0.2.0");
    assert_eq!(pending.confirm_timeout_secs, 3);
    assert!(!f.staged().exists());
    assert!(!f.update().join(CONFIRMED).exists());
    assert_eq!(f.releases(), vec!["0.1.0", "0.2.0"]);
}

#[test]
fn a_confirmed_version_stays_and_only_it_and_the_previous_are_kept() {
    let f = Fixture::new();
    f.stage("0.2.0");
    f.prepare();
    f.confirm("0.2.0");
    assert_eq!(
        f.prepare(),
        vec![Done::Confirmed {
            version: "0.2.0".into()
        }]
    );
    assert_eq!(f.pending(), None);
    f.stage("0.3.0");
    f.prepare();
    f.confirm("0.3.0");
    assert_eq!(
        f.prepare(),
        vec![
            Done::Confirmed {
                version: "0.3.0".into()
            },
            Done::Pruned {
                name: "0.1.0".into()
            }
        ]
    );
    assert_eq!(f.releases(), vec!["0.2.0", "0.3.0"]);
    assert_eq!(f.previous().as_deref(), Some("0.2.0"));
}

#[test]
fn an_unconfirmed_version_is_rolled_back_with_the_launchers_verdict() {
    let f = Fixture::new();
    f.stage("0.2.0");
    f.prepare();
    let verdict = files::Verdict {
        version: "0.2.0".into(),
        reason: UpdateReason::NotConfirmed,
        detail: "did not confirm within 3 s".into(),
    };
    std::fs::write(
        f.update().join(VERDICT),
        serde_json::to_vec(&verdict).unwrap(),
    )
    .unwrap();
    assert_eq!(
        f.prepare(),
        vec![Done::RolledBack {
            version: "0.2.0".into(),
            to: "0.1.0".into(),
            reason: UpdateReason::NotConfirmed
        }]
    );
    assert_eq!(f.current().as_deref(), Some("0.1.0"));
    assert_eq!(f.previous(), None);
    assert_eq!(f.releases(), vec!["0.1.0"]);
    assert_eq!(f.pending(), None);
    assert_eq!(
        f.outcome(),
        Outcome {
            update_id: "u-0.2.0".into(),
            state: UpdateState::Failed,
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
            reason: Some(UpdateReason::NotConfirmed),
            detail: Some("did not confirm within 3 s".into()),
        }
    );
    assert!(!f.update().join(VERDICT).exists());
}

#[test]
fn without_a_verdict_the_rollback_reason_is_exited() {
    let f = Fixture::new();
    f.stage("0.2.0");
    f.prepare();
    // A verdict about another version does not count.
    let other = files::Verdict {
        version: "9.9.9".into(),
        reason: UpdateReason::NotStarted,
        detail: "x".into(),
    };
    std::fs::write(
        f.update().join(VERDICT),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    f.confirm("0.1.0");
    f.prepare();
    assert_eq!(f.current().as_deref(), Some("0.1.0"));
    assert_eq!(f.outcome().reason, Some(UpdateReason::Exited));
}

#[test]
fn an_interrupted_switch_is_finished_first_and_nothing_else_happens() {
    let f = Fixture::new();
    f.stage("0.2.0");
    std::fs::create_dir_all(f.layout.release_dir("0.2.0")).unwrap();
    std::fs::write(f.layout.binary("0.2.0"), "binary 0.2.0").unwrap();
    let pending = Pending {
        update_id: "u".into(),
        version: "0.2.0".into(),
        from_version: "0.1.0".into(),
        phase: Phase::Switching,
        confirm_timeout_secs: 3,
    };
    f.layout
        .write_state(&LayoutState {
            pending: Some(pending),
        })
        .unwrap();
    assert_eq!(
        f.prepare(),
        vec![Done::Finished {
            version: "0.2.0".into()
        }]
    );
    assert_eq!(f.current().as_deref(), Some("0.2.0"));
    assert_eq!(f.previous().as_deref(), Some("0.1.0"));
    assert_eq!(f.pending().unwrap().phase, Phase::Switched);
    assert!(!f.staged().exists());
}

#[test]
fn a_release_signed_by_another_key_is_refused() {
    let f = Fixture::new();
    let other = KeyPair::from_seed(&[4; 32]);
    f.stage_signed("0.2.0", std::env::consts::ARCH, b"binary", &other);
    f.assert_refused("not a trusted release key");
}

#[test]
fn a_release_without_configured_keys_is_refused() {
    let mut f = Fixture::new();
    f.settings.release_keys.clear();
    f.stage("0.2.0");
    f.assert_refused("no release keys");
}

#[test]
fn a_binary_that_does_not_match_its_manifest_is_refused() {
    let f = Fixture::new();
    f.stage("0.2.0");
    // Same size, other bytes.
    std::fs::write(f.staged().join(STAGED_BINARY), "binary 0.2.X").unwrap();
    f.assert_refused("SHA-256");
    f.stage("0.2.0");
    std::fs::write(f.staged().join(STAGED_BINARY), "binary").unwrap();
    f.assert_refused("bytes");
}

#[test]
fn a_symlinked_binary_is_refused() {
    let f = Fixture::new();
    f.stage("0.2.0");
    let real = f.update().join("elsewhere");
    std::fs::rename(f.staged().join(STAGED_BINARY), &real).unwrap();
    std::os::unix::fs::symlink(&real, f.staged().join(STAGED_BINARY)).unwrap();
    f.assert_refused("symbolic link");
    assert!(real.exists(), "the link's target is left alone");
}

#[test]
fn a_symlinked_staged_directory_is_refused() {
    let f = Fixture::new();
    f.stage("0.2.0");
    let real = f.update().join("real");
    std::fs::rename(f.staged(), &real).unwrap();
    std::os::unix::fs::symlink(&real, f.staged()).unwrap();
    f.assert_refused("symbolic link");
    assert!(
        real.join(STAGED_BINARY).exists(),
        "the link's target is left alone"
    );
}

#[test]
fn a_release_for_another_arch_is_refused() {
    let f = Fixture::new();
    let arch = if std::env::consts::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    f.stage_signed("0.2.0", arch, b"binary", &f.key);
    f.assert_refused("this machine is");
}

#[test]
fn a_request_naming_another_version_is_refused() {
    let f = Fixture::new();
    f.stage("0.2.0");
    f.write_request("0.3.0", false);
    f.assert_refused("names version 0.3.0");
}

#[test]
fn a_downgrade_needs_both_the_request_and_the_config() {
    let mut f = Fixture::new();
    f.stage("0.0.9");
    f.assert_refused("not newer");
    f.stage("0.1.0");
    f.write_request("0.1.0", true);
    f.assert_refused("current release already");
    f.stage("0.0.9");
    f.write_request("0.0.9", true);
    f.assert_refused("not newer");
    f.settings.allow_downgrade = true;
    f.stage("0.0.9");
    f.write_request("0.0.9", true);
    assert!(matches!(&f.prepare()[..], [Done::Switched { .. }]));
    assert_eq!(f.current().as_deref(), Some("0.0.9"));
}

#[test]
fn an_oversized_manifest_is_refused_without_reading_it_all() {
    let f = Fixture::new();
    f.stage("0.2.0");
    std::fs::write(f.staged().join(STAGED_MANIFEST), vec![b'a'; 1 << 20]).unwrap();
    f.assert_refused("larger than");
}

#[test]
fn what_root_writes_into_the_state_directory_is_its_owners() {
    use std::os::unix::fs::MetadataExt;
    if crate::owner::euid() != 0 {
        eprintln!("skipped: only root can write files for another user");
        return;
    }
    let nobody = 65534;
    let f = Fixture::new();
    f.stage("0.2.0");
    f.prepare();
    // The agent's directory, without update/ (the rollback creates it).
    std::fs::remove_dir_all(f.update()).unwrap();
    std::os::unix::fs::chown(&f.state, Some(nobody), Some(nobody)).unwrap();
    assert!(matches!(&f.prepare()[..], [Done::RolledBack { .. }, ..]));
    for path in [f.update(), f.update().join(OUTCOME)] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (nobody, nobody),
            "{}",
            path.display()
        );
        assert_eq!(meta.mode() & 0o077, 0, "{}", path.display());
    }
}

#[test]
fn the_manual_rollback_goes_back_to_the_previous_release_once() {
    let f = Fixture::new();
    assert!(rollback_manual(&f.layout)
        .unwrap_err()
        .to_string()
        .contains("no previous release"));
    f.stage("0.2.0");
    f.prepare();
    f.confirm("0.2.0");
    f.prepare();
    let said = rollback_manual(&f.layout).unwrap();
    assert!(
        said.contains("0.1.0") && said.contains("systemctl restart"),
        "{said}"
    );
    assert_eq!(f.current().as_deref(), Some("0.1.0"));
    assert_eq!(f.previous(), None);
    assert!(rollback_manual(&f.layout).is_err());
}
