//! End-to-end tests of signing and verification on real module bytes.

use crate::*;

/// A minimal valid module: one type `() -> ()`, one function of that type whose body is
/// just `end`.
const MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: [func () -> ()]
    0x03, 0x02, 0x01, 0x00, // function section: [type 0]
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code section: [body: no locals, end]
];
/// Offset of the body's `end` opcode in [`MODULE`].
const END_OPCODE: usize = 23;

const NOW: u64 = 1_764_050_000;

fn seed(n: u8) -> [u8; 32] {
    std::array::from_fn(|i| n.wrapping_add(i as u8))
}

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed(&seed(n))
}

fn claims() -> Claims {
    let mut c = Claims::new("hello", "1.0.0", NOW);
    c.capabilities.fuel = Some(1_000_000);
    c
}

fn policy_for(k: &KeyPair) -> TrustPolicy {
    TrustPolicy::new()
        .trust(TrustedKey::new(k.public_key()))
        .unwrap()
}

fn signed(k: &KeyPair) -> Vec<u8> {
    sign(MODULE, k, &claims()).unwrap().module
}

#[track_caller]
fn rejected(r: Result<Verified, VerifyError>) -> Rejection {
    match r {
        Err(VerifyError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[track_caller]
fn assert_reason(r: Result<Verified, VerifyError>, reason: RejectReason) -> Rejection {
    let r = rejected(r);
    assert_eq!(r.reason, reason, "{r}");
    r
}

/// Offset of the signature section's envelope in a module signed by [`signed`].
fn envelope_offset(m: &[u8]) -> usize {
    let name = SIGNATURE_SECTION_NAME.as_bytes();
    let at = (MODULE.len()..m.len())
        .find(|&i| m[i..].starts_with(name))
        .expect("a signature section after the module");
    at + name.len()
}

#[test]
fn valid_embedded_signature() {
    let k = key(1);
    let m = signed(&k);
    let v = verify(&m, None, &policy_for(&k), NOW).unwrap();
    assert_eq!(v.key_id, k.key_id());
    assert_eq!(v.public_key, k.public_key());
    assert_eq!(v.claims, claims());
    assert_eq!(v.claims_json, claims().to_json());
    assert_eq!(v.module_sha256, sha256(MODULE));
    assert_eq!(v.stripped_len, MODULE.len());
    assert_eq!(v.source, SignatureSource::Embedded);
    assert_eq!(&m[..MODULE.len()], MODULE, "the signature is appended");
    assert_eq!(strip_signatures(&m).unwrap(), MODULE);
    // Capability arithmetic.
    assert_eq!(v.capped_limit(Limit::Fuel, 5), 1_000_000);
    assert_eq!(v.capped_limit(Limit::TimeoutMs, 5), 5);
}

#[test]
fn unsigned() {
    let r = assert_reason(
        verify(MODULE, None, &policy_for(&key(1)), NOW),
        RejectReason::Unsigned,
    );
    assert_eq!(r.key_id, None);
    assert_eq!(
        VerifyError::Rejected(r).code(),
        "unsigned",
        "codes are the snake_case names"
    );
}

#[test]
fn flipped_byte_in_code() {
    let k = key(1);
    let mut m = signed(&k);
    m[END_OPCODE] = 0x01; // `end` becomes `nop`: still well-framed.
    check_structure(&m).unwrap();
    let r = assert_reason(
        verify(&m, None, &policy_for(&k), NOW),
        RejectReason::BadSignature,
    );
    assert_eq!(r.key_id, Some(k.key_id()));
    assert!(r.message.contains(&k.key_id().to_string()), "{r}");
}

#[test]
fn flipped_byte_in_claims() {
    let k = key(1);
    let mut m = signed(&k);
    let claims_at = envelope_offset(&m) + 26;
    // `"v":1` -> `"v":2`: still valid JSON, but the signature fails first.
    let pos = claims_at + 5;
    assert_eq!(m[pos], b'1');
    m[pos] = b'2';
    assert_reason(
        verify(&m, None, &policy_for(&k), NOW),
        RejectReason::BadSignature,
    );
}

#[test]
fn flipped_byte_in_signature() {
    let k = key(1);
    let mut m = signed(&k);
    let last = m.len() - 1;
    m[last] ^= 0x01;
    assert_reason(
        verify(&m, None, &policy_for(&k), NOW),
        RejectReason::BadSignature,
    );
}

#[test]
fn unknown_key() {
    let m = signed(&key(1));
    let r = assert_reason(
        verify(&m, None, &policy_for(&key(2)), NOW),
        RejectReason::UnknownKey,
    );
    assert!(r.message.contains(&key(1).key_id().to_string()));
    assert_reason(
        verify(&m, None, &TrustPolicy::new(), NOW),
        RejectReason::UnknownKey,
    );
}

#[test]
fn revoked_key() {
    let k = key(1);
    let m = signed(&k);
    // Revoked wins over trusted.
    let policy = policy_for(&k).revoke(k.key_id());
    let r = assert_reason(verify(&m, None, &policy, NOW), RejectReason::RevokedKey);
    assert!(r.message.contains(&k.key_id().to_string()));
    // And over unknown.
    let policy = TrustPolicy::new().revoke(k.key_id());
    assert_reason(verify(&m, None, &policy, NOW), RejectReason::RevokedKey);
}

#[test]
fn expired() {
    let k = key(1);
    let mut c = claims();
    c.not_after = Some(NOW + 10);
    let m = sign(MODULE, &k, &c).unwrap().module;
    let p = policy_for(&k);
    verify(&m, None, &p, NOW + 10).expect("valid through the not_after second");
    let r = assert_reason(verify(&m, None, &p, NOW + 11), RejectReason::Expired);
    assert!(r.message.contains("2025-11-25T05:53:30Z"), "{r}");
}

#[test]
fn not_yet_valid() {
    let k = key(1);
    let m = signed(&k);
    let p = policy_for(&k);
    verify(&m, None, &p, NOW - CLOCK_SKEW_SECS).expect("within the clock skew");
    let r = assert_reason(
        verify(&m, None, &p, NOW - CLOCK_SKEW_SECS - 1),
        RejectReason::NotYetValid,
    );
    assert!(r.message.contains("2025-11-25T05:53:20Z"), "{r}");
}

#[test]
fn out_of_scope_name() {
    let k = key(1);
    let m = signed(&k);
    let p = TrustPolicy::new()
        .trust(
            TrustedKey::new(k.public_key())
                .with_names(["log*", "other"])
                .unwrap(),
        )
        .unwrap();
    let r = assert_reason(verify(&m, None, &p, NOW), RejectReason::OutOfScope);
    assert!(
        r.message.contains("\"hello\"") && r.message.contains("log*"),
        "{r}"
    );
    let p = TrustPolicy::new()
        .trust(
            TrustedKey::new(k.public_key())
                .with_names(["hel*"])
                .unwrap(),
        )
        .unwrap();
    verify(&m, None, &p, NOW).unwrap();
}

#[test]
fn out_of_scope_capability() {
    let k = key(1);
    let m = signed(&k);
    let with_max = |max: Capabilities| {
        TrustPolicy::new()
            .trust(TrustedKey::new(k.public_key()).with_max(max).unwrap())
            .unwrap()
    };
    let p = with_max(Capabilities {
        fuel: Some(999_999),
        ..Default::default()
    });
    let r = assert_reason(verify(&m, None, &p, NOW), RejectReason::OutOfScope);
    assert!(
        r.message.contains("fuel") && r.message.contains("999999"),
        "{r}"
    );
    // At the ceiling is fine, and the ceiling caps undeclared limits.
    let p = with_max(Capabilities {
        fuel: Some(1_000_000),
        timeout_ms: Some(50),
        ..Default::default()
    });
    let v = verify(&m, None, &p, NOW).unwrap();
    assert_eq!(v.capped_limit(Limit::TimeoutMs, 10_000), 50);
    // env / dirs subsets.
    let mut c = claims();
    c.capabilities.env = Some(vec!["TZ".into(), "HOME".into()]);
    let m = sign(MODULE, &k, &c).unwrap().module;
    let p = with_max(Capabilities {
        env: Some(vec!["TZ".into()]),
        ..Default::default()
    });
    let r = assert_reason(verify(&m, None, &p, NOW), RejectReason::OutOfScope);
    assert!(r.message.contains("HOME"), "{r}");
}

#[test]
fn truncated_section_is_an_invalid_module() {
    let k = key(1);
    let m = signed(&k);
    let err = verify(&m[..m.len() - 1], None, &policy_for(&k), NOW).unwrap_err();
    assert!(matches!(err, VerifyError::InvalidModule(_)), "{err:?}");
    assert_eq!(err.code(), "invalid_module");
    assert!(err.rejection().is_none());
    // A truncated code section likewise.
    let err = verify(&MODULE[..MODULE.len() - 1], None, &policy_for(&k), NOW).unwrap_err();
    assert_eq!(err.code(), "invalid_module");
    assert!(inspect(&m[..m.len() - 1], None).is_err());
    assert!(sign(&m[..m.len() - 1], &k, &claims()).is_err());
}

#[test]
fn duplicated_section() {
    let k = key(1);
    let m = signed(&k);
    let section = &m[MODULE.len()..];
    let mut twice = m.clone();
    twice.extend_from_slice(section);
    let r = assert_reason(
        verify(&twice, None, &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
    assert!(r.message.contains("2 bridge.signature sections"), "{r}");
    // Even when a detached signature is given.
    let d = sign_detached(MODULE, &k, &claims()).unwrap().envelope;
    assert_reason(
        verify(&twice, Some(&d), &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
    assert_eq!(inspect(&twice, None).unwrap().embedded_signatures, 2);
    // Re-signing cleans it up.
    let fixed = sign(&twice, &k, &claims()).unwrap();
    assert_eq!(fixed.replaced.len(), 2);
    assert_eq!(fixed.module, m);
}

#[test]
fn malformed_envelope() {
    let k = key(1);
    let mut m = signed(&k);
    let at = envelope_offset(&m);
    m[at] = b'X';
    assert_reason(
        verify(&m, None, &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
    // A claims_len that disagrees with the section length.
    let mut m = signed(&k);
    m[at + 22] ^= 1;
    assert_reason(
        verify(&m, None, &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
    assert_reason(
        verify(MODULE, Some(b"BRSG"), &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
}

/// A correctly signed envelope over claims that do not parse (as a newer signer might make):
/// rejected as malformed, after the signature check.
#[test]
fn unknown_claim_is_malformed() {
    let k = key(1);
    let claims_json = br#"{"v":1,"name":"hello","version":"1","issued_at":0,"new_claim":true}"#;
    assert!(sign_detached_with_claims_json(MODULE, &k, claims_json).is_err());
    let envelope = Envelope {
        key_id: k.key_id(),
        claims: claims_json.to_vec(),
        signature: k.sign(&signed_message(&sha256(MODULE), claims_json)),
    }
    .encode();
    let r = assert_reason(
        verify(MODULE, Some(&envelope), &policy_for(&k), NOW),
        RejectReason::MalformedSignature,
    );
    assert!(r.message.contains("new_claim"), "{r}");
    // The same from an untrusted key is unknown_key: trust is checked before the claims.
    assert_reason(
        verify(MODULE, Some(&envelope), &policy_for(&key(2)), NOW),
        RejectReason::UnknownKey,
    );
}

#[test]
fn detached_flow() {
    let k = key(1);
    let sig = sign_detached(MODULE, &k, &claims()).unwrap();
    assert_eq!(sig.module_sha256, sha256(MODULE));
    let v = verify(MODULE, Some(&sig.envelope), &policy_for(&k), NOW).unwrap();
    assert_eq!(v.source, SignatureSource::Detached);
    // The detached signature for the wrong module.
    let mut other = MODULE.to_vec();
    other[END_OPCODE] = 0x01;
    let r = assert_reason(
        verify(&other, Some(&sig.envelope), &policy_for(&k), NOW),
        RejectReason::BadSignature,
    );
    assert!(r.message.contains("detached"), "{r}");
    // A module carrying an embedded signature by another key: the detached one is what
    // counts, the embedded one is ignored (the hash excludes it).
    let embedded_by_2 = signed(&key(2));
    let sig2 = sign_detached(&embedded_by_2, &k, &claims()).unwrap();
    assert_eq!(
        sig2.envelope, sig.envelope,
        "same stripped module, same envelope"
    );
    let v = verify(&embedded_by_2, Some(&sig.envelope), &policy_for(&k), NOW).unwrap();
    assert_eq!(v.key_id, k.key_id());
    // Even a broken embedded envelope is ignored when a detached signature is given.
    let mut broken = embedded_by_2.clone();
    let at = envelope_offset(&broken);
    broken[at] = b'X';
    verify(&broken, Some(&sig.envelope), &policy_for(&k), NOW).unwrap();
}

#[test]
fn resign_replaces() {
    let (a, b) = (key(1), key(2));
    let by_a = signed(&a);
    let by_b = sign(&by_a, &b, &claims()).unwrap();
    assert_eq!(
        by_b.replaced,
        vec![ReplacedSignature {
            key_id: Some(a.key_id())
        }]
    );
    assert_eq!(inspect(&by_b.module, None).unwrap().embedded_signatures, 1);
    assert_eq!(
        by_b.module,
        signed(&b),
        "same as signing the unsigned module"
    );
    verify(&by_b.module, None, &policy_for(&b), NOW).unwrap();
    assert_reason(
        verify(&by_b.module, None, &policy_for(&a), NOW),
        RejectReason::UnknownKey,
    );
    // Signing is deterministic.
    assert_eq!(signed(&a), by_a);
    assert!(sign(MODULE, &a, &claims()).unwrap().replaced.is_empty());
}

#[test]
fn invalid_claims_are_not_signed() {
    let mut c = claims();
    c.name = "Hello".into();
    assert!(matches!(
        sign(MODULE, &key(1), &c),
        Err(SigningError::InvalidClaims(_))
    ));
    let huge = format!(
        r#"{{"v":1,"name":"x","version":"{}","issued_at":0}}"#,
        "x".repeat(MAX_CLAIMS_LEN)
    );
    assert!(sign_with_claims_json(MODULE, &key(1), huge.as_bytes()).is_err());
}

#[test]
fn inspect_without_trust() {
    let k = key(1);
    let i = inspect(MODULE, None).unwrap();
    assert!(!i.signed);
    assert_eq!(i.module_sha256, sha256(MODULE));
    let m = signed(&k);
    let i = inspect(&m, None).unwrap();
    assert!(i.signed);
    assert_eq!(i.source, Some(SignatureSource::Embedded));
    assert_eq!(i.key_id, Some(k.key_id()));
    assert_eq!(i.claims, Some(claims()));
    assert_eq!(i.module_sha256, sha256(MODULE));
    assert_eq!(i.problem, None);
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["code_sha256"], hex::encode(sha256(MODULE)));
    assert!(json.get("module_sha256").is_none());
    assert_eq!(json["key_id"], k.key_id().to_string());
    assert_eq!(json["source"], "embedded");
    let d = sign_detached(MODULE, &k, &claims()).unwrap().envelope;
    let i = inspect(MODULE, Some(&d)).unwrap();
    assert_eq!(i.source, Some(SignatureSource::Detached));
    assert_eq!(i.key_id, Some(k.key_id()));
}

#[test]
fn reject_reasons_serialize_snake_case() {
    for (r, s) in [
        (RejectReason::Unsigned, "unsigned"),
        (RejectReason::BadSignature, "bad_signature"),
        (RejectReason::UnknownKey, "unknown_key"),
        (RejectReason::RevokedKey, "revoked_key"),
        (RejectReason::Expired, "expired"),
        (RejectReason::NotYetValid, "not_yet_valid"),
        (RejectReason::OutOfScope, "out_of_scope"),
        (RejectReason::MalformedSignature, "malformed_signature"),
    ] {
        assert_eq!(serde_json::to_value(r).unwrap(), s);
        assert_eq!(r.as_str(), s);
        assert_eq!(serde_json::from_value::<RejectReason>(s.into()).unwrap(), r);
    }
}

// ---- The test vector of docs/signing.md ----

const VECTOR_MODULE_HEX: &str = "0061736d01000000010401600000030201000a040102000b";
const VECTOR_CLAIMS: &str = r#"{"v":1,"name":"hello","version":"1.0.0","issued_at":1764050000,"not_after":null,"capabilities":{"fuel":1000000000}}"#;
const VECTOR_PUBLIC_KEY: &str = "ed25519:ebVWLo_mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ";
const VECTOR_KEY_ID: &str = "65b60673d6ed884bf01c2c222d82ada0";
const VECTOR_MODULE_SHA256: &str =
    "aaceec3bbac74451e6dcefcead4220538e643fcb1df8009a7c5c3a5afffc5495";
const VECTOR_SIGNATURE: &str =
    "7051a9ded51fde9ca323feca159279f118cf9cf385907ad339c2b08e2995be9611f29c5ed4024aadc9d13d3d96dc1b3147abc62db28b5a12d506a75cb1e19b0a";
const VECTOR_ENVELOPE: &str =
    "42525347010165b60673d6ed884bf01c2c222d82ada0730000007b2276223a312c226e616d65223a2268656c6c6f222c2276657273696f6e223a22312e302e30222c226973737565645f6174223a313736343035303030302c226e6f745f6166746572223a6e756c6c2c226361706162696c6974696573223a7b226675656c223a313030303030303030307d7d7051a9ded51fde9ca323feca159279f118cf9cf385907ad339c2b08e2995be9611f29c5ed4024aadc9d13d3d96dc1b3147abc62db28b5a12d506a75cb1e19b0a";
const VECTOR_SECTION_HEADER: &str = "00de01106272696467652e7369676e6174757265";

#[test]
fn test_vector() {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
    let k = KeyPair::from_seed(&seed);
    let module = hex::decode(VECTOR_MODULE_HEX).unwrap();
    assert_eq!(module, MODULE);
    let claims_json = VECTOR_CLAIMS.as_bytes();
    let mut c = Claims::new("hello", "1.0.0", 1_764_050_000);
    c.capabilities.fuel = Some(1_000_000_000);
    assert_eq!(
        c.to_json(),
        claims_json,
        "the vector's claims are what sign() writes"
    );

    let s = sign_with_claims_json(&module, &k, claims_json).unwrap();
    assert_eq!(k.public_key().to_string(), VECTOR_PUBLIC_KEY);
    assert_eq!(k.key_id().to_string(), VECTOR_KEY_ID);
    assert_eq!(hex::encode(s.signature.module_sha256), VECTOR_MODULE_SHA256);
    let env = &s.signature.envelope;
    assert_eq!(env.len(), 90 + claims_json.len());
    assert_eq!(hex::encode(&env[env.len() - 64..]), VECTOR_SIGNATURE);
    assert_eq!(hex::encode(env), VECTOR_ENVELOPE);
    // The signed module is the module, then the section header, then the envelope.
    let header = hex::decode(VECTOR_SECTION_HEADER).unwrap();
    assert_eq!(s.module, [&module[..], &header, env].concat());
    // The same vector verifies.
    let p = policy_for(&k);
    verify(&s.module, None, &p, 1_764_050_000).unwrap();
    verify(&module, Some(env), &p, 1_764_050_000).unwrap();

    assert_eq!(s.module.len(), 249);
    // The private key file.
    let pem = k.to_pem();
    assert_eq!(
        KeyPair::from_pem(&pem).unwrap().public_key(),
        k.public_key()
    );

    // docs/signing.md states the same values.
    let doc = include_str!("../../docs/signing.md");
    for v in [
        VECTOR_MODULE_HEX,
        VECTOR_CLAIMS,
        VECTOR_PUBLIC_KEY,
        VECTOR_KEY_ID,
        VECTOR_MODULE_SHA256,
        VECTOR_SIGNATURE,
        VECTOR_SECTION_HEADER,
    ] {
        assert!(doc.contains(v), "docs/signing.md lacks {v}");
    }
    for line in pem.lines() {
        assert!(
            doc.contains(line),
            "docs/signing.md lacks the PEM line {line}"
        );
    }
    // The envelope is long: the doc wraps it, so compare without whitespace.
    let doc_compact: String = doc.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        doc_compact.contains(VECTOR_ENVELOPE),
        "docs/signing.md lacks the envelope"
    );
}
