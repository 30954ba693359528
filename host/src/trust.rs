//! What may run: signature verification and the trust policy, enforced before anything of a
//! module is compiled.
//!
//! Every module is checked with [`bridge_signing::verify`] against the agent's [`TrustPolicy`]
//! (trusted publisher keys, each optionally scoped to handler names and capability ceilings,
//! and a revocation list). A refused module becomes a `rejected` result with a machine-readable
//! reason (`unsigned`, `bad_signature`, `unknown_key`, `revoked_key`, `expired`,
//! `not_yet_valid`, `out_of_scope`, `malformed_signature`) and is neither compiled nor run.
//!
//! A verified module's signed claims bound its run: each limit is the smallest of what the
//! claims declare, what the task asks and the local maximum; an environment variable or a
//! directory the claims do not declare is not granted, whatever the task says.
//!
//! Verification happens once per module: results are cached by the SHA-256 of the module bytes
//! (and of the detached signature, if any), so a warm run pays nothing for it. Only the time
//! bounds (`not_after`, `issued_at`) are rechecked on a cache hit, because they change with the
//! clock.
//!
//! Unsigned modules run only with an explicit development override (`--allow-unsigned`), which
//! is logged as a warning each time. A config file forbids it unless it sets
//! `[trust] allow_unsigned_override = true`; without a config file the flag alone decides.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use bridge_signing::{
    KeyId, Limit, PublicKey, RejectReason, TrustPolicy, TrustedKey, Verified, VerifyError,
};
use lru::LruCache;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::limits::{LimitRequest, Limits};
use crate::outcome::{RunResult, Status};
use crate::sandbox::{CompiledModule, DirGrant, RunSpec, Sandbox};

/// The config file's `[trust]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Trusted publisher keys: `{ key = "ed25519:…", label?, names? = ["hello", "log*"], max? = {…} }`.
    #[serde(default)]
    pub keys: Vec<TrustedKey>,
    /// Revoked key ids (32 hex characters); a module signed by one is `revoked_key`.
    #[serde(default)]
    pub revoked: Vec<KeyId>,
    /// Whether the development override `--allow-unsigned` is honoured when the agent runs with
    /// this config file (default false: unsigned modules are refused whatever the flags say).
    /// Without any config file there is no policy to forbid it, and the flag alone decides.
    #[serde(default)]
    pub allow_unsigned_override: bool,
    /// `--trusted-key` flags: publisher keys (`ed25519:…`, or `@FILE` / a path to a file
    /// holding one) trusted on top of `keys`. Not a key of the file.
    #[serde(skip)]
    pub flag_keys: Vec<String>,
    /// `--allow-unsigned`: the development override asked for on the command line, honoured as
    /// `allow_unsigned_override` allows. Not a key of the file.
    #[serde(skip)]
    pub allow_unsigned: bool,
}

impl TrustSection {
    /// Builds the policy these settings describe (duplicate keys and bad ceilings are errors).
    pub fn policy(&self) -> Result<TrustPolicy> {
        let mut policy = TrustPolicy::new();
        for key in &self.keys {
            if let Some(max) = &key.max {
                max.validate()
                    .map_err(|e| anyhow::anyhow!("trust key {}: bad `max`: {e}", key.key_id()))?;
            }
            policy = policy.trust(key.clone())?;
        }
        for id in &self.revoked {
            policy = policy.revoke(*id);
        }
        Ok(policy)
    }
}

/// A module that passed the trust policy and is compiled, ready to run.
#[derive(Clone)]
pub struct Prepared {
    /// The compiled module.
    pub module: Arc<CompiledModule>,
    /// Its verified signature; `None` when it runs unsigned under the development override.
    pub verified: Option<Arc<Verified>>,
}

/// The agent's trust decisions, with the verify-once cache.
pub struct Trust {
    policy: TrustPolicy,
    allow_unsigned: bool,
    verified: Mutex<LruCache<[u8; 32], Arc<Verified>>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rejected(reason: RejectReason, message: impl Into<String>) -> Box<RunResult> {
    let mut r = RunResult::refused(Status::Rejected, message);
    r.reason = Some(reason.as_str().to_string());
    Box::new(r)
}

impl Trust {
    /// A trust decision-maker for `policy`. `allow_unsigned` is the development override,
    /// already reconciled with the config (see [`TrustSection::allow_unsigned_override`]).
    pub fn new(policy: TrustPolicy, allow_unsigned: bool) -> Trust {
        Trust {
            policy,
            allow_unsigned,
            verified: Mutex::new(LruCache::new(NonZeroUsize::new(1024).expect("non-zero"))),
        }
    }

    /// The agent's trust from its settings: the `[trust]` table's keys plus the keys given as
    /// `--trusted-key` flags, and the development override `--allow-unsigned` as the table
    /// allows it. `config_file` is the file the table was read from: without one there is no
    /// policy to forbid the override, and the flag alone decides.
    pub fn from_settings(
        section: &TrustSection,
        config_file: Option<&std::path::Path>,
    ) -> Result<Trust> {
        let mut policy = section.policy()?;
        let allow_unsigned = section.allow_unsigned;
        for spec in &section.flag_keys {
            let key = parse_public_key(spec)?;
            if policy.find(&key.key_id()).is_none() {
                policy = policy.trust(TrustedKey::new(key))?;
            }
        }
        if allow_unsigned && !section.allow_unsigned_override {
            if let Some(file) = config_file {
                return Err(anyhow!(
                    "--allow-unsigned is forbidden by the config {} ([trust] allow_unsigned_override is \
                     false unless the file sets it to true, for a development agent)",
                    file.display()
                ));
            }
        }
        Ok(Trust::new(policy, allow_unsigned))
    }

    /// The policy in force.
    pub fn policy(&self) -> &TrustPolicy {
        &self.policy
    }

    /// Checks `module` (with an optional detached signature) against the policy, then loads it
    /// into `sandbox`. Refusals are ready-to-return results: `rejected` with a reason, or
    /// `invalid_module`. Nothing of a refused module is compiled.
    pub fn prepare(
        &self,
        sandbox: &Sandbox,
        module: &[u8],
        detached: Option<&[u8]>,
    ) -> Result<Prepared, Box<RunResult>> {
        sandbox.precheck(module)?;
        let sha256: [u8; 32] = Sha256::digest(module).into();
        let tag = |mut r: Box<RunResult>| {
            r.file_sha256 = Some(hex::encode(sha256));
            // The hash a signature covers, when the module parses that far.
            r.code_sha256 = bridge_signing::inspect(module, None)
                .ok()
                .map(|i| hex::encode(i.module_sha256));
            r
        };
        let verified = self.check(module, &sha256, detached).map_err(tag)?;
        let compiled = sandbox.load_hashed(module, sha256).map_err(tag)?;
        Ok(Prepared {
            module: compiled,
            verified,
        })
    }

    /// A module verified and compiled before, found by hash alone: a warm run reads no bytes
    /// and verifies nothing again (only the expiry is rechecked).
    pub fn cached(
        &self,
        sandbox: &Sandbox,
        sha256: &[u8; 32],
        detached: Option<&[u8]>,
    ) -> Option<Prepared> {
        let key = cache_key(sha256, detached);
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()?;
        if verified.claims.not_after.is_some_and(|na| now_unix() > na) {
            return None; // the full path reports `expired`
        }
        let module = sandbox.cached(sha256)?;
        Some(Prepared {
            module,
            verified: Some(verified),
        })
    }

    fn check(
        &self,
        module: &[u8],
        sha256: &[u8; 32],
        detached: Option<&[u8]>,
    ) -> Result<Option<Arc<Verified>>, Box<RunResult>> {
        let now = now_unix();
        let key = cache_key(sha256, detached);
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(v) = cached {
            // Verified before; only the clock can have changed the verdict.
            if let Some(na) = v.claims.not_after.filter(|na| now > *na) {
                return Err(rejected(
                    RejectReason::Expired,
                    format!("the signature expired at unix time {na}"),
                ));
            }
            return Ok(Some(v));
        }
        match bridge_signing::verify(module, detached, &self.policy, now) {
            Ok(v) => {
                tracing::info!(
                    handler = %v.claims.name, version = %v.claims.version, key_id = %v.key_id,
                    "module signature verified"
                );
                let v = Arc::new(v);
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(key, v.clone());
                Ok(Some(v))
            }
            Err(VerifyError::InvalidModule(e)) => Err(Box::new(RunResult::refused(
                Status::InvalidModule,
                format!("not a valid WebAssembly module: {e}"),
            ))),
            Err(VerifyError::Rejected(r))
                if r.reason == RejectReason::Unsigned && self.allow_unsigned =>
            {
                tracing::warn!(
                    sha256 = %hex::encode(sha256),
                    "running an UNSIGNED module under the development override (--allow-unsigned)"
                );
                Ok(None)
            }
            Err(VerifyError::Rejected(r)) => {
                tracing::warn!(reason = r.reason.as_str(), sha256 = %hex::encode(sha256), "module refused: {}", r.message);
                Err(rejected(r.reason, r.message))
            }
        }
    }
}

/// Reads a `--trusted-key`: `ed25519:…` text, or `@FILE` / a path to a file holding it.
pub fn parse_public_key(spec: &str) -> Result<PublicKey> {
    let text = if spec.starts_with("ed25519:") {
        spec.to_string()
    } else {
        let path = spec.strip_prefix('@').unwrap_or(spec);
        std::fs::read_to_string(path)
            .map_err(|e| anyhow!("--trusted-key {spec}: cannot read {path}: {e}"))?
    };
    text.trim()
        .parse()
        .map_err(|e| anyhow!("--trusted-key {spec}: {e}"))
}

/// The verify-once cache key: the module's hash, combined with the detached signature's.
fn cache_key(sha256: &[u8; 32], detached: Option<&[u8]>) -> [u8; 32] {
    match detached {
        None => *sha256,
        Some(sig) => Sha256::new()
            .chain_update(sha256)
            .chain_update(Sha256::digest(sig))
            .finalize()
            .into(),
    }
}

/// What a verified handler's claims allow of a task's request: the run's limit ceiling, the
/// granted environment and directories, and what was taken away (for `limits.clamped`).
pub struct Granted {
    /// The task's request, completed with what the claims declare where the task is silent.
    pub request: LimitRequest,
    /// The claims' ceiling (capped by the key's `max`).
    pub ceiling: Option<LimitRequest>,
    /// Environment variables both asked for and declared.
    pub env: Vec<(String, String)>,
    /// Directories both asked for and declared (writable only if both say so).
    pub dirs: Vec<DirGrant>,
    /// What was asked for but not granted: `env:NAME`, `dir:/path`, `dir:/path:write`.
    pub denied: Vec<String>,
}

impl Granted {
    /// The run's spec: argv is `name` followed by `args`; what was denied goes to the result's
    /// `limits.clamped`.
    pub fn into_spec(self, input: Vec<u8>, name: String, args: &[String]) -> RunSpec {
        RunSpec {
            input,
            args: std::iter::once(name).chain(args.iter().cloned()).collect(),
            env: self.env,
            dirs: self.dirs,
            limits: self.request,
            ceiling: self.ceiling,
            denied: self.denied,
            ..RunSpec::default()
        }
    }
}

/// Applies a verified handler's claims to a task's request (unsigned: passes it through).
pub fn grant(
    verified: Option<&Verified>,
    request: LimitRequest,
    defaults: &Limits,
    env: Vec<(String, String)>,
    dirs: Vec<DirGrant>,
) -> Granted {
    let Some(v) = verified else {
        return Granted {
            request,
            ceiling: None,
            env,
            dirs,
            denied: Vec::new(),
        };
    };
    let caps = &v.claims.capabilities;
    let request = LimitRequest {
        fuel: request.fuel.or(caps.fuel),
        memory_bytes: request.memory_bytes.or(caps.memory_bytes),
        timeout_ms: request.timeout_ms.or(caps.timeout_ms),
        output_bytes: request.output_bytes.or(caps.output_bytes),
    };
    let ceiling = LimitRequest {
        fuel: Some(v.capped_limit(Limit::Fuel, defaults.fuel)),
        memory_bytes: Some(v.capped_limit(Limit::MemoryBytes, defaults.memory_bytes)),
        timeout_ms: Some(v.capped_limit(Limit::TimeoutMs, defaults.timeout_ms)),
        output_bytes: Some(v.capped_limit(Limit::OutputBytes, defaults.output_bytes)),
    };
    let mut denied = Vec::new();
    let env = env
        .into_iter()
        .filter(|(name, _)| {
            let ok = v.env().iter().any(|n| n == name);
            if !ok {
                denied.push(format!("env:{name}"));
            }
            ok
        })
        .collect();
    let dirs = dirs
        .into_iter()
        .filter_map(|mut d| match v.dirs().iter().find(|g| g.path == d.guest) {
            None => {
                denied.push(format!("dir:{}", d.guest));
                None
            }
            Some(declared) => {
                if d.writable && !declared.write {
                    denied.push(format!("dir:{}:write", d.guest));
                    d.writable = false;
                }
                Some(d)
            }
        })
        .collect();
    Granted {
        request,
        ceiling: Some(ceiling),
        env,
        dirs,
        denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trust_section_parses_and_rejects_unknown_keys() {
        let key = bridge_signing::KeyPair::from_seed(&[7u8; 32]).public_key();
        let text = format!(
            "keys = [{{ key = \"{key}\", names = [\"hello\"], max = {{ fuel = 1000 }} }}]\nrevoked = [\"{}\"]\n",
            "00".repeat(16)
        );
        let t: TrustSection = toml::from_str(&text).unwrap();
        assert!(!t.allow_unsigned_override);
        let policy = t.policy().unwrap();
        assert_eq!(policy.keys().len(), 1);
        assert!(toml::from_str::<TrustSection>("keyz = []").is_err());
    }

    #[test]
    fn flags_add_keys_and_the_config_file_gates_the_override() {
        let key = bridge_signing::KeyPair::from_seed(&[7u8; 32]).public_key();
        let flags = |keys: &[String], allow_unsigned| TrustSection {
            flag_keys: keys.to_vec(),
            allow_unsigned,
            ..TrustSection::default()
        };
        let trust = Trust::from_settings(&flags(&[key.to_string()], true), None).unwrap();
        assert_eq!(trust.policy().keys().len(), 1);
        let file = std::path::Path::new("/etc/bridge/agent.toml");
        let err = Trust::from_settings(&flags(&[], true), Some(file))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("forbidden by the config /etc/bridge/agent.toml"),
            "{err}"
        );
        let allowing = TrustSection {
            allow_unsigned_override: true,
            ..flags(&[], true)
        };
        assert!(Trust::from_settings(&allowing, Some(file)).is_ok());
        let err = Trust::from_settings(&flags(&["ed25519:nope".into()], false), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("--trusted-key ed25519:nope: "), "{err}");
    }
}
