//! `cargo xtask bench`: every benchmark, then one summary of the headline figures beside their
//! targets, with a verdict, and beside a baseline build's when one is given.
//!
//! ```text
//! cargo xtask bench [--baseline DIR] [--only NAME,NAME…] [-- ARGS for cargo bench]
//! cargo xtask bench --summary
//! ```
//!
//! `--baseline DIR` names a directory holding release binaries of another build
//! (`bridge-daemon`, `bridgectl`; a file `COMMIT` there names it): each benchmark that drives
//! the binaries runs twice in a row, the baseline first, then the current build, so both are
//! measured in the same sitting. The current build is always the release binaries in
//! `target/release`, built first, whatever profile the harnesses are built in (`-- --profile
//! dev` builds them quicker; they only drive the binaries). The figures come from the
//! benchmarks themselves (`bridge_testkit::figures`), through `target/bench/figures.jsonl`.
//! `--summary` prints the summary of the figures already there (benchmarks run one by one,
//! with `BRIDGE_BENCH_BUILD` naming the build each measured) and runs nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bridge_testkit::figures::{BUILD_ENV, FIGURES_ENV};

/// The benchmarks, in the order they run; `true` for those that drive the release binaries
/// (and so can measure a baseline build too).
const BENCHES: [(&str, bool); 8] = [
    ("sandbox", false),
    ("journal", false),
    ("link", true),
    ("throughput", true),
    ("coldstart", true),
    ("metrics", false),
    ("audit", false),
    ("size", true),
];

/// How a figure compares with its target.
#[derive(Clone, Copy)]
enum Bound {
    /// At most.
    AtMost(f64),
    /// Less than.
    Under(f64),
    /// At least.
    AtLeast(f64),
}

impl Bound {
    fn met(self, v: f64) -> bool {
        match self {
            Bound::AtMost(t) => v <= t,
            Bound::Under(t) => v < t,
            Bound::AtLeast(t) => v >= t,
        }
    }

    fn show(self, unit: &str) -> String {
        let (op, t) = match self {
            Bound::AtMost(t) => ("≤", t),
            Bound::Under(t) => ("<", t),
            Bound::AtLeast(t) => ("≥", t),
        };
        format!("{op} {}", value(t, unit))
    }
}

/// The targets: figure key, what it is, its unit, its bound.
const TARGETS: [(&str, &str, &str, Bound); 10] = [
    (
        "size.stripped_bytes",
        "agent binary, stripped",
        "B",
        Bound::AtMost(8e6),
    ),
    (
        "link.round_trip_median_ms",
        "round trip, warm hello, journal on (median)",
        "ms",
        Bound::Under(0.5),
    ),
    (
        "throughput.hello_agent_cpu_us",
        "agent CPU per warm hello task, 128 in flight",
        "us",
        Bound::AtMost(100.0),
    ),
    (
        "throughput.hello_tasks_per_s",
        "hello tasks/s, agent on one CPU, 128 in flight",
        "tasks/s",
        // The CPU target above as a rate: 100 µs per task is 10,000 tasks/s per agent core.
        Bound::AtLeast(10_000.0),
    ),
    (
        "throughput.cpu_ratio",
        "agent CPU per task, shell / hello",
        "x",
        Bound::AtLeast(5.0),
    ),
    (
        "throughput.ratio",
        "tasks/s, hello / shell",
        "x",
        Bound::AtLeast(5.0),
    ),
    (
        "coldstart.agent_median_ms",
        "cold start to first task, the agent's part (median)",
        "ms",
        Bound::Under(50.0),
    ),
    (
        "link.idle_rss_mib",
        "idle memory, connected",
        "MiB",
        Bound::Under(10.0),
    ),
    (
        "link.outage_rss_max_mib",
        "memory across an outage, max",
        "MiB",
        Bound::Under(10.0),
    ),
    (
        "link.outage_rss_spread_mib",
        "memory across an outage, spread",
        "MiB",
        Bound::AtMost(1.0),
    ),
];

/// Where a target this design does not reach has its measured floor: printed under its verdict
/// when it is not met.
const FLOORS: [(&str, &str); 1] = [(
    "size.stripped_bytes",
    "its floor, measured: docs/performance.md, \"The floor, measured\"",
)];

/// A figure in its unit, for people.
fn value(v: f64, unit: &str) -> String {
    match unit {
        "B" => format!("{:.2} MB", v / 1e6),
        "ms" => format!("{v:.3} ms"),
        "us" => format!("{v:.0} µs"),
        "tasks/s" => format!("{v:.0}/s"),
        "x" => format!("{v:.1}×"),
        "MiB" => format!("{v:.2} MiB"),
        other => format!("{v} {other}"),
    }
}

/// The options of `cargo xtask bench`.
struct Options {
    baseline: Option<PathBuf>,
    only: Option<Vec<String>>,
    cargo_args: Vec<String>,
}

fn options(rest: &[String]) -> Result<Options> {
    let mut o = Options {
        baseline: None,
        only: None,
        cargo_args: Vec::new(),
    };
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--baseline" => {
                let dir = PathBuf::from(args.next().context("--baseline needs a directory")?);
                for bin in ["bridge-daemon", "bridgectl"] {
                    if !dir.join(bin).is_file() {
                        bail!("--baseline {}: no {bin} there", dir.display());
                    }
                }
                o.baseline = Some(dir);
            }
            "--only" => {
                let names: Vec<String> = args
                    .next()
                    .context("--only needs benchmark names")?
                    .split(',')
                    .map(str::to_string)
                    .collect();
                for n in &names {
                    if !BENCHES.iter().any(|(b, _)| b == n) {
                        bail!(
                            "--only: no benchmark {n:?} (there are {})",
                            BENCHES.map(|(b, _)| b).join(", ")
                        );
                    }
                }
                o.only = Some(names);
            }
            "--" => o.cargo_args.extend(args.by_ref().cloned()),
            other => bail!("cargo xtask bench: unknown argument {other:?}"),
        }
    }
    Ok(o)
}

/// One recorded figure.
struct Figure {
    build: String,
    key: String,
    value: f64,
    unit: String,
}

fn read_figures(path: &Path) -> Result<Vec<Figure>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("a figure in {}: {line}", path.display()))?;
            let s = |k: &str| v[k].as_str().map(str::to_string);
            Ok(Figure {
                build: s("build").context("a figure without its build")?,
                key: s("key").context("a figure without its key")?,
                value: v["value"].as_f64().context("a figure without its value")?,
                unit: s("unit").unwrap_or_default(),
            })
        })
        .collect()
}

/// Whether the arguments ask for the summary alone.
pub fn summary_only(rest: &[String]) -> Result<bool> {
    match rest {
        [one] if one == "--summary" => Ok(true),
        _ if rest.iter().any(|a| a == "--summary") => {
            bail!("cargo xtask bench --summary takes no other argument")
        }
        _ => Ok(false),
    }
}

/// Prints the summary of the figures recorded so far; the baseline is the build other than
/// `current` that recorded figures, if any.
pub fn summarize(root: &Path) -> Result<()> {
    let figures = read_figures(&root.join("target/bench/figures.jsonl"))?;
    if figures.is_empty() {
        bail!("no figures in target/bench/figures.jsonl: run the benchmarks first");
    }
    let baseline = figures
        .iter()
        .map(|f| f.build.as_str())
        .find(|b| *b != "current");
    summary(&figures, baseline);
    Ok(())
}

/// Runs the benchmarks and prints the summary.
pub fn run(root: &Path, rest: &[String], size: impl Fn(&Path) -> Result<()>) -> Result<()> {
    let o = options(rest)?;
    let figures = root.join("target/bench/figures.jsonl");
    std::fs::create_dir_all(figures.parent().expect("a file in a directory"))?;
    match std::fs::remove_file(&figures) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let baseline_label = o.baseline.as_ref().map(|dir| {
        std::fs::read_to_string(dir.join("COMMIT"))
            .map(|c| format!("baseline {}", c.trim()))
            .unwrap_or_else(|_| "baseline".into())
    });
    let release = root.join("target/release");
    for (name, drives_binaries) in BENCHES {
        if o.only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|n| n == name))
        {
            continue;
        }
        let mut builds: Vec<(String, Option<&Path>)> = Vec::new();
        if drives_binaries {
            if let (Some(dir), Some(label)) = (&o.baseline, &baseline_label) {
                builds.push((label.clone(), Some(dir)));
            }
        }
        builds.push(("current".into(), None));
        for (label, dir) in builds {
            println!("\n==> {name} ({label})");
            if name == "size" {
                std::env::set_var(FIGURES_ENV, &figures);
                std::env::set_var(BUILD_ENV, &label);
                size(&dir.map_or_else(|| release.clone(), Path::to_path_buf))?;
                continue;
            }
            if !root.join(format!("host/benches/{name}.rs")).is_file() {
                println!("(no such benchmark in this tree)");
                break;
            }
            let mut cmd = super::cargo();
            cmd.args(["bench", "-p", "bridge-host", "--bench", name])
                .args(&o.cargo_args)
                .env(FIGURES_ENV, &figures)
                .env(BUILD_ENV, &label);
            // Always named: a harness built in another profile (`-- --profile dev`) would
            // otherwise drive the binaries of its own profile directory (`target/debug`).
            cmd.env(bridge_testkit::bins::BIN_DIR_ENV, dir.unwrap_or(&release));
            super::run(cmd)?;
        }
    }
    summary(&read_figures(&figures)?, baseline_label.as_deref());
    Ok(())
}

/// Prints each target with the figures measured for it, then every other figure.
fn summary(figures: &[Figure], baseline: Option<&str>) {
    // build -> key -> (value, unit); a key recorded twice keeps its last value.
    let mut by: BTreeMap<&str, BTreeMap<&str, (f64, &str)>> = BTreeMap::new();
    for f in figures {
        by.entry(f.build.as_str())
            .or_default()
            .insert(f.key.as_str(), (f.value, f.unit.as_str()));
    }
    let get = |build: &str, key: &str| by.get(build).and_then(|m| m.get(key)).copied();
    println!("\nsummary (medians of this run; the verdict is the current build's)\n");
    let base = baseline.unwrap_or("");
    println!(
        "{:<52} {:>12} {:>14} {:>14}  verdict",
        "figure",
        "target",
        if baseline.is_some() { base } else { "" },
        "current"
    );
    let cell = |v: Option<(f64, &str)>| v.map_or_else(|| "—".to_string(), |(v, u)| value(v, u));
    for (key, what, unit, bound) in TARGETS {
        let current = get("current", key);
        let verdict = match current {
            Some((v, _)) if bound.met(v) => "met",
            Some(_) => "NOT MET",
            None => "not measured",
        };
        println!(
            "{:<52} {:>12} {:>14} {:>14}  {verdict}",
            what,
            bound.show(unit),
            if baseline.is_some() {
                cell(get(base, key))
            } else {
                String::new()
            },
            cell(current),
        );
        if verdict == "NOT MET" {
            if let Some((_, floor)) = FLOORS.iter().find(|(k, _)| *k == key) {
                println!("  {floor}");
            }
        }
    }
    let targeted: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    let mut others: Vec<&str> = by
        .values()
        .flat_map(|m| m.keys().copied())
        .filter(|k| !targeted.contains(k))
        .collect();
    others.sort_unstable();
    others.dedup();
    if !others.is_empty() {
        println!("\nother figures:");
        for key in others {
            println!(
                "{:<52} {:>12} {:>14} {:>14}",
                key,
                "",
                if baseline.is_some() {
                    cell(get(base, key))
                } else {
                    String::new()
                },
                cell(get("current", key)),
            );
        }
    }
}
