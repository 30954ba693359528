//! The development platform server: what `bridgectl serve` runs.
//!
//! A reference implementation of the platform side of `docs/protocol.md`, for the integration
//! tests, the demo and platform developers. It accepts agents on one TLS listener (WebSocket at
//! [`bridge_protocol::AGENT_PATH`], mutual TLS) and is driven through a control interface on a
//! Unix socket in its state directory, served to its own user only ([`control`]). On the same
//! port, clients without a certificate (an installer's curl or wget) are served `install.sh`
//! and the agent binaries ([`downloads`]).
//!
//! * [`tls`]: the server identity (key, certificate, pin) and client-certificate verification.
//! * [`audit`]: what the platform saw of each agent's audit chain, and its flags, persisted in
//!   the state directory.
//! * [`registry`]: enrolled agents and enrollment tokens, persisted in the state directory.
//! * [`hub`]: live connections, statuses, the module store, and everyone waiting for a task's
//!   result or an agent's reply; runs not yet acknowledged by the agent, resent on reconnect.
//! * [`results`]: task results by task id, persisted in the state directory.
//! * [`updates`]: the updates sent to agents and their verdicts, persisted in the state
//!   directory.
//! * [`rollout`]: a staged rollout of a release across the connected agents (one at a time).
//! * [`session`]: one agent connection.
//! * [`control`]: the control interface and its client.
//! * [`downloads`]: the installer, the agent binaries, their checksums and release manifests.
//!
//! Guarantees: [`Server::bind`] binds the control socket before it reads or writes anything else
//! in the state directory (so a second server on the same directory stops there; a socket left
//! by a server that is gone is replaced), then the agent listener, and issues a fresh
//! enrollment token before it returns, so the [`StartInfo`] it reports is immediately usable; [`Server::run`] serves
//! until its shutdown future completes, then stops accepting, closes every agent connection
//! (WebSocket close 1001), fails the runs still waiting, removes the control socket and returns
//! within a few seconds.

pub mod audit;
pub mod control;
pub mod downloads;
pub mod hub;
pub mod registry;
pub mod results;
pub mod rollout;
pub mod session;
pub mod tls;
pub mod updates;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use self::audit::AuditStore;
use self::downloads::Downloads;
use self::hub::Hub;
use self::registry::Registry;
use self::results::ResultStore;
use self::tls::ServerIdentity;
use self::updates::UpdateStore;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where agents connect (port 0: ephemeral).
    pub listen: SocketAddr,
    /// The state directory (created if missing, kept at mode 0700); the control socket is
    /// [`control::SOCKET_NAME`] in it.
    pub state_dir: PathBuf,
    /// Extra names for the server certificate.
    pub hostnames: Vec<String>,
    /// Lifetime of enrollment tokens (`None`: no expiry).
    pub token_ttl_secs: Option<u64>,
    /// Agent binaries to serve, `(arch, path)`; empty: the `bridge-daemon` next to this
    /// executable, if there is one, for this machine's architecture.
    pub agent_binaries: Vec<(String, PathBuf)>,
    /// A `bridgectl keygen` private key that signs the served agent binaries' release
    /// manifests.
    pub release_key: Option<PathBuf>,
}

/// What `bridgectl serve` prints as its first line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StartInfo {
    /// The URL agents connect to, e.g. `wss://127.0.0.1:8443/agent`.
    pub url: String,
    /// The server pin (64 hex).
    pub server_pin: String,
    /// An enrollment token issued at this start.
    pub token: String,
    /// Absolute path of the control socket, e.g. `/home/dev/bridge-state/control.sock`.
    pub control: String,
    /// Absolute path of the server certificate.
    pub ca_file: String,
    /// The one-line command that installs an agent from this platform (see
    /// [`downloads::install_command`]).
    pub install_command: String,
    /// The release key the served release manifests are signed with (`ed25519:…`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_key: Option<String>,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    info: StartInfo,
    listener: TcpListener,
    control: tokio::net::UnixListener,
    control_file: control::SocketFile,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    downloads: Arc<Downloads>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Prepares the state directory and identity, binds both listeners and issues a token.
    pub async fn bind(options: ServeOptions) -> Result<Server> {
        tls::ensure_state_dir(&options.state_dir)?;
        let state_dir = options
            .state_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", options.state_dir.display()))?;
        // Removed again if anything below fails.
        let (control, control_file) = control::bind(&state_dir)?;
        let identity = ServerIdentity::load_or_create(&options.state_dir, &options.hostnames)?;
        let config = identity.server_config()?;
        let registry = Registry::open(&options.state_dir)?;
        let results = ResultStore::open(&options.state_dir)?;
        let updates = UpdateStore::open(&options.state_dir)?;
        let audit = AuditStore::open(&options.state_dir)?;
        let hub = Arc::new(Hub::new(
            registry,
            results,
            updates,
            audit,
            options.token_ttl_secs,
        ));
        let binaries = if options.agent_binaries.is_empty() {
            downloads::default_agent_binary()
                .map(|p| vec![(std::env::consts::ARCH.to_string(), p)])
                .unwrap_or_default()
        } else {
            options.agent_binaries.clone()
        };
        if binaries.is_empty() {
            tracing::warn!(
                "no agent binary to serve (none next to this executable; use --agent-binary)"
            );
        }
        let downloads = Arc::new(Downloads::new(binaries, options.release_key.as_deref())?);
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        let token = hub.issue_token()?;
        let bound = listener.local_addr()?;
        let host = if bound.ip().is_unspecified() {
            // Not a connectable address: name the host by its first --hostname, or loopback.
            options
                .hostnames
                .first()
                .cloned()
                .unwrap_or_else(|| "127.0.0.1".into())
        } else {
            match bound.ip() {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            }
        };
        let base_url = format!("https://{host}:{}", bound.port());
        let release_key = downloads.release_public_key();
        let install_command =
            downloads::install_command(&base_url, &identity.pin, &token, release_key.as_deref())?;
        let info = StartInfo {
            url: format!(
                "wss://{host}:{}{}",
                bound.port(),
                bridge_protocol::AGENT_PATH
            ),
            server_pin: identity.pin.clone(),
            token,
            control: control_file.path().display().to_string(),
            ca_file: identity.cert_path.display().to_string(),
            install_command,
            release_key,
        };
        Ok(Server {
            info,
            listener,
            control,
            control_file,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            hub,
            downloads,
        })
    }

    /// Where the server listens, its pin and its first token.
    pub fn info(&self) -> &StartInfo {
        &self.info
    }

    /// Serves agents and the control interface until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let control = tokio::spawn(control::serve(
            self.control,
            self.hub.clone(),
            stopped.clone(),
        ));
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        sessions.spawn(connection(
                            tcp,
                            peer,
                            self.acceptor.clone(),
                            self.hub.clone(),
                            self.downloads.clone(),
                            stopped.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        tracing::info!("shutting down");
        drop(self.listener);
        let _ = stop.send(true);
        self.hub.fail_all();
        let drained = tokio::time::timeout(Duration::from_secs(3), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("some agent connections did not close in time");
            sessions.abort_all();
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), control).await;
        drop(self.control_file);
        tracing::info!("stopped");
        Ok(())
    }
}

/// One accepted connection: the TLS handshake, then an agent session when the client presented
/// a certificate, or one download request when it did not.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    downloads: Arc<Downloads>,
    shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(session::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, "connection ended: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "connection ended: TLS handshake timed out");
            return;
        }
    };
    let has_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|certs| !certs.is_empty());
    if has_cert {
        session::handle_tls(tls, peer, hub, shutdown).await;
    } else {
        downloads.serve(tls, peer).await;
    }
}
