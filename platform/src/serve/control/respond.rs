//! What each control request does: the hub call it makes and the response line it gives (a
//! streaming `run` writes its chunk event lines first).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bridge_protocol::RunResult;
use serde_json::{json, Value};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::requests::{decode_b64, run_order, wait, ControlRequest, RolloutCommand, UpdateCommand};
use super::{
    write_line, CHUNK_QUEUE, DEFAULT_REQUEST_WAIT_MS, DEFAULT_SEND_WAIT_MS, DEFAULT_UPDATE_WAIT_MS,
};
use crate::serve::hub::{ChunkEvent, Ending, Hub, HubError, Release, RunOrder, UpdateOrder};
use crate::serve::rollout::{AgentOutcome, RolloutPlan, Updater};

/// A response: a `run`'s, serialized straight from its result (the hot path of a busy
/// platform), or any other as a JSON value.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(super) enum Response {
    Run(Box<RunResponse>),
    Other(Value),
}

impl From<Value> for Response {
    fn from(value: Value) -> Response {
        Response::Other(value)
    }
}

/// A successful `run`'s response.
#[derive(serde::Serialize)]
pub(super) struct RunResponse {
    ok: bool,
    task_id: String,
    result: RunResult,
    round_trip_us: f64,
    stored: bool,
}

/// Answers one request; a streaming `run` writes its event lines to `write` first.
pub(super) async fn respond(
    hub: &Arc<Hub>,
    request: ControlRequest,
    write: &mut OwnedWriteHalf,
) -> Response {
    let response = match request {
        ControlRequest::Agents {} => json!({"ok": true, "agents": hub.agents()}),
        ControlRequest::Token {} => match hub.issue_token() {
            Ok(token) => json!({"ok": true, "token": token}),
            Err(e) => failure(format!("{e:#}")),
        },
        ControlRequest::Run(run) => {
            return match run_order(*run) {
                Ok(order) => run_task(hub, order, write).await,
                Err(why) => failure(why).into(),
            }
        }
        ControlRequest::Task { task_id } => {
            let mut response = json!(hub.task_view(&task_id));
            response["ok"] = json!(true);
            response
        }
        ControlRequest::Result { task_id, wait_ms } => {
            match hub.wait_result(&task_id, wait(wait_ms, 0)).await {
                Ok(stored) => {
                    let mut response = json!(stored);
                    response["ok"] = json!(true);
                    response
                }
                Err(e) => failure(e),
            }
        }
        ControlRequest::Cancel {
            agent,
            task_id,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            match hub.cancel(&agent, task_id.clone(), wait).await {
                Ok(outcome) => json!({"ok": true, "task_id": task_id, "outcome": outcome}),
                Err(e) => failure(e),
            }
        }
        ControlRequest::InstallHandler(install) => {
            let install = *install;
            let module = match decode_b64("module", install.module.as_deref()) {
                Ok(m) => m,
                Err(why) => return failure(why).into(),
            };
            if let Err(why) = decode_b64("signature", install.signature.as_deref()) {
                return failure(why).into();
            }
            let wait = wait(install.wait_ms, DEFAULT_REQUEST_WAIT_MS);
            let installed = hub
                .install_handler(
                    &install.agent,
                    install.name,
                    module,
                    install.file_sha256,
                    install.signature,
                    wait,
                )
                .await;
            handlers_response(installed)
        }
        ControlRequest::RemoveHandler {
            agent,
            name,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            handlers_response(hub.remove_handler(&agent, name, wait).await)
        }
        ControlRequest::Handlers { agent, wait_ms } => {
            let wait = wait(wait_ms, DEFAULT_REQUEST_WAIT_MS);
            handlers_response(hub.handlers(&agent, wait).await)
        }
        ControlRequest::Update(update) => update_agent(hub, *update).await,
        ControlRequest::Rollout(rollout) => start_rollout(hub, *rollout).await,
        ControlRequest::AuditClear { agent } => match hub.clear_audit_flag(&agent) {
            Ok(cleared) => json!({"ok": true, "agent": agent, "cleared": cleared}),
            Err(e) => failure(format!("{e:#}")),
        },
        ControlRequest::RolloutStatus { wait_ms } => {
            let status = hub.rollout.status(wait(wait_ms, 0)).await;
            json!({"ok": true, "rollout": status})
        }
        ControlRequest::Send {
            agent,
            text,
            wait_ms,
        } => {
            let wait = wait(wait_ms, DEFAULT_SEND_WAIT_MS);
            match hub.send_raw(&agent, text, wait).await {
                Ok(reply) => json!({"ok": true, "reply": reply}),
                Err(e) => failure(e),
            }
        }
    };
    Response::Other(response)
}

fn handlers_response(handlers: Result<Vec<bridge_protocol::HandlerInfo>, HubError>) -> Value {
    match handlers {
        Ok(handlers) => json!({"ok": true, "handlers": handlers}),
        Err(e) => failure(e),
    }
}

/// The event line of one chunk.
fn chunk_line(chunk: &ChunkEvent) -> Value {
    json!({
        "event": "chunk",
        "task_id": chunk.task_id,
        "seq": chunk.seq,
        "stream": chunk.stream,
        "data": chunk.data,
        "dropped_bytes": chunk.dropped_bytes,
    })
}

/// Runs a task; with `order.stream`, writes each chunk as an event line while waiting (at most
/// [`CHUNK_QUEUE`] wait; more are dropped, see the module documentation).
async fn run_task(hub: &Hub, order: RunOrder, write: &mut OwnedWriteHalf) -> Response {
    let (tx, mut rx) = mpsc::channel(CHUNK_QUEUE);
    let chunks = order.stream.then_some(tx);
    let run = hub.run(order, chunks);
    tokio::pin!(run);
    // Once the client is gone, stop writing events but still wait for the result (it is
    // stored either way).
    let mut writable = true;
    let outcome = loop {
        tokio::select! {
            biased;
            Some(chunk) = rx.recv() => {
                if writable && write_line(write, &chunk_line(&chunk)).await.is_err() {
                    writable = false;
                }
            }
            outcome = &mut run => break outcome,
        }
    };
    // Chunks are forwarded before the result that ends the run: drain what is left.
    while let Ok(chunk) = rx.try_recv() {
        if writable && write_line(write, &chunk_line(&chunk)).await.is_err() {
            writable = false;
        }
    }
    match outcome {
        Ok(outcome) => Response::Run(Box::new(RunResponse {
            ok: true,
            task_id: outcome.task_id,
            result: outcome.result,
            round_trip_us: outcome.round_trip.as_secs_f64() * 1e6,
            stored: outcome.stored,
        })),
        Err(e) => failure(e).into(),
    }
}

/// Reads a release (manifest and binary, checked against each other) off the runtime's
/// threads, sharing the copy in memory if the release is already there; `paths` are the
/// request's, or what is wrong with them.
async fn load_release(
    hub: &Hub,
    paths: Result<(PathBuf, PathBuf), String>,
) -> Result<Arc<Release>, String> {
    let (manifest, binary) = paths?;
    let loaded = tokio::task::spawn_blocking(move || Release::load(&manifest, &binary))
        .await
        .map_err(|e| format!("reading the release failed: {e}"))?;
    loaded
        .map(|release| hub.share_release(release))
        .map_err(|e| format!("refused: {e:#}"))
}

/// `update`: the release read and checked, then sent, then the verdict.
async fn update_agent(hub: &Hub, update: UpdateCommand) -> Value {
    let release = match load_release(hub, update.paths()).await {
        Ok(release) => release,
        Err(why) => return failure(why),
    };
    let order = UpdateOrder {
        agent: update.agent,
        release,
        allow_downgrade: update.allow_downgrade,
        drain_timeout_ms: update.drain_timeout_ms,
        wait: wait(update.wait_ms, DEFAULT_UPDATE_WAIT_MS),
    };
    match hub.update(order).await {
        Ok(outcome) => json!({"ok": true, "update": outcome}),
        Err(e) => failure(e),
    }
}

/// `rollout`: the release read and checked, the targets chosen, the rollout started.
async fn start_rollout(hub: &Arc<Hub>, rollout: RolloutCommand) -> Value {
    let plan = match RolloutPlan::new(rollout.canary, rollout.batch_percent, rollout.max_failures) {
        Ok(plan) => plan,
        Err(why) => return failure(format!("bad request: {why}")),
    };
    let release = match load_release(hub, rollout.paths()).await {
        Ok(release) => release,
        Err(why) => return failure(why),
    };
    let version = release.version().to_string();
    let targets: Vec<String> = hub
        .live_agents()
        .into_iter()
        .filter(|a| !same_version(&a.agent_version, &version))
        .map(|a| a.id)
        .collect();
    let updater: Updater = {
        let hub = hub.clone();
        let wait = wait(rollout.agent_wait_ms, DEFAULT_UPDATE_WAIT_MS);
        let (allow_downgrade, drain_timeout_ms) =
            (rollout.allow_downgrade, rollout.drain_timeout_ms);
        Arc::new(move |agent: String| {
            let order = UpdateOrder {
                agent,
                release: release.clone(),
                allow_downgrade,
                drain_timeout_ms,
                wait,
            };
            let hub = hub.clone();
            Box::pin(async move { agent_outcome(hub.update(order).await) })
                as Pin<Box<dyn Future<Output = AgentOutcome> + Send>>
        })
    };
    match hub.rollout.start(plan, &version, targets, updater) {
        Ok(status) => json!({"ok": true, "rollout": status}),
        Err(why) => failure(format!("refused: {why}")),
    }
}

/// Whether an agent reporting `agent_version` already runs `version`.
fn same_version(agent_version: &str, version: &str) -> bool {
    match bridge_signing::release::compare_versions(agent_version, version) {
        Ok(order) => order.is_eq(),
        Err(_) => agent_version == version,
    }
}

/// An update's ending as a rollout counts it.
fn agent_outcome(update: Result<crate::serve::hub::UpdateOutcome, HubError>) -> AgentOutcome {
    let update = match update {
        Ok(update) => update,
        Err(e) => {
            return AgentOutcome::Failed {
                reason: "not_sent".into(),
                detail: e.to_string(),
            }
        }
    };
    let reason = match update.state {
        Ending::Succeeded => return AgentOutcome::Succeeded,
        Ending::Timeout => "timeout".to_string(),
        Ending::Refused | Ending::Failed => match update.reason {
            Some(reason) => json!(reason).as_str().unwrap_or_default().to_string(),
            None => json!(update.state).as_str().unwrap_or_default().to_string(),
        },
    };
    AgentOutcome::Failed {
        reason,
        detail: update.detail.unwrap_or_default(),
    }
}

/// The response of a request that failed.
pub(super) fn failure(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}
