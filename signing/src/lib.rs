//! Signing and verification of bridge handler modules.
//!
//! A handler is a WASI preview-1 core wasm module. Its publisher signs it with an Ed25519 key;
//! the signature, with the signed *claims* (name, version, validity, capabilities), travels in
//! a `bridge.signature` custom section appended to the module, or in a detached `.sig` file
//! holding the same bytes. The agent runs a module only if [`verify`] accepts it under its
//! [`TrustPolicy`]. The format is specified in `docs/signing.md`.
//!
//! # For the agent (host)
//!
//! ```
//! use bridge_signing::{verify, Limit, TrustPolicy, VerifyError};
//! # use bridge_signing::{sign, Claims, KeyPair, TrustedKey};
//! # let key = KeyPair::from_seed(&[1; 32]);
//! # let module = sign(b"\0asm\x01\0\0\0", &key, &Claims::new("hello", "1.0.0", 0)).unwrap().module;
//! # let config = format!("[[keys]]\nkey = \"{}\"\nnames = [\"hello\"]", key.public_key());
//! // The policy is a table of the agent's TOML config.
//! let policy: TrustPolicy = toml::from_str(&config).unwrap();
//! let now = 1_764_050_000; // unix seconds
//! match verify(&module, None, &policy, now) {
//!     Ok(v) => {
//!         // v.claims.name, v.key_id, v.module_sha256 (cache key), and the limits to apply:
//!         let fuel = v.capped_limit(Limit::Fuel, 1_000_000_000);
//!         assert_eq!(fuel, 1_000_000_000);
//!         assert!(v.env().is_empty() && v.dirs().is_empty());
//!     }
//!     Err(VerifyError::InvalidModule(e)) => panic!("invalid_module: {e}"),
//!     Err(VerifyError::Rejected(r)) => panic!("{}: {}", r.reason, r.message),
//! }
//! ```
//!
//! # For signers (bridgectl)
//!
//! [`KeyPair::generate`] / [`KeyPair::from_pem`] / [`KeyPair::to_pem`] for keys, [`sign`] and
//! [`sign_detached`] to sign, [`inspect`] to look at a module without trusting it.

#![warn(missing_docs)]

mod claims;
mod envelope;
mod inspect;
mod keys;
mod policy;
pub mod release;
mod sign;
pub mod timefmt;
mod verify;
mod wasm;

#[cfg(test)]
mod tests;

pub use claims::{
    is_handler_name, Capabilities, Claims, ClaimsError, DirGrant, Limit, CLAIMS_VERSION,
    MAX_CLAIMS_LEN,
};
pub use envelope::{
    sha256, signed_message, Envelope, EnvelopeError, ALGORITHM_ED25519, ENVELOPE_OVERHEAD,
    FORMAT_VERSION, MAGIC, SIGNED_MESSAGE_PREFIX,
};
pub use inspect::{inspect, Inspection};
pub use keys::{KeyError, KeyId, KeyPair, PublicKey, PEM_LABEL, PUBLIC_KEY_PREFIX};
pub use policy::{NamePattern, PolicyError, TrustPolicy, TrustedKey};
pub use sign::{
    sign, sign_detached, sign_detached_with_claims_json, sign_with_claims_json, ReplacedSignature,
    Signature, SignedModule, SigningError,
};
pub use verify::{
    verify, RejectReason, Rejection, SignatureSource, Verified, VerifyError, CLOCK_SKEW_SECS,
};
pub use wasm::{
    check_structure, strip_signatures, InvalidModule, SIGNATURE_SECTION_NAME, WASM_HEADER,
};
