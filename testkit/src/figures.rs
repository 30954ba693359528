//! The figures a benchmark reports, collected for `cargo xtask bench`'s summary.
//!
//! A benchmark prints its own tables; it also hands each headline figure to [`record`], which
//! appends one JSON line to the file named by `BRIDGE_BENCH_FIGURES` (nothing when unset).
//! `cargo xtask bench` sets it, and prints every figure once the benchmarks are done, beside its
//! target and a verdict, and beside the same figure of the baseline build when one is given
//! (`BRIDGE_BENCH_BUILD` names which build the running benchmark drives: see [`build`]).

use std::io::Write;

/// The environment variable naming the file figures are appended to.
pub const FIGURES_ENV: &str = "BRIDGE_BENCH_FIGURES";
/// The environment variable naming the build being measured (`current` when unset).
pub const BUILD_ENV: &str = "BRIDGE_BENCH_BUILD";

/// The build the running benchmark measures: `current`, or the label `cargo xtask bench` gave
/// a baseline (whose binaries `BRIDGE_BENCH_BIN_DIR` points at; see [`crate::bins::bin`]).
pub fn build() -> String {
    std::env::var(BUILD_ENV).unwrap_or_else(|_| "current".into())
}

/// Records one figure: `key` names it (`link.round_trip_median_ms`), `value` in `unit`
/// (`ms`, `us`, `MiB`, `B`, `tasks/s`, `ratio`). Appends a line to `BRIDGE_BENCH_FIGURES` when
/// set; panics when that file cannot be written (a figure silently lost would read as missing).
pub fn record(key: &str, value: f64, unit: &str) {
    let Some(path) = std::env::var_os(FIGURES_ENV) else {
        return;
    };
    let line = serde_json::json!({
        "build": build(),
        "key": key,
        "value": value,
        "unit": unit,
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", std::path::Path::new(&path).display()));
    writeln!(f, "{line}").unwrap_or_else(|e| panic!("writing a figure: {e}"));
}
