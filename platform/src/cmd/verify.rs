//! `bridgectl verify`: check a module's signature as an agent would.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use bridge_signing::{
    verify, Claims, KeyId, PublicKey, SignatureSource, TrustPolicy, TrustedKey, VerifyError,
};
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmd::sign::hex_string;
use crate::files::{read, read_text};
use crate::timearg::{now_unix, parse_time};

/// Verify a module's signature as an agent would.
///
/// The trust policy is made of the --trusted-key keys (any name, no capability ceilings) and
/// --revoked key ids, added to the policy file given with --policy, if any. The embedded
/// signature is checked, or the detached one given with --signature (which then takes the
/// place of any embedded one).
///
/// Valid: prints `{"valid": true, "key_id", "claims", "code_sha256", "file_sha256", "source"}`
/// and exits 0 (`code_sha256`: the module without its signature sections, what the signature
/// covers; `file_sha256`: the file as given, what `run` names).
/// Invalid: prints `{"valid": false, "reason", "message", "key_id"}` and exits 1; reason is one
/// of unsigned, bad_signature, unknown_key, revoked_key, expired, not_yet_valid, out_of_scope,
/// malformed_signature, or invalid_module (the file's wasm structure is broken).
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("trust").required(true).multiple(true).args(["trusted_keys", "policy"]))]
pub struct VerifyArgs {
    /// The wasm module to verify.
    #[arg(value_name = "MODULE.wasm")]
    pub module: PathBuf,
    /// A trusted public key: `ed25519:...`, or @FILE to read it from a public key file
    /// (such as KEY.pub from keygen). Repeatable.
    #[arg(long = "trusted-key", value_name = "PUB|@FILE")]
    pub trusted_keys: Vec<String>,
    /// A revoked key id (32 hex characters). Repeatable.
    #[arg(long = "revoked", value_name = "KEYID")]
    pub revoked: Vec<KeyId>,
    /// A trust policy file: TOML with `revoked = [...]` and `[[keys]]` tables (key, names,
    /// max), the same table the agent's config holds.
    #[arg(long, value_name = "FILE.toml")]
    pub policy: Option<PathBuf>,
    /// A detached signature file to verify instead of the embedded signature.
    #[arg(long, value_name = "FILE.sig")]
    pub signature: Option<PathBuf>,
    /// Verify as of this time (RFC 3339 or unix seconds) instead of now.
    #[arg(long, value_name = "RFC3339|UNIX", value_parser = parse_time)]
    pub now: Option<u64>,
}

fn load_key(spec: &str) -> Result<PublicKey> {
    match spec.strip_prefix('@') {
        Some(file) => {
            let text = read_text(file.as_ref())?;
            PublicKey::from_file_contents(&text)
                .with_context(|| format!("{file} is not a public key file"))
        }
        None => spec
            .parse()
            .with_context(|| "--trusted-key takes ed25519:... or @FILE".to_string()),
    }
}

#[derive(Serialize)]
struct Valid {
    valid: bool,
    key_id: String,
    claims: Claims,
    code_sha256: String,
    file_sha256: String,
    source: SignatureSource,
}

#[derive(Serialize)]
struct Invalid {
    valid: bool,
    reason: &'static str,
    message: String,
    key_id: Option<String>,
}

/// Runs `verify`.
pub fn run(args: VerifyArgs) -> Result<ExitCode> {
    let mut policy = match &args.policy {
        Some(path) => toml::from_str::<TrustPolicy>(&read_text(path)?)
            .with_context(|| format!("invalid trust policy {}", path.display()))?,
        None => TrustPolicy::new(),
    };
    for spec in &args.trusted_keys {
        let key = load_key(spec)?;
        if policy.find(&key.key_id()).is_none() {
            policy = policy.trust(TrustedKey::new(key))?;
        }
    }
    for id in args.revoked {
        policy = policy.revoke(id);
    }
    let module = read(&args.module)?;
    let detached = args.signature.as_deref().map(read).transpose()?;
    let now = args.now.unwrap_or_else(now_unix);
    match verify(&module, detached.as_deref(), &policy, now) {
        Ok(v) => {
            crate::print_json(&Valid {
                valid: true,
                key_id: v.key_id.to_string(),
                claims: v.claims,
                code_sha256: hex_string(&v.module_sha256),
                file_sha256: hex_string(&Sha256::digest(&module)),
                source: v.source,
            });
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let key_id = e.rejection().and_then(|r| r.key_id).map(|k| k.to_string());
            let message = match &e {
                VerifyError::InvalidModule(m) => m.to_string(),
                VerifyError::Rejected(r) => r.message.clone(),
            };
            crate::print_json(&Invalid {
                valid: false,
                reason: e.code(),
                message,
                key_id,
            });
            Ok(ExitCode::from(1))
        }
    }
}
