//! `bridgectl token`: issue a new enrollment token.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Args;
use serde_json::json;

use crate::serve::control;

/// Issue a new one-time enrollment token from a running `bridgectl serve`.
///
/// Prints the token alone on one line (not JSON), ready for `bridge-daemon run --token`.
#[derive(Debug, Args)]
pub struct TokenArgs {}

/// Runs `token` against the control socket at `socket`.
pub fn run(socket: &Path, _args: TokenArgs) -> Result<ExitCode> {
    let response = control::request(socket, &json!({"cmd": "token"}), Duration::from_secs(30))?;
    let token = response["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered without a token"))?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}
