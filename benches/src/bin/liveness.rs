//! How fast a follower notices that its leader died, restarted or went
//! silent, and how fast it streams again (see BENCHMARKS.md), with real
//! `ferry serve` processes on loopback:
//!
//! - restart: `kill -9` of the leader, restarted 0.5 s later;
//! - clean shutdown: SIGTERM, restarted 0.5 s later;
//! - partition: ferry's UDP proxy drops everything for 5 s.
//!
//! "Noticed" is the follower's status leaving `live`; "streaming" is a write
//! on the leader visible on the follower. Default peer timeout (3 s).
//!
//! `cargo run --release -p ferry-benches --bin liveness [ROUNDS]`

use std::time::{Duration, Instant};

use ferry_tests::{get, Proc};

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn state(p: &Proc) -> String {
    ferry_tests::http("GET", &p.url("/v1/status"), None)
        .ok()
        .map(|r| r.json()["state"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// Writes on the leader until the follower serves the write.
fn streaming_again(leader: &Proc, follower: &Proc, i: usize) -> bool {
    let Ok(r) = ferry_tests::http(
        "PUT",
        &leader.url(&format!("/v1/kv/probe-{i}")),
        Some(("text/plain", b"v")),
    ) else {
        return false;
    };
    if r.status != 200 {
        return false;
    }
    let seq = r.json()["seq"].as_u64().unwrap_or(u64::MAX);
    get(&follower.url(&format!("/v1/kv/probe-{i}?min_seq={seq}&timeout_ms=20"))).status == 200
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let d = tempfile::tempdir().expect("tempdir");
    let mut leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("k-", 5000, 500, 100);
    let proxy = rt
        .block_on(ferry_transfer::netsim::Proxy::start(
            "127.0.0.1:0".parse().expect("addr"),
            leader.quic,
            Default::default(),
        ))
        .expect("proxy");
    let follower = Proc::start(
        &d.path().join("f1"),
        &[
            "--node-id",
            "f1",
            "--follow",
            &proxy.addr().to_string(),
            "--token",
            &leader.token(),
        ],
    );
    follower.wait_state("live", Duration::from_secs(60));
    let mut rows = Vec::new();
    let mut probe = 0;
    for round in 1..=rounds {
        for case in [
            "restart (kill -9)",
            "clean shutdown (SIGTERM)",
            "partition (5 s)",
        ] {
            follower.wait_state("live", Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(500));
            let t0 = Instant::now();
            let back;
            match case {
                "restart (kill -9)" | "clean shutdown (SIGTERM)" => {
                    if case.starts_with("restart") {
                        leader.kill();
                    } else {
                        leader.stop();
                    }
                    let noticed = until(Duration::from_secs(10), || state(&follower) != "live");
                    let wait = Duration::from_millis(500).saturating_sub(t0.elapsed());
                    std::thread::sleep(wait);
                    leader.spawn();
                    back = Instant::now();
                    let again = until(Duration::from_secs(30), || {
                        probe += 1;
                        streaming_again(&leader, &follower, probe)
                    });
                    rows.push((round, case, noticed, again));
                }
                _ => {
                    proxy.set_blackout(true);
                    let noticed = until(Duration::from_secs(10), || state(&follower) != "live");
                    std::thread::sleep(Duration::from_secs(5).saturating_sub(t0.elapsed()));
                    proxy.set_blackout(false);
                    back = Instant::now();
                    let again = until(Duration::from_secs(30), || {
                        probe += 1;
                        streaming_again(&leader, &follower, probe)
                    });
                    rows.push((round, case, noticed, again));
                }
            }
            let _ = back;
        }
    }
    let reseeds = follower.status()["reseeds"].clone();
    println!(
        "| round | event | noticed after (ms) | streaming again after the leader is back (ms) |"
    );
    println!("|---:|---|---:|---:|");
    for (round, case, noticed, again) in &rows {
        println!("| {round} | {case} | {} | {} |", ms(*noticed), ms(*again));
    }
    println!();
    println!("Re-seeds during the run: {reseeds}.");
}
