//! Signing modules: embedded (a `bridge.signature` section appended) or detached.

use crate::claims::{Claims, ClaimsError, MAX_CLAIMS_LEN};
use crate::envelope::{signed_message, Envelope};
use crate::keys::{KeyId, KeyPair};
use crate::wasm::{signature_section, InvalidModule, ModuleLayout};

/// Why a module could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// The module's section structure is broken.
    #[error(transparent)]
    InvalidModule(#[from] InvalidModule),
    /// The claims would not pass verification (bad name, unknown field, too long...).
    #[error(transparent)]
    InvalidClaims(#[from] ClaimsError),
}

/// A signature that was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The envelope: the section payload, or the whole content of a detached `.sig` file.
    pub envelope: Vec<u8>,
    /// The signing key's id.
    pub key_id: KeyId,
    /// The claims signed.
    pub claims: Claims,
    /// The claims bytes exactly as signed.
    pub claims_json: Vec<u8>,
    /// SHA-256 of the module without signature sections (what the signature covers).
    pub module_sha256: [u8; 32],
    /// Length of the module without signature sections.
    pub stripped_len: usize,
}

/// A signature section that signing removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplacedSignature {
    /// The key id it named, or `None` if its envelope could not be decoded.
    pub key_id: Option<KeyId>,
}

/// A module with a signature embedded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedModule {
    /// The signed module: the input without its old `bridge.signature` sections, with the new
    /// one appended at the end.
    pub module: Vec<u8>,
    /// The new signature.
    pub signature: Signature,
    /// The signature sections that were there before and have been removed (usually none or
    /// one). Signing an already-signed module deliberately replaces its signature.
    pub replaced: Vec<ReplacedSignature>,
}

/// Signs `module` with `key`, embedding the signature in a `bridge.signature` custom section
/// appended at the end. Any existing signature section is removed first (and reported in
/// [`SignedModule::replaced`]), so the result never has more than one.
///
/// The claims are serialized with [`Claims::to_json`]; they are validated first, so a
/// signature is never made over claims a verifier would reject as malformed.
pub fn sign(module: &[u8], key: &KeyPair, claims: &Claims) -> Result<SignedModule, SigningError> {
    claims.validate()?;
    sign_with_claims_json(module, key, &claims.to_json())
}

/// Like [`sign`], but signs exactly the given claims bytes (which must parse and validate as
/// [`Claims`]).
pub fn sign_with_claims_json(
    module: &[u8],
    key: &KeyPair,
    claims_json: &[u8],
) -> Result<SignedModule, SigningError> {
    let layout = ModuleLayout::parse(module)?;
    let replaced = layout
        .signature_payloads()
        .map(|p| ReplacedSignature {
            key_id: Envelope::decode(p).ok().map(|e| e.key_id),
        })
        .collect();
    let signature = make_signature(&layout, key, claims_json)?;
    let mut out = layout.stripped().into_owned();
    out.extend_from_slice(&signature_section(&signature.envelope));
    Ok(SignedModule {
        module: out,
        signature,
        replaced,
    })
}

/// Makes a detached signature for `module`: the envelope to store in a separate file
/// (conventionally `MODULE.wasm.sig`). The module is not changed; any signature section it has
/// is left out of the hash, exactly as a verifier does.
pub fn sign_detached(
    module: &[u8],
    key: &KeyPair,
    claims: &Claims,
) -> Result<Signature, SigningError> {
    claims.validate()?;
    sign_detached_with_claims_json(module, key, &claims.to_json())
}

/// Like [`sign_detached`], but signs exactly the given claims bytes.
pub fn sign_detached_with_claims_json(
    module: &[u8],
    key: &KeyPair,
    claims_json: &[u8],
) -> Result<Signature, SigningError> {
    let layout = ModuleLayout::parse(module)?;
    make_signature(&layout, key, claims_json)
}

fn make_signature(
    layout: &ModuleLayout<'_>,
    key: &KeyPair,
    claims_json: &[u8],
) -> Result<Signature, SigningError> {
    if claims_json.len() > MAX_CLAIMS_LEN {
        return Err(ClaimsError::Invalid(format!(
            "claims are {} bytes, more than the {MAX_CLAIMS_LEN} allowed",
            claims_json.len()
        ))
        .into());
    }
    let claims = Claims::from_json(claims_json)?;
    let (module_sha256, stripped_len) = layout.stripped_digest();
    let message = signed_message(&module_sha256, claims_json);
    let envelope = Envelope {
        key_id: key.key_id(),
        claims: claims_json.to_vec(),
        signature: key.sign(&message),
    };
    Ok(Signature {
        envelope: envelope.encode(),
        key_id: envelope.key_id,
        claims,
        claims_json: envelope.claims,
        module_sha256,
        stripped_len,
    })
}
