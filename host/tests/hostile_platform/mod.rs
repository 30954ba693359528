//! The hostile platform the `hostile` tests drive the real agent with: a TLS + WebSocket server
//! written frame by frame (`Server`, `Conn`), the agent under test (`Agent`), and the setups.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;

use bridge_testkit::Proc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::PublicKeyData as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

/// Output of the `big` rule, in bytes: one result of about a megabyte once encoded.
pub const BIG: usize = 900_000;

/// The agent's shell rules: `echo` (any 8 arguments), `sleep N`, and `big` (about a megabyte of
/// output from a small request).
pub fn config(dir: &Path, journal_max_mib: u64, agent: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[agent]
journal_max_mib = {journal_max_mib}
{agent}

[[shell.rules]]
name = "echo"
program = "/bin/echo"
extra_args = {{ max = 8, patterns = [".*"] }}

[[shell.rules]]
name = "sleep"
program = "/bin/sleep"
extra_args = {{ max = 1, patterns = ["[0-9]+"] }}

[[shell.rules]]
name = "big"
program = "/bin/sh"
args = ["-c", 'head -c {BIG} /dev/zero | tr "\0" x']
"#
        ),
    )
    .unwrap();
    path
}

/// The fake platform's listener and its key pin.
pub struct Server {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    pin: String,
}

impl Server {
    pub fn start() -> Server {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pin = bridge_protocol::identity::spki_fingerprint(&key.subject_public_key_info());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Server {
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
            tls: Arc::new(tls),
            pin,
        }
    }

    pub fn url(&self) -> String {
        format!("wss://{}/agent", self.listener.local_addr().unwrap())
    }

    /// The next agent connection, upgraded to WebSocket, before `hello`.
    /// Panics after 60 s without one (an agent that exited never connects).
    pub fn accept(&self) -> Conn {
        self.listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let tcp = loop {
            match self.listener.accept() {
                Ok((tcp, _)) => break tcp,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no agent connected within 60 s");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accepting an agent: {e}"),
            }
        };
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let tls = rustls::ServerConnection::new(self.tls.clone()).unwrap();
        let mut stream = rustls::StreamOwned::new(tls, tcp);
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            request.push(byte[0]);
        }
        let request = String::from_utf8(request).unwrap();
        let key = request
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_string())
            })
            .expect("an upgrade request");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        write!(
            stream,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .unwrap();
        stream.flush().unwrap();
        Conn {
            stream,
            results: HashMap::new(),
            accepted: BTreeSet::new(),
        }
    }
}

/// A WebSocket frame from the platform (unmasked), as bytes.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

pub fn text(msg: &Value) -> Vec<u8> {
    frame(1, msg.to_string().as_bytes())
}

/// What the agent sent.
#[derive(Debug)]
pub enum Got {
    Text(Value),
    Close(Option<u16>),
}

/// One agent connection, with the results and acceptances seen on it.
pub struct Conn {
    stream: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    pub results: HashMap<String, Value>,
    pub accepted: BTreeSet<String>,
}

impl Conn {
    /// Reads exactly `buf.len()` bytes of plaintext. rustls's blocking `Stream` reads the socket
    /// whenever its plaintext buffer is empty, even when a whole record it has not decrypted yet
    /// is already buffered, and then waits for bytes that never come: so records are decrypted
    /// here before the socket is read again.
    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.stream.conn.reader().read(buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.stream.conn.read_tls(&mut self.stream.sock)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.stream
                .conn
                .process_new_packets()
                .map_err(std::io::Error::other)?;
            while self.stream.conn.wants_write() {
                self.stream.conn.write_tls(&mut self.stream.sock)?;
            }
        }
        Ok(())
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// Writes `bytes` one byte per TLS record: the agent must reassemble every frame.
    pub fn dribble(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write(std::slice::from_ref(b));
        }
    }

    pub fn send(&mut self, msg: &Value) {
        self.write(&text(msg));
    }

    /// The next message or close frame (answering pings), `None` after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Got> {
        let deadline = Instant::now() + timeout;
        let mut message = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut head = [0u8; 2];
            match self.read_exact(&mut head) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Some(Got::Close(None))
                }
                Err(e) => panic!("reading from the agent: {e}"),
            }
            // A frame that started arrives whole (the agent writes frames whole).
            self.stream
                .sock
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
            assert!(head[1] & 0x80 != 0, "the agent's frames are masked");
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.read_exact(&mut b).unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.read_exact(&mut b).unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut mask = [0u8; 4];
            self.read_exact(&mut mask).unwrap();
            let mut payload = vec![0u8; len];
            self.read_exact(&mut payload).unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            match opcode {
                9 => self.write(&frame(10, &payload)),
                10 => {}
                8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Some(Got::Close(code));
                }
                0..=2 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        let msg: Value =
                            serde_json::from_slice(&message).expect("agent text is JSON");
                        self.note(&msg);
                        return Some(Got::Text(msg));
                    }
                }
                other => panic!("unexpected opcode {other} from the agent"),
            }
        }
    }

    /// Remembers acceptances and results; acknowledges every result at once.
    pub fn note(&mut self, msg: &Value) {
        let task_id = msg["task_id"].as_str().unwrap_or_default().to_string();
        match msg["type"].as_str() {
            Some("accepted") => {
                self.accepted.insert(task_id);
            }
            Some("result") => {
                let ack = json!({"type": "ack", "task_ids": [task_id]});
                self.results.entry(task_id).or_insert_with(|| msg.clone());
                self.send(&ack);
            }
            _ => {}
        }
    }

    /// The next text message of `kind` (others are noted and skipped), within `timeout`.
    pub fn expect(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(Got::Text(m)) if m["type"] == kind => return m,
                Some(Got::Text(_)) => {}
                other => panic!("waiting for {kind}: got {other:?}"),
            }
        }
    }

    /// `hello`, answered with `welcome`; returns the agent id.
    pub fn open(&mut self) -> String {
        let hello = self.expect("hello", Duration::from_secs(30));
        let id = hello["agent_id"].as_str().unwrap().to_string();
        self.send(&json!({"type": "welcome", "version": 2, "agent_id": id, "enrolled": false}));
        id
    }

    /// Waits until `task_id` has a result (noting everything else).
    pub fn result(&mut self, task_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        while !self.results.contains_key(task_id) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(Got::Text(_)) => {}
                other => panic!("waiting for the result of {task_id}: got {other:?}"),
            }
        }
        self.results[task_id]["result"].clone()
    }

    /// The agent still runs a task, and owes no result for anything it accepted.
    pub fn healthy(&mut self, agent: &mut Agent) {
        let id = format!("health-{}", self.results.len());
        self.send(&json!({"type": "run", "id": id, "task_id": id, "command": "echo", "args": ["healthy"]}));
        let r = self.result(&id, Duration::from_secs(30));
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["stdout"], "healthy\n");
        let owed: Vec<&String> = self
            .accepted
            .iter()
            .filter(|t| !self.results.contains_key(*t))
            .collect();
        assert!(owed.is_empty(), "accepted without a result: {owed:?}");
        assert!(agent.alive(), "the agent exited; log:\n{}", agent.log());
        let rss = agent.rss_kib();
        assert!(rss < 200 * 1024, "the agent holds {rss} KiB");
        assert!(!agent.log().contains("panicked"), "{}", agent.log());
    }
}

/// The real agent, pointed at a [`Server`].
/// A real agent (`bridge-daemon run`) pointed at the fake platform.
pub struct Agent(Proc);

impl Agent {
    pub fn start(server: &Server, dir: &Path, journal_max_mib: u64) -> Agent {
        Agent::start_with(server, dir, journal_max_mib, &[], "")
    }

    /// With `extra` arguments, and `agent` lines added to the config's `[agent]` section.
    pub fn start_with(
        server: &Server,
        dir: &Path,
        journal_max_mib: u64,
        extra: &[String],
        agent: &str,
    ) -> Agent {
        Agent::start_env(server, dir, journal_max_mib, extra, agent, &[])
    }

    /// As [`Agent::start_with`], with `env` set on the agent's process.
    pub fn start_env(
        server: &Server,
        dir: &Path,
        journal_max_mib: u64,
        extra: &[String],
        agent: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Agent {
        let config = config(dir, journal_max_mib, agent);
        let mut cmd = bridge_testkit::bins::daemon();
        cmd.arg("run")
            .args(["--server", &server.url(), "--server-pin", &server.pin])
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--config")
            .arg(config)
            .args(["--reconnect-max-secs", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null());
        Agent(Proc::spawn("bridge-daemon run", cmd))
    }

    /// Waits (at most `timeout`) for the agent to exit by itself.
    #[allow(dead_code)] // not every test file that shares this module uses it
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.0.wait_exit(timeout)
    }

    pub fn alive(&mut self) -> bool {
        self.0.alive()
    }

    pub fn log(&self) -> String {
        self.0.log.text()
    }

    pub fn log_lines(&self) -> usize {
        self.0.log.len()
    }

    /// How many lines of its log so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.0.log.count(needle)
    }

    /// Resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// A fake platform and an agent connected to it, welcomed.
pub fn setup(journal_max_mib: u64) -> (tempfile::TempDir, Server, Agent, Conn) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let agent = Agent::start(&server, dir.path(), journal_max_mib);
    let mut conn = server.accept();
    conn.open();
    (dir, server, agent, conn)
}

/// A fake platform and an agent trusting a fresh publisher, with `agent_toml` in its `[agent]`
/// table; the connection is accepted, not yet welcomed.
pub fn setup_with_publisher(
    agent_toml: &str,
) -> (
    tempfile::TempDir,
    Server,
    bridge_testkit::Publisher,
    Agent,
    Conn,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let publisher = bridge_testkit::Publisher::new();
    let trusted = ["--trusted-key".to_string(), publisher.public()];
    let agent = Agent::start_with(&server, dir.path(), 256, &trusted, agent_toml);
    let conn = server.accept();
    (dir, server, publisher, agent, conn)
}

/// The SHA-256 of a module file, hex: what `run` and `install_handler` name it by.
pub fn file_sha256(module: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(module))
}

pub fn run(id: &str, command: &str, args: &[&str]) -> Value {
    json!({"type": "run", "id": format!("run-{id}"), "task_id": id, "command": command, "args": args})
}
