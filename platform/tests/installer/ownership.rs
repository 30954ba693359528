//! File ownership (needs root) and the enrollment token's removal once the agent enrolled.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use crate::support::*;

#[test]
fn policy_files_are_root_owned_and_the_token_goes_once_the_agent_enrolled() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let v1 = release(w, "v1", b"");
    let serve = start_serve(
        &w.join("platform"),
        &["--agent-binary", v1.to_str().unwrap()],
    );
    let (url, pin, token) = (
        base_url(&serve),
        get(&serve, "server_pin"),
        get(&serve, "token"),
    );
    let ca = get(&serve, "ca_file");
    let fake = fake_systemctl(w);
    let log = w.join("systemctl.log");
    let root = w.join("root");
    let root_s = root.to_str().unwrap().to_string();
    // The service user exists on the target system: files are chowned to it.
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbridge:x:4242:4343::/var/lib/bridge:/usr/sbin/nologin\n",
    )
    .unwrap();
    let marker = root.join("var/lib/bridge/enrolled");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--root",
            &root_s,
            "--url",
            &url,
            "--server-pin",
            &pin,
            "--ca-file",
            &ca,
            "--token-stdin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |a: &[String], env: &[(&str, &Path)]| {
        install_env(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &format!("{token}\n"),
            env,
        )
    };
    let env = [
        ("BRIDGE_INSTALL_SYSTEMCTL", fake.as_path()),
        ("FAKE_LOG", log.as_path()),
        ("FAKE_ENROLL", marker.as_path()),
    ];
    if !is_root() {
        // Files are chowned to the service user: that needs root.
        eprintln!("NOTE: not root: file ownership and the enrollment step were not tested");
        return;
    }
    let t = ok(run(&args(&["--enroll-wait", "20"]), &env));
    assert!(
        fs::read_to_string(&log)
            .unwrap()
            .contains("restart bridge-daemon.service"),
        "{t}"
    );
    assert!(!t.contains("not run (--root): systemctl"), "{t}");
    // The agent's policy: readable through its group, changeable by root only.
    let etc = root.join("etc/bridge");
    let owner = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner(&etc), (0, 4343, 0o750));
    assert_eq!(owner(&etc.join("agent.toml")), (0, 4343, 0o640));
    assert_eq!(owner(&etc.join("platform-ca.pem")), (0, 4343, 0o640));
    assert_eq!(owner(&root.join("var/lib/bridge")), (4242, 4343, 0o700));
    // What the agent runs is root's: the service user cannot change it.
    let lay = layout(&root);
    let version = env!("CARGO_PKG_VERSION");
    for path in [
        lay.clone(),
        lay.join("releases"),
        lay.join("releases").join(version),
        lay.join("releases").join(version).join("bridge-daemon"),
        lay.join("bridge-launcher"),
    ] {
        assert_eq!(owner(&path), (0, 0, 0o755), "{}", path.display());
    }
    assert_eq!(owner(&lay.join("state.json")), (0, 0, 0o644));
    // The agent enrolled: the token is gone, and the config no longer names it.
    assert!(marker.exists());
    assert!(
        t.contains("the agent has enrolled: removing the spent token"),
        "{t}"
    );
    assert!(!etc.join("token").exists(), "{t}");
    let config = fs::read_to_string(etc.join("agent.toml")).unwrap();
    assert!(!config.contains("token_file"), "{config}");
    assert!(
        config.contains("ca_file = \"/etc/bridge/platform-ca.pem\""),
        "{config}"
    );
    assert_eq!(owner(&etc.join("agent.toml")), (0, 4343, 0o640));

    // The same command again (token and all): the token is not written back, nothing changes.
    let out = ok(run(&args(&[]), &env));
    assert!(out.contains("already enrolled"), "{out}");
    assert!(out.contains("nothing to change"), "{out}");
    assert!(!etc.join("token").exists());

    // An agent that does not enroll in time: the token stays (0640, root's), with a warning
    // saying how to remove it.
    let root2 = w.join("root2");
    fs::create_dir_all(root2.join("etc")).unwrap();
    fs::copy(root.join("etc/passwd"), root2.join("etc/passwd")).unwrap();
    let mut a = args(&["--enroll-wait", "1"]);
    a[1] = root2.to_str().unwrap().to_string();
    let out = run(
        &a,
        &[
            ("BRIDGE_INSTALL_SYSTEMCTL", fake.as_path()),
            ("FAKE_LOG", log.as_path()),
        ],
    );
    let t = ok(out);
    assert!(
        t.contains("still in /etc/bridge/token") && t.contains("rm /etc/bridge/token"),
        "{t}"
    );
    assert_eq!(owner(&root2.join("etc/bridge/token")), (0, 4343, 0o640));
    assert_eq!(
        fs::read_to_string(root2.join("etc/bridge/token"))
            .unwrap()
            .trim(),
        token
    );

    // Files an older installer left the agent's own are given back to root on the next run,
    // also a token kept as it is (no token given this time).
    let token2 = root2.join("etc/bridge/token");
    let conf2 = root2.join("etc/bridge/agent.toml");
    for f in [&token2, &conf2] {
        std::os::unix::fs::chown(f, Some(4242), Some(4343)).unwrap();
        fs::set_permissions(f, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let without_token: Vec<String> = a
        .iter()
        .filter(|x| *x != "--token-stdin")
        .cloned()
        .collect();
    let t = ok(run(&without_token, &[("FAKE_LOG", log.as_path())]));
    assert!(!t.contains("nothing to change"), "{t}");
    assert_eq!(owner(&token2), (0, 4343, 0o640));
    assert_eq!(owner(&conf2), (0, 4343, 0o640));
    assert_eq!(fs::read_to_string(&token2).unwrap().trim(), token);
}
