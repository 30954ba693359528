//! The platform / developer side of bridge: the `bridgectl` command-line tool and the
//! development platform server ([`serve`]).
//!
//! Each subcommand is a module of [`cmd`] with its clap arguments and a `run` function;
//! [`cli::Cli`] ties them together and [`run`] maps the outcome to an exit status:
//!
//! * 0: success (for `verify` and `release verify`: the module or manifest is valid; for `run`
//!   and `result`: the result's status is `ok`; for `update`: the update succeeded; for
//!   `rollout --wait`: the rollout completed);
//! * 1: `verify` or `release verify` found the module or manifest invalid (the verdict is
//!   printed as JSON on stdout), `run` or `result` got a result whose status is not `ok` (the
//!   result is printed), `update` ended refused, failed or timed out, `rollout --wait` halted;
//! * 2: usage, I/O or connection error, one line on stderr (`bridgectl: error: ...`).

#![warn(missing_docs)]

pub mod cli;
pub mod cmd;
pub mod files;
pub mod release;
pub mod serve;
pub mod timearg;

use std::process::ExitCode;

/// Runs a parsed command line, printing any error as one line on stderr.
pub fn run(cli: cli::Cli) -> ExitCode {
    let (control, state) = (cli.control, cli.state);
    let control = || control_socket(control, state);
    let result = match cli.command {
        cli::Command::Keygen(args) => cmd::keygen::run(args),
        cli::Command::Sign(args) => cmd::sign::run(args),
        cli::Command::Verify(args) => cmd::verify::run(args),
        cli::Command::Inspect(args) => cmd::inspect::run(args),
        cli::Command::Serve(args) => cmd::serve::run(args),
        cli::Command::Agents(args) => control().and_then(|c| cmd::agents::run(&c, args)),
        cli::Command::Run(args) => control().and_then(|c| cmd::run::run(&c, args)),
        cli::Command::Result(args) => control().and_then(|c| cmd::result::run(&c, args)),
        cli::Command::Cancel(args) => control().and_then(|c| cmd::cancel::run(&c, args)),
        cli::Command::InstallHandler(args) => {
            control().and_then(|c| cmd::handlers::install(&c, args))
        }
        cli::Command::Handlers(args) => control().and_then(|c| cmd::handlers::list(&c, args)),
        cli::Command::RemoveHandler(args) => {
            control().and_then(|c| cmd::handlers::remove(&c, args))
        }
        cli::Command::Token(args) => control().and_then(|c| cmd::token::run(&c, args)),
        cli::Command::Release(args) => cmd::release::run(args),
        cli::Command::Update(args) => control().and_then(|c| cmd::update::run(&c, args)),
        cli::Command::Rollout(args) => control().and_then(|c| cmd::rollout::run(&c, args)),
        cli::Command::Audit(args) => control().and_then(|c| cmd::audit::run(&c, args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` puts the whole context chain on one line.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("bridgectl: error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// The control socket the client commands use, the first given of: `--control PATH`;
/// `control.sock` in the state directory `--state DIR`; the environment's `BRIDGE_CONTROL`
/// (a socket path); `control.sock` in the environment's `BRIDGE_STATE`.
pub fn control_socket(
    control: Option<std::path::PathBuf>,
    state: Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    let env = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    match (control, state) {
        (Some(socket), _) => Ok(socket),
        (None, Some(state)) => Ok(serve::control::socket_path(&state)),
        (None, None) => {
            if let Some(socket) = env("BRIDGE_CONTROL") {
                return Ok(socket);
            }
            if let Some(state) = env("BRIDGE_STATE") {
                return Ok(serve::control::socket_path(&state));
            }
            Err(anyhow::anyhow!(
                "no control socket: give the server's state directory with --state DIR or its socket with --control PATH (before the subcommand), or set BRIDGE_STATE or BRIDGE_CONTROL"
            ))
        }
    }
}

/// Prints `value` as one line of JSON on stdout (fields in declaration order).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("output values always serialize")
    );
}
