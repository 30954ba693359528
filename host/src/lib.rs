//! # bridge-host: the bridge agent
//!
//! The agent a management platform installs on every server it manages. It runs the commands the
//! platform pushes as **WASI modules in wasmtime** under fuel, memory, time and output limits.
//!
//! A tour, in the order a task flows through the code (`docs/architecture.md` follows one task
//! through these modules, file by file):
//!
//! - [`config`]: the agent's settings in two layers: the TOML file with the flags applied, as
//!   plain data, then the link, sandbox, agent and trust settings built from it once.
//! - [`identity`]: the agent's key and self-signed certificate; the agent id is the key's
//!   fingerprint.
//! - [`link`]: the platform connection: TLS both ways, enrollment, heartbeat, reconnect. Transport
//!   only: it hands decoded messages to the agent through [`link::Peer`].
//! - [`agent`]: what the agent does with the platform's requests: admission, a task's phases as
//!   types, execution, the module store, installed handlers, cancel, refusals.
//! - [`journal`]: the durable task journal (redb, group commit): tasks, results until acked,
//!   installed handlers.
//! - [`outbox`]: how messages reach the platform: results recorded and queued within a byte
//!   budget, cut to one frame, sent in batches, and re-sent from the journal after a reconnect.
//! - [`trust`]: signature verification and the trust policy, enforced before compiling; the
//!   signed claims bound the run's limits, environment and directories.
//! - [`limits`]: per-run limits: defaults, ceilings, and the one resolution of a task's request.
//! - [`sandbox`]: the wasmtime engine, the compiled-module caches (memory LRU + verified disk
//!   artifacts), and one run of a compiled module in a fresh store.
//! - [`shell`]: the shell fallback: allowlisted commands run directly (no shell), in their own
//!   process tree under a supervisor (and cgroup) that ends the whole tree with the run,
//!   with checked arguments, a timeout and capped output.
//! - [`outcome`]: how a run ended ([`outcome::Status`]) and the JSON result the platform sees.
//! - [`capture`]: bounded head-and-tail output capture, shared by handlers and shell commands.
//! - [`stream`]: a running task's output sent as ordered, bounded `chunk` messages.
//! - [`memory`]: memory given back while idle (free heap, clean code pages).
//! - [`observe`]: what the agent observes about itself (link, tasks, journal, caches), for
//!   `status` and the Prometheus metrics.
//! - [`status`]: `bridge-daemon status`: the daemon's status socket, and what a stopped
//!   agent's state directory tells.
//! - [`call`]: `bridge-daemon call`, the handler author's entry point: one module, one run.
//! - [`update`]: self-update: a signed release staged by the agent, switched to by the launcher.
//! - [`version`]: the version this agent reports (set once by the binary).
//!
//! - [`daemon`]: `bridge-daemon run`, the service that ties it all together.
//!
//! The binary (`bridge-daemon`, `src/main.rs`) is thin glue over these modules.

pub mod agent;
pub mod audit;
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
pub mod observe;
pub mod outbox;
pub mod outcome;
pub mod owner;
pub mod sandbox;
pub mod shell;
pub mod status;
pub mod stream;
pub mod trust;
pub mod update;
pub mod version;
