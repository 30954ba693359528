//! One `bridge-daemon call` (a module run once, outside any platform), decoded.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::bins;

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
    /// The result's `status`, or `<none>`.
    pub fn status(&self) -> &str {
        self.result["status"].as_str().unwrap_or("<none>")
    }
}

/// Runs `bridge-daemon call MODULE ARGS...` (no disk cache unless ARGS name one).
pub fn call(module: &Path, args: &[&str]) -> Called {
    let mut cmd = bins::daemon();
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
