//! In-process: a runaway handler never blocks other tasks or the agent's own timers, even on a
//! single-threaded runtime, because every store yields to tokio at each epoch tick.

use std::time::{Duration, Instant};

use bridge_host::limits::LimitRequest;
use bridge_host::sandbox::{RunSpec, Sandbox, SandboxConfig};

/// A sandbox of `slots` concurrent runs (the default when `None`).
fn sandbox(slots: Option<u32>) -> Sandbox {
    let mut config = SandboxConfig::default();
    if let Some(n) = slots {
        config.max_concurrent_runs = n;
    }
    Sandbox::new(config).unwrap()
}

/// One of the built modules (`common::wasm`), loaded into `sandbox`.
fn load(sandbox: &Sandbox, name: &str) -> std::sync::Arc<bridge_host::sandbox::CompiledModule> {
    sandbox
        .load(&std::fs::read(bridge_testkit::bins::wasm(name)).unwrap())
        .map_err(|r| r.error)
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_handler_does_not_block_the_runtime() {
    let sandbox = sandbox(None);
    let spin = load(&sandbox, "spin");
    let hello = load(&sandbox, "hello");

    let spin_spec = RunSpec {
        args: vec!["spin".into()],
        limits: LimitRequest {
            fuel: Some(50_000_000_000),
            timeout_ms: Some(1500),
            ..Default::default()
        },
        ..Default::default()
    };
    let started = Instant::now();
    let runaway = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move { sandbox.run(&spin, spin_spec).await.unwrap() })
    };
    // A "heartbeat" on the same thread keeps ticking while the guest spins.
    let mut ticks = 0;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_millis(500) {
        interval.tick().await;
        ticks += 1;
    }
    assert!(
        ticks >= 8,
        "the heartbeat ticked only {ticks} times in 500 ms"
    );

    // Another handler runs to completion while the runaway is still going.
    let spec = RunSpec {
        input: br#"{"name":"neighbour"}"#.to_vec(),
        args: vec!["hello".into()],
        ..Default::default()
    };
    let quick = sandbox.run(&hello, spec).await.unwrap();
    assert_eq!(quick.status.as_str(), "ok");
    assert_eq!(quick.output["greeting"], "Hello, neighbour!");
    assert!(
        !runaway.is_finished(),
        "the runaway should still be running"
    );

    let r = runaway.await.unwrap();
    assert_eq!(r.status.as_str(), "timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The agent's runtime has a worker thread per core: spinning handlers on every worker must not
/// hold back the timers of the agent's other tasks (its heartbeats, its link) either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_handlers_on_every_worker_do_not_block_timers() {
    let sandbox = sandbox(None);
    let spin = load(&sandbox, "spin");
    let runaways: Vec<_> = (0..4)
        .map(|_| {
            let (sandbox, spin) = (sandbox.clone(), spin.clone());
            tokio::spawn(async move {
                let spec = RunSpec {
                    args: vec!["spin".into()],
                    limits: LimitRequest {
                        fuel: Some(50_000_000_000),
                        timeout_ms: Some(1500),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                sandbox.run(&spin, spec).await.unwrap()
            })
        })
        .collect();
    let heartbeat = tokio::spawn(async {
        let started = Instant::now();
        let mut ticks = 0;
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        while started.elapsed() < Duration::from_millis(500) {
            interval.tick().await;
            ticks += 1;
        }
        ticks
    });
    let ticks = heartbeat.await.unwrap();
    assert!(
        ticks >= 8,
        "the heartbeat ticked only {ticks} times in 500 ms"
    );
    for runaway in runaways {
        assert_eq!(runaway.await.unwrap().status.as_str(), "timeout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_runs_at_once_share_the_pool() {
    let sandbox = sandbox(Some(4));
    let hello = load(&sandbox, "hello");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (sandbox, hello) = (sandbox.clone(), hello.clone());
        tasks.push(tokio::spawn(async move {
            let spec = RunSpec {
                input: format!(r#"{{"name":"n{i}"}}"#).into_bytes(),
                args: vec!["hello".into()],
                ..Default::default()
            };
            sandbox.run(&hello, spec).await.unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.output["greeting"], format!("Hello, n{i}!"));
    }
}

/// Slots of the instance pool are reused; a run must still start from the module's initial
/// state, whatever the run before it in that slot wrote (its statics, its data segment, memory
/// it grew), including when the reset restores only the pages a run dirtied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_sees_nothing_a_previous_run_left_in_its_slot() {
    let sandbox = sandbox(Some(2));
    let residue = load(&sandbox, "residue");
    let hello = load(&sandbox, "hello");
    let clean = serde_json::json!({"bss": 0, "data": "initial-contents", "grown": 0});
    for round in 0..4 {
        // Two slots, so these runs land on slots earlier runs used; another module in between.
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let (sandbox, residue) = (sandbox.clone(), residue.clone());
                tokio::spawn(async move {
                    let spec = RunSpec {
                        args: vec!["residue".into()],
                        ..Default::default()
                    };
                    sandbox.run(&residue, spec).await.unwrap()
                })
            })
            .collect();
        for run in runs {
            let r = run.await.unwrap();
            assert_eq!(r.status.as_str(), "ok", "round {round}: {:?}", r.error);
            assert_eq!(r.output, clean, "round {round}: residue of an earlier run");
        }
        let spec = RunSpec {
            input: br#"{"name":"between"}"#.to_vec(),
            args: vec!["hello".into()],
            ..Default::default()
        };
        let r = sandbox.run(&hello, spec).await.unwrap();
        assert_eq!(r.output["greeting"], "Hello, between!");
    }
}
