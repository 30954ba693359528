//! The whole life of an installation against the real `bridgectl serve`: first install,
//! idempotent re-run, new settings, the installed agent enrolling and running a task, upgrade
//! (identity kept), uninstall, purge; and the one-line install the platform prints.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bridge_testkit::{Platform, Proc};
use serde_json::json;

use crate::support::*;

#[test]
fn install_rerun_update_run_upgrade_uninstall_purge() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let root = w.join("root");
    let root_s = root.to_str().unwrap();
    let v1 = release(w, "v1", b"");
    let v2 = release(w, "v2", b"\n# release 2\n");
    let state = w.join("platform");
    let serve = start_serve(&state, &["--agent-binary", v1.to_str().unwrap()]);
    let url = base_url(&serve);
    let pin = get(&serve, "server_pin");
    let token = get(&serve, "token");
    let trusted = publisher().public_key().to_string();
    let token_file = w.join("token.txt");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let token_file_s = token_file.to_str().unwrap();

    // The printed command is the flow an operator copies.
    let command = get(&serve, "install_command");
    assert!(command.starts_with(
        " (d=$(mktemp -d) && trap 'rm -rf \"$d\"' EXIT && curl -fsS --pinnedpubkey 'sha256//"
    ));
    assert!(command.contains(&format!("{url}/install.sh")));
    assert!(command.contains(&format!("--server-pin {pin}")));
    assert!(command.contains("--token-stdin"));
    let printed = Instant::now();
    while !serve.log().text().contains(command.trim())
        && printed.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        serve.log().text().contains(command.trim()),
        "{}",
        serve.log().text()
    );

    // A dry run changes nothing.
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = target(&root, &url, &pin, &["--trusted-key", &trusted]);
        v.extend(extra);
        v.into_iter().map(String::from).collect()
    };
    let run = |a: &[String], stdin: &str| {
        install(&a.iter().map(String::as_str).collect::<Vec<_>>(), stdin)
    };
    let out = ok(run(
        &args(&["--token-stdin", "--dry-run"]),
        &format!("{token}\n"),
    ));
    assert!(out.contains("would install"), "{out}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(snapshot(&root).is_empty(), "a dry run created files");

    // First install, the token from standard input (the printed command's way).
    let out = ok(run(&args(&["--token-stdin"]), &format!("{token}\n")));
    assert!(out.contains("sha256 "), "{out}");
    assert!(out.contains("not run (--root): systemctl"), "{out}");
    let bin = root.join("usr/local/bin/bridge-daemon");
    let conf = root.join("etc/bridge/agent.toml");
    let token_path = root.join("etc/bridge/token");
    let unit_path = root.join("etc/systemd/system/bridge-daemon.service");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(&v1).unwrap());
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&conf), 0o640);
    assert_eq!(mode(&token_path), 0o640);
    assert_eq!(mode(&root.join("etc/bridge")), 0o750);
    assert_eq!(mode(&root.join("var/lib/bridge")), 0o700);
    assert_eq!(fs::read_to_string(&token_path).unwrap().trim(), token);
    let config = fs::read_to_string(&conf).unwrap();
    let server = get(&serve, "url");
    for want in [
        "state_dir = \"/var/lib/bridge\"".to_string(),
        format!("server = \"{server}\""),
        "token_file = \"/etc/bridge/token\"".into(),
        format!("server_pins = [\"{pin}\"]"),
        format!("{{ key = \"{trusted}\" }}"),
        "allow_unsigned_override = false".into(),
        "[shell]\n".into(),
        "cgroup_root = \"auto\"".into(),
    ] {
        assert!(config.contains(&want), "config lacks {want}:\n{config}");
    }
    let unit = fs::read_to_string(&unit_path).unwrap();
    assert!(!config.contains(&token) && !unit.contains(&token));
    for want in launcher_lines().iter().map(String::as_str).chain([
        "User=bridge",
        "Restart=always",
        "RestartSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/bridge",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet=\n",
        "Delegate=yes",
        "WantedBy=multi-user.target",
    ]) {
        assert!(unit.contains(want), "unit lacks {want}:\n{unit}");
    }
    // systemd 252 cannot delegate a cgroup under ProtectControlGroups=yes.
    assert!(
        !unit.lines().any(|l| l.starts_with("ProtectControlGroups=")),
        "{unit}"
    );
    verify_unit(&root, w, EXPOSURE_USER);

    // The same settings again: nothing changes, not even a modification time.
    let before = snapshot(&root);
    nothing_to_change(&root, || {
        ok(run(&args(&["--token-file", token_file_s]), ""))
    });

    // New settings: a dry run shows them and changes nothing; the real run applies them.
    let next_pin = "ab".repeat(32);
    let mut more = args(&["--token-file", token_file_s, "--dry-run"]);
    more.extend(["--server-pin".to_string(), next_pin.clone()]);
    let out = ok(run(&more, ""));
    assert!(
        out.contains("would install") && out.contains("agent.toml"),
        "{out}"
    );
    assert_eq!(snapshot(&root), before);
    more.retain(|a| a != "--dry-run");
    let out = ok(run(&more, ""));
    assert!(!out.contains("nothing to change"), "{out}");
    let config = fs::read_to_string(&conf).unwrap();
    assert!(
        config.contains(&format!("server_pins = [\"{pin}\", \"{next_pin}\"]")),
        "{config}"
    );
    assert!(root.join("etc/bridge/agent.toml.old").exists());
    assert_eq!(fs::read(&bin).unwrap(), fs::read(&v1).unwrap());
    let out = ok(run(&more, ""));
    assert!(out.contains("nothing to change"), "{out}");

    // The installed binary, with the installed config (its two root-relative paths given as
    // flags), enrolls with the token and runs a signed task.
    let agent_id = run_installed_agent(&serve, &root);
    let state_before = snapshot(&root.join("var/lib/bridge"));
    assert!(state_before.keys().any(|p| p.starts_with("identity")));
    drop(serve);

    // Upgrade: the platform (same state, same pin) now serves another build.
    let serve = start_serve(&state, &["--agent-binary", v2.to_str().unwrap()]);
    assert_eq!(get(&serve, "server_pin"), pin);
    let mut upgrade = args(&["--token-file", token_file_s]);
    upgrade.extend(["--server-pin".to_string(), next_pin.clone()]);
    let upgrade: Vec<String> = upgrade
        .into_iter()
        .map(|a| a.replace(&url, &base_url(&serve)))
        .collect();
    let out = ok(run(&upgrade, ""));
    assert!(
        out.contains("installing")
            && out.contains(&format!(
                "releases/{}/bridge-daemon",
                env!("CARGO_PKG_VERSION")
            )),
        "{out}"
    );
    assert_eq!(fs::read(&bin).unwrap(), fs::read(&v2).unwrap());
    assert_eq!(snapshot(&root.join("var/lib/bridge")), state_before);
    // The agent recorded its enrollment when it ran: the spent token is removed, and the
    // config no longer names it.
    assert!(root.join("var/lib/bridge/enrolled").exists());
    assert!(
        out.contains("the agent is enrolled: removing the token file"),
        "{out}"
    );
    assert!(!token_path.exists());
    assert!(!fs::read_to_string(&conf).unwrap().contains("token_file"));
    let id = Command::new(&bin)
        .args(["identity", "--state"])
        .arg(root.join("var/lib/bridge"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), agent_id);
    assert!(!root.join("usr/local/bin").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));

    // Uninstall: the service and the binary go; config and state stay.
    let out = ok(install(&["--root", root_s, "--uninstall"], ""));
    assert!(
        out.contains("not run (--root): systemctl disable --now"),
        "{out}"
    );
    assert!(!bin.exists() && !unit_path.exists());
    assert!(!layout(&root).exists() && !root.join("usr/local/lib").exists());
    assert!(conf.exists());
    assert_eq!(snapshot(&root.join("var/lib/bridge")), state_before);
    let out = ok(install(&["--root", root_s, "--uninstall"], ""));
    assert!(out.contains("nothing to remove"), "{out}");

    // Purge: nothing left behind.
    let out = unchanged(&root, || {
        ok(install(
            &["--root", root_s, "--uninstall", "--purge", "--dry-run"],
            "",
        ))
    });
    assert!(out.contains("would run: rm -rf"), "{out}");
    ok(install(&["--root", root_s, "--uninstall", "--purge"], ""));
    let left: Vec<_> = fs::read_dir(&root).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Starts the staged agent, waits until it is enrolled and connected, runs a signed task on it
/// and stops it; returns its agent id.
fn run_installed_agent(serve: &Platform, root: &Path) -> String {
    let mut cmd = Command::new(root.join("usr/local/bin/bridge-daemon"));
    cmd.args(["run", "--config"])
        .arg(root.join("etc/bridge/agent.toml"))
        .arg("--state")
        .arg(root.join("var/lib/bridge"))
        .arg("--token-file")
        .arg(root.join("etc/bridge/token"))
        .stdout(Stdio::null());
    let _agent = Proc::spawn("the installed bridge-daemon", cmd);
    let id = serve.control().wait_any_connected(Duration::from_secs(60));
    serve
        .log()
        .wait_for("enrolled a new agent", Duration::from_secs(10));
    let claims = bridge_signing::Claims::new("hello", "1.0.0", 1_700_000_000);
    let signed = bridge_signing::sign(MINIMAL_WASM, publisher(), &claims).unwrap();
    let module = base64::engine::general_purpose::STANDARD.encode(&signed.module);
    let answer = serve
        .control()
        .request(&json!({"cmd": "run", "agent": id, "module": module, "wait_ms": 30000}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["status"], "ok", "{answer}");
    // An unsigned module is refused: the installed trust policy is in force.
    let unsigned = base64::engine::general_purpose::STANDARD.encode(MINIMAL_WASM);
    let answer = serve
        .control()
        .request(&json!({"cmd": "run", "agent": id, "module": unsigned, "wait_ms": 30000}));
    assert_eq!(answer["result"]["status"], "rejected", "{answer}");
    id
}

#[test]
fn the_one_line_install_runs_from_a_private_directory_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (v1, serve) = serve_release(w);
    let root = w.join("root");
    let command = get(&serve, "install_command");
    assert!(
        command.starts_with(' '),
        "kept out of shell history: {command:?}"
    );
    assert!(!command.contains("-o bridge-install.sh"), "{command}");
    // The printed line as an operator pastes it, already root (no sudo), staged under --root.
    let line = command.replace("sudo sh ", "sh ").replace(
        "--token-stdin)",
        &format!("--token-stdin --root {})", root.display()),
    );
    assert_ne!(line, command);
    let (cwd, tmp) = (w.join("cwd"), w.join("tmp"));
    fs::create_dir(&cwd).unwrap();
    fs::create_dir(&tmp).unwrap();
    let child = Command::new(shell())
        .arg("-c")
        .arg(&line)
        .current_dir(&cwd)
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(120));
    let t = ok(out);
    assert!(t.contains("sha256 "), "{t}");
    assert_eq!(
        fs::read(root.join("usr/local/bin/bridge-daemon")).unwrap(),
        fs::read(&v1).unwrap()
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/bridge/token"))
            .unwrap()
            .trim(),
        get(&serve, "token")
    );
    let left: Vec<_> = fs::read_dir(&cwd).unwrap().collect();
    assert!(
        left.is_empty(),
        "written into the current directory: {left:?}"
    );
    let left: Vec<_> = fs::read_dir(&tmp).unwrap().collect();
    assert!(
        left.is_empty(),
        "the private directory was not removed: {left:?}"
    );

    // A failing installer fails the line (its status survives the cleanup).
    let failing = line.replace("--token-stdin", "--bogus-option");
    let out = Command::new(shell())
        .arg("-c")
        .arg(&failing)
        .current_dir(&cwd)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
}
