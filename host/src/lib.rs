//! # bridge-host: the bridge agent
//!
//! The agent a management platform installs on every server it manages. It runs the commands the
//! platform pushes as **WASI modules in wasmtime** under fuel, memory, time and output limits.
//!
//! A tour, in the order a task flows through the code:
//!
//! - [`config`]: the agent's TOML configuration, typed and validated in one place.
//! - [`limits`]: per-run limits: defaults, local maximums, and how a task's request is clamped.
//! - [`sandbox`]: the wasmtime engine, the compiled-module caches (memory LRU + verified disk
//!   artifacts), and one run of a handler in a fresh store.
//! - [`trust`]: signature verification and the trust policy, enforced before compiling; the
//!   signed claims bound the run's limits, environment and directories.
//! - [`outcome`]: how a run ended ([`outcome::Status`]) and the JSON result the platform sees.
//! - [`call`]: `bridge-daemon call`, the handler author's entry point: one module, one run.
//!
//! The binary (`bridge-daemon`, `src/main.rs`) is thin glue over these modules.

pub mod call;
pub mod config;
pub mod limits;
pub mod outcome;
pub mod sandbox;
pub mod trust;
