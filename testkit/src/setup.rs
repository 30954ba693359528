//! The usual fixture: a platform, a publisher, and one agent trusting the publisher, enrolled
//! and connected, all in a temporary directory.

use std::process::Command;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::agent::Agent;
use crate::control::Control;
use crate::platform::Platform;
use crate::publisher::Publisher;

/// A platform and one connected agent trusting [`Setup::publisher`].
pub struct Setup {
    /// The platform.
    pub platform: Platform,
    /// The agent.
    pub agent: Agent,
    /// The publisher the agent trusts.
    pub publisher: Publisher,
    /// The agent's id.
    pub id: String,
    args: Vec<String>,
    /// Holds `platform/`, `agent/` (the agent's state) and `agent.toml`; declared last, so
    /// it is removed after both processes are killed.
    pub dir: tempfile::TempDir,
}

/// What is applied to the agent's command before it is spawned.
type Prepare<'a> = Box<dyn FnOnce(&mut Command) + 'a>;

/// How to start a [`Setup`].
#[derive(Default)]
pub struct SetupBuilder<'a> {
    config: Option<String>,
    args: Vec<String>,
    prepare: Option<Prepare<'a>>,
}

impl<'a> SetupBuilder<'a> {
    /// The agent's configuration file (TOML).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// More arguments to `bridge-daemon run`.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Applied to the agent's command before it is spawned.
    pub fn prepare(mut self, prepare: impl FnOnce(&mut Command) + 'a) -> Self {
        self.prepare = Some(Box::new(prepare));
        self
    }

    /// Starts the platform and the agent; returns once the agent is connected.
    pub fn start(self) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let platform = Platform::start(&dir.path().join("platform"));
        let publisher = Publisher::new();
        let mut args = platform.agent_args(Some(&publisher));
        if let Some(config) = &self.config {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, config).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        args.extend(self.args);
        let prepare = self.prepare.unwrap_or_else(|| Box::new(|_| {}));
        let agent = Agent::start_with(&dir.path().join("agent"), &args, prepare);
        let id = agent.id();
        platform.control().wait_connected(&id);
        Setup {
            platform,
            agent,
            publisher,
            id,
            args,
            dir,
        }
    }
}

impl Setup {
    /// A platform and an agent with no configuration file.
    pub fn start() -> Setup {
        Setup::builder().start()
    }

    /// A platform and an agent with `config` (TOML).
    pub fn with_config(config: &str) -> Setup {
        Setup::builder().config(config).start()
    }

    /// Options before starting; see [`SetupBuilder`].
    pub fn builder<'a>() -> SetupBuilder<'a> {
        SetupBuilder::default()
    }

    /// The platform's control client.
    pub fn control(&self) -> Control {
        self.platform.control()
    }

    /// One control request.
    pub fn request(&self, request: Value) -> Value {
        self.control().request(&request)
    }

    /// `run` of the named `command` on the agent, with `extra` request fields.
    pub fn run_command(&self, command: &str, extra: Value) -> Value {
        self.control().run_command(&self.id, command, extra)
    }

    /// `install_handler` of `module` as `name` on the agent.
    pub fn install(&self, name: &str, module: &[u8]) -> Value {
        let module = base64::engine::general_purpose::STANDARD.encode(module);
        self.request(
            json!({"cmd": "install_handler", "agent": self.id, "name": name, "module": module}),
        )
    }

    /// Restarts the agent (SIGKILL when `kill`, else SIGTERM) with the same state and flags
    /// but the token (used at enrollment: the agent now proves itself by its key); returns
    /// once it is connected again.
    pub fn restart_agent(&mut self, kill: bool) {
        if kill {
            self.agent.kill();
        } else {
            self.agent.terminate();
        }
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--token") {
            args.drain(i..i + 2);
        }
        self.agent = Agent::start(&self.dir.path().join("agent"), &args);
        self.platform.control().wait_connected(&self.id);
    }
}
