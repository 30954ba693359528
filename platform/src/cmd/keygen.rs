//! `bridgectl keygen`: generate a signing key pair.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use bridge_signing::KeyPair;
use clap::Args;
use serde::Serialize;

use crate::files::{public_key_path, write_key_file, PRIVATE_KEY_MODE, PUBLIC_KEY_MODE};

/// Generate an Ed25519 signing key pair.
///
/// Writes the private key to KEY (a PKCS#8 "PRIVATE KEY" PEM file, mode 0600, created
/// exclusively) and the public key line (`ed25519:...`) to KEY.pub (mode 0644), then prints
/// `{"private_key", "public_key", "public_key_file", "key_id"}`. Put the public key in the
/// agents' trust policy; keep the private key secret.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Path of the private key file to create; the public key goes to this path + ".pub".
    #[arg(long, short = 'o', value_name = "KEY")]
    pub out: PathBuf,
    /// Replace KEY and KEY.pub if they exist (atomically; the new private key is still 0600).
    #[arg(long)]
    pub force: bool,
}

#[derive(Serialize)]
struct KeygenOutput {
    private_key: PathBuf,
    public_key: String,
    public_key_file: PathBuf,
    key_id: String,
}

/// Runs `keygen`.
pub fn run(args: KeygenArgs) -> Result<ExitCode> {
    let public_path = public_key_path(&args.out);
    if !args.force {
        for p in [&args.out, &public_path] {
            if p.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists (use --force to overwrite it)",
                    p.display()
                );
            }
        }
    }
    let key = KeyPair::generate().context("cannot generate a key")?;
    let public = key.public_key();
    write_key_file(
        &args.out,
        key.to_pem().as_bytes(),
        PRIVATE_KEY_MODE,
        args.force,
    )?;
    if let Err(e) = write_key_file(
        &public_path,
        format!("{public}\n").as_bytes(),
        PUBLIC_KEY_MODE,
        args.force,
    ) {
        // Do not leave a private key whose public half was not written.
        let _ = std::fs::remove_file(&args.out);
        return Err(e);
    }
    crate::print_json(&KeygenOutput {
        private_key: args.out,
        public_key: public.to_string(),
        public_key_file: public_path,
        key_id: public.key_id().to_string(),
    });
    Ok(ExitCode::SUCCESS)
}
