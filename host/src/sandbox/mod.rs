//! The WASM sandbox: runs one handler (a WASI preview-1 command module) under fuel, memory, time
//! and output limits.
//!
//! The wiring follows wasmtime's own examples: one [`Engine`] and one [`Linker`] for the agent's
//! life, one compiled [`Module`](wasmtime::Module) + [`InstancePre`](wasmtime::InstancePre) per distinct module (cached by SHA-256, in
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
//!
//! The files: [`engine`] (the engine's configuration, compiling, the epoch ticker), [`module`]
//! (checking and compiling a module into a [`CompiledModule`], the in-memory and disk caches),
//! [`run`] (one run in its own store: limits applied, the guest's ending classified), and the
//! per-run helpers [`limiter`], [`output`] and [`stack`].

pub mod cache;
pub mod engine;
pub mod limiter;
pub mod module;
pub mod output;
pub mod run;
pub mod stack;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use lru::LruCache;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use wasmtime::{Engine, Linker, Store};
use wasmtime_wasi::WasiCtxBuilder;

use crate::limits::{LimitPolicy, LimitRequest};
use crate::stream::StreamTap;
use cache::DiskCache;
use engine::EpochTicker;
pub use engine::{engine_config, EPOCH_TICK};
use limiter::RunLimiter;
pub use module::{CodeSource, CompiledModule};
pub use run::RunState;

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

/// The sandbox: engine, linker, caches and the epoch ticker. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<RunState>,
    provided: HashSet<(String, String)>,
    modules: Mutex<LruCache<[u8; 32], Arc<CompiledModule>>>,
    /// Held while a module is loaded from disk or compiled: one compile at a time (a compile
    /// already uses a core), and a second request for the same module waits and finds it done.
    loading: Mutex<()>,
    disk: Option<DiskCache>,
    slots: Semaphore,
    config: SandboxConfig,
    ticker: EpochTicker,
    /// Told of each compiled-module lookup, once set ([`Sandbox::observe`]).
    observer: std::sync::OnceLock<Arc<crate::observe::Observer>>,
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
                observer: std::sync::OnceLock::new(),
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

    /// Tells `observer` of every compiled-module lookup from now on (hit, miss, compile). Only
    /// the first observer set is kept.
    pub fn observe(&self, observer: Arc<crate::observe::Observer>) {
        let _ = self.inner.observer.set(observer);
    }

    /// The disk cache, when one is configured.
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.inner.disk.as_ref()
    }

    /// Drops every compiled module from the in-memory cache (the disk cache is kept).
    pub fn clear_memory_cache(&self) {
        self.lock_modules().clear();
    }
}
