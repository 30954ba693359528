//! Helpers shared by the installer's tests: running `install.sh`, snapshots of a staging root,
//! the real `bridgectl serve` and a fake platform serving chosen files, release binaries and
//! their signed manifests, the unit's checks.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bridge_testkit::Platform;
use sha2::{Digest as _, Sha256};

pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../installers/install.sh");
pub const ARCH: &str = std::env::consts::ARCH;

/// The agent binary: `bridge-daemon` next to `bridgectl`, built when missing.
pub fn daemon_binary() -> PathBuf {
    bridge_testkit::bins::bin("bridge-daemon")
}

pub fn shell() -> &'static str {
    if Path::new("/bin/dash").exists() || Path::new("/usr/bin/dash").exists() {
        "dash"
    } else {
        "sh"
    }
}

/// Runs the installer with `args`; `stdin` is its standard input.
pub fn install(args: &[&str], stdin: &str) -> Output {
    install_env(args, stdin, &[])
}

/// [`install`] with extra environment variables.
pub fn install_env(args: &[&str], stdin: &str, env: &[(&str, &Path)]) -> Output {
    let mut child = Command::new(shell())
        .arg(SCRIPT)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = wait_output(child, Duration::from_secs(120));
    eprintln!(
        "$ install.sh {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("process {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: Output) -> String {
    let t = text(&out);
    assert!(out.status.success(), "the installer failed: {t}");
    t
}

/// Every path under `root` with its mode, owner, size, modification time and content hash.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut map = BTreeMap::new();
    if !root.exists() {
        return map;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).unwrap();
        let mut entry = format!(
            "{:o} {}:{} {} {}",
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.len(),
            meta.mtime_nsec() + meta.mtime() * 1_000_000_000
        );
        if meta.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            entry.push(' ');
            entry.push_str(&hex::encode(Sha256::digest(fs::read(&p).unwrap())));
        }
        map.insert(p.strip_prefix(root).unwrap().to_path_buf(), entry);
    }
    map
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `bridgectl serve` with `extra` arguments.
pub fn start_serve(state: &Path, extra: &[&str]) -> Platform {
    Platform::builder(state).args(extra).start()
}

/// A field of the first line `serve` printed.
pub fn get(serve: &Platform, key: &str) -> String {
    serve.info[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {}", serve.info))
        .to_string()
}

/// `https://127.0.0.1:PORT`
pub fn base_url(serve: &Platform) -> String {
    format!("https://{}", serve.listen_addr())
}

/// A minimal WASI command: exports `_start` (doing nothing) and `memory`.
pub const MINIMAL_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
    0x03, 0x02, 0x01, 0x00, // function 0: type 0
    0x05, 0x03, 0x01, 0x00, 0x01, // memory: min 1 page
    0x07, 0x13, 0x02, // exports: 2
    0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // "_start": func 0
    0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, // "memory": memory 0
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code: empty body
];

pub fn publisher() -> &'static bridge_signing::KeyPair {
    static KEY: OnceLock<bridge_signing::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| bridge_signing::KeyPair::from_seed(&[7; 32]))
}

/// Copies the agent binary to `dir/name`, with `extra` bytes appended (a different release
/// that still runs: an ELF file ignores trailing bytes).
pub fn release(dir: &Path, name: &str, extra: &[u8]) -> PathBuf {
    let mut bytes = fs::read(daemon_binary()).unwrap();
    bytes.extend_from_slice(extra);
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The layout under a staging root: `ROOT/usr/local/lib/bridge`.
pub fn layout(root: &Path) -> PathBuf {
    root.join("usr/local/lib/bridge")
}

/// Where a symbolic link points, or `None` when `path` is not one.
pub fn link(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

/// The worst exposure `systemd-analyze security` may give the installed unit: the figures
/// installers/README.md documents (as the service user; as root with `--run-as-root`).
pub const EXPOSURE_USER: f64 = 1.3;
pub const EXPOSURE_ROOT: f64 = 8.5;

/// `systemd-analyze verify` of the staged unit, with the launcher's path pointing at the
/// staged one (the unit names the target system's path), and its exposure score at most
/// `max_exposure`. Needs systemd-analyze (`bash .ci/run` installs systemd when it is missing).
pub fn verify_unit(root: &Path, work: &Path, max_exposure: f64) {
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is not installed: install systemd (bash .ci/run does) to verify the unit"
    );
    let unit = fs::read_to_string(root.join("etc/systemd/system/bridge-daemon.service")).unwrap();
    let launcher = "/usr/local/lib/bridge/bridge-launcher ";
    let staged = unit.replace(
        launcher,
        &format!("{} ", layout(root).join("bridge-launcher").display()),
    );
    assert_eq!(unit.matches(launcher).count(), 2, "{unit}");
    let dir = work.join("verify");
    fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("bridge-daemon.service");
    fs::write(&copy, staged).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "bridge-daemon.service"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let report = text(&out);
    let score: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for bridge-daemon.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(
        score <= max_exposure,
        "the unit's exposure rose to {score} (documented: {max_exposure}):\n{report}"
    );
}

/// A release key (a `bridgectl keygen` key).
pub fn release_key() -> &'static bridge_signing::KeyPair {
    static KEY: OnceLock<bridge_signing::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| bridge_signing::KeyPair::from_seed(&[9; 32]))
}

/// The manifest `key` signs for `binary` as version `version` for linux/`arch`.
pub fn manifest(version: &str, arch: &str, binary: &[u8], key: &bridge_signing::KeyPair) -> String {
    bridge_signing::release::sign_manifest(version, "linux", arch, binary, key).unwrap()
}

/// The format-2 manifest `key` signs for `binary` served as the gzip `archive`, as version
/// `version` for linux/`arch`.
pub fn manifest_gzip(
    version: &str,
    arch: &str,
    binary: &[u8],
    archive: &[u8],
    key: &bridge_signing::KeyPair,
) -> String {
    bridge_signing::release::sign_manifest_gzip(version, "linux", arch, binary, archive, key)
        .unwrap()
}

/// `bytes` gzip-compressed at the fastest level (the test binaries are debug builds, large).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A tiny HTTPS server with a self-signed certificate serving fixed bodies: wrong checksums,
/// manifests that do not match, versions `bridgectl serve` does not serve.
pub struct FakePlatform {
    pub url: String,
    pub pin: String,
    pub files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl FakePlatform {
    pub fn start() -> FakePlatform {
        use rcgen::PublicKeyData as _;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pin = hex::encode(Sha256::digest(key.subject_public_key_info()));
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let files: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
        let served = files.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let body = served.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"not found\n".to_vec()),
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(&body);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        FakePlatform { url, pin, files }
    }

    /// Serves `binary` and `sha256` (as `sha256sum` prints it) at the unversioned paths.
    pub fn publish(&self, binary: &[u8], sha256: &str) {
        self.publish_at(None, binary, sha256);
    }

    /// Serves `binary` and its `.sha256` at `/downloads/[VERSION/]bridge-daemon-linux-ARCH`.
    pub fn publish_at(&self, version: Option<&str>, binary: &[u8], sha256: &str) {
        let name = format!("bridge-daemon-linux-{ARCH}");
        let dir = version.map(|v| format!("{v}/")).unwrap_or_default();
        let mut files = self.files.lock().unwrap();
        files.insert(format!("/downloads/{dir}{name}"), binary.to_vec());
        files.insert(
            format!("/downloads/{dir}{name}.sha256"),
            format!("{sha256}  {name}\n").into_bytes(),
        );
    }

    /// Serves `binary` with its right checksum, at the paths of `version` (or unversioned).
    pub fn publish_binary(&self, version: Option<&str>, binary: &[u8]) {
        self.publish_at(version, binary, &sha(binary));
    }

    /// Serves the gzip `archive` (`….gz`) with `manifest` beside it, at the unversioned paths
    /// (and no binary: a format-2 release is fetched as its archive).
    pub fn publish_archive(&self, archive: &[u8], manifest: &str) {
        let name = format!("bridge-daemon-linux-{ARCH}");
        let mut files = self.files.lock().unwrap();
        files.remove(&format!("/downloads/{name}"));
        files.insert(format!("/downloads/{name}.gz"), archive.to_vec());
        files.insert(
            format!("/downloads/{name}.manifest"),
            manifest.as_bytes().to_vec(),
        );
    }

    /// Serves `binary` with `manifest` beside it (`….manifest`), at the unversioned paths.
    pub fn publish_release(&self, binary: &[u8], manifest: &str) {
        let name = format!("bridge-daemon-linux-{ARCH}");
        self.publish_binary(None, binary);
        self.files.lock().unwrap().insert(
            format!("/downloads/{name}.manifest"),
            manifest.as_bytes().to_vec(),
        );
    }
}

/// Whether this process runs as root (ownership can then be set and checked).
pub fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A stand-in for systemctl under `--root` (`BRIDGE_INSTALL_SYSTEMCTL`): logs its arguments to
/// `$FAKE_LOG`; on `start`/`restart` with `$FAKE_ENROLL` set, it plays the service: a moment
/// later the agent records its enrollment (`$FAKE_ENROLL` is the marker's path).
pub fn fake_systemctl(dir: &Path) -> PathBuf {
    let path = dir.join("fake-systemctl");
    fs::write(
        &path,
        r#"#!/bin/sh
echo "$*" >>"$FAKE_LOG"
case $1 in
    start | restart)
        if [ -n "${FAKE_ENROLL:-}" ]; then
            (sleep 1 && : >"$FAKE_ENROLL" && chmod 600 "$FAKE_ENROLL") </dev/null >/dev/null 2>&1 &
        fi
        ;;
esac
"#,
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The hex SHA-256 of `bytes`.
pub fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The installer's options for staging under `root` from the platform at `url` pinned by
/// `pin`, then `extra`.
pub fn target<'a>(root: &'a Path, url: &'a str, pin: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--root",
        root.to_str().unwrap(),
        "--url",
        url,
        "--server-pin",
        pin,
    ];
    args.extend_from_slice(extra);
    args
}

/// A release binary (`v1`) in `dir`, and `bridgectl serve` (state in `dir/platform`) serving
/// it.
pub fn serve_release(dir: &Path) -> (PathBuf, Platform) {
    let v1 = release(dir, "v1", b"");
    let serve = start_serve(
        &dir.join("platform"),
        &["--agent-binary", v1.to_str().unwrap()],
    );
    (v1, serve)
}

/// Writes `key`'s public key to `path` as a PEM file (SubjectPublicKeyInfo), as
/// `--release-key` also takes it.
pub fn write_public_pem(path: &Path, key: &bridge_signing::KeyPair) {
    use base64::Engine as _;
    let mut der = hex::decode("302a300506032b6570032100").unwrap();
    der.extend_from_slice(key.public_key().as_bytes());
    fs::write(
        path,
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        ),
    )
    .unwrap();
}

/// Owner and mode of `path` (not following a link).
pub fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Asserts that the layout `lay`'s `current` links to release `version`.
#[track_caller]
pub fn assert_current(lay: &Path, version: &str) {
    assert_eq!(
        link(&lay.join("current")),
        Some(format!("releases/{version}"))
    );
}

/// Asserts that `current` links to release `current` and `previous` to `previous`.
#[track_caller]
pub fn assert_links(lay: &Path, current: &str, previous: &str) {
    assert_current(lay, current);
    assert_eq!(
        link(&lay.join("previous")),
        Some(format!("releases/{previous}"))
    );
}

/// Runs `install` (an installer run; its output) and asserts nothing under `root` changed;
/// the output.
#[track_caller]
pub fn unchanged(root: &Path, install: impl FnOnce() -> String) -> String {
    let before = snapshot(root);
    let out = install();
    assert_eq!(snapshot(root), before, "{out}");
    out
}

/// [`unchanged`], the installer saying so.
#[track_caller]
pub fn nothing_to_change(root: &Path, install: impl FnOnce() -> String) {
    let out = unchanged(root, install);
    assert!(out.contains("nothing to change"), "{out}");
}

/// The unit's lines that start the agent through the launcher: the commands the self-update
/// tests' supervisor runs (`bridge_testkit::supervisor`), so the unit installed is the one
/// those tests exercise.
pub fn launcher_lines() -> [String; 2] {
    bridge_testkit::supervisor::unit_lines("/usr/local/lib/bridge", "/etc/bridge/agent.toml")
}

/// A staging root (`DIR/root`), a fake platform, and the bytes of a release binary (`DIR/v1`).
pub fn fake_staging(dir: &Path) -> (PathBuf, FakePlatform, Vec<u8>) {
    let v1 = fs::read(release(dir, "v1", b"")).unwrap();
    (dir.join("root"), FakePlatform::start(), v1)
}
