//! `bridgectl serve`: run the development platform server.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use crate::serve::{ServeOptions, Server};

/// Run the development platform server.
///
/// Agents connect to wss://LISTEN/agent with mutual TLS; new agents enroll with a one-time
/// token. On the same port, clients without a certificate get https://LISTEN/install.sh and
/// the agent binaries with their checksums and, with --release-key, their signed release
/// manifests (/downloads/bridge-daemon-linux-ARCH[.sha256|.manifest]).
/// On first start, the state directory receives the server key (server.key, 0600) and
/// a self-signed certificate (server.crt); later starts reuse them, so the server pin does not
/// change. Enrolled agents (agents.json) and token hashes (tokens.json) are kept there too.
///
/// The control interface (newline-delimited JSON, used by `bridgectl agents`, `token`, `run`,
/// `result`, `cancel`, `install-handler`, `handlers`, `remove-handler`, `update`, `rollout`)
/// is the Unix socket STATE/control.sock (0600). Only this user and root may use it: other
/// users are refused (SO_PEERCRED). The state directory must belong to this user; it is kept
/// at mode 0700.
///
/// Each start issues a fresh enrollment token. The first line on stdout is one JSON object:
/// {"url", "server_pin", "token", "control", "ca_file", "install_command", "release_key"?},
/// where control is the socket's absolute path; logs go to stderr (filter with RUST_LOG,
/// default info). Runs until SIGINT or SIGTERM, then closes every connection, removes the
/// socket and exits 0. Task results are stored in the state directory (results.jsonl,
/// append-only) and survive restarts; so do the updates sent and their verdicts (updates/,
/// one file per update).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address agents connect to, IP:PORT (port 0 picks a free port).
    #[arg(long, value_name = "IP:PORT")]
    pub listen: SocketAddr,
    /// The state directory (created if missing, mode 0700); it holds the control socket.
    #[arg(long, value_name = "DIR", env = "BRIDGE_STATE")]
    pub state: PathBuf,
    /// An extra DNS name or IP address for the server certificate; repeatable (localhost,
    /// 127.0.0.1 and ::1 are always included).
    #[arg(long = "hostname", value_name = "NAME")]
    pub hostnames: Vec<String>,
    /// Lifetime of the enrollment tokens issued, in seconds; 0 means they never expire.
    #[arg(long, value_name = "N", default_value_t = 86_400)]
    pub token_ttl_secs: u64,
    /// An agent binary to serve to installers at /downloads/bridge-daemon-linux-ARCH, as PATH
    /// (for this machine's architecture) or ARCH=PATH (ARCH as `uname -m` prints it);
    /// repeatable. Default: the bridge-daemon next to this executable, if any.
    #[arg(long = "agent-binary", value_name = "[ARCH=]PATH")]
    pub agent_binaries: Vec<String>,
    /// A release key (a `bridgectl keygen` private key): every served binary gets a signed
    /// release manifest at .manifest (version: this build's), and the install command carries
    /// the public key.
    #[arg(long, value_name = "FILE")]
    pub release_key: Option<PathBuf>,
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The builder alone stops at INFO; the filter below decides.
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(log_filter("info"))
        .try_init();
}

/// The log filter: `RUST_LOG` (`LEVEL` or `TARGET=LEVEL` directives, comma-separated), else
/// `default`; a `RUST_LOG` that does not parse is reported on stderr and ignored.
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

/// Runs `serve`.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    init_logging();
    // One worker thread: a run's way out (the control request, the agent's session writer)
    // and its result's way back (the session reader, the waiting request) then never cross
    // between threads, each crossing a wake-up of another core (docs/performance.md, where
    // the round trip goes). Slow work goes to the blocking pool (artifacts, releases).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Handlers first: a signal that arrives right after the first line must not kill us.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let server = Server::bind(ServeOptions {
        listen: args.listen,
        state_dir: args.state,
        hostnames: args.hostnames,
        token_ttl_secs: (args.token_ttl_secs > 0).then_some(args.token_ttl_secs),
        agent_binaries: args
            .agent_binaries
            .iter()
            .map(|s| crate::serve::downloads::parse_agent_binary(s))
            .collect::<Result<_>>()?,
        release_key: args.release_key,
    })
    .await?;
    let info = server.info().clone();
    // The hint goes to stderr before the first line goes to stdout, so that whoever read the
    // first line also finds the hint.
    eprintln!(
        "bridgectl: agents connect with:\n  bridge-daemon run --server {} --token {} --server-pin {} --state AGENT_STATE_DIR\n\
         bridgectl: control: bridgectl --control {} agents   (or: bridgectl --state {} agents)\n\
         bridgectl: install an agent on a Linux machine (one line; see installers/README.md):\n{}",
        info.url,
        info.token,
        info.server_pin,
        info.control,
        std::path::Path::new(&info.control)
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .display(),
        info.install_command
    );
    {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &info).expect("the start info serializes");
        out.write_all(b"\n")
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
    tracing::info!(url = %info.url, control = %info.control, pin = %info.server_pin, "serving");
    server
        .run(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        })
        .await
}
