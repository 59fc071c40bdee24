//! `ferry demo`: the whole story on local defaults, in temp directories.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use ferry_engine::{Batch, Store, StoreOptions};
use ferry_transfer::{ClientAuth, NodeAuth, SeedConfig, ServeOptions, Server, TransportOptions};
use rand::{Rng, SeedableRng};

use crate::util;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keys the leader starts with.
    #[arg(long, default_value_t = 400_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 200)]
    value_size: usize,
    /// Writes per second of the live load during the seed.
    #[arg(long, default_value_t = 2000)]
    write_rate: u64,
    /// Keep the directories instead of deleting them.
    #[arg(long)]
    keep: bool,
}

pub async fn run(args: DemoArgs) -> Result<i32> {
    let root = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("create a temp directory")?;
    let (leader_dir, follower_dir) = (root.path().join("leader"), root.path().join("follower"));
    println!("ferry demo in {}", root.path().display());

    // 1. A leader with data.
    let t = Instant::now();
    let store = Store::open(&leader_dir, StoreOptions::default())?;
    let (keys, vsize) = (args.keys, args.value_size);
    let s2 = store.clone();
    tokio::task::spawn_blocking(move || generate(&s2, keys, vsize)).await??;
    let data_bytes = dir_size(&leader_dir);
    println!(
        "1. leader: {keys} keys, {} on disk, sequence {} ({:.1}s)",
        util::human_bytes(data_bytes),
        store.latest_seq(),
        t.elapsed().as_secs_f64()
    );

    // 2. It serves seeds over QUIC, and takes a live write load.
    let (auth, token) =
        NodeAuth::load_or_init(&ferry_engine::ferry_dir(&leader_dir).join("tls"), "leader")?;
    let endpoint = ferry_transfer::endpoint::server_endpoint(
        "127.0.0.1:0".parse()?,
        &auth,
        &TransportOptions::default(),
    )?;
    let addr = endpoint.local_addr()?;
    let server = Server::new(
        store.clone(),
        auth,
        ServeOptions {
            node_id: "leader".into(),
            ..ServeOptions::default()
        },
    );
    tokio::spawn(Arc::clone(&server).run(endpoint.clone()));
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
    println!(
        "2. leader listening on {addr} (QUIC, join-token auth); live load {} writes/s",
        args.write_rate
    );

    // 3. A new follower is seeded over QUIC.
    let mut cfg = SeedConfig::new(&follower_dir, addr, ClientAuth::from_token(&token));
    cfg.node_id = "follower-1".into();
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(util::progress_bar);
    cfg.progress = Some(util::progress_callback(bar.clone()));
    let report = ferry_transfer::seed(cfg)
        .await
        .context("seed the follower")?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seed_rate = report.bytes_fetched as f64 / report.elapsed_secs.max(1e-9);
    println!(
        "3. seeded follower: {} in {} files at sequence {} in {:.2}s ({}/s), every chunk blake3-verified",
        util::human_bytes(report.bytes_total),
        report.files,
        report.seq,
        report.elapsed_secs,
        util::human_bytes(seed_rate as u64)
    );

    // 4. Catch up from the leader's WAL while the load goes on.
    let follower = Store::open(&follower_dir, StoreOptions::default())?;
    follower.set_follower(true);
    let t = Instant::now();
    let (l2, f2) = (store.clone(), follower.clone());
    let applied = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut n = 0;
        for b in l2.wal_since(f2.latest_seq())? {
            f2.apply(&b?)?;
            n += 1;
        }
        Ok(n)
    })
    .await??;
    println!(
        "4. caught up from the WAL: {applied} batches in {:.2}s, follower at {}",
        t.elapsed().as_secs_f64(),
        follower.latest_seq()
    );

    // 5. Stop the load, finish catching up, verify.
    stop.store(true, Ordering::SeqCst);
    let _ = load.join();
    for b in store.wal_since(follower.latest_seq())? {
        follower.apply(&b?)?;
    }
    let (ld, fd) = (store.digest()?, follower.digest()?);
    println!("5. leader digest   {} at {}", ld.digest, ld.seq);
    println!("   follower digest {} at {}", fd.digest, fd.seq);
    ensure!(ld == fd, "leader and follower differ");
    println!(
        "summary: seeded {} at {}/s while the leader took {} writes; follower identical at sequence {}",
        util::human_bytes(report.bytes_total),
        util::human_bytes(seed_rate as u64),
        written.load(Ordering::SeqCst),
        fd.seq
    );
    endpoint.close(0u32.into(), b"demo done");
    if args.keep {
        let kept = root.keep();
        println!("kept {}", kept.display());
    }
    Ok(0)
}

/// Fills the store with `keys` keys of `vsize`-byte values, in batches.
fn generate(store: &Store, keys: u64, vsize: usize) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut value = vec![0u8; vsize];
    let mut b = Batch::new();
    for i in 0..keys {
        // Half random, half repeated: compressible like real values.
        rng.fill(&mut value[..vsize / 2]);
        b.put(
            format!("user:{:016x}", rng.gen::<u64>() ^ i).into_bytes(),
            value.clone(),
        );
        if b.len() == 1000 {
            store.write(&b)?;
            b = Batch::new();
        }
    }
    if !b.is_empty() {
        store.write(&b)?;
    }
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

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
