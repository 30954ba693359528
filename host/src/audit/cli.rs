//! `bridge-daemon audit verify|tail`: read-only over the audit files, beside a running daemon
//! (no journal lock is taken).

use std::path::PathBuf;
use std::process::ExitCode;

use super::record::Record;
use super::verify::{tail, verify};

/// `bridge-daemon audit …`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the audit chain: every file in sequence order, every line a record, sequence
    /// numbers consecutive, each record naming the hash of the one before it (across files).
    ///
    /// Exit status: 0 valid ("N records, seq A..B, head HASH"), 1 broken (the first bad record
    /// named as FILE:LINE (seq N): what), 2 for a usage or I/O error.
    Verify(Where),
    /// Print the last records (oldest first).
    Tail(TailArgs),
}

/// Where the state directory is.
#[derive(Debug, Clone, clap::Args)]
pub struct Where {
    /// The agent's state directory.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub state: Option<PathBuf>,
    /// The agent's config file (its [agent] state_dir). Default, without --state:
    /// /etc/bridge/agent.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// How many records.
    #[arg(short = 'n', default_value_t = 20)]
    pub n: usize,
    /// The records as they are written (one JSON object a line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

/// Reads a config file's state directory (`[agent] state_dir`); `None`: the default config
/// file's (the installer's, `/etc/bridge/agent.toml`).
pub type StateOf<'a> = &'a dyn Fn(Option<&std::path::Path>) -> anyhow::Result<PathBuf>;

impl Where {
    /// The audit directory: `STATE/audit`.
    pub fn audit_dir(&self, state_of: StateOf<'_>) -> anyhow::Result<PathBuf> {
        let state = match (&self.state, &self.config) {
            (Some(state), _) => state.clone(),
            (None, Some(file)) => state_of(Some(file))?,
            (None, None) => {
                state_of(None).map_err(|e| e.context("pass --state DIR or --config FILE"))?
            }
        };
        Ok(state.join("audit"))
    }
}

/// Runs an `audit` command; `state_of` reads a config file's state directory.
pub fn run(command: AuditCommand, state_of: StateOf<'_>) -> ExitCode {
    match command {
        AuditCommand::Verify(at) => {
            let dir = match at.audit_dir(state_of) {
                Ok(d) => d,
                Err(e) => return usage(e),
            };
            match verify(&dir) {
                Ok(valid) => {
                    println!("{valid}");
                    ExitCode::SUCCESS
                }
                Err(broken) => {
                    println!("{broken}");
                    ExitCode::from(1)
                }
            }
        }
        AuditCommand::Tail(args) => {
            let dir = match args.at.audit_dir(state_of) {
                Ok(d) => d,
                Err(e) => return usage(e),
            };
            let lines = match tail(&dir, args.n) {
                Ok(l) => l,
                Err(e) => return usage(e.into()),
            };
            for line in lines {
                if args.json {
                    println!("{}", String::from_utf8_lossy(&line));
                    continue;
                }
                match Record::parse(&line) {
                    Ok(r) => println!("{}", summary(&r)),
                    Err(e) => println!("(not a record: {e})"),
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn usage(e: anyhow::Error) -> ExitCode {
    eprintln!("bridge-daemon: {e:#}");
    ExitCode::from(2)
}

/// One line for a person: seq, time, task, what ran, how it ended.
fn summary(r: &Record) -> String {
    let what = match (&r.program, &r.command, &r.file_sha256) {
        (Some(program), _, _) => {
            let argv = r.argv.as_deref().unwrap_or_default();
            format!("shell {program} {argv:?}")
        }
        (None, Some(command), _) => format!("command {command}"),
        (None, None, Some(sha)) => format!("module {sha}"),
        _ => "-".to_string(),
    };
    let mut s = format!(
        "{} {} {} {} {} {}",
        r.seq, r.time, r.task_id, r.event, what, r.status
    );
    if let Some(reason) = &r.reason {
        s.push_str(&format!(" ({reason})"));
    }
    if let Some(h) = &r.handler {
        s.push_str(&format!(" handler {}@{}", h.name, h.version));
    }
    if let Some(signer) = &r.signer {
        s.push_str(&format!(" signer {signer}"));
    }
    s
}
