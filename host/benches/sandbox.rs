//! The sandbox benchmark: `cargo xtask bench` (or `cargo bench -p bridge-host --bench sandbox`).
//!
//! Prints medians (and p99) for:
//! - (a) a warm run of `hello`: module cached in memory; instantiate, run, collect the result;
//! - (b) the same with a fresh compile every time (the `wasmtime run`-style baseline);
//! - (c) loading a precompiled artifact from the disk cache (and load + run);
//! - (d) fuel metering versus epoch-only on the compute-bound `burn` fixture;
//! - (e) the floor: bare wasmtime (`InstancePre` + pooling allocator + an empty WASI p1 context,
//!   nothing of ours) running the same `hello` module;
//! - signature verification (when signing is compiled in): its cost against a cold run.
//!
//! Set `BRIDGE_BENCH_QUICK=1` for a short smoke run (used by the tests of the bench itself).

use std::time::{Duration, Instant};

use bridge_host::sandbox::{RunSpec, Sandbox, SandboxConfig};

fn read(name: &str) -> Vec<u8> {
    std::fs::read(bridge_testkit::bins::wasm(name)).unwrap()
}

struct Stats {
    median: Duration,
    p99: Duration,
    n: usize,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let n = samples.len();
    Stats {
        median: samples[n / 2],
        p99: samples[((n * 99) / 100).min(n - 1)],
        n,
    }
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn report(label: &str, s: &Stats) {
    println!(
        "{label:<58} median {:>10}   p99 {:>10}   (n={})",
        fmt(s.median),
        fmt(s.p99),
        s.n
    );
}

fn hello_spec() -> RunSpec {
    RunSpec {
        input: br#"{"name":"bench"}"#.to_vec(),
        args: vec!["hello".into()],
        ..Default::default()
    }
}

async fn time_async<F, Fut>(n: usize, mut f: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm up first: caches, page faults, the pooling allocator's slots.
    for _ in 0..(n / 10).max(3) {
        f().await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        samples.push(t.elapsed());
    }
    stats(samples)
}

/// (e): nothing of ours. Engine with the pooling allocator, WASI p1 linker, InstancePre, and a
/// fresh store with an empty WASI context per run.
mod floor {
    use wasmtime::{
        Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
        PoolingAllocationConfig, Store,
    };
    use wasmtime_wasi::p1::WasiP1Ctx;
    use wasmtime_wasi::WasiCtxBuilder;

    pub struct Floor {
        engine: Engine,
        pre: InstancePre<WasiP1Ctx>,
    }

    impl Floor {
        pub fn new(bytes: &[u8]) -> Floor {
            let mut config = Config::new();
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(
                PoolingAllocationConfig::default(),
            ));
            let engine = Engine::new(&config).unwrap();
            let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, |c| c).unwrap();
            let module = Module::new(&engine, bytes).unwrap();
            let pre = linker.instantiate_pre(&module).unwrap();
            Floor { engine, pre }
        }

        pub async fn run(&self) {
            let mut store = Store::new(&self.engine, WasiCtxBuilder::new().build_p1());
            let instance = self.pre.instantiate_async(&mut store).await.unwrap();
            let start = instance
                .get_typed_func::<(), ()>(&mut store, "_start")
                .unwrap();
            if let Err(e) = start.call_async(&mut store, ()).await {
                // A WASI command may end with exit(0); that is success.
                let code = e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0);
                assert_eq!(code, Some(0), "{e:?}");
            }
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore harness flags.
    let quick = std::env::var_os("BRIDGE_BENCH_QUICK").is_some();
    let scale = |n: usize| if quick { (n / 50).max(5) } else { n };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hello = read("hello");
    let burn = read("burn");
    println!(
        "bridge sandbox benchmark ({} mode); module hello = {} bytes",
        if quick { "quick" } else { "full" },
        hello.len()
    );
    println!();

    rt.block_on(async {
        // (e) the floor.
        let floor = floor::Floor::new(&hello);
        let e = time_async(scale(5000), || floor.run()).await;

        // (a) warm run through the sandbox.
        let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
        let handler = sandbox.load(&hello).map_err(|r| r.error).unwrap();
        let a = time_async(scale(5000), || async {
            let r = sandbox.run(&handler, hello_spec()).await.unwrap();
            assert!(r.is_ok());
        })
        .await;

        // (b) fresh compile every time, then run.
        let b = time_async(scale(100), || async {
            sandbox.clear_memory_cache();
            let h = sandbox.load(&hello).map_err(|r| r.error).unwrap();
            let r = sandbox.run(&h, hello_spec()).await.unwrap();
            assert!(r.is_ok());
        })
        .await;

        // (c) a precompiled artifact from the disk cache.
        let cache = tempfile::tempdir().unwrap();
        let disk = Sandbox::new(SandboxConfig {
            cache_dir: Some(bridge_host::sandbox::cache::CacheDir::with_key(
                cache.path().join("c"),
                [1; 32],
            )),
            ..Default::default()
        })
        .unwrap();
        disk.load(&hello).map_err(|r| r.error).unwrap();
        let c_load = time_async(scale(1000), || async {
            disk.clear_memory_cache();
            let h = disk.load(&hello).map_err(|r| r.error).unwrap();
            assert_eq!(h.source, bridge_host::sandbox::CodeSource::Disk);
        })
        .await;
        let c_run = time_async(scale(1000), || async {
            disk.clear_memory_cache();
            let h = disk.load(&hello).map_err(|r| r.error).unwrap();
            assert!(disk.run(&h, hello_spec()).await.unwrap().is_ok());
        })
        .await;

        println!("hello (warm = compiled module in memory):");
        report("(e) floor: bare wasmtime, InstancePre + pooling", &e);
        report("(a) bridge warm run (instantiate, run, collect)", &a);
        report("(b) fresh compile + run (wasmtime-run style)", &b);
        report("(c) load precompiled artifact from disk cache", &c_load);
        report("(c') disk cache load + run", &c_run);
        let ratio_ae = a.median.as_secs_f64() / e.median.as_secs_f64();
        let ratio_ba = b.median.as_secs_f64() / a.median.as_secs_f64();
        println!();
        println!("(a)/(e) = {ratio_ae:.2}x   (target: under 1.5x, and (a) under 50 µs)");
        println!("(b)/(a) = {ratio_ba:.0}x   (target: over 500x)");

        // (d) fuel metering versus epoch-only, compute-bound.
        let iterations = if quick { 200_000 } else { 20_000_000 };
        let burn_spec = || RunSpec {
            input: format!(r#"{{"iterations":{iterations}}}"#).into_bytes(),
            args: vec!["burn".into()],
            limits: bridge_host::limits::LimitRequest {
                fuel: Some(50_000_000_000),
                timeout_ms: Some(600_000),
                ..Default::default()
            },
            ..Default::default()
        };
        let epoch_only = Sandbox::new(SandboxConfig {
            fuel_metering: false,
            ..Default::default()
        })
        .unwrap();
        let fueled = burn.clone();
        let h_fuel = sandbox.load(&fueled).map_err(|r| r.error).unwrap();
        let h_epoch = epoch_only.load(&burn).map_err(|r| r.error).unwrap();
        let n = scale(30).max(5);
        let fuel_stats = time_async(n, || async {
            let r = sandbox.run(&h_fuel, burn_spec()).await.unwrap();
            assert!(r.is_ok(), "{:?}", r.error);
        })
        .await;
        let epoch_stats = time_async(n, || async {
            let r = epoch_only.run(&h_epoch, burn_spec()).await.unwrap();
            assert!(r.is_ok(), "{:?}", r.error);
        })
        .await;
        // Signature verification: its cost against a cold run, and on the warm path.
        let key = bridge_signing::KeyPair::generate().unwrap();
        let claims = bridge_signing::Claims::new("hello", "1.0.0", 1_700_000_000);
        let signed = bridge_signing::sign(&hello, &key, &claims).unwrap().module;
        let policy = bridge_signing::TrustPolicy::new()
            .trust(bridge_signing::TrustedKey::new(key.public_key()))
            .unwrap();
        let now = 1_700_000_100;
        let verify = time_async(scale(2000), || async {
            bridge_signing::verify(&signed, None, &policy, now).unwrap();
        })
        .await;
        let trust = bridge_host::trust::Trust::new(policy.clone(), false);
        let cold_signed = time_async(scale(100), || async {
            sandbox.clear_memory_cache();
            let fresh = bridge_host::trust::Trust::new(policy.clone(), false);
            let p = fresh
                .prepare(&sandbox, &signed, None)
                .map_err(|r| r.error)
                .unwrap();
            assert!(sandbox.run(&p.module, hello_spec()).await.unwrap().is_ok());
        })
        .await;
        trust
            .prepare(&sandbox, &signed, None)
            .map_err(|r| r.error)
            .unwrap();
        let sha: [u8; 32] =
            sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &signed))
                .into();
        let warm_signed = time_async(scale(5000), || async {
            let p = trust
                .cached(&sandbox, &sha, None)
                .expect("verified and compiled before");
            assert!(sandbox.run(&p.module, hello_spec()).await.unwrap().is_ok());
        })
        .await;
        println!();
        println!("signed hello:");
        report(
            "verify signature (parse, SHA-256, Ed25519, policy)",
            &verify,
        );
        report("cold run: verify + compile + run", &cold_signed);
        report("warm run: verified-cache lookup + run", &warm_signed);
        println!(
            "verification / cold unsigned run (b) = {:.2}%   (target: under 5%)",
            verify.median.as_secs_f64() / b.median.as_secs_f64() * 100.0
        );
        println!(
            "warm signed (a') / warm unsigned (a) = {:.2}x   (target: no added cost)",
            warm_signed.median.as_secs_f64() / a.median.as_secs_f64()
        );

        println!();
        println!("burn ({iterations} iterations, compute-bound):");
        report("(d) fuel metering + epochs (the product)", &fuel_stats);
        report("(d) epochs only", &epoch_stats);
        let slowdown = fuel_stats.median.as_secs_f64() / epoch_stats.median.as_secs_f64();
        println!(
            "(d) fuel metering slowdown = {:.1}%",
            (slowdown - 1.0) * 100.0
        );
    });
}
