//! Installed handlers: a signed module bound to a command name its signed claims carry, kept in
//! the journal (its module in the store, its compiled code in the disk cache) across restarts.

use std::sync::Arc;

use bridge_protocol::{AgentMessage, HandlerInfo};

use super::order::{handler_turn, Turn};
use super::refusal::Refusal;
use super::{lock, Agent, MAX_INSTALLS};
use crate::journal::HandlerRecord;

impl Agent {
    fn handler_list(&self) -> Vec<HandlerInfo> {
        self.journal
            .handlers()
            .into_iter()
            .map(|h| HandlerInfo {
                code_sha256: h
                    .code_sha256
                    .or_else(|| self.modules.code_sha256(&h.file_sha256)),
                name: h.name,
                file_sha256: h.file_sha256,
                installed_at: h.installed_at,
                key: h.key,
            })
            .collect()
    }

    /// `list_handlers`, after the installs and removals in progress.
    pub(super) fn list_handlers(self: &Arc<Self>, id: String) {
        let this = self.clone();
        let changes = lock(&self.turns).pending_handlers();
        tokio::spawn(async move {
            for change in changes {
                change.cancelled().await;
            }
            let handlers = this.handler_list();
            this.outbox
                .send(AgentMessage::Handlers { id, handlers })
                .await;
        });
    }

    /// `remove_handler`.
    pub(super) fn remove_handler(self: &Arc<Self>, id: String, name: String) {
        let this = self.clone();
        let turn = Turn::take(&self.turns, &handler_turn(&name));
        tokio::spawn(async move {
            turn.wait().await;
            let msg = match this.journal.remove_handler(&name).await {
                Ok(true) => {
                    tracing::info!(name = %name, "handler removed");
                    AgentMessage::Handlers {
                        id,
                        handlers: this.handler_list(),
                    }
                }
                Ok(false) => Refusal::NoSuchHandler(name).into_error(&id),
                Err(e) => Refusal::HandlerNotRecorded(e).into_error(&id),
            };
            this.outbox.send(msg).await;
            drop(turn);
        });
    }

    /// `install_handler`: fetch, verify, compile and store the module, check that its signed
    /// claims name the command, record it.
    pub(super) fn install_handler(
        self: &Arc<Self>,
        id: String,
        name: String,
        file_sha256: String,
        signature: Option<String>,
    ) {
        let Ok(permit) = self.installs.clone().try_acquire_owned() else {
            let msg = Refusal::BusyInstalling {
                limit: MAX_INSTALLS,
            }
            .into_error(&id);
            let outbox = self.outbox.clone();
            tokio::spawn(async move { outbox.send(msg).await });
            return;
        };
        let this = self.clone();
        let turn = Turn::take(&self.turns, &handler_turn(&name));
        tokio::spawn(async move {
            let _permit = permit;
            turn.wait().await;
            let msg = match this.install(&id, &name, &file_sha256, signature).await {
                Ok(()) => AgentMessage::Handlers {
                    id,
                    handlers: this.handler_list(),
                },
                Err(refusal) => {
                    let msg = refusal.into_error(&id);
                    if let AgentMessage::Error(e) = &msg {
                        tracing::warn!(name = %name, module = %file_sha256, "refusing to install a handler: {}", e.message);
                    }
                    msg
                }
            };
            this.outbox.send(msg).await;
            drop(turn);
        });
    }

    async fn install(
        &self,
        id: &str,
        name: &str,
        sha_hex: &str,
        signature: Option<String>,
    ) -> Result<(), Refusal> {
        if !crate::shell::rules::valid_name(name) {
            return Err(Refusal::BadHandlerName(name.to_string()));
        }
        let prepared = self.prepare(id, sha_hex, signature.as_deref()).await?;
        let Some(verified) = prepared.verified.as_deref() else {
            return Err(Refusal::Unsigned);
        };
        if verified.claims.name != name {
            return Err(Refusal::NameMismatch {
                signed_for: verified.claims.name.clone(),
                name: name.to_string(),
            });
        }
        let record = HandlerRecord {
            name: name.to_string(),
            file_sha256: sha_hex.to_ascii_lowercase(),
            code_sha256: Some(verified.module_sha256_hex()),
            signature,
            installed_at: now_rfc3339(),
            key: Some(verified.key_id.to_string()),
        };
        self.journal
            .put_handler(record)
            .await
            .map_err(Refusal::HandlerNotRecorded)?;
        tracing::info!(name = %name, module = %sha_hex, key = %verified.key_id, "handler installed");
        Ok(())
    }
}

/// The current time in RFC 3339 (UTC, seconds).
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
