//! The sandbox end to end: real modules compiled from `examples/` and `tests/fixtures`, run by the
//! real `bridge-daemon call`. Every ending, truncation, clamping, the read-only grant, bad input.

use std::time::{Duration, Instant};

use bridge_testkit::bins::{wasm, wat_fixture};
use bridge_testkit::call::call;

const UNSIGNED: &str = "--allow-unsigned";

#[test]
fn hello_greets_its_input() {
    let c = call(
        &wasm("hello"),
        &[UNSIGNED, "--input", r#"{"name":"bridge"}"#],
    );
    assert_eq!(c.code, 0, "{}", c.stderr);
    let r = &c.result;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["output"]["greeting"], "Hello, bridge!");
    assert!(r["fuel_consumed"].as_u64().unwrap() > 0);
    assert!(r["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(r["limits"]["fuel"], 1_000_000_000u64);
    assert_eq!(r["limits"]["clamped"], serde_json::json!([]));
    assert_eq!(r["truncated"]["stdout"], false);
    assert!(r["error"].is_null());
    for key in [
        "status",
        "exit_code",
        "output",
        "stdout",
        "stderr",
        "truncated",
        "fuel_consumed",
        "duration_ms",
        "limits",
        "error",
    ] {
        assert!(r.get(key).is_some(), "result lacks `{key}`: {r}");
    }
}

#[test]
fn a_non_rust_handler_works_through_the_same_abi() {
    let c = call(&wasm("wat-hello"), &[UNSIGNED, "--input", r#"{"x":1}"#]);
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(c.result["output"]["greeting"], "Hello from WAT!");
    assert_eq!(c.result["output"]["input_bytes"], 7);
}

#[test]
fn a_non_zero_exit_is_error_with_its_code() {
    let c = call(&wasm("exitcode"), &[UNSIGNED, "--input", r#"{"code":3}"#]);
    assert_eq!(c.code, 1);
    assert_eq!(c.status(), "error");
    assert_eq!(c.result["exit_code"], 3);
    assert_eq!(c.result["output"]["exiting"], 3);
    assert!(c.result["error"].as_str().unwrap().contains("code 3"));

    let dir = tempfile::tempdir().unwrap();
    let c = call(&wat_fixture("exit7", dir.path()), &[UNSIGNED]);
    assert_eq!(
        (c.status(), c.result["exit_code"].as_i64()),
        ("error", Some(7))
    );
}

/// WASI ends exit codes at 125; a higher one is a trap, and its error says so in one sentence
/// plus the backtrace (no dump of the store the engine attaches to every trap).
#[test]
fn an_exit_code_above_125_is_a_trap_naming_it() {
    let c = call(&wasm("exitcode"), &[UNSIGNED, "--input", r#"{"code":200}"#]);
    assert_eq!(c.status(), "trap", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(
        err.ends_with("exit with invalid exit status outside of [0..126)"),
        "{err}"
    );
    assert!(!err.contains("coredump"), "{err}");
}

#[test]
fn sdk_errors_are_structured() {
    // hello's input must be an object with an optional string `name`.
    let c = call(&wasm("hello"), &[UNSIGNED, "--input", r#"{"name":42}"#]);
    assert_eq!(c.status(), "error");
    assert_eq!(c.result["exit_code"], 2);
    assert_eq!(c.result["output"]["error"]["kind"], "bad_input");
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let c = call(&wasm("spin"), &[UNSIGNED, "--fuel", "5000000"]);
    assert_eq!(c.status(), "fuel_exhausted", "{}", c.result);
    assert_eq!(c.result["fuel_consumed"], 5_000_000);
    assert!(c.result["exit_code"].is_null());
}

#[test]
fn an_endless_loop_times_out_by_the_wall_clock() {
    let started = Instant::now();
    let c = call(
        &wasm("spin"),
        &[UNSIGNED, "--fuel", "50000000000", "--timeout-ms", "300"],
    );
    assert_eq!(c.status(), "timeout", "{}", c.result);
    let ms = c.result["duration_ms"].as_f64().unwrap();
    assert!((300.0..3000.0).contains(&ms), "ran {ms} ms");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_handler_blocked_in_a_host_call_still_times_out() {
    let c = call(
        &wasm("sleepy"),
        &[
            UNSIGNED,
            "--input",
            r#"{"ms":60000}"#,
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(c.status(), "timeout", "{}", c.result);
    assert!(c.result["duration_ms"].as_f64().unwrap() < 5000.0);
}

#[test]
fn memory_growth_stops_at_the_limit() {
    let c = call(&wasm("grow"), &[UNSIGNED, "--memory-mib", "16"]);
    assert_eq!(c.status(), "memory_limit", "{}", c.result);
    assert_eq!(c.result["limits"]["memory_bytes"], 16 << 20);
    assert!(c.result["memory_peak_bytes"].as_u64().unwrap() <= 16 << 20);
    assert!(c.result["error"].as_str().unwrap().contains("limit"));
}

#[test]
fn an_initial_memory_above_the_limit_is_refused_at_instantiation() {
    let dir = tempfile::tempdir().unwrap();
    let c = call(&wat_fixture("huge_memory", dir.path()), &[UNSIGNED]);
    assert_eq!(c.status(), "memory_limit", "{}", c.result);
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let c = call(&wasm("recurse"), &[UNSIGNED]);
    assert_eq!(c.status(), "stack_overflow", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(err.contains("wasm call stack"), "{err}");
}

/// Rust's shadow stack in linear memory runs out before the engine's stack: its pointer goes
/// below address 0 (the stack is placed first) and the fault is reported as what it is.
#[test]
fn a_shadow_stack_overflow_is_a_stack_overflow_naming_the_cause() {
    let c = call(&wasm("shadowstack"), &[UNSIGNED]);
    assert_eq!(c.status(), "stack_overflow", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(err.contains("shadow stack"), "{err}");
    assert!(err.contains("below address 0"), "{err}");
    assert!(err.contains("the 1048576 bytes at the bottom"), "{err}");

    let c = call(
        &wasm("shadowstack"),
        &[UNSIGNED, "--input", r#"{"depth":100}"#],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(c.result["output"]["depth"], 100);
}

/// The same holds for any module laid out the way wasm-ld lays out C and Rust; an access that
/// wraps the same way in a module without a shadow stack stays a plain trap.
#[test]
fn a_stack_pointer_wrapping_below_zero_is_a_stack_overflow_in_any_module() {
    let dir = tempfile::tempdir().unwrap();
    let c = call(&wat_fixture("stack_wrap", dir.path()), &[UNSIGNED]);
    assert_eq!(c.status(), "stack_overflow", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(err.contains("wasm address 0xfffff000"), "{err}");
    assert!(err.contains("the 65536 bytes at the bottom"), "{err}");

    let c = call(&wat_fixture("out_of_bounds", dir.path()), &[UNSIGNED]);
    assert_eq!(c.status(), "trap", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(err.contains("out of bounds memory access"), "{err}");
}

#[test]
fn a_panic_is_a_trap_with_its_message() {
    let c = call(&wasm("trap"), &[UNSIGNED]);
    assert_eq!(c.status(), "trap", "{}", c.result);
    let err = c.result["error"].as_str().unwrap();
    assert!(err.contains("unreachable"), "{err}");
    assert!(c.result["stderr"]
        .as_str()
        .unwrap()
        .contains("deliberate trap"));
}

#[test]
fn output_over_the_cap_is_truncated_and_counted() {
    let bytes = 50u64 << 20;
    let input = format!(r#"{{"bytes":{bytes}}}"#);
    let c = call(
        &wasm("flood"),
        &[UNSIGNED, "--input", &input, "--output-bytes", "1000"],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    assert_eq!(c.result["truncated"]["stdout"], true);
    assert_eq!(c.result["truncated"]["stdout_total_bytes"], bytes);
    // The first and last 500 bytes, with a marker saying how much is missing in between.
    let stdout = c.result["stdout"].as_str().unwrap();
    let omitted = bytes - 1000;
    assert_eq!(
        stdout,
        format!(
            "{}\n…[{omitted} bytes omitted]…\n{}",
            "x".repeat(500),
            "x".repeat(500)
        )
    );
    assert!(
        c.result["output"].is_null(),
        "truncated output is not parsed"
    );

    let c = call(
        &wasm("stderrflood"),
        &[
            UNSIGNED,
            "--input",
            r#"{"bytes":100000}"#,
            "--output-bytes",
            "100",
        ],
    );
    assert_eq!(c.status(), "ok");
    assert_eq!(c.result["truncated"]["stderr"], true);
    assert_eq!(c.result["truncated"]["stderr_total_bytes"], 100000);
    assert_eq!(c.result["truncated"]["stdout"], false);
    assert_eq!(c.result["output"]["ok"], true);
}

#[test]
fn requests_above_local_maximums_are_clamped_and_reported() {
    let c = call(
        &wasm("hello"),
        &[
            UNSIGNED,
            "--fuel",
            "999999999999999999",
            "--timeout-ms",
            "99999999",
        ],
    );
    assert_eq!(c.status(), "ok");
    let limits = &c.result["limits"];
    assert_eq!(limits["fuel"], 50_000_000_000u64);
    assert_eq!(limits["timeout_ms"], 900_000);
    assert_eq!(limits["clamped"], serde_json::json!(["fuel", "timeout_ms"]));

    // The operator's config lowers the maximums; a request above them is clamped to them.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[sandbox.maximums]\nmemory_mib = 8\nfuel = 900000000\n[trust]\nallow_unsigned_override = true\n",
    )
    .unwrap();
    let c = call(
        &wasm("grow"),
        &[
            UNSIGNED,
            "--config",
            config.to_str().unwrap(),
            "--memory-mib",
            "64",
        ],
    );
    assert_eq!(c.status(), "memory_limit", "{}", c.result);
    assert_eq!(c.result["limits"]["memory_bytes"], 8 << 20);
    assert_eq!(
        c.result["limits"]["fuel"], 900_000_000,
        "the default is lowered to the maximum"
    );
    assert_eq!(
        c.result["limits"]["clamped"],
        serde_json::json!(["memory_bytes"])
    );
}

#[test]
fn only_granted_env_args_and_stdin_reach_the_guest() {
    std::env::set_var("BRIDGE_TEST_SECRET", "hunter2");
    let c = call(
        &wasm("envargs"),
        &[
            UNSIGNED,
            "--input",
            r#"{"k":"v"}"#,
            "--arg",
            "one",
            "--arg",
            "two words",
            "--env",
            "GREETING=hi",
        ],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    let out = &c.result["output"];
    assert_eq!(
        out["args"],
        serde_json::json!(["envargs", "one", "two words"])
    );
    assert_eq!(
        out["env"],
        serde_json::json!({"GREETING": "hi"}),
        "nothing of the agent's environment leaks"
    );
    assert_eq!(out["stdin"], r#"{"k":"v"}"#);
}

/// Probes that reach for something outside the granted directory.
const OUTSIDE_PROBES: [&str; 6] = [
    "read_parent",
    "read_etc_passwd",
    "read_root_outside",
    "read_symlink",
    "list_root",
    "list_parent",
];

fn escape_probe(writable: bool) -> (serde_json::Value, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("inside.txt"), "inside").unwrap();
    std::fs::write(tmp.path().join("outside.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside.txt"), data.join("link-out")).unwrap();
    let grant = format!(
        "{}:/data{}",
        data.display(),
        if writable { ":rw" } else { "" }
    );
    let c = call(
        &wasm("escape"),
        &[UNSIGNED, "--dir", &grant, "--input", r#"{"dir":"/data"}"#],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    (c.result["output"].clone(), tmp)
}

#[test]
fn a_granted_directory_is_read_only_and_nothing_outside_is_reachable() {
    let (out, tmp) = escape_probe(false);
    assert_eq!(out["read_inside"]["ok"], true, "{out}");
    assert_eq!(out["read_inside"]["content"], "inside");
    for probe in OUTSIDE_PROBES {
        assert_eq!(
            out[probe]["ok"], false,
            "{probe} escaped the sandbox: {out}"
        );
    }
    assert_eq!(out["list_dir"]["ok"], true);
    for probe in [
        "create_file",
        "write_inside",
        "append_inside",
        "create_dir",
        "remove_inside",
    ] {
        assert_eq!(
            out[probe]["ok"], false,
            "{probe} wrote to a read-only grant: {out}"
        );
    }
    let data = tmp.path().join("data");
    assert_eq!(
        std::fs::read_to_string(data.join("inside.txt")).unwrap(),
        "inside"
    );
    assert!(!data.join("new.txt").exists() && !data.join("sub").exists());
    assert!(!tmp.path().join("moved.txt").exists());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("outside.txt")).unwrap(),
        "outside"
    );
}

#[test]
fn a_writable_grant_allows_writes_inside_only() {
    let (out, tmp) = escape_probe(true);
    assert_eq!(out["create_file"]["ok"], true, "{out}");
    assert_eq!(out["create_dir"]["ok"], true, "{out}");
    assert!(tmp.path().join("data/new.txt").exists());
    for probe in OUTSIDE_PROBES {
        assert_eq!(
            out[probe]["ok"], false,
            "{probe} escaped the sandbox: {out}"
        );
    }
    assert_eq!(
        out["rename_out"]["ok"], false,
        "renamed a file out of the grant: {out}"
    );
    assert!(!tmp.path().join("moved.txt").exists());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("outside.txt")).unwrap(),
        "outside"
    );
}

#[test]
fn without_a_grant_there_is_no_filesystem() {
    let c = call(
        &wasm("checksum"),
        &[UNSIGNED, "--input", r#"{"dir":"/data"}"#],
    );
    assert_eq!(c.status(), "error", "{}", c.result);
    assert_eq!(c.result["output"]["error"]["kind"], "not_granted");
}

#[test]
fn bad_modules_are_invalid_module_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let hello = std::fs::read(wasm("hello")).unwrap();
    let cases = [
        (
            write("elf.wasm", b"\x7fELF\x02\x01\x01\x00 not wasm at all"),
            "magic",
        ),
        (write("empty.wasm", b""), "empty"),
        (
            write("truncated.wasm", &hello[..hello.len() / 2]),
            "past the end",
        ),
        (write("text.wasm", b"(module)"), "magic"),
        (
            wat_fixture("bad_import", dir.path()),
            "env::launch_missiles",
        ),
        (wat_fixture("no_start", dir.path()), "_start"),
    ];
    for (path, needle) in cases {
        let c = call(&path, &[UNSIGNED]);
        assert_eq!(c.code, 1, "{}: {}", path.display(), c.stderr);
        assert_eq!(
            c.status(),
            "invalid_module",
            "{}: {}",
            path.display(),
            c.result
        );
        let err = c.result["error"].as_str().unwrap();
        assert!(
            err.contains(needle),
            "{}: {err:?} lacks {needle:?}",
            path.display()
        );
    }
    // A huge module is refused from its size alone (the file is sparse: nothing is read).
    let huge = dir.path().join("huge.wasm");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(100 << 20).unwrap();
    let c = call(&huge, &[UNSIGNED]);
    assert_eq!(c.status(), "invalid_module");
    assert!(c.result["error"].as_str().unwrap().contains("up to"));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let c = call(&wasm("hello"), &[UNSIGNED, "--input", "{not json"]);
    assert_eq!(c.code, 2);
    assert!(c.result.is_null());
    assert_eq!(c.stderr.trim().lines().count(), 1, "{}", c.stderr);
    assert!(c.stderr.contains("not valid JSON"));

    let c = call(
        std::path::Path::new("/definitely/missing.wasm"),
        &[UNSIGNED],
    );
    assert_eq!(c.code, 2);
    assert!(c.stderr.contains("cannot read module"));

    let c = call(
        &wasm("hello"),
        &[UNSIGNED, "--dir", "/definitely/missing:/data"],
    );
    assert_eq!(c.code, 2);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[sandbox]\nmax_concurent_runs = 2\n").unwrap();
    let c = call(
        &wasm("hello"),
        &[UNSIGNED, "--config", config.to_str().unwrap()],
    );
    assert_eq!(c.code, 2);
    assert!(c.stderr.contains("max_concurent_runs"), "{}", c.stderr);
}

#[test]
fn examples_do_real_work_on_granted_directories() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("a.txt"), "abc").unwrap();
    std::fs::write(
        tmp.path().join("app.log"),
        "INFO start\nERROR disk 1 failed\nERROR disk 2 failed\nwarn slow\nnoise\n",
    )
    .unwrap();
    let grant = format!("{}:/data", tmp.path().display());
    let c = call(
        &wasm("checksum"),
        &[UNSIGNED, "--dir", &grant, "--input", r#"{"dir":"/data"}"#],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    let files = c.result["output"]["files"].as_array().unwrap();
    let a = files.iter().find(|f| f["path"] == "a.txt").unwrap();
    assert_eq!(
        a["sha256"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    let c = call(
        &wasm("logscan"),
        &[
            UNSIGNED,
            "--dir",
            &grant,
            "--input",
            r#"{"path":"/data/app.log","top":3}"#,
        ],
    );
    assert_eq!(c.status(), "ok", "{}", c.result);
    let out = &c.result["output"];
    assert_eq!(out["lines"], 5);
    assert_eq!(out["by_level"]["error"], 2);
    assert_eq!(out["by_level"]["warn"], 1);
    assert_eq!(out["top_errors"][0]["count"], 2, "{out}");
}

#[test]
fn values_that_start_with_a_dash_are_values() {
    // `-1` is valid JSON, `-v` a plausible handler argument: neither is a flag of ours.
    let c = call(
        &wasm("envargs"),
        &[UNSIGNED, "--input", "-1", "--arg", "-v", "--arg", "--x"],
    );
    assert_eq!(c.status(), "ok", "{}", c.stderr);
    assert_eq!(c.result["output"]["stdin"], "-1");
    assert_eq!(
        c.result["output"]["args"],
        serde_json::json!(["envargs", "-v", "--x"])
    );
}
