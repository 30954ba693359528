//! One module per subcommand: its clap arguments and its `run` function.

pub mod agents;
pub mod inspect;
pub mod keygen;
pub mod run;
pub mod serve;
pub mod sign;
pub mod token;
pub mod verify;
