//! `bridgectl install-handler`, `handlers` and `remove-handler`: manage the named handlers
//! installed on an agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use base64::Engine as _;
use clap::Args;
use serde_json::{json, Value};

use crate::cmd::run::CLIENT_MARGIN;
use crate::files::read;
use crate::serve::control;

/// Install (or replace) a named handler on a connected agent, through a running
/// `bridgectl serve`.
///
/// The module must be signed by a key the agent trusts, and its signed claims must name the
/// handler (`bridgectl sign --name NAME`). Once installed, `bridgectl run --command NAME` runs
/// it. Prints the agent's handlers after the change, as one JSON array of
/// {"name", "file_sha256", "code_sha256", "installed_at", "key"?}.
///
/// Exit status: 0 when installed, 2 otherwise (the agent refused: its reason is on stderr;
/// agent unknown or not connected; no answer within 30 s).
#[derive(Debug, Args)]
pub struct InstallHandlerArgs {
    /// The agent id.
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The command name the handler answers to.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The handler module (signed wasm).
    #[arg(value_name = "FILE.wasm")]
    pub module: PathBuf,
    /// A detached signature file (MODULE.wasm.sig), when the module carries none.
    #[arg(long, value_name = "FILE.sig")]
    pub signature: Option<PathBuf>,
}

/// List the handlers installed on a connected agent.
///
/// Prints one JSON array of {"name", "file_sha256", "code_sha256", "installed_at", "key"?}. Exit status: 0,
/// or 2 when the agent could not be asked.
#[derive(Debug, Args)]
pub struct HandlersArgs {
    /// The agent id.
    #[arg(long, value_name = "ID")]
    pub agent: String,
}

/// Remove a named handler from a connected agent.
///
/// Prints the agent's handlers after the change, as `bridgectl handlers` does. Exit status: 0
/// when removed, 2 otherwise (no such handler, agent unknown or not connected).
#[derive(Debug, Args)]
pub struct RemoveHandlerArgs {
    /// The agent id.
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The handler's name.
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

fn print_handlers(socket: &Path, request: &Value) -> Result<ExitCode> {
    let wait =
        Duration::from_millis(control::DEFAULT_REQUEST_WAIT_MS).saturating_add(CLIENT_MARGIN);
    let response = control::request(socket, request, wait)?;
    crate::print_json(&response["handlers"]);
    Ok(ExitCode::SUCCESS)
}

/// Runs `install-handler` against the control socket at `socket`.
pub fn install(socket: &Path, args: InstallHandlerArgs) -> Result<ExitCode> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut request = json!({
        "cmd": "install_handler",
        "agent": args.agent,
        "name": args.name,
        "module": b64.encode(read(&args.module)?),
    });
    if let Some(sig) = &args.signature {
        request["signature"] = json!(b64.encode(read(sig)?));
    }
    print_handlers(socket, &request)
}

/// Runs `handlers` against the control socket at `socket`.
pub fn list(socket: &Path, args: HandlersArgs) -> Result<ExitCode> {
    print_handlers(socket, &json!({"cmd": "handlers", "agent": args.agent}))
}

/// Runs `remove-handler` against the control socket at `socket`.
pub fn remove(socket: &Path, args: RemoveHandlerArgs) -> Result<ExitCode> {
    print_handlers(
        socket,
        &json!({"cmd": "remove_handler", "agent": args.agent, "name": args.name}),
    )
}
