//! The order of messages about one task id (or one handler name): each takes a [`Turn`] as it
//! arrives and the next waits for it, though each is handled in a task of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::lock;

/// Per task id, the `run` or `cancel` still taking effect. The next message for the same id
/// waits for it: messages on one connection take effect in the order they were sent, although
/// each is handled in a task of its own (a `run`'s acceptance waits for a journal commit, and a
/// `cancel` sent right behind it must find the task it names).
#[derive(Default)]
pub(super) struct Turns {
    next: u64,
    /// The last turn taken for each task id, until it is over.
    last: HashMap<String, (u64, CancellationToken)>,
}

/// One message's turn for a task id: [`Turn::wait`] waits for the previous one to be over; the
/// turn is over when dropped.
pub(super) struct Turn {
    turns: Arc<Mutex<Turns>>,
    task_id: String,
    seq: u64,
    over: CancellationToken,
    previous: Option<CancellationToken>,
}

impl Turns {
    /// The turn being taken for `key` now, if any: what a message that depends on it (but does
    /// not change it) waits for.
    pub(super) fn pending(&self, key: &str) -> Option<CancellationToken> {
        self.last
            .get(key)
            .map(|(_, token)| token.clone())
            .filter(|t| !t.is_cancelled())
    }

    /// Every turn being taken now for a handler name.
    pub(super) fn pending_handlers(&self) -> Vec<CancellationToken> {
        self.last
            .iter()
            .filter(|(key, (_, t))| key.starts_with(HANDLER_TURN) && !t.is_cancelled())
            .map(|(_, (_, t))| t.clone())
            .collect()
    }
}

/// The turns of `install_handler` and `remove_handler` are keyed by the handler name after this
/// prefix (a task id has no control characters, so the two never meet). A `run` naming the
/// command waits for the change in progress: an install followed by a run of it in one write
/// runs the new handler.
const HANDLER_TURN: &str = "\u{0}handler\u{0}";

pub(super) fn handler_turn(name: &str) -> String {
    format!("{HANDLER_TURN}{name}")
}

impl Turn {
    /// Takes the next turn for `task_id`.
    pub(super) fn take(turns: &Arc<Mutex<Turns>>, task_id: &str) -> Turn {
        let over = CancellationToken::new();
        let mut t = lock(turns);
        t.next += 1;
        let seq = t.next;
        let previous = t
            .last
            .insert(task_id.to_string(), (seq, over.clone()))
            .map(|(_, token)| token);
        Turn {
            turns: turns.clone(),
            task_id: task_id.to_string(),
            seq,
            over,
            previous,
        }
    }

    /// Whether an earlier message for the same task id is still taking effect.
    pub(super) fn must_wait(&self) -> bool {
        self.previous.as_ref().is_some_and(|p| !p.is_cancelled())
    }

    /// Waits until the previous message for this task id has taken effect.
    pub(super) async fn wait(&self) {
        if let Some(previous) = &self.previous {
            previous.cancelled().await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.over.cancel();
        let mut t = lock(&self.turns);
        if t.last
            .get(&self.task_id)
            .is_some_and(|(seq, _)| *seq == self.seq)
        {
            t.last.remove(&self.task_id);
        }
    }
}
