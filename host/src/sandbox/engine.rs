//! The wasmtime engine the sandbox runs on: its configuration (fuel, epochs, stack bound,
//! pooling allocator), compiling on a short-lived engine, and the epoch ticker behind timeouts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig,
};

use super::SandboxConfig;

/// How often the epoch ticker runs: the granularity of timeouts and of yielding to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How much of a slot's linear memory a reset may restore in place rather than give back.
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;

/// How much of a slot's tables a reset may restore in place rather than give back.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// One thread for the whole agent that advances the engine's epoch while runs are in
/// progress, and sleeps (no wake-ups at all) once none has been for [`TICKER_GRACE`]; stops
/// when dropped. Staying awake for the grace period spares a stream of short runs a thread
/// wake-up each (a futex round trip and often an inter-processor interrupt per run).
pub(super) struct EpochTicker {
    shared: Arc<TickerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the ticker keeps ticking after the last run ended before it sleeps.
const TICKER_GRACE: Duration = Duration::from_millis(100);

pub(super) struct TickerState {
    counts: Mutex<TickerCounts>,
    wake: std::sync::Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct TickerCounts {
    /// Runs in progress.
    active: usize,
    /// The ticker waits on `wake` (a run starting must notify it).
    sleeping: bool,
}

impl TickerState {
    fn counts(&self) -> std::sync::MutexGuard<'_, TickerCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a run as active for the ticker while it lives.
pub(super) struct Ticking<'a>(&'a TickerState);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.counts().active -= 1;
    }
}

impl EpochTicker {
    pub(super) fn start(engine: Engine) -> Result<EpochTicker> {
        let shared = Arc::new(TickerState {
            counts: Mutex::new(TickerCounts::default()),
            wake: std::sync::Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let state = shared.clone();
        let grace_ticks = (TICKER_GRACE.as_millis() / EPOCH_TICK.as_millis()).max(1);
        let thread = std::thread::Builder::new()
            .name("bridge-epoch".into())
            .spawn(move || {
                let mut idle_ticks = 0;
                loop {
                    {
                        let mut counts = state.counts();
                        if counts.active == 0 {
                            idle_ticks += 1;
                        } else {
                            idle_ticks = 0;
                        }
                        if idle_ticks >= grace_ticks {
                            counts.sleeping = true;
                            while counts.active == 0 && !state.stop.load(Ordering::Relaxed) {
                                counts = state.wake.wait(counts).unwrap_or_else(|e| e.into_inner());
                            }
                            counts.sleeping = false;
                            idle_ticks = 0;
                        }
                    }
                    if state.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(EpochTicker {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks a run active until the guard drops; wakes the ticker if it sleeps.
    pub(super) fn active(&self) -> Ticking<'_> {
        let mut counts = self.shared.counts();
        counts.active += 1;
        if counts.sleeping {
            self.shared.wake.notify_one();
        }
        Ticking(&self.shared)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        {
            // Under the lock, so the ticker cannot miss it between its check and its wait.
            let _counts = self.shared.counts();
            self.shared.stop.store(true, Ordering::Relaxed);
            self.shared.wake.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds the engine configuration for `config`: fuel, epochs, stack bound, pooling allocator.
pub fn engine_config(config: &SandboxConfig) -> Config {
    let mut c = Config::new();
    c.consume_fuel(config.fuel_metering)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        // A trap carries a core dump of the store (handles, no copies): it holds the module's
        // globals, whose stack pointer tells a shadow-stack overflow from other faults.
        .coredump_on_trap(true)
        // The fiber a run executes on also hosts WASI calls; give them room beyond wasm's share.
        .async_stack_size(config.max_wasm_stack + (1 << 20))
        // Handlers are small and compile off the async threads already, on one thread: wasmtime
        // is built without `parallel-compilation`, which spares the binary rayon and the agent a
        // thread pool whose malloc arenas keep megabytes resident afterwards.
        .cranelift_opt_level(OptLevel::Speed);
    let slots = config.max_concurrent_runs.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots * 4)
        .total_stacks(slots)
        .max_memories_per_module(1)
        .max_tables_per_module(4)
        .table_elements(config.table_elements as usize)
        .max_memory_size(
            usize::try_from(config.limits.maximums.memory_bytes).unwrap_or(usize::MAX),
        );
    // Between runs a slot is reset to its initial state. By default that is an `madvise` of
    // the whole memory and table: the next run page-faults everything in again, and every
    // reset interrupts the agent's other threads to flush their TLBs. Where the kernel can
    // say which pages a run dirtied (PAGEMAP_SCAN, Linux 6.7+), only those are restored, in
    // place, up to these amounts per slot (what a run dirties beyond them is still given back
    // with `madvise`). Without it the option would mean rewriting those amounts in full on
    // every reset, which costs more than it saves for small handlers, so it stays off.
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE);
    }
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

/// The configuration of the short-lived engine that compiles a module: the run engine's
/// settings (so its artifacts load into the run engine), without the instance pool, which it
/// never uses.
fn compiler_config(config: &SandboxConfig) -> Config {
    let mut c = engine_config(config);
    c.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    c
}

/// Compiles `bytes` into a module of `engine`.
///
/// Cranelift keeps its compilation contexts (register allocator and IR buffers, over a
/// megabyte after a 100 KB module) cached in the engine that compiled, for good. So the
/// compile happens on an engine made for it and dropped afterwards, and the run engine loads
/// the artifact: an idle agent does not carry the memory of its last compile.
pub(super) fn compile(
    engine: &Engine,
    config: &SandboxConfig,
    bytes: &[u8],
) -> wasmtime::Result<Module> {
    let compiler = Engine::new(&compiler_config(config))?;
    let artifact = compiler.precompile_module(bytes)?;
    drop(compiler);
    // SAFETY: `artifact` was produced a moment ago, in this process, by `precompile_module` of
    // an engine with the run engine's compilation settings; it never left memory. That is the
    // precondition `deserialize` documents (and it checks the settings match).
    unsafe { Module::deserialize(engine, &artifact) }
}
