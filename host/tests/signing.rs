//! Signed handlers through the real binary: the example handlers are signed with fresh keys and
//! run; every refusal reason is produced from real, tampered modules; the signed claims bound
//! what a run gets. Nothing of a refused module is compiled.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bridge_signing::{
    sign, sign_detached, Capabilities, Claims, DirGrant, KeyPair, SIGNATURE_SECTION_NAME,
};
use bridge_testkit::bins::wasm;
use bridge_testkit::call::{call, Called};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(name: &str) -> Claims {
    Claims::new(name, "1.0.0", now())
}

struct Fixture {
    dir: tempfile::TempDir,
    key: KeyPair,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            key: KeyPair::generate().unwrap(),
        }
    }

    fn pubkey(&self) -> String {
        self.key.public_key().to_string()
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Signs example `name` with `claims` and writes `<file>.wasm`.
    fn signed(&self, example: &str, claims: &Claims, file: &str) -> (PathBuf, Vec<u8>) {
        let module = std::fs::read(wasm(example)).unwrap();
        let signed = sign(&module, &self.key, claims).unwrap().module;
        (self.write(&format!("{file}.wasm"), &signed), signed)
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `call` with this fixture's key trusted and its own disk cache.
    fn call(&self, module: &Path, extra: &[&str]) -> Called {
        let cache = self.cache();
        let key = self.pubkey();
        let mut args = vec![
            "--trusted-key",
            &key,
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        call(module, &args)
    }

    /// Compiled artifacts in this fixture's cache.
    fn artifacts(&self) -> usize {
        let Ok(dirs) = std::fs::read_dir(self.cache()) else {
            return 0;
        };
        dirs.filter_map(|d| d.ok())
            .filter(|d| d.path().is_dir())
            .map(|d| std::fs::read_dir(d.path()).unwrap().count())
            .sum()
    }
}

fn assert_rejected(c: &Called, reason: &str) {
    assert_eq!(c.code, 1, "{}", c.stderr);
    assert_eq!(c.status(), "rejected", "{}", c.result);
    assert_eq!(c.result["reason"], reason, "{}", c.result);
    assert!(c.result["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        c.result["fuel_consumed"].is_null(),
        "a rejected module must not run"
    );
}

/// Offsets of the sections of a wasm module: (id, start of contents, end).
fn sections(module: &[u8]) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos < module.len() {
        let id = module[pos];
        pos += 1;
        let (mut size, mut shift) = (0usize, 0);
        loop {
            let b = module[pos];
            pos += 1;
            size |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        out.push((id, pos, pos + size));
        pos += size;
    }
    out
}

fn leb(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A custom section named `bridge.signature` holding `payload`.
fn signature_section(payload: &[u8]) -> Vec<u8> {
    let name = SIGNATURE_SECTION_NAME.as_bytes();
    let mut contents = leb(name.len());
    contents.extend_from_slice(name);
    contents.extend_from_slice(payload);
    let mut section = vec![0u8];
    section.extend(leb(contents.len()));
    section.extend(contents);
    section
}

#[test]
fn a_signed_example_runs_and_the_flow_needs_no_override() {
    let f = Fixture::new();
    let (path, _) = f.signed("hello", &claims("hello"), "hello.signed");
    let c = f.call(&path, &["--input", r#"{"name":"signed"}"#]);
    assert_eq!(c.status(), "ok", "{} {}", c.result, c.stderr);
    assert_eq!(c.result["output"]["greeting"], "Hello, signed!");
    assert!(!c.stderr.contains("UNSIGNED"));
}

#[test]
fn unsigned_modules_are_refused_by_default_and_never_compiled() {
    let f = Fixture::new();
    let c = f.call(&wasm("hello"), &[]);
    assert_rejected(&c, "unsigned");
    assert_eq!(f.artifacts(), 0, "a refused module was compiled");
    // The development override runs it, loudly.
    let c = f.call(&wasm("hello"), &["--allow-unsigned"]);
    assert_eq!(c.status(), "ok");
    assert!(c.stderr.contains("UNSIGNED"), "{}", c.stderr);
}

#[test]
fn one_flipped_byte_anywhere_breaks_the_signature() {
    let f = Fixture::new();
    let (_, signed) = f.signed("hello", &claims("hello"), "hello");
    let secs = sections(&signed);
    let (_, code_start, code_end) = *secs.iter().find(|s| s.0 == 10).expect("a code section");
    let (_, sig_start, sig_end) = *secs.last().unwrap();
    let payload = sig_start + 1 + SIGNATURE_SECTION_NAME.len();
    assert_eq!(&signed[payload..payload + 4], b"BRSG");
    let claims_at = payload + 26;
    let cases = [
        ("code", (code_start + code_end) / 2),
        ("claims", claims_at + 5),
        ("signature", sig_end - 1),
    ];
    for (what, offset) in cases {
        let mut bad = signed.clone();
        bad[offset] ^= 0x01;
        let path = f.write(&format!("flipped-{what}.wasm"), &bad);
        // Even the development override does not run a module whose signature is bad.
        let c = f.call(&path, &["--allow-unsigned"]);
        assert_rejected(&c, "bad_signature");
    }
    assert_eq!(f.artifacts(), 0, "a refused module was compiled");
}

#[test]
fn unknown_and_revoked_keys_are_refused() {
    let f = Fixture::new();
    let stranger = KeyPair::generate().unwrap();
    let module = std::fs::read(wasm("hello")).unwrap();
    let by_stranger = f.write(
        "stranger.wasm",
        &sign(&module, &stranger, &claims("hello")).unwrap().module,
    );
    assert_rejected(&f.call(&by_stranger, &[]), "unknown_key");

    let (path, _) = f.signed("hello", &claims("hello"), "hello");
    let config = f.write(
        "revoked.toml",
        format!(
            "[trust]\nkeys = [{{ key = \"{}\" }}]\nrevoked = [\"{}\"]\n",
            f.pubkey(),
            f.key.key_id()
        )
        .as_bytes(),
    );
    let c = call(&path, &["--config", config.to_str().unwrap()]);
    assert_rejected(&c, "revoked_key");
}

#[test]
fn expired_and_not_yet_valid_claims_are_refused() {
    let f = Fixture::new();
    let mut expired = claims("hello");
    expired.issued_at = now() - 7200;
    expired.not_after = Some(now() - 3600);
    let (path, _) = f.signed("hello", &expired, "expired");
    assert_rejected(&f.call(&path, &[]), "expired");

    let mut future = claims("hello");
    future.issued_at = now() + 3600;
    let (path, _) = f.signed("hello", &future, "future");
    assert_rejected(&f.call(&path, &[]), "not_yet_valid");

    // Within the clock-skew allowance, and with an expiry still ahead: fine.
    let mut fine = claims("hello");
    fine.issued_at = now() + 60;
    fine.not_after = Some(now() + 3600);
    let (path, _) = f.signed("hello", &fine, "fine");
    assert_eq!(f.call(&path, &[]).status(), "ok");
}

#[test]
fn a_key_used_outside_its_scope_is_refused() {
    let f = Fixture::new();
    let (path, _) = f.signed("hello", &claims("hello"), "hello");
    let scoped = f.write(
        "scoped.toml",
        format!(
            "[trust]\nkeys = [{{ key = \"{}\", names = [\"check*\"] }}]\n",
            f.pubkey()
        )
        .as_bytes(),
    );
    let c = call(&path, &["--config", scoped.to_str().unwrap()]);
    assert_rejected(&c, "out_of_scope");

    let mut greedy = claims("hello");
    greedy.capabilities.fuel = Some(10_000_000_000);
    let (path, _) = f.signed("hello", &greedy, "greedy");
    let capped = f.write(
        "capped.toml",
        format!(
            "[trust]\nkeys = [{{ key = \"{}\", max = {{ fuel = 1000000 }} }}]\n",
            f.pubkey()
        )
        .as_bytes(),
    );
    let c = call(&path, &["--config", capped.to_str().unwrap()]);
    assert_rejected(&c, "out_of_scope");
    assert!(
        c.result["error"].as_str().unwrap().contains("fuel"),
        "{}",
        c.result
    );
}

#[test]
fn truncated_and_duplicated_signature_sections_are_malformed() {
    let f = Fixture::new();
    let (_, signed) = f.signed("hello", &claims("hello"), "hello");
    let (_, sig_start, sig_end) = *sections(&signed).last().unwrap();
    let payload_at = sig_start + 1 + SIGNATURE_SECTION_NAME.len();
    let payload = &signed[payload_at..sig_end];
    let header_at = {
        // The section starts with its id byte, then the LEB128 size that ends at `sig_start`.
        let mut p = sig_start - 1;
        while signed[p - 1] & 0x80 != 0 {
            p -= 1;
        }
        p - 1
    };
    let unsigned = &signed[..header_at];

    let truncated = [unsigned, &signature_section(&payload[..payload.len() - 10])].concat();
    assert_rejected(
        &f.call(&f.write("truncated.wasm", &truncated), &[]),
        "malformed_signature",
    );

    let duplicated = [&signed[..], &signed[header_at..]].concat();
    assert_rejected(
        &f.call(&f.write("duplicated.wasm", &duplicated), &[]),
        "malformed_signature",
    );
    assert_eq!(f.artifacts(), 0);
}

#[test]
fn detached_signatures_verify_only_their_module() {
    let f = Fixture::new();
    let hello = std::fs::read(wasm("hello")).unwrap();
    let sig = sign_detached(&hello, &f.key, &claims("hello")).unwrap();
    let sig_path = f.write("hello.wasm.sig", &sig.envelope);
    let hello_path = f.write("hello.wasm", &hello);
    let c = f.call(
        &hello_path,
        &[
            "--signature",
            sig_path.to_str().unwrap(),
            "--input",
            r#"{"name":"detached"}"#,
        ],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(c.result["output"]["greeting"], "Hello, detached!");

    let checksum = f.write("checksum.wasm", &std::fs::read(wasm("checksum")).unwrap());
    let c = f.call(&checksum, &["--signature", sig_path.to_str().unwrap()]);
    assert_rejected(&c, "bad_signature");
}

#[test]
fn the_config_can_forbid_the_unsigned_override() {
    let f = Fixture::new();
    let config = f.write("strict.toml", b"[trust]\nallow_unsigned_override = false\n");
    let c = call(
        &wasm("hello"),
        &["--config", config.to_str().unwrap(), "--allow-unsigned"],
    );
    assert_eq!(c.code, 2);
    assert!(c.stderr.contains("allow_unsigned_override"), "{}", c.stderr);
}

#[test]
fn a_config_file_forbids_the_unsigned_override_unless_it_allows_it() {
    let f = Fixture::new();
    // A production config that says nothing about it: the flag is refused.
    let silent = f.write("agent.toml", b"[sandbox]\nmax_concurrent_runs = 4\n");
    let c = call(
        &wasm("hello"),
        &["--config", silent.to_str().unwrap(), "--allow-unsigned"],
    );
    assert_eq!(c.code, 2, "{} {}", c.result, c.stderr);
    assert!(c.stderr.contains("allow_unsigned_override"), "{}", c.stderr);
    assert!(c.stderr.contains(silent.to_str().unwrap()), "{}", c.stderr);
    // A development config that turns it on.
    let dev = f.write("dev.toml", b"[trust]\nallow_unsigned_override = true\n");
    let c = call(
        &wasm("hello"),
        &["--config", dev.to_str().unwrap(), "--allow-unsigned"],
    );
    assert_eq!(c.status(), "ok", "{}", c.stderr);
}

#[test]
fn signed_claims_bound_limits_env_and_directories() {
    let f = Fixture::new();
    // Fuel: the claims' 5M bounds the run even though the task asks for far more.
    let mut spin = claims("spin");
    spin.capabilities.fuel = Some(5_000_000);
    let (path, _) = f.signed("spin", &spin, "spin");
    let c = f.call(&path, &["--fuel", "1000000000"]);
    assert_eq!(c.status(), "fuel_exhausted", "{}", c.result);
    assert_eq!(c.result["limits"]["fuel"], 5_000_000);
    assert_eq!(c.result["limits"]["clamped"], serde_json::json!(["fuel"]));
    // Silent task: the claims' declaration is what the run gets.
    let c = f.call(&path, &[]);
    assert_eq!(c.result["limits"]["fuel"], 5_000_000);

    // Environment: only declared names reach the guest.
    let mut envargs = claims("envargs");
    envargs.capabilities.env = Some(vec!["GREETING".into()]);
    let (path, _) = f.signed("envargs", &envargs, "envargs");
    let c = f.call(&path, &["--env", "GREETING=hi", "--env", "SECRET=x"]);
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(
        c.result["output"]["env"],
        serde_json::json!({"GREETING": "hi"})
    );
    assert_eq!(c.result["output"]["args"][0], "envargs");
    assert!(c.result["limits"]["clamped"]
        .as_array()
        .unwrap()
        .contains(&"env:SECRET".into()));

    // Directories: declared read-only stays read-only; undeclared ones are not granted.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("a.txt"), "abc").unwrap();
    let caps = Capabilities {
        dirs: Some(vec![DirGrant {
            path: "/data".into(),
            write: false,
        }]),
        ..Default::default()
    };
    let mut checksum = claims("checksum");
    checksum.capabilities = caps;
    let (path, _) = f.signed("checksum", &checksum, "checksum");
    let rw = format!("{}:/data:rw", data.path().display());
    let other = format!("{}:/other", data.path().display());
    let c = f.call(
        &path,
        &[
            "--dir",
            &rw,
            "--dir",
            &other,
            "--input",
            r#"{"dir":"/data"}"#,
        ],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(c.result["output"]["files"][0]["path"], "a.txt");
    let clamped = c.result["limits"]["clamped"].as_array().unwrap();
    assert!(
        clamped.contains(&"dir:/data:write".into()) && clamped.contains(&"dir:/other".into()),
        "{clamped:?}"
    );
}
