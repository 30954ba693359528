//! `bridge-daemon call`: run one handler module once and produce its [`RunResult`].
//!
//! This is the handler author's loop (build, call, read the JSON) and the integration tests'
//! entry point into the real sandbox. The daemon runs tasks through the same [`Sandbox`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::AgentConfig;
use crate::limits::LimitRequest;
use crate::outcome::{RunResult, Status};
use crate::sandbox::cache::CacheDir;
use crate::sandbox::{DirGrant, Sandbox, SandboxConfig};
use crate::trust::{grant, Trust};

/// A usage or I/O problem: the command could not even try (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// What `call` was asked to do, already parsed from the command line.
#[derive(Debug, Clone, Default)]
pub struct CallRequest {
    /// The module file.
    pub module: PathBuf,
    /// `--input`: JSON text, or `@FILE`.
    pub input: Option<String>,
    /// `--arg`: argv\[1..\].
    pub args: Vec<String>,
    /// `--name`: argv\[0\]; defaults to the module's file stem.
    pub name: Option<String>,
    /// `--env NAME[=VALUE]`.
    pub env: Vec<String>,
    /// `--dir HOST:GUEST[:ro|:rw]`.
    pub dirs: Vec<String>,
    /// Requested limits.
    pub limits: LimitRequest,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--cache-dir DIR`.
    pub cache_dir: Option<PathBuf>,
    /// `--no-cache`: no disk cache at all.
    pub no_cache: bool,
    /// `--allow-unsigned`.
    pub allow_unsigned: bool,
    /// `--trusted-key PUB|@FILE`: keys trusted for this call, on top of the config's.
    pub trusted_keys: Vec<String>,
    /// `--signature FILE`: a detached signature.
    pub signature: Option<PathBuf>,
}

/// Parses `--input`: inline JSON or `@FILE`; absent means `null`. Invalid JSON is a usage error.
pub fn read_input(input: Option<&str>) -> Result<Vec<u8>> {
    let bytes = match input {
        None => return Ok(b"null".to_vec()),
        Some(s) => match s.strip_prefix('@') {
            Some(path) => std::fs::read(path)
                .map_err(|e| usage(format!("cannot read input file {path}: {e}")))?,
            None => s.as_bytes().to_vec(),
        },
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| usage(format!("--input is not valid JSON: {e}")))?;
    Ok(bytes)
}

/// Parses `--dir HOST:GUEST[:ro|:rw]` and checks the host directory exists.
pub fn parse_dir(spec: &str) -> Result<DirGrant> {
    let mut parts: Vec<&str> = spec.split(':').collect();
    let writable = match parts.last() {
        Some(&"rw") if parts.len() == 3 => true,
        Some(&"ro") if parts.len() == 3 => false,
        _ if parts.len() == 2 => false,
        _ => {
            return Err(usage(format!(
                "--dir {spec:?}: expected HOST:GUEST, HOST:GUEST:ro or HOST:GUEST:rw"
            )))
        }
    };
    parts.truncate(2);
    let (host, guest) = (PathBuf::from(parts[0]), parts[1].to_string());
    if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
        return Err(usage(format!(
            "--dir {spec:?}: the guest path must be absolute, without `..`"
        )));
    }
    if !host.is_dir() {
        return Err(usage(format!(
            "--dir {spec:?}: {} is not a directory",
            host.display()
        )));
    }
    Ok(DirGrant {
        host,
        guest,
        writable,
    })
}

/// Parses `--env NAME=VALUE`, or `--env NAME` taking the value from this process's environment.
pub fn parse_env(spec: &str) -> Result<(String, String)> {
    let (name, value) = match spec.split_once('=') {
        Some((n, v)) => (n.to_string(), v.to_string()),
        None => {
            let v = std::env::var(spec)
                .map_err(|_| usage(format!("--env {spec}: not set in the environment")))?;
            (spec.to_string(), v)
        }
    };
    if name.is_empty() || name.contains('\0') {
        return Err(usage(format!("--env {spec:?}: invalid variable name")));
    }
    Ok((name, value))
}

/// The agent config for `call`: `--config` (or all defaults) with the trust flags applied.
fn agent_config(req: &CallRequest) -> Result<AgentConfig> {
    let mut config = match &req.config {
        Some(path) => AgentConfig::load(path).map_err(|e| usage(format!("{e:#}")))?,
        None => AgentConfig::default(),
    };
    config.trust.flag_keys = req.trusted_keys.clone();
    config.trust.allow_unsigned = req.allow_unsigned;
    Ok(config)
}

/// The sandbox settings for `call`: the config file's, with the disk cache chosen by flags.
///
/// The cache's key is a file beside it (`<dir>.key`): `call` has no identity to derive one from.
/// Run as root, `call` has no default cache: a location taken from the environment
/// (`$XDG_CACHE_HOME`, `$HOME`, kept by `sudo -E`) may be another user's to write.
pub fn sandbox_config(req: &CallRequest, agent: &AgentConfig) -> Result<SandboxConfig> {
    let mut config = agent.sandbox_config()?;
    // `call` runs one module: a small pool is enough and keeps start-up quick.
    config.max_concurrent_runs = 1;
    if req.no_cache {
        config.cache_dir = None;
    } else if let Some(dir) = &req.cache_dir {
        config.cache_dir = Some(CacheDir::with_key_file(dir));
    } else if config.cache_dir.is_none() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            tracing::info!("running as root: no disk cache by default (pass --cache-dir, or set [sandbox] cache_dir)");
        } else {
            config.cache_dir = default_cache_dir().map(CacheDir::with_key_file);
        }
    }
    Ok(config)
}

/// `$XDG_CACHE_HOME/bridge-daemon`, else `$HOME/.cache/bridge-daemon` (not used as root).
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".cache"))
        })?;
    Some(base.join("bridge-daemon"))
}

/// Reads a module file, refusing one larger than `max` bytes before reading it.
pub fn read_module(path: &Path, max: u64) -> Result<std::result::Result<Vec<u8>, RunResult>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| usage(format!("cannot read module {}: {e}", path.display())))?;
    if !meta.is_file() {
        bail!(usage(format!("{} is not a file", path.display())));
    }
    if meta.len() > max {
        return Ok(Err(RunResult::refused(
            Status::InvalidModule,
            format!(
                "the module is {} bytes; the agent accepts modules up to {max} bytes",
                meta.len()
            ),
        )));
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading module {}", path.display()))?;
    Ok(Ok(bytes))
}

/// Runs `req` to completion. `Err` is a usage/I-O problem; any module outcome is `Ok`.
pub async fn call(req: &CallRequest) -> Result<RunResult> {
    let input = read_input(req.input.as_deref())?;
    let dirs = req
        .dirs
        .iter()
        .map(|d| parse_dir(d))
        .collect::<Result<Vec<_>>>()?;
    let env = req
        .env
        .iter()
        .map(|e| parse_env(e))
        .collect::<Result<Vec<_>>>()?;
    let agent = agent_config(req)?;
    let config = sandbox_config(req, &agent)?;
    let trust = Trust::from_settings(&agent.trust, agent.file.as_deref())
        .map_err(|e| usage(format!("{e:#}")))?;
    let detached = match &req.signature {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| usage(format!("cannot read signature {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let bytes = match read_module(&req.module, config.max_module_bytes)? {
        Ok(b) => b,
        Err(refused) => return Ok(refused),
    };
    let defaults = config.limits.defaults;
    let sandbox = Sandbox::new(config)?;
    let prepared = match trust.prepare(&sandbox, &bytes, detached.as_deref()) {
        Ok(p) => p,
        Err(refused) => return Ok(*refused),
    };
    let verified = prepared.verified.as_deref();
    let name = req
        .name
        .clone()
        .or_else(|| verified.map(|v| v.claims.name.clone()))
        .unwrap_or_else(|| {
            req.module
                .file_stem()
                .map(|s| s.to_string_lossy().trim_end_matches(".signed").to_string())
                .unwrap_or_else(|| "handler".into())
        });
    let granted = grant(verified, req.limits, &defaults, env, dirs);
    for denied in &granted.denied {
        tracing::warn!(handler = %name, "not granted (the handler's signed claims do not declare it): {denied}");
    }
    let spec = granted.into_spec(input, name, &req.args);
    sandbox.run(&prepared.module, spec).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_must_be_json() {
        assert_eq!(read_input(None).unwrap(), b"null");
        assert_eq!(read_input(Some("{\"a\":1}")).unwrap(), b"{\"a\":1}");
        let err = read_input(Some("{nope")).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(read_input(Some("@/definitely/not/here.json")).is_err());
    }

    #[test]
    fn dir_specs() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().display().to_string();
        let g = parse_dir(&format!("{host}:/data")).unwrap();
        assert!(!g.writable);
        assert_eq!(g.guest, "/data");
        assert!(parse_dir(&format!("{host}:/data:rw")).unwrap().writable);
        assert!(parse_dir(&format!("{host}:data")).is_err());
        assert!(parse_dir(&format!("{host}:/a/../b")).is_err());
        assert!(parse_dir(&format!("{host}:/data:xx")).is_err());
        assert!(parse_dir("/definitely/not/here:/data").is_err());
    }

    #[test]
    fn env_specs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("BRIDGE_TEST_SURELY_UNSET_VAR").is_err());
    }
}
