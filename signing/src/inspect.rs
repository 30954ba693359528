//! Looking at a module's signature without trusting anything.

use serde::{Serialize, Serializer};

use crate::claims::Claims;
use crate::envelope::Envelope;
use crate::keys::KeyId;
use crate::verify::SignatureSource;
use crate::wasm::{InvalidModule, ModuleLayout};

/// What [`inspect`] found. Nothing here is verified: the key id and claims are whatever the
/// envelope says. Serializes to JSON with hashes in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// Length of the module as given.
    pub module_len: usize,
    /// Length of the module without its signature sections.
    pub stripped_len: usize,
    /// SHA-256 of the module without its signature sections (what a signature covers).
    /// Serialized as `code_sha256`, the protocol's name for it.
    #[serde(serialize_with = "hex32", rename = "code_sha256")]
    pub module_sha256: [u8; 32],
    /// How many `bridge.signature` sections the module has (a verifier accepts at most one).
    pub embedded_signatures: usize,
    /// Whether there is a signature to look at (embedded, or the detached one given).
    pub signed: bool,
    /// Which signature was looked at: the detached one if given, else the embedded one.
    pub source: Option<SignatureSource>,
    /// The key id the envelope names.
    pub key_id: Option<KeyId>,
    /// The claims, if they parse and validate.
    pub claims: Option<Claims>,
    /// The raw claims text (lossy UTF-8), when the envelope could be decoded.
    pub claims_json: Option<String>,
    /// The Ed25519 signature in hex, when the envelope could be decoded.
    pub signature: Option<String>,
    /// What is wrong with the signature, if something visibly is (several sections, a bad
    /// envelope, invalid claims). `None` does not mean the signature is valid.
    pub problem: Option<String>,
}

fn hex32<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

/// Reports what `module` (and the `detached` signature, if given) claim, computing the
/// module's hash, without checking the signature or trusting any key. Fails only if the
/// module's section structure is broken.
pub fn inspect(module: &[u8], detached: Option<&[u8]>) -> Result<Inspection, InvalidModule> {
    let layout = ModuleLayout::parse(module)?;
    let (module_sha256, stripped_len) = layout.stripped_digest();
    let embedded_signatures = layout.signature_count();
    let mut out = Inspection {
        module_len: module.len(),
        stripped_len,
        module_sha256,
        embedded_signatures,
        signed: false,
        source: None,
        key_id: None,
        claims: None,
        claims_json: None,
        signature: None,
        problem: None,
    };
    if embedded_signatures > 1 {
        out.problem = Some(format!(
            "the module has {embedded_signatures} bridge.signature sections; at most one is allowed"
        ));
    }
    let (bytes, source) = match (detached, layout.signature_payloads().next()) {
        (Some(d), _) => (d, SignatureSource::Detached),
        (None, Some(e)) => (e, SignatureSource::Embedded),
        (None, None) => return Ok(out),
    };
    out.signed = true;
    out.source = Some(source);
    match Envelope::decode(bytes) {
        Err(e) => {
            out.problem.get_or_insert(e.to_string());
        }
        Ok(env) => {
            out.key_id = Some(env.key_id);
            out.claims_json = Some(String::from_utf8_lossy(&env.claims).into_owned());
            out.signature = Some(hex::encode(env.signature));
            match Claims::from_json(&env.claims) {
                Ok(c) => out.claims = Some(c),
                Err(e) => {
                    out.problem.get_or_insert(e.to_string());
                }
            }
        }
    }
    Ok(out)
}
