//! The daemon, as real `ferry serve` processes on loopback: followers join
//! under load, survive kills in every state, re-seed when the WAL is gone,
//! cascade, and the HTTP API behaves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::{verify, Proc};

const T: Duration = Duration::from_secs(90);

fn dirs() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Writes in a loop until stopped; returns the last sequence.
fn load(leader: &Proc, stop: Arc<AtomicBool>, last: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    let url = leader.url("/v1/batch");
    std::thread::spawn(move || {
        let mut i = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            let ops: Vec<_> = (0..20).map(|j| serde_json::json!({"op": "put", "key": format!("load-{:03}", (i * 20 + j) % 997), "value": format!("v{i}-{j}")})).collect();
            let mut ops = ops;
            ops.push(serde_json::json!({"op": "delete", "key": format!("load-{:03}", i % 997)}));
            let r = ferry_tests::post_json(&url, &serde_json::json!({ "ops": ops })).ok_json();
            last.store(r["seq"].as_u64().expect("seq"), Ordering::SeqCst);
            i += 1;
        }
    })
}

#[test]
fn a_follower_added_under_continuous_load_converges() {
    let d = dirs();
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("base-", 30_000, 1000, 100);
    let (stop, last) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = load(&leader, Arc::clone(&stop), Arc::clone(&last));
    std::thread::sleep(Duration::from_millis(300));
    let follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &[],
    );
    follower.wait_state("live", T);
    // Live while the load goes on: the follower keeps up.
    let before = last.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        last.load(Ordering::SeqCst) > before,
        "the load kept writing"
    );
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    let st = leader.status();
    let f = &st["followers"][0];
    assert_eq!(f["node_id"], "f1");
    assert_eq!(f["state"], "live");
    // The follower was seeded once and catches up with no re-seed.
    let fs = follower.status();
    assert_eq!(fs["reseeds"], 0);
    assert!(fs["last_seed"]["bytes_total"].as_u64().expect("seed") > 1_000_000);
}

#[test]
fn a_follower_killed_in_every_state_converges_without_reseeding() {
    let d = dirs();
    // A slow link: the seed takes a few seconds, so it can be killed midway.
    let leader = Proc::start(
        &d.path().join("leader"),
        &[
            "--node-id",
            "leader",
            "--max-rate",
            "3M",
            "--compression",
            "off",
        ],
    );
    // About 12 MB that compresses poorly: four seconds at 3 MB/s.
    leader.fill("big-", 6000, 500, 2000);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let token = leader.token();
    let mut follower = Proc::start(
        &d.path().join("f1"),
        &[
            "--node-id",
            "f1",
            "--follow",
            &leader.quic.to_string(),
            "--token",
            &token,
        ],
    );

    // 1. Killed while seeding, once some chunks are durably recorded: the
    //    restart resumes the seed.
    let deadline = std::time::Instant::now() + T;
    loop {
        if ferry_tests::verified_chunks(&follower.data) >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the seed made no durable progress: {}",
            follower.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(follower.status()["state"], "seeding");
    follower.kill();
    follower.spawn();
    follower.wait_state("live", T);
    let s = follower.status();
    assert!(
        s["last_seed"]["bytes_resumed"].as_u64().expect("report") > 0,
        "the seed resumed: {s}"
    );
    assert_eq!(s["reseeds"], 0);

    // 2. Killed while live: the restart picks up from its own sequence.
    leader.fill("more-", 2000, 500, 50);
    follower.kill();
    leader.fill("while-down-", 2000, 500, 50);
    follower.spawn();
    follower.wait_state("live", T);
    assert!(
        follower.status()["last_seed"].is_null(),
        "no seed after a restart"
    );

    // 3. Killed while catching up on a large backlog.
    follower.kill();
    leader.fill("backlog-", 150_000, 1000, 100);
    follower.spawn();
    let deadline = std::time::Instant::now() + T;
    let mut saw_catching_up = false;
    while std::time::Instant::now() < deadline {
        let s = follower.status();
        if s["state"] == "catching-up" && s["seq"].as_u64().unwrap_or(0) > 0 {
            saw_catching_up = true;
            break;
        }
        if s["state"] == "live" {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    follower.kill();
    follower.spawn();
    follower.wait_state("live", T);
    let s = follower.status();
    assert!(s["last_seed"].is_null(), "no seed after a restart: {s}");
    assert_eq!(s["reseeds"], 0);
    eprintln!("killed while catching up: {saw_catching_up}");
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    // SIGTERM stops both cleanly.
    assert!(follower.stop().success());
}

#[test]
fn a_purged_wal_makes_the_follower_reseed_reusing_unchanged_files() {
    let d = dirs();
    let mut leader = Proc::start(
        &d.path().join("leader"),
        &[
            "--node-id",
            "leader",
            "--wal-ttl-secs",
            "0",
            "--wal-size-limit-mb",
            "0",
        ],
    );
    leader.fill("base-", 60_000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let mut follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &["--reseed-backoff-secs", "1"],
    );
    follower.wait_state("live", T);
    let first = follower.status()["last_seed"]["bytes_total"]
        .as_u64()
        .expect("seeded");
    // It applies writes past its seed, so only its WAL can prove where it
    // stands (the seed checkpoint no longer does).
    leader.fill("mid-", 100, 10, 200);
    let want = leader.status()["seq"].as_u64().expect("leader seq");
    let deadline = std::time::Instant::now() + T;
    while follower.status()["seq"].as_u64() != Some(want) {
        assert!(std::time::Instant::now() < deadline, "not caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fseq = follower.status()["seq"].as_u64().expect("seq");
    follower.kill();
    // While it is down, the leader writes, flushes (with no WAL retention
    // the old WAL is deleted at once) and restarts, so that neither its WAL
    // nor its in-memory feed reaches back to the follower.
    leader.fill("later-", 3000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    leader.stop();
    // The follower comes back first, and a reader waits on it for a
    // sequence it will not reach before the re-seed: the wait holds the
    // database, and must let go when the node needs to replace it.
    follower.spawn();
    let deadline = std::time::Instant::now() + T;
    while follower.status()["seq"].as_u64().is_none() {
        assert!(std::time::Instant::now() < deadline, "no database open");
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiter = {
        let url = follower.url("/v1/kv/base-00000001?min_seq=1000000000000&timeout_ms=60000");
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            (ferry_tests::get(&url).status, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    leader.spawn();
    let oldest = leader.status()["oldest_wal_seq"].as_u64();
    assert!(
        oldest.map_or(true, |o| o > fseq + 1),
        "the WAL must be gone past the follower at {fseq}: oldest {oldest:?}"
    );
    let (status, waited) = waiter.join().expect("waiter");
    assert_eq!(status, 503, "the waiting read let go of the database");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    loop {
        let s = follower.status();
        if s["state"] == "live" && s["reseeds"] == 1 {
            let seed = &s["last_seed"];
            let (total, fetched, reused) = (
                seed["bytes_total"].as_u64().expect("t"),
                seed["bytes_fetched"].as_u64().expect("f"),
                seed["bytes_reused"].as_u64().expect("r"),
            );
            assert!(
                reused > total / 2,
                "most bytes come from local files: {seed}"
            );
            assert!(
                fetched < total / 2 && fetched < first,
                "the re-seed moved less than a full seed: {seed}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no re-seed: {s}\n{}",
            follower.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        follower.log_text().contains("re-seeding"),
        "a clear log line"
    );
    let metrics = ferry_tests::get(&follower.url("/metrics")).text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_reseeds_total") && l.ends_with(" 1")),
        "{metrics}"
    );
    // The leader could not check the old position: unproven, not diverged.
    // The old database is kept aside all the same, and the seeded one is
    // accepted by the checkpoint the leader issued (its WAL is gone too).
    let s = follower.status();
    assert_eq!(s["divergences"], 0, "{s}");
    let aside = s["set_aside"].as_array().expect("set_aside");
    assert_eq!(aside.len(), 1, "{s}");
    assert_eq!(aside[0]["seq"].as_u64(), Some(fseq), "{s}");
    assert!(
        aside[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("unproven")),
        "{s}"
    );
    assert!(
        leader
            .log_text()
            .contains("proves its position by the seed checkpoint"),
        "{}",
        leader.log_text()
    );
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn two_followers_at_once_and_a_cascading_seed() {
    let d = dirs();
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("base-", 20_000, 1000, 100);
    let token = leader.token();
    let lq = leader.quic.to_string();
    let f1 = Proc::start(
        &d.path().join("f1"),
        &["--node-id", "f1", "--follow", &lq, "--token", &token],
    );
    let f2 = Proc::start(
        &d.path().join("f2"),
        &["--node-id", "f2", "--follow", &lq, "--token", &token],
    );
    f1.wait_state("live", T);
    f2.wait_state("live", T);
    leader.fill("after-", 1000, 100, 10);
    assert_eq!(verify(&leader, &f1).0, 0);
    assert_eq!(verify(&leader, &f2).0, 0);
    let served_by_leader = leader.status()["seeds_served"].as_u64().expect("served");
    assert_eq!(served_by_leader, 2);

    // A third node seeds from f1 (taking the bulk load off the leader) and
    // tails the leader's WAL: sequences are identical across replicas.
    let f3 = Proc::start(
        &d.path().join("f3"),
        &[
            "--node-id",
            "f3",
            "--follow",
            &lq,
            "--seed-from",
            &f1.quic.to_string(),
            "--token",
            &token,
        ],
    );
    f3.wait_state("live", T);
    assert_eq!(f1.status()["seeds_served"], 1, "f1 served the seed");
    assert_eq!(
        leader.status()["seeds_served"].as_u64(),
        Some(served_by_leader),
        "the leader served no new seed"
    );
    leader.fill("final-", 500, 100, 10);
    let (code, out) = verify(&leader, &f3);
    assert_eq!(code, 0, "{out}");
    let ids: Vec<String> = leader.status()["followers"]
        .as_array()
        .expect("followers")
        .iter()
        .map(|f| f["node_id"].as_str().unwrap_or("").to_owned())
        .collect();
    for id in ["f1", "f2", "f3"] {
        assert!(ids.iter().any(|i| i == id), "{id} in {ids:?}");
    }
}

#[test]
fn the_http_api_on_leader_and_follower() {
    let d = dirs();
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    let follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &[],
    );
    follower.wait_state("live", T);

    // Writes and reads on the leader, each with the sequence it reflects.
    let seq = leader.put("user:1", b"alice");
    let r = ferry_tests::get(&leader.url("/v1/kv/user:1"));
    assert_eq!(
        r.header("x-ferry-seq").and_then(|s| s.parse::<u64>().ok()),
        Some(seq)
    );
    assert_eq!(r.text(), "alice");
    let b = ferry_tests::post_json(&leader.url("/v1/batch"), &serde_json::json!({"ops": [{"op": "put", "key": "user:2", "value": "bob"}, {"op": "put", "key": "user:3", "value_b64": "/wA="}, {"op": "delete", "key": "user:1"}]})).ok_json();
    assert_eq!(b["seq"].as_u64(), Some(seq + 3));
    assert_eq!(b["first_seq"].as_u64(), Some(seq + 1));
    let s = ferry_tests::get(&leader.url("/v1/scan?prefix=user:&limit=10")).ok_json();
    assert_eq!(s["items"].as_array().expect("items").len(), 2);
    assert_eq!(s["items"][0]["key"], "user:2");
    assert!(
        s["items"][1]["value_b64"].is_string(),
        "binary values come as base64"
    );
    let del = ferry_tests::delete(&leader.url("/v1/kv/user:2")).ok_json();
    let last = del["seq"].as_u64().expect("seq");

    // The follower refuses writes and names the leader.
    let r = ferry_tests::put_bytes(&follower.url("/v1/kv/x"), b"y");
    assert_eq!(
        r.status,
        421,
        "a follower write must be refused: {}",
        r.text()
    );
    assert_eq!(r.json()["leader"], leader.quic.to_string());
    assert!(
        r.header("x-ferry-seq").is_some(),
        "errors carry the sequence too"
    );
    // Read-your-writes across replicas.
    let w = leader.put("ryw", b"mine");
    let r = ferry_tests::get(&follower.url(&format!("/v1/kv/ryw?min_seq={w}")));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("x-ferry-seq")
            .and_then(|s| s.parse::<u64>().ok())
            .expect("seq")
            >= w
    );
    assert_eq!(r.text(), "mine");
    assert!(
        r.header("x-ferry-last-contact").is_some(),
        "a follower's reads say when it last heard from its leader"
    );
    assert_eq!(
        ferry_tests::get(&follower.url(&format!("/v1/kv/user:2?min_seq={last}"))).status,
        404,
        "deleted on the follower too"
    );
    // A sequence that never comes times out, boundedly.
    let r = ferry_tests::get(&follower.url(&format!(
        "/v1/kv/ryw?min_seq={}&timeout_ms=200",
        w + 1_000_000
    )));
    assert_eq!(r.status, 504, "{}", r.text());

    // Bad input is a 4xx with a message.
    let long_key = "k".repeat(5000);
    for (method, url, body) in [
        ("PUT", leader.url(&format!("/v1/kv/{long_key}")), Some("v")),
        ("POST", leader.url("/v1/batch"), Some("not json")),
        ("POST", leader.url("/v1/batch"), Some(r#"{"ops": []}"#)),
        (
            "POST",
            leader.url("/v1/batch"),
            Some(r#"{"ops": [{"op": "put", "key": "a"}]}"#),
        ),
        ("GET", leader.url("/v1/scan?limit=0"), None),
    ] {
        let r = ferry_tests::http(
            method,
            &url,
            body.map(|b| ("application/json", b.as_bytes())),
        )
        .expect("request");
        assert!(
            (400..500).contains(&r.status),
            "{method} {url}: {}",
            r.status
        );
        assert!(r.json()["error"].is_string());
        assert!(
            r.header("x-ferry-seq").is_some(),
            "errors carry the sequence too"
        );
    }
    // A scan is bounded in bytes too, and pages with a continuation key.
    let mib = vec![b'v'; 1 << 20];
    for i in 0..12 {
        assert_eq!(
            ferry_tests::put_bytes(&leader.url(&format!("/v1/kv/big:{i:02}")), &mib).status,
            200
        );
    }
    let mut seen = Vec::new();
    let mut url = leader.url("/v1/scan?prefix=big:&limit=100");
    let mut pages = 0;
    loop {
        let page = ferry_tests::get(&url).ok_json();
        let items = page["items"].as_array().expect("items");
        assert!(
            items.len() <= 8,
            "a scan returns at most 8 MiB: {} items",
            items.len()
        );
        seen.extend(
            items
                .iter()
                .map(|i| i["key"].as_str().expect("key").to_owned()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(next) => url = leader.url(&format!("/v1/scan?prefix=big:&limit=100&start={next}")),
            None => break,
        }
    }
    let want: Vec<String> = (0..12).map(|i| format!("big:{i:02}")).collect();
    assert_eq!(seen, want, "every key once, in order");
    assert!(pages >= 2);

    // An oversized body is refused.
    // (The server may answer 413 and close before the client has sent the
    // whole body; the client then sees the connection closed.)
    let huge = vec![b'x'; 9 << 20];
    match ferry_tests::http(
        "PUT",
        &leader.url("/v1/kv/huge"),
        Some(("application/octet-stream", &huge)),
    ) {
        Ok(r) => assert_eq!(r.status, 413, "{}", r.text()),
        Err(e) => assert!(
            e.contains("Broken pipe") || e.contains("reset") || e.contains("closed"),
            "{e}"
        ),
    }
    assert_eq!(
        ferry_tests::get(&leader.url("/v1/kv/huge")).status,
        404,
        "the oversized write was not applied"
    );

    // Status and metrics.
    let st = leader.status();
    assert_eq!(st["role"], "leader");
    assert!(st["oldest_wal_seq"].as_u64().is_some());
    let fst = follower.status();
    assert_eq!(
        (fst["role"].as_str(), fst["state"].as_str()),
        (Some("follower"), Some("live"))
    );
    let m = ferry_tests::get(&leader.url("/metrics"));
    assert!(
        m.header("x-ferry-seq").is_some(),
        "/metrics carries the sequence too"
    );
    let m = m.text();
    assert!(
        m.contains("ferry_follower_lag_seqs{") && m.contains("ferry_latest_seq{"),
        "{m}"
    );
    let out = ferry_tests::ferry(&["status", "--http", &leader.http.to_string()]);
    assert!(out.contains("f1") && out.contains("live"), "{out}");

    // Every metric the README names is exported, with the type it states.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let named: Vec<(String, String)> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`ferry_")?.strip_suffix('`')?;
            Some((format!("ferry_{name}"), cells.get(2)?.to_string()))
        })
        .collect();
    assert!(named.len() >= 20, "the README's metrics table: {named:?}");
    let exported = format!(
        "{m}\n{}",
        ferry_tests::get(&follower.url("/metrics")).text()
    );
    for (name, kind) in &named {
        assert!(
            exported.contains(&format!("# TYPE {name} {kind}")),
            "{name} ({kind}) named in the README is not exported:\n{exported}"
        );
    }
}

#[test]
fn a_follower_away_across_a_leader_restart_catches_up_from_the_wal() {
    let d = dirs();
    let mut leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("base-", 2000, 200, 100);
    let mut follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &[],
    );
    follower.wait_state("live", T);
    assert!(follower.stop().success());
    // 300 batches while it is away; the restart empties the leader's
    // in-memory feed, so only its WAL holds them.
    leader.fill("away-", 30_000, 100, 100);
    assert!(leader.stop().success());
    leader.spawn();
    follower.spawn();
    follower.wait_state("live", T);
    let from_wal = leader.metric("ferry_replication_wal_batches_total");
    assert!(from_wal >= 300.0, "served from the WAL: {from_wal}");
    let s = follower.status();
    assert_eq!(s["reseeds"], 0, "{s}");
    assert!(leader
        .log_text()
        .contains("catching the follower up from the WAL"));
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn verify_exits_3_when_the_digests_differ() {
    // Two nodes at the same sequence with different contents.
    let d = dirs();
    let a = Proc::start(&d.path().join("a"), &["--node-id", "a"]);
    let b = Proc::start(&d.path().join("b"), &["--node-id", "b"]);
    let sa = a.fill("k-", 100, 10, 50);
    let sb = b.fill("k-", 99, 10, 50);
    assert_eq!(sa, sb + 1);
    b.put("k-00000099", b"not what a holds");
    let (code, out) = verify(&a, &b);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.to_lowercase().contains("mismatch") || out.contains("differ"),
        "{out}"
    );
}

#[test]
fn kill_nine_of_the_leader_during_a_seed_and_while_streaming() {
    let d = dirs();
    // A slow seed (2 MB/s), so the leader dies in the middle of it.
    let mut leader = Proc::start(
        &d.path().join("leader"),
        &["--node-id", "leader", "--max-rate", "2M"],
    );
    leader.fill("base-", 40_000, 1000, 200);
    let follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &["--reseed-backoff-secs", "1"],
    );
    let deadline = std::time::Instant::now() + T;
    while follower.status()["seed"]["bytes_done"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no seed progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    leader.kill();
    std::thread::sleep(Duration::from_millis(500));
    leader.spawn();
    follower.wait_state("live", T);
    assert_eq!(follower.status()["reseeds"], 0);

    // Streaming under load: every write the leader acknowledged survives
    // its kill -9 and reaches the follower.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (url, stop, acked) = (leader.url("/v1/kv"), Arc::clone(&stop), Arc::clone(&acked));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = ferry_tests::http(
                    "PUT",
                    &format!("{url}/w-{i:08}"),
                    Some(("application/octet-stream", b"v")),
                );
                if r.is_ok_and(|r| r.status == 200) {
                    acked.store(i, Ordering::Relaxed);
                    i += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    leader.kill();
    let last_before = acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    leader.spawn();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        acked.load(Ordering::Relaxed) > last_before,
        "writes resumed"
    );
    let g = ferry_tests::get(&leader.url(&format!("/v1/kv/w-{last_before:08}")));
    assert_eq!(g.status, 200, "an acknowledged write survived kill -9");
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    assert_eq!(follower.status()["reseeds"], 0);
}

#[test]
fn operator_certificates_from_ferry_certs_run_a_cluster_end_to_end() {
    let d = dirs();
    let pki = d.path().join("pki");
    let p = pki.to_str().expect("utf-8");
    ferry_tests::ferry(&["certs", "init-ca", "--out", p]);
    for name in ["leader", "f1"] {
        ferry_tests::ferry(&["certs", "issue", "--ca-dir", p, "--name", name, "--out", p]);
    }
    let files = |name: &str| {
        vec![
            "--ca".to_owned(),
            format!("{p}/ca.pem"),
            "--cert".to_owned(),
            format!("{p}/{name}.pem"),
            "--key".to_owned(),
            format!("{p}/{name}.key"),
        ]
    };
    let mut largs = vec!["--node-id".to_owned(), "leader".to_owned()];
    largs.extend(files("leader"));
    let largs: Vec<&str> = largs.iter().map(String::as_str).collect();
    let mut leader = Proc::start(&d.path().join("leader"), &largs);
    leader.fill("k-", 2000, 200, 100);
    let q = leader.quic.to_string();
    let mut fargs = vec![
        "--node-id".to_owned(),
        "f1".to_owned(),
        "--follow".to_owned(),
        q,
    ];
    fargs.extend(files("f1"));
    let fargs: Vec<&str> = fargs.iter().map(String::as_str).collect();
    let follower = Proc::start(&d.path().join("f1"), &fargs);
    follower.wait_state("live", T);
    leader.fill("more-", 500, 100, 100);
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    // No join token anywhere: the leader has no secret to hand out.
    assert!(!leader.data.join(".ferry/tls/join-secret").exists());
    // SIGTERM stops the leader cleanly.
    assert!(leader.stop().success());
}

#[test]
fn a_rotated_join_token_stops_admitting_new_nodes_at_once() {
    let d = dirs();
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    leader.fill("k-", 500, 100, 100);
    let old = leader.token();
    let mut follower = Proc::follower(&d.path().join("f1"), "f1", leader.quic, &old, &[]);
    follower.wait_state("live", T);

    let new = ferry_tests::ferry(&[
        "token",
        "--rotate",
        "--data",
        leader.data.to_str().expect("utf-8"),
    ])
    .trim()
    .to_owned();
    assert_ne!(new, old);
    assert_eq!(leader.token(), new, "ferry token prints the new one");
    let seed = |dir: &str, token: &str| {
        std::process::Command::new(ferry_tests::ferry_bin())
            .args([
                "seed",
                "--leader",
                &leader.quic.to_string(),
                "--data",
                d.path().join(dir).to_str().expect("utf-8"),
                "--token",
                token,
                "--no-progress",
            ])
            .output()
            .expect("run ferry seed")
    };
    // The running leader refuses the old token without a restart ...
    let out = seed("with-old", &old);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("join token"),
        "{out:?}"
    );
    // ... and admits the new one.
    let out = seed("with-new", &new);
    assert!(out.status.success(), "{out:?}");
    // A follower enrolled before the rotation keeps its certificate.
    assert!(follower.stop().success());
    follower.spawn();
    follower.wait_state("live", T);
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
}

/// Without `--node-id`, a node's id is its host and a hash of its data
/// directory: the same after a restart (so a follower restarted during its
/// first seed is the node the leader handed a checkpoint to), and another
/// for another directory.
#[test]
fn a_node_keeps_its_default_id_across_restarts() {
    let d = dirs();
    let mut a = Proc::start(&d.path().join("a"), &[]);
    let id = a.status()["node_id"].as_str().expect("node_id").to_owned();
    a.stop();
    a.spawn();
    assert_eq!(a.status()["node_id"], id.as_str());
    let b = Proc::start(&d.path().join("b"), &[]);
    assert_ne!(b.status()["node_id"], id.as_str());
}
