//! `cargo xtask <task>`: the project's own tasks, in Rust so they run wherever cargo does.
//!
//! - `build-examples`: builds every wasm handler (examples and test fixtures) for wasm32-wasip1
//!   into `target/wasm/wasm32-wasip1/handler/`, installing the target with rustup if missing.
//! - `demo` (also `cargo demo`): the end-to-end demo from the README.
//! - `test`: the whole test suite (what CI runs after fmt and clippy): the Rust workspace's,
//!   then the Node SDK's (`sdk/node`, against the binaries just built).
//! - `test-node`: the Node SDK's suite alone.
//! - `bench`: the benchmarks, then a summary of each headline figure beside its target (and
//!   a baseline build's, with `--baseline DIR`).
//! - `size`: the agent binary's size, stripped, gzipped and by ELF section.
//! - `node-demo`: the Node quick start (`examples/node-platform`, a real agent).
//! - `bench-node`: the Node SDK's platform against `bridgectl serve`, side by side.
//! - `next-daemon`: the agent rebuilt as its next version, for the self-update tests.
//! - `deps`: the `use` edges between each crate's modules; fails on an import cycle.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bridge_testkit::bins::WASM_TARGET;
use bridge_testkit::{Control, Proc};

mod bench;
mod deps;
mod node;
mod size;

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
        "test-node" => test_node(),
        "bench-node" => bench_node(),
        "node-demo" => node_demo(),
        "bench" => bench(rest),
        "size" => size::command(&root(), rest, build_release_bins),
        "deps" => deps::check(&rest.first().map_or_else(root, PathBuf::from)),
        "sign-examples" => sign_examples(rest),
        "schema" => schema(),
        "next-daemon" => next_daemon().map(|_| ()),
        "help" | "--help" | "-h" => {
            println!(
                "cargo xtask <task>\n\n\
                 tasks:\n  \
                 build-examples  build the wasm handlers into target/wasm/{WASM_TARGET}/handler\n  \
                 demo            run the end-to-end demo (same as `cargo demo`)\n  \
                 test            run the whole test suite (Rust, then the Node SDK's)\n  \
                 test-node       run the Node SDK's tests alone (against target/debug's binaries)\n  \
                 bench           [--baseline DIR] [--only NAMES]: the benchmarks, then each figure beside its target\n  \
                 bench --summary the summary of the figures recorded so far (benchmarks run one by one)\n  \
                 size            [--bin-dir DIR]: the agent binary's size, stripped, gzipped and by section\n  \
                 node-demo       the Node quick start: examples/node-platform with a real agent\n  \
                 bench-node      the Node SDK's platform against bridgectl serve (round trip, tasks/s)\n  \
                 deps [ROOT]     list the modules' use edges; fail on an import cycle\n  \
                 sign-examples   --key KEY [--out DIR]: sign every example with the capabilities it needs\n  \
                 schema          write the protocol's JSON Schema files (protocol/schema/*.schema.json)\n  \
                 next-daemon     build target/debug/bridge-daemon-next: the agent as its next version (update tests)"
            );
            Ok(())
        }
        other => bail!("unknown task {other:?}; try `cargo xtask help`"),
    }
}

/// Writes the JSON Schema of both message directions, generated from the protocol types.
fn schema() -> Result<()> {
    for (file, text) in bridge_protocol::schema::files() {
        let path = root().join(file);
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` in the workspace root, in a shell's environment ([`bridge_testkit::bins::cargo`]).
fn cargo() -> Command {
    bridge_testkit::bins::cargo()
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

/// Builds every wasm handler (the test kit's [`bridge_testkit::bins::build_wasm`], which the
/// tests use too); returns the directory holding the `.wasm` files.
pub fn build_examples() -> Result<PathBuf> {
    ensure_wasm_target()?;
    bridge_testkit::bins::build_wasm().map_err(anyhow::Error::msg)
}

/// Runs a command, echoing it first as `$ name args…` (paths shortened for reading).
fn step(cmd: &mut Command, shown: &str) -> Result<std::process::Output> {
    println!("\n$ {shown}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    Ok(out)
}

/// Stops a service of the demo (SIGTERM, at most 10 s) and says so.
fn stop(name: &str, mut service: Proc) {
    let status = service.terminate(std::time::Duration::from_secs(10));
    println!("{name} stopped ({status})");
}

/// The demo: a development platform and an agent on 127.0.0.1, a publisher key, signed handlers
/// pushed over the link and run in the sandbox, and a tampered module refused.
fn demo(_rest: &[String]) -> Result<()> {
    use std::io::BufRead;
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
    std::fs::create_dir_all(&work)?;

    // 1. A publisher key, and signed handlers.
    let key = work.join("publisher.key");
    let pubkey = work.join("publisher.key.pub");
    let out = step(
        Command::new(&ctl).arg("keygen").arg("--out").arg(&key),
        "bridgectl keygen --out publisher.key",
    )?;
    ensure_ok(&out, "keygen")?;
    println!("{}", serde_pretty(&String::from_utf8_lossy(&out.stdout)));
    for (name, caps) in &EXAMPLES[..2] {
        let shown = format!(
            "bridgectl sign {name}.wasm --key publisher.key --name {name} -o {name}.signed.wasm {}",
            caps.join(" ")
        );
        println!("\n$ {}", shown.trim_end());
        sign_example(&ctl, &wasm, &key, name, caps, &work)?;
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

    // 2. The development platform.
    println!("\n$ bridgectl serve --listen 127.0.0.1:0 --state platform/");
    let mut serve = Command::new(&ctl);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(work.join("platform"));
    serve
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut platform = Proc::adopt(
        "platform",
        serve.spawn().context("starting bridgectl serve")?,
    );
    let mut first = String::new();
    std::io::BufReader::new(platform.child().stdout.take().expect("piped"))
        .read_line(&mut first)?;
    let info: serde_json::Value =
        serde_json::from_str(first.trim()).context("reading serve's first line")?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    let field = |k: &str| {
        info[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("serve printed no {k}"))
    };
    let (url, pin, token) = (field("url")?, field("server_pin")?, field("token")?);
    // The control socket is `control` in serve's state directory: bridgectl finds it there.
    let socket = field("control")?;
    let state = work.join("platform");
    if Path::new(&socket) != state.canonicalize()?.join("control.sock") {
        bail!("serve's control socket {socket} is not in its state directory");
    }
    let control = state.to_str().context("a non-UTF-8 temporary directory")?;

    // 3. The agent, enrolling with the token and trusting the publisher.
    println!("\n$ bridge-daemon run --server {url} --server-pin {pin} --token {token} --state agent/ --trusted-key publisher.key.pub --config agent.toml");
    println!("  (agent.toml allowlists one shell command: kernel = /bin/uname -sr)");
    let mut agent_cmd = Command::new(&daemon);
    agent_cmd
        .args([
            "run",
            "--server",
            &url,
            "--server-pin",
            &pin,
            "--token",
            &token,
            "--state",
        ])
        .arg(work.join("agent"));
    // One allowlisted shell command, the fallback for what no handler does.
    std::fs::write(
        work.join("agent.toml"),
        "[[shell.rules]]\nname = \"kernel\"\nprogram = \"/bin/uname\"\nargs = [\"-sr\"]\n",
    )?;
    agent_cmd
        .arg("--trusted-key")
        .arg(&pubkey)
        .arg("--config")
        .arg(work.join("agent.toml"))
        .stdout(std::process::Stdio::null());
    agent_cmd.stderr(std::fs::File::create(work.join("agent.log"))?);
    let agent = Proc::adopt(
        "agent",
        agent_cmd.spawn().context("starting bridge-daemon run")?,
    );
    let id = Control::new(&socket).wait_any_connected(std::time::Duration::from_secs(30));
    println!("agent {id} connected and enrolled");

    // 4. Tasks pushed over the link.
    let runs = [
        ("hello.signed.wasm", r#"{"name":"bridge"}"#),
        ("wat-hello.signed.wasm", r#"{"from":"a WAT module"}"#),
        (
            "hello.signed.wasm",
            r#"{"name":"again (warm: cached, verified once)"}"#,
        ),
    ];
    for (module, input) in runs {
        let mut cmd = Command::new(&ctl);
        cmd.args(["--state", control, "run", "--agent", &id, "--module"])
            .arg(work.join(module));
        cmd.args(["--input", input]);
        let out = step(
            &mut cmd,
            &format!(
                "bridgectl --state platform/ run --agent {} --module {module} --input '{input}'",
                &id[..12]
            ),
        )?;
        println!("{}", summary(&String::from_utf8_lossy(&out.stdout)));
        ensure_ok(&out, module)?;
    }

    // 5. Commands: an installed handler, the shell fallback, a repeated task id, an unknown
    //    command.
    let short = &id[..12];
    let mut cmd = Command::new(&ctl);
    cmd.args([
        "--state",
        control,
        "install-handler",
        "--agent",
        &id,
        "--name",
        "hello",
    ])
    .arg(work.join("hello.signed.wasm"));
    let out = step(
        &mut cmd,
        &format!("bridgectl --state platform/ install-handler --agent {short} --name hello hello.signed.wasm"),
    )?;
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    ensure_ok(&out, "install-handler")?;
    let commands: [(&str, &[&str], bool); 4] = [
        (
            "hello",
            &["--input", r#"{"name":"a command"}"#, "--task-id", "demo-1"],
            true,
        ),
        (
            "hello",
            &["--input", r#"{"name":"a command"}"#, "--task-id", "demo-1"],
            true,
        ),
        ("kernel", &[], true),
        ("nothing-here", &[], false),
    ];
    for (i, (command, extra, ok)) in commands.into_iter().enumerate() {
        let mut cmd = Command::new(&ctl);
        cmd.args([
            "--state",
            control,
            "run",
            "--agent",
            &id,
            "--command",
            command,
        ])
        .args(extra);
        let shown_extra: Vec<String> = extra
            .iter()
            .map(|a| {
                if a.starts_with('{') {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        let note = match i {
            1 => "   # the same task id: the stored result, not a second run",
            2 => "   # no handler of that name: the allowlisted shell rule",
            3 => "   # neither: refused",
            _ => "",
        };
        let out = step(
            &mut cmd,
            &format!(
                "bridgectl --state platform/ run --agent {short} --command {command} {}{note}",
                shown_extra.join(" ")
            ),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{}", summary(&text));
        if ok {
            ensure_ok(&out, command)?;
        } else if !text.contains("\"unknown_command\"") {
            bail!("an unknown command was not refused as unknown_command");
        }
    }

    // 6. A tampered module is refused by the agent before anything of it is compiled.
    let mut tampered = std::fs::read(work.join("hello.signed.wasm"))?;
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    std::fs::write(work.join("tampered.wasm"), tampered)?;
    let mut cmd = Command::new(&ctl);
    cmd.args(["--state", control, "run", "--agent", &id, "--module"])
        .arg(work.join("tampered.wasm"));
    let out = step(
        &mut cmd,
        &format!(
            "bridgectl --state platform/ run --agent {} --module tampered.wasm   # one bit flipped",
            &id[..12]
        ),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", summary(&text));
    if !text.contains("\"bad_signature\"") {
        bail!("the tampered module was not refused as bad_signature");
    }

    println!();
    stop("agent", agent);
    stop("platform", platform);
    let _ = std::fs::remove_dir_all(&work);
    println!("\ndemo finished: platform and agent over mutual TLS, signed handlers ran, an installed handler and a shell rule ran as commands, a repeated task id was not run twice, the tampered module was rejected");
    Ok(())
}

/// The examples and the capabilities each declares in its signature.
const EXAMPLES: [(&str, &[&str]); 4] = [
    ("hello", &[]),
    ("wat-hello", &[]),
    ("checksum", &["--dir", "/data"]),
    ("logscan", &["--dir", "/logs"]),
];

/// `cargo xtask sign-examples --key KEY [--out DIR]`: builds the examples and signs each one
/// (`DIR/<name>.signed.wasm`, default `target/wasm/signed`) with `bridgectl sign`.
fn sign_examples(rest: &[String]) -> Result<()> {
    let mut key = None;
    let mut out = root().join("target/wasm/signed");
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--key" => key = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from).context("--out needs a directory")?,
            other => bail!("unknown argument {other:?}; usage: cargo xtask sign-examples --key KEY [--out DIR]"),
        }
    }
    let key = key.context("usage: cargo xtask sign-examples --key KEY [--out DIR] (make a key with `bridgectl keygen --out KEY`)")?;
    let wasm = build_examples()?;
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "bridge-platform",
        "--bin",
        "bridgectl",
    ]);
    run(build)?;
    std::fs::create_dir_all(&out)?;
    for (name, caps) in EXAMPLES {
        let signed = sign_example(
            &root().join("target/debug/bridgectl"),
            &wasm,
            &key,
            name,
            caps,
            &out,
        )?;
        println!("{}", signed.display());
    }
    Ok(())
}

/// `bridgectl sign` for one example, declaring `caps`; writes `OUT/<name>.signed.wasm`.
fn sign_example(
    ctl: &Path,
    wasm: &Path,
    key: &Path,
    name: &str,
    caps: &[&str],
    out: &Path,
) -> Result<PathBuf> {
    let signed = out.join(format!("{name}.signed.wasm"));
    let mut cmd = Command::new(ctl);
    cmd.arg("sign")
        .arg(wasm.join(format!("{name}.wasm")))
        .arg("--key")
        .arg(key);
    cmd.args(["--name", name, "--version", env!("CARGO_PKG_VERSION")])
        .args(caps);
    cmd.arg("-o")
        .arg(&signed)
        .stdout(std::process::Stdio::null());
    let status = cmd.status().context("running bridgectl sign")?;
    if !status.success() {
        bail!("signing {name} failed ({status})");
    }
    Ok(signed)
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
    // Output that is not JSON (a shell command's): show the text.
    if v.get("output").is_some_and(|o| o.is_null()) {
        if let Some(text) = v["stdout"].as_str().filter(|t| !t.is_empty()) {
            keep.insert("stdout".into(), text.into());
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
    deps::check(&root())?;
    // Node first: a machine without it fails here, not after twenty minutes of Rust tests.
    node::check_node()?;
    node::install(&root())?;
    let wasm = build_examples()?;
    let agents = next_daemon()?;
    // One invocation builds everything first, `bridgectl` included (the platform's own tests
    // need it), before any test runs; the host's link tests then drive it.
    let mut build = cargo();
    build.args(["test", "--workspace", "--no-run"]);
    let tests = host_library(&mut build)?;
    // The tests' build reuses the agent's own, wasmtime and Cranelift included. A
    // dev-dependency that turns on other features of a crate the agent uses would make it
    // compile that crate, and everything above it, a second time (minutes on two cores).
    if tests != agents {
        bail!(
            "the tests' build made {} where the agent's own build made {}: a dev-dependency turns on other features of a crate the agent uses, so the agent's library and what it depends on are compiled twice. Compare `cargo tree -p bridge-host -e normal,build -f '{{p}} {{f}}'` with `cargo tree --workspace -f '{{p}} {{f}}'`, and ask for the same features in host/Cargo.toml (as it does for memchr)",
            tests.display(),
            agents.display()
        );
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(rest);
    run(cmd)?;
    // The Node SDK's suite drives the binaries that run built.
    node::test(&root(), &wasm)
}

/// Builds `target/debug/bridge-daemon-next`: the agent with `BRIDGE_VERSION_OVERRIDE` set to
/// the next version, which the self-update tests push to an agent. Only the binary crate
/// recompiles (the override is read in `host/src/main.rs`), twice: with the variable, then
/// without it, so that `target/debug/bridge-daemon` is the ordinary build again. Returns the
/// agent's library as that build made it.
fn next_daemon() -> Result<PathBuf> {
    let version = bridge_testkit::bins::next_version();
    let debug = root().join("target/debug");
    let next = debug.join(bridge_testkit::bins::NEXT_DAEMON);
    let build = |over: Option<&str>| -> Result<PathBuf> {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "bridge-host",
            "--bin",
            "bridge-daemon",
        ]);
        match over {
            Some(v) => cmd.env("BRIDGE_VERSION_OVERRIDE", v),
            None => cmd.env_remove("BRIDGE_VERSION_OVERRIDE"),
        };
        host_library(&mut cmd)
    };
    build(Some(&version))?;
    let tmp = next.with_extension("tmp");
    std::fs::copy(debug.join("bridge-daemon"), &tmp)
        .with_context(|| format!("copying the agent to {}", tmp.display()))?;
    std::fs::rename(&tmp, &next)?;
    let library = build(None)?;
    println!("{} (version {version})", next.display());
    Ok(library)
}

/// Runs the cargo build `cmd` and returns the path of the agent's library (`bridge_host`, as
/// the binaries and the tests link it) that it made, from its JSON messages.
fn host_library(cmd: &mut Command) -> Result<PathBuf> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed with {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "bridge_host"
                && m["profile"]["test"] == false
        })
        .find_map(|m| {
            m["filenames"]
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".rlib"))
                .map(PathBuf::from)
        })
        .with_context(|| format!("{shown} reported no library of bridge-host"))
}

/// The platform benchmark: the Node SDK against `bridgectl serve`, release builds.
fn bench_node() -> Result<()> {
    let wasm = build_examples()?;
    build_release_bins()?;
    node::bench(&root(), &wasm)
}

/// The Node quick start: the example platform, an agent, a JS-signed handler, a web request.
fn node_demo() -> Result<()> {
    let wasm = build_examples()?;
    let mut bins = cargo();
    bins.args(["build", "--quiet", "-p", "bridge-host", "--bins"]);
    run(bins)?;
    node::demo(&root(), &wasm)
}

/// The Node SDK's suite alone (the binaries must be built: `cargo build --bins`).
fn test_node() -> Result<()> {
    let wasm = build_examples()?;
    node::test(&root(), &wasm)
}

/// Release builds of `bridge-daemon` and `bridgectl`, which the benchmarks drive.
fn build_release_bins() -> Result<()> {
    let mut bins = cargo();
    bins.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "bridge-host",
        "-p",
        "bridge-platform",
        "--bins",
    ]);
    run(bins)
}

/// Every benchmark and the summary of its figures against the targets (see `bench.rs`).
fn bench(rest: &[String]) -> Result<()> {
    if bench::summary_only(rest)? {
        return bench::summarize(&root());
    }
    build_examples()?;
    // The link, throughput and cold-start benchmarks drive release builds of both binaries.
    build_release_bins()?;
    bench::run(&root(), rest, size::report)
}
