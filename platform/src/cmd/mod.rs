//! One module per subcommand: its clap arguments and its `run` function.

pub mod inspect;
pub mod keygen;
pub mod sign;
pub mod verify;
