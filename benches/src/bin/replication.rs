//! Replication benchmarks on loopback (see BENCHMARKS.md):
//!
//! 1. live lag: commit on the leader → applied on the follower, at a paced
//!    10,000 single-key writes per second;
//! 2. WAL catch-up speed against the leader's sustained write rate;
//! 3. the leader's write throughput while a follower seeds, against its
//!    throughput with no follower.
//!
//! `cargo run --release -p ferry-benches --bin replication [SEED_MB]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{Batch, Store, StoreOptions};
use ferry_transfer::follower::{replicate, ReplicaConfig, ReplicaStatus};
use ferry_transfer::replication::{Replication, ReplicationOptions};
use ferry_transfer::{ClientAuth, NodeAuth, SeedConfig, ServeOptions, Server, TransportOptions};
use parking_lot::Mutex;

struct Leader {
    _dir: tempfile::TempDir,
    store: Store,
    addr: std::net::SocketAddr,
    token: ferry_transfer::JoinToken,
}

fn leader(rt: &tokio::runtime::Runtime) -> Leader {
    leader_with(rt, ServeOptions::default())
}

fn leader_with(rt: &tokio::runtime::Runtime, serve: ServeOptions) -> Leader {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
    let (auth, token) =
        NodeAuth::load_or_init(&dir.path().join(".ferry/tls"), "leader").expect("identity");
    let _g = rt.enter();
    let ep = ferry_transfer::endpoint::server_endpoint(
        "127.0.0.1:0".parse().expect("addr"),
        &auth,
        &TransportOptions::default(),
    )
    .expect("endpoint");
    let addr = ep.local_addr().expect("addr");
    let server = Server::new(store.clone(), auth, serve);
    server.set_stream_handler(Replication::new(
        store.clone(),
        ReplicationOptions::default(),
    ));
    rt.spawn(server.run(ep));
    Leader {
        _dir: dir,
        store,
        addr,
        token,
    }
}

/// Seeds a follower and starts replicating; returns its store.
fn follower(
    rt: &tokio::runtime::Runtime,
    l: &Leader,
) -> (tempfile::TempDir, Store, tokio::sync::watch::Sender<bool>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = ClientAuth::from_token(&l.token);
    rt.block_on(ferry_transfer::seed(SeedConfig::new(
        dir.path(),
        l.addr,
        auth.clone(),
    )))
    .expect("seed");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open follower");
    store.set_follower(true);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let cfg = ReplicaConfig::new(l.addr, auth, "bench-follower".into());
    rt.spawn(replicate(
        store.clone(),
        cfg,
        Arc::new(ReplicaStatus::default()),
        rx,
    ));
    (dir, store, tx)
}

fn wait_for(store: &Store, seq: u64, timeout: Duration) -> Duration {
    let t = Instant::now();
    while store.latest_seq() < seq {
        assert!(
            t.elapsed() < timeout,
            "follower stuck at {} (want {seq})",
            store.latest_seq()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    t.elapsed()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p) as usize]
}

/// Single-key puts as fast as one writer goes, for `secs`; ops/s.
fn max_write_rate(store: &Store, secs: f64, tag: &str) -> f64 {
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        store
            .put(
                format!("{tag}-{n:010}"),
                format!("value-{n:08}-{}", "x".repeat(80)),
            )
            .expect("put");
        n += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let seed_mb: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // 1. Live lag at 10,000 writes/s.
    let l = leader(&rt);
    l.store.put("warm", "up").expect("put");
    let (_fd, fstore, stop_f) = follower(&rt, &l);
    wait_for(&fstore, l.store.latest_seq(), Duration::from_secs(30));
    let applied: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let watcher = {
        let (fstore, applied) = (fstore.clone(), Arc::clone(&applied));
        let mut rx = fstore.feed().subscribe();
        rt.spawn(async move {
            while rx.changed().await.is_ok() {
                let s = *rx.borrow_and_update();
                applied.lock().push((s, Instant::now()));
            }
        })
    };
    let (rate, secs) = (10_000u64, 10u64);
    let start = Instant::now();
    let mut commits = Vec::with_capacity((rate * secs) as usize);
    for n in 0..rate * secs {
        // Sleep until the write is due (spinning only for the last 200 µs),
        // so the load generator does not take a core from the system under test.
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            if w > Duration::from_micros(200) {
                std::thread::sleep(w - Duration::from_micros(200));
            }
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let r = l
            .store
            .put(format!("lag-{n:08}"), format!("value-{n}"))
            .expect("put");
        commits.push((r.last, Instant::now()));
    }
    let achieved = commits.len() as f64 / start.elapsed().as_secs_f64();
    wait_for(&fstore, l.store.latest_seq(), Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(50));
    watcher.abort();
    let applied = applied.lock().clone();
    let mut lags = Vec::with_capacity(commits.len());
    let mut j = 0;
    for (seq, at) in &commits {
        while j < applied.len() && applied[j].0 < *seq {
            j += 1;
        }
        if let Some((_, t)) = applied.get(j) {
            lags.push(t.saturating_duration_since(*at).as_secs_f64() * 1000.0);
        }
    }
    println!("live lag at {achieved:.0} writes/s over {secs}s ({} writes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", lags.len(), pct(&mut lags, 0.5), pct(&mut lags, 0.99), pct(&mut lags, 1.0));
    assert_eq!(
        fstore.digest().expect("digest"),
        l.store.digest().expect("digest")
    );
    let _ = stop_f.send(true);

    // 2. WAL catch-up against the leader's sustained write rate.
    let l = leader(&rt);
    l.store.put("warm", "up").expect("put");
    let (_fd2, fstore2, stop_f2) = follower(&rt, &l);
    wait_for(&fstore2, l.store.latest_seq(), Duration::from_secs(30));
    let _ = stop_f2.send(true);
    std::thread::sleep(Duration::from_millis(300));
    let write_rate = max_write_rate(&l.store, 5.0, "backlog");
    let backlog = l.store.latest_seq() - fstore2.latest_seq();
    l.store.flush().expect("flush");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let cfg = ReplicaConfig::new(
        l.addr,
        ClientAuth::from_token(&l.token),
        "bench-follower".into(),
    );
    let t = Instant::now();
    rt.spawn(replicate(
        fstore2.clone(),
        cfg,
        Arc::new(ReplicaStatus::default()),
        rx,
    ));
    wait_for(&fstore2, l.store.latest_seq(), Duration::from_secs(120));
    let catch_up = backlog as f64 / t.elapsed().as_secs_f64();
    println!(
        "catch-up: leader sustained {write_rate:.0} single-key writes/s; follower applied a {backlog}-write backlog from the WAL at {catch_up:.0}/s ({:.1}x)",
        catch_up / write_rate
    );
    assert_eq!(
        fstore2.digest().expect("digest"),
        l.store.digest().expect("digest")
    );
    let _ = tx.send(true);

    // 3. Leader write throughput while a follower seeds, without and with
    //    a bandwidth limit.
    seed_interference(
        &rt,
        seed_mb,
        "default: seeds capped at 100 MiB/s while writes go on",
        ServeOptions::default(),
    );
    let unlimited = ServeOptions {
        busy_max_rate: None,
        ..ServeOptions::default()
    };
    seed_interference(&rt, seed_mb, "--no-busy-limit", unlimited);
}

fn seed_interference(rt: &tokio::runtime::Runtime, seed_mb: u64, label: &str, serve: ServeOptions) {
    let l = leader_with(rt, serve);
    let mut b = Batch::new();
    for i in 0..seed_mb * 256 {
        // Incompressible values, so the dataset has its full size on disk.
        let mut v = vec![0u8; 4000];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        b.put(format!("bulk-{i:010}"), v);
        if b.len() == 1000 {
            l.store.write(&b).expect("write");
            b = Batch::new();
        }
    }
    l.store.write(&b).ok();
    l.store.flush().expect("flush");
    let quiet = max_write_rate(&l.store, 5.0, "quiet");
    let seeding = Arc::new(AtomicBool::new(true));
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = {
        let cfg = SeedConfig::new(dir.path(), l.addr, ClientAuth::from_token(&l.token));
        let seeding = Arc::clone(&seeding);
        rt.spawn(async move {
            let r = ferry_transfer::seed(cfg).await;
            seeding.store(false, Ordering::SeqCst);
            r
        })
    };
    // Measure while chunks flow (after the checkpoint and manifest).
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut n = 0u64;
    while seeding.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
        l.store
            .put(
                format!("busy-{n:010}"),
                format!("value-{n:08}-{}", "x".repeat(80)),
            )
            .expect("put");
        n += 1;
    }
    let busy = n as f64 / t.elapsed().as_secs_f64();
    let report = rt.block_on(seed).expect("join").expect("seed");
    println!(
        "leader writes ({}): {quiet:.0}/s alone, {busy:.0}/s over {:.1}s while a follower seeded {} MB at {:.0} MB/s ({:.0}%)",
        label,
        t.elapsed().as_secs_f64(),
        report.bytes_total / 1_000_000,
        report.bytes_fetched as f64 / report.elapsed_secs / 1e6,
        busy / quiet * 100.0
    );
}
