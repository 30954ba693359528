//! What an installer fetches: `install.sh` and the agent binaries, over plain HTTPS GETs on the
//! agents' port.
//!
//! The listener asks every client for a certificate (see [`super::tls`]). A connection that
//! presents one is an agent and goes to [`super::session`]; one that does not (curl, wget) is
//! served here and nothing else: it never reaches the agent WebSocket (`/agent` answers 401).
//!
//! | path | body |
//! | --- | --- |
//! | `/install.sh` | `installers/install.sh`, embedded in this binary |
//! | `/downloads/bridge-daemon-linux-ARCH` | the agent binary for `ARCH` (as `uname -m` prints it) |
//! | `/downloads/bridge-daemon-linux-ARCH.sha256` | `HEX  bridge-daemon-linux-ARCH\n`, as `sha256sum` prints it |
//! | `/downloads/bridge-daemon-linux-ARCH.manifest` | with `--release-key`: the binary's signed release manifest (`bridgectl release sign`'s format 2, version [`AGENT_VERSION`], OS `linux`) |
//! | `/downloads/bridge-daemon-linux-ARCH.gz` | with `--release-key`: the binary's gzip archive the manifest names |
//! | `/downloads/VERSION/…` | the same four, when `VERSION` is this build's version |
//!
//! Guarantees: read-only (nothing a client sends changes any state); bounded (request heads
//! of at most [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`], at most [`MAX_CONCURRENT`]
//! downloads at once, binaries of at most [`MAX_BINARY`] bytes, a whole response within
//! [`SEND_TIMEOUT`]); a binary's checksum, archive and manifest are computed from the same
//! bytes that are served, and recomputed when the file changes (size or modification time).
//! The archive is compressed at gzip's fastest level (this is the development platform: it
//! compresses at the first request, and a debug binary is large); `bridgectl release sign`
//! compresses at the best.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use bridge_signing::release::sign_manifest_gzip;
use bridge_signing::KeyPair;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio::time::timeout;

/// The installer script served at `/install.sh`.
pub const INSTALL_SCRIPT: &str = include_str!("../../../installers/install.sh");
/// The version in versioned download paths (`/downloads/VERSION/…`) and in the served
/// manifests.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sending one response may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(600);
/// Downloads served at once; more are answered 503.
pub const MAX_CONCURRENT: usize = 16;
/// The largest agent binary served.
pub use crate::release::MAX_BINARY;
/// The file name prefix of agent binaries: `bridge-daemon-linux-ARCH`.
pub const BINARY_PREFIX: &str = "bridge-daemon-linux-";
/// Architectures accepted in `--agent-binary ARCH=PATH` (as `uname -m` prints them).
pub const KNOWN_ARCHES: &[&str] = &["x86_64", "aarch64", "armv7l", "riscv64", "i686"];

/// One agent binary, read and hashed when first asked for.
#[derive(Debug)]
struct Artifact {
    len: u64,
    modified: Option<SystemTime>,
    bytes: Arc<Vec<u8>>,
    sha256_line: String,
    /// The signed release manifest (format 2), with a release key.
    manifest: Option<Arc<Vec<u8>>>,
    /// The binary's gzip archive the manifest names, with a release key.
    archive: Option<Arc<Vec<u8>>>,
}

/// The installer and the agent binaries this server hands out.
pub struct Downloads {
    binaries: HashMap<String, PathBuf>,
    release_key: Option<Arc<KeyPair>>,
    cache: Mutex<HashMap<String, Arc<Artifact>>>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads")
            .field("binaries", &self.binaries)
            .field(
                "release_key",
                &self.release_key.as_ref().map(|k| k.public_key()),
            )
            .finish_non_exhaustive()
    }
}

/// Parses `--agent-binary [ARCH=]PATH`: without `ARCH=`, the binary is for this machine's
/// architecture.
pub fn parse_agent_binary(spec: &str) -> Result<(String, PathBuf)> {
    if let Some((arch, path)) = spec.split_once('=') {
        if KNOWN_ARCHES.contains(&arch) {
            return Ok((arch.to_string(), PathBuf::from(path)));
        }
        if !Path::new(spec).exists() {
            bail!(
                "--agent-binary {spec:?}: {arch:?} is not one of {}",
                KNOWN_ARCHES.join(", ")
            );
        }
    }
    Ok((std::env::consts::ARCH.to_string(), PathBuf::from(spec)))
}

/// The agent binary next to this executable (`bridge-daemon` in the same directory), if any.
pub fn default_agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("bridge-daemon");
    candidate.is_file().then_some(candidate)
}

impl Downloads {
    /// `binaries`: (arch, path) pairs, each path checked now; `release_key`: a `bridgectl
    /// keygen` private key that signs a release manifest of every binary served.
    pub fn new(binaries: Vec<(String, PathBuf)>, release_key: Option<&Path>) -> Result<Downloads> {
        let mut map = HashMap::new();
        for (arch, path) in binaries {
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("agent binary {}", path.display()))?;
            if !meta.is_file() {
                bail!("agent binary {} is not a file", path.display());
            }
            map.insert(arch, path);
        }
        let release_key = match release_key {
            None => None,
            Some(path) => {
                let text = crate::files::read_text(path)?;
                if let Some(w) = crate::files::loose_key_permissions(path) {
                    tracing::warn!("{w}");
                }
                let key = KeyPair::from_pem(&text)
                    .with_context(|| format!("{} is not a usable release key", path.display()))?;
                Some(Arc::new(key))
            }
        };
        Ok(Downloads {
            binaries: map,
            release_key,
            cache: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        })
    }

    /// The release public key (`ed25519:…`), when manifests are served.
    pub fn release_public_key(&self) -> Option<String> {
        self.release_key
            .as_ref()
            .map(|k| k.public_key().to_string())
    }

    /// The architectures served.
    pub fn arches(&self) -> Vec<String> {
        let mut v: Vec<String> = self.binaries.keys().cloned().collect();
        v.sort();
        v
    }

    /// The artifact for `arch`, read and hashed now unless the file is unchanged since.
    async fn artifact(&self, arch: &str) -> Result<Option<Arc<Artifact>>> {
        let Some(path) = self.binaries.get(arch).cloned() else {
            return Ok(None);
        };
        let meta = tokio::fs::metadata(&path)
            .await
            .with_context(|| format!("agent binary {}", path.display()))?;
        let modified = meta.modified().ok();
        if let Some(a) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(arch)
        {
            if a.len == meta.len() && a.modified == modified {
                return Ok(Some(a.clone()));
            }
        }
        if meta.len() > MAX_BINARY {
            bail!(
                "agent binary {} is larger than {MAX_BINARY} bytes",
                path.display()
            );
        }
        let key = self.release_key.clone();
        let name = format!("{BINARY_PREFIX}{arch}");
        let arch_name = arch.to_string();
        let artifact = tokio::task::spawn_blocking(move || -> Result<Artifact> {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read the agent binary {}", path.display()))?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            let sha256_line = format!("{}  {name}\n", hex::encode(digest.as_ref()));
            let (manifest, archive) = match key {
                None => (None, None),
                Some(k) => {
                    let archive = gzip_fast(&bytes);
                    let text = sign_manifest_gzip(
                        AGENT_VERSION,
                        "linux",
                        &arch_name,
                        &bytes,
                        &archive,
                        &k,
                    )
                    .context("cannot sign the agent binary's release manifest")?;
                    (Some(Arc::new(text.into_bytes())), Some(Arc::new(archive)))
                }
            };
            Ok(Artifact {
                len: bytes.len() as u64,
                modified,
                bytes: Arc::new(bytes),
                sha256_line,
                manifest,
                archive,
            })
        })
        .await
        .map_err(|e| anyhow!("hashing the agent binary failed: {e}"))??;
        let artifact = Arc::new(artifact);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(arch.to_string(), artifact.clone());
        tracing::info!(arch, sha256 = %artifact.sha256_line.split(' ').next().unwrap_or(""), "agent binary ready for download");
        Ok(Some(artifact))
    }

    /// Serves one HTTP/1.1 request on a TLS connection without a client certificate, then
    /// closes it; never fails (problems are logged).
    pub async fn serve<S>(&self, mut stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let head = match timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::info!(%peer, "download request unreadable: {e:#}");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "download request not received in time");
                return;
            }
        };
        let response = match parse_request_line(&head) {
            Err(e) => Response::text(400, &format!("bad request: {e}")),
            Ok((method, path)) => {
                let response = match self.slots.clone().try_acquire_owned() {
                    Err(_) => Response::text(503, "too many downloads at once; retry later"),
                    Ok(permit) => {
                        let mut r = self.respond(&method, &path).await;
                        r.permit = Some(permit);
                        r
                    }
                };
                tracing::info!(%peer, %method, %path, status = response.status, "download request");
                response
            }
        };
        match timeout(SEND_TIMEOUT, response.write(&mut stream)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::info!(%peer, "download not completed: {e}"),
            Err(_) => tracing::info!(%peer, "download not completed in time"),
        }
    }

    async fn respond(&self, method: &str, path: &str) -> Response {
        let head_only = match method {
            "GET" => false,
            "HEAD" => true,
            _ => return Response::text(405, "only GET and HEAD are served here"),
        };
        let path = path.split('?').next().unwrap_or("");
        let mut response = if path == "/install.sh" {
            Response::bytes(
                "text/x-shellscript; charset=utf-8",
                Arc::new(INSTALL_SCRIPT.as_bytes().to_vec()),
            )
        } else if path == bridge_protocol::AGENT_PATH {
            Response::text(
                401,
                "agents connect here with their TLS client certificate (mutual TLS); none was presented",
            )
        } else if let Some(file) = download_name(path) {
            self.download(file).await
        } else {
            Response::text(404, "not found")
        };
        response.head_only = head_only;
        response
    }

    async fn download(&self, file: &str) -> Response {
        let (stem, suffix) = match file.rsplit_once('.') {
            Some((stem, s @ ("sha256" | "manifest" | "gz"))) => (stem, Some(s)),
            _ => (file, None),
        };
        let Some(arch) = stem.strip_prefix(BINARY_PREFIX) else {
            return Response::text(404, "not found");
        };
        let artifact = match self.artifact(arch).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                return Response::text(
                    404,
                    &format!(
                        "no agent binary for {arch} here (this platform serves: {})",
                        self.arches().join(", ")
                    ),
                )
            }
            Err(e) => {
                tracing::error!("{e:#}");
                return Response::text(500, "the agent binary cannot be read");
            }
        };
        match suffix {
            None => Response::bytes("application/octet-stream", artifact.bytes.clone()),
            Some("sha256") => Response::text(200, artifact.sha256_line.trim_end()),
            Some("gz") => match &artifact.archive {
                Some(archive) => Response::bytes("application/gzip", archive.clone()),
                None => Response::text(
                    404,
                    "no release archives here (the platform has no --release-key)",
                ),
            },
            Some(_) => match &artifact.manifest {
                Some(text) => Response::bytes("text/plain; charset=utf-8", text.clone()),
                None => Response::text(
                    404,
                    "no release manifests here (the platform has no --release-key)",
                ),
            },
        }
    }
}

/// `binary` gzip-compressed at the fastest level.
fn gzip_fast(binary: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(binary.len() / 2),
        flate2::Compression::fast(),
    );
    e.write_all(binary).expect("writing to memory");
    e.finish().expect("writing to memory")
}

/// The file name of a download path, `/downloads/NAME` or `/downloads/VERSION/NAME`.
fn download_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/downloads/")?;
    let name = match rest.split_once('/') {
        None => rest,
        Some((version, name)) if version == AGENT_VERSION => name,
        Some(_) => return None,
    };
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Reads up to the blank line ending the request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before the end of the request head");
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            bail!("request head longer than {MAX_HEAD} bytes");
        }
    }
    String::from_utf8(head).map_err(|_| anyhow!("request head is not UTF-8"))
}

/// `(method, path)` of an HTTP/1.x request line.
fn parse_request_line(head: &str) -> Result<(String, String)> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(version), None)
            if version.starts_with("HTTP/1.") && path.starts_with('/') =>
        {
            Ok((method.to_string(), path.to_string()))
        }
        _ => bail!("not an HTTP/1.x request line: {line:?}"),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Arc<Vec<u8>>,
    head_only: bool,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Response {
    fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Arc::new(format!("{text}\n").into_bytes()),
            head_only: false,
            permit: None,
        }
    }

    fn bytes(content_type: &'static str, body: Arc<Vec<u8>>) -> Response {
        Response {
            status: 200,
            content_type,
            body,
            head_only: false,
            permit: None,
        }
    }

    async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        if !self.head_only {
            for chunk in self.body.chunks(64 * 1024) {
                stream.write_all(chunk).await?;
            }
        }
        stream.flush().await?;
        stream.shutdown().await
    }
}

/// The base64 form curl's `--pinnedpubkey sha256//…` wants of a hex pin.
pub fn curl_pin(pin_hex: &str) -> Result<String> {
    use base64::Engine as _;
    let raw = hex::decode(pin_hex).context("the server pin is not hex")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(raw))
}

/// The one line an operator pastes on a new machine: fetch `install.sh` over the pinned
/// connection into a private temporary directory, run it with the token on its standard
/// input, remove the directory.
///
/// The line starts with a space (shells with `HISTCONTROL=ignorespace`, Debian's default,
/// keep it out of the history), the token reaches the installer through the shell builtin
/// `printf` and a pipe (never in any process's argument list), and the installer writes it
/// to a root-owned 0640 file only. The script is written into a fresh `mktemp -d` directory
/// (0700, the operator's): nothing lands in the current directory, and no other user can
/// swap the file between the download and `sudo sh` reading it. The subshell's `trap`
/// removes the directory and keeps the installer's exit status.
pub fn install_command(
    base_url: &str,
    pin_hex: &str,
    token: &str,
    release_key: Option<&str>,
) -> Result<String> {
    let b64 = curl_pin(pin_hex)?;
    let release = release_key
        .map(|k| format!(" --release-key {k}"))
        .unwrap_or_default();
    Ok(format!(
        " (d=$(mktemp -d) && trap 'rm -rf \"$d\"' EXIT && curl -fsS --pinnedpubkey \
         'sha256//{b64}' -k -o \"$d/install.sh\" {base_url}/install.sh \
         && printf '%s\\n' '{token}' | sudo sh \"$d/install.sh\" --url {base_url} \
         --server-pin {pin_hex}{release} --token-stdin)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_files() {
        assert_eq!(
            download_name("/downloads/bridge-daemon-linux-x86_64"),
            Some("bridge-daemon-linux-x86_64")
        );
        assert_eq!(
            download_name(&format!("/downloads/{AGENT_VERSION}/x.sha256")),
            Some("x.sha256")
        );
        assert_eq!(download_name("/downloads/0.0.0-nope/x"), None);
        assert_eq!(download_name("/downloads/"), None);
        assert_eq!(download_name("/etc/passwd"), None);
        assert_eq!(
            parse_request_line("GET /install.sh HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            ("GET".to_string(), "/install.sh".to_string())
        );
        assert!(parse_request_line("GET http://x/ HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request_line("\u{16}\u{3}\u{1}").is_err());
    }

    #[test]
    fn the_curl_pin_is_the_base64_of_the_hex_pin() {
        let pin = "00".repeat(31) + "ff";
        assert_eq!(
            curl_pin(&pin).unwrap(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP8="
        );
        let line = install_command("https://h:1", &pin, "tok", None).unwrap();
        assert!(line.starts_with(
            " (d=$(mktemp -d) && trap 'rm -rf \"$d\"' EXIT && curl -fsS --pinnedpubkey 'sha256//"
        ));
        assert!(line.contains("printf '%s\\n' 'tok' | sudo sh \"$d/install.sh\" --url https://h:1"));
        assert!(line.ends_with("--token-stdin)"));
        assert!(!line.contains("--token tok"));
    }
}
