//! Shared helpers for the host's integration tests: real wasm modules, the real binary.
#![allow(dead_code)] // each test file uses a different subset

pub mod platform;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the wasm examples and fixtures once per test binary (cargo makes it a no-op when they
/// are fresh) and returns the directory holding the `.wasm` files. A separate target dir keeps
/// this nested cargo off the lock of the `cargo test` that runs us.
pub fn wasm_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "--quiet", "--profile", "handler", "--target", "wasm32-wasip1", "--target-dir", "target/wasm"])
            .args(["-p", "hello", "-p", "checksum", "-p", "logscan", "-p", "hostile"])
            .status()
            .expect("running cargo to build the wasm fixtures");
        assert!(status.success(), "building the wasm fixtures failed (is the wasm32-wasip1 target installed? `cargo xtask test` installs it)");
        let dir = root().join("target/wasm/wasm32-wasip1/handler");
        let wat = wat::parse_file(root().join("examples/wat-hello/hello.wat")).expect("assembling hello.wat");
        std::fs::write(dir.join("wat-hello.wasm"), wat).unwrap();
        dir
    })
}

/// The path of a built module: an example (`hello`) or a hostile fixture (`spin`).
pub fn wasm(name: &str) -> PathBuf {
    let p = wasm_dir().join(format!("{name}.wasm"));
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// Assembles one of `host/tests/fixtures/wat/*.wat` into `dir` and returns the module path.
pub fn wat_fixture(name: &str, dir: &Path) -> PathBuf {
    let src = root()
        .join("host/tests/fixtures/wat")
        .join(format!("{name}.wat"));
    let bytes =
        wat::parse_file(&src).unwrap_or_else(|e| panic!("assembling {}: {e}", src.display()));
    let out = dir.join(format!("{name}.wasm"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// The real `bridge-daemon` binary.
pub fn daemon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bridge-daemon"))
}

/// What one `bridge-daemon call` did.
pub struct Called {
    /// The result JSON (Null when stdout was not JSON, e.g. on usage errors).
    pub result: Value,
    /// The process's exit code.
    pub code: i32,
    /// stderr, for logs and usage errors.
    pub stderr: String,
}

impl Called {
    pub fn status(&self) -> &str {
        self.result["status"].as_str().unwrap_or("<none>")
    }
}

/// Runs `bridge-daemon call MODULE ARGS...` (no disk cache unless ARGS name one).
pub fn call(module: &Path, args: &[&str]) -> Called {
    let mut cmd = daemon();
    cmd.arg("call").arg(module).args(args);
    if !args.contains(&"--cache-dir") {
        cmd.arg("--no-cache");
    }
    output(cmd.output().expect("running bridge-daemon"))
}

/// Decodes a finished `bridge-daemon call`.
pub fn output(out: Output) -> Called {
    let stdout = String::from_utf8_lossy(&out.stdout);
    Called {
        result: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
