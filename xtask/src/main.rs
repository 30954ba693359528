//! `cargo xtask <task>`: the project's own tasks, in Rust so they run wherever cargo does.
//!
//! - `build-examples`: builds every wasm handler (examples and test fixtures) for wasm32-wasip1
//!   into `target/wasm/wasm32-wasip1/release/`, installing the target with rustup if missing.
//! - `demo` (also `cargo demo`): the end-to-end demo from the README.
//! - `test`: the whole test suite (what CI runs after fmt and clippy).
//! - `bench`: the benchmarks, printing medians.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The wasm crates, built together for wasm32-wasip1.
const WASM_PACKAGES: &[&str] = &["hello", "checksum", "logscan", "hostile"];
const WASM_TARGET: &str = "wasm32-wasip1";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    match task {
        "build-examples" => build_examples().map(|dir| println!("{}", dir.display())),
        "demo" => demo(rest),
        "test" => test(rest),
        "bench" => bench(rest),
        "help" | "--help" | "-h" => {
            println!(
                "cargo xtask <task>\n\n\
                 tasks:\n  \
                 build-examples  build the wasm handlers into target/wasm/{WASM_TARGET}/release\n  \
                 demo            run the end-to-end demo (same as `cargo demo`)\n  \
                 test            run the whole test suite\n  \
                 bench           run the benchmarks and print medians"
            );
            Ok(())
        }
        other => bail!("unknown task {other:?}; try `cargo xtask help`"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Installs the wasm32-wasip1 standard library with rustup when it is missing.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (bridge needs a rustup-managed toolchain for the wasm target)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: installing the {WASM_TARGET} target with rustup");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", WASM_TARGET]);
    run(cmd)
}

/// Builds every wasm handler; returns the directory holding the `.wasm` files.
pub fn build_examples() -> Result<PathBuf> {
    ensure_wasm_target()?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "--target",
        WASM_TARGET,
        "--target-dir",
        "target/wasm",
    ]);
    for p in WASM_PACKAGES {
        cmd.args(["-p", p]);
    }
    run(cmd)?;
    let out = root().join("target/wasm").join(WASM_TARGET).join("release");
    // The non-Rust example: WebAssembly text, assembled here.
    let wat_src = root().join("examples/wat-hello/hello.wat");
    let wasm =
        wat::parse_file(&wat_src).with_context(|| format!("assembling {}", wat_src.display()))?;
    std::fs::write(out.join("wat-hello.wasm"), wasm).context("writing wat-hello.wasm")?;
    Ok(out)
}

fn demo(_rest: &[String]) -> Result<()> {
    let wasm = build_examples()?;
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "bridge-host",
        "--bin",
        "bridge-daemon",
    ]);
    run(build)?;
    let daemon = root().join("target/debug/bridge-daemon");
    let work = std::env::temp_dir().join(format!("bridge-demo-{}", std::process::id()));
    std::fs::create_dir_all(work.join("logs"))?;
    std::fs::write(
        work.join("logs/app.log"),
        "2026-11-25T06:00:01 INFO service started\n\
         2026-11-25T06:00:02 WARN disk 81% full\n\
         2026-11-25T06:00:03 ERROR upstream 10.0.0.7 timed out after 3000 ms\n\
         2026-11-25T06:00:04 ERROR upstream 10.0.0.9 timed out after 3001 ms\n\
         2026-11-25T06:00:05 INFO request served\n",
    )?;
    let steps: Vec<(&str, Vec<String>)> = vec![
        (
            "hello",
            vec!["--input".into(), r#"{"name":"bridge"}"#.into()],
        ),
        (
            "wat-hello",
            vec!["--input".into(), r#"{"from":"a WAT module"}"#.into()],
        ),
        (
            "checksum",
            vec![
                "--dir".into(),
                format!("{}:/data", work.join("logs").display()),
                "--input".into(),
                r#"{"dir":"/data"}"#.into(),
            ],
        ),
        (
            "logscan",
            vec![
                "--dir".into(),
                format!("{}:/logs", work.join("logs").display()),
                "--input".into(),
                r#"{"path":"/logs/app.log","top":3}"#.into(),
            ],
        ),
    ];
    for (name, args) in steps {
        let module = wasm.join(format!("{name}.wasm"));
        println!("\n$ bridge-daemon call {name}.wasm {}", args.join(" "));
        let mut cmd = Command::new(&daemon);
        cmd.arg("call")
            .arg(&module)
            .arg("--allow-unsigned")
            .args(&args);
        cmd.arg("--cache-dir").arg(work.join("cache"));
        let out = cmd
            .output()
            .with_context(|| format!("running {}", daemon.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let pretty = serde_pretty(&text);
        println!("{pretty}");
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            bail!("the {name} handler did not succeed ({})", out.status);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("\ndemo finished: every handler ran in the sandbox and returned status ok");
    Ok(())
}

/// The result JSON, pretty-printed (or as it came, if it is not JSON).
fn serde_pretty(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line.trim())
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| line.trim().to_string())
}

fn test(rest: &[String]) -> Result<()> {
    build_examples()?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(rest);
    run(cmd)
}

fn bench(rest: &[String]) -> Result<()> {
    build_examples()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "bridge-host"]).args(rest);
    run(cmd)
}
