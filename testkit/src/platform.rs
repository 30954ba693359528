//! A development platform: `bridgectl serve` on 127.0.0.1 with an ephemeral port.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::bins;
use crate::control::Control;
use crate::process::{Log, Proc};
use crate::publisher::Publisher;

/// A running `bridgectl serve`, killed when dropped.
pub struct Platform {
    proc: Proc,
    /// The first line it printed: `url`, `server_pin`, `token`, `control`, `ca_file`…
    pub info: Value,
    /// Its state directory.
    pub state: PathBuf,
}

/// How to start a [`Platform`].
pub struct PlatformBuilder {
    state: PathBuf,
    listen: String,
    args: Vec<String>,
    log_level: String,
}

impl PlatformBuilder {
    /// Listens on `listen` (`127.0.0.1:PORT`, e.g. to restart on the same port).
    pub fn listen(mut self, listen: &str) -> Self {
        self.listen = listen.to_string();
        self
    }

    /// More arguments to `serve`.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// `RUST_LOG` (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts it and reads its first line (within 30 s).
    pub fn start(self) -> Platform {
        let mut cmd = bins::bridgectl();
        cmd.args(["serve", "--listen", &self.listen, "--state"])
            .arg(&self.state)
            .args(&self.args)
            .env("RUST_LOG", &self.log_level)
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("bridgectl serve", cmd);
        let stdout = proc.child().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining stdout so the server never blocks on a full pipe.
            let _ = stdout.read_to_end(&mut Vec::new());
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let info: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
            proc.kill();
            panic!(
                "the first line of serve is not JSON ({e}): {line:?}; log:\n{}",
                proc.log.text()
            )
        });
        Platform {
            proc,
            info,
            state: self.state,
        }
    }
}

impl Platform {
    /// A platform on `127.0.0.1:0` with `state` as its state directory.
    pub fn start(state: &Path) -> Platform {
        Platform::builder(state).start()
    }

    /// Options before starting; see [`PlatformBuilder`].
    pub fn builder(state: &Path) -> PlatformBuilder {
        PlatformBuilder {
            state: state.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            args: Vec::new(),
            log_level: "info".into(),
        }
    }

    /// A new platform on the same state directory and port (after [`Platform::kill`]).
    pub fn restart(&self) -> Platform {
        Platform::builder(&self.state)
            .listen(&self.listen_addr())
            .start()
    }

    fn field(&self, key: &str) -> String {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("serve printed no {key}: {}", self.info))
            .to_string()
    }

    /// `wss://127.0.0.1:PORT/agent`.
    pub fn url(&self) -> String {
        self.field("url")
    }

    /// The server's key pin.
    pub fn pin(&self) -> String {
        self.field("server_pin")
    }

    /// The enrollment token printed at start.
    pub fn token(&self) -> String {
        self.field("token")
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> &Path {
        Path::new(
            self.info["control"]
                .as_str()
                .unwrap_or_else(|| panic!("serve printed no control: {}", self.info)),
        )
    }

    /// The agent endpoint's `host:port`.
    pub fn listen_addr(&self) -> String {
        self.url()
            .trim_start_matches("wss://")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    /// The client of its control interface.
    pub fn control(&self) -> Control {
        Control::new(self.control_socket())
    }

    /// What it logged so far.
    pub fn log(&self) -> &Log {
        &self.proc.log
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The arguments that bring an agent to this platform: server, pin, the start token, and
    /// the publisher's key as trusted if given.
    pub fn agent_args(&self, publisher: Option<&Publisher>) -> Vec<String> {
        let token = self.token();
        let key = publisher.map(Publisher::public);
        self.agent_args_with(Some(&token), key.as_deref())
    }

    /// Server and pin, then `--token` and `--trusted-key` if given.
    pub fn agent_args_with(&self, token: Option<&str>, trusted_key: Option<&str>) -> Vec<String> {
        let mut a = vec![
            "--server".into(),
            self.url(),
            "--server-pin".into(),
            self.pin(),
        ];
        if let Some(t) = token {
            a.extend(["--token".into(), t.to_string()]);
        }
        if let Some(k) = trusted_key {
            a.extend(["--trusted-key".into(), k.to_string()]);
        }
        a
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, and wait for the exit (at most 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate(Duration::from_secs(10))
    }
}
