//! Fingerprints: how both ends name a public key.
//!
//! An **agent id** is the lowercase hex SHA-256 of the agent's public key (its DER
//! SubjectPublicKeyInfo, as in its TLS client certificate): stable for as long as the agent keeps
//! its key, whatever happens to its certificate. A **server pin** is the same fingerprint of the
//! platform's TLS server key.

use sha2::{Digest, Sha256};

/// The fingerprint of a DER SubjectPublicKeyInfo: 64 lowercase hex characters.
pub fn spki_fingerprint(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

/// Parses a pin as written by humans: 64 hex characters, optionally prefixed `sha256:` or
/// `sha256/`, case-insensitive; returns the canonical lowercase form.
pub fn parse_pin(text: &str) -> Result<String, String> {
    let t = text.trim();
    let hexpart = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("sha256/"))
        .unwrap_or(t);
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not a SHA-256 pin (64 hex characters, optionally prefixed sha256:)"
        ));
    }
    Ok(hexpart.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_their_usual_spellings() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), "ab".repeat(32));
        assert_eq!(
            parse_pin(&format!("sha256:{hex}")).unwrap(),
            "ab".repeat(32)
        );
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn fingerprints_are_sha256_hex() {
        assert_eq!(
            spki_fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
