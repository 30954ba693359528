//! The platform link: one outbound WebSocket over TLS that survives whatever the network does.
//!
//! [`run`] loops for the agent's life: connect (DNS, TCP, TLS with mutual authentication, the
//! WebSocket upgrade, carrying the enrollment token until the agent has recorded its enrollment:
//! see [`welcomed`]), run a [`session`] until the link dies, then
//! wait per [`backoff`] and try again. Every failure, whatever its kind, goes through the same
//! backoff; nothing here spins. The link is declared dead when no frame at all has arrived from
//! the platform within the heartbeat timeout, even if TCP never reports an error (a silent
//! partition).
//!
//! The link is transport only. It hands each decoded message to the agent through [`Peer`] (the
//! whole interface between the two) and writes what the [`Outbox`] gives it; the outbox, which
//! outlives sessions, decides what goes out and in what order, so a result produced while the
//! link is down is sent on the next connection.

pub mod backoff;
pub mod session;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::identity;
use crate::outbox::Outbox;
use backoff::Backoff;
pub use tls::ServerTrust;

/// What the link needs from the agent. The link frames, heartbeats and reconnects; what a
/// message means is the agent's business. Every method returns at once.
pub trait Peer: Send + Sync + 'static {
    /// The agent id, sent in `hello`.
    fn agent_id(&self) -> &str;
    /// The report sent as `status` when a session opens and every status interval.
    fn status(&self) -> bridge_protocol::StatusReport;
    /// A message from the platform, decoded and checked, in the order they arrive: `run`,
    /// `cancel`, `ack` and the handler requests (the link answers `welcome` and `error` itself).
    fn deliver(self: &Arc<Self>, msg: bridge_protocol::PlatformMessage);
    /// The platform welcomed a session of protocol `version`, naming the audit sequence
    /// number it stored (`audit_seq`; called before anything is read on it).
    fn welcomed(self: &Arc<Self>, version: u32, audit_seq: Option<u64>) {
        let _ = (version, audit_seq);
    }
    /// A binary frame: module bytes some run asked for (or a part of a release being
    /// fetched), or an error to answer with.
    fn module_arrived(&self, bytes: Vec<u8>) -> Result<(), bridge_protocol::ErrorBody>;
    /// The link failed and waits to reconnect.
    fn waiting_to_reconnect(self: &Arc<Self>);
    /// What the agent observes about itself: the link reports its connections, their ends and
    /// heartbeat round trips there.
    fn observer(&self) -> &crate::observe::Observer;
}

/// Everything the link needs to know (the config's `[platform]` section, resolved).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `wss://host:port/path` (or `ws://` with `allow_plaintext`).
    pub server: String,
    /// The one-time enrollment token, sent as `Authorization: Bearer …` until the platform has
    /// welcomed a connection that presented it.
    pub token: Option<String>,
    /// The state directory to record enrollment in (`enrolled`) when the platform welcomes a
    /// connection that presented the token; set by [`run`].
    pub record_enrollment: Option<std::path::PathBuf>,
    /// How the platform is verified.
    pub trust: ServerTrust,
    /// Development only: allow `ws://` (no TLS, so no server or agent authentication).
    pub allow_plaintext: bool,
    /// WebSocket ping interval.
    pub heartbeat: Duration,
    /// No frame from the platform for this long: the link is dead.
    pub heartbeat_timeout: Duration,
    /// First reconnect wait cap.
    pub reconnect_base: Duration,
    /// Longest reconnect wait.
    pub reconnect_max: Duration,
    /// A connection up this long resets the backoff.
    pub healthy_after: Duration,
    /// Status report interval.
    pub status_interval: Duration,
    /// Limit for DNS + TCP + TLS + upgrade.
    pub connect_timeout: Duration,
}

impl LinkConfig {
    /// Defaults for everything but the server address: heartbeat 30 s, timeout 2 × 30 s + 10 s,
    /// reconnect 1 s doubling to 60 s, healthy after 30 s, status every 60 s.
    pub fn new(server: impl Into<String>) -> LinkConfig {
        LinkConfig {
            server: server.into(),
            token: None,
            record_enrollment: None,
            trust: ServerTrust::default(),
            allow_plaintext: false,
            heartbeat: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(70),
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(30),
            status_interval: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// The parts of the server URL the link uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Whether TLS is used (`wss`).
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (default 443 / 80).
    pub port: u16,
    /// The URL as given (for the upgrade request).
    pub url: String,
}

/// Parses and checks the server URL: `wss://` always, `ws://` only with `allow_plaintext`.
pub fn endpoint(server: &str, allow_plaintext: bool) -> Result<Endpoint> {
    let uri: Uri = server
        .parse()
        .with_context(|| format!("the server URL {server:?} is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") if allow_plaintext => false,
        Some("ws") => bail!(
            "refusing plaintext ws:// ({server}): the link must be wss:// (TLS). For local development \
             only, --dev-allow-plaintext permits ws://"
        ),
        other => bail!("the server URL must start with wss:// (got {other:?} in {server:?})"),
    };
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("the server URL {server:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Endpoint {
        tls,
        host,
        port,
        url: server.to_string(),
    })
}

/// The WebSocket limits: big enough for one module upload, no bigger.
pub fn ws_config() -> WebSocketConfig {
    let max = bridge_protocol::MAX_BINARY_BYTES + (64 << 10);
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// The byte stream under the WebSocket: TLS over TCP, or plain TCP in development.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A connected, upgraded WebSocket.
pub type Socket = WebSocketStream<Box<dyn Io>>;

/// Why a connection attempt failed, for the log and for the tests.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The platform refused the upgrade (e.g. enrollment: `token_used`).
    #[error("the platform refused the agent (HTTP {status}): {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `X-Bridge-Refusal`, or the body.
        reason: String,
    },
    /// Anything else: DNS, TCP, TLS (pin mismatch included), timeouts.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// One connection attempt: DNS, TCP, TLS, WebSocket upgrade with the token.
pub async fn connect(
    config: &LinkConfig,
    endpoint: &Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Socket, ConnectError> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .with_context(|| format!("connecting to {}:{}", endpoint.host, endpoint.port))?;
    let _ = tcp.set_nodelay(true);
    let stream = match tls {
        Some(tls) => {
            let name = ServerName::try_from(endpoint.host.clone())
                .with_context(|| format!("{:?} is not a valid TLS server name", endpoint.host))?;
            let connector = tokio_rustls::TlsConnector::from(tls);
            let stream = connector
                .connect(name, tcp)
                .await
                .context("TLS handshake with the platform")?;
            Box::new(stream) as Box<dyn Io>
        }
        None => Box::new(tcp),
    };
    let mut request = endpoint
        .url
        .as_str()
        .into_client_request()
        .context("building the upgrade request")?;
    if let Some(token) = &config.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token has invalid characters")?;
        request.headers_mut().insert("authorization", value);
    }
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let reason = response
                .headers()
                .get("x-bridge-refusal")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| {
                    response
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).trim().to_string())
                })
                .unwrap_or_else(|| "no reason given".into());
            Err(ConnectError::Refused { status, reason })
        }
        Err(e) => Err(anyhow::Error::from(e).context("WebSocket upgrade").into()),
    }
}

/// The platform welcomed `agent_id` on a connection made with `config`. If that connection
/// presented the enrollment token, the enrollment is recorded in the state directory, so the
/// token is neither sent again nor read at the next start. A failure to record is logged: the
/// token is then sent again, which a platform that knows the agent ignores.
pub fn welcomed(config: &LinkConfig, agent_id: &str) {
    let (Some(_), Some(state)) = (&config.token, &config.record_enrollment) else {
        return;
    };
    if identity::enrollment(state, agent_id).is_some() {
        return;
    }
    match identity::record_enrollment(state, agent_id, &config.server) {
        Ok(_) => tracing::info!(
            record = %identity::enrollment_file(state).display(),
            "enrollment recorded: the enrollment token will not be sent or read again"
        ),
        Err(e) => tracing::warn!("could not record the enrollment: {e:#}"),
    }
}

/// Runs the link until `shutdown` is cancelled: connect, serve, back off, reconnect.
/// `identity` is the agent's, loaded from `state` (and renewed there when it nears expiry).
pub async fn run<P: Peer>(
    mut config: LinkConfig,
    state: std::path::PathBuf,
    mut identity: identity::Identity,
    peer: Arc<P>,
    mut outbox: Outbox,
    shutdown: CancellationToken,
) -> Result<()> {
    let endpoint = endpoint(&config.server, config.allow_plaintext)?;
    if !endpoint.tls {
        tracing::warn!(server = %config.server, "PLAINTEXT link (--dev-allow-plaintext): no TLS, no authentication; development only");
    }
    if config.token.is_some() {
        config.record_enrollment = Some(state.clone());
    }
    let mut tls = if endpoint.tls {
        Some(tls::client_config(&config.trust, &identity)?)
    } else {
        None
    };
    let mut backoff = Backoff::new(config.reconnect_base, config.reconnect_max);
    tracing::info!(agent_id = %identity.agent_id, server = %config.server, "starting the platform link");
    while !shutdown.is_cancelled() {
        if config.token.is_some() && identity::enrollment(&state, &identity.agent_id).is_some() {
            config.token = None;
        }
        if identity.needs_renewal() {
            // A failed renewal (disk full, CA file briefly unreadable) must not end the link:
            // keep the current certificate, which is still valid, and try again next time.
            let renewed = identity::load_or_create(&state).and_then(|id| {
                let config = if endpoint.tls {
                    Some(tls::client_config(&config.trust, &id)?)
                } else {
                    None
                };
                Ok((id, config))
            });
            match renewed {
                Ok((id, config)) => {
                    identity = id;
                    tls = config;
                }
                Err(e) => tracing::warn!("could not renew the agent certificate: {e:#}"),
            }
        }
        let attempt = tokio::select! {
            r = tokio::time::timeout(config.connect_timeout, connect(&config, &endpoint, tls.clone())) => r,
            _ = shutdown.cancelled() => break,
        };
        match attempt {
            Ok(Ok(ws)) => {
                let started = Instant::now();
                tracing::info!(agent_id = %identity.agent_id, "connected to the platform");
                let end = session::run(ws, &config, &peer, &mut outbox, &shutdown).await;
                let lasted = started.elapsed();
                if lasted >= config.healthy_after {
                    backoff.reset();
                }
                match &end {
                    session::End::Shutdown => break,
                    other => {
                        tracing::warn!(after_secs = lasted.as_secs_f64(), "link lost: {other}");
                        peer.observer().link_ended(&other.to_string());
                    }
                }
            }
            Ok(Err(e)) => {
                match &e {
                    ConnectError::Refused { status, reason } => {
                        tracing::error!(status, reason = %reason, "the platform refused this agent")
                    }
                    ConnectError::Other(e) => match tls::pin_mismatch(e.as_ref()) {
                        Some(m) => {
                            tracing::error!(presented = %m.presented, expected = ?m.expected, "server pin mismatch: not connecting")
                        }
                        None => tracing::warn!("cannot reach the platform: {e:#}"),
                    },
                }
                peer.observer().link_ended(&format!("{e:#}"));
            }
            Err(_) => {
                tracing::warn!(
                    timeout_secs = config.connect_timeout.as_secs(),
                    "connecting to the platform timed out"
                );
                peer.observer().link_ended(&format!(
                    "connecting to the platform timed out after {} s",
                    config.connect_timeout.as_secs()
                ));
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(
            attempt = backoff.attempts(),
            delay_ms = delay.as_millis() as u64,
            "reconnecting after a pause"
        );
        peer.waiting_to_reconnect();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!("platform link stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_needs_the_development_flag() {
        let err = endpoint("ws://127.0.0.1:9/agent", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dev-allow-plaintext"), "{err}");
        let e = endpoint("ws://127.0.0.1:9/agent", true).unwrap();
        assert!(!e.tls);
        let e = endpoint("wss://platform.example:8443/agent", false).unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port),
            (true, "platform.example", 8443)
        );
        assert_eq!(endpoint("wss://[::1]/agent", false).unwrap().host, "::1");
        assert!(endpoint("https://x/agent", false).is_err());
        assert!(endpoint("not a url", false).is_err());
    }
}
