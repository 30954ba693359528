//! The release layout the installer sets up (installers/README.md, "The layout"): root-owned
//! `PREFIX/lib/bridge/{releases/VERSION/bridge-daemon, bridge-launcher, current, previous,
//! state.json}` and `PREFIX/bin/bridge-daemon` linking to the current release; upgrades
//! between versions; a pending self-update given way to; the unit running the launcher.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use crate::support::*;

/// Installs from `fake` into `root` (`--version` when given) with `extra` options; its output.
fn install_version(
    fake: &FakePlatform,
    root: &Path,
    version: Option<&str>,
    extra: &[&str],
) -> String {
    let mut args = target(root, &fake.url, &fake.pin, extra);
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    ok(install(&args, ""))
}

#[test]
fn releases_current_previous_and_the_launcher_across_upgrades() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (root, fake, v1) = fake_staging(w);
    let lay = layout(&root);
    let v2 = fs::read(release(w, "v2", b"\n# 1.1.0\n")).unwrap();
    let v3 = fs::read(release(w, "v3", b"\n# 1.2.0\n")).unwrap();
    fake.publish_binary(Some("1.0.0"), &v1);
    fake.publish_binary(Some("1.1.0"), &v2);
    fake.publish_binary(Some("1.2.0"), &v3);

    // An older installer's layout: a plain binary in bin/ and the old unit.
    let bin = root.join("usr/local/bin/bridge-daemon");
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    fs::write(&bin, &v1).unwrap();

    // A dry run changes nothing and says what it would do.
    let out = unchanged(&root, || {
        install_version(&fake, &root, Some("1.0.0"), &["--dry-run"])
    });
    assert!(
        out.contains(&format!(
            "would link {} -> releases/1.0.0",
            lay.join("current").display()
        )),
        "{out}"
    );

    // First install: the release, the launcher (the same bytes), the links, an empty state.
    let out = install_version(&fake, &root, Some("1.0.0"), &[]);
    assert!(out.contains("not run (--root): systemctl restart"), "{out}");
    assert_eq!(
        fs::read(lay.join("releases/1.0.0/bridge-daemon")).unwrap(),
        v1
    );
    assert_eq!(fs::read(lay.join("bridge-launcher")).unwrap(), v1);
    assert_current(&lay, "1.0.0");
    assert_eq!(link(&lay.join("previous")), None);
    assert!(!lay.join("previous").exists());
    assert_eq!(fs::read_to_string(lay.join("state.json")).unwrap(), "{}");
    // The older installer's binary is now a link to the current release.
    assert_eq!(
        link(&bin).as_deref(),
        Some("../lib/bridge/current/bridge-daemon")
    );
    assert_eq!(fs::read(&bin).unwrap(), v1);
    // Root's, read-only to everyone else: the service user cannot change what it runs.
    // (As root: root's; staging as another user: that user's.)
    let proc_self = fs::metadata("/proc/self").unwrap();
    let (uid, gid) = (proc_self.uid(), proc_self.gid());
    for dir in [
        lay.clone(),
        lay.join("releases"),
        lay.join("releases/1.0.0"),
    ] {
        assert_eq!(owner_mode(&dir), (uid, gid, 0o755), "{}", dir.display());
    }
    for file in [
        lay.join("releases/1.0.0/bridge-daemon"),
        lay.join("bridge-launcher"),
    ] {
        assert_eq!(owner_mode(&file), (uid, gid, 0o755), "{}", file.display());
    }
    assert_eq!(owner_mode(&lay.join("state.json")), (uid, gid, 0o644));
    let unit = fs::read_to_string(root.join("etc/systemd/system/bridge-daemon.service")).unwrap();
    for want in launcher_lines().iter().map(String::as_str).chain([
        "User=bridge\n",
        "ProtectSystem=strict\n",
        "ReadWritePaths=/var/lib/bridge\n",
        "Restart=always\n",
        "RestartSec=5s\n",
    ]) {
        assert!(unit.contains(want), "unit lacks {want}:\n{unit}");
    }
    assert_eq!(unit.matches("ExecStart").count(), 2, "{unit}");
    verify_unit(&root, w, EXPOSURE_USER);
    // Without --release-key, no release key in the config: the agent refuses self-updates.
    let config = fs::read_to_string(root.join("etc/bridge/agent.toml")).unwrap();
    assert!(!config.contains("[update]"), "{config}");

    // The same settings again: nothing changes.
    nothing_to_change(&root, || install_version(&fake, &root, Some("1.0.0"), &[]));

    // A new version: current moves, previous keeps the one before, the launcher is the new
    // installer's binary, the service is restarted.
    let out = install_version(&fake, &root, Some("1.1.0"), &[]);
    assert!(out.contains("not run (--root): systemctl restart"), "{out}");
    assert_links(&lay, "1.1.0", "1.0.0");
    assert_eq!(
        fs::read(lay.join("releases/1.0.0/bridge-daemon")).unwrap(),
        v1
    );
    assert_eq!(
        fs::read(lay.join("releases/1.1.0/bridge-daemon")).unwrap(),
        v2
    );
    assert_eq!(fs::read(lay.join("bridge-launcher")).unwrap(), v2);
    assert_eq!(fs::read(&bin).unwrap(), v2);
    nothing_to_change(&root, || install_version(&fake, &root, Some("1.1.0"), &[]));

    // One more: previous moves along, the oldest release is pruned.
    install_version(&fake, &root, Some("1.2.0"), &[]);
    assert_links(&lay, "1.2.0", "1.1.0");
    let mut releases: Vec<String> = fs::read_dir(lay.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    assert_eq!(releases, ["1.1.0", "1.2.0"]);

    // Back to an older version by the installer: it becomes current, the one it replaces
    // previous.
    install_version(&fake, &root, Some("1.1.0"), &[]);
    assert_links(&lay, "1.1.0", "1.2.0");
    assert_eq!(fs::read(&bin).unwrap(), v2);
    // No temporary names left behind anywhere in the layout or bin/.
    for dir in [
        lay.clone(),
        lay.join("releases"),
        root.join("usr/local/bin"),
    ] {
        for e in fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with('.'),
                "left behind: {}/{name}",
                dir.display()
            );
        }
    }

    // Uninstall removes the layout and the link; a dry run first changes nothing.
    let out = unchanged(&root, || {
        ok(install(
            &["--root", root.to_str().unwrap(), "--uninstall", "--dry-run"],
            "",
        ))
    });
    assert!(
        out.contains(&format!("would run: rm -rf {}", lay.display())),
        "{out}"
    );
    ok(install(
        &["--root", root.to_str().unwrap(), "--uninstall"],
        "",
    ));
    assert!(!root.join("usr/local/lib").exists());
    assert!(fs::symlink_metadata(&bin).is_err());
    assert!(root.join("var/lib/bridge").is_dir());
}

#[test]
fn an_install_clears_a_pending_self_update() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (root, fake, v1) = fake_staging(w);
    let lay = layout(&root);
    let v2 = fs::read(release(w, "v2", b"\n# 2.0.0\n")).unwrap();
    fake.publish_binary(Some("1.0.0"), &v1);
    install_version(&fake, &root, Some("1.0.0"), &[]);

    // What a self-update to 2.0.0 leaves: the launcher switched to it and awaits its
    // confirmation, and the agent staged yet another release.
    let releases = lay.join("releases/2.0.0");
    fs::create_dir_all(&releases).unwrap();
    fs::write(releases.join("bridge-daemon"), &v2).unwrap();
    fs::set_permissions(
        releases.join("bridge-daemon"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("releases/2.0.0", lay.join(".current.tmp")).unwrap();
    fs::rename(lay.join(".current.tmp"), lay.join("current")).unwrap();
    std::os::unix::fs::symlink("releases/1.0.0", lay.join("previous")).unwrap();
    let pending = serde_json::json!({"pending": {
        "update_id": "u1", "version": "2.0.0", "from_version": "1.0.0",
        "phase": "switched", "confirm_timeout_secs": 300,
    }});
    fs::write(lay.join("state.json"), pending.to_string()).unwrap();
    let update = root.join("var/lib/bridge/update");
    let staged = update.join("staged");
    fs::create_dir_all(&staged).unwrap();
    fs::write(staged.join("manifest"), "bridge-release 1\n").unwrap();
    fs::write(staged.join("bridge-daemon"), b"\x7fELF").unwrap();
    fs::write(update.join("outcome.json"), "{}").unwrap();

    // A dry run says what it would do, and does not.
    let out = unchanged(&root, || {
        install_version(&fake, &root, Some("1.0.0"), &["--dry-run"])
    });
    assert!(
        out.contains("a pending self-update would be cleared")
            && out.contains("a self-update the agent staged would be discarded"),
        "{out}"
    );

    // The installer's version wins: the pending switch is forgotten, the staged release
    // discarded, and it says so; the self-updated release stays as previous.
    let out = install_version(&fake, &root, Some("1.0.0"), &[]);
    assert!(
        out.contains("a pending self-update is cleared: this install decides the version (1.0.0)"),
        "{out}"
    );
    assert!(
        out.contains("a self-update the agent staged is discarded"),
        "{out}"
    );
    assert!(out.contains("not run (--root): systemctl restart"), "{out}");
    assert_eq!(fs::read_to_string(lay.join("state.json")).unwrap(), "{}");
    assert!(!staged.exists());
    // The agent's report of the last update is its own, kept for the platform.
    assert!(update.join("outcome.json").exists());
    assert_links(&lay, "1.0.0", "2.0.0");
    assert_eq!(
        fs::read(lay.join("releases/2.0.0/bridge-daemon")).unwrap(),
        v2
    );

    // A launcher's state without a pending switch is left as it is.
    fs::write(lay.join("state.json"), "{ }").unwrap();
    nothing_to_change(&root, || install_version(&fake, &root, Some("1.0.0"), &[]));

    // The state directory is the service user's: root follows no link it planted there.
    let elsewhere = w.join("elsewhere");
    fs::create_dir_all(elsewhere.join("staged")).unwrap();
    fs::rename(&update, w.join("update.moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &update).unwrap();
    let before = snapshot(&root);
    let out = install(
        &target(&root, &fake.url, &fake.pin, &["--version", "1.0.0"]),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("/var/lib/bridge/update is not a directory (a link?)"),
        "{}",
        text(&out)
    );
    assert!(elsewhere.join("staged").is_dir());
    assert_eq!(snapshot(&root), before);
}

#[test]
fn the_version_comes_from_the_binary_or_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let fake = FakePlatform::start();

    // Without --version: what the downloaded binary prints (`bridge-daemon X`).
    let v1 = fs::read(release(w, "v1", b"")).unwrap();
    fake.publish_binary(None, &v1);
    let root = w.join("root");
    let out = install_version(&fake, &root, None, &[]);
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        out.contains(&format!("releases/{version}/bridge-daemon")),
        "{out}"
    );
    assert_current(&layout(&root), version);

    // An executable that prints no version: refused, nothing installed.
    let other = fs::read("/bin/true").unwrap();
    fake.publish_binary(None, &other);
    let root = w.join("other");
    let out = install(&target(&root, &fake.url, &fake.pin, &[]), "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot tell the version of the downloaded")
            && text(&out).contains("give --version"),
        "{}",
        text(&out)
    );
    assert!(snapshot(&root).is_empty());

    // A --version that could not name a directory: a usage error.
    for bad in [
        "../1.0.0", "1.0.0/x", "v1", "1..0", "1.0", "01.0.0", "1.0.0-01", "1.0.0+", "1.0.0_1",
    ] {
        let out = install(
            &[
                "--root",
                root.to_str().unwrap(),
                "--url",
                &fake.url,
                "--version",
                bad,
            ],
            "",
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(
            text(&out).contains("--version must be a semantic version"),
            "{}",
            text(&out)
        );
    }
    assert!(snapshot(&root).is_empty());

    // Any semantic version names a release.
    let v = "2.0.0-rc.1+build.5";
    fake.publish_binary(Some(v), &v1);
    let root = w.join("prerelease");
    install_version(&fake, &root, Some(v), &[]);
    assert_current(&layout(&root), v);
}
