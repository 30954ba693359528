//! The signature envelope: the bytes of a `bridge.signature` section's payload, or of a
//! detached `.sig` file.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BRSG"
//! 4       1     format version = 1
//! 5       1     algorithm = 1 (Ed25519)
//! 6       16    key id (first 16 bytes of SHA-256 of the raw public key)
//! 22      4     claims_len n (u32, little-endian), at most 65536
//! 26      n     claims (UTF-8 JSON)
//! 26+n    64    Ed25519 signature
//! ```
//! The total length is exactly `90 + n`.

use sha2::{Digest, Sha256};

use crate::claims::MAX_CLAIMS_LEN;
use crate::keys::KeyId;

/// The envelope's first four bytes.
pub const MAGIC: [u8; 4] = *b"BRSG";
/// The envelope format version this crate reads and writes.
pub const FORMAT_VERSION: u8 = 1;
/// The algorithm byte for Ed25519.
pub const ALGORITHM_ED25519: u8 = 1;
/// Envelope bytes besides the claims: 26 bytes of header and 64 of signature.
pub const ENVELOPE_OVERHEAD: usize = 90;
/// What the signed message starts with: the 19 ASCII bytes `bridge.signature.v1` and a NUL
/// byte, 20 bytes in all.
pub const SIGNED_MESSAGE_PREFIX: &[u8; 20] = b"bridge.signature.v1\0";

/// A decoded envelope. Decoding checks only the framing; nothing in it is trusted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The id of the key that (supposedly) made the signature.
    pub key_id: KeyId,
    /// The claims, exactly as signed.
    pub claims: Vec<u8>,
    /// The Ed25519 signature of [`signed_message`].
    pub signature: [u8; 64],
}

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the fixed part.
    #[error("signature envelope is {0} bytes, shorter than the minimum {ENVELOPE_OVERHEAD}")]
    TooShort(usize),
    /// Does not start with `BRSG`.
    #[error("signature envelope does not start with the magic \"BRSG\"")]
    BadMagic,
    /// A format version other than 1.
    #[error("signature envelope format version {0} is not supported (expected 1)")]
    UnsupportedVersion(u8),
    /// An algorithm other than 1 (Ed25519).
    #[error("signature algorithm {0} is not supported (expected 1, Ed25519)")]
    UnsupportedAlgorithm(u8),
    /// `claims_len` above 64 KiB.
    #[error("signature envelope claims_len {0} exceeds the maximum {MAX_CLAIMS_LEN}")]
    ClaimsTooLong(u32),
    /// The total length is not `90 + claims_len`.
    #[error("signature envelope is {actual} bytes but its claims_len implies {expected}")]
    LengthMismatch {
        /// `90 + claims_len`.
        expected: usize,
        /// The actual length.
        actual: usize,
    },
}

impl Envelope {
    /// Encodes the envelope. Panics if the claims are longer than 64 KiB (signing checks this
    /// first).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.claims.len() <= MAX_CLAIMS_LEN, "claims too long");
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + self.claims.len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(ALGORITHM_ED25519);
        out.extend_from_slice(&self.key_id.0);
        out.extend_from_slice(&(self.claims.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.claims);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes an envelope, checking magic, version, algorithm and lengths.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() < ENVELOPE_OVERHEAD {
            return Err(EnvelopeError::TooShort(bytes.len()));
        }
        if bytes[0..4] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(bytes[4]));
        }
        if bytes[5] != ALGORITHM_ED25519 {
            return Err(EnvelopeError::UnsupportedAlgorithm(bytes[5]));
        }
        let key_id = KeyId(bytes[6..22].try_into().expect("16 bytes"));
        let claims_len = u32::from_le_bytes(bytes[22..26].try_into().expect("4 bytes"));
        if claims_len as usize > MAX_CLAIMS_LEN {
            return Err(EnvelopeError::ClaimsTooLong(claims_len));
        }
        let n = claims_len as usize;
        if bytes.len() != ENVELOPE_OVERHEAD + n {
            return Err(EnvelopeError::LengthMismatch {
                expected: ENVELOPE_OVERHEAD + n,
                actual: bytes.len(),
            });
        }
        Ok(Envelope {
            key_id,
            claims: bytes[26..26 + n].to_vec(),
            signature: bytes[26 + n..].try_into().expect("64 bytes"),
        })
    }
}

/// The message an Ed25519 signature covers: [`SIGNED_MESSAGE_PREFIX`] (20 bytes), then the
/// 32-byte SHA-256 of the module with every `bridge.signature` section removed, then the
/// claims bytes.
pub fn signed_message(module_sha256: &[u8; 32], claims: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNED_MESSAGE_PREFIX.len() + 32 + claims.len());
    m.extend_from_slice(SIGNED_MESSAGE_PREFIX);
    m.extend_from_slice(module_sha256);
    m.extend_from_slice(claims);
    m
}

/// SHA-256 of some bytes (a convenience for callers that hash modules themselves).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            key_id: KeyId([0xab; 16]),
            claims: b"{}".to_vec(),
            signature: [0xcd; 64],
        }
    }

    #[test]
    fn prefix_is_twenty_bytes() {
        assert_eq!(SIGNED_MESSAGE_PREFIX.len(), 20);
        assert_eq!(&SIGNED_MESSAGE_PREFIX[..19], b"bridge.signature.v1");
        assert_eq!(SIGNED_MESSAGE_PREFIX[19], 0);
    }

    #[test]
    fn roundtrip() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes.len(), 92);
        assert_eq!(&bytes[..6], b"BRSG\x01\x01");
        assert_eq!(&bytes[22..26], &[2, 0, 0, 0]);
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn malformed() {
        let good = sample().encode();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        assert_eq!(
            Envelope::decode(&good[..89]),
            Err(EnvelopeError::TooShort(89))
        );
        assert_eq!(
            Envelope::decode(&with(0, b'X')),
            Err(EnvelopeError::BadMagic)
        );
        assert_eq!(
            Envelope::decode(&with(4, 2)),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        assert_eq!(
            Envelope::decode(&with(5, 2)),
            Err(EnvelopeError::UnsupportedAlgorithm(2))
        );
        assert!(matches!(
            Envelope::decode(&good[..91]),
            Err(EnvelopeError::LengthMismatch {
                expected: 92,
                actual: 91
            })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Envelope::decode(&long),
            Err(EnvelopeError::LengthMismatch { .. })
        ));
        let mut huge = good.clone();
        huge[22..26].copy_from_slice(&(65537u32).to_le_bytes());
        assert_eq!(
            Envelope::decode(&huge),
            Err(EnvelopeError::ClaimsTooLong(65537))
        );
    }
}
