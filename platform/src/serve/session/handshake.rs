//! From a TLS stream to a greeted agent: the agent id from the client certificate, the
//! WebSocket upgrade (path, enrollment or token), then `hello` and the protocol version.

use std::net::SocketAddr;
use std::sync::Mutex;

use anyhow::{anyhow, Context as _, Result};
use bridge_protocol::codec::decode;
use bridge_protocol::{AgentMessage, ErrorCode, AGENT_PATH, VERSIONS};
use futures_util::StreamExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::{
    binary_not_expected, close, error_message, send, ws_config, Sink, Stream, HANDSHAKE_TIMEOUT,
    HELLO_TIMEOUT, REFUSAL_HEADER,
};
use crate::serve::hub::Hub;
use crate::serve::registry::{Admission, AdmitError, Refusal};
use crate::serve::tls::agent_id_of;

/// An agent whose upgrade and `hello` are done: the session answers `welcome` next.
pub(super) struct Greeted {
    /// From the client certificate.
    pub(super) agent_id: String,
    /// The upgrade enrolled the agent (its token was used just now).
    pub(super) enrolled: bool,
    /// What the agent's `hello` says it runs.
    pub(super) agent_version: String,
    /// The protocol version of the session: the highest both ends speak.
    pub(super) version: u32,
    pub(super) sink: Sink,
    pub(super) stream: Stream,
}

/// Upgrades `tls` and waits for the agent's `hello`. `Ok(None)`: the server began shutting
/// down first (the connection is closed).
pub(super) async fn greet(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    hub: &Hub,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Greeted>> {
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .cloned()
        .ok_or_else(|| anyhow!("no client certificate"))?;
    let agent_id = agent_id_of(&cert)?;

    let admission: Mutex<Option<Admission>> = Mutex::new(None);
    // The error type is tungstenite's HTTP response: large, but not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != AGENT_PATH {
            return Err(http_error(
                404,
                None,
                &format!("not found: agents connect to {AGENT_PATH}"),
            ));
        }
        let decision = match bearer(request) {
            Ok(token) => hub.registry.admit(&agent_id, token.as_deref()),
            Err(()) if hub.registry.is_enrolled(&agent_id) => Ok(Admission::Known),
            Err(()) => Err(AdmitError::Refused(Refusal::TokenInvalid)),
        };
        match decision {
            Ok(a) => {
                *admission.lock().unwrap_or_else(|e| e.into_inner()) = Some(a);
                Ok(response)
            }
            Err(AdmitError::Refused(r)) => {
                tracing::warn!(agent_id = %agent_id, %peer, reason = r.as_str(), "refused the upgrade");
                Err(http_error(401, Some(r.as_str()), r.explanation()))
            }
            Err(AdmitError::Internal(e)) => {
                tracing::error!(agent_id = %agent_id, "cannot enroll: {e:#}");
                Err(http_error(
                    500,
                    None,
                    "the platform could not record the enrollment",
                ))
            }
        }
    };
    let ws = timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(ws_config())),
    )
    .await
    .map_err(|_| anyhow!("WebSocket upgrade timed out"))?
    .context("WebSocket upgrade failed")?;
    let enrolled =
        admission.into_inner().unwrap_or_else(|e| e.into_inner()) == Some(Admission::Enrolled);
    if enrolled {
        tracing::info!(agent_id = %agent_id, %peer, "enrolled a new agent");
    }
    tracing::info!(agent_id = %agent_id, %peer, "agent connected");

    let (mut sink, mut stream) = ws.split();
    let hello = tokio::select! {
        hello = timeout(HELLO_TIMEOUT, wait_hello(&mut sink, &mut stream)) => hello,
        _ = shutdown.changed() => {
            close(&mut sink, &mut stream, CloseCode::Away, "the platform is shutting down").await;
            return Ok(None);
        }
    };
    let (versions, said_id, agent_version) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let why = anyhow!("agent {agent_id} sent no hello within {HELLO_TIMEOUT:?}");
            return Err(refuse(&mut sink, &mut stream, "no hello within 10 s", why).await);
        }
    };
    if said_id != agent_id {
        tracing::warn!(agent_id = %agent_id, claimed = %said_id, "hello names another agent id; using the certificate's");
    }
    let Some(version) = VERSIONS.iter().copied().find(|v| versions.contains(v)) else {
        let refusal = error_message(
            None,
            ErrorCode::UnsupportedVersion,
            format!(
                "this platform speaks protocol versions {VERSIONS:?}; the agent offered {versions:?}"
            ),
        );
        send(&mut sink, &refusal).await?;
        let why = anyhow!("agent {agent_id} offered no supported version ({versions:?})");
        return Err(refuse(&mut sink, &mut stream, "unsupported protocol version", why).await);
    };
    Ok(Some(Greeted {
        agent_id,
        enrolled,
        agent_version,
        version,
        sink,
        stream,
    }))
}

/// Closes the connection of an agent that broke the protocol (`reason`, for the agent);
/// returns `why`, for the log.
async fn refuse(
    sink: &mut Sink,
    stream: &mut Stream,
    reason: &str,
    why: anyhow::Error,
) -> anyhow::Error {
    close(sink, stream, CloseCode::Policy, reason).await;
    why
}

/// The bearer token of the upgrade request: `Ok(None)` without an `Authorization` header,
/// `Err(())` with one that is not `Bearer <token>`.
fn bearer(request: &Request) -> Result<Option<String>, ()> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ())?.trim();
    let (scheme, token) = text.split_once(' ').ok_or(())?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(());
    }
    Ok(Some(token.to_string()))
}

/// The HTTP response refusing an upgrade, naming why in [`REFUSAL_HEADER`] when it is a
/// refusal the agent can act on.
fn http_error(status: u16, refusal: Option<&str>, body: &str) -> ErrorResponse {
    let mut builder = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    if let Some(r) = refusal {
        builder = builder.header(REFUSAL_HEADER, r);
    }
    builder
        .body(Some(format!("{body}\n")))
        .expect("static response parts are valid")
}

/// Reads until a valid `hello`, answering anything else with an `error`; returns the versions
/// it offers, the agent id it claims and its version.
async fn wait_hello(sink: &mut Sink, stream: &mut Stream) -> Result<(Vec<u32>, String, String)> {
    loop {
        let message = match stream.next().await {
            None => return Err(anyhow!("closed before hello")),
            Some(Err(e)) => return Err(anyhow!("read failed before hello: {e}")),
            Some(Ok(m)) => m,
        };
        match message {
            Message::Text(text) => match decode::<AgentMessage>(&text, AgentMessage::TYPES) {
                Ok(AgentMessage::Hello {
                    versions,
                    agent_id,
                    agent_version,
                }) => return Ok((versions, agent_id, agent_version)),
                Ok(_) => {
                    let not_hello = error_message(
                        None,
                        ErrorCode::Unexpected,
                        "the first message must be `hello`",
                    );
                    send(sink, &not_hello).await?;
                }
                Err(e) => send(sink, &bridge_protocol::PlatformMessage::Error(e.body())).await?,
            },
            Message::Binary(_) => send(sink, &binary_not_expected()).await?,
            Message::Close(_) => return Err(anyhow!("closed before hello")),
            _ => {}
        }
    }
}
