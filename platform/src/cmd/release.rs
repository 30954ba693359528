//! `bridgectl release sign|verify`: signed release manifests of the agent binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use bridge_signing::release::{sign_manifest, sign_manifest_gzip, Manifest, ReleaseError};
use bridge_signing::{KeyPair, PublicKey};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::files::{loose_key_permissions, read_at_most, read_text, write_atomic, OUTPUT_MODE};
use crate::release::{
    archive_path, gunzip_matches, gzip, try_read_archive, try_read_binary, try_read_manifest,
    MANIFEST_SUFFIX, MAX_BINARY,
};

/// Sign and verify release manifests: what an agent binary is (version, OS, architecture,
/// size, SHA-256), signed by a release key, as agents and install.sh check it before they
/// install the binary.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ReleaseCommand,
}

/// The `release` subcommands.
#[derive(Debug, Subcommand)]
#[allow(missing_docs)]
pub enum ReleaseCommand {
    Sign(ReleaseSignArgs),
    Verify(ReleaseVerifyArgs),
}

/// Write the signed release manifest of an agent binary, and its gzip archive.
///
/// The manifest (docs/updates.md) names the version, OS, architecture, size and SHA-256 of
/// BINARY and the id of the release key, and is signed with that key (a `bridgectl keygen`
/// key, the one the agents list in `update.release_keys` and install.sh is given with
/// --release-key). Format 2 (the default) also writes BINARY's gzip archive (best compression)
/// to ARCHIVE (default BINARY.gz) and names its size and SHA-256: agents and install.sh fetch
/// the archive. Format 1 names the binary only (what agents and installers older than format 2
/// read). The manifest is written to OUT (default BINARY.manifest); each file is replaced
/// atomically. Prints `{"output", "format", "archive", "version", "os", "arch", "size",
/// "sha256", "archive_size", "archive_sha256", "key_id"}` (`archive…`: null in format 1).
#[derive(Debug, Args)]
pub struct ReleaseSignArgs {
    /// The agent binary (`bridge-daemon`).
    #[arg(value_name = "BINARY")]
    pub binary: PathBuf,
    /// The release key: a private key file (PKCS#8 PEM, as written by `bridgectl keygen`).
    #[arg(long, short = 'k', value_name = "KEY")]
    pub key: PathBuf,
    /// The version the binary reports (semantic versioning, e.g. 0.2.0).
    #[arg(long, value_name = "V")]
    pub version: String,
    /// The OS the binary is for.
    #[arg(long, value_name = "OS", default_value = "linux")]
    pub os: String,
    /// The architecture the binary is for, as `uname -m` prints it (x86_64, aarch64…).
    /// Default: this machine's.
    #[arg(long, value_name = "ARCH", default_value = std::env::consts::ARCH)]
    pub arch: String,
    /// Where to write the manifest (default: BINARY.manifest).
    #[arg(long, short = 'o', value_name = "OUT")]
    pub out: Option<PathBuf>,
    /// The manifest format: 2, the binary served as a gzip archive; 1, the binary itself.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub format: u8,
    /// Where to write the gzip archive, format 2 (default: BINARY.gz; `update` and `rollout`
    /// read it there).
    #[arg(long, value_name = "ARCHIVE")]
    pub archive: Option<PathBuf>,
}

/// Check a release manifest's signature, and that a binary is the one it describes.
///
/// Valid: prints `{"valid": true, "version", "os", "arch", "size", "sha256", "key_id",
/// "binary"}` (`binary`: the file checked against the manifest's size and SHA-256, or null)
/// and exits 0. Invalid: prints `{"valid": false, "reason", "message"}` and exits 1; reason is
/// malformed_manifest, unknown_key (no --key has the manifest's key id), bad_signature or
/// mismatch (the binary's or the archive's size or SHA-256 is not the manifest's, or the
/// archive does not unpack to the binary it names).
#[derive(Debug, Args)]
pub struct ReleaseVerifyArgs {
    /// The manifest file.
    #[arg(value_name = "MANIFEST")]
    pub manifest: PathBuf,
    /// A release public key: `ed25519:...`, or a public key file (KEY.pub from keygen; `@FILE`
    /// also works). Repeatable: the manifest's key must be one of them.
    #[arg(long = "key", short = 'k', value_name = "PUB", required = true)]
    pub keys: Vec<String>,
    /// The binary to check against the manifest (size and SHA-256).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// The gzip archive to check against a format-2 manifest: its size and SHA-256, then what
    /// it unpacks to (no further than one byte past the binary's size) against the binary's.
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
}

/// What a manifest says of its binary, as `sign` and `verify` print it.
#[derive(Serialize)]
struct Described {
    format: u8,
    version: String,
    os: String,
    arch: String,
    size: u64,
    sha256: String,
    archive_size: Option<u64>,
    archive_sha256: Option<String>,
    key_id: String,
}

impl Described {
    fn of(m: &Manifest) -> Described {
        Described {
            format: if m.archive.is_some() { 2 } else { 1 },
            version: m.version.clone(),
            os: m.os.clone(),
            arch: m.arch.clone(),
            size: m.size,
            sha256: m.sha256.clone(),
            archive_size: m.archive.as_ref().map(|a| a.size),
            archive_sha256: m.archive.as_ref().map(|a| a.sha256.clone()),
            key_id: m.key.to_string(),
        }
    }
}

#[derive(Serialize)]
struct Signed {
    output: PathBuf,
    archive: Option<PathBuf>,
    #[serde(flatten)]
    manifest: Described,
}

#[derive(Serialize)]
struct Valid {
    valid: bool,
    #[serde(flatten)]
    manifest: Described,
    binary: Option<PathBuf>,
    archive: Option<PathBuf>,
}

#[derive(Serialize)]
struct Invalid {
    valid: bool,
    reason: &'static str,
    message: String,
}

/// Runs `release`.
pub fn run(args: ReleaseArgs) -> Result<ExitCode> {
    match args.command {
        ReleaseCommand::Sign(args) => sign(args),
        ReleaseCommand::Verify(args) => verify(args),
    }
}

fn sign(args: ReleaseSignArgs) -> Result<ExitCode> {
    let text = read_text(&args.key)?;
    if let Some(w) = loose_key_permissions(&args.key) {
        eprintln!("{w}");
    }
    let key = KeyPair::from_pem(&text)
        .with_context(|| format!("{} is not a usable private key", args.key.display()))?;
    let binary = read_at_most(&args.binary, MAX_BINARY)?;
    let out = args.out.unwrap_or_else(|| {
        let mut s = args.binary.clone().into_os_string();
        s.push(MANIFEST_SUFFIX);
        PathBuf::from(s)
    });
    let (manifest, archive) = if args.format == 1 {
        let manifest = sign_manifest(&args.version, &args.os, &args.arch, &binary, &key)?;
        (manifest, None)
    } else {
        let archive = gzip(&binary);
        let manifest =
            sign_manifest_gzip(&args.version, &args.os, &args.arch, &binary, &archive, &key)?;
        let path = args.archive.unwrap_or_else(|| archive_path(&args.binary));
        // The archive first: a manifest is never there without the archive it names.
        write_atomic(&path, &archive, Some(OUTPUT_MODE))?;
        (manifest, Some(path))
    };
    write_atomic(&out, manifest.as_bytes(), Some(OUTPUT_MODE))?;
    let parsed = bridge_signing::release::SignedManifest::parse(&manifest)?;
    crate::print_json(&Signed {
        output: out,
        archive,
        manifest: Described::of(parsed.manifest()),
    });
    Ok(ExitCode::SUCCESS)
}

/// A release public key given as `ed25519:...`, `@FILE` or FILE.
fn load_key(spec: &str) -> Result<PublicKey> {
    if spec.starts_with(bridge_signing::PUBLIC_KEY_PREFIX) {
        return spec
            .parse()
            .with_context(|| format!("{spec:?} is not a public key"));
    }
    let file = spec.strip_prefix('@').unwrap_or(spec);
    let text = read_text(file.as_ref())?;
    PublicKey::from_file_contents(&text).with_context(|| format!("{file} is not a public key file"))
}

fn verify(args: ReleaseVerifyArgs) -> Result<ExitCode> {
    let keys = args
        .keys
        .iter()
        .map(|k| load_key(k))
        .collect::<Result<Vec<_>>>()?;
    let invalid = |reason, message: String| {
        crate::print_json(&Invalid {
            valid: false,
            reason,
            message,
        });
        Ok(ExitCode::from(1))
    };
    let signed = match try_read_manifest(&args.manifest)? {
        Ok(signed) => signed,
        Err(why) => return invalid("malformed_manifest", why),
    };
    let manifest = match signed.verify(&keys) {
        Ok(m) => m,
        Err(e @ ReleaseError::UnknownKey(_)) => return invalid("unknown_key", e.to_string()),
        Err(e @ ReleaseError::BadSignature) => return invalid("bad_signature", e.to_string()),
        Err(e @ ReleaseError::Malformed(_)) => return invalid("malformed_manifest", e.to_string()),
    };
    if let Some(binary) = &args.binary {
        if let Err(why) = try_read_binary(manifest, binary)? {
            return invalid("mismatch", why);
        }
    }
    if let Some(archive) = &args.archive {
        if manifest.archive.is_none() {
            return invalid(
                "mismatch",
                format!(
                    "{} is a format-1 manifest: it names no archive",
                    args.manifest.display()
                ),
            );
        }
        let bytes = match try_read_archive(manifest, archive)? {
            Ok(bytes) => bytes,
            Err(why) => return invalid("mismatch", why),
        };
        if !gunzip_matches(manifest, &bytes) {
            return invalid(
                "mismatch",
                format!(
                    "{} does not unpack to the binary the manifest describes ({} bytes, SHA-256 {})",
                    archive.display(),
                    manifest.size,
                    manifest.sha256
                ),
            );
        }
    }
    crate::print_json(&Valid {
        valid: true,
        manifest: Described::of(manifest),
        binary: args.binary,
        archive: args.archive,
    });
    Ok(ExitCode::SUCCESS)
}
