//! A staged rollout of a release across the connected agents: a canary group first, then
//! batches, halting at a failure count.
//!
//! The plan ([`RolloutPlan`]): the targets are the connected agents not already reporting the
//! release's version, in agent id order; the first `canary` of them are updated first (all at
//! once), then the rest in batches of `ceil(batch_percent% of the targets)` agents, each batch
//! all at once, a batch starting when every verdict of the previous one is in.
//!
//! Guarantees:
//!
//! * One rollout at a time per server ([`RolloutSlot`]): starting another while one has
//!   updates in flight is refused.
//! * A failure is a `failed` or `refused` update, no verdict within the per-agent wait, or an
//!   update that could not be sent. As soon as `max_failures` agents failed the rollout is
//!   `halted`: no further agent gets the update; updates already sent finish (and are
//!   counted).
//! * The per-agent updater is a function ([`Updater`]), so the planning and halting here are
//!   tested without agents; the server's updater is [`Hub::update`](super::hub::Hub::update).
//! * The status lives in memory: a restarted server has no rollout (each update's record and
//!   verdict is in the state directory, [`super::updates`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_signing::timefmt::format_rfc3339;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::timearg::now_unix;

/// How a rollout proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutPlan {
    /// How many agents are updated first.
    pub canary: usize,
    /// The size of each later batch, in percent of the targets (1 to 100).
    pub batch_percent: u32,
    /// The rollout halts once this many agents failed (at least 1).
    pub max_failures: usize,
}

impl RolloutPlan {
    /// A plan; `Err` says which value is out of range.
    pub fn new(
        canary: usize,
        batch_percent: u32,
        max_failures: usize,
    ) -> Result<RolloutPlan, String> {
        if !(1..=100).contains(&batch_percent) {
            return Err(format!(
                "the batch size is 1 to 100 percent of the targets, not {batch_percent}"
            ));
        }
        if max_failures == 0 {
            return Err("the failure count that halts the rollout is at least 1".into());
        }
        Ok(RolloutPlan {
            canary,
            batch_percent,
            max_failures,
        })
    }

    /// The batch size: `ceil(batch_percent% of targets)`, at least 1.
    pub fn batch_size(&self, targets: usize) -> usize {
        (targets * self.batch_percent as usize).div_ceil(100).max(1)
    }

    /// The groups updated one after the other: the canary group (if any), then the batches.
    pub fn batches(&self, targets: &[String]) -> Vec<Vec<String>> {
        let canary = self.canary.min(targets.len());
        let mut batches = Vec::new();
        if canary > 0 {
            batches.push(targets[..canary].to_vec());
        }
        let size = self.batch_size(targets.len());
        batches.extend(targets[canary..].chunks(size).map(<[String]>::to_vec));
        batches
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Agents are being updated.
    Running,
    /// `max_failures` agents failed: no further agent is updated.
    Halted,
    /// Every target was updated (some may have failed, fewer than `max_failures`).
    Completed,
}

/// An agent whose update failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The agent id.
    pub agent: String,
    /// Why: the agent's reason (`exited`, `downgrade`…), `timeout` (no verdict in time), or
    /// `not_sent` (the update could not be sent).
    pub reason: String,
    /// What happened, for people.
    pub detail: String,
}

/// A rollout's progress, as `bridgectl rollout status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutStatus {
    /// running, halted or completed.
    pub state: RolloutState,
    /// The release's version.
    pub version: String,
    /// How many agents were to be updated.
    pub targets: usize,
    /// The agents updated, in the order their verdicts came.
    pub succeeded: Vec<String>,
    /// The agents whose update failed, in that order.
    pub failed: Vec<Failure>,
    /// The agents updating now.
    pub in_flight: Vec<String>,
    /// How many targets have not been sent the update.
    pub untouched: usize,
    /// The plan: canary group size…
    pub canary: usize,
    /// …batch size in percent of the targets…
    pub batch_percent: u32,
    /// …and the failure count that halts.
    pub max_failures: usize,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// When the last update in flight ended, once the rollout is over.
    pub finished_at: Option<String>,
}

impl RolloutStatus {
    /// Whether the rollout is over: halted or completed, no update in flight, and its end
    /// recorded. `run` publishes all three in one change, so a status read while a halted
    /// rollout's last update is being counted is not mistaken for the final one.
    pub fn is_over(&self) -> bool {
        self.finished_at.is_some()
    }
}

/// How one agent's update ended, for the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentOutcome {
    /// Updated and confirmed.
    Succeeded,
    /// Failed (see [`Failure`] for the reasons).
    Failed {
        /// Why.
        reason: String,
        /// What happened.
        detail: String,
    },
}

/// Updates one agent (by id) and says how it ended; the per-agent wait is its business.
pub type Updater =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = AgentOutcome> + Send>> + Send + Sync>;

/// Runs a rollout of `plan` over `targets`, publishing every change on `status` (which starts
/// as `running` with every target untouched).
pub async fn run(
    plan: RolloutPlan,
    targets: Vec<String>,
    updater: Updater,
    status: watch::Sender<RolloutStatus>,
) {
    for batch in plan.batches(&targets) {
        if status.borrow().state == RolloutState::Halted {
            break;
        }
        status.send_modify(|s| {
            s.untouched -= batch.len();
            s.in_flight.extend(batch.iter().cloned());
        });
        let mut updates = JoinSet::new();
        for agent in batch {
            let update = updater(agent.clone());
            updates.spawn(async move { (agent, update.await) });
        }
        while let Some(joined) = updates.join_next().await {
            let (agent, outcome) = match joined {
                Ok(ended) => ended,
                Err(e) => {
                    // Not expected (the updater does not panic); count it, never lose an agent.
                    tracing::error!("a rollout update task failed: {e}");
                    continue;
                }
            };
            status.send_modify(|s| {
                s.in_flight.retain(|a| *a != agent);
                match outcome {
                    AgentOutcome::Succeeded => s.succeeded.push(agent),
                    AgentOutcome::Failed { reason, detail } => s.failed.push(Failure {
                        agent,
                        reason,
                        detail,
                    }),
                }
                if s.state == RolloutState::Running && s.failed.len() >= plan.max_failures {
                    tracing::warn!(failed = s.failed.len(), "rollout halted");
                    s.state = RolloutState::Halted;
                }
            });
        }
    }
    status.send_modify(|s| {
        // A task that failed to join leaves its agent in flight: it is not updating any more.
        s.in_flight.clear();
        if s.state == RolloutState::Running {
            s.state = RolloutState::Completed;
        }
        s.finished_at = Some(format_rfc3339(now_unix()));
    });
    tracing::info!(state = ?status.borrow().state, "rollout over");
}

/// The server's rollout: at most one running.
#[derive(Debug, Default)]
pub struct RolloutSlot {
    current: Mutex<Option<watch::Receiver<RolloutStatus>>>,
}

impl RolloutSlot {
    /// Starts a rollout of `version` over `targets` (spawned on the runtime); `Err` if one is
    /// not over yet. Returns its first status.
    pub fn start(
        &self,
        plan: RolloutPlan,
        version: &str,
        targets: Vec<String>,
        updater: Updater,
    ) -> Result<RolloutStatus, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = current.as_ref().map(|c| c.borrow().clone()) {
            if !running.is_over() {
                return Err(format!(
                    "a rollout of {} is not over yet ({} in flight, {} untouched): one at a time",
                    running.version,
                    running.in_flight.len(),
                    running.untouched
                ));
            }
        }
        let first = RolloutStatus {
            state: RolloutState::Running,
            version: version.to_string(),
            targets: targets.len(),
            succeeded: Vec::new(),
            failed: Vec::new(),
            in_flight: Vec::new(),
            untouched: targets.len(),
            canary: plan.canary,
            batch_percent: plan.batch_percent,
            max_failures: plan.max_failures,
            started_at: format_rfc3339(now_unix()),
            finished_at: None,
        };
        let (tx, rx) = watch::channel(first.clone());
        *current = Some(rx);
        tracing::info!(version, targets = targets.len(), ?plan, "rollout started");
        tokio::spawn(run(plan, targets, updater, tx));
        Ok(first)
    }

    /// The current (or last) rollout's status, waiting up to `wait` for it to be over.
    pub async fn status(&self, wait: Duration) -> Option<RolloutStatus> {
        let mut rx = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let _ = tokio::time::timeout(wait, rx.wait_for(RolloutStatus::is_over)).await;
        let status = rx.borrow().clone();
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn agents(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("agent-{i:02}")).collect()
    }

    #[test]
    fn plans_check_their_values() {
        assert!(RolloutPlan::new(1, 0, 1).is_err());
        assert!(RolloutPlan::new(1, 101, 1).is_err());
        assert!(RolloutPlan::new(1, 50, 0).is_err());
        assert!(RolloutPlan::new(0, 100, 1).is_ok());
    }

    #[test]
    fn the_canary_group_comes_first_then_batches_of_a_share_of_all_targets() {
        let plan = RolloutPlan::new(2, 25, 1).unwrap();
        let targets = agents(10);
        // ceil(25% of 10) = 3.
        assert_eq!(plan.batch_size(10), 3);
        let sizes: Vec<usize> = plan.batches(&targets).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 3, 3, 2]);
        assert_eq!(
            plan.batches(&targets).concat(),
            targets,
            "each target once, in order"
        );
        // No canary group; 1% of 3 is still one agent per batch.
        let plan = RolloutPlan::new(0, 1, 1).unwrap();
        assert_eq!(plan.batches(&agents(3)).len(), 3);
        // A canary group larger than the fleet is the fleet.
        let plan = RolloutPlan::new(5, 100, 1).unwrap();
        assert_eq!(plan.batches(&agents(3)), vec![agents(3)]);
        assert!(plan.batches(&[]).is_empty());
    }

    /// An updater whose agents in `failing` fail; records the order agents were sent the
    /// update and how many were updating at once at most.
    struct Fake {
        failing: Vec<String>,
        sent: Mutex<Vec<String>>,
        running: Mutex<(usize, usize)>,
        delays: HashMap<String, u64>,
    }

    impl Fake {
        fn new(failing: &[&str]) -> Arc<Fake> {
            Arc::new(Fake {
                failing: failing.iter().map(|s| s.to_string()).collect(),
                sent: Mutex::new(Vec::new()),
                running: Mutex::new((0, 0)),
                delays: HashMap::new(),
            })
        }

        fn updater(self: &Arc<Self>) -> Updater {
            let fake = self.clone();
            Arc::new(move |agent: String| {
                let fake = fake.clone();
                Box::pin(async move {
                    fake.sent.lock().unwrap().push(agent.clone());
                    {
                        let mut r = fake.running.lock().unwrap();
                        r.0 += 1;
                        r.1 = r.1.max(r.0);
                    }
                    let delay = fake.delays.get(&agent).copied().unwrap_or(5);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    fake.running.lock().unwrap().0 -= 1;
                    if fake.failing.contains(&agent) {
                        AgentOutcome::Failed {
                            reason: "exited".into(),
                            detail: "exited with status 1 before confirming".into(),
                        }
                    } else {
                        AgentOutcome::Succeeded
                    }
                }) as Pin<Box<dyn Future<Output = AgentOutcome> + Send>>
            })
        }

        /// The agents sent the update, sorted (those of one batch start in any order).
        fn sent(&self) -> Vec<String> {
            let mut sent = self.sent.lock().unwrap().clone();
            sent.sort();
            sent
        }
    }

    async fn rollout(plan: RolloutPlan, targets: Vec<String>, fake: &Arc<Fake>) -> RolloutStatus {
        let slot = RolloutSlot::default();
        let first = slot
            .start(plan, "0.2.0", targets.clone(), fake.updater())
            .unwrap();
        assert_eq!(first.state, RolloutState::Running);
        assert_eq!(first.untouched, targets.len());
        let status = slot.status(Duration::from_secs(10)).await.unwrap();
        assert!(status.is_over(), "{status:?}");
        assert!(status.finished_at.is_some());
        status
    }

    #[test]
    fn a_halted_rollout_is_over_only_once_its_end_is_recorded() {
        // What `run` publishes when the failure that halts it is counted: halted, nothing in
        // flight, but the loop has not ended yet.
        let mut status = RolloutStatus {
            state: RolloutState::Halted,
            version: "0.2.0".into(),
            targets: 2,
            succeeded: Vec::new(),
            failed: Vec::new(),
            in_flight: Vec::new(),
            untouched: 1,
            canary: 1,
            batch_percent: 100,
            max_failures: 1,
            started_at: format_rfc3339(0),
            finished_at: None,
        };
        assert!(!status.is_over());
        status.finished_at = Some(format_rfc3339(1));
        assert!(status.is_over());
    }

    #[tokio::test]
    async fn a_rollout_without_failures_updates_every_target_batch_by_batch() {
        let fake = Fake::new(&[]);
        let plan = RolloutPlan::new(1, 50, 1).unwrap();
        let status = rollout(plan, agents(5), &fake).await;
        assert_eq!(status.state, RolloutState::Completed);
        assert_eq!(status.succeeded.len(), 5);
        assert!(status.failed.is_empty() && status.in_flight.is_empty());
        assert_eq!(status.untouched, 0);
        assert_eq!(fake.sent().len(), 5);
        // Canary 1, then ceil(50% of 5) = 3 at once.
        assert_eq!(fake.running.lock().unwrap().1, 3);
    }

    #[tokio::test]
    async fn a_failing_canary_halts_before_any_other_agent_is_touched() {
        let fake = Fake::new(&["agent-00"]);
        let plan = RolloutPlan::new(1, 50, 1).unwrap();
        let status = rollout(plan, agents(6), &fake).await;
        assert_eq!(status.state, RolloutState::Halted);
        assert_eq!(fake.sent(), ["agent-00"]);
        assert_eq!(
            status.failed,
            [Failure {
                agent: "agent-00".into(),
                reason: "exited".into(),
                detail: "exited with status 1 before confirming".into()
            }]
        );
        assert!(status.succeeded.is_empty());
        assert_eq!(status.untouched, 5);
    }

    #[tokio::test]
    async fn the_rollout_halts_at_the_failure_count_and_lets_updates_in_flight_finish() {
        // Batches: [00, 01] (canary), [02, 03], [04, 05], [06, 07]. The second failure halts
        // it, in the second batch, whose slower agent still finishes (and succeeds).
        let mut fake = Fake::new(&["agent-01", "agent-02"]);
        Arc::get_mut(&mut fake)
            .unwrap()
            .delays
            .insert("agent-03".into(), 100);
        let plan = RolloutPlan::new(2, 25, 2).unwrap();
        let slot = RolloutSlot::default();
        slot.start(plan, "0.2.0", agents(8), fake.updater())
            .unwrap();
        // Halted while agent-03 is still updating.
        let mut rx = slot.current.lock().unwrap().clone().unwrap();
        let halted = rx
            .wait_for(|s| s.state == RolloutState::Halted)
            .await
            .unwrap()
            .clone();
        assert_eq!(halted.in_flight, ["agent-03"]);
        assert!(!halted.is_over());
        let status = slot.status(Duration::from_secs(10)).await.unwrap();
        assert_eq!(status.state, RolloutState::Halted);
        assert_eq!(
            fake.sent(),
            ["agent-00", "agent-01", "agent-02", "agent-03"]
        );
        assert_eq!(status.succeeded, ["agent-00", "agent-03"]);
        let failed: Vec<&str> = status.failed.iter().map(|f| f.agent.as_str()).collect();
        assert_eq!(failed, ["agent-01", "agent-02"]);
        assert_eq!(status.untouched, 4);
        assert!(status.in_flight.is_empty());
    }

    #[tokio::test]
    async fn failures_below_the_count_do_not_halt() {
        let fake = Fake::new(&["agent-01", "agent-03"]);
        let plan = RolloutPlan::new(1, 34, 3).unwrap();
        let status = rollout(plan, agents(5), &fake).await;
        assert_eq!(status.state, RolloutState::Completed);
        assert_eq!(fake.sent().len(), 5);
        assert_eq!(status.failed.len(), 2);
        assert_eq!(status.succeeded.len(), 3);
    }

    #[tokio::test]
    async fn one_rollout_at_a_time() {
        let mut fake = Fake::new(&[]);
        Arc::get_mut(&mut fake)
            .unwrap()
            .delays
            .insert("agent-00".into(), 200);
        let slot = RolloutSlot::default();
        let plan = RolloutPlan::new(1, 100, 1).unwrap();
        slot.start(plan, "0.2.0", agents(2), fake.updater())
            .unwrap();
        let refused = slot
            .start(plan, "0.2.0", agents(2), fake.updater())
            .unwrap_err();
        assert!(refused.contains("one at a time"), "{refused}");
        let over = slot.status(Duration::from_secs(10)).await.unwrap();
        assert_eq!(over.state, RolloutState::Completed);
        // Once it is over, the next one may start.
        slot.start(plan, "0.2.1", Vec::new(), fake.updater())
            .unwrap();
        let empty = slot.status(Duration::from_secs(10)).await.unwrap();
        assert_eq!((empty.state, empty.targets), (RolloutState::Completed, 0));
    }
}
