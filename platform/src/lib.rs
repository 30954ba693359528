//! The platform / developer side of bridge: the `bridgectl` command-line tool.
//!
//! Each subcommand is a module of [`cmd`] with its clap arguments and a `run` function;
//! [`cli::Cli`] ties them together and [`run`] maps the outcome to an exit status:
//!
//! * 0: success (for `verify`: the module is valid);
//! * 1: `verify` found the module invalid (the verdict is printed as JSON on stdout);
//! * 2: usage or I/O error, one line on stderr (`bridgectl: error: ...`).

#![warn(missing_docs)]

pub mod cli;
pub mod cmd;
pub mod files;
pub mod timearg;

use std::process::ExitCode;

/// Runs a parsed command line, printing any error as one line on stderr.
pub fn run(cli: cli::Cli) -> ExitCode {
    let result = match cli.command {
        cli::Command::Keygen(args) => cmd::keygen::run(args),
        cli::Command::Sign(args) => cmd::sign::run(args),
        cli::Command::Verify(args) => cmd::verify::run(args),
        cli::Command::Inspect(args) => cmd::inspect::run(args),
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

/// Prints `value` as one line of JSON on stdout (fields in declaration order).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("output values always serialize")
    );
}
