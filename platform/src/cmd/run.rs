//! `bridgectl run`: run a task (a module or a command) on a connected agent and print its result.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use bridge_protocol::{LimitRequest, RunResult};
use bridge_signing::timefmt::format_rfc3339;
use clap::{ArgGroup, Args};
use serde_json::{json, Value};

use crate::files::read;
use crate::serve::control;
use crate::timearg::parse_time;

/// How much longer than the task's own time limit `run` waits for the result by default.
pub const WAIT_MARGIN_MS: u64 = 30_000;
/// How much longer than the server's wait the client waits for the server's answer.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(10);

/// Run a task on a connected agent through a running `bridgectl serve`, and wait for its result.
///
/// The task is a handler module (--module: the server sends it, and the agent fetches the bytes
/// if it does not have them) or a command (--command: a handler installed on the agent with
/// `bridgectl install-handler`, else one of the agent's allowlisted shell rules, else the task
/// is rejected with reason "unknown_command"). Prints the result as one JSON object, with the
/// same fields as `bridge-daemon call`; with --stream, each chunk of output is first printed as
/// one JSON line {"event":"chunk","task_id","seq","stream","data","dropped_bytes"} as it
/// arrives.
///
/// The wait survives reconnections: if the agent's connection drops, the server sends the task
/// again when the agent is back (the agent runs a task id at most once) and the result still
/// comes here. Running an existing --task-id again prints that task's result again: the server
/// answers from its store without sending anything to the agent, so nothing runs twice (a task
/// id whose result came from another agent is refused: task ids are global).
///
/// Exit status: 0 if the result's status is "ok", 1 for any other status, 2 if there is no
/// result (usage error, server unreachable, agent unknown or not connected, no result within
/// --wait-ms, the agent's error).
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("task").required(true).args(["module", "command"])))]
pub struct RunArgs {
    /// The agent id (see `bridgectl agents`).
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// The handler module to run (a signed wasm module).
    #[arg(long, value_name = "FILE.wasm")]
    pub module: Option<PathBuf>,
    /// The command to run: an installed handler's name or a shell rule's name.
    #[arg(long, value_name = "NAME")]
    pub command: Option<String>,
    /// The task input: JSON text, or @FILE to read it from a file. Default: null.
    #[arg(long, value_name = "JSON|@FILE", allow_hyphen_values = true)]
    pub input: Option<String>,
    /// An argument passed to the handler (argv[1..]) or appended to the shell rule's
    /// arguments; repeatable.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// The task id to use. Default: a fresh UUID.
    #[arg(long, value_name = "ID")]
    pub task_id: Option<String>,
    /// A detached signature file (MODULE.wasm.sig) sent with the module.
    #[arg(long, value_name = "FILE.sig", conflicts_with = "command")]
    pub signature: Option<PathBuf>,
    /// The task's wall-clock limit to ask for, in milliseconds (clamped by the agent).
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// The time after which the task must not start (it is then rejected with reason
    /// "expired"): RFC 3339 (2025-11-25T05:53:20Z, any offset) or unix seconds.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub not_after: Option<u64>,
    /// The task may run again if the agent dies while running it (default: such a task ends
    /// with status "interrupted").
    #[arg(long)]
    pub idempotent: bool,
    /// Print the task's output as it is produced, one JSON line per chunk, before the result.
    #[arg(long)]
    pub stream: bool,
    /// How long to wait for the result, in milliseconds. Default: 60000, or --timeout-ms plus
    /// 30000 if that is larger.
    #[arg(long, value_name = "MS")]
    pub wait_ms: Option<u64>,
    /// Fuel to ask for (clamped by the agent).
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,
    /// Linear memory to ask for, in MiB (clamped by the agent).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// Bytes of stdout and of stderr to keep (clamped by the agent).
    #[arg(long, value_name = "BYTES")]
    pub output_bytes: Option<u64>,
}

impl RunArgs {
    /// How long to wait for the result: --wait-ms, else the larger of the default and the
    /// task's time limit plus [`WAIT_MARGIN_MS`].
    pub fn wait_ms(&self) -> u64 {
        self.wait_ms.unwrap_or_else(|| {
            let task = self
                .timeout_ms
                .map_or(0, |t| t.saturating_add(WAIT_MARGIN_MS));
            task.max(control::DEFAULT_RUN_WAIT_MS)
        })
    }
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

/// Prints the `result` of a control response and maps its status to the exit status: 0 for
/// "ok", 1 for any other status.
pub(crate) fn print_result(response: &Value) -> Result<ExitCode> {
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

/// Runs `run` against the control socket at `socket`.
pub fn run(socket: &Path, args: RunArgs) -> Result<ExitCode> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let wait_ms = args.wait_ms();
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
        timeout_ms: args.timeout_ms,
        output_bytes: args.output_bytes,
    };
    let mut request = json!({
        "cmd": "run",
        "agent": args.agent,
        "input": input,
        "args": args.args,
        "limits": limits,
        "wait_ms": wait_ms,
    });
    match (&args.module, args.command) {
        (Some(module), _) => request["module"] = json!(b64.encode(read(module)?)),
        (None, Some(command)) => request["command"] = json!(command),
        (None, None) => bail!("give --module or --command"),
    }
    if let Some(t) = args.task_id {
        request["task_id"] = json!(t);
    }
    if let Some(s) = signature {
        request["signature"] = json!(s);
    }
    if let Some(t) = args.not_after {
        request["not_after"] = json!(format_rfc3339(t));
    }
    if args.idempotent {
        request["idempotent"] = json!(true);
    }
    if args.stream {
        request["stream"] = json!(true);
    }
    // The server answers by itself after wait_ms; wait a little longer than that.
    let wait = Duration::from_millis(wait_ms).saturating_add(CLIENT_MARGIN);
    let response = control::request_with_events(socket, &request, wait, crate::print_json)?;
    print_result(&response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            run: RunArgs,
        }
        Wrapper::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|w| w.run)
    }

    #[test]
    fn exactly_one_of_module_and_command() {
        let e = parse(&["--agent", "a"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let e = parse(&["--agent", "a", "--module", "m.wasm", "--command", "c"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = parse(&["--agent", "a", "--command", "c", "--signature", "s"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let r = parse(&["--agent", "a", "--command", "disk-usage"]).unwrap();
        assert_eq!(r.command.as_deref(), Some("disk-usage"));
    }

    #[test]
    fn the_wait_follows_the_task_time_limit() {
        let r = parse(&["--agent", "a", "--command", "c"]).unwrap();
        assert_eq!(r.wait_ms(), 60_000);
        let r = parse(&["--agent", "a", "--command", "c", "--timeout-ms", "1000"]).unwrap();
        assert_eq!(r.wait_ms(), 60_000);
        assert_eq!(r.timeout_ms, Some(1000));
        let r = parse(&["--agent", "a", "--command", "c", "--timeout-ms", "600000"]).unwrap();
        assert_eq!(r.wait_ms(), 630_000);
        let r = parse(&[
            "--agent",
            "a",
            "--command",
            "c",
            "--timeout-ms",
            "600000",
            "--wait-ms",
            "5",
        ])
        .unwrap();
        assert_eq!(r.wait_ms(), 5);
    }

    #[test]
    fn not_after_takes_rfc3339_or_unix_seconds() {
        let r = parse(&[
            "--agent",
            "a",
            "--command",
            "c",
            "--not-after",
            "2025-11-25T06:53:20+01:00",
        ])
        .unwrap();
        assert_eq!(
            r.not_after.map(format_rfc3339).as_deref(),
            Some("2025-11-25T05:53:20Z")
        );
        let r = parse(&[
            "--agent",
            "a",
            "--command",
            "c",
            "--not-after",
            "1764050000",
        ])
        .unwrap();
        assert_eq!(r.not_after, Some(1764050000));
        assert!(parse(&["--agent", "a", "--command", "c", "--not-after", "soon"]).is_err());
    }
}
