//! Ed25519 keys: key pairs (PKCS#8 PEM files), public keys (`ed25519:` text form) and key ids.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The prefix of a public key's text form.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";

/// The PEM label of a private key file.
pub const PEM_LABEL: &str = "PRIVATE KEY";

/// A problem with key material: a malformed public key, key id or private key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A public key's text form is not `ed25519:` + base64url (no padding) of 32 bytes.
    #[error("malformed public key {0:?}: expected \"ed25519:\" followed by the base64url (no padding) encoding of 32 bytes")]
    MalformedPublicKey(String),
    /// A key id is not 32 hexadecimal characters.
    #[error("malformed key id {0:?}: expected 32 hexadecimal characters")]
    MalformedKeyId(String),
    /// A private key file is not a `PRIVATE KEY` PEM document.
    #[error("malformed private key file: {0}")]
    MalformedPem(String),
    /// The PKCS#8 document is not an Ed25519 private key ring accepts.
    #[error("the private key is not a usable Ed25519 PKCS#8 key: {0}")]
    BadPrivateKey(String),
    /// The system random number generator failed.
    #[error("could not generate a key: the system random number generator failed")]
    Rng,
}

/// A key id: the first 16 bytes of SHA-256 of the raw 32-byte public key.
///
/// Its text form is 32 lowercase hexadecimal characters (parsing also accepts upper case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// The key id of a raw Ed25519 public key.
    pub fn of(public_key: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public_key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        KeyId(id)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut id = [0u8; 16];
        if s.len() != 32 {
            return Err(KeyError::MalformedKeyId(s.to_string()));
        }
        hex::decode_to_slice(s, &mut id).map_err(|_| KeyError::MalformedKeyId(s.to_string()))?;
        Ok(KeyId(id))
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 public key (32 raw bytes).
///
/// Text form: `ed25519:` followed by the base64url encoding, without padding, of the 32 bytes
/// (43 characters). That is also its serde form, e.g. in the agent's TOML config.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// This key's id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0)
    }

    /// Parses the contents of a public key file: the text form on one line; surrounding
    /// whitespace (such as the trailing newline) is ignored.
    pub fn from_file_contents(text: &str) -> Result<PublicKey, KeyError> {
        text.trim().parse()
    }

    /// Whether `signature` is a valid Ed25519 signature of `message` by this key.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::MalformedPublicKey(s.to_string());
        let b64 = s.strip_prefix(PUBLIC_KEY_PREFIX).ok_or_else(bad)?;
        let raw = URL_SAFE_NO_PAD.decode(b64).map_err(|_| bad())?;
        let raw: [u8; 32] = raw.try_into().map_err(|_| bad())?;
        Ok(PublicKey(raw))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The fixed bytes of the PKCS#8 v2 (RFC 5958 `OneAsymmetricKey`) document that ring produces
/// for an Ed25519 key (83 bytes): the seed follows `PKCS8_PREFIX`, the public key follows
/// `PKCS8_MIDDLE` (the `[1] IMPLICIT` public key field).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const PKCS8_MIDDLE: [u8; 3] = [0x81, 0x21, 0x00];

/// An Ed25519 signing key pair, with the PKCS#8 document it is stored as.
///
/// Its `Debug` output shows only the public key.
pub struct KeyPair {
    inner: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl KeyPair {
    /// Generates a new key pair from the system's secure random number generator.
    pub fn generate() -> Result<KeyPair, KeyError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Rng)?;
        KeyPair::from_pkcs8_der(doc.as_ref())
    }

    /// The key pair whose 32-byte private seed is `seed` (for test vectors and for importing
    /// keys from other tools). Its PKCS#8 document is the v2 form ring would produce.
    pub fn from_seed(seed: &[u8; 32]) -> KeyPair {
        let inner = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed");
        let mut pkcs8 = Vec::with_capacity(83);
        pkcs8.extend_from_slice(&PKCS8_PREFIX);
        pkcs8.extend_from_slice(seed);
        pkcs8.extend_from_slice(&PKCS8_MIDDLE);
        pkcs8.extend_from_slice(inner.public_key().as_ref());
        KeyPair { inner, pkcs8 }
    }

    /// Loads a key pair from a DER PKCS#8 document: v2 (with the public key, as ring and
    /// `bridgectl keygen` write it; the public key is checked against the private one) or v1
    /// (as `openssl genpkey -algorithm ed25519` writes it).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<KeyPair, KeyError> {
        let inner = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Ok(KeyPair {
            inner,
            pkcs8: der.to_vec(),
        })
    }

    /// Loads a key pair from the text of a private key file: a `-----BEGIN PRIVATE KEY-----`
    /// PEM document holding a PKCS#8 document (see [`KeyPair::from_pkcs8_der`]).
    pub fn from_pem(text: &str) -> Result<KeyPair, KeyError> {
        KeyPair::from_pkcs8_der(&decode_pem(text)?)
    }

    /// The private key file text: `-----BEGIN PRIVATE KEY-----`, the standard base64 of the
    /// PKCS#8 document in lines of 64 characters, `-----END PRIVATE KEY-----`, each line ending
    /// in `\n`.
    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.pkcs8);
        let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        out
    }

    /// The PKCS#8 document (DER) this key pair was loaded from or generated as.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.inner.public_key().as_ref());
        PublicKey(raw)
    }

    /// The public key's id.
    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    /// Signs `message` (Ed25519 is deterministic: the same message gives the same signature).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.inner.sign(message).as_ref());
        sig
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

fn decode_pem(text: &str) -> Result<Vec<u8>, KeyError> {
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    match lines.next() {
        Some(l) if l == begin => {}
        Some(l) if l.starts_with("-----BEGIN ENCRYPTED") => {
            return Err(KeyError::MalformedPem(
                "encrypted private keys are not supported".into(),
            ))
        }
        _ => {
            return Err(KeyError::MalformedPem(format!(
                "expected the first line to be {begin}"
            )))
        }
    }
    let mut b64 = String::new();
    let mut ended = false;
    for line in lines.by_ref() {
        if line == end {
            ended = true;
            break;
        }
        b64.push_str(line);
    }
    if !ended {
        return Err(KeyError::MalformedPem(format!("missing {end}")));
    }
    if lines.any(|l| !l.is_empty()) {
        return Err(KeyError::MalformedPem(format!("text after {end}")));
    }
    STANDARD
        .decode(b64)
        .map_err(|e| KeyError::MalformedPem(format!("bad base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pkcs8_has_the_documented_layout() {
        let kp = KeyPair::generate().unwrap();
        let der = kp.pkcs8_der();
        assert_eq!(der.len(), 83);
        assert_eq!(der[..16], PKCS8_PREFIX);
        assert_eq!(der[48..51], PKCS8_MIDDLE);
        assert_eq!(&der[51..], kp.public_key().as_bytes());
        // from_seed rebuilds exactly the same document.
        let seed: [u8; 32] = der[16..48].try_into().unwrap();
        assert_eq!(KeyPair::from_seed(&seed).pkcs8_der(), der);
    }

    #[test]
    fn pem_roundtrip() {
        let kp = KeyPair::generate().unwrap();
        let pem = kp.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = KeyPair::from_pem(&pem).unwrap();
        assert_eq!(back.public_key(), kp.public_key());
        // CRLF line endings and surrounding blank lines are fine.
        let crlf = format!("\n{}\n", pem.replace('\n', "\r\n"));
        assert_eq!(
            KeyPair::from_pem(&crlf).unwrap().public_key(),
            kp.public_key()
        );
        assert!(KeyPair::from_pem("").is_err());
        assert!(KeyPair::from_pem(&pem.replace("PRIVATE KEY", "PUBLIC KEY")).is_err());
        assert!(
            KeyPair::from_pem(pem.trim_end().trim_end_matches("-----END PRIVATE KEY-----"))
                .is_err()
        );
        // A v2 document whose public key does not match the seed is refused.
        let mut der = kp.pkcs8_der().to_vec();
        der[82] ^= 1;
        assert!(KeyPair::from_pkcs8_der(&der).is_err());
    }

    #[test]
    fn openssl_v1_pkcs8_is_accepted() {
        // `openssl genpkey -algorithm ed25519` output for seed 0x01..0x20 (PKCS#8 v1).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        der.extend_from_slice(&seed);
        let kp = KeyPair::from_pkcs8_der(&der).unwrap();
        assert_eq!(kp.public_key(), KeyPair::from_seed(&seed).public_key());
    }

    #[test]
    fn public_key_text_form() {
        let kp = KeyPair::from_seed(&[7; 32]);
        let pk = kp.public_key();
        let text = pk.to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(text.len(), 8 + 43);
        assert_eq!(text.parse::<PublicKey>().unwrap(), pk);
        assert_eq!(
            PublicKey::from_file_contents(&format!("{text}\n")).unwrap(),
            pk
        );
        assert!("ed25519:".parse::<PublicKey>().is_err());
        assert!(text[8..].parse::<PublicKey>().is_err());
        assert!(format!("{text}=").parse::<PublicKey>().is_err());
        assert!(format!("{text}AA").parse::<PublicKey>().is_err());
        // Standard base64's '+' and '/' are not base64url.
        assert!(format!("ed25519:+{}", &text[9..])
            .parse::<PublicKey>()
            .is_err());
    }

    #[test]
    fn key_id_text_form() {
        let pk = KeyPair::from_seed(&[7; 32]).public_key();
        let id = pk.key_id();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<KeyId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<KeyId>().unwrap(), id);
        assert!(text[..30].parse::<KeyId>().is_err());
        assert!(format!("{}zz", &text[..30]).parse::<KeyId>().is_err());
        assert_eq!(&id.0[..], &Sha256::digest(pk.as_bytes())[..16]);
    }

    #[test]
    fn sign_and_verify() {
        let kp = KeyPair::from_seed(&[9; 32]);
        let sig = kp.sign(b"hello");
        assert!(kp.public_key().verify(b"hello", &sig));
        assert!(!kp.public_key().verify(b"hellp", &sig));
        assert!(format!("{kp:?}").contains("ed25519:"));
    }
}
