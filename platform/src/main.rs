//! `bridgectl`: the platform and developer tool for bridge (keys, signing, verification).

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    bridge_platform::run(bridge_platform::cli::Cli::parse())
}
