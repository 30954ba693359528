//! `bridge-daemon`: the bridge agent's command line. Thin glue over the `bridge_host` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use bridge_host::call::{self, CallRequest, UsageError};
use bridge_host::config::{AgentConfig, RunFlags};
use bridge_host::daemon;
use bridge_host::limits::LimitRequest;
use bridge_host::update::{self, layout::Layout};

/// The version this build reports (`--version`, `hello`, `status`, update checks): the
/// `BRIDGE_VERSION_OVERRIDE` build variable when set, else the crate's version. Read here, in
/// the binary crate, so that a build with another version recompiles only this crate.
const VERSION: &str = match option_env!("BRIDGE_VERSION_OVERRIDE") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The bridge agent: runs signed WASI command handlers for a management platform.
#[derive(Parser)]
#[command(name = "bridge-daemon", version = VERSION, about, long_about = None)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one handler module once and print its result as one JSON object.
    ///
    /// The module's signature is verified first (against --trusted-key and the config's
    /// `[trust]` keys); a refused module is a `rejected` result with a `reason`.
    ///
    /// Exit status: 0 when the handler's status is `ok`, 1 for any other status, 2 for a usage
    /// or I/O error (one line on stderr).
    Call(CallArgs),

    /// Run the agent: connect to the platform, enroll on first contact, and run what it pushes.
    ///
    /// Settings come from --config FILE; the flags below override it. Runs until SIGINT or
    /// SIGTERM. Logs go to stderr (info level by default).
    Run(RunFlags),

    /// Print this agent's id (the SHA-256 of its public key) from its state directory.
    Identity(IdentityArgs),

    /// Show what the agent is doing: connected or not, tasks, journal, stores, memory.
    ///
    /// Asks the running daemon over STATE/status.sock (its own user and root only); when
    /// nothing answers there, prints what the state directory tells. Exit status: 0 running,
    /// 3 not running, 1 error (e.g. permission denied).
    Status(StatusArgs),

    /// The service's launcher: installs a staged release, rolls back one that does not confirm.
    ///
    /// The launcher is LAYOUT/bridge-launcher, a copy of this binary an update never replaces
    /// (docs/updates.md). The systemd unit runs `launcher prepare` as root before each start
    /// (ExecStartPre=+) and `launcher run` as the service user.
    #[command(subcommand)]
    Launcher(LauncherCommand),

    /// Roll back to the previous release (as root; once).
    ///
    /// Points LAYOUT/current at the release LAYOUT/previous names, removes the previous link
    /// and clears a pending update. Restart the service afterwards (systemctl restart
    /// bridge-daemon). Exit status 1 when there is no previous release.
    Rollback(RollbackArgs),

    /// The audit log: check its chain, show its last records (read-only).
    #[command(subcommand)]
    Audit(bridge_host::audit::cli::AuditCommand),
}

#[derive(Subcommand)]
enum LauncherCommand {
    /// Root step before each start: finish an interrupted switch, judge a switched version
    /// (confirmed: keep it and prune older releases; not confirmed: roll back), verify and
    /// install a release the agent staged and switch to it.
    ///
    /// Exit status 0 whatever happened to an update (a problem is logged and reported to the
    /// platform through the agent), so the service always starts; 2 for a usage error.
    Prepare(LayoutArgs),

    /// The service's main process: start LAYOUT/current/bridge-daemon run --config FILE [ARGS].
    ///
    /// With nothing pending it becomes the agent (exec). A switched version that has not
    /// confirmed yet is watched: if it cannot start, exits, or does not confirm within
    /// `[update] confirm_timeout_secs`, a verdict is recorded and the launcher exits 1, so the
    /// next `launcher prepare` rolls back.
    Run(LauncherRunArgs),
}

#[derive(Args)]
struct LayoutArgs {
    /// The release layout. Default: the directory of this executable.
    #[arg(long, value_name = "DIR")]
    layout: Option<PathBuf>,

    /// The agent's config file (read for [agent] state_dir and the [update] keys only).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Args)]
struct LauncherRunArgs {
    #[command(flatten)]
    layout: LayoutArgs,

    /// Extra arguments for `bridge-daemon run`, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    extra: Vec<std::ffi::OsString>,
}

#[derive(Args)]
struct RollbackArgs {
    /// The release layout. Default: the layout this executable is installed in.
    #[arg(long, value_name = "DIR")]
    layout: Option<PathBuf>,

    /// The agent's state directory, whose journal is settled first (its write-ahead log
    /// replayed into the redb file, which the previous release reads alone).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    state: Option<PathBuf>,

    /// The agent's config file (for its state directory). Default, without --state:
    /// /etc/bridge/agent.toml, when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The agent's state directory.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    state: Option<PathBuf>,

    /// The agent's config file (its state directory, platform and cache directory). Default,
    /// without --state: /etc/bridge/agent.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct IdentityArgs {
    /// State directory of the agent.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
}

#[derive(Args)]
struct CallArgs {
    /// The handler: a WASI preview-1 command module (.wasm).
    module: PathBuf,

    /// The task input: JSON text, or @FILE to read it from a file. Default: null.
    #[arg(long, value_name = "JSON|@FILE", allow_hyphen_values = true)]
    input: Option<String>,

    /// An argument passed to the handler (argv[1..]); repeatable.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,

    /// The command name the handler sees as `argv[0]`. Default: the module's file stem.
    #[arg(long)]
    name: Option<String>,

    /// Grant an environment variable: NAME=VALUE, or NAME to pass this process's value; repeatable.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,

    /// Grant a directory: HOST:GUEST (read-only), HOST:GUEST:ro or HOST:GUEST:rw; repeatable.
    #[arg(long = "dir", value_name = "HOST:GUEST[:rw]")]
    dirs: Vec<String>,

    /// Fuel to allow (about one unit per wasm instruction). Clamped to the local maximum.
    #[arg(long)]
    fuel: Option<u64>,

    /// Linear memory to allow, in MiB. Clamped to the local maximum.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,

    /// Wall-clock timeout in milliseconds. Clamped to the local maximum.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,

    /// Bytes of stdout and of stderr to keep (the rest is counted). Clamped to the local maximum.
    #[arg(long, value_name = "BYTES")]
    output_bytes: Option<u64>,

    /// Agent config file (TOML): limits, cache directory, trust policy.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Directory for compiled-module artifacts (its key is kept beside it, in DIR.key). Default:
    /// $XDG_CACHE_HOME/bridge-daemon or ~/.cache/bridge-daemon; none when run as root.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,

    /// Do not use the disk cache (compile in memory every time).
    #[arg(long)]
    no_cache: bool,

    /// A publisher key to trust for this call (`ed25519:…`, or @FILE / a path to a .pub file);
    /// repeatable. Added to the keys in --config.
    #[arg(long = "trusted-key", value_name = "PUB|@FILE")]
    trusted_keys: Vec<String>,

    /// A detached signature file (MODULE.wasm.sig) to verify instead of an embedded one.
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,

    /// Development only: run a module that carries no signature (logged as a warning). A
    /// signed module is still verified. Refused with a --config file unless it sets
    /// `[trust] allow_unsigned_override = true`.
    #[arg(long)]
    allow_unsigned: bool,
}

/// The log filter: `RUST_LOG` (`LEVEL` or `TARGET=LEVEL` directives, comma-separated; no span or
/// field filters, which would need a regular-expression engine in the binary), else `default`; a
/// `RUST_LOG` that does not parse is reported on stderr and ignored.
fn log_filter(default: &str) -> tracing_subscriber::filter::Targets {
    let fallback = || default.parse().expect("a level is a valid filter");
    match std::env::var("RUST_LOG") {
        Ok(directives) => directives.parse().unwrap_or_else(|e| {
            eprintln!("RUST_LOG={directives:?} ignored ({e}); logging at {default}");
            fallback()
        }),
        Err(_) => fallback(),
    }
}

fn init_logging(verbose: u8, service: bool) {
    let default = match verbose {
        0 if service => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The builder alone stops at INFO; the filter below decides.
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .finish()
        .with(log_filter(default))
        .init();
}

fn main() -> ExitCode {
    // First of all: this executable is also each shell run's supervisor (a hidden mode that
    // never returns here).
    bridge_host::shell::supervise::dispatch();
    // Before any thread starts: see `bridge_host::memory::limit_arenas`.
    bridge_host::memory::limit_arenas();
    bridge_host::version::set(VERSION);
    let cli = Cli::parse();
    init_logging(
        cli.verbose,
        matches!(cli.command, Command::Run(_) | Command::Launcher(_)),
    );
    // Before any runtime: `launcher run` may become the agent (exec).
    let command = match cli.command {
        Command::Launcher(LauncherCommand::Prepare(args)) => return launcher_prepare(args),
        Command::Launcher(LauncherCommand::Run(args)) => return launcher_run(args),
        Command::Rollback(args) => return rollback(args),
        Command::Audit(command) => {
            let state_of = |file: Option<&std::path::Path>| {
                let default = std::path::Path::new(bridge_host::config::DEFAULT_CONFIG_PATH);
                AgentConfig::load(file.unwrap_or(default))?.state_dir()
            };
            return bridge_host::audit::cli::run(command, &state_of);
        }
        Command::Status(args) => return status(args),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bridge-daemon: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Call(args) => runtime.block_on(run_call(args)),
        // On a worker thread, not the main thread `block_on` parks: the link's session is woken
        // by tasks on the workers for every message, and a wake that crosses to a parked
        // non-worker thread costs a futex round trip each time.
        Command::Run(args) => runtime.block_on(async {
            match tokio::spawn(run_agent(args)).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("bridge-daemon: the agent stopped abnormally: {e}");
                    ExitCode::from(2)
                }
            }
        }),
        Command::Identity(args) => match bridge_host::identity::agent_id(&args.state) {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bridge-daemon: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Launcher(_) | Command::Rollback(_) | Command::Status(_) | Command::Audit(_) => {
            unreachable!("handled above")
        }
    }
}

/// The layout this executable belongs to: its directory (`LAYOUT/bridge-launcher`), or
/// `LAYOUT` for a release binary (`LAYOUT/releases/VERSION/bridge-daemon`).
fn default_layout() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable (pass --layout): {e}"))?;
    let dir = exe
        .parent()
        .ok_or("this executable has no directory (pass --layout)")?;
    match dir.parent() {
        Some(releases)
            if releases.file_name() == Some(std::ffi::OsStr::new(update::RELEASES_DIR)) =>
        {
            Ok(releases.parent().unwrap_or(releases).to_path_buf())
        }
        _ => Ok(dir.to_path_buf()),
    }
}

fn layout_of(arg: Option<PathBuf>) -> Result<Layout, ExitCode> {
    match arg.map(Ok).unwrap_or_else(default_layout) {
        Ok(dir) => Ok(Layout::new(dir)),
        Err(e) => {
            eprintln!("bridge-daemon: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn status(args: StatusArgs) -> ExitCode {
    use bridge_host::status::{client, render, Location};
    let location = match (&args.state, &args.config) {
        (Some(state), _) => Ok(Location::of_state(state)),
        (None, Some(config)) => Location::of_config(config),
        (None, None) => Location::of_config(std::path::Path::new(
            bridge_host::config::DEFAULT_CONFIG_PATH,
        ))
        .map_err(|e| e.context("pass --state DIR or --config FILE")),
    };
    let answer = location.and_then(|l| client::ask(&l));
    let (status, why, code) = match answer {
        Ok(client::Answer::Running(status)) => (status, None, ExitCode::SUCCESS),
        Ok(client::Answer::NotRunning { why, status }) => (status, Some(why), ExitCode::from(3)),
        Err(e) => {
            eprintln!("bridge-daemon: {e:#}");
            return ExitCode::from(1);
        }
    };
    if args.json {
        match serde_json::to_string(&status) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("bridge-daemon: cannot encode the status: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", render::text(&status, why.as_deref()));
    }
    code
}

fn launcher_prepare(args: LayoutArgs) -> ExitCode {
    let layout = match layout_of(args.layout) {
        Ok(l) => l,
        Err(code) => return code,
    };
    // Never fails the start: what runs is whatever `current` names.
    let result = update::settings::LauncherSettings::load(&args.config)
        .and_then(|settings| update::prepare::prepare(&layout, &settings));
    match result {
        Ok(done) => {
            for step in done {
                tracing::info!(?step, "launcher prepare");
            }
        }
        Err(e) => tracing::error!(
            error = %format!("{e:#}"),
            layout = %layout.root().display(),
            "launcher prepare: the update step failed; starting the current release"
        ),
    }
    ExitCode::SUCCESS
}

fn launcher_run(args: LauncherRunArgs) -> ExitCode {
    let layout = match layout_of(args.layout.layout) {
        Ok(l) => l,
        Err(code) => return code,
    };
    match update::launcher::run(&layout, &args.layout.config, &args.extra) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bridge-daemon: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn rollback(args: RollbackArgs) -> ExitCode {
    let layout = match layout_of(args.layout) {
        Ok(l) => l,
        Err(code) => return code,
    };
    // The previous release may know nothing of the journal's write-ahead log: what the log
    // holds goes into the redb file first, with this version.
    let state = match (&args.state, &args.config) {
        (Some(state), _) => Some(state.clone()),
        (None, Some(config)) => match bridge_host::status::Location::of_config(config) {
            Ok(l) => Some(l.state),
            Err(e) => {
                eprintln!("bridge-daemon: {e:#}");
                return ExitCode::from(1);
            }
        },
        (None, None) => {
            let default = std::path::Path::new(bridge_host::config::DEFAULT_CONFIG_PATH);
            match default.exists() {
                true => match bridge_host::status::Location::of_config(default) {
                    Ok(l) => Some(l.state),
                    Err(e) => {
                        eprintln!("bridge-daemon: {e:#} (pass --state DIR)");
                        return ExitCode::from(1);
                    }
                },
                false => None,
            }
        }
    };
    match state {
        Some(state) => {
            let journal = state.join("journal.redb");
            match bridge_host::journal::settle(&journal) {
                Ok(0) => {}
                Ok(n) => println!(
                    "settled the journal {}: {n} batches from its log written into it",
                    journal.display()
                ),
                Err(e) => {
                    eprintln!(
                        "bridge-daemon: cannot settle the journal {} before rolling back (stop the agent first): {e}",
                        journal.display()
                    );
                    return ExitCode::from(1);
                }
            }
        }
        None => eprintln!(
            "bridge-daemon: no --state or --config given and no {}: the journal's log, if any, is not settled",
            bridge_host::config::DEFAULT_CONFIG_PATH
        ),
    }
    match update::prepare::rollback_manual(&layout) {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bridge-daemon: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run_call(a: CallArgs) -> ExitCode {
    let req = CallRequest {
        module: a.module,
        input: a.input,
        args: a.args,
        name: a.name,
        env: a.env,
        dirs: a.dirs,
        limits: LimitRequest {
            fuel: a.fuel,
            memory_bytes: a.memory_mib.map(|m| m.saturating_mul(1 << 20)),
            timeout_ms: a.timeout_ms,
            output_bytes: a.output_bytes,
        },
        config: a.config,
        cache_dir: a.cache_dir,
        no_cache: a.no_cache,
        allow_unsigned: a.allow_unsigned,
        trusted_keys: a.trusted_keys,
        signature: a.signature,
    };
    match call::call(&req).await {
        Ok(result) => {
            match serde_json::to_string(&result) {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("bridge-daemon: cannot encode the result: {e}");
                    return ExitCode::from(2);
                }
            }
            if result.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            match e.downcast_ref::<UsageError>() {
                Some(u) => eprintln!("bridge-daemon: {u}"),
                None => eprintln!("bridge-daemon: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}

async fn run_agent(flags: RunFlags) -> ExitCode {
    let result = async {
        let config = AgentConfig::resolve(&flags)?;
        daemon::run(config).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bridge-daemon: {e:#}");
            ExitCode::from(2)
        }
    }
}
