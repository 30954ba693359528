//! Runs the real `bridgectl` binary on a small module built inline.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;

use common::Workdir;

/// One type `() -> ()`, one function with body `end`.
const MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02,
    0x01, 0x00, 0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b,
];
/// Offset of the `end` opcode of the function body.
const END_OPCODE: usize = 23;
fn file_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

const MODULE_SHA256: &str = "aaceec3bbac74451e6dcefcead4220538e643fcb1df8009a7c5c3a5afffc5495";

/// A [`Workdir`] with the module `hello.wasm`.
fn env() -> Workdir {
    let env = Workdir::new();
    fs::write(env.path("hello.wasm"), MODULE).unwrap();
    env
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_writes_0600_private_key_and_public_key_file() {
    let env = env();
    let out = env.keygen("release.key");
    assert_eq!(out["private_key"], "release.key");
    assert_eq!(out["public_key_file"], "release.key.pub");
    let public = out["public_key"].as_str().unwrap();
    assert!(
        public.starts_with("ed25519:") && public.len() == 51,
        "{public}"
    );
    let key_id = out["key_id"].as_str().unwrap();
    assert_eq!(key_id.len(), 32);
    assert!(key_id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    assert_eq!(mode(&env.path("release.key")), 0o600);
    assert_eq!(mode(&env.path("release.key.pub")), 0o644);
    let pem = fs::read_to_string(env.path("release.key")).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));
    assert_eq!(
        fs::read_to_string(env.path("release.key.pub")).unwrap(),
        format!("{public}\n")
    );

    // No overwrite without --force, and nothing changed.
    let (_, stderr) = env.run_code(&["keygen", "--out", "release.key"], 2);
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    assert_eq!(fs::read_to_string(env.path("release.key")).unwrap(), pem);
    // Only the .pub existing also blocks.
    fs::write(env.path("other.pub"), "x").unwrap();
    env.run_code(&["keygen", "--out", "other"], 2);
    assert!(!env.path("other").exists());

    // --force replaces, and a widened old file comes back 0600.
    fs::set_permissions(env.path("release.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let again = env.ok(&["keygen", "--out", "release.key", "--force"]);
    assert_ne!(again["public_key"], out["public_key"]);
    assert_eq!(mode(&env.path("release.key")), 0o600);
}

#[test]
fn sign_then_verify() {
    let env = env();
    let key = env.keygen("k");
    let out = env.ok(&[
        "sign",
        "hello.wasm",
        "--key",
        "k",
        "--name",
        "hello",
        "--version",
        "1.2.3",
        "--fuel",
        "1000",
        "--memory-mib",
        "2",
        "--timeout-ms",
        "500",
        "--output-bytes",
        "4096",
        "--env",
        "TZ",
        "--env",
        "LANG",
        "--dir",
        "/data",
        "--dir",
        "/scratch:rw",
        "--not-after",
        "2999-01-01T00:00:00Z",
    ]);
    assert_eq!(out["output"], "hello.signed.wasm");
    assert_eq!(out["detached"], false);
    assert_eq!(out["key_id"], key["key_id"]);
    // The code hash is what the signature covers; the file hash is of the file written, what a
    // platform uploads and names in `run`.
    assert_eq!(out["code_sha256"], MODULE_SHA256);
    assert!(out.get("module_sha256").is_none(), "{out}");
    let claims = &out["claims"];
    assert_eq!(claims["name"], "hello");
    assert_eq!(claims["version"], "1.2.3");
    assert_eq!(claims["not_after"], 32_472_144_000u64);
    assert_eq!(claims["capabilities"]["memory_bytes"], 2 << 20);
    assert_eq!(
        claims["capabilities"]["env"],
        serde_json::json!(["TZ", "LANG"])
    );
    assert_eq!(
        claims["capabilities"]["dirs"],
        serde_json::json!([{"path": "/data", "write": false}, {"path": "/scratch", "write": true}])
    );
    let signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    assert_eq!(&signed[..MODULE.len()], MODULE);
    assert_eq!(out["file_sha256"], file_sha256(&signed));
    assert_ne!(out["file_sha256"], out["code_sha256"]);
    assert_eq!(
        fs::read(env.path("hello.wasm")).unwrap(),
        MODULE,
        "input untouched"
    );

    let v = env.ok(&["verify", "hello.signed.wasm", "--trusted-key", "@k.pub"]);
    assert_eq!(v["valid"], true);
    assert_eq!(v["key_id"], key["key_id"]);
    assert_eq!(v["code_sha256"], MODULE_SHA256);
    assert_eq!(v["file_sha256"], file_sha256(&signed));
    assert_eq!(v["claims"], *claims);
    assert_eq!(v["source"], "embedded");
    // The key given inline works too.
    env.ok(&[
        "verify",
        "hello.signed.wasm",
        "--trusted-key",
        key["public_key"].as_str().unwrap(),
    ]);
    // After not_after: expired.
    let (v, _) = env.run_code(
        &[
            "verify",
            "hello.signed.wasm",
            "--trusted-key",
            "@k.pub",
            "--now",
            "3000-01-01T00:00:00Z",
        ],
        1,
    );
    assert_eq!(v["reason"], "expired");
}

#[test]
fn verify_rejections() {
    let env = env();
    let key = env.keygen("k");
    env.keygen("other");
    env.ok(&["sign", "hello.wasm", "-k", "k", "--name", "hello"]);
    let reject = |args: &[&str], reason: &str| -> Value {
        let (v, _) = env.run_code(args, 1);
        assert_eq!(v["valid"], false);
        assert_eq!(v["reason"], reason, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        v
    };

    // Tampered code.
    let mut signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    signed[END_OPCODE] = 0x01;
    fs::write(env.path("tampered.wasm"), &signed).unwrap();
    let v = reject(
        &["verify", "tampered.wasm", "--trusted-key", "@k.pub"],
        "bad_signature",
    );
    assert_eq!(v["key_id"], key["key_id"]);

    reject(
        &["verify", "hello.wasm", "--trusted-key", "@k.pub"],
        "unsigned",
    );
    reject(
        &["verify", "hello.signed.wasm", "--trusted-key", "@other.pub"],
        "unknown_key",
    );
    let v = reject(
        &[
            "verify",
            "hello.signed.wasm",
            "--trusted-key",
            "@k.pub",
            "--revoked",
            key["key_id"].as_str().unwrap(),
        ],
        "revoked_key",
    );
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains(key["key_id"].as_str().unwrap()));

    // Truncated: not a signature problem but an invalid module.
    let signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    fs::write(env.path("cut.wasm"), &signed[..signed.len() - 3]).unwrap();
    reject(
        &["verify", "cut.wasm", "--trusted-key", "@k.pub"],
        "invalid_module",
    );

    // Out of scope, through a policy file like the agent's.
    let pubkey = key["public_key"].as_str().unwrap();
    fs::write(
        env.path("policy.toml"),
        format!("[[keys]]\nkey = \"{pubkey}\"\nnames = [\"log*\"]\n"),
    )
    .unwrap();
    let v = reject(
        &["verify", "hello.signed.wasm", "--policy", "policy.toml"],
        "out_of_scope",
    );
    assert!(v["message"].as_str().unwrap().contains("hello"));
    fs::write(
        env.path("policy.toml"),
        format!("[[keys]]\nkey = \"{pubkey}\"\nnames = [\"hel*\"]\n"),
    )
    .unwrap();
    env.ok(&["verify", "hello.signed.wasm", "--policy", "policy.toml"]);

    // Not yet valid: signed for the far future.
    env.ok(&[
        "sign",
        "hello.wasm",
        "-k",
        "k",
        "--name",
        "hello",
        "--issued-at",
        "2999-01-01T00:00:00Z",
        "-o",
        "future.wasm",
    ]);
    reject(
        &["verify", "future.wasm", "--trusted-key", "@k.pub"],
        "not_yet_valid",
    );

    // Usage and I/O errors: exit 2, one line on stderr, nothing on stdout.
    for args in [
        &["verify", "hello.signed.wasm"][..],
        &["verify", "missing.wasm", "--trusted-key", "@k.pub"],
        &[
            "verify",
            "hello.signed.wasm",
            "--trusted-key",
            "ed25519:nope",
        ],
        &[
            "verify",
            "hello.signed.wasm",
            "--trusted-key",
            "@missing.pub",
        ],
        &["verify", "hello.signed.wasm", "--policy", "missing.toml"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        if args.len() > 2 {
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.starts_with("bridgectl: error: "), "{stderr}");
        }
    }
}

#[test]
fn inspect_trusts_nothing() {
    let env = env();
    let key = env.keygen("k");
    let i = env.ok(&["inspect", "hello.wasm"]);
    assert_eq!(i["signed"], false);
    assert_eq!(i["code_sha256"], MODULE_SHA256);
    assert_eq!(
        i["file_sha256"], MODULE_SHA256,
        "unsigned: the file is the code"
    );
    assert_eq!(i["embedded_signatures"], 0);

    env.ok(&["sign", "hello.wasm", "-k", "k", "--name", "hello"]);
    let i = env.ok(&["inspect", "hello.signed.wasm"]);
    assert_eq!(i["signed"], true);
    assert_eq!(i["source"], "embedded");
    assert_eq!(i["key_id"], key["key_id"]);
    assert_eq!(i["claims"]["name"], "hello");
    assert_eq!(i["code_sha256"], MODULE_SHA256);
    assert_eq!(
        i["file_sha256"],
        file_sha256(&fs::read(env.path("hello.signed.wasm")).unwrap())
    );
    assert_eq!(i["stripped_len"], MODULE.len());
    assert_eq!(i["problem"], Value::Null);

    // A tampered module still inspects (inspect does not check the signature).
    let mut signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    signed[END_OPCODE] = 0x01;
    fs::write(env.path("tampered.wasm"), &signed).unwrap();
    let i = env.ok(&["inspect", "tampered.wasm"]);
    assert_eq!(i["key_id"], key["key_id"]);
    assert_ne!(i["code_sha256"], MODULE_SHA256);

    // Not wasm: exit 2.
    fs::write(env.path("text.wasm"), "hello").unwrap();
    let (_, stderr) = env.run_code(&["inspect", "text.wasm"], 2);
    assert!(stderr.contains("invalid wasm module"), "{stderr}");
    env.run_code(&["inspect", "missing.wasm"], 2);
}

#[test]
fn resigning_replaces_the_signature() {
    let env = env();
    let a = env.keygen("a");
    let b = env.keygen("b");
    env.ok(&["sign", "hello.wasm", "-k", "a", "--name", "hello"]);
    let a_signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    // Re-sign in place with b.
    let (out, stderr) = env.run_code(
        &[
            "sign",
            "hello.signed.wasm",
            "-k",
            "b",
            "--name",
            "hello",
            "-o",
            "hello.signed.wasm",
        ],
        0,
    );
    assert!(
        stderr.contains("replacing") && stderr.contains(a["key_id"].as_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(out["replaced_key_ids"], serde_json::json!([a["key_id"]]));
    let b_signed = fs::read(env.path("hello.signed.wasm")).unwrap();
    assert_eq!(
        b_signed.len(),
        a_signed.len(),
        "one section replaced by one"
    );
    let i = env.ok(&["inspect", "hello.signed.wasm"]);
    assert_eq!(i["embedded_signatures"], 1);
    assert_eq!(i["key_id"], b["key_id"]);
    env.ok(&["verify", "hello.signed.wasm", "--trusted-key", "@b.pub"]);
    let (v, _) = env.run_code(
        &["verify", "hello.signed.wasm", "--trusted-key", "@a.pub"],
        1,
    );
    assert_eq!(v["reason"], "unknown_key");
}

#[test]
fn detached_flow() {
    let env = env();
    let key = env.keygen("k");
    let out = env.ok(&[
        "sign",
        "hello.wasm",
        "-k",
        "k",
        "--name",
        "hello",
        "--detached",
    ]);
    assert_eq!(out["output"], "hello.wasm.sig");
    assert_eq!(out["detached"], true);
    assert_eq!(
        fs::read(env.path("hello.wasm")).unwrap(),
        MODULE,
        "module untouched"
    );
    let sig = fs::read(env.path("hello.wasm.sig")).unwrap();
    assert_eq!(&sig[..6], b"BRSG\x01\x01");

    let v = env.ok(&[
        "verify",
        "hello.wasm",
        "--trusted-key",
        "@k.pub",
        "--signature",
        "hello.wasm.sig",
    ]);
    assert_eq!(v["source"], "detached");
    assert_eq!(v["key_id"], key["key_id"]);
    let i = env.ok(&["inspect", "hello.wasm", "--signature", "hello.wasm.sig"]);
    assert_eq!(i["source"], "detached");
    assert_eq!(i["key_id"], key["key_id"]);

    // The signature of another module.
    let mut other = MODULE.to_vec();
    other[END_OPCODE] = 0x01;
    fs::write(env.path("other.wasm"), &other).unwrap();
    let (v, _) = env.run_code(
        &[
            "verify",
            "other.wasm",
            "--trusted-key",
            "@k.pub",
            "--signature",
            "hello.wasm.sig",
        ],
        1,
    );
    assert_eq!(v["reason"], "bad_signature");

    // The same detached signature verifies the embedded-signed copy (the hash excludes the
    // signature section).
    env.keygen("k2");
    env.ok(&["sign", "hello.wasm", "-k", "k2", "--name", "hello"]);
    let (out, stderr) = env.run_code(
        &[
            "sign",
            "hello.signed.wasm",
            "-k",
            "k",
            "--name",
            "hello",
            "--detached",
            "-o",
            "copy.sig",
        ],
        0,
    );
    assert!(stderr.contains("embedded signature"), "{stderr}");
    assert_eq!(out["code_sha256"], MODULE_SHA256);
    // Detached: the file to upload is the module as given.
    assert_eq!(
        out["file_sha256"],
        file_sha256(&fs::read(env.path("hello.signed.wasm")).unwrap())
    );
    env.ok(&[
        "verify",
        "hello.signed.wasm",
        "--trusted-key",
        "@k.pub",
        "--signature",
        "hello.wasm.sig",
    ]);
}

#[test]
fn loose_key_permissions_warn() {
    let env = env();
    env.keygen("k");
    fs::set_permissions(env.path("k"), fs::Permissions::from_mode(0o644)).unwrap();
    let (_, stderr) = env.run_code(&["sign", "hello.wasm", "-k", "k", "--name", "hello"], 0);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn sign_errors() {
    let env = env();
    env.keygen("k");
    for (args, needle) in [
        (
            &["sign", "hello.wasm", "-k", "k", "--name", "Hello"][..],
            "name",
        ),
        (
            &[
                "sign",
                "hello.wasm",
                "-k",
                "k",
                "--name",
                "x",
                "--dir",
                "rel",
            ],
            "dir",
        ),
        (
            &["sign", "hello.wasm", "-k", "k.pub", "--name", "x"],
            "private key",
        ),
        (
            &["sign", "missing.wasm", "-k", "k", "--name", "x"],
            "missing.wasm",
        ),
        (
            &[
                "sign",
                "hello.wasm",
                "-k",
                "k",
                "--name",
                "x",
                "--not-after",
                "soon",
            ],
            "soon",
        ),
    ] {
        let out = env.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    fs::write(env.path("bad.wasm"), b"\0asm\x01\0\0\0\x01\x09").unwrap();
    env.run_code(&["sign", "bad.wasm", "-k", "k", "--name", "x"], 2);
    assert!(!env.path("bad.signed.wasm").exists());
}

#[test]
fn help_for_every_command() {
    let env = env();
    for cmd in [
        &["--help"][..],
        &["keygen", "--help"],
        &["sign", "--help"],
        &["verify", "--help"],
        &["inspect", "--help"],
        &["serve", "--help"],
        &["agents", "--help"],
        &["token", "--help"],
        &["run", "--help"],
        &["result", "--help"],
        &["cancel", "--help"],
        &["install-handler", "--help"],
        &["handlers", "--help"],
        &["remove-handler", "--help"],
    ] {
        let out = env.run(cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(!out.stdout.is_empty());
    }
    let help = String::from_utf8(env.run(&["run", "--help"]).stdout).unwrap();
    for flag in [
        "--module",
        "--command",
        "--timeout-ms",
        "--wait-ms",
        "--not-after",
        "--idempotent",
        "--stream",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
    assert!(!help.contains("--handler-timeout-ms"));
}

#[test]
fn run_takes_exactly_one_of_module_and_command() {
    let env = env();
    // Usage errors come before any connection: the control socket is never contacted.
    let control = ["--control", "/nonexistent/control.sock"];
    for (args, expected) in [
        (&["run", "--agent", "a"][..], "--module"),
        (
            &[
                "run",
                "--agent",
                "a",
                "--module",
                "hello.wasm",
                "--command",
                "c",
            ],
            "cannot be used with",
        ),
        (
            &[
                "run",
                "--agent",
                "a",
                "--command",
                "c",
                "--signature",
                "x.sig",
            ],
            "cannot be used with",
        ),
        (
            &[
                "run",
                "--agent",
                "a",
                "--command",
                "c",
                "--not-after",
                "soon",
            ],
            "--not-after",
        ),
        (
            &[
                "run",
                "--agent",
                "a",
                "--command",
                "c",
                "--handler-timeout-ms",
                "5",
            ],
            "--handler-timeout-ms",
        ),
        (&["result"], "--task-id"),
        (&["cancel", "--agent", "a"], "--task-id"),
        (&["install-handler", "--agent", "a", "hello.wasm"], "--name"),
        (&["remove-handler", "--agent", "a"], "--name"),
        (&["handlers"], "--agent"),
    ] {
        let all: Vec<&str> = control.iter().chain(args).copied().collect();
        let (_, stderr) = env.run_code(&all, 2);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A well-formed command reaches the connection step (there is no such socket).
    let all = [&control[..], &["run", "--agent", "a", "--command", "c"]].concat();
    let (_, stderr) = env.run_code(&all, 2);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}
