//! A fake agent for the tests that run the real `bridgectl serve` (`bridge_testkit::Platform`)
//! and talk to it as an agent would: TLS with a self-signed client certificate, the server
//! pinned by the printed pin, WebSocket at /agent.

// Each test file uses its own subset.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bridge_protocol::identity::spki_fingerprint;
use bridge_testkit::Platform;
use futures_util::{SinkExt as _, StreamExt as _};
use rcgen::PublicKeyData as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub const STEP: Duration = Duration::from_secs(10);
pub const BIN: &str = env!("CARGO_BIN_EXE_bridgectl");

/// A temporary directory to run `bridgectl` in.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `bridgectl ARGS` in the directory.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Runs and expects exit status `code`; returns stdout parsed as one line of JSON (Null if
    /// empty), and stderr.
    #[track_caller]
    pub fn run_code(&self, args: &[&str], code: i32) -> (Value, String) {
        let out = self.run(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "bridgectl {args:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
            serde_json::from_str(&stdout).unwrap()
        };
        (json, stderr)
    }

    /// Runs and expects success; returns stdout as JSON.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Value {
        self.run_code(args, 0).0
    }

    /// Creates key `name` (and `name.pub`); returns the keygen output.
    pub fn keygen(&self, name: &str) -> Value {
        self.ok(&["keygen", "--out", name])
    }
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Runs `f` with an overall deadline.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test took too long")
}

// ---------------------------------------------------------------------------------------------
// The server process is `bridge_testkit::Platform`, its control client `Platform::control()`.

// ---------------------------------------------------------------------------------------------
// The test agent

/// A client key with its self-signed certificate.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: rcgen::KeyPair,
    pub id: String,
}

impl Identity {
    pub fn new() -> Identity {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let id = spki_fingerprint(&key.subject_public_key_info());
        Identity {
            cert: cert.der().clone(),
            key,
            id,
        }
    }
}

/// Accepts exactly the server whose key has the given pin.
#[derive(Debug)]
pub struct Pinned {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if spki_fingerprint(cert.subject_public_key_info().as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Connects to `url` (path replaced by `path` if given) as `who`, with `token` if given.
pub async fn connect_path(
    serve: &Platform,
    who: &Identity,
    token: Option<&str>,
    path: &str,
) -> Result<Ws, WsError> {
    connect_with(serve, who, token, path, None).await
}

/// Like [`connect_path`], with the socket's receive buffer set to `recv_buffer` bytes if given
/// (a small one makes a peer that does not read fill it quickly).
pub async fn connect_with(
    serve: &Platform,
    who: &Identity,
    token: Option<&str>,
    path: &str,
    recv_buffer: Option<u32>,
) -> Result<Ws, WsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        pin: serve.pin(),
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![who.cert.clone()],
            PrivateKeyDer::try_from(who.key.serialize_der()).unwrap(),
        )
        .unwrap();
    let authority = serve.listen_addr();
    let address: std::net::SocketAddr = authority.parse().unwrap();
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = timeout(STEP, socket.connect(address))
        .await
        .unwrap()
        .unwrap();
    let tls = timeout(
        STEP,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let mut request = format!("wss://{authority}{path}")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(request, tls, Some(config)),
    )
    .await
    .unwrap()?;
    Ok(ws)
}

pub async fn connect(serve: &Platform, who: &Identity, token: Option<&str>) -> Result<Ws, WsError> {
    connect_path(serve, who, token, "/agent").await
}

/// Expects the upgrade to be refused with `status` and the refusal header `reason`.
#[track_caller]
pub fn assert_refused(result: Result<Ws, WsError>, status: u16, reason: Option<&str>) {
    match result {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), status);
            let header = response
                .headers()
                .get("X-Bridge-Refusal")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(header.as_deref(), reason);
        }
        Err(e) => panic!("expected HTTP {status}, got {e}"),
        Ok(_) => panic!("expected HTTP {status}, the upgrade was accepted"),
    }
}

pub async fn send(ws: &mut Ws, value: Value) {
    timeout(STEP, ws.send(Message::Text(value.to_string().into())))
        .await
        .unwrap()
        .unwrap();
}

/// The next frame that is not a ping or pong.
pub async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let message = timeout(STEP, ws.next())
            .await
            .expect("nothing received within 10 s")
            .expect("the connection ended")
            .expect("read failed");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

pub async fn recv(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Waits for the server's close frame; returns its code.
pub async fn expect_close(ws: &mut Ws) -> u16 {
    match next_frame(ws).await {
        Message::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

pub async fn hello(ws: &mut Ws, who: &Identity) -> Value {
    send(
        ws,
        json!({"type": "hello", "versions": [2, 1], "agent_id": who.id, "agent_version": "0.1.0-test"}),
    )
    .await;
    recv(ws).await
}

/// Connects, says hello and checks the welcome; returns the connection and `enrolled`.
pub async fn session(serve: &Platform, who: &Identity, token: Option<&str>) -> (Ws, bool) {
    let mut ws = connect(serve, who, token).await.expect("upgrade refused");
    let welcome = hello(&mut ws, who).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["version"], 2);
    assert_eq!(welcome["agent_id"], who.id.as_str());
    let enrolled = welcome["enrolled"].as_bool().unwrap();
    (ws, enrolled)
}

pub fn status(who: &Identity, hostname: &str) -> Value {
    json!({
        "type": "status",
        "agent_id": who.id,
        "agent_version": "0.1.0-test",
        "host": {"hostname": hostname, "os": "linux", "arch": "x86_64", "uptime_secs": 1000, "load": [0.5, 0.25, 0.125]},
        "running": [],
        "agent_uptime_secs": 5
    })
}

pub fn run_result(status: &str, exit_code: i32) -> Value {
    json!({
        "status": status,
        "exit_code": exit_code,
        "output": {"greeting": "Hello, Ada!"},
        "stdout": "{\"greeting\":\"Hello, Ada!\"}\n",
        "stderr": "",
        "truncated": {"stdout": false, "stderr": false, "stdout_total_bytes": 27, "stderr_total_bytes": 0},
        "fuel_consumed": 5669,
        "memory_peak_bytes": 1114112,
        "duration_ms": 0.41,
        "limits": {"fuel": 1000000000, "memory_bytes": 67108864, "timeout_ms": 10000, "output_bytes": 1048576, "clamped": []},
        "error": if status == "ok" { Value::Null } else { json!("the handler failed") },
        "file_sha256": "ab".repeat(32)
    })
}

/// The response of a control request started with `Control::background`, within 10 s.
pub async fn response_of(handle: tokio::task::JoinHandle<Vec<Value>>) -> Value {
    let mut lines = timeout(STEP, handle)
        .await
        .expect("no control response within 10 s")
        .unwrap();
    lines.pop().unwrap()
}

/// Expects the platform's `ack` for exactly `task_id`.
pub async fn expect_ack(ws: &mut Ws, task_id: &str) {
    let ack = recv(ws).await;
    assert_eq!(ack, json!({"type": "ack", "task_ids": [task_id]}));
}

/// Expects no text frame within `wait` (pings and pongs are ignored).
pub async fn expect_silence(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// Runs `bridgectl --control SOCKET ARGS…` in the background.
pub fn bridgectl(
    serve: &Platform,
    args: &[&str],
) -> tokio::task::JoinHandle<std::io::Result<std::process::Output>> {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("--control")
        .arg(serve.control_socket())
        .args(args);
    tokio::spawn(async move { command.output().await })
}

/// The output of a command started with [`bridgectl`], within 10 s.
pub async fn output_of(
    handle: tokio::task::JoinHandle<std::io::Result<std::process::Output>>,
) -> std::process::Output {
    timeout(STEP, handle)
        .await
        .expect("bridgectl did not exit within 10 s")
        .unwrap()
        .unwrap()
}
