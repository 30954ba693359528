//! `EarlyResult`: the result of a task that finished while its acceptance was still being
//! written, handed to the writer so that both go in one commit.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::audit::Facts;
use crate::outcome::RunResult;

use super::lock;

/// The result of a task that runs while its acceptance is being written (see
/// [`Journal::accept_running_with`]): offered by the run if it ends first, looked at once by
/// the writer when it records the acceptance.
///
/// [`Journal::accept_running_with`]: super::Journal::accept_running_with
#[derive(Clone, Default)]
pub struct EarlyResult(Arc<Mutex<Early>>);

#[derive(Default)]
pub(super) struct Early {
    pub(super) result: Option<RunResult>,
    /// The writer recorded the acceptance: an offer now comes too late.
    pub(super) looked: bool,
    /// The writer wrote `result` with the acceptance.
    pub(super) written: bool,
    /// What the task runs, for its audit record (`None`: what the request tells).
    pub(super) facts: Option<Facts>,
}

impl EarlyResult {
    /// A slot whose result, if written with the acceptance, is audited with `facts`.
    pub fn audited(facts: Facts) -> EarlyResult {
        let early = EarlyResult::default();
        lock(&early.0).facts = Some(facts);
        early
    }

    /// Offers the finished run's result, to be written with the acceptance. Gives it back
    /// (`Some`) if the writer already recorded the acceptance without it: it is then stored
    /// as usual.
    pub fn offer(&self, result: RunResult) -> Option<RunResult> {
        let mut slot = lock(&self.0);
        if slot.looked {
            return Some(result);
        }
        slot.result = Some(result);
        None
    }

    /// Once the acceptance is committed ([`Accept::New`]): the offered result, if any, and
    /// whether it was written with the acceptance.
    ///
    /// [`Accept::New`]: super::Accept::New
    pub fn take(&self) -> Option<(RunResult, bool)> {
        let mut slot = lock(&self.0);
        let written = slot.written;
        slot.result.take().map(|r| (r, written))
    }

    /// The writer's side: the slot, held locked while the writer records the acceptance (an
    /// offer waits, then finds `looked` set).
    pub(super) fn slot(&self) -> MutexGuard<'_, Early> {
        lock(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::testkit::*;
    use crate::journal::{Accept, TaskPhase};

    #[tokio::test]
    async fn a_result_offered_before_the_acceptance_is_written_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let before = j.commits();
        let early = EarlyResult::default();
        assert!(early.offer(result("early")).is_none(), "offered in time");
        let accepted = j.accept_running_with(&request("t"), early.clone()).await;
        assert_eq!(accepted.unwrap(), Accept::New);
        // One commit for the acceptance and the result, and the result handed back to send.
        assert_eq!(j.commits(), before + 1);
        assert_eq!(early.take(), Some((result("early"), true)));
        let record = j.get_blocking("t").unwrap();
        assert_eq!(record.phase, TaskPhase::Done);
        assert_eq!(record.result, Some(result("early")));
        assert!(record.finished_at_ms.is_some());
        // In the outbox until the platform acknowledges it, and durable: it survives a reopen
        // as a finished task (not one to report interrupted).
        assert_eq!(ids(&j.unacked()), ["t"]);
        drop(j);
        let (j, recovery) = open(&cfg);
        assert_eq!(j.get_blocking("t").unwrap().result, Some(result("early")));
        assert!(recovery.running.is_empty(), "{:?}", recovery.running.len());
        assert_eq!(ids(&j.unacked()), ["t"]);
        // A second delivery of the task is answered from the record, and nothing is written.
        let again = EarlyResult::default();
        assert!(again.offer(result("second run")).is_none());
        match j.accept_running_with(&request("t"), again.clone()).await {
            Ok(Accept::Seen(r)) => assert_eq!(r.result, Some(result("early"))),
            other => panic!("expected Seen, got {other:?}"),
        }
        assert_eq!(again.take(), Some((result("second run"), false)));
    }

    #[tokio::test]
    async fn a_result_offered_after_the_acceptance_is_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let early = EarlyResult::default();
        let accepted = j.accept_running_with(&request("t"), early.clone()).await;
        assert_eq!(accepted.unwrap(), Accept::New);
        assert_eq!(j.get_blocking("t").unwrap().phase, TaskPhase::Running);
        // Too late to ride the acceptance: given back, to be stored with `finish`.
        assert_eq!(early.offer(result("late")), Some(result("late")));
        assert_eq!(early.take(), None);
        j.finish_lazily("t", &result("late")).await.unwrap();
        assert_eq!(j.get_blocking("t").unwrap().result, Some(result("late")));
    }
}
