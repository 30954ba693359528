//! How busy the agent is: the count of tasks in progress, which only an [`InProgress`] place
//! changes (taken at admission, given back when dropped), and memory given back while idle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// How long the agent stays idle before it gives memory back ([`crate::memory::trim`]).
const TRIM_AFTER: Duration = Duration::from_secs(2);

/// While idle, how often the agent gives memory back again (heartbeats, status reports and
/// reconnect attempts touch a little code each time).
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Tasks in progress and when the last one ended.
pub(super) struct Activity {
    in_progress: AtomicUsize,
    /// The most places [`Activity::admit`] hands out.
    limit: usize,
    /// When the last task ended (none yet: `None`); a trim waits until it is [`TRIM_AFTER`] ago.
    last_task: Mutex<Option<Instant>>,
}

/// One task's place among the tasks in progress; dropping it is the task's end.
pub(super) struct InProgress(Arc<Activity>);

impl Activity {
    pub(super) fn new(limit: usize) -> Arc<Activity> {
        Arc::new(Activity {
            in_progress: AtomicUsize::new(0),
            limit,
            last_task: Mutex::new(None),
        })
    }

    /// The most tasks in progress at once (`max_concurrent_tasks + queue_capacity`).
    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    /// A place for a new task; `None` when [`Activity::limit`] are in progress (`busy`).
    pub(super) fn admit(self: &Arc<Self>) -> Option<InProgress> {
        self.enter(true)
    }

    /// A place for a task the journal had accepted before the agent stopped: never refused.
    pub(super) fn resume(self: &Arc<Self>) -> InProgress {
        self.enter(false)
            .expect("an unbounded place is always given")
    }

    /// The one place the count goes up ([`InProgress`]'s `drop` is the one place it goes down).
    fn enter(self: &Arc<Self>, bounded: bool) -> Option<InProgress> {
        if self.in_progress.fetch_add(1, Ordering::SeqCst) >= self.limit && bounded {
            self.in_progress.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InProgress(self.clone()))
    }

    /// Gives memory back shortly after start (once connecting is done) and then every
    /// [`TRIM_EVERY`] while no task runs: what heartbeats, status reports and reconnect
    /// attempts touch is released again, so an idle agent's memory stays flat. Runs until the
    /// runtime stops.
    pub(super) fn keep_trimmed(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            loop {
                this.trim_if_idle("idle").await;
                tokio::time::sleep(TRIM_EVERY).await;
            }
        });
    }

    /// Gives memory back now, if idle.
    pub(super) fn trim_soon(self: &Arc<Self>, why: &'static str) {
        let this = self.clone();
        tokio::spawn(async move { this.trim_if_idle(why).await });
    }

    /// The last task ended: once the agent has stayed idle for [`TRIM_AFTER`], give memory
    /// back, so an idle agent holds what it uses, not what its busiest moment needed.
    fn went_idle(self: &Arc<Self>) {
        *lock(&self.last_task) = Some(Instant::now());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            // A task that ended meanwhile makes this a no-op; its own timer trims later.
            this.trim_if_idle("idle after tasks").await;
        });
    }

    /// Trims memory unless a task is in progress or ended less than [`TRIM_AFTER`] ago (its
    /// code will likely be needed again soon).
    async fn trim_if_idle(&self, why: &'static str) {
        let recent = lock(&self.last_task).is_some_and(|t| t.elapsed() < TRIM_AFTER);
        if recent || self.in_progress.load(Ordering::SeqCst) != 0 {
            return;
        }
        let before = crate::memory::resident_kib();
        let Ok(trimmed) = tokio::task::spawn_blocking(crate::memory::trim).await else {
            return;
        };
        tracing::debug!(
            why,
            before_kib = before,
            after_kib = crate::memory::resident_kib(),
            code_kib = trimmed.kib,
            mappings = trimmed.mappings,
            "memory trimmed"
        );
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if self.0.in_progress.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.went_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_given_back_when_dropped() {
        let activity = Activity::new(2);
        let a = activity.admit().unwrap();
        let b = activity.admit().unwrap();
        assert!(activity.admit().is_none());
        // A task the journal had accepted is never refused.
        let resumed = activity.resume();
        drop((a, b, resumed));
        assert_eq!(activity.in_progress.load(Ordering::SeqCst), 0);
        assert!(
            lock(&activity.last_task).is_some(),
            "idle once the last ended"
        );
        assert!(activity.admit().is_some());
    }
}
