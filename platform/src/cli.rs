//! The command line: global structure and the list of subcommands.

use clap::{Parser, Subcommand};

use crate::cmd;

/// bridgectl: keys, signing and verification for bridge handler modules, and a development
/// platform server.
///
/// Handlers are WASI preview-1 wasm modules. An agent runs one only if it is signed by a key
/// in its trust policy; the signature (Ed25519, over the module's SHA-256 and the signed
/// claims) lives in a `bridge.signature` custom section or in a detached `.sig` file.
///
/// `serve` runs a development platform that agents connect to; `agents`, `token`, `run`,
/// `result`, `cancel`, `install-handler`, `handlers` and `remove-handler` talk to a running
/// `serve` through its control interface (--control ADDR or BRIDGE_CONTROL).
///
/// Commands print JSON on stdout (`token` prints the bare token). Exit status: 0 success,
/// 1 `verify` found the module invalid or `run`/`result` got a result whose status is not
/// "ok", 2 usage, I/O or connection error, or the agent's refusal (one line on stderr).
#[derive(Debug, Parser)]
#[command(name = "bridgectl", version, about, long_about)]
pub struct Cli {
    /// The control interface of a running `bridgectl serve` (for the commands that talk to one).
    #[arg(long, value_name = "ADDR", env = "BRIDGE_CONTROL")]
    pub control: Option<String>,
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
    /// Run the development platform server that agents connect to.
    Serve(cmd::serve::ServeArgs),
    /// List the agents of a running server (needs --control).
    Agents(cmd::agents::AgentsArgs),
    /// Run a module or a command on a connected agent and print its result (needs --control).
    Run(cmd::run::RunArgs),
    /// Print the result the server stored for a task (needs --control).
    Result(cmd::result::ResultArgs),
    /// Cancel a task on a connected agent (needs --control).
    Cancel(cmd::cancel::CancelArgs),
    /// Install a named handler on a connected agent (needs --control).
    InstallHandler(cmd::handlers::InstallHandlerArgs),
    /// List the handlers installed on a connected agent (needs --control).
    Handlers(cmd::handlers::HandlersArgs),
    /// Remove a named handler from a connected agent (needs --control).
    RemoveHandler(cmd::handlers::RemoveHandlerArgs),
    /// Issue a new enrollment token from a running server (needs --control).
    Token(cmd::token::TokenArgs),
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
