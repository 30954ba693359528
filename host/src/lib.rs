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
//! - [`identity`]: the agent's key and self-signed certificate; the agent id is the key's
//!   fingerprint.
//! - [`link`]: the platform connection: TLS both ways, enrollment, heartbeat, reconnect.
//! - [`agent`]: what the agent does with the platform's requests: the task life cycle (dedup,
//!   refusals, queue, cancel, resolution of commands to handlers or shell rules), the module
//!   store, installed handlers, status.
//! - [`journal`]: the durable task journal (redb, group commit): tasks, results until acked,
//!   installed handlers.
//! - [`call`]: `bridge-daemon call`, the handler author's entry point: one module, one run.
//! - [`shell`]: the shell fallback: allowlisted commands run directly (no shell), in their own
//!   process tree under a supervisor (and cgroup) that ends the whole tree with the run,
//!   with checked arguments, a timeout and capped output.
//! - [`capture`]: bounded head-and-tail output capture, shared by handlers and shell commands.
//! - [`stream`]: a running task's output sent as ordered, bounded `chunk` messages.
//! - [`memory`]: memory given back while idle (free heap, clean code pages).
//!
//! - [`daemon`]: `bridge-daemon run`, the service that ties it all together.
//!
//! The binary (`bridge-daemon`, `src/main.rs`) is thin glue over these modules.

pub mod agent;
pub mod call;
pub mod capture;
pub mod config;
pub mod daemon;
pub mod facts;
pub mod identity;
pub mod journal;
pub mod limits;
pub mod link;
pub mod memory;
pub mod outbox;
pub mod outcome;
pub mod owner;
pub mod sandbox;
pub mod shell;
pub mod stream;
pub mod trust;
