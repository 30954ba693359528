//! The connection's reader after `welcome`: what each message the agent sends means, handed to
//! the hub at once; what must be sent back goes to the writer, never waited for.

use anyhow::{anyhow, Result};
use bridge_protocol::codec::{decode_version, encode};
use bridge_protocol::{AgentMessage, ErrorCode, PlatformMessage};
use futures_util::StreamExt as _;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::writer::{Outgoing, REPLY_QUEUE};
use super::{
    binary_not_expected, error_message, replaced, Ending, Stream, CLOSE_IDLE, IDLE_TIMEOUT,
};
use crate::serve::hub::{ChunkEvent, Hub, Reply};

/// Reads every message the agent sends until the session must end: the connection closes or
/// fails, a newer connection replaces it (`kicked`), the server shuts down, or the agent was
/// silent for [`IDLE_TIMEOUT`].
pub(super) async fn read_loop(
    hub: &Hub,
    agent_id: &str,
    stream: &mut Stream,
    out: &Outgoing,
    kicked: &Notify,
    shutdown: &mut watch::Receiver<bool>,
    version: u32,
) -> Ending {
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            message = stream.next() => {
                let message = match message {
                    None => return ("the connection closed".into(), None),
                    Some(Err(e)) => return (format!("read failed: {e}"), None),
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                hub.seen(agent_id);
                let outcome = match message {
                    Message::Text(text) => on_text(hub, agent_id, out, &text, version),
                    Message::Binary(_) => {
                        out.error(agent_id, &binary_not_expected());
                        Ok(())
                    }
                    Message::Close(frame) => {
                        let why = match frame {
                            Some(f) => format!("closed by the agent ({}: {})", u16::from(f.code), f.reason),
                            None => "closed by the agent".into(),
                        };
                        return (why, None);
                    }
                    _ => Ok(()),
                };
                if let Err(e) = outcome {
                    return (format!("{e:#}"), Some((CloseCode::Policy, "the agent does not read its replies")));
                }
            }
            () = kicked.notified() => return replaced(),
            _ = shutdown.changed() => {
                return ("the platform is shutting down".into(), Some((CloseCode::Away, "the platform is shutting down")));
            }
            () = sleep_until(last_heard + IDLE_TIMEOUT) => {
                return (format!("silent for {IDLE_TIMEOUT:?}"), Some((CloseCode::from(CLOSE_IDLE), "nothing received for 90 s")));
            }
        }
    }
}

/// Handles one text frame of protocol `version` after `welcome`, never waiting: what must be
/// sent goes to `out`. An error ends the connection.
fn on_text(hub: &Hub, agent_id: &str, out: &Outgoing, text: &str, version: u32) -> Result<()> {
    let message = match decode_version::<AgentMessage>(text, AgentMessage::TYPES, version) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                agent_id,
                code = e.code.as_str(),
                "undecodable message: {}",
                e.message
            );
            out.error(agent_id, &PlatformMessage::Error(e.body()));
            return Ok(());
        }
    };
    match message {
        AgentMessage::NeedRelease { id, offset, length } => {
            let answer = match hub.release_range(agent_id, &id, offset, length) {
                Ok(bytes) => {
                    tracing::debug!(agent_id, update = %id, offset, length, "sending release bytes");
                    Message::Binary(bytes)
                }
                Err((code, why)) => {
                    tracing::warn!(agent_id, update = %id, offset, length, "need_release refused: {why}");
                    Message::Text(encode(&error_message(Some(id), code, why)).into())
                }
            };
            // The agent waits for this answer, error or bytes: it must not be dropped.
            if out.reply(answer) {
                Ok(())
            } else {
                Err(anyhow!(
                    "the agent asked for more than {REPLY_QUEUE} ranges without reading the answers"
                ))
            }
        }
        AgentMessage::UpdateStatus(status) => {
            let id = status.id.clone();
            if hub.on_update_status(agent_id, status) {
                let ack = PlatformMessage::UpdateAck { id };
                if !out.reply(Message::Text(encode(&ack).into())) {
                    return Err(anyhow!(
                        "the agent sent more than {REPLY_QUEUE} messages without reading the answers"
                    ));
                }
            }
            Ok(())
        }
        AgentMessage::Hello { .. } => {
            let again = error_message(
                None,
                ErrorCode::Unexpected,
                "`hello` was already received on this connection",
            );
            out.error(agent_id, &again);
            Ok(())
        }
        AgentMessage::Status(status) => {
            if let Err(why) = status.check() {
                tracing::warn!(agent_id, code = "malformed", "invalid status: {why}");
                let bad = error_message(
                    None,
                    ErrorCode::Malformed,
                    format!("bad `status` message: {why}"),
                );
                out.error(agent_id, &bad);
                return Ok(());
            }
            if status.agent_id != agent_id {
                tracing::warn!(agent_id, claimed = %status.agent_id, "status names another agent id");
            }
            tracing::debug!(agent_id, running = status.running.len(), "status");
            hub.set_status(agent_id, status);
            Ok(())
        }
        AgentMessage::NeedModule {
            id,
            file_sha256: sha256,
        } => {
            let answer = match hub.module(&sha256) {
                Some(bytes) => {
                    tracing::info!(agent_id, run_id = %id, sha256 = %sha256, bytes = bytes.len(), "sending module");
                    Message::Binary(bytes)
                }
                None => {
                    tracing::warn!(agent_id, run_id = %id, sha256 = %sha256, "agent asked for an unknown module");
                    let unknown = error_message(
                        Some(id),
                        ErrorCode::Unexpected,
                        format!("the platform has no module with SHA-256 {sha256}"),
                    );
                    Message::Text(encode(&unknown).into())
                }
            };
            // Even an error here is one the agent waits for: it must not be dropped.
            if out.reply(answer) {
                Ok(())
            } else {
                Err(anyhow!(
                    "the agent asked for more than {REPLY_QUEUE} modules without reading the answers"
                ))
            }
        }
        AgentMessage::Accepted { id, task_id, state } => {
            hub.on_accepted(agent_id, &id, &task_id, state);
            Ok(())
        }
        AgentMessage::Chunk {
            task_id,
            seq,
            stream,
            data,
            dropped_bytes,
        } => {
            let chunk = ChunkEvent {
                task_id,
                seq,
                stream,
                data,
                dropped_bytes,
            };
            if hub.on_chunk(chunk) == 0 {
                tracing::debug!(agent_id, "chunk for a task nobody streams (ignored)");
            }
            Ok(())
        }
        AgentMessage::CancelReply {
            id,
            task_id,
            outcome,
        } => {
            if !hub.on_reply(agent_id, &id, Reply::Cancel { task_id, outcome }) {
                tracing::warn!(agent_id, request = %id, "cancel_reply for no waiting request (ignored)");
            }
            Ok(())
        }
        AgentMessage::Handlers { id, handlers } => {
            if !hub.on_reply(agent_id, &id, Reply::Handlers(handlers)) {
                tracing::warn!(agent_id, request = %id, "handlers for no waiting request (ignored)");
            }
            Ok(())
        }
        AgentMessage::Result {
            id,
            task_id,
            result,
        } => {
            // Store first, then acknowledge: the agent forgets what we acknowledge. The ack is
            // queued for the writer (merged with others), never waited for here.
            if hub.on_result(agent_id, &id, &task_id, result) {
                out.ack(task_id);
            }
            Ok(())
        }
        AgentMessage::Error(body) => {
            let why = format!("{}: {}", body.code.as_str(), body.message);
            let ended = body
                .id
                .as_deref()
                .is_some_and(|id| hub.on_error(agent_id, id, why.clone()));
            if !ended {
                tracing::warn!(agent_id, id = ?body.id, "the agent reported an error: {why}");
                hub.deliver_error(agent_id, &body);
            }
            Ok(())
        }
    }
}
