//! What each control request does: the hub call it makes and the response line it gives (a
//! streaming `run` writes its chunk event lines first).

use bridge_protocol::RunResult;
use serde_json::{json, Value};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::requests::{decode_b64, run_order, wait, ControlRequest};
use super::{write_line, CHUNK_QUEUE, DEFAULT_REQUEST_WAIT_MS, DEFAULT_SEND_WAIT_MS};
use crate::serve::hub::{ChunkEvent, Hub, HubError, RunOrder};

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
    hub: &Hub,
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

/// The response of a request that failed.
pub(super) fn failure(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}
