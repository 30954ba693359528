//! `cargo xtask <task>`: the project's own tasks, in Rust so they run wherever cargo does.
//!
//! - `build-examples`: builds every wasm handler (examples and test fixtures) for wasm32-wasip1
//!   into `target/wasm/wasm32-wasip1/handler/`, installing the target with rustup if missing.
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
                 build-examples  build the wasm handlers into target/wasm/{WASM_TARGET}/handler\n  \
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
        "--profile",
        "handler",
        "--target",
        WASM_TARGET,
        "--target-dir",
        "target/wasm",
    ]);
    for p in WASM_PACKAGES {
        cmd.args(["-p", p]);
    }
    run(cmd)?;
    let out = root().join("target/wasm").join(WASM_TARGET).join("handler");
    // The non-Rust example: WebAssembly text, assembled here.
    let wat_src = root().join("examples/wat-hello/hello.wat");
    let wasm =
        wat::parse_file(&wat_src).with_context(|| format!("assembling {}", wat_src.display()))?;
    std::fs::write(out.join("wat-hello.wasm"), wasm).context("writing wat-hello.wasm")?;
    Ok(out)
}

/// Runs a command, echoing it first as `$ name args…` (paths shortened for reading).
fn step(cmd: &mut Command, shown: &str) -> Result<std::process::Output> {
    println!("\n$ {shown}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    Ok(out)
}

/// The demo: a publisher key, signed handlers, verification, runs in the sandbox, a refusal.
fn demo(_rest: &[String]) -> Result<()> {
    let wasm = build_examples()?;
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "bridge-host",
        "-p",
        "bridge-platform",
        "--bins",
    ]);
    run(build)?;
    let bin = root().join("target/debug");
    let (daemon, ctl) = (bin.join("bridge-daemon"), bin.join("bridgectl"));
    let work = std::env::temp_dir().join(format!("bridge-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("logs"))?;
    std::fs::write(
        work.join("logs/app.log"),
        "2026-11-25T06:00:01 INFO service started\n\
         2026-11-25T06:00:02 WARN disk 81% full\n\
         2026-11-25T06:00:03 ERROR upstream 10.0.0.7 timed out after 3000 ms\n\
         2026-11-25T06:00:04 ERROR upstream 10.0.0.9 timed out after 3001 ms\n\
         2026-11-25T06:00:05 INFO request served\n",
    )?;
    let key = work.join("publisher.key");
    let pubkey = work.join("publisher.key.pub");
    let out = step(
        Command::new(&ctl).arg("keygen").arg("--out").arg(&key),
        "bridgectl keygen --out publisher.key",
    )?;
    ensure_ok(&out, "keygen")?;
    println!("{}", serde_pretty(&String::from_utf8_lossy(&out.stdout)));

    // Sign each handler, declaring the directory it needs.
    let handlers: [(&str, &[&str]); 4] = [
        ("hello", &[]),
        ("wat-hello", &[]),
        ("checksum", &["--dir", "/data"]),
        ("logscan", &["--dir", "/logs"]),
    ];
    for (name, caps) in handlers {
        let signed = work.join(format!("{name}.signed.wasm"));
        let mut cmd = Command::new(&ctl);
        cmd.arg("sign")
            .arg(wasm.join(format!("{name}.wasm")))
            .arg("--key")
            .arg(&key);
        cmd.args(["--name", name, "--version", "1.0.0"])
            .args(caps)
            .arg("-o")
            .arg(&signed);
        let shown = format!(
            "bridgectl sign {name}.wasm --key publisher.key --name {name} --version 1.0.0 {}",
            caps.join(" ")
        );
        ensure_ok(&step(&mut cmd, shown.trim_end())?, "sign")?;
    }
    let mut verify = Command::new(&ctl);
    verify
        .arg("verify")
        .arg(work.join("hello.signed.wasm"))
        .arg("--trusted-key")
        .arg(format!("@{}", pubkey.display()));
    let out = step(
        &mut verify,
        "bridgectl verify hello.signed.wasm --trusted-key @publisher.key.pub",
    )?;
    ensure_ok(&out, "verify")?;
    println!("{}", serde_pretty(&String::from_utf8_lossy(&out.stdout)));

    let logs = work.join("logs");
    let runs: [(&str, Vec<String>); 4] = [
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
                format!("{}:/data", logs.display()),
                "--input".into(),
                r#"{"dir":"/data"}"#.into(),
            ],
        ),
        (
            "logscan",
            vec![
                "--dir".into(),
                format!("{}:/logs", logs.display()),
                "--input".into(),
                r#"{"path":"/logs/app.log","top":3}"#.into(),
            ],
        ),
    ];
    for (name, args) in runs {
        let mut cmd = Command::new(&daemon);
        cmd.arg("call")
            .arg(work.join(format!("{name}.signed.wasm")))
            .arg("--trusted-key")
            .arg(&pubkey);
        cmd.args(&args).arg("--cache-dir").arg(work.join("cache"));
        let shown = format!(
            "bridge-daemon call {name}.signed.wasm --trusted-key publisher.key.pub {}",
            args.join(" ")
        );
        let out = step(&mut cmd, &shown)?;
        println!("{}", summary(&String::from_utf8_lossy(&out.stdout)));
        ensure_ok(&out, name)?;
    }

    // A tampered module is refused before anything of it is compiled.
    let mut tampered = std::fs::read(work.join("hello.signed.wasm"))?;
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    std::fs::write(work.join("tampered.wasm"), tampered)?;
    let mut cmd = Command::new(&daemon);
    cmd.arg("call")
        .arg(work.join("tampered.wasm"))
        .arg("--trusted-key")
        .arg(&pubkey)
        .arg("--no-cache");
    let out = step(
        &mut cmd,
        "bridge-daemon call tampered.wasm --trusted-key publisher.key.pub   # one bit flipped",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", summary(&text));
    if !text.contains("\"bad_signature\"") {
        bail!("the tampered module was not refused as bad_signature");
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("\ndemo finished: 4 signed handlers ran in the sandbox (status ok), the tampered one was rejected");
    Ok(())
}

fn ensure_ok(out: &std::process::Output, what: &str) -> Result<()> {
    if !out.status.success() {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bail!("{what} failed ({})", out.status);
    }
    Ok(())
}

/// The fields of a run result a reader of the demo cares about (the full JSON has more).
fn summary(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
        return line.trim().to_string();
    };
    let mut keep = serde_json::Map::new();
    for key in [
        "status",
        "reason",
        "error",
        "output",
        "fuel_consumed",
        "duration_ms",
    ] {
        if let Some(value) = v.get(key).filter(|x| !x.is_null()) {
            keep.insert(key.to_string(), value.clone());
        }
    }
    serde_json::to_string_pretty(&keep).unwrap_or_default()
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
