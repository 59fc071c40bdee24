//! Noticing a dead or restarted leader, with real `ferry serve` processes:
//! a restarted leader answers the follower's next keep-alive with a
//! stateless reset the follower recognises (the reset key is derived from
//! the node's persisted key), and a silent partition is reported within the
//! peer timeout, never as `live`. Neither re-seeds.

use std::time::{Duration, Instant};

use ferry_tests::{get, Proc};

const T: Duration = Duration::from_secs(90);

/// Polls `f` every 10 ms until it holds; returns how long that took.
fn until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

#[test]
fn a_restarted_leader_is_noticed_by_stateless_reset_not_the_idle_timeout() {
    let d = tempfile::tempdir().expect("tempdir");
    // A long peer timeout on both sides (QUIC uses the smaller of the two):
    // without a recognised reset the follower would wait 20 s.
    let mut leader = Proc::start(
        &d.path().join("leader"),
        &["--node-id", "leader", "--peer-timeout-ms", "20000"],
    );
    leader.fill("k-", 2000, 500, 100);
    let follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &["--peer-timeout-ms", "20000"],
    );
    follower.wait_state("live", T);
    let before = follower.status()["replica"]["reconnects"]
        .as_u64()
        .expect("reconnects");

    leader.kill();
    std::thread::sleep(Duration::from_millis(500));
    leader.spawn(); // returns once the leader's API answers (QUIC is bound first)
    let back = Instant::now();
    until(
        Duration::from_secs(15),
        "the follower subscribes again",
        || {
            let s = follower.status();
            s["replica"]["reconnects"].as_u64() > Some(before)
                && s["replica"]["connected"] == true
                && s["state"] == "live"
        },
    );
    let took = back.elapsed();
    // Far below the 20 s idle timeout: the reset was recognised. (The
    // figure itself, about a keep-alive interval, is in BENCHMARKS.md.)
    assert!(
        took < Duration::from_secs(3),
        "resubscribed {took:?} after the leader came back\n{}",
        follower.log_text()
    );
    // Streaming again, with no re-seed.
    let seq = leader.put("after-restart", b"v");
    let r = get(&follower.url(&format!("/v1/kv/after-restart?min_seq={seq}")));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(follower.status()["reseeds"], 0);
}

#[test]
fn a_silent_partition_is_reported_within_the_peer_timeout_and_heals() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let d = tempfile::tempdir().expect("tempdir");
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("k-", 2000, 500, 100);
    let proxy = rt
        .block_on(ferry_transfer::netsim::Proxy::start(
            "127.0.0.1:0".parse().expect("addr"),
            leader.quic,
            Default::default(),
        ))
        .expect("proxy");
    let follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        proxy.addr(),
        &leader.token(),
        &[],
    );
    follower.wait_state("live", T);

    // The path goes silent: power off, a cut cable, a firewall.
    proxy.set_blackout(true);
    let cut = Instant::now();
    let noticed = until(
        Duration::from_secs(10),
        "the follower reports its leader unreachable",
        || follower.status()["state"] == "unreachable",
    );
    // The documented bound: the peer timeout (3 s by default); a live
    // stream is no longer called live after 1 s without a heartbeat.
    assert!(
        noticed < Duration::from_millis(3500),
        "noticed after {noticed:?}"
    );
    let s = follower.status();
    assert!(
        s["detail"]
            .as_str()
            .is_some_and(|d| d.contains("unreachable since")),
        "{s}"
    );
    // Reads go on, and say how stale they may be.
    let r = get(&follower.url("/v1/kv/k-00000001"));
    assert_eq!(r.status, 200);
    assert!(r.header("x-ferry-seq").is_some());
    assert!(
        r.header("x-ferry-last-contact").is_some(),
        "{:?}",
        r.headers
    );
    let m = get(&follower.url("/metrics")).text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("ferry_replica_leader_reachable") && l.ends_with(" 0")),
        "{m}"
    );
    // Writes on the leader meanwhile.
    let seq = leader.put("during-partition", b"v");
    assert!(cut.elapsed() < Duration::from_secs(30));

    proxy.set_blackout(false);
    until(T, "the follower is live again", || {
        follower.status()["state"] == "live"
    });
    let r = get(&follower.url(&format!("/v1/kv/during-partition?min_seq={seq}")));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(follower.status()["reseeds"], 0, "no re-seed");
    drop(rt);
}
