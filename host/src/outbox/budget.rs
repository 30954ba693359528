//! The byte budget of results waiting in memory for the platform: a [`Charge`] holds a queued
//! result's bytes until it is sent or dropped, so a platform that stops reading costs bounded memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most bytes of results that wait in memory for the platform.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// Bytes of a queued message, given back when it is dropped.
#[derive(Debug)]
pub struct Charge(#[allow(dead_code)] OwnedSemaphorePermit);

/// The byte budget of queued results.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::new(MAX_QUEUED_BYTES)
    }
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Budget {
        Budget {
            bytes: Arc::new(Semaphore::new(bytes)),
            total: bytes,
        }
    }

    fn permits(&self, bytes: usize) -> u32 {
        // A message larger than the whole budget takes all of it.
        u32::try_from(bytes.clamp(1, self.total.max(1))).unwrap_or(u32::MAX)
    }

    /// A charge for `bytes` if they fit now.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.permits(bytes))
            .ok()
            .map(Charge)
    }

    /// A charge for `bytes`, waiting until they fit.
    pub async fn charge(&self, bytes: usize) -> Option<Charge> {
        self.bytes
            .clone()
            .acquire_many_owned(self.permits(bytes))
            .await
            .ok()
            .map(Charge)
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_given_back() {
        let budget = Budget::new(MAX_QUEUED_BYTES);
        let a = budget.try_charge(MAX_QUEUED_BYTES / 2).unwrap();
        let b = budget.try_charge(MAX_QUEUED_BYTES / 2).unwrap();
        assert!(budget.try_charge(1).is_none());
        drop(a);
        assert_eq!(budget.available(), MAX_QUEUED_BYTES / 2);
        drop(b);
        // Larger than the budget: takes all of it, never blocks for ever.
        let all = budget.try_charge(usize::MAX).unwrap();
        assert_eq!(budget.available(), 0);
        drop(all);
    }
}
