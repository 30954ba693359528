//! `bridgectl run`: run a module on a connected agent and print its result.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use bridge_protocol::{LimitRequest, RunResult};
use clap::Args;
use serde_json::{json, Value};

use crate::files::read;
use crate::serve::control;

/// Run a module on a connected agent through a running `bridgectl serve`, and wait.
///
/// Sends the module to the server, which asks the agent to run it (the agent fetches the bytes
/// if it does not have them) and waits for the result. Prints the result as one JSON object,
/// with the same fields as `bridge-daemon call`. Exit status: 0 if the result's status is
/// "ok", 1 for any other status, 2 if there is no result (usage error, server unreachable,
/// agent unknown or not connected, timeout, connection lost).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The agent id (see `bridgectl agents`).
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The handler module.
    #[arg(long, value_name = "FILE.wasm")]
    pub module: PathBuf,
    /// The task input: JSON text, or @FILE to read it from a file. Default: null.
    #[arg(long, value_name = "JSON|@FILE", allow_hyphen_values = true)]
    pub input: Option<String>,
    /// An argument passed to the handler (argv[1..]); repeatable.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// The task id to use. Default: a fresh UUID.
    #[arg(long, value_name = "ID")]
    pub task_id: Option<String>,
    /// A detached signature file (MODULE.wasm.sig) sent with the module.
    #[arg(long, value_name = "FILE.sig")]
    pub signature: Option<PathBuf>,
    /// How long to wait for the result, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = control::DEFAULT_RUN_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Fuel to ask for (clamped by the agent).
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,
    /// Linear memory to ask for, in MiB (clamped by the agent).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// The handler's wall-clock limit to ask for, in milliseconds (clamped by the agent).
    #[arg(long, value_name = "MS")]
    pub handler_timeout_ms: Option<u64>,
    /// Bytes of stdout and of stderr to keep (clamped by the agent).
    #[arg(long, value_name = "BYTES")]
    pub output_bytes: Option<u64>,
}

fn read_input(input: Option<&str>) -> Result<Value> {
    let Some(text) = input else {
        return Ok(Value::Null);
    };
    let bytes = match text.strip_prefix('@') {
        Some(path) => read(std::path::Path::new(path))?,
        None => text.as_bytes().to_vec(),
    };
    serde_json::from_slice(&bytes).context("--input is not valid JSON")
}

/// Runs `run` against the control interface at `addr`.
pub fn run(addr: &str, args: RunArgs) -> Result<ExitCode> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let module = read(&args.module)?;
    let input = read_input(args.input.as_deref())?;
    let signature = args
        .signature
        .as_deref()
        .map(read)
        .transpose()?
        .map(|s| b64.encode(s));
    let memory_bytes = args
        .memory_mib
        .map(|m| {
            m.checked_mul(1 << 20)
                .ok_or_else(|| anyhow!("--memory-mib {m} is too large"))
        })
        .transpose()?;
    let limits = LimitRequest {
        fuel: args.fuel,
        memory_bytes,
        timeout_ms: args.handler_timeout_ms,
        output_bytes: args.output_bytes,
    };
    let mut request = json!({
        "cmd": "run",
        "agent": args.agent,
        "module": b64.encode(&module),
        "input": input,
        "args": args.args,
        "limits": limits,
        "timeout_ms": args.timeout_ms,
    });
    if let Some(t) = args.task_id {
        request["task_id"] = json!(t);
    }
    if let Some(s) = signature {
        request["signature"] = json!(s);
    }
    // The server answers by itself at timeout_ms; wait a little longer than that.
    let wait = Duration::from_millis(args.timeout_ms.saturating_add(10_000));
    let response = control::request(addr, &request, wait)?;
    let Ok(result) = serde_json::from_value::<RunResult>(response["result"].clone()) else {
        bail!("the server's response holds no valid result: {response}");
    };
    crate::print_json(&result);
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
