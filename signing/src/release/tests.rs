use super::*;

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&[n; 32])
}

#[test]
fn a_signed_manifest_verifies_under_its_key_and_describes_the_binary() {
    let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[0], "bridge-release 1");
    assert_eq!(lines[4], "size 6");
    let parsed = SignedManifest::parse(&text).unwrap();
    let m = parsed
        .verify(&[key(2).public_key(), key(1).public_key()])
        .unwrap();
    assert_eq!(m.version, "1.2.3");
    assert_eq!((m.os.as_str(), m.arch.as_str()), ("linux", "x86_64"));
    assert!(m.matches(b"binary"));
    assert!(!m.matches(b"binarz"));
    assert!(!m.matches(b"binar"));
    assert_eq!(parsed.text(), text);
}

#[test]
fn the_signature_covers_the_prefix_and_every_signed_line() {
    let k = key(1);
    let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &k).unwrap();
    let (signed, sig_line) = text.split_at(text.find("signature ").unwrap());
    let sig = STANDARD
        .decode(sig_line.trim_end().trim_start_matches("signature "))
        .unwrap();
    let sig: [u8; 64] = sig.try_into().unwrap();
    let mut message = b"bridge.release.v1\0".to_vec();
    message.extend_from_slice(signed.as_bytes());
    assert!(k.public_key().verify(&message, &sig));
    // A handler signature's prefix over the same lines is a different message.
    assert!(!k.public_key().verify(signed.as_bytes(), &sig));
}

#[test]
fn an_unknown_key_and_a_changed_field_are_told_apart() {
    let text = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
    let parsed = SignedManifest::parse(&text).unwrap();
    assert!(matches!(
        parsed.verify(&[key(2).public_key()]),
        Err(ReleaseError::UnknownKey(_))
    ));
    for (from, to) in [
        ("version 1.2.3", "version 9.2.3"),
        ("arch x86_64", "arch aarch64"),
        ("size 6", "size 7"),
    ] {
        let tampered = text.replace(from, to);
        let parsed = SignedManifest::parse(&tampered).unwrap();
        assert_eq!(
            parsed.verify(&[key(1).public_key()]),
            Err(ReleaseError::BadSignature),
            "{to}"
        );
    }
}

#[test]
fn malformed_manifests_are_refused_with_the_reason() {
    let good = sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("bridge-release 1", "bridge-release 3"),
            "unknown manifest format",
        ),
        (
            good.replace("bridge-release 1", "bridge-manifest 1"),
            "first line",
        ),
        // A format-1 body under the format-2 header.
        (
            good.replace("bridge-release 1", "bridge-release 2"),
            "must be `archive …`, not `key …`",
        ),
        (good.trim_end().to_string(), "newline"),
        (
            good.replace("os linux\n", ""),
            "must be `os …`, not `arch …`",
        ),
        (
            good.replace("\nsize ", "\nbytes "),
            "`bytes` is not a field",
        ),
        (
            good.replace("os linux\narch x86_64", "arch x86_64\nos linux"),
            "line 3",
        ),
        (good.replace("size 6", "size 06"), "size"),
        (good.replace("size 6", "size -6"), "size"),
        (good.replace("version 1.2.3", "version 1.2"), "semantic"),
        (good.replace("version 1.2.3", "version 1.2.3 "), "version"),
        (good.replace("sha256 ", "sha256 A"), "sha256"),
        (good.replace("\nkey ", "\nkey x"), "key"),
        (good.replace("signature ", "signature !"), "base64"),
        (format!("{good}extra 1\n"), "lines"),
        (good.replace("linux", "l\u{e9}nux"), "ASCII"),
        ("x".repeat(5000), "limit"),
    ];
    for (text, why) in cases {
        match SignedManifest::parse(&text) {
            Err(ReleaseError::Malformed(m)) => assert!(m.contains(why), "{why}: {m}"),
            other => panic!("{why}: {other:?}"),
        }
    }
}

fn gzip_manifest(archive: &[u8]) -> String {
    sign_manifest_gzip("1.2.3", "linux", "x86_64", b"binary", archive, &key(1)).unwrap()
}

#[test]
fn a_format_2_manifest_names_the_archive_and_carries_the_format_1_signature() {
    let text = gzip_manifest(b"gzipped");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12);
    assert_eq!(lines[0], "bridge-release 2");
    assert_eq!(lines[6], "archive gzip");
    assert_eq!(lines[7], "archive_size 7");
    let parsed = SignedManifest::parse(&text).unwrap();
    assert_eq!(parsed.format(), 2);
    let m = parsed.verify(&[key(1).public_key()]).unwrap();
    assert!(m.matches(b"binary"));
    assert!(m.archive_matches(b"gzipped"));
    assert!(!m.archive_matches(b"gzippeD"));
    assert!(!m.archive_matches(b"gzippe"));
    // The format-1 manifest rebuilt from it is the one `sign_manifest` writes (Ed25519 is
    // deterministic), and verifies on its own.
    let v1 = parsed.format1_text();
    assert_eq!(
        v1,
        sign_manifest("1.2.3", "linux", "x86_64", b"binary", &key(1)).unwrap()
    );
    let v1 = SignedManifest::parse(&v1).unwrap();
    assert_eq!(v1.format(), 1);
    assert!(v1.manifest().archive.is_none());
    assert!(!v1.manifest().archive_matches(b"gzipped"));
    v1.verify(&[key(1).public_key()]).unwrap();
    assert_eq!(v1.format1_text(), v1.text());
}

#[test]
fn a_format_2_manifest_with_a_changed_field_or_either_signature_changed_does_not_verify() {
    let text = gzip_manifest(b"gzipped");
    for (from, to) in [
        ("version 1.2.3", "version 9.2.3"),
        ("size 6", "size 7"),
        ("archive_size 7", "archive_size 8"),
        ("archive_sha256 ", "archive_sha256 0"),
    ] {
        let tampered = text.replacen(from, to, 1);
        // archive_sha256 with one more character is malformed; cut it back to 64.
        let tampered = if from.starts_with("archive_sha256") {
            let start = tampered.find("archive_sha256 ").unwrap() + 15;
            let mut t = tampered.clone();
            t.remove(start + 64);
            t
        } else {
            tampered
        };
        let parsed = SignedManifest::parse(&tampered).unwrap();
        assert_eq!(
            parsed.verify(&[key(1).public_key()]),
            Err(ReleaseError::BadSignature),
            "{to}"
        );
    }
    // A binary_signature of another binary, the manifest signed again over it: the
    // manifest's own signature verifies, the binary's does not.
    let other = sign_manifest("1.2.3", "linux", "x86_64", b"binarz", &key(1)).unwrap();
    let other_sig = other
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("signature ");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[10] = format!("binary_signature {other_sig}");
    let signed = format!("{}\n", lines[..11].join("\n"));
    let sig = key(1).sign(&signed_message(signed.as_bytes()));
    let resigned = format!("{signed}signature {}\n", STANDARD.encode(sig));
    let parsed = SignedManifest::parse(&resigned).unwrap();
    assert_eq!(
        parsed.verify(&[key(1).public_key()]),
        Err(ReleaseError::BadSignature)
    );
    // Signed by another key under this key's id.
    let foreign = sign_manifest_gzip("1.2.3", "linux", "x86_64", b"binary", b"gz", &key(2))
        .unwrap()
        .replace(&key(2).key_id().to_string(), &key(1).key_id().to_string());
    let parsed = SignedManifest::parse(&foreign).unwrap();
    assert_eq!(
        parsed.verify(&[key(1).public_key()]),
        Err(ReleaseError::BadSignature)
    );
}

#[test]
fn malformed_format_2_manifests_are_refused_with_the_reason() {
    let good = gzip_manifest(b"gzipped");
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("archive gzip", "archive zstd"),
            "`archive` must be",
        ),
        (good.replace("archive gzip\n", ""), "must be `archive …`"),
        (
            good.replace("archive_size 7\n", ""),
            "must be `archive_size …`",
        ),
        (
            good.replace("\nbinary_signature ", "\nbinary_sig "),
            "`binary_sig` is not a field",
        ),
        (
            good.replace("\nbinary_signature ", "\nbinary_signature !"),
            "`binary_signature` is not base64",
        ),
        (
            good.replace("archive_size 7", "archive_size 07"),
            "archive_size",
        ),
        (
            good.replace("archive_size 7", "archive_size 99999"),
            "larger than any gzip archive",
        ),
        (
            good.replace("archive_sha256 ", "archive_sha256 A"),
            "archive_sha256",
        ),
        (
            good.replace("\nkey ", "\ncomment x\nkey "),
            "`comment` is not a field",
        ),
        (format!("{good}extra 1\n"), "lines"),
        // Cut after the binary's fields: every later one is missing.
        (
            format!("{}\n", good.lines().take(6).collect::<Vec<_>>().join("\n")),
            "`archive` is missing",
        ),
    ];
    for (text, why) in cases {
        match SignedManifest::parse(&text) {
            Err(ReleaseError::Malformed(m)) => assert!(m.contains(why), "{why}: {m}"),
            other => panic!("{why}: {other:?}"),
        }
    }
    // The signer refuses an archive no gzip of the binary needs.
    let err =
        sign_manifest_gzip("1.2.3", "linux", "x86_64", b"b", &[0; 2000], &key(1)).unwrap_err();
    assert!(err.to_string().contains("the limit is 1025"), "{err}");
}

#[test]
fn versions_compare_by_semver_precedence() {
    assert_eq!(compare_versions("0.2.0", "0.10.0").unwrap(), Ordering::Less);
    assert_eq!(
        compare_versions("1.0.0", "1.0.0-rc.1").unwrap(),
        Ordering::Greater
    );
    assert_eq!(
        compare_versions("1.0.0+b1", "1.0.0+b2").unwrap(),
        Ordering::Equal
    );
    assert!(compare_versions("1", "1.0.0").is_err());
}
