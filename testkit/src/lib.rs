//! The shared test kit of the bridge workspace, for the host's and the platform's integration
//! tests, the benchmarks and `cargo xtask`: the real binaries on 127.0.0.1, never stubs.
//!
//! A test reads as its behaviour on top of this kit:
//!
//! ```no_run
//! use bridge_testkit::{Agent, Platform, Publisher};
//! use serde_json::json;
//!
//! let tmp = tempfile::tempdir().unwrap();
//! let platform = Platform::start(&tmp.path().join("platform"));
//! let publisher = Publisher::new();
//! let agent = Agent::start(&tmp.path().join("agent"), &platform.agent_args(Some(&publisher)));
//! let id = agent.id();
//! let control = platform.control();
//! control.wait_connected(&id);
//! let r = control.run_module(&id, &publisher.signed("hello"), json!({"name": "Ada"}), None);
//! assert_eq!(r["result"]["output"]["greeting"], "Hello, Ada!");
//! ```
//!
//! * [`bins`]: where the workspace's binaries and wasm fixtures are, built when missing (debug
//!   binaries for tests, release binaries for benchmarks: the profile of the running program).
//! * [`process`]: a child process whose stderr is collected, killed when dropped, waited for
//!   with a bound.
//! * [`Platform`] (`bridgectl serve`) and [`Agent`] (`bridge-daemon run`).
//! * [`Control`]: the one client of the platform's control socket, and the waits on its view of
//!   agents and tasks ([`Control::wait_connected`], [`Control::wait_running`]…): a wait fails
//!   after its deadline showing the last state it saw, it never matches log text.
//! * [`Publisher`]: a publisher key and modules signed with it.
//! * [`Setup`]: the usual fixture, a platform and one connected agent trusting a publisher.
//! * [`Proxy`]: a TCP proxy that cuts or freezes an agent's connection.
//! * [`call`]: one `bridge-daemon call`, decoded.
//! * [`supervisor`]: an installed agent under a supervisor that restarts it as systemd would.
//! * [`audit`]: the agent's audit files, in sequence order.
//! * [`cpus`]: the benchmarks' CPU affinity (which CPUs, pinning to some).
//! * [`load`] (feature `tokio`): tasks kept in flight on the control socket, and a process's CPU
//!   time, for the benchmarks.
//! * [`figures`]: the headline figures of a benchmark, for `cargo xtask bench`'s summary.
//! * [`metrics`]: the agent's Prometheus endpoint, `promtool check metrics`, a scrape's samples.

pub mod agent;
pub mod audit;
pub mod bins;
pub mod call;
pub mod control;
pub mod cpus;
pub mod figures;
#[cfg(feature = "tokio")]
pub mod load;
pub mod metrics;
pub mod platform;
pub mod process;
pub mod proxy;
pub mod publisher;
pub mod setup;
pub mod supervisor;
pub mod wait;

pub use agent::Agent;
pub use control::Control;
pub use platform::Platform;
pub use process::{Log, Proc};
pub use proxy::Proxy;
pub use publisher::Publisher;
pub use setup::Setup;
pub use wait::{wait_for, wait_until, CONNECT};
