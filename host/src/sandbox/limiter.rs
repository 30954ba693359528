//! The per-run resource limiter: linear memory, tables and instance counts.
//!
//! Growth past the memory limit *traps* (with [`LimitExceeded`] as the error) instead of making
//! `memory.grow` return -1. A handler that cannot get memory cannot do anything useful, and a
//! trap whose cause we know lets the result say `memory_limit` instead of a generic trap.

use wasmtime::ResourceLimiter;

/// The error a run stops with when it asks for more memory or table space than it may have.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} limit exceeded: asked for {desired} bytes, the limit is {limit}")]
pub struct LimitExceeded {
    /// `linear memory` or `table`.
    pub what: &'static str,
    /// What the guest asked for.
    pub desired: u64,
    /// What it may have.
    pub limit: u64,
}

/// Limits one store's memories, tables and instances, and records the memory peak.
#[derive(Debug)]
pub struct RunLimiter {
    memory_limit: usize,
    table_elements: usize,
    memory_used: usize,
    /// The most linear memory the run held at once.
    pub memory_peak: usize,
}

impl RunLimiter {
    /// A limiter allowing `memory_limit` bytes of linear memory in total and `table_elements`
    /// elements per table.
    pub fn new(memory_limit: u64, table_elements: u32) -> Self {
        RunLimiter {
            memory_limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
            table_elements: table_elements as usize,
            memory_used: 0,
            memory_peak: 0,
        }
    }
}

impl ResourceLimiter for RunLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self.memory_used - current.min(self.memory_used) + desired;
        if after > self.memory_limit {
            return Err(LimitExceeded {
                what: "linear memory",
                desired: after as u64,
                limit: self.memory_limit as u64,
            }
            .into());
        }
        self.memory_used = after;
        self.memory_peak = self.memory_peak.max(after);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            return Err(LimitExceeded {
                what: "table",
                desired: desired as u64,
                limit: self.table_elements as u64,
            }
            .into());
        }
        Ok(true)
    }

    // A handler is one core module: one instance, and a handful of memories and tables.
    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_limit_is_an_error_naming_the_limit() {
        let mut l = RunLimiter::new(1 << 20, 100);
        assert!(l.memory_growing(0, 65536, None).unwrap());
        assert!(l.memory_growing(65536, 1 << 20, None).unwrap());
        let err = l
            .memory_growing(1 << 20, (1 << 20) + 65536, None)
            .unwrap_err();
        let e = err.downcast_ref::<LimitExceeded>().unwrap();
        assert_eq!(e.limit, 1 << 20);
        assert_eq!(l.memory_peak, 1 << 20);
        assert!(l.table_growing(0, 100, None).unwrap());
        assert!(l.table_growing(0, 101, None).is_err());
    }
}
