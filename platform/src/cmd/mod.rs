//! One module per subcommand (or family of subcommands): clap arguments and `run` functions.

pub mod agents;
pub mod audit;
pub mod cancel;
pub mod handlers;
pub mod inspect;
pub mod keygen;
pub mod release;
pub mod result;
pub mod rollout;
pub mod run;
pub mod serve;
pub mod sign;
pub mod token;
pub mod update;
pub mod verify;
