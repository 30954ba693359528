//! `bridgectl inspect`: show what a module's signature claims, trusting nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use bridge_signing::inspect;
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::files::read;

/// Show a module's signature and claims without verifying anything.
///
/// Prints the module's `code_sha256` (SHA-256 without signature sections, i.e. what a
/// signature covers), its `file_sha256` (SHA-256 of the file as given: what `run` names and
/// the agent asks for), whether it is signed, the key id and claims the signature states, and any visible problem
/// (several signature sections, a malformed envelope or claims). The signature itself is NOT
/// checked: use `verify` for that. Exits 0, or 2 if the file cannot be read or is not a wasm
/// module.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The wasm module to inspect.
    #[arg(value_name = "MODULE.wasm")]
    pub module: PathBuf,
    /// A detached signature file to inspect instead of the embedded signature.
    #[arg(long, value_name = "FILE.sig")]
    pub signature: Option<PathBuf>,
}

/// Runs `inspect`.
pub fn run(args: InspectArgs) -> Result<ExitCode> {
    let module = read(&args.module)?;
    let detached = args.signature.as_deref().map(read).transpose()?;
    let found =
        inspect(&module, detached.as_deref()).with_context(|| args.module.display().to_string())?;
    crate::print_json(&Shown {
        file_sha256: crate::cmd::sign::hex_string(&Sha256::digest(&module)),
        found,
    });
    Ok(ExitCode::SUCCESS)
}

/// What `inspect` prints: the file's hash, then what the module's signature says.
#[derive(Serialize)]
struct Shown {
    file_sha256: String,
    #[serde(flatten)]
    found: bridge_signing::Inspection,
}
