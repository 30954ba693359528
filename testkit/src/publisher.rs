//! A publisher: a key, and modules signed with it.

use std::time::{SystemTime, UNIX_EPOCH};

use bridge_signing::{Claims, KeyPair};

use crate::bins;

/// A fresh publisher key.
pub struct Publisher {
    /// The key pair.
    pub key: KeyPair,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher::new()
    }
}

impl Publisher {
    /// A fresh key.
    pub fn new() -> Publisher {
        Publisher {
            key: KeyPair::generate().unwrap(),
        }
    }

    /// `ed25519:…`, as `--trusted-key` takes it.
    pub fn public(&self) -> String {
        self.key.public_key().to_string()
    }

    /// The example (or fixture) `name`, signed with claims for that name.
    pub fn signed(&self, name: &str) -> Vec<u8> {
        self.signed_as(name, name)
    }

    /// The example (or fixture) `module`, signed with claims naming it `name`.
    pub fn signed_as(&self, module: &str, name: &str) -> Vec<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.sign(module, &Claims::new(name, "1.0.0", now))
    }

    /// The example (or fixture) `module`, signed with `claims`.
    pub fn sign(&self, module: &str, claims: &Claims) -> Vec<u8> {
        let bytes = std::fs::read(bins::wasm(module)).unwrap();
        bridge_signing::sign(&bytes, &self.key, claims)
            .unwrap()
            .module
    }
}
