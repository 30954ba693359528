//! The command line: global structure and the list of subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cmd;

/// bridgectl: keys, signing and verification for bridge handler modules, and a development
/// platform server.
///
/// Handlers are WASI preview-1 wasm modules. An agent runs one only if it is signed by a key
/// in its trust policy; the signature (Ed25519, over the module's SHA-256 and the signed
/// claims) lives in a `bridge.signature` custom section or in a detached `.sig` file.
///
/// `release` signs and verifies agent release manifests.
///
/// `serve` runs a development platform that agents connect to; `agents`, `token`, `run`,
/// `result`, `cancel`, `install-handler`, `handlers`, `remove-handler`, `update` and `rollout`
/// talk to a running `serve` through its control socket: give the server's state directory
/// (--state DIR or BRIDGE_STATE; the socket is DIR/control.sock) or the socket itself
/// (--control PATH or BRIDGE_CONTROL, as `serve` prints it in `control`), before the
/// subcommand. Only the user who runs `serve` (and root) may use it.
///
/// Commands print JSON on stdout (`token` prints the bare token). Exit status: 0 success,
/// 1 `verify`/`release verify` found the module or manifest invalid, `run`/`result` got a
/// result whose status is not "ok", `update` did not succeed, or `rollout --wait` halted,
/// 2 usage, I/O or connection error, or the agent's refusal (one line on stderr).
#[derive(Debug, Parser)]
#[command(name = "bridgectl", version, about, long_about)]
pub struct Cli {
    /// The control socket of a running `bridgectl serve` (for the commands that talk to one),
    /// as `serve` prints it in `control`: STATE/control.sock. Without --control and --state:
    /// the environment's BRIDGE_CONTROL, else BRIDGE_STATE.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The state directory of a running `bridgectl serve`: the commands that talk to it use its
    /// control socket, DIR/control.sock (--control wins if both are given).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Each subcommand's help is the doc comment of its args struct (a doc comment here would
// replace it, and `bridgectl CMD --help` would show only one line).
#[allow(missing_docs)]
pub enum Command {
    Keygen(cmd::keygen::KeygenArgs),
    Sign(cmd::sign::SignArgs),
    Verify(cmd::verify::VerifyArgs),
    Inspect(cmd::inspect::InspectArgs),
    Serve(cmd::serve::ServeArgs),
    Agents(cmd::agents::AgentsArgs),
    Run(cmd::run::RunArgs),
    Result(cmd::result::ResultArgs),
    Cancel(cmd::cancel::CancelArgs),
    InstallHandler(cmd::handlers::InstallHandlerArgs),
    Handlers(cmd::handlers::HandlersArgs),
    RemoveHandler(cmd::handlers::RemoveHandlerArgs),
    Token(cmd::token::TokenArgs),
    Release(cmd::release::ReleaseArgs),
    Update(cmd::update::UpdateArgs),
    Rollout(cmd::rollout::RolloutArgs),
    Audit(cmd::audit::AuditArgs),
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
