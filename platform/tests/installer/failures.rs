//! Failures: nothing installed, nothing changed, a clear message.

use std::fs;

use sha2::{Digest as _, Sha256};

use crate::support::*;

#[test]
fn a_checksum_mismatch_or_a_wrong_pin_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let root = w.join("root");
    let root_s = root.to_str().unwrap();
    let fake = FakePlatform::start();
    let v1 = fs::read(release(w, "v1", b"")).unwrap();
    let v2 = fs::read(release(w, "v2", b"2")).unwrap();
    let install_from = |pin: &str| {
        install(
            &[
                "--root",
                root_s,
                "--url",
                &fake.url,
                "--server-pin",
                pin,
                "--token-stdin",
            ],
            "tok\n",
        )
    };

    // A wrong checksum on a first install: nothing at all.
    fake.publish(&v1, &"0".repeat(64));
    let out = install_from(&fake.pin);
    assert!(!out.status.success());
    assert!(text(&out).contains("checksum mismatch"), "{}", text(&out));
    assert!(snapshot(&root).is_empty());

    // A good install, then an upgrade whose checksum does not match: the old one stays.
    fake.publish(&v1, &hex::encode(Sha256::digest(&v1)));
    ok(install_from(&fake.pin));
    let before = snapshot(&root);
    fake.publish(&v2, &hex::encode(Sha256::digest(&v1)));
    let out = install_from(&fake.pin);
    assert!(!out.status.success());
    assert!(text(&out).contains("checksum mismatch"), "{}", text(&out));
    assert_eq!(snapshot(&root), before);

    // A platform whose key is not the pinned one.
    fake.publish(&v2, &hex::encode(Sha256::digest(&v2)));
    let out = install_from(&"cd".repeat(32));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not match --server-pin"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&root), before);
}

#[test]
fn an_unreachable_platform_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = install(
        &[
            "--root",
            root.to_str().unwrap(),
            "--url",
            &format!("https://127.0.0.1:{port}"),
            "--server-pin",
            &"ab".repeat(32),
            "--token-stdin",
        ],
        "tok\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("the platform is unreachable"), "{t}");
    assert!(!root.exists());

    // Usage errors are exit status 2, before anything happens.
    let out = install(
        &[
            "--root",
            root.to_str().unwrap(),
            "--url",
            "http://127.0.0.1:1",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("never use plain http"));
    let out = install(&["--bogus"], "");
    assert_eq!(out.status.code(), Some(2));
    let out = install(&["--help"], "");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--uninstall"));
    assert!(!root.exists());
}
