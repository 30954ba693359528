//! A release served as a gzip archive (manifest format 2) is checked before it is unpacked and
//! unpacked no further than the binary's size: a corrupt, truncated or oversized archive is
//! refused before anything is staged.

use super::*;

/// `bytes` gzip-compressed, as `bridgectl release sign` writes an archive.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_release_served_as_a_gzip_archive_is_checked_unpacked_and_staged_with_its_format_1_manifest() {
    let mut t = Setup::new(47, "", "");
    let bin = binary(3 << 20, 7);
    let archive = gzip(&bin);
    assert!(archive.len() < bin.len() / 10, "{} bytes", archive.len());
    let m = sign_manifest_gzip(
        &t.next,
        std::env::consts::OS,
        std::env::consts::ARCH,
        &bin,
        &archive,
        &t.key,
    )
    .unwrap();
    let (s, asked) = offer(
        &mut t.conn,
        "u-gzip",
        &m,
        json!({"drain_timeout_ms": 1000}),
        Answer::Bytes(&archive),
    );
    assert_eq!(s["state"], "staged", "{s}");
    assert_eq!(s["version"], t.next.as_str());
    // The archive is what travels, not the binary.
    assert_eq!(asked, [(0, archive.len() as u64)]);
    let staged = t.dir().join("state/update/staged");
    assert!(std::fs::read(staged.join("bridge-daemon")).unwrap() == bin);
    let mut names: Vec<String> = std::fs::read_dir(&staged)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bridge-daemon", "manifest", "request.json"]);
    // The staged manifest is the format-1 manifest of the binary, which any launcher reads.
    let v1 = std::fs::read_to_string(staged.join("manifest")).unwrap();
    assert_eq!(v1, t.manifest(&bin));
    let parsed = SignedManifest::parse(&v1).unwrap();
    assert_eq!(parsed.format(), 1);
    parsed.verify(&[t.key.public_key()]).unwrap();
    let status = t.agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}; log:\n{}", t.agent.log());
}

#[test]
fn a_corrupt_truncated_or_oversized_archive_is_refused_before_anything_is_staged() {
    let mut t = Setup::new(48, "max_binary_bytes = 2000000", "");
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    let next = t.next.clone();
    let bin = binary(500_000, 8);
    let archive = gzip(&bin);
    let sign = |binary: &[u8], archive: &[u8]| {
        sign_manifest_gzip(&next, os, arch, binary, archive, &t.key).unwrap()
    };
    let good = sign(&bin, &archive);
    let dir = t.dir.path().to_path_buf();
    let conn = &mut t.conn;
    let mut refuse = |id: &str, manifest: &str, served: &[u8], why: &str| {
        let (s, asked) = offer(conn, id, manifest, json!({}), Answer::Bytes(served));
        assert_refused(&s, "mismatch", &next);
        let detail = s["detail"].as_str().unwrap();
        assert!(detail.contains(why), "{id}: {detail}");
        nothing_staged(&dir);
        asked
    };

    // Corrupt: bytes flipped in transit; the archive's SHA-256 is checked before unpacking.
    let mut flipped = archive.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    flipped[mid + 1] ^= 0xaa;
    refuse(
        "u-corrupt",
        &good,
        &flipped,
        "the release received hashes to",
    );
    // Served one byte short of the archive.
    refuse(
        "u-short",
        &good,
        &archive[..archive.len() - 1],
        &format!("received {}", archive.len() - 1),
    );
    // Truncated: a signed manifest of an archive cut in half (its hash matches, its gzip
    // stream ends early).
    let cut = &archive[..archive.len() / 2];
    refuse("u-truncated", &sign(&bin, cut), cut, "cut short");
    // Oversized: 64 MiB of zeros in about 64 KiB, for a manifest that says 100,000 bytes (a
    // gzip bomb relative to the manifest): unpacking stops one byte past the size.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    let small = vec![0u8; 100_000];
    let asked = refuse(
        "u-bomb",
        &sign(&small, &bomb),
        &bomb,
        "unpacks to more than the manifest's 100000 bytes",
    );
    assert_eq!(asked, [(0, bomb.len() as u64)]);
    // The archive of another binary, signed as this one's.
    let other = gzip(&binary(500_000, 9));
    refuse(
        "u-other",
        &sign(&bin, &other),
        &other,
        "the unpacked binary hashes to",
    );
    t.conn.healthy(&mut t.agent);
}
