//! `bridgectl sign`: sign a module (embedded or detached).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _, Result};
use bridge_signing::{
    inspect, sign, sign_detached, timefmt::format_rfc3339, Capabilities, Claims, DirGrant, KeyPair,
};
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::files::{default_output, loose_key_permissions, read, read_text, write_atomic};
use crate::timearg::{now_unix, parse_time};

/// Sign a wasm module.
///
/// Builds the claims (name, version, validity, capabilities) from the flags and signs them
/// with the module's SHA-256. By default the signature is embedded: the signed module, with a
/// `bridge.signature` custom section appended, is written to OUT (default: STEM.signed.wasm
/// beside STEM.wasm). With --detached, the module is left alone and the signature envelope is
/// written to OUT (default: MODULE.sig, e.g. hello.wasm.sig). Outputs are replaced atomically.
///
/// Signing an already-signed module replaces its signature (a note on stderr names the old
/// signer's key id); the result never has more than one signature section.
///
/// Capabilities not given are not granted: numeric limits then default to the agent's
/// defaults, and env/dirs to none. Prints `{"output", "detached", "key_id", "module_sha256",
/// "claims", "replaced_key_ids"}`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The wasm module to sign.
    #[arg(value_name = "MODULE.wasm")]
    pub module: PathBuf,
    /// The private key file (PKCS#8 PEM, as written by `bridgectl keygen`).
    #[arg(long, short = 'k', value_name = "KEY")]
    pub key: PathBuf,
    /// The handler's name, matching `[a-z0-9][a-z0-9._-]{0,63}`.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The handler's version (free-form, 1 to 64 characters).
    #[arg(long, value_name = "V", default_value = "0.0.0")]
    pub version: String,
    /// When the signature stops being valid (inclusive): RFC 3339 (2026-01-01T00:00:00Z) or
    /// unix seconds. Default: never.
    #[arg(long, value_name = "RFC3339|UNIX", value_parser = parse_time)]
    pub not_after: Option<u64>,
    /// The signing time to record: RFC 3339 or unix seconds. Default: now. Agents reject
    /// signatures issued more than 300 s in their future.
    #[arg(long, value_name = "RFC3339|UNIX", value_parser = parse_time)]
    pub issued_at: Option<u64>,
    /// Fuel the handler may use per run.
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,
    /// Linear memory the handler may use, in MiB (stored in the claims as bytes).
    #[arg(long, value_name = "N")]
    pub memory_mib: Option<u64>,
    /// Wall-clock time the handler may run, in milliseconds.
    #[arg(long, value_name = "N")]
    pub timeout_ms: Option<u64>,
    /// Bytes of stdout and of stderr the agent keeps per run.
    #[arg(long, value_name = "N")]
    pub output_bytes: Option<u64>,
    /// An environment variable the handler may read (repeatable).
    #[arg(long = "env", value_name = "NAME")]
    pub env: Vec<String>,
    /// A host directory the handler may open, read-only, or read-write with a ":rw" suffix
    /// (":ro" is also accepted). Absolute path. Repeatable.
    #[arg(long = "dir", value_name = "PATH[:rw]", value_parser = parse_dir)]
    pub dirs: Vec<DirGrant>,
    /// Write a detached signature file instead of embedding the signature.
    #[arg(long)]
    pub detached: bool,
    /// Output path (see above for the defaults). May be MODULE itself to sign in place.
    #[arg(long, short = 'o', value_name = "OUT")]
    pub out: Option<PathBuf>,
}

fn parse_dir(text: &str) -> Result<DirGrant, String> {
    let (path, write) = if let Some(p) = text.strip_suffix(":rw") {
        (p, true)
    } else if let Some(p) = text.strip_suffix(":ro") {
        (p, false)
    } else {
        (text, false)
    };
    Ok(DirGrant {
        path: path.to_string(),
        write,
    })
}

#[derive(Serialize)]
struct SignOutput {
    output: PathBuf,
    detached: bool,
    key_id: String,
    /// SHA-256 of the module without its signature sections: what the signature covers.
    code_sha256: String,
    /// SHA-256 of the module file to upload (the file written; with `--detached`, the module
    /// as given): what `run` and `install_handler` name.
    file_sha256: String,
    claims: Claims,
    /// Key ids of the signature sections removed (`null` for an undecodable one).
    replaced_key_ids: Vec<Option<String>>,
}

/// Runs `sign`.
pub fn run(args: SignArgs) -> Result<ExitCode> {
    let module = read(&args.module)?;
    if let Some(warning) = loose_key_permissions(&args.key) {
        eprintln!("{warning}");
    }
    let key = KeyPair::from_pem(&read_text(&args.key)?)
        .with_context(|| format!("cannot load the private key {}", args.key.display()))?;
    let memory_bytes = args
        .memory_mib
        .map(|m| {
            m.checked_mul(1 << 20)
                .ok_or_else(|| anyhow!("--memory-mib {m} is too large"))
        })
        .transpose()?;
    let claims = Claims {
        not_after: args.not_after,
        capabilities: Capabilities {
            fuel: args.fuel,
            memory_bytes,
            timeout_ms: args.timeout_ms,
            output_bytes: args.output_bytes,
            env: (!args.env.is_empty()).then_some(args.env),
            dirs: (!args.dirs.is_empty()).then_some(args.dirs),
        },
        ..Claims::new(
            args.name,
            args.version,
            args.issued_at.unwrap_or_else(now_unix),
        )
    };
    claims.validate().context("cannot sign")?;
    if let Some(t) = claims.not_after {
        if t < claims.issued_at {
            eprintln!(
                "bridgectl: warning: --not-after {} is before the issue time: the signature is already expired",
                format_rfc3339(t)
            );
        }
    }
    let out = args
        .out
        .unwrap_or_else(|| default_output(&args.module, args.detached));
    let what = format!("cannot sign {}", args.module.display());
    let (signature, replaced, file_sha256) = if args.detached {
        let existing = inspect(&module, None).context(what.clone())?;
        if existing.embedded_signatures > 0 {
            eprintln!(
                "bridgectl: note: {} also has an embedded signature{}; a verifier given the detached signature ignores it",
                args.module.display(),
                existing
                    .key_id
                    .map(|k| format!(" by key {k}"))
                    .unwrap_or_default()
            );
        }
        let sig = sign_detached(&module, &key, &claims).context(what)?;
        write_atomic(&out, &sig.envelope, None)?;
        (sig, Vec::new(), Sha256::digest(&module))
    } else {
        let signed = sign(&module, &key, &claims).context(what)?;
        for r in &signed.replaced {
            match r.key_id {
                Some(k) => eprintln!(
                    "bridgectl: note: replacing the existing signature of {} by key {k}",
                    args.module.display()
                ),
                None => eprintln!(
                    "bridgectl: note: replacing an existing (malformed) signature section of {}",
                    args.module.display()
                ),
            }
        }
        write_atomic(&out, &signed.module, None)?;
        let file_sha256 = Sha256::digest(&signed.module);
        (signed.signature, signed.replaced, file_sha256)
    };
    crate::print_json(&SignOutput {
        output: out,
        detached: args.detached,
        key_id: signature.key_id.to_string(),
        code_sha256: hex_string(&signature.module_sha256),
        file_sha256: hex_string(&file_sha256),
        claims: signature.claims,
        replaced_key_ids: replaced
            .iter()
            .map(|r| r.key_id.map(|k| k.to_string()))
            .collect(),
    });
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs() {
        let d = parse_dir("/data:rw").unwrap();
        assert_eq!((d.path.as_str(), d.write), ("/data", true));
        let d = parse_dir("/data").unwrap();
        assert_eq!((d.path.as_str(), d.write), ("/data", false));
        let d = parse_dir("/data:ro").unwrap();
        assert_eq!((d.path.as_str(), d.write), ("/data", false));
    }
}
