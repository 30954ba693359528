//! The disk cache of compiled modules: reused when intact, and a corrupted, swapped, foreign or
//! planted entry is discarded and recompiled — never executed. A cache directory someone else
//! could write is not used at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bridge_testkit::bins::{daemon, wasm};
use bridge_testkit::call::{call, output, Called};

fn cached(cache: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(cache).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            for f in std::fs::read_dir(&dir).unwrap() {
                files.push(f.unwrap().path());
            }
        }
    }
    files.sort();
    files
}

fn run(module: &Path, cache: &Path) -> Called {
    call(
        module,
        &[
            "--allow-unsigned",
            "-vv",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--input",
            r#"{"name":"cache"}"#,
        ],
    )
}

#[test]
fn artifacts_are_private_reused_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let hello = wasm("hello");

    let first = run(&hello, &cache);
    assert_eq!(first.status(), "ok", "{}", first.stderr);
    assert!(first.stderr.contains("compiled module"), "{}", first.stderr);
    let files = cached(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    let entry = &files[0];
    assert_eq!(
        entry.file_name().unwrap().to_str().unwrap(),
        format!("{}.cwasm", first.result["file_sha256"].as_str().unwrap())
    );
    assert_eq!(
        std::fs::metadata(entry).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(entry.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // The key is beside the cache, never in it.
    assert_eq!(
        std::fs::metadata(tmp.path().join("cache.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let in_root: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        in_root,
        [entry.parent().unwrap()],
        "only the fingerprint directory"
    );

    let second = run(&hello, &cache);
    assert_eq!(second.status(), "ok");
    assert!(
        second.stderr.contains("loaded module from the disk cache"),
        "{}",
        second.stderr
    );
    assert!(
        !second.stderr.contains("compiled module"),
        "{}",
        second.stderr
    );
}

#[test]
fn a_corrupted_entry_is_recompiled_not_executed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let hello = wasm("hello");
    assert_eq!(run(&hello, &cache).status(), "ok");
    let entry = cached(&cache).pop().unwrap();
    let good = std::fs::read(&entry).unwrap();

    // One flipped bit in the machine code, a truncated file, and an empty file.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    for bad in [flipped, good[..good.len() / 3].to_vec(), Vec::new()] {
        std::fs::write(&entry, &bad).unwrap();
        let c = run(&hello, &cache);
        assert_eq!(c.status(), "ok", "{}", c.stderr);
        assert_eq!(c.result["output"]["greeting"], "Hello, cache!");
        assert!(
            c.stderr.contains("discarding module cache entry"),
            "{}",
            c.stderr
        );
        assert!(c.stderr.contains("compiled module"), "{}", c.stderr);
        // The entry was rewritten whole and verifies again.
        assert_eq!(
            std::fs::read(&entry).unwrap(),
            good,
            "recompiled artifact differs"
        );
    }
}

#[test]
fn another_modules_artifact_under_this_hash_is_not_executed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (hello, trap) = (wasm("hello"), wasm("trap"));
    let h = run(&hello, &cache);
    let t = run(&trap, &cache);
    assert_eq!(t.status(), "trap");
    let dir = cached(&cache)[0].parent().unwrap().to_path_buf();
    let hello_entry = dir.join(format!(
        "{}.cwasm",
        h.result["file_sha256"].as_str().unwrap()
    ));
    let trap_entry = dir.join(format!(
        "{}.cwasm",
        t.result["file_sha256"].as_str().unwrap()
    ));
    std::fs::copy(&trap_entry, &hello_entry).unwrap();

    let c = run(&hello, &cache);
    assert_eq!(c.status(), "ok", "the swapped artifact ran: {}", c.result);
    assert_eq!(c.result["output"]["greeting"], "Hello, cache!");
    assert!(
        c.stderr.contains("discarding module cache entry"),
        "{}",
        c.stderr
    );
}

#[test]
fn an_entry_from_another_agents_cache_is_foreign() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    let hello = wasm("hello");
    assert_eq!(run(&hello, &ours).status(), "ok");
    assert_eq!(run(&hello, &theirs).status(), "ok");
    // Same engine, same module, different cache key: their file fails our tag check.
    let their_entry = cached(&theirs).pop().unwrap();
    let our_entry = cached(&ours).pop().unwrap();
    assert_eq!(their_entry.file_name(), our_entry.file_name());
    std::fs::copy(&their_entry, &our_entry).unwrap();
    let c = run(&hello, &ours);
    assert_eq!(c.status(), "ok");
    assert!(c.stderr.contains("BadTag"), "{}", c.stderr);
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn chown(path: &Path, uid: u32) {
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {}", path.display());
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `hello`, signed by a fresh publisher key: (module path, `--trusted-key` value).
fn signed_hello(dir: &Path) -> (PathBuf, String) {
    let publisher = bridge_testkit::Publisher::new();
    let path = dir.join("hello.signed.wasm");
    std::fs::write(&path, publisher.signed("hello")).unwrap();
    (path, publisher.public())
}

/// What someone who can write a cache directory does: compile another module (`trap`) with a
/// cache of their own, re-tag its artifact as the entry of the module hashing to `victim_sha`
/// under a key of their own, and plant that key wherever an agent might look for it.
fn plant_forged_entry(cache: &Path, victim_sha: &str, scratch: &Path) {
    let own = scratch.join("attacker-cache");
    assert_eq!(run(&wasm("trap"), &own).status(), "trap");
    let entry = cached(&own).pop().unwrap();
    let bytes = std::fs::read(&entry).unwrap();
    // tag (32) | magic (8) | engine fingerprint (32) | module sha256 (32) | artifact
    let mut signed = bytes[32..].to_vec();
    signed[40..72].copy_from_slice(&hex::decode(victim_sha).unwrap());
    let key = [0x42u8; 32];
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        &signed,
    );
    let fingerprint_dir = cache.join(entry.parent().unwrap().file_name().unwrap());
    std::fs::create_dir_all(&fingerprint_dir).unwrap();
    std::fs::write(cache.join("cache.key"), key).unwrap();
    std::fs::write(cache.with_extension("key"), key).unwrap();
    std::fs::write(
        fingerprint_dir.join(format!("{victim_sha}.cwasm")),
        [tag.as_ref(), &signed].concat(),
    )
    .unwrap();
}

#[test]
fn a_forged_entry_in_a_cache_others_can_write_never_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (hello, publisher) = signed_hello(tmp.path());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(&hello).unwrap(),
    ));
    let cache = tmp.path().join("shared-cache");
    plant_forged_entry(&cache, &sha, tmp.path());
    // The attacker owns what they made (as root, the test can make that so); otherwise they
    // could write it because it is world-writable.
    if euid() == 0 {
        chown(&cache, 65534);
        chown(&cache.with_extension("key"), 65534);
    } else {
        chmod(&cache, 0o777);
        chmod(&cache.with_extension("key"), 0o666);
    }

    let c = call(
        &hello,
        &[
            "--trusted-key",
            &publisher,
            "-v",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--input",
            r#"{"name":"cache"}"#,
        ],
    );
    assert_eq!(
        c.status(),
        "ok",
        "the forged artifact ran: {} {}",
        c.result,
        c.stderr
    );
    assert_eq!(c.result["output"]["greeting"], "Hello, cache!");
    assert!(
        c.stderr.contains("module disk cache disabled"),
        "{}",
        c.stderr
    );
}

/// Runs `hello` with `cache`, expecting the disk cache to be refused for `why`.
fn refused(cache: &Path, why: &str) {
    let c = output(
        daemon()
            .arg("call")
            .arg(wasm("hello"))
            .args([
                "--allow-unsigned",
                "--input",
                r#"{"name":"cache"}"#,
                "--cache-dir",
            ])
            .arg(cache)
            .env("RUST_LOG", "bridge_host=debug")
            .output()
            .unwrap(),
    );
    assert_eq!(c.status(), "ok", "{}", c.stderr);
    assert_eq!(c.result["output"]["greeting"], "Hello, cache!");
    assert!(
        c.stderr.contains("module disk cache disabled") && c.stderr.contains(why),
        "expected the cache to be refused ({why}): {}",
        c.stderr
    );
    assert!(
        !c.stderr.contains("loaded module from the disk cache"),
        "{}",
        c.stderr
    );
}

#[test]
fn a_cache_others_can_write_or_that_is_a_link_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");

    // Group-writable: refused, and nothing is written into it.
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o770);
    refused(&cache, "writable by group or others");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    assert!(!tmp.path().join("cache.key").exists());

    // Ours but readable by others: tightened to 0700 and used.
    chmod(&cache, 0o755);
    assert_eq!(run(&wasm("hello"), &cache).status(), "ok");
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let entry = cached(&cache).pop().expect("the cache was used");

    // A fingerprint directory others can write, a key others can read.
    let fingerprint_dir = entry.parent().unwrap().to_path_buf();
    chmod(&fingerprint_dir, 0o777);
    refused(&cache, "writable by group or others");
    chmod(&fingerprint_dir, 0o700);
    let key = tmp.path().join("cache.key");
    chmod(&key, 0o644);
    refused(&cache, "accessible to group or others");
    chmod(&key, 0o600);
    assert!(run(&wasm("hello"), &cache)
        .stderr
        .contains("loaded module from the disk cache"));

    // A symbolic link as the cache directory, or as the key.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&cache, &link).unwrap();
    refused(&link, "symbolic link");
    std::fs::rename(&key, tmp.path().join("real.key")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("real.key"), &key).unwrap();
    refused(&cache, "symbolic link");
    std::fs::remove_file(&key).unwrap();
    std::fs::rename(tmp.path().join("real.key"), &key).unwrap();

    // Owned by another user: needs root to set up (CI runs as root).
    if euid() == 0 {
        chown(&key, 65534);
        refused(&cache, "owned by uid 65534");
        chown(&key, 0);
        chown(&fingerprint_dir, 65534);
        refused(&cache, "owned by uid 65534");
        chown(&cache, 65534);
        refused(&cache, "owned by uid 65534");
        eprintln!("foreign-owner cases: ran (as root)");
    } else {
        eprintln!("foreign-owner cases: skipped (chown needs root)");
    }
}

#[test]
fn as_root_no_cache_location_is_taken_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let (xdg, home) = (tmp.path().join("xdg"), tmp.path().join("home"));
    std::fs::create_dir(&xdg).unwrap();
    std::fs::create_dir(&home).unwrap();
    let c = output(
        daemon()
            .arg("call")
            .arg(wasm("hello"))
            .args(["--allow-unsigned", "-vv"])
            .env("XDG_CACHE_HOME", &xdg)
            .env("HOME", &home)
            .output()
            .unwrap(),
    );
    assert_eq!(c.status(), "ok", "{}", c.stderr);
    let used = xdg.join("bridge-daemon").exists() || home.join(".cache").exists();
    if euid() == 0 {
        assert!(!used, "as root, the cache went where the environment said");
        assert!(
            c.stderr.contains("running as root: no disk cache"),
            "{}",
            c.stderr
        );
        eprintln!("ran as root: no cache from XDG_CACHE_HOME/HOME");
    } else {
        assert!(xdg.join("bridge-daemon").is_dir(), "{}", c.stderr);
        eprintln!("ran as uid {}: the XDG default is used", euid());
    }
}
