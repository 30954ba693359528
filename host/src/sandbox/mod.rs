//! The WASM sandbox: runs one handler (a WASI preview-1 command module) under fuel, memory, time
//! and output limits.
//!
//! The wiring follows wasmtime's own examples: one [`Engine`] and one [`Linker`] for the agent's
//! life, one compiled [`Module`] + [`InstancePre`] per distinct module (cached by SHA-256, in
//! memory and on disk), and one fresh [`Store`] per run that owns everything of that run: its
//! WASI context, its captured output, its limiter and its fuel.
//!
//! How each limit is enforced:
//! - **fuel**: `Config::consume_fuel`; running out is the trap `OutOfFuel` → `fuel_exhausted`.
//! - **memory / tables**: a per-store [`limiter::RunLimiter`]; growth past the limit traps with
//!   [`limiter::LimitExceeded`] → `memory_limit`. The pooling allocator's slot size is the agent's
//!   local maximum, so no request can exceed it.
//! - **wall clock**: one ticker thread bumps the engine's epoch every [`EPOCH_TICK`] while any
//!   run is in progress, and for 100 ms after the last one (an idle agent has no such
//!   wake-ups); each store
//!   yields to tokio at every tick (with tokio's own `yield_now`, so the scheduler polls its
//!   timers in between), so a runaway handler never holds a worker thread, and the run
//!   is a future raced against a tokio timer. When the timer wins the future is dropped, which
//!   tears down the guest's fiber → `timeout`. Handlers blocked in a host call (sleeping) are
//!   covered by the same timer.
//! - **stack**: `Config::max_wasm_stack` → `stack_overflow`. The shadow stack that compilers
//!   keep in linear memory is the module's own; when it is placed first in memory its overflow
//!   faults just under 4 GiB, and [`stack::ShadowStack`] recognises that fault → `stack_overflow`.
//! - **output**: [`output::CappedPipe`] keeps the first and last `output_bytes / 2` of each
//!   stream, counts all of it, and streams it to a [`StreamTap`] when the task asked.
//!
//! Guarantees: a module is compiled only from bytes that passed size and magic checks; a module
//! whose imports the agent does not provide, or that exports no `_start`, is `invalid_module`
//! before anything of it runs; the guest sees no filesystem but the directories granted to it,
//! no environment but the variables granted, and no sockets.

pub mod cache;
pub mod limiter;
pub mod output;
pub mod stack;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lru::LruCache;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::limits::{Bounds, LimitPolicy, LimitRequest, Limits};
use crate::outcome::{RunResult, Status, Truncation};
use crate::stream::StreamTap;
use bridge_protocol::StreamName;
use cache::{DiskCache, Lookup};
use limiter::{LimitExceeded, RunLimiter};
use output::CappedPipe;
use stack::{MemoryFault, ShadowStack};
use tokio_util::sync::CancellationToken;

/// How often the epoch ticker runs: the granularity of timeouts and of yielding to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How much of a slot's linear memory a reset may restore in place rather than give back.
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;

/// How much of a slot's tables a reset may restore in place rather than give back.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// The only import module a handler may use.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// The sandbox's settings (the agent config's `[sandbox]` section, resolved).
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Defaults and local maximums for per-run limits.
    pub limits: LimitPolicy,
    /// Runs executing at once; further runs wait for a slot.
    pub max_concurrent_runs: u32,
    /// Modules larger than this are refused before they are hashed or compiled.
    pub max_module_bytes: u64,
    /// Compiled modules kept in memory (LRU).
    pub memory_cache_entries: usize,
    /// Where precompiled artifacts are kept, and their key; `None` disables the disk cache.
    pub cache_dir: Option<cache::CacheDir>,
    /// Elements a table may hold.
    pub table_elements: u32,
    /// Bytes of native stack wasm may use before `stack_overflow`.
    pub max_wasm_stack: usize,
    /// Fuel metering on (the product) or off (only for measuring its cost in benchmarks).
    pub fuel_metering: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            limits: LimitPolicy::default(),
            max_concurrent_runs: 32,
            max_module_bytes: 32 << 20,
            memory_cache_entries: 64,
            cache_dir: None,
            table_elements: 20_000,
            max_wasm_stack: 512 << 10,
            fuel_metering: true,
        }
    }
}

/// A directory the guest may see, at `guest` path, backed by `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest sees it (e.g. `/data`).
    pub guest: String,
    /// Whether the guest may create, change and remove files in it (read-only by default).
    pub writable: bool,
}

/// Everything one run needs besides the module.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// The bytes the guest reads on stdin (the task's JSON input).
    pub input: Vec<u8>,
    /// argv, including argv\[0\] (the command name).
    pub args: Vec<String>,
    /// Environment variables the guest sees; nothing else of the agent's environment.
    pub env: Vec<(String, String)>,
    /// Directories the guest sees; nothing else of the filesystem.
    pub dirs: Vec<DirGrant>,
    /// What the task asks for.
    pub limits: LimitRequest,
    /// An upper bound from the handler's signed capabilities, if any.
    pub ceiling: Option<LimitRequest>,
    /// What the handler's signed claims refused of the task's grants (`env:NAME`, `dir:/path`,
    /// `dir:/path:write`), reported after the limits in the result's `limits.clamped`.
    pub denied: Vec<String>,
    /// Cancelling it stops the run (`cancelled`) at the next epoch tick.
    pub cancel: Option<CancellationToken>,
    /// Streams stdout and stderr while the run goes on.
    pub tap: Option<StreamTap>,
}

/// A compiled handler, ready to instantiate cheaply.
pub struct Handler {
    sha256: [u8; 32],
    pre: InstancePre<RunState>,
    /// The module's shadow stack in linear memory, if it has one (to recognise its overflow).
    shadow_stack: Option<ShadowStack>,
    /// Where the compiled code came from (for logs and benchmarks).
    pub source: CodeSource,
}

impl Handler {
    /// SHA-256 of the module bytes.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// SHA-256 of the module bytes, hex-encoded.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Where a [`Handler`]'s compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    /// Already in the in-memory cache.
    Memory,
    /// Loaded from a verified disk cache entry.
    Disk,
    /// Compiled now (after a miss, or after a disk entry was discarded).
    Compiled,
}

/// Per-run state owned by the [`Store`].
pub struct RunState {
    wasi: WasiP1Ctx,
    limiter: RunLimiter,
}

/// The sandbox: engine, linker, caches and the epoch ticker. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<RunState>,
    provided: HashSet<(String, String)>,
    modules: Mutex<LruCache<[u8; 32], Arc<Handler>>>,
    /// Held while a module is loaded from disk or compiled: one compile at a time (a compile
    /// already uses a core), and a second request for the same module waits and finds it done.
    loading: Mutex<()>,
    disk: Option<DiskCache>,
    slots: Semaphore,
    config: SandboxConfig,
    ticker: EpochTicker,
}

/// One thread for the whole agent that advances the engine's epoch while runs are in
/// progress, and sleeps (no wake-ups at all) once none has been for [`TICKER_GRACE`]; stops
/// when dropped. Staying awake for the grace period spares a stream of short runs a thread
/// wake-up each (a futex round trip and often an inter-processor interrupt per run).
struct EpochTicker {
    shared: Arc<TickerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the ticker keeps ticking after the last run ended before it sleeps.
const TICKER_GRACE: Duration = Duration::from_millis(100);

struct TickerState {
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
struct Ticking<'a>(&'a TickerState);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.counts().active -= 1;
    }
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<EpochTicker> {
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
    fn active(&self) -> Ticking<'_> {
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
        .cranelift_opt_level(OptLevel::Speed)
        // Handlers are small and compile off the async threads already; compiling on one thread
        // spares the agent a rayon pool whose malloc arenas keep megabytes resident afterwards.
        .parallel_compilation(false);
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
fn compile(engine: &Engine, config: &SandboxConfig, bytes: &[u8]) -> wasmtime::Result<Module> {
    let compiler = Engine::new(&compiler_config(config))?;
    let artifact = compiler.precompile_module(bytes)?;
    drop(compiler);
    // SAFETY: `artifact` was produced a moment ago, in this process, by `precompile_module` of
    // an engine with the run engine's compilation settings; it never left memory. That is the
    // precondition `deserialize` documents (and it checks the settings match).
    unsafe { Module::deserialize(engine, &artifact) }
}

impl Sandbox {
    /// Creates the engine, the WASI linker, the caches and the epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Sandbox> {
        config.limits.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            config.max_concurrent_runs > 0,
            "max_concurrent_runs must be at least 1"
        );
        let engine = Engine::new(&engine_config(&config))
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut linker: Linker<RunState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut RunState| &mut s.wasi)
            .map_err(anyhow::Error::from)
            .context("adding WASI preview 1 to the linker")?;
        // Remember what the linker provides, so a module's missing import can be named before
        // anything is instantiated.
        let provided = {
            let mut store = Store::new(
                &engine,
                RunState {
                    wasi: WasiCtxBuilder::new().build_p1(),
                    limiter: RunLimiter::new(0, 0),
                },
            );
            linker
                .iter(&mut store)
                .map(|(module, name, _)| (module.to_string(), name.to_string()))
                .collect()
        };
        let disk = config
            .cache_dir
            .as_ref()
            .and_then(|dir| DiskCache::open_or_warn(dir, &engine));
        let entries =
            NonZeroUsize::new(config.memory_cache_entries.max(1)).expect("max(1) is non-zero");
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Sandbox {
            inner: Arc::new(Inner {
                slots: Semaphore::new(config.max_concurrent_runs as usize),
                engine,
                linker,
                provided,
                modules: Mutex::new(LruCache::new(entries)),
                loading: Mutex::new(()),
                disk,
                config,
                ticker,
            }),
        })
    }

    /// The sandbox's settings.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The wasmtime engine (shared by every run).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The disk cache, when one is configured.
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.inner.disk.as_ref()
    }

    /// Drops every compiled module from the in-memory cache (the disk cache is kept).
    pub fn clear_memory_cache(&self) {
        self.lock_modules().clear();
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], Arc<Handler>>> {
        self.inner.modules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compiled handler for a module hash, if it is in the in-memory cache.
    pub fn cached(&self, sha256: &[u8; 32]) -> Option<Arc<Handler>> {
        self.lock_modules().get(sha256).cloned()
    }

    /// Returns the compiled handler for `bytes`: from memory, from the disk cache, or compiled
    /// now. CPU-heavy on a miss (tens of milliseconds); call from a blocking context.
    ///
    /// Errors are `invalid_module` results ready to return to the caller.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Handler>, Box<RunResult>> {
        self.precheck(bytes)?;
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        self.load_hashed(bytes, sha256).map_err(|mut r| {
            r.module_sha256 = Some(hex::encode(sha256));
            r
        })
    }

    /// The cheap checks done before anything else looks at a module's bytes: not empty, not
    /// larger than `max_module_bytes`, the wasm magic and a core-module version.
    pub fn precheck(&self, bytes: &[u8]) -> Result<(), Box<RunResult>> {
        let invalid = |msg: String| Box::new(RunResult::refused(Status::InvalidModule, msg));
        let max = self.inner.config.max_module_bytes;
        if bytes.is_empty() {
            return Err(invalid("the module is empty (0 bytes)".into()));
        }
        if bytes.len() as u64 > max {
            return Err(invalid(format!(
                "the module is {} bytes; the agent accepts modules up to {max} bytes",
                bytes.len()
            )));
        }
        check_header(bytes).map_err(invalid)
    }

    /// [`load`](Self::load) for bytes whose SHA-256 the caller already computed (and verified).
    pub fn load_hashed(
        &self,
        bytes: &[u8],
        sha256: [u8; 32],
    ) -> Result<Arc<Handler>, Box<RunResult>> {
        if let Some(h) = self.lock_modules().get(&sha256) {
            return Ok(h.clone());
        }
        let invalid = |msg: String| Box::new(RunResult::refused(Status::InvalidModule, msg));
        check_header(bytes).map_err(invalid)?;
        let _loading = self.inner.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = self.lock_modules().get(&sha256) {
            return Ok(h.clone()); // loaded by whoever held the lock before us
        }
        let engine = &self.inner.engine;
        let (module, source) = match self.inner.disk.as_ref().map(|d| d.load(engine, &sha256)) {
            Some(Lookup::Hit(m)) => {
                tracing::debug!(sha256 = %hex::encode(sha256), "loaded module from the disk cache");
                (m, CodeSource::Disk)
            }
            _ => {
                let started = Instant::now();
                let module = compile(engine, &self.inner.config, bytes).map_err(|e| {
                    invalid(format!(
                        "the module failed to compile: {}",
                        root_message(&e)
                    ))
                })?;
                tracing::debug!(sha256 = %hex::encode(sha256), ms = started.elapsed().as_secs_f64() * 1e3, "compiled module");
                // Compiling frees a lot of small allocations; hand them back to the OS so an idle
                // agent stays small. SAFETY: malloc_trim only releases free heap memory.
                unsafe { libc::malloc_trim(0) };
                (module, CodeSource::Compiled)
            }
        };
        self.check_interface(&module).map_err(invalid)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| invalid(format!("the module cannot be linked: {e:#}")))?;
        if source == CodeSource::Compiled {
            if let Some(disk) = &self.inner.disk {
                if let Err(e) = disk.store(&sha256, &module) {
                    tracing::warn!(error = %format!("{e:#}"), "could not write the module cache entry");
                }
            }
        }
        let handler = Arc::new(Handler {
            sha256,
            pre,
            shadow_stack: ShadowStack::of(bytes),
            source,
        });
        self.lock_modules().put(sha256, handler.clone());
        Ok(handler)
    }

    /// Refuses modules that import anything the agent does not provide, or export no `_start`.
    fn check_interface(&self, module: &Module) -> Result<(), String> {
        for import in module.imports() {
            let key = (import.module().to_string(), import.name().to_string());
            if !self.inner.provided.contains(&key) {
                let kind = match import.ty() {
                    ExternType::Func(_) => "function",
                    ExternType::Memory(_) => "memory",
                    ExternType::Table(_) => "table",
                    ExternType::Global(_) => "global",
                    _ => "item",
                };
                return Err(format!(
                    "the module imports {kind} `{}::{}`, which the agent does not provide \
                     (handlers may import only {WASI_MODULE} functions)",
                    key.0, key.1
                ));
            }
        }
        match module.get_export("_start") {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => Ok(()),
            Some(_) => Err("the module's `_start` export is not a function of no arguments".into()),
            None => Err("the module exports no `_start`: handlers are WASI command modules".into()),
        }
    }

    /// Runs `handler` once with `spec`. Waits for a free slot when `max_concurrent_runs` are
    /// already running. Fails (`Err`) only when the run could not be set up at all (a granted
    /// directory that cannot be opened); every ending of the guest is an `Ok(RunResult)`.
    pub async fn run(&self, handler: &Handler, spec: RunSpec) -> Result<RunResult> {
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .context("the sandbox is shutting down")?;
        let config = &self.inner.config;
        let mut applied = Bounds::wasm(&config.limits, spec.ceiling.as_ref()).resolve(&spec.limits);
        applied.clamped.extend(spec.denied);
        let limits = applied.limits;
        let cap = usize::try_from(limits.output_bytes).unwrap_or(usize::MAX);
        let stdout = CappedPipe::streamed(cap, spec.tap.clone(), StreamName::Stdout);
        let stderr = CappedPipe::streamed(cap, spec.tap.clone(), StreamName::Stderr);

        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(spec.input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&spec.args)
            .envs(&spec.env);
        for grant in &spec.dirs {
            let perms = if grant.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(&grant.host, &grant.guest, perms)
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!(
                        "granting directory {} as {}",
                        grant.host.display(),
                        grant.guest
                    )
                })?;
        }
        let state = RunState {
            wasi: wasi.build_p1(),
            limiter: RunLimiter::new(limits.memory_bytes, config.table_elements),
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        if config.fuel_metering {
            store.set_fuel(limits.fuel)?;
        }
        store.set_epoch_deadline(1);
        // At every epoch tick the guest yields with tokio's `yield_now`, not wasmtime's default
        // yield. Wasmtime's wakes the task before returning, so the task is runnable again at
        // once; a tokio scheduler whose queue is never empty polls its timer and I/O driver only
        // every `event_interval` (61) task polls, which with a spinning guest means every 61
        // ticks: no heartbeat, timeout or neighbour's timer fires for ~0.5 s on an idle host, over
        // a second on a loaded one. tokio's `yield_now` defers the wake until the scheduler has
        // polled its driver, so timers fire at every tick.
        store.epoch_deadline_callback(|_| {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        let _ticking = self.inner.ticker.active();

        let started = Instant::now();
        let ended = {
            let run = async {
                let instance = handler.pre.instantiate_async(&mut store).await?;
                let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                start.call_async(&mut store, ()).await
            };
            let cancel = spec.cancel.clone().unwrap_or_default();
            tokio::select! {
                r = tokio::time::timeout(Duration::from_millis(limits.timeout_ms), run) => Some(r),
                _ = cancel.cancelled() => None,
            }
        };
        let duration = started.elapsed();

        let fuel_consumed = if config.fuel_metering {
            store
                .get_fuel()
                .ok()
                .map(|left| limits.fuel.saturating_sub(left))
        } else {
            None
        };
        let memory_peak = store.data().limiter.memory_peak as u64;
        let shadow_stack = handler.shadow_stack.map(|stack| ShadowStackAtTrap {
            stack,
            pointer: match &ended {
                Some(Ok(Err(err))) => stack_pointer(err, &mut store),
                _ => None,
            },
        });
        drop(store);

        let (status, exit_code, error) = match ended {
            Some(ended) => classify(ended, &limits, shadow_stack.as_ref()),
            None => (
                Status::Cancelled,
                None,
                Some("cancelled while running; the handler was stopped".to_string()),
            ),
        };
        let (out, err) = (stdout.snapshot(), stderr.snapshot());
        let truncated = Truncation {
            stdout: out.truncated(),
            stderr: err.truncated(),
            stdout_total_bytes: out.total(),
            stderr_total_bytes: err.total(),
        };
        let output = if truncated.stdout {
            serde_json::Value::Null
        } else {
            parse_output(&out.bytes())
        };
        let stderr_text = err.render();
        let error = error.map(|e| explain(status, e, &output, &stderr_text));
        Ok(RunResult {
            status,
            exit_code,
            output,
            stdout: out.render(),
            stderr: stderr_text,
            truncated,
            fuel_consumed,
            memory_peak_bytes: memory_peak,
            duration_ms: duration.as_secs_f64() * 1e3,
            limits: Some(applied),
            error,
            reason: None,
            module_sha256: Some(handler.sha256_hex()),
            evicted: false,
            cgroup: false,
        })
    }
}

/// Cheap checks before handing bytes to Cranelift: the wasm magic and a core-module version.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(
            "not a WebAssembly module (the file does not start with the `\\0asm` magic)".into(),
        );
    }
    match u32::from_le_bytes(bytes[4..8].try_into().expect("8 bytes checked")) {
        1 => Ok(()),
        v if v & 0xffff == 0x0d => Err(
            "this is a WebAssembly component; handlers are core modules (WASI preview 1 commands)"
                .into(),
        ),
        v => Err(format!("unsupported WebAssembly binary version {v:#x}")),
    }
}

/// The innermost message of an error chain (wasmparser's "unexpected end" rather than
/// "failed to parse WebAssembly module").
fn root_message(e: &wasmtime::Error) -> String {
    let all: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    all.join(": ")
}

type Ended = Result<wasmtime::Result<()>, tokio::time::error::Elapsed>;

/// The module's shadow stack and its pointer's value when the run trapped, if it did.
struct ShadowStackAtTrap {
    stack: ShadowStack,
    pointer: Option<u32>,
}

/// The value of the module's stack pointer when `err` was raised, from the store's core dump
/// (see [`stack`]). The dump lists the store's globals: no host globals (the agent defines
/// none), then the instance's own in order, so the first is the module's global 0, which
/// [`ShadowStack::of`] found to be a mutable `i32`.
fn stack_pointer(err: &wasmtime::Error, store: &mut Store<RunState>) -> Option<u32> {
    let dump = err.downcast_ref::<wasmtime::WasmCoreDump>()?;
    let global = dump.globals().first()?;
    global.get(&mut *store).i32().map(|v| v as u32)
}

/// Maps how the guest's future ended to a status, an exit code and a raw error message.
/// `shadow_stack` is the module's, to tell its overflow from other out-of-bounds accesses.
fn classify(
    ended: Ended,
    limits: &Limits,
    shadow_stack: Option<&ShadowStackAtTrap>,
) -> (Status, Option<i32>, Option<String>) {
    let err = match ended {
        Err(_) => {
            return (
                Status::Timeout,
                None,
                Some(format!(
                    "the handler did not finish within {} ms",
                    limits.timeout_ms
                )),
            )
        }
        Ok(Ok(())) => return (Status::Ok, Some(0), None),
        Ok(Err(e)) => e,
    };
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return match exit.0 {
            0 => (Status::Ok, Some(0), None),
            code => (
                Status::Error,
                Some(code),
                Some(format!("the handler exited with code {code}")),
            ),
        };
    }
    if let Some(limit) = err.downcast_ref::<LimitExceeded>() {
        return (Status::MemoryLimit, None, Some(limit.to_string()));
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => (
            Status::FuelExhausted,
            None,
            Some(format!("the handler used all of its {} fuel", limits.fuel)),
        ),
        Some(Trap::StackOverflow) => (
            Status::StackOverflow,
            None,
            Some("the wasm call stack overflowed".into()),
        ),
        Some(Trap::MemoryOutOfBounds) => {
            let fault = MemoryFault::of(&err);
            let overflow = shadow_stack.and_then(|s| s.stack.overflow(s.pointer, fault.as_ref()));
            match overflow {
                Some(why) => (Status::StackOverflow, None, Some(why)),
                None => (
                    Status::Trap,
                    None,
                    Some(Trap::MemoryOutOfBounds.to_string()),
                ),
            }
        }
        Some(trap) => (Status::Trap, None, Some(trap.to_string())),
        None => (Status::Trap, None, Some(describe(&err))),
    }
}

/// An error's chain as `{:#}` shows it, without the core dump (a listing of store handles that
/// says nothing to the result's reader; see [`engine_config`]).
fn describe(err: &wasmtime::Error) -> String {
    let dump = err
        .downcast_ref::<wasmtime::WasmCoreDump>()
        .map(|d| d.to_string());
    let layers: Vec<String> = err
        .chain()
        .map(|c| c.to_string())
        .filter(|c| Some(c) != dump.as_ref())
        .collect();
    layers.join(": ")
}

/// Handler output: stdout parsed as one JSON value, or `null` when it is empty or not JSON.
fn parse_output(stdout: &[u8]) -> serde_json::Value {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(stdout).unwrap_or(serde_json::Value::Null)
}

/// Adds what the handler itself said (its error JSON, or its last stderr line) to an error.
fn explain(status: Status, base: String, output: &serde_json::Value, stderr: &str) -> String {
    if let Some(msg) = output.pointer("/error/message").and_then(|m| m.as_str()) {
        return format!("{base}: {msg}");
    }
    // Rust's panic hook ends with a hint about RUST_BACKTRACE; the message is the line before.
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"));
    match (status, last) {
        (Status::Error | Status::Trap, Some(line)) => {
            format!("{base} (last stderr line: {})", line.trim())
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_name_the_problem() {
        assert!(check_header(b"").unwrap_err().contains("magic"));
        assert!(check_header(b"\x7fELF\x02\x01\x01\x00")
            .unwrap_err()
            .contains("magic"));
        assert!(check_header(b"\0asm\x0d\x00\x01\x00")
            .unwrap_err()
            .contains("component"));
        assert!(check_header(b"\0asm\x01\x00\x00\x00").is_ok());
    }

    #[test]
    fn output_is_json_or_null() {
        assert_eq!(parse_output(b" {\"a\":1}\n"), serde_json::json!({"a": 1}));
        assert_eq!(parse_output(b"not json"), serde_json::Value::Null);
        assert_eq!(parse_output(b"\n"), serde_json::Value::Null);
    }

    #[test]
    fn errors_quote_the_handler() {
        let out = serde_json::json!({"error": {"kind": "failed", "message": "disk on fire"}});
        assert_eq!(
            explain(Status::Error, "exited 1".into(), &out, ""),
            "exited 1: disk on fire"
        );
        assert_eq!(
            explain(
                Status::Trap,
                "trap".into(),
                &serde_json::Value::Null,
                "thread 'main' panicked at src/x.rs:1:1:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
            ),
            "trap (last stderr line: boom)"
        );
    }
}
