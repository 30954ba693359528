//! Where the workspace's binaries and wasm modules are, built when missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The wasm packages built for `wasm32-wasip1`: the examples and the hostile test fixtures.
pub const WASM_PACKAGES: [&str; 4] = ["hello", "checksum", "logscan", "hostile"];
/// The target the wasm handlers are built for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kit lives in the workspace")
        .to_path_buf()
}

/// `cargo` (the one running us, if any) in the workspace root, in the environment a shell would
/// give it: without the variables Cargo sets for the program it runs (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`…). Cargo tracks some of them for build scripts (ring's, for one, is rerun
/// when `CARGO_MANIFEST_DIR` changes), so a build started from `cargo xtask` or from a test
/// would otherwise rebuild what a build from the shell made, and the other way round.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_its_program) {
            c.env_remove(name);
        }
    }
    c
}

/// Whether Cargo sets the variable `name` for a program it runs (`cargo run`, `cargo test`).
fn set_by_cargo_for_its_program(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// The environment variable naming a directory of prebuilt binaries to use instead (see [`bin`]).
pub const BIN_DIR_ENV: &str = "BRIDGE_BENCH_BIN_DIR";

/// The package that builds binary `name`.
fn package_of(name: &str) -> &'static str {
    match name {
        "bridgectl" => "bridge-platform",
        "bridge-daemon" => "bridge-host",
        other => panic!("no workspace binary is called {other:?}"),
    }
}

/// The path of the workspace binary `name` (`bridge-daemon`, `bridgectl`) in the profile
/// directory of the running program (`target/debug` for tests, `target/release` for
/// benchmarks), built there first when missing. Cargo builds a package's own binaries before
/// its tests; the other package's is as fresh as the last build (`cargo xtask test` builds
/// everything first).
///
/// `BRIDGE_BENCH_BIN_DIR`, when set, names another directory holding both binaries (a baseline
/// build the benchmarks compare against): they are taken from there and never built.
pub fn bin(name: &str) -> PathBuf {
    package_of(name);
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = Path::new(&dir).join(name);
        assert!(
            path.is_file(),
            "{} is missing ({BIN_DIR_ENV})",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the path of the running program");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the running program is in target/<profile>/deps");
    let path = dir.join(name);
    if !path.exists() {
        let mut build = cargo();
        build.args(["build", "--quiet", "-p", package_of(name), "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo to build a binary");
        assert!(status.success(), "building {name} failed");
        assert!(path.exists(), "{} was not built", path.display());
    }
    path
}

/// `bridge-daemon`.
pub fn daemon() -> Command {
    Command::new(bin("bridge-daemon"))
}

/// `bridgectl`.
pub fn bridgectl() -> Command {
    Command::new(bin("bridgectl"))
}

/// Builds every wasm handler (the examples and the fixtures) with `--profile handler` into
/// `target/wasm` (a target directory of its own keeps this nested cargo off the lock of the
/// cargo that runs us), assembles the WebAssembly-text example, and returns the directory of
/// the `.wasm` files. A no-op for cargo when they are fresh.
pub fn build_wasm() -> Result<PathBuf, String> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--quiet",
        "--profile",
        "handler",
        "--target",
        WASM_TARGET,
    ])
    .args(["--target-dir", "target/wasm"]);
    for p in WASM_PACKAGES {
        cmd.args(["-p", p]);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo to build the wasm handlers: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the wasm handlers failed ({status}; is the {WASM_TARGET} target installed? `cargo xtask test` installs it)"
        ));
    }
    let dir = root().join("target/wasm").join(WASM_TARGET).join("handler");
    let src = root().join("examples/wat-hello/hello.wat");
    let wasm = wat::parse_file(&src).map_err(|e| format!("assembling {}: {e}", src.display()))?;
    std::fs::write(dir.join("wat-hello.wasm"), wasm)
        .map_err(|e| format!("writing wat-hello.wasm: {e}"))?;
    Ok(dir)
}

/// [`build_wasm`] once per process; panics when it fails.
pub fn wasm_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_wasm().unwrap_or_else(|e| panic!("{e}")))
}

/// The path of a built module: an example (`hello`) or a hostile fixture (`spin`).
pub fn wasm(name: &str) -> PathBuf {
    let p = wasm_dir().join(format!("{name}.wasm"));
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// Assembles `host/tests/fixtures/wat/NAME.wat` into `dir`; returns the module's path.
pub fn wat_fixture(name: &str, dir: &Path) -> PathBuf {
    let src = root()
        .join("host/tests/fixtures/wat")
        .join(format!("{name}.wat"));
    let bytes =
        wat::parse_file(&src).unwrap_or_else(|e| panic!("assembling {}: {e}", src.display()));
    let out = dir.join(format!("{name}.wasm"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// The file name, in `target/debug`, of the agent rebuilt as [`next_version`]: what the
/// self-update tests update to (`cargo xtask next-daemon` builds it; `cargo xtask test` runs
/// that first).
pub const NEXT_DAEMON: &str = "bridge-daemon-next";

/// The version the next-version agent reports: this workspace's, one patch release later, with
/// the pre-release tag `next` (0.1.0 → 0.1.1-next).
pub fn next_version() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.splitn(3, '.');
    let (major, minor, patch) = (
        parts.next().unwrap_or("0"),
        parts.next().unwrap_or("0"),
        parts.next().unwrap_or("0"),
    );
    let patch: u64 = patch
        .split(['-', '+'])
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the workspace version is major.minor.patch");
    format!("{major}.{minor}.{}-next", patch + 1)
}

/// The next-version agent binary (see [`NEXT_DAEMON`]); panics with what to run when it is
/// missing or reports another version.
pub fn next_daemon() -> PathBuf {
    let path = bin("bridge-daemon").with_file_name(NEXT_DAEMON);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo xtask next-daemon` (`cargo xtask test` does)",
        path.display()
    );
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .expect("running the next-version agent");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.trim().ends_with(&next_version()),
        "{} reports {printed:?}, not {}: rebuild it with `cargo xtask next-daemon`",
        path.display(),
        next_version()
    );
    path
}
