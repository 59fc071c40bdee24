//! `ferry demo`: the whole story on local defaults, in temp directories, with
//! real nodes (QUIC and HTTP on loopback) in this process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use ferry_engine::{Store, StoreOptions};
use ferry_transfer::auth::NodeAuth;
use ferry_transfer::ServeOptions;
use rand::SeedableRng;

use crate::node::{self, NodeConfig, NodeState};
use crate::{http, util};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keys the leader starts with.
    #[arg(long, env = "FERRY_KEYS", default_value_t = 1_000_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, env = "FERRY_VALUE_SIZE", default_value_t = 200)]
    value_size: usize,
    /// Writes per second of the live load.
    #[arg(long, env = "FERRY_WRITE_RATE", default_value_t = 2000)]
    write_rate: u64,
    /// Seconds to watch live replication before verifying.
    #[arg(long, env = "FERRY_WATCH_SECS", default_value_t = 3)]
    watch_secs: u64,
    /// Keep the directories instead of deleting them.
    #[arg(long, env = "FERRY_KEEP")]
    keep: bool,
}

pub async fn run(args: DemoArgs) -> Result<i32> {
    let root = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("create a temp directory")?;
    let (leader_dir, follower_dir) = (root.path().join("leader"), root.path().join("follower"));
    println!("ferry demo in {}", root.path().display());
    http::init_metrics();

    // 1. A leader with data.
    let t = Instant::now();
    let (keys, vsize, ld) = (args.keys, args.value_size, leader_dir.clone());
    tokio::task::spawn_blocking(move || generate(&ld, keys, vsize)).await??;
    println!(
        "1. leader data: {keys} keys of {vsize} bytes, {} on disk ({:.1}s)",
        util::human_bytes(crate::datagen::dir_size(&leader_dir)),
        t.elapsed().as_secs_f64()
    );

    let local = "127.0.0.1:0".parse()?;
    let base = |data: &std::path::Path, id: &str| NodeConfig {
        data: data.to_path_buf(),
        listen: local,
        node_id: id.into(),
        follow: Vec::new(),
        peers: Vec::new(),
        seed_from: None,
        token: None,
        tls_files: None,
        store: StoreOptions::default(),
        serve: ServeOptions::default(),
        reseed_backoff: Duration::from_secs(5),
        scrub_interval: None,
        cert_lifetime: ferry_transfer::auth::DEFAULT_CERT_LIFETIME,
        transport: ferry_transfer::TransportOptions::default(),
        on_divergence: node::OnDivergence::Reseed,
        min_acks: 0,
        keep_aside: 3,
    };
    let leader = node::start(base(&leader_dir, "leader")).await?;
    let leader_http = http::serve(Arc::clone(&leader), local).await?;
    let leader_quic = (*leader.quic_addr.read()).context("leader address")?;
    let store = leader.store().context("leader store")?;
    println!(
        "2. leader up: QUIC {leader_quic}, HTTP {leader_http}, sequence {}",
        store.latest_seq()
    );

    // 2. A live write load.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let load = {
        let (store, stop, written, rate) = (
            store.clone(),
            Arc::clone(&stop),
            Arc::clone(&written),
            args.write_rate.max(1),
        );
        std::thread::spawn(move || live_load(&store, &stop, &written, rate))
    };
    println!("   live load: {} writes/s", args.write_rate);

    // 3. A new follower joins with the token: seed over QUIC, catch up, live.
    let (_, token) = NodeAuth::load_or_init(&node::tls_dir(&leader_dir), "leader")?;
    let follower = node::start(NodeConfig {
        follow: vec![leader_quic],
        token: Some(token),
        ..base(&follower_dir, "follower-1")
    })
    .await?;
    let follower_http = http::serve(Arc::clone(&follower), local).await?;
    let t = Instant::now();
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(util::progress_bar);
    loop {
        let state = follower.state();
        if let (Some(b), Some(p)) = (&bar, follower.seed_progress.lock().clone()) {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        }
        if state == NodeState::Live {
            break;
        }
        ensure!(
            !matches!(state, NodeState::Diverged | NodeState::Stopped),
            "the follower stopped: {:?}",
            follower.detail()
        );
        ensure!(
            t.elapsed() < Duration::from_secs(600),
            "the follower did not go live in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let to_live = t.elapsed();
    let seed = follower.last_seed.lock().clone().context("seed report")?;
    let rate = seed.bytes_fetched as f64 / seed.elapsed_secs.max(1e-9);
    println!(
        "3. follower seeded over QUIC: {} in {} files at sequence {} in {:.2}s ({}/s), every chunk blake3-verified",
        util::human_bytes(seed.bytes_total),
        seed.files,
        seed.seq,
        seed.elapsed_secs,
        util::human_bytes(rate as u64)
    );
    println!(
        "4. caught up from the leader's WAL and live {:.2}s after joining (HTTP {follower_http})",
        to_live.as_secs_f64()
    );

    // 4. Watch live replication lag.
    let repl = leader.replication.get().context("replication")?.clone();
    let mut lag_ms = Vec::new();
    let mut lag_seqs = Vec::new();
    let until = Instant::now() + Duration::from_secs(args.watch_secs);
    while Instant::now() < until {
        if let Some(f) = repl
            .followers()
            .into_iter()
            .find(|f| f.node_id == "follower-1")
        {
            lag_ms.push(f.lag_ms);
            lag_seqs.push(f.lag_seqs);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "5. live for {}s under load: acknowledged lag p50 {} ms, p99 {} ms; p99 {} sequences behind",
        args.watch_secs,
        pct(&mut lag_ms, 0.5),
        pct(&mut lag_ms, 0.99),
        pct(&mut lag_seqs, 0.99)
    );

    // 5. Verify at one sequence, under load, through the HTTP API.
    let (lh, fh) = (leader_http, follower_http);
    let code = tokio::task::spawn_blocking(move || {
        crate::client::verify(lh, fh, Duration::from_secs(60), false)
    })
    .await??;
    ensure!(code == 0, "leader and follower digests differ");
    stop.store(true, Ordering::SeqCst);
    let _ = load.join();
    println!(
        "summary: seeded {} at {}/s while the leader took {} writes; live in {:.2}s; digests match at one sequence",
        util::human_bytes(seed.bytes_total),
        util::human_bytes(rate as u64),
        written.load(Ordering::SeqCst),
        to_live.as_secs_f64()
    );
    // The follower first, so it does not report its leader going away.
    follower.shutdown();
    let t = Instant::now();
    while follower.state() != NodeState::Stopped && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    if args.keep {
        let kept = root.keep();
        println!("kept {}", kept.display());
    }
    Ok(0)
}

/// Fills a new store with `keys` keys of `vsize`-byte values (half random,
/// half repeated: compressible like real values).
fn generate(dir: &std::path::Path, keys: u64, vsize: usize) -> Result<()> {
    let store = Store::open(dir, StoreOptions::default())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    crate::datagen::write_keys(
        &store,
        &mut rng,
        0,
        keys,
        crate::datagen::Values::Dbbench,
        vsize,
    )?;
    store.flush()?;
    Ok(())
}

fn live_load(store: &Store, stop: &AtomicBool, written: &AtomicU64, rate: u64) {
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if store
            .put(format!("live:{n:012}"), format!("value-{n}"))
            .is_err()
        {
            return;
        }
        n += 1;
        written.store(n, Ordering::Relaxed);
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}
