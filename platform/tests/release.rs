//! Release manifests with the real `bridgectl`: `release sign` and `release verify` (round trip
//! and every refusal, formats 1 and 2 with the gzip archive), and the manifest `serve
//! --release-key` serves beside the agent binary.

mod common;

use std::fs;
use std::process::Command;

use bridge_signing::release::SignedManifest;
use bridge_testkit::Platform;
use serde_json::Value;
use sha2::{Digest, Sha256};

use common::Workdir;

/// A [`Workdir`] with release keys and a binary.
struct Env(Workdir);

impl std::ops::Deref for Env {
    type Target = Workdir;

    fn deref(&self) -> &Workdir {
        &self.0
    }
}

impl Env {
    /// A directory with two release keys (`release.key`, `other.key`) and a binary.
    fn new() -> Env {
        let env = Env(Workdir::new());
        for key in ["release.key", "other.key"] {
            env.run_code(&["keygen", "-o", key], 0);
        }
        fs::write(env.path("bridge-daemon"), binary()).unwrap();
        env
    }

    fn public_key(&self, key: &str) -> String {
        fs::read_to_string(self.path(&format!("{key}.pub")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `release sign bridge-daemon --key KEY --version VERSION EXTRA...`, expecting `code`.
    #[track_caller]
    fn sign(&self, key: &str, version: &str, extra: &[&str], code: i32) -> (Value, String) {
        let mut args = vec![
            "release",
            "sign",
            "bridge-daemon",
            "--key",
            key,
            "--version",
            version,
        ];
        args.extend_from_slice(extra);
        self.run_code(&args, code)
    }

    /// `release verify MANIFEST --key KEY.pub --binary bridge-daemon`, expecting `code`.
    #[track_caller]
    fn verify(&self, manifest: &str, key: &str, code: i32) -> Value {
        let public = self.public_key(key);
        self.run_code(
            &[
                "release",
                "verify",
                manifest,
                "--key",
                &public,
                "--binary",
                "bridge-daemon",
            ],
            code,
        )
        .0
    }
}

/// Some bytes standing for an agent binary.
fn binary() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn a_signed_release_verifies_under_its_key_with_its_binary() {
    let env = Env::new();
    let (signed, _) = env.sign("release.key", "0.2.0", &[], 0);
    assert_eq!(
        signed["output"], "bridge-daemon.manifest",
        "default output: BINARY.manifest"
    );
    assert_eq!(signed["version"], "0.2.0");
    assert_eq!(signed["os"], "linux");
    assert_eq!(signed["arch"], std::env::consts::ARCH);
    assert_eq!(signed["size"], 100_000);
    assert_eq!(signed["sha256"], sha256_hex(&binary()));
    // The file is a manifest as the agents read it (docs/updates.md), saying what was printed.
    let text = fs::read_to_string(env.path("bridge-daemon.manifest")).unwrap();
    let names: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        names.join(" "),
        "bridge-release version os arch size sha256 archive archive_size archive_sha256 key binary_signature signature"
    );
    assert_eq!(text.lines().next(), Some("bridge-release 2"));
    let parsed = SignedManifest::parse(&text).unwrap();
    let m = parsed.manifest();
    assert_eq!(m.version, "0.2.0");
    assert_eq!(m.size, 100_000);
    assert_eq!(m.sha256, signed["sha256"]);
    assert_eq!(m.key.to_string(), signed["key_id"]);
    // Format 2, the default: the gzip archive beside the binary, named by the manifest.
    assert_eq!(signed["format"], 2);
    assert_eq!(signed["archive"], "bridge-daemon.gz");
    let archive = fs::read(env.path("bridge-daemon.gz")).unwrap();
    assert_eq!(&archive[..2], [0x1f, 0x8b], "a gzip stream");
    assert!(archive.len() < 100_000 / 10, "{} bytes", archive.len());
    assert_eq!(signed["archive_size"], archive.len());
    assert_eq!(signed["archive_sha256"], sha256_hex(&archive));
    assert!(m.archive_matches(&archive));
    let (valid, _) = env.run_code(
        &[
            "release",
            "verify",
            "bridge-daemon.manifest",
            "--key",
            "@release.key.pub",
            "--binary",
            "bridge-daemon",
            "--archive",
            "bridge-daemon.gz",
        ],
        0,
    );
    assert_eq!(valid["valid"], true, "{valid}");
    assert_eq!(valid["archive"], "bridge-daemon.gz");
    assert_eq!(valid["archive_size"], archive.len());

    // Format 1: the binary only, no archive written.
    let (v1, _) = env.sign(
        "release.key",
        "0.2.0",
        &["--format", "1", "-o", "v1.manifest"],
        0,
    );
    assert_eq!(v1["format"], 1);
    assert_eq!(v1["archive"], Value::Null);
    assert_eq!(v1["archive_size"], Value::Null);
    let text = fs::read_to_string(env.path("v1.manifest")).unwrap();
    let names: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        names.join(" "),
        "bridge-release version os arch size sha256 key signature"
    );
    assert_eq!(env.verify("v1.manifest", "release.key", 0)["format"], 1);
    env.sign("release.key", "0.2.0", &["--format", "3"], 2);

    let valid = env.verify("bridge-daemon.manifest", "release.key", 0);
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["version"], "0.2.0");
    assert_eq!(valid["key_id"], signed["key_id"]);
    assert_eq!(valid["binary"], "bridge-daemon");
    // The key as a file, among others; without --binary.
    let (valid, _) = env.run_code(
        &[
            "release",
            "verify",
            "bridge-daemon.manifest",
            "--key",
            "other.key.pub",
            "--key",
            "@release.key.pub",
        ],
        0,
    );
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["binary"], Value::Null);

    // Another output and architecture.
    let (signed, _) = env.run_code(
        &[
            "release",
            "sign",
            "bridge-daemon",
            "-k",
            "release.key",
            "--version",
            "1.0.0-rc.1",
            "--arch",
            "aarch64",
            "-o",
            "arm.manifest",
        ],
        0,
    );
    assert_eq!(signed["arch"], "aarch64");
    assert_eq!(
        env.verify("arm.manifest", "release.key", 0)["arch"],
        "aarch64"
    );
}

#[test]
fn verify_refuses_another_key_a_tampered_manifest_and_another_binary() {
    let env = Env::new();
    env.sign("release.key", "0.2.0", &[], 0);
    let text = fs::read_to_string(env.path("bridge-daemon.manifest")).unwrap();

    // Signed by a key that is not the one given.
    let refused = env.verify("bridge-daemon.manifest", "other.key", 1);
    assert_eq!(refused["valid"], false);
    assert_eq!(refused["reason"], "unknown_key");

    // A field changed after signing (still well-formed): the signature no longer verifies.
    for (from, to) in [
        ("version 0.2.0", "version 0.2.1"),
        ("os linux", "os other"),
        (
            &format!("arch {}", std::env::consts::ARCH)[..],
            if std::env::consts::ARCH == "aarch64" {
                "arch x86_64"
            } else {
                "arch aarch64"
            },
        ),
    ] {
        fs::write(env.path("tampered.manifest"), text.replace(from, to)).unwrap();
        let refused = env.verify("tampered.manifest", "release.key", 1);
        assert_eq!(refused["reason"], "bad_signature", "{from} -> {to}");
    }
    // Not a manifest any more.
    for broken in [
        text.replacen("size ", "length ", 1),
        format!("{text}extra line\n"),
        text.replace('\n', "\r\n"),
        "x".repeat(5000),
    ] {
        fs::write(env.path("broken.manifest"), broken).unwrap();
        let refused = env.verify("broken.manifest", "release.key", 1);
        assert_eq!(refused["reason"], "malformed_manifest", "{refused}");
    }

    // A binary that is not the one signed: one byte more, or the same size with a byte changed.
    let mut longer = binary();
    longer.push(0);
    let mut changed = binary();
    changed[500] ^= 1;
    for other in [longer, changed] {
        fs::write(env.path("bridge-daemon"), other).unwrap();
        let refused = env.verify("bridge-daemon.manifest", "release.key", 1);
        assert_eq!(refused["reason"], "mismatch", "{refused}");
    }
    // A missing binary is an error, not a verdict.
    fs::remove_file(env.path("bridge-daemon")).unwrap();
    env.verify("bridge-daemon.manifest", "release.key", 2);
}

/// `release verify MANIFEST --key release.key.pub --archive ARCHIVE`, expecting `code`.
#[track_caller]
fn verify_archive(env: &Env, manifest: &str, archive: &str, code: i32) -> Value {
    env.run_code(
        &[
            "release",
            "verify",
            manifest,
            "--key",
            "@release.key.pub",
            "--archive",
            archive,
        ],
        code,
    )
    .0
}

/// `bytes`, gzip-compressed.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn verify_refuses_a_corrupt_truncated_or_oversized_archive() {
    let env = Env::new();
    env.sign("release.key", "0.2.0", &[], 0);
    let archive = fs::read(env.path("bridge-daemon.gz")).unwrap();
    assert_eq!(
        verify_archive(&env, "bridge-daemon.manifest", "bridge-daemon.gz", 0)["valid"],
        true
    );
    let mismatch = |bytes: &[u8], why: &str| {
        fs::write(env.path("bad.gz"), bytes).unwrap();
        let refused = verify_archive(&env, "bridge-daemon.manifest", "bad.gz", 1);
        assert_eq!(refused["reason"], "mismatch", "{refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains(why), "{why}: {message}");
    };
    let mut flipped = archive.clone();
    flipped[archive.len() / 2] ^= 0x40;
    mismatch(&flipped, "SHA-256 is not the manifest's archive");
    mismatch(&archive[..archive.len() - 1], "archive_size is");

    // Signed over archives that do not unpack to the binary: cut short, or a bomb relative to
    // the manifest (more than the binary's size), each signed as the binary's by the release
    // key (format 2 signs whatever archive it is given, so these are written by hand).
    let key =
        bridge_signing::KeyPair::from_pem(&fs::read_to_string(env.path("release.key")).unwrap())
            .unwrap();
    let mut longer = binary();
    longer.extend(std::iter::repeat_n(0u8, 4 << 20));
    for (name, bad) in [
        ("truncated", archive[..archive.len() / 2].to_vec()),
        ("bomb", gzip(&longer)),
    ] {
        let text = bridge_signing::release::sign_manifest_gzip(
            "0.2.0",
            "linux",
            std::env::consts::ARCH,
            &binary(),
            &bad,
            &key,
        )
        .unwrap();
        fs::write(env.path(&format!("{name}.manifest")), text).unwrap();
        fs::write(env.path(&format!("{name}.gz")), &bad).unwrap();
        let refused = verify_archive(&env, &format!("{name}.manifest"), &format!("{name}.gz"), 1);
        assert_eq!(refused["reason"], "mismatch", "{name}: {refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(
            message.contains("does not unpack to the binary"),
            "{name}: {message}"
        );
    }

    // An archive for a format-1 manifest is a mismatch.
    env.sign(
        "release.key",
        "0.2.0",
        &["--format", "1", "-o", "v1.manifest"],
        0,
    );
    let refused = verify_archive(&env, "v1.manifest", "bridge-daemon.gz", 1);
    assert_eq!(refused["reason"], "mismatch", "{refused}");
}

#[test]
fn sign_refuses_what_a_manifest_cannot_say() {
    let env = Env::new();
    for (version, arch) in [("two", "x86_64"), ("0.2.0", "x86 64"), ("0.2.0", "")] {
        let (_, stderr) = env.sign("release.key", version, &["--arch", arch], 2);
        assert!(stderr.contains("bridgectl: error:"), "{stderr}");
    }
    // A public key cannot sign.
    env.sign("release.key.pub", "0.2.0", &[], 2);
    assert!(!env.path("bridge-daemon.manifest").exists());
}

/// GET `path` from the platform's download side (no client certificate); `(status, body)`.
fn download(serve: &Platform, path: &str) -> (String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("https://{}{path}", serve.listen_addr()))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {:?}", out);
    let mut body = out.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[split + 1..]).to_string();
    body.truncate(split);
    (code, body)
}

#[test]
fn the_served_manifest_describes_the_served_binary_and_verifies() {
    let env = Env::new();
    let state = env.path("state");
    let arch = std::env::consts::ARCH;
    let binary_spec = format!("{arch}={}", env.path("bridge-daemon").display());
    let serve = Platform::builder(&state)
        .args(&[
            "--agent-binary",
            &binary_spec,
            "--release-key",
            env.path("release.key").to_str().unwrap(),
        ])
        .start();
    assert_eq!(serve.info["release_key"], env.public_key("release.key"));
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("bridge-daemon-linux-{arch}");
    let (code, served) = download(&serve, &format!("/downloads/{name}"));
    assert_eq!(code, "200");
    assert_eq!(served, binary());
    for path in [
        format!("/downloads/{name}.manifest"),
        format!("/downloads/{version}/{name}.manifest"),
    ] {
        let (code, manifest) = download(&serve, &path);
        assert_eq!(code, "200", "{path}");
        fs::write(env.path("served.manifest"), &manifest).unwrap();
        let valid = env.verify("served.manifest", "release.key", 0);
        assert_eq!(valid["version"], version);
        assert_eq!(valid["os"], "linux");
        assert_eq!(valid["arch"], arch);
        assert_eq!(valid["sha256"], sha256_hex(&binary()));
    }
    // The detached signature is gone; a platform without a release key serves no manifest.
    assert_eq!(download(&serve, &format!("/downloads/{name}.sig")).0, "404");
    drop(serve);
    let unsigned = Platform::builder(&env.path("state2"))
        .args(&["--agent-binary", &binary_spec])
        .start();
    assert_eq!(
        download(&unsigned, &format!("/downloads/{name}.manifest")).0,
        "404"
    );
}
