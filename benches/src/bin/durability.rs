//! The cost of durable shipping (see BENCHMARKS.md): a leader publishes a
//! write to followers only after the WAL holding it is synced, with one
//! sync per group of concurrent writes. Writes per second and p99 latency
//! of single-key writes and 100-key batches, 1 and 8 writers, with durable
//! shipping (the default) and without (`--ship-unsynced`), on this
//! machine's disk.
//!
//! `cargo run --release -p ferry-benches --bin durability [SECS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{Batch, Store, StoreOptions};

fn run(durable: bool, writers: usize, per_batch: usize, secs: f64) -> (f64, f64) {
    let dir =
        tempfile::tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("tempdir");
    let store = Store::open(
        dir.path(),
        StoreOptions {
            durable_shipping: durable,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let lat = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (store, lat) = (store.clone(), Arc::clone(&lat));
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut i = 0u64;
                while Instant::now() < until {
                    let mut b = Batch::new();
                    for k in 0..per_batch {
                        b.put(format!("w{w}-{i}-{k}"), vec![7u8; 100]);
                    }
                    let t = Instant::now();
                    store.write(&b).expect("write");
                    mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    i += 1;
                }
                lat.lock().extend(mine);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let mut l = lat.lock().clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let n = l.len();
    let p99 = l
        .get((n.saturating_sub(1)) * 99 / 100)
        .copied()
        .unwrap_or(0.0);
    ((n * per_batch) as f64 / secs, p99)
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    println!("| writes | writers | keys/s durable | keys/s unsynced | durable/unsynced | p99 ms durable | p99 ms unsynced |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, per) in [("single key", 1), ("100-key batch", 100)] {
        for writers in [1, 8] {
            let (d, dp) = run(true, writers, per, secs);
            let (u, up) = run(false, writers, per, secs);
            println!(
                "| {name} | {writers} | {d:.0} | {u:.0} | {:.2}x | {dp:.2} | {up:.2} |",
                d / u.max(1e-9)
            );
        }
    }
}
