//! What the link and throughput benchmarks share: the release binaries, a development platform
//! process, and a freshly signed `hello` handler.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A release binary of the workspace (built by `cargo xtask bench`).
pub fn release_bin(name: &str) -> PathBuf {
    let p = root().join("target/release").join(name);
    assert!(p.exists(), "{} missing: run `cargo build --release -p bridge-host -p bridge-platform` (cargo xtask bench does)", p.display());
    p
}

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bridgectl serve` on `listen` (its control socket in `state`); returns the process and the
/// first line it printed (url, server_pin, token, control…).
pub fn serve(state: &Path, listen: &str) -> (Proc, Value) {
    let mut child = Command::new(release_bin("bridgectl"))
        .args(["serve", "--listen", listen, "--state"])
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), serde_json::from_str(line.trim()).unwrap())
}

/// A fresh publisher key and the `hello` example signed with it.
pub fn signed_hello() -> (bridge_signing::KeyPair, Vec<u8>) {
    let key = bridge_signing::KeyPair::generate().unwrap();
    let module = std::fs::read(root().join("target/wasm/wasm32-wasip1/handler/hello.wasm"))
        .expect("cargo xtask build-examples first");
    let claims = bridge_signing::Claims::new("hello", "1.0.0", 1_700_000_000);
    let signed = bridge_signing::sign(&module, &key, &claims).unwrap().module;
    (key, signed)
}
