//! One run of a compiled module in a fresh store: its limits resolved and applied, WASI wired
//! to the task's input, grants and capped output, and the guest's ending turned into a result.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bridge_protocol::StreamName;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::limiter::{LimitExceeded, RunLimiter};
use super::output::CappedPipe;
use super::stack::{MemoryFault, ShadowStack};
use super::{CompiledModule, RunSpec, Sandbox};
use crate::limits::{Bounds, Limits};
use crate::outcome::{RunResult, Status, Truncation};

/// Per-run state owned by the [`Store`].
pub struct RunState {
    pub(super) wasi: WasiP1Ctx,
    pub(super) limiter: RunLimiter,
}

impl Sandbox {
    /// Runs `module` once with `spec`. Waits for a free slot when `max_concurrent_runs` are
    /// already running. Fails (`Err`) only when the run could not be set up at all (a granted
    /// directory that cannot be opened); every ending of the guest is an `Ok(RunResult)`.
    pub async fn run(&self, module: &CompiledModule, spec: RunSpec) -> Result<RunResult> {
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
                let instance = module.pre.instantiate_async(&mut store).await?;
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
        let shadow_stack = module.shadow_stack.map(|stack| ShadowStackAtTrap {
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
            file_sha256: Some(module.sha256_hex()),
            code_sha256: None,
            evicted: false,
            cgroup: false,
        })
    }
}

type Ended = Result<wasmtime::Result<()>, tokio::time::error::Elapsed>;

/// The module's shadow stack and its pointer's value when the run trapped, if it did.
struct ShadowStackAtTrap {
    stack: ShadowStack,
    pointer: Option<u32>,
}

/// The value of the module's stack pointer when `err` was raised, from the store's core dump
/// (see [`stack`](super::stack)). The dump lists the store's globals: no host globals (the agent defines
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
/// says nothing to the result's reader; see [`engine_config`](super::engine_config)).
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

/// CompiledModule output: stdout parsed as one JSON value, or `null` when it is empty or not JSON.
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
