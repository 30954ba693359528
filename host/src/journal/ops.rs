//! What a task's writes do inside the batch's transaction: its acceptance (with room made for
//! it, and its early result), its start, its finish, its acknowledgement.

use std::sync::Arc;

use bridge_protocol::RunRequest;

use crate::outcome::RunResult;

use super::early::EarlyResult;
use super::error::{Fail, JournalError};
use super::index::Change;
use super::records::{Accept, TaskPhase, TaskRecord};
use super::schema::{encode, encode_result, stored_size, Summary, ENTRY_BYTES};
use super::space::make_room;
use super::tables::Tables;
use super::JournalConfig;
use crate::audit::Facts;

/// Records a new task under sequence number `seq` (the writer's next one, taken only if this
/// returns [`Accept::New`]), with its result if `early` holds one that fits; a task id already
/// recorded is [`Accept::Seen`]. `space` is the writer's verdict on free space for this batch.
#[allow(clippy::too_many_arguments)]
pub(super) fn accept_in(
    t: &mut Tables<'_>,
    request: &RunRequest,
    running: bool,
    early: Option<&EarlyResult>,
    seq: u64,
    now: u64,
    space: &Result<(), String>,
    config: &JournalConfig,
    changes: &mut Vec<Change>,
) -> Result<Accept, Fail> {
    let id = request.task_id.as_str();
    // Authoritative: sees this batch's writes too.
    if let Some((record, _)) = t.load(id)? {
        return Ok(Accept::Seen(record));
    }
    if let Err(why) = space {
        return Err(Fail::Alone(JournalError::StorageFull(why.clone())));
    }
    let record = TaskRecord {
        request: request.clone(),
        phase: if running {
            TaskPhase::Running
        } else {
            TaskPhase::Queued
        },
        result: None,
        acked: false,
        accepted_at_ms: now,
        finished_at_ms: None,
    };
    let mut summary = Summary::of(seq, &record);
    let encoded = encode("task", id, &record).map_err(Fail::Alone)?;
    let need = stored_size(encoded.len()) + id.len() as u64 + ENTRY_BYTES;
    // New work is taken up to 7/8 of the limit: the rest is for the results of the tasks
    // already accepted (one that still does not fit is kept without its output).
    let max_bytes = super::log::db_limit(config.max_bytes);
    let max_bytes = max_bytes - max_bytes / 8;
    if !make_room(t, max_bytes, need, changes)? {
        return Err(Fail::Alone(JournalError::StorageFull(format!(
            "the journal {} holds {} bytes, most of them results the platform has not \
             acknowledged yet; new tasks are taken up to {max_bytes} bytes (7/8 of its limit)",
            config.path.display(),
            t.bytes_held()
        ))));
    }
    match early.map(EarlyResult::slot) {
        Some(mut slot) => {
            // Looked at once: a result offered later goes the usual way (`finish`).
            slot.looked = true;
            let result = match &slot.result {
                Some(result) => Some(encode_result(id, now, result).map_err(Fail::Alone)?),
                None => None,
            };
            // Written with the acceptance only if it fits; otherwise it goes the usual way.
            let fits = match &result {
                Some(f) => make_room(t, max_bytes, need + stored_size(f.len()), changes)?,
                None => false,
            };
            t.store(id, &encoded, &mut summary)?;
            if let (Some(f), true) = (result, fits) {
                summary.phase = TaskPhase::Done;
                summary.finished_at_ms = Some(now);
                t.store_result(id, &f, &mut summary)?;
                slot.written = true;
                let facts = slot
                    .facts
                    .take()
                    .unwrap_or_else(|| Facts::of_request(request));
                if let Some(result) = &slot.result {
                    t.audit(id, &facts, result, now)?;
                }
            }
        }
        None => t.store(id, &encoded, &mut summary)?,
    }
    let id: Arc<str> = Arc::from(id);
    t.fresh.insert(id.clone(), summary.seq);
    changes.push(Change::Set(id, summary));
    Ok(Accept::New)
}

/// Marks a recorded task running (entry alone); one already running or done stays as it is.
pub(super) fn start_in(
    t: &mut Tables<'_>,
    id: &str,
    changes: &mut Vec<Change>,
) -> Result<(), Fail> {
    let Some(mut summary) = t.entry(id)? else {
        return Err(Fail::Alone(JournalError::Io(format!(
            "cannot start task {id:?}: it is not recorded"
        ))));
    };
    if summary.phase != TaskPhase::Queued {
        // Running already (a recovered task run again), or Done: nothing to change.
        return Ok(());
    }
    summary.phase = TaskPhase::Running;
    t.store_entry(id, &summary)?;
    changes.push(Change::Set(Arc::from(id), summary));
    Ok(())
}

/// Stores a task's result (the first one wins), without its output if no room can be made,
/// and its audit record (with `facts`, or what its request tells).
pub(super) fn finish_in(
    t: &mut Tables<'_>,
    id: &str,
    result: RunResult,
    facts: Option<&Facts>,
    now: u64,
    max_bytes: u64,
    changes: &mut Vec<Change>,
) -> Result<(), Fail> {
    let Some(summary) = t.entry(id)? else {
        return Err(Fail::Alone(JournalError::Io(format!(
            "cannot store the result of task {id:?}: it is not recorded"
        ))));
    };
    if summary.phase == TaskPhase::Done {
        // The first result wins.
        return Ok(());
    }
    let mut summary = Summary {
        phase: TaskPhase::Done,
        acked: false,
        finished_at_ms: Some(now),
        ..summary
    };
    let mut f = encode_result(id, now, &result).map_err(Fail::Alone)?;
    if !make_room(t, max_bytes, stored_size(f.len()), changes)? {
        // The result must be kept (it is owed to the platform), its output need not: the
        // status, exit code and error fit whatever happens.
        tracing::warn!(task_id = %id, bytes = f.len(), "the journal has no room for this result's output; keeping the result without it");
        f = encode_result(id, now, &result.without_output()).map_err(Fail::Alone)?;
        summary.evicted = true;
    }
    t.store_result(id, &f, &mut summary)?;
    let request_facts;
    let facts = match facts {
        Some(facts) => facts,
        None => {
            request_facts = match t.load(id)? {
                Some((record, _)) => Facts::of_request(&record.request),
                None => Facts::default(),
            };
            &request_facts
        }
    };
    t.audit(id, facts, &result, now)?;
    changes.push(Change::Set(Arc::from(id), summary));
    Ok(())
}

/// The audit record of a refusal the journal does not record otherwise (busy, updating, storage
/// full…). Dropped, with a warning, when the journal is past its byte limit already: refusals
/// must not fill it when the audit files cannot take its records.
pub(super) fn audit_in(
    t: &mut Tables<'_>,
    id: &str,
    facts: &Facts,
    result: &RunResult,
    now: u64,
    max_bytes: u64,
) -> Result<(), Fail> {
    if t.bytes_held() >= max_bytes {
        tracing::warn!(task_id = %id, "the journal is full (the audit files are not being written?): this refusal is not audited");
        return Ok(());
    }
    t.audit(id, facts, result, now)
}

/// Marks finished tasks acknowledged (entry alone); unknown ones and those not in the outbox
/// are skipped.
pub(super) fn ack_in(
    t: &mut Tables<'_>,
    ids: &[String],
    changes: &mut Vec<Change>,
) -> Result<(), Fail> {
    for id in ids {
        let Some(mut summary) = t.entry(id)? else {
            continue;
        };
        if !summary.in_outbox() {
            continue;
        }
        summary.acked = true;
        t.store_entry(id, &summary)?;
        changes.push(Change::Set(Arc::from(id.as_str()), summary));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::journal::testkit::*;
    use crate::journal::{Accept, TaskPhase};

    #[tokio::test]
    async fn accept_dedups_and_everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, recovery) = open(&cfg);
        assert!(recovery.queued.is_empty() && recovery.running.is_empty());

        for id in ["queued", "running", "done", "acked"] {
            assert_eq!(j.accept(&request(id)).await.unwrap(), Accept::New);
        }
        // A second accept of the same id: the first record, unchanged, and nothing written.
        let commits = j.commits();
        let mut again = request("queued");
        again.id = "another-message".into();
        again.input = serde_json::json!("different");
        match j.accept(&again).await.unwrap() {
            Accept::Seen(record) => {
                assert_eq!(record.request, request("queued"));
                assert_eq!(record.phase, TaskPhase::Queued);
                assert!(record.result.is_none());
            }
            Accept::New => panic!("a known task id was accepted again"),
        }
        assert_eq!(j.commits(), commits, "a known task id must not write");
        assert_eq!(j.get_blocking("queued").unwrap().request, request("queued"));

        j.start("running").await.unwrap();
        for id in ["done", "acked"] {
            j.start(id).await.unwrap();
            j.finish(id, &result(id)).await.unwrap();
        }
        j.ack(&[
            "acked".to_string(),
            "unknown".to_string(),
            "queued".to_string(),
        ]);
        assert_eq!(j.counts(), (4, 1));
        assert!(j.start("unknown").await.is_err());
        assert!(j.finish("unknown", &result("x")).await.is_err());
        drop(j);

        let (j, recovery) = open(&cfg);
        assert_eq!(ids(&recovery.queued), ["queued"]);
        assert_eq!(ids(&recovery.running), ["running"]);
        assert_eq!(recovery.running[0].phase, TaskPhase::Running);
        let unacked = j.unacked();
        assert_eq!(ids(&unacked), ["done"]);
        assert_eq!(unacked[0].result, Some(result("done")));
        assert!(!unacked[0].acked);
        assert!(unacked[0].finished_at_ms.is_some());
        let acked = j.get_blocking("acked").unwrap();
        assert!(acked.acked);
        assert_eq!(acked.phase, TaskPhase::Done);
        assert_eq!(j.get_blocking("queued").unwrap().phase, TaskPhase::Queued);
        assert!(j.get_blocking("unknown").is_none());
        assert_eq!(j.counts(), (4, 1));
        // Still deduplicated after the restart.
        assert!(matches!(
            j.accept(&request("done")).await.unwrap(),
            Accept::Seen(r) if r.result == Some(result("done"))
        ));
    }

    #[tokio::test]
    async fn an_awaited_read_answers_as_a_blocking_one_after_the_writes_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept(&request("queued")).await.unwrap();
        j.accept(&request("done")).await.unwrap();
        j.finish("done", &result("done")).await.unwrap();
        // Not awaited: the read is queued behind it and sees it.
        j.ack(&["done".to_string()]);
        let done = j.get("done").await.unwrap();
        assert_eq!(done.result, Some(result("done")));
        assert!(done.acked);
        for id in ["queued", "done", "unknown"] {
            assert_eq!(j.get(id).await, j.get_blocking(id), "{id}");
        }
        assert!(j.get("unknown").await.is_none());
        assert_eq!(j.get("queued").await.unwrap().phase, TaskPhase::Queued);
    }

    #[tokio::test]
    async fn the_first_result_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        j.accept(&request("t")).await.unwrap();
        j.start("t").await.unwrap();
        j.finish("t", &result("first")).await.unwrap();
        j.finish("t", &result("second")).await.unwrap();
        // A late start does not move it back either.
        j.start("t").await.unwrap();
        let record = j.get_blocking("t").unwrap();
        assert_eq!(record.result, Some(result("first")));
        assert_eq!(record.phase, TaskPhase::Done);
        drop(j);
        let (j, _) = open(&cfg);
        assert_eq!(j.get_blocking("t").unwrap().result, Some(result("first")));
    }

    #[tokio::test]
    async fn acks_empty_the_outbox_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let ids: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
        for id in &ids {
            j.accept(&request(id)).await.unwrap();
            j.finish(id, &result(id)).await.unwrap();
        }
        let order: Vec<String> = j.unacked().into_iter().map(|r| r.request.task_id).collect();
        assert_eq!(order, ids, "unacked() is in accept order");
        j.ack(&ids);
        assert!(j.unacked().is_empty());
        assert_eq!(j.counts(), (5, 0));
        assert!(j.get_blocking("t0").unwrap().acked);
        // Dropped right away: the pending acknowledgement is written before the writer stops.
        drop(j);
        let (j, _) = open(&cfg);
        assert!(j.unacked().is_empty());
        assert_eq!(j.counts(), (5, 0));
    }
}
