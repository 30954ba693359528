//! Release manifests (`--release-key`): what the platform serves, the installer accepting a
//! manifest the release key signed, and refusing every mismatch with nothing installed (format
//! 1, and format 2 with the binary as a gzip archive: corrupt, truncated and oversized archives);
//! the root agent (`--run-as-root`).

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use crate::support::*;

#[test]
fn the_platform_serves_a_signed_manifest_and_run_as_root_says_so() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = release_key();
    let key_file = w.join("release.key");
    fs::write(&key_file, key.to_pem()).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    let v1 = release(w, "v1", b"");
    let serve = start_serve(
        &w.join("platform"),
        &[
            "--agent-binary",
            v1.to_str().unwrap(),
            "--release-key",
            key_file.to_str().unwrap(),
        ],
    );
    let public = key.public_key().to_string();
    assert_eq!(get(&serve, "release_key"), public);
    assert!(get(&serve, "install_command").contains(&format!("--release-key {public}")));
    let url = base_url(&serve);
    let pin = get(&serve, "server_pin");

    // A wrong release key: the manifest names another key; refused, nothing installed.
    let root = w.join("wrong");
    let other = bridge_signing::KeyPair::from_seed(&[10; 32])
        .public_key()
        .to_string();
    let out = install(&target(&root, &url, &pin, &["--release-key", &other]), "");
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!(
            "is signed by key {}, not by --release-key",
            key.key_id()
        )),
        "{}",
        text(&out)
    );
    assert!(snapshot(&root).is_empty());

    // The right one, as ed25519:… and as a PEM file; and --run-as-root.
    let root = w.join("root");
    let out = ok(install(
        &target(
            &root,
            &url,
            &pin,
            &["--release-key", &public, "--run-as-root", "--token", "abc"],
        ),
        "",
    ));
    assert!(out.contains("release manifest signature verified"), "{out}");
    // The platform serves format 2: the archive is checked, then unpacked.
    assert!(
        out.contains("archive sha256") && out.contains("verified against the release manifest"),
        "{out}"
    );
    // The manifest's version (the platform's) names the release; the key lets the agent
    // update itself.
    let version = env!("CARGO_PKG_VERSION");
    assert_current(&layout(&root), version);
    let config = fs::read_to_string(root.join("etc/bridge/agent.toml")).unwrap();
    assert!(
        config.contains(&format!("[update]\n# Self-update: releases whose manifest this key signed (see docs/configuration.md).\nrelease_keys = [\"{public}\"]\n")),
        "{config}"
    );
    assert!(
        out.contains("--run-as-root: the agent runs as root"),
        "{out}"
    );
    assert!(out.contains("--token is visible"), "{out}");
    let unit = fs::read_to_string(root.join("etc/systemd/system/bridge-daemon.service")).unwrap();
    assert!(!unit.contains("\nUser="), "{unit}");
    assert!(unit.contains("NoNewPrivileges=yes"), "{unit}");
    assert_eq!(mode(&root.join("etc/bridge")), 0o700);
    verify_unit(&root, w, EXPOSURE_ROOT);
    let pem = w.join("release.pub.pem");
    write_public_pem(&pem, key);
    let out = ok(install(
        &target(
            &root,
            &url,
            &pin,
            &["--release-key", pem.to_str().unwrap(), "--run-as-root"],
        ),
        "",
    ));
    assert!(out.contains("nothing to change"), "{out}");

    // What the platform serves to a client without a certificate.
    let get = |path: &str| -> (String, Vec<u8>) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-k",
                "--path-as-is",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("{url}{path}"))
            .output()
            .unwrap();
        let mut body = out.stdout;
        let split = body.iter().rposition(|b| *b == b'\n').unwrap();
        let code = String::from_utf8_lossy(&body[split + 1..]).to_string();
        body.truncate(split);
        (code, body)
    };
    let (code, script) = get("/install.sh");
    assert_eq!(code, "200");
    assert_eq!(script, fs::read(SCRIPT).unwrap());
    let (code, sum) = get(&format!("/downloads/bridge-daemon-linux-{ARCH}.sha256"));
    assert_eq!(code, "200");
    let want = format!(
        "{}  bridge-daemon-linux-{ARCH}\n",
        sha(&fs::read(&v1).unwrap())
    );
    assert_eq!(String::from_utf8_lossy(&sum), want);
    let (code, _) = get(&format!(
        "/downloads/{version}/bridge-daemon-linux-{ARCH}.sha256"
    ));
    assert_eq!(code, "200");
    // The signed manifest (no raw signature any more): the release key's, for this binary.
    let (code, body) = get(&format!("/downloads/bridge-daemon-linux-{ARCH}.manifest"));
    assert_eq!(code, "200");
    let signed =
        bridge_signing::release::SignedManifest::parse(&String::from_utf8(body).unwrap()).unwrap();
    let m = signed.verify(&[key.public_key()]).unwrap();
    assert!(m.matches(&fs::read(&v1).unwrap()));
    let (code, archive) = get(&format!("/downloads/bridge-daemon-linux-{ARCH}.gz"));
    assert_eq!(code, "200");
    assert!(m.archive_matches(&archive));
    assert_eq!(
        (m.version.as_str(), m.os.as_str(), m.arch.as_str()),
        (version, "linux", ARCH)
    );
    let (code, _) = get(&format!(
        "/downloads/{version}/bridge-daemon-linux-{ARCH}.manifest"
    ));
    assert_eq!(code, "200");
    assert_eq!(
        get(&format!("/downloads/bridge-daemon-linux-{ARCH}.sig")).0,
        "404"
    );
    assert_eq!(get("/agent").0, "401");
    assert_eq!(get("/downloads/bridge-daemon-linux-sparc").0, "404");
    assert_eq!(get("/downloads/../server.key").0, "404");
    assert_eq!(get("/").0, "404");
}

#[test]
fn a_gzip_release_is_checked_before_it_is_unpacked_and_a_bad_one_installs_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (root, fake, v1) = fake_staging(w);
    let key = release_key();
    let public = key.public_key().to_string();
    let archive = gzip(&v1);
    let good = manifest_gzip("1.2.3", ARCH, &v1, &archive, key);
    let args = target(&root, &fake.url, &fake.pin, &["--release-key", &public]);
    let refused = |why: &str| {
        let out = install(&args, "");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains(why), "expected {why:?}: {t}");
        assert!(t.contains("nothing was installed"), "{t}");
        assert!(snapshot(&root).is_empty(), "{why}: files were installed");
    };

    // Corrupt: bytes changed after signing; the archive's SHA-256 is checked before unpacking.
    let mut flipped = archive.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    fake.publish_archive(&flipped, &good);
    refused(&format!(
        "checksum mismatch for bridge-daemon-linux-{ARCH}.gz"
    ));
    // Served one byte short.
    fake.publish_archive(&archive[..archive.len() - 1], &good);
    refused("size mismatch for");
    // Truncated: an archive cut in half, signed as it is (its hash matches; gzip fails).
    let cut = &archive[..archive.len() / 2];
    fake.publish_archive(cut, &manifest_gzip("1.2.3", ARCH, &v1, cut, key));
    refused("is not a whole gzip archive");
    // Oversized: the binary and 64 MiB of zeros, signed as the binary alone (a gzip bomb
    // relative to the manifest): unpacking stops one byte past the binary's size.
    let mut bomb = v1.clone();
    bomb.extend(std::iter::repeat_n(0u8, 64 << 20));
    let bomb = gzip(&bomb);
    fake.publish_archive(&bomb, &manifest_gzip("1.2.3", ARCH, &v1, &bomb, key));
    refused("unpacks to more than");
    // The archive of another binary of the same size, signed as this one's.
    let mut other = v1.clone();
    *other.last_mut().unwrap() ^= 1;
    let other = gzip(&other);
    fake.publish_archive(&other, &manifest_gzip("1.2.3", ARCH, &v1, &other, key));
    refused("checksum mismatch for bridge-daemon-linux-");
    // A manifest of a format this installer does not know.
    fake.publish_archive(
        &archive,
        &good.replace("bridge-release 2", "bridge-release 3"),
    );
    refused("is of an unknown format");

    // The good archive installs the binary it unpacks to.
    fake.publish_archive(&archive, &good);
    let out = ok(install(&args, ""));
    assert!(out.contains("archive sha256"), "{out}");
    assert!(
        out.contains("and size verified against the release manifest (version 1.2.3)"),
        "{out}"
    );
    let lay = layout(&root);
    assert_eq!(
        fs::read(lay.join("releases/1.2.3/bridge-daemon")).unwrap(),
        v1
    );
    assert_current(&lay, "1.2.3");
}

/// Another architecture than this machine's.
fn other_arch() -> &'static str {
    if ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    }
}

#[test]
fn a_manifest_that_does_not_match_installs_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (root, fake, v1) = fake_staging(w);
    let key = release_key();
    let public = key.public_key().to_string();
    let good = manifest("1.2.3", ARCH, &v1, key);
    let install_with = |extra: &[&str]| {
        let mut args = target(&root, &fake.url, &fake.pin, &["--release-key", &public]);
        args.extend(extra);
        install(&args, "")
    };
    let refused = |why: &str| {
        let out = install_with(&[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains(why), "expected {why:?}: {t}");
        assert!(t.contains("nothing was installed"), "{t}");
        t
    };

    // Each refusal on a first install leaves nothing at all.
    let mut flipped = v1.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut longer = v1.clone();
    longer.push(0);
    let wrong_arch = format!("for the architecture {}, not {ARCH}", other_arch());
    // A longer binary is cut off at the manifest's size (curl --max-filesize).
    let too_large = format!("is larger than {} bytes", v1.len());
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        // Signed, then changed: the signature covers every line before it.
        (
            "does not verify under --release-key",
            v1.clone(),
            good.replace("version 1.2.3\n", "version 1.2.4\n"),
        ),
        (
            "does not verify under --release-key",
            v1.clone(),
            good.replace(
                &format!("sha256 {}\n", sha(&v1)),
                &format!("sha256 {}\n", sha(&flipped)),
            ),
        ),
        // Another key's manifest.
        (
            "is signed by key",
            v1.clone(),
            manifest(
                "1.2.3",
                ARCH,
                &v1,
                &bridge_signing::KeyPair::from_seed(&[10; 32]),
            ),
        ),
        // Signed, but for another machine, or for other bytes.
        (
            &wrong_arch,
            v1.clone(),
            manifest("1.2.3", other_arch(), &v1, key),
        ),
        ("checksum mismatch", flipped.clone(), good.clone()),
        (&too_large, longer.clone(), good.clone()),
        ("size mismatch", v1[..v1.len() - 1].to_vec(), good.clone()),
        // Not a manifest of the format.
        ("is malformed", v1.clone(), format!("{good}extra line\n")),
        ("is malformed", v1.clone(), good.replace('\n', "\r\n")),
        ("is malformed", v1.clone(), good.trim_end().to_string()),
    ];
    for (why, binary, text) in &cases {
        fake.publish_release(binary, text);
        refused(why);
        assert!(snapshot(&root).is_empty(), "{why}: files were installed");
    }
    // A manifest for another version than --version asks for.
    fake.files.lock().unwrap().insert(
        format!("/downloads/1.2.4/bridge-daemon-linux-{ARCH}.manifest"),
        good.clone().into_bytes(),
    );
    let out = install_with(&["--version", "1.2.4"]);
    assert!(
        text(&out).contains("the release manifest is for version 1.2.3, not --version 1.2.4"),
        "{}",
        text(&out)
    );
    assert!(snapshot(&root).is_empty());

    // The signed manifest: installed as its version, the key in the config for self-update.
    fake.publish_release(&v1, &good);
    let out = ok(install_with(&[]));
    assert!(out.contains("release manifest signature verified"), "{out}");
    assert!(
        out.contains("and size verified against the release manifest (version 1.2.3)"),
        "{out}"
    );
    let lay = layout(&root);
    assert_eq!(
        fs::read(lay.join("releases/1.2.3/bridge-daemon")).unwrap(),
        v1
    );
    assert_current(&lay, "1.2.3");
    let config = fs::read_to_string(root.join("etc/bridge/agent.toml")).unwrap();
    assert!(
        config.contains(&format!("release_keys = [\"{public}\"]")),
        "{config}"
    );
    // The same key as a PEM file is the same setting: nothing changes.
    let pem = w.join("release.pub.pem");
    write_public_pem(&pem, key);
    let mut args = target(
        &root,
        &fake.url,
        &fake.pin,
        &["--release-key", pem.to_str().unwrap()],
    );
    nothing_to_change(&root, || ok(install(&args, "")));

    // An upgrade whose manifest does not verify changes nothing.
    let v2 = fs::read(release(w, "v2", b"\n# 1.3.0\n")).unwrap();
    let next = manifest("1.3.0", ARCH, &v2, key);
    fake.publish_release(&v2, &next.replace("version 1.3.0", "version 1.3.1"));
    unchanged(&root, || {
        let out = text(&install(&args, ""));
        assert!(out.contains("does not verify"), "{out}");
        out
    });
    // A verified one moves current, keeps previous.
    fake.publish_release(&v2, &next);
    ok(install(&args, ""));
    assert_links(&lay, "1.3.0", "1.2.3");

    // A key that is not Ed25519 is refused before any download.
    let rsa = w.join("rsa.pem");
    let made = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
        ])
        .arg(w.join("rsa.key"))
        .status()
        .unwrap();
    assert!(made.success());
    let made = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(w.join("rsa.key"))
        .arg("-out")
        .arg(&rsa)
        .status()
        .unwrap();
    assert!(made.success());
    args[7] = rsa.to_str().unwrap();
    let out = install(&args, "");
    assert!(
        text(&out).contains("--release-key is not an Ed25519 public key"),
        "{}",
        text(&out)
    );
}
