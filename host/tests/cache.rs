//! The disk cache of compiled modules: reused when intact, and a corrupted, swapped or foreign
//! entry is discarded and recompiled — never executed.

mod common;

use std::path::{Path, PathBuf};

use common::{call, wasm};

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

fn run(module: &Path, cache: &Path) -> common::Called {
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
    use std::os::unix::fs::PermissionsExt;
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
        format!("{}.cwasm", first.result["module_sha256"].as_str().unwrap())
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
    assert_eq!(
        std::fs::metadata(cache.join("cache.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
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
        h.result["module_sha256"].as_str().unwrap()
    ));
    let trap_entry = dir.join(format!(
        "{}.cwasm",
        t.result["module_sha256"].as_str().unwrap()
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
