//! A real development platform (`bridgectl serve`) and real agents (`bridge-daemon run`) for the
//! link tests: processes on 127.0.0.1 with ephemeral ports, killed when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `bridgectl` binary, built if this test run has not built it yet.
pub fn bridgectl() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/debug/deps -> target/debug
    let path = dir.join("bridgectl");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(super::root())
            .args([
                "build",
                "--quiet",
                "-p",
                "bridge-platform",
                "--bin",
                "bridgectl",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "building bridgectl failed");
    }
    path
}

/// Collects a child's stderr lines in the background, so tests can wait for log lines.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn follow(&self, stream: impl Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle`; panics with the log after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.count(needle) > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no log line with {needle:?} within {timeout:?}; log:\n{}",
            self.text()
        );
    }
}

/// A running `bridgectl serve`.
pub struct Platform {
    child: Child,
    /// The first line it printed.
    pub info: Value,
    /// Its state directory.
    pub state: PathBuf,
    /// Its stderr.
    pub log: Log,
}

impl Platform {
    /// Starts a platform on `listen` (e.g. `127.0.0.1:0`) with `state`.
    pub fn start(state: &Path, listen: &str) -> Platform {
        let mut child = Command::new(bridgectl())
            .args(["serve", "--listen", listen, "--state"])
            .arg(state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bridgectl serve");
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let info: Value = serde_json::from_str(first.trim()).unwrap_or_else(|e| {
            panic!(
                "first line of serve is not JSON ({e}): {first:?}; log: {}",
                log.text()
            )
        });
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        Platform {
            child,
            info,
            state: state.to_path_buf(),
            log,
        }
    }

    /// `wss://127.0.0.1:PORT/agent`.
    pub fn url(&self) -> String {
        self.info["url"].as_str().unwrap().to_string()
    }

    /// The server's key pin.
    pub fn pin(&self) -> String {
        self.info["server_pin"].as_str().unwrap().to_string()
    }

    /// The enrollment token issued at start.
    pub fn token(&self) -> String {
        self.info["token"].as_str().unwrap().to_string()
    }

    /// The listening address (host:port) of the agent endpoint.
    pub fn listen_addr(&self) -> String {
        let url = self.url();
        url.trim_start_matches("wss://")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    /// One control request, one response.
    pub fn control(&self, request: Value) -> Value {
        let socket = self.info["control"].as_str().unwrap();
        let mut conn = UnixStream::connect(socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        writeln!(conn, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("bad control response ({e}): {line:?}"))
    }

    /// The agents the platform knows.
    pub fn agents(&self) -> Vec<Value> {
        let r = self.control(json!({"cmd": "agents"}));
        assert_eq!(r["ok"], true, "{r}");
        r["agents"].as_array().unwrap().clone()
    }

    /// Whether agent `id` is connected now.
    pub fn connected(&self, id: &str) -> bool {
        self.agents()
            .iter()
            .any(|a| a["id"] == id && a["connected"] == true)
    }

    /// Waits until agent `id` is connected.
    pub fn wait_connected(&self, id: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.connected(id) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent {id} did not connect within {timeout:?}; platform log:\n{}",
            self.log.text()
        );
    }

    /// Runs `module` on agent `id` through the control interface; returns the response.
    pub fn run(&self, id: &str, module: &[u8], input: Value, task_id: Option<&str>) -> Value {
        use base64::Engine as _;
        let mut req = json!({
            "cmd": "run",
            "agent": id,
            "module": base64::engine::general_purpose::STANDARD.encode(module),
            "input": input,
            "timeout_ms": 60000,
        });
        if let Some(t) = task_id {
            req["task_id"] = json!(t);
        }
        self.control(req)
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `bridge-daemon run`.
pub struct Agent {
    child: Child,
    /// Its stderr (info-level logs).
    pub log: Log,
    /// Its state directory.
    pub state: PathBuf,
}

impl Agent {
    /// Starts `bridge-daemon run --state STATE ARGS...`.
    pub fn start(state: &Path, args: &[String]) -> Agent {
        Agent::start_with(state, args, |_| {})
    }

    /// [`Agent::start`], with `prepare` applied to the command before it is spawned.
    pub fn start_with(state: &Path, args: &[String], prepare: impl FnOnce(&mut Command)) -> Agent {
        let mut cmd = super::daemon();
        cmd.arg("run")
            .arg("--state")
            .arg(state)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        let mut child = cmd.spawn().expect("starting bridge-daemon run");
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        Agent {
            child,
            log,
            state: state.to_path_buf(),
        }
    }

    /// The standard arguments to reach `platform`: server, pin, token, trusted publisher key.
    pub fn args_for(platform: &Platform, token: Option<&str>, pubkey: Option<&str>) -> Vec<String> {
        let mut a = vec![
            "--server".into(),
            platform.url(),
            "--server-pin".into(),
            platform.pin(),
        ];
        if let Some(t) = token {
            a.extend(["--token".into(), t.to_string()]);
        }
        if let Some(k) = pubkey {
            a.extend(["--trusted-key".into(), k.to_string()]);
        }
        a
    }

    /// The agent id in its state directory (`bridge-daemon identity`), waiting for the agent
    /// to create it; a failure shows the agent's own log.
    pub fn id(&self) -> String {
        let start = Instant::now();
        loop {
            let out = super::daemon()
                .arg("identity")
                .arg("--state")
                .arg(&self.state)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap().trim().to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no identity: {}; agent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process has exited (and with what).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.try_exit() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the agent did not exit within {timeout:?}; log:\n{}",
            self.log.text()
        );
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(Duration::from_secs(20))
    }

    /// SIGKILL (no chance to clean up), then wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bridge-daemon identity --state DIR`, waiting briefly for a starting agent to create it.
pub fn agent_id(state: &Path) -> String {
    let start = Instant::now();
    loop {
        let out = super::daemon()
            .arg("identity")
            .arg("--state")
            .arg(state)
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap().trim().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A publisher key and signed example modules.
pub struct Publisher {
    /// The key pair.
    pub key: bridge_signing::KeyPair,
}

impl Publisher {
    /// A fresh key.
    pub fn new() -> Publisher {
        Publisher {
            key: bridge_signing::KeyPair::generate().unwrap(),
        }
    }

    /// `ed25519:…`
    pub fn public(&self) -> String {
        self.key.public_key().to_string()
    }

    /// The example (or fixture) `name`, signed with claims for that name.
    pub fn signed(&self, name: &str) -> Vec<u8> {
        self.signed_as(name, name)
    }

    /// The example (or fixture) `module`, signed with claims naming it `name`.
    pub fn signed_as(&self, module: &str, name: &str) -> Vec<u8> {
        let module = std::fs::read(super::wasm(module)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = bridge_signing::Claims::new(name, "1.0.0", now);
        bridge_signing::sign(&module, &self.key, &claims)
            .unwrap()
            .module
    }
}
