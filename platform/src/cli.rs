//! The command line: global structure and the list of subcommands.

use clap::{Parser, Subcommand};

use crate::cmd;

/// bridgectl: keys, signing and verification for bridge handler modules.
///
/// Handlers are WASI preview-1 wasm modules. An agent runs one only if it is signed by a key
/// in its trust policy; the signature (Ed25519, over the module's SHA-256 and the signed
/// claims) lives in a `bridge.signature` custom section or in a detached `.sig` file.
/// Every command prints one JSON object on stdout. Exit status: 0 success, 1 `verify` found
/// the module invalid, 2 usage or I/O error (one line on stderr).
#[derive(Debug, Parser)]
#[command(name = "bridgectl", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an Ed25519 signing key pair (private key file 0600, public key file beside it).
    Keygen(cmd::keygen::KeygenArgs),
    /// Sign a wasm module: embed the signature (default) or write a detached .sig file.
    Sign(cmd::sign::SignArgs),
    /// Verify a module's signature against trusted keys, as an agent would.
    Verify(cmd::verify::VerifyArgs),
    /// Show a module's signature and claims without verifying or trusting anything.
    Inspect(cmd::inspect::InspectArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
