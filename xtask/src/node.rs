//! The Node SDK's suite (`sdk/node`): `npm test` against the real binaries, after the Rust
//! suite built them. Node 20 or newer is required; the packages come from the lockfile.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// The oldest Node.js major version the SDK supports.
const NODE_MAJOR: u32 = 20;

/// The SDK's directory.
pub fn sdk_dir(root: &Path) -> PathBuf {
    root.join("sdk/node")
}

/// Fails with what to install when `node` is missing or older than [`NODE_MAJOR`].
pub fn check_node() -> Result<()> {
    let out = Command::new("node").arg("--version").output().with_context(|| {
        format!("running `node --version`: the Node SDK's tests need Node.js {NODE_MAJOR} or newer on PATH (https://nodejs.org, or NodeSource's packages for Debian)")
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= NODE_MAJOR => Ok(()),
        Some(_) => bail!(
            "node {} is too old: the Node SDK needs Node.js {NODE_MAJOR} or newer (Debian's own package is older; use NodeSource's or nodejs.org's)",
            text.trim()
        ),
        None => bail!("`node --version` printed {:?}", text.trim()),
    }
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// `npm ci` when the SDK's packages are missing or older than its lockfile.
pub fn install(root: &Path) -> Result<()> {
    npm_ci(&sdk_dir(root))
}

/// `npm ci` in `dir` when its packages are missing or older than its lockfile.
fn npm_ci(dir: &Path) -> Result<()> {
    let installed = dir.join("node_modules/.package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (
        modified(&installed),
        modified(&dir.join("package-lock.json")),
    ) {
        (Some(i), Some(l)) => i >= l,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    let mut ci = Command::new("npm");
    ci.args(["ci", "--no-audit", "--no-fund"]).current_dir(dir);
    run(ci)
}

/// Runs `npm test` in the SDK with the binaries of `target/debug` and the built handlers.
pub fn test(root: &Path, wasm_dir: &Path) -> Result<()> {
    check_node()?;
    install(root)?;
    let bins = target_dir(root).join("debug");
    for name in ["bridge-daemon", "bridgectl"] {
        if !bins.join(name).exists() {
            bail!(
                "{} is missing: the Rust suite builds it (`cargo test --workspace`)",
                bins.join(name).display()
            );
        }
    }
    let mut npm = Command::new("npm");
    npm.arg("test")
        .current_dir(sdk_dir(root))
        .env("BRIDGE_DAEMON", bins.join("bridge-daemon"))
        .env("BRIDGECTL", bins.join("bridgectl"))
        .env("BRIDGE_WASM_DIR", wasm_dir);
    run(npm)
}

/// Builds the SDK (`npm run build`).
pub fn build(root: &Path) -> Result<()> {
    check_node()?;
    install(root)?;
    let mut npm = Command::new("npm");
    npm.args(["run", "--silent", "build"])
        .current_dir(sdk_dir(root));
    run(npm)
}

/// The platform benchmark (`sdk/node/bench/platform.mjs`): the Node SDK against
/// `bridgectl serve`, with the release binaries. This process's CPU set is split: the agents
/// on the first CPU, the platforms and the benchmark on the second (when there are two).
pub fn bench(root: &Path, wasm_dir: &Path) -> Result<()> {
    build(root)?;
    let bins = target_dir(root).join("release");
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let mut cmd = if two_cpus && Command::new("taskset").arg("-V").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "node"]);
        c
    } else {
        Command::new("node")
    };
    cmd.arg("bench/platform.mjs")
        .current_dir(sdk_dir(root))
        .env("BRIDGE_DAEMON", bins.join("bridge-daemon"))
        .env("BRIDGECTL", bins.join("bridgectl"))
        .env("BRIDGE_WASM_DIR", wasm_dir);
    run(cmd)
}

/// The Node quick start (`examples/node-platform/demo.mjs`): the example platform, a real
/// agent (`target/debug`), a handler signed in JavaScript, run through the web API.
pub fn demo(root: &Path, wasm_dir: &Path) -> Result<()> {
    build(root)?;
    let example = root.join("examples/node-platform");
    npm_ci(&example)?;
    let mut node = Command::new("node");
    node.arg("demo.mjs")
        .current_dir(&example)
        .env(
            "BRIDGE_DAEMON",
            target_dir(root).join("debug/bridge-daemon"),
        )
        .env("BRIDGE_WASM_DIR", wasm_dir);
    run(node)
}
