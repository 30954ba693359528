//! Verifying a module's signature against a [`TrustPolicy`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::claims::{Capabilities, Claims, Limit};
use crate::envelope::{signed_message, Envelope};
use crate::keys::{KeyId, PublicKey};
use crate::policy::TrustPolicy;
use crate::timefmt::format_rfc3339;
use crate::wasm::{InvalidModule, ModuleLayout};

/// How far in the future `issued_at` may be (seconds) before a signature is `not_yet_valid`:
/// tolerance for the signer's and the agent's clocks disagreeing.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// Why a module's signature was not accepted. Serialized in snake_case (`bad_signature`...),
/// the same strings [`RejectReason::as_str`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// No signature: no `bridge.signature` section and no detached signature.
    Unsigned,
    /// The Ed25519 signature does not verify: the module, the claims or the signature were
    /// changed after signing, or a detached signature belongs to another module.
    BadSignature,
    /// The signing key is not in the policy.
    UnknownKey,
    /// The signing key's id is in the policy's `revoked` list.
    RevokedKey,
    /// `not_after` is in the past.
    Expired,
    /// `issued_at` is more than [`CLOCK_SKEW_SECS`] in the future.
    NotYetValid,
    /// The name or a capability is beyond what the policy lets the key sign.
    OutOfScope,
    /// The signature is there but cannot be decoded: two or more signature sections, a bad
    /// envelope, or claims that are not valid (unknown fields included).
    MalformedSignature,
}

impl RejectReason {
    /// The machine-readable code, e.g. `"bad_signature"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unsigned => "unsigned",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::RevokedKey => "revoked_key",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::OutOfScope => "out_of_scope",
            RejectReason::MalformedSignature => "malformed_signature",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected signature: the machine-readable reason and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// Details: the key id, the expiry time, the capability exceeded...
    pub message: String,
    /// The key id the envelope names, when it could be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
}

impl Rejection {
    fn new(reason: RejectReason, message: impl Into<String>, key_id: Option<KeyId>) -> Self {
        Rejection {
            reason,
            message: message.into(),
            key_id,
        }
    }
}

/// Why [`verify`] did not accept a module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The module's section structure is broken: report `invalid_module`, not a signature
    /// problem.
    #[error(transparent)]
    InvalidModule(#[from] InvalidModule),
    /// The module is well-formed but its signature is not acceptable.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

impl VerifyError {
    /// The machine-readable code: `"invalid_module"` or the [`RejectReason`]'s.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::InvalidModule(_) => "invalid_module",
            VerifyError::Rejected(r) => r.reason.as_str(),
        }
    }

    /// The rejection, if this is one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            VerifyError::Rejected(r) => Some(r),
            VerifyError::InvalidModule(_) => None,
        }
    }
}

/// Where the envelope that was checked came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureSource {
    /// The module's `bridge.signature` custom section.
    Embedded,
    /// A detached signature supplied beside the module.
    Detached,
}

/// A module whose signature was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signing key's id.
    pub key_id: KeyId,
    /// The signing key.
    pub public_key: PublicKey,
    /// The policy's label for the key, if any.
    pub key_label: Option<String>,
    /// The signed claims.
    pub claims: Claims,
    /// The claims exactly as signed.
    pub claims_json: Vec<u8>,
    /// SHA-256 of the module with its signature sections removed: identifies the code that
    /// was signed (a good cache key: re-signing does not change it).
    pub module_sha256: [u8; 32],
    /// Length of the module with its signature sections removed.
    pub stripped_len: usize,
    /// Whether the embedded or a detached signature was checked.
    pub source: SignatureSource,
    /// The key's capability ceilings from the policy (`None`: none).
    pub key_max: Option<Capabilities>,
}

impl Verified {
    /// [`Verified::module_sha256`] as 64 lowercase hex characters.
    pub fn module_sha256_hex(&self) -> String {
        hex::encode(self.module_sha256)
    }

    /// The most a run of this handler may get for `limit`, from its signature alone: what the
    /// claims declare (or `agent_default` if they declare nothing), capped by the key's `max`
    /// in the policy. The agent then applies its own maximums (and any task request) on top.
    pub fn capped_limit(&self, limit: Limit, agent_default: u64) -> u64 {
        let asked = self
            .claims
            .capabilities
            .limit(limit)
            .unwrap_or(agent_default);
        match self.key_max.as_ref().and_then(|m| m.limit(limit)) {
            Some(ceiling) => asked.min(ceiling),
            None => asked,
        }
    }

    /// The environment variable names the handler may read (none if it declared none).
    pub fn env(&self) -> &[String] {
        self.claims.capabilities.env.as_deref().unwrap_or(&[])
    }

    /// The directories the handler may open (none if it declared none).
    pub fn dirs(&self) -> &[crate::claims::DirGrant] {
        self.claims.capabilities.dirs.as_deref().unwrap_or(&[])
    }
}

/// Verifies `module`'s signature against `policy` at time `now_unix` (unix seconds).
///
/// `detached` is the content of a detached signature file, if one was supplied; it then takes
/// the place of any embedded signature, which is ignored (not even decoded). Checks, in
/// order, stopping at the first failure:
///
/// 1. section structure → [`VerifyError::InvalidModule`];
/// 2. two or more `bridge.signature` sections → `malformed_signature` (even with `detached`);
///    no signature at all → `unsigned`;
/// 3. envelope framing → `malformed_signature`;
/// 4. key id revoked → `revoked_key`;
/// 5. key id not trusted → `unknown_key`;
/// 6. Ed25519 signature over the signed message → `bad_signature`;
/// 7. claims JSON and rules → `malformed_signature`;
/// 8. `not_after < now` → `expired`; `issued_at > now + 300` → `not_yet_valid`;
/// 9. name and capabilities within the key's scope → `out_of_scope`.
pub fn verify(
    module: &[u8],
    detached: Option<&[u8]>,
    policy: &TrustPolicy,
    now_unix: u64,
) -> Result<Verified, VerifyError> {
    use RejectReason::*;
    let layout = ModuleLayout::parse(module)?;
    let count = layout.signature_count();
    if count > 1 {
        return Err(Rejection::new(
            MalformedSignature,
            format!("the module has {count} bridge.signature sections; at most one is allowed"),
            None,
        )
        .into());
    }
    let (envelope_bytes, source) =
        match (detached, layout.signature_payloads().next()) {
            (Some(d), _) => (d, SignatureSource::Detached),
            (None, Some(e)) => (e, SignatureSource::Embedded),
            (None, None) => return Err(Rejection::new(
                Unsigned,
                "the module has no bridge.signature section and no detached signature was given",
                None,
            )
            .into()),
        };
    let envelope = Envelope::decode(envelope_bytes)
        .map_err(|e| Rejection::new(MalformedSignature, e.to_string(), None))?;
    let key_id = envelope.key_id;
    let reject = |reason, message: String| -> VerifyError {
        Rejection::new(reason, message, Some(key_id)).into()
    };
    if policy.is_revoked(&key_id) {
        return Err(reject(
            RevokedKey,
            format!("signing key {key_id} is revoked"),
        ));
    }
    let Some(trusted) = policy.find(&key_id) else {
        return Err(reject(
            UnknownKey,
            format!("signing key {key_id} is not a trusted key"),
        ));
    };
    let (module_sha256, stripped_len) = layout.stripped_digest();
    let message = signed_message(&module_sha256, &envelope.claims);
    if !trusted.key.verify(&message, &envelope.signature) {
        let what = match source {
            SignatureSource::Embedded => "the embedded signature",
            SignatureSource::Detached => "the detached signature",
        };
        return Err(reject(
            BadSignature,
            format!(
                "{what} by key {} does not match this module (code_sha256 {}) and its claims",
                trusted.describe(),
                hex::encode(module_sha256)
            ),
        ));
    }
    let claims = Claims::from_json(&envelope.claims)
        .map_err(|e| reject(MalformedSignature, e.to_string()))?;
    if let Some(not_after) = claims.not_after {
        if not_after < now_unix {
            return Err(reject(
                Expired,
                format!(
                    "the signature of {:?} expired at {} (not_after {not_after}; now {})",
                    claims.name,
                    format_rfc3339(not_after),
                    format_rfc3339(now_unix)
                ),
            ));
        }
    }
    if claims.issued_at > now_unix.saturating_add(CLOCK_SKEW_SECS) {
        return Err(reject(
            NotYetValid,
            format!(
                "the signature of {:?} is issued at {} (issued_at {}), more than {CLOCK_SKEW_SECS} s after now ({})",
                claims.name,
                format_rfc3339(claims.issued_at),
                claims.issued_at,
                format_rfc3339(now_unix)
            ),
        ));
    }
    trusted
        .check_scope(&claims)
        .map_err(|m| reject(OutOfScope, m))?;
    Ok(Verified {
        key_id,
        public_key: trusted.key,
        key_label: trusted.label.clone(),
        claims,
        claims_json: envelope.claims,
        module_sha256,
        stripped_len,
        source,
        key_max: trusted.max.clone(),
    })
}
