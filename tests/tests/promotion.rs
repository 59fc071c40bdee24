//! Losing the leader, with real `ferry serve` processes: a follower is
//! promoted under a new history, the other follower of the same peer set
//! follows it without a re-seed, and the old leader, back with its peers
//! named, finds the newer history and fences itself.

use std::time::Duration;

use ferry_tests::{ferry_bin, get, put_bytes, verify, Proc};

const T: Duration = Duration::from_secs(90);

/// Runs `ferry promote`; returns its exit code and output.
fn promote(node: &Proc, force: bool) -> (i32, String) {
    let http = node.http.to_string();
    let mut args = vec!["promote", "--http", &http];
    if force {
        args.push("--force");
    }
    ferry_tests::ferry_status(&args)
}

#[test]
fn a_promoted_follower_leads_the_other_follows_it_and_the_old_leader_is_fenced() {
    let d = tempfile::tempdir().expect("tempdir");
    let (lq, f1q, f2q) = (Proc::free_addr(), Proc::free_addr(), Proc::free_addr());
    let mut leader = Proc::start_at(&d.path().join("leader"), lq, &["--node-id", "leader"]);
    leader.fill("base-", 2000, 200, 100);
    let token = leader.token();
    let peers = format!("{lq},{f1q},{f2q}");
    let follower = |name: &str, q| {
        Proc::start_at(
            &d.path().join(name),
            q,
            &["--node-id", name, "--follow", &peers, "--token", &token],
        )
    };
    let f1 = follower("f1", f1q);
    let f2 = follower("f2", f2q);
    f1.wait_state("live", T);
    f2.wait_state("live", T);
    assert_eq!(f2.status()["leader"], lq.to_string());
    let before = leader.fill("more-", 300, 50, 100);
    let history = leader.status()["history"]["id"].clone();

    // Refused on the leader, and while the leader is reachable.
    let (code, out) = promote(&leader, false);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("409") && out.contains("already the leader"),
        "{out}"
    );
    let (code, out) = promote(&f1, false);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("409") && out.contains("still reachable"),
        "{out}"
    );
    assert_eq!(f1.status()["role"], "follower");

    // The leader dies; both followers hold everything it acknowledged.
    for f in [&f1, &f2] {
        let r = get(&f.url(&format!("/v1/kv/more-00000299?min_seq={before}")));
        assert_eq!(r.status, 200);
    }
    leader.kill();
    f1.wait_state("unreachable", T);

    let (code, out) = promote(&f1, false);
    assert_eq!(code, 0, "{out}\n{}", f1.log_text());
    let s = f1.status();
    assert_eq!(
        (s["role"].as_str(), s["state"].as_str()),
        (Some("leader"), Some("leader")),
        "{s}"
    );
    // It has no CA key: status says it cannot renew, and the log says what to do.
    assert_eq!(s["certificate"]["renews"], false, "{s}");
    assert!(f1.log_text().contains("holds no CA key"));
    let new_history = s["history"]["id"].clone();
    assert_ne!(new_history, history, "a new term");
    assert!(out.contains(new_history.as_str().unwrap_or("?")), "{out}");
    assert_eq!(s["history"]["start"].as_u64(), s["seq"].as_u64(), "{s}");
    assert_eq!(
        s["history"]["terms"].as_array().map(Vec::len),
        Some(2),
        "{s}"
    );
    let (code, out) = promote(&f1, false);
    assert_ne!(code, 0, "promoting the new leader again: {out}");

    // The other follower finds the new leader by itself: no re-seed.
    f2.wait_until("f2 follows f1", T, |s| {
        s["leader"] == f1q.to_string() && s["state"] == "live"
    });
    let seq = f1.fill("after-", 300, 50, 100);
    let r = get(&f2.url(&format!("/v1/kv/after-00000299?min_seq={seq}")));
    assert_eq!(r.status, 200, "{}", r.text());
    let s2 = f2.status();
    assert_eq!(s2["reseeds"], 0, "{s2}");
    assert_eq!(s2["divergences"], 0, "{s2}");
    assert_eq!(s2["history"]["id"], new_history, "{s2}");
    let (code, out) = verify(&f1, &f2);
    assert_eq!(code, 0, "{out}");

    // The old leader comes back knowing its peers: it is fenced and takes
    // no writes.
    leader
        .args
        .extend(["--peers".to_owned(), format!("{f1q},{f2q}")]);
    leader.spawn();
    leader.wait_state("fenced", T);
    let s = leader.status();
    assert!(
        s["detail"].as_str().unwrap_or("").contains("promoted"),
        "{s}"
    );
    let r = put_bytes(&leader.url("/v1/kv/split-brain"), b"x");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("fenced"), "{}", r.text());
    // And the followers stay with the new leader.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f2.status()["leader"], f1q.to_string());
    assert_eq!(
        put_bytes(&f1.url("/v1/kv/still-writable"), b"y").status,
        200
    );
}

#[test]
fn a_malformed_peer_list_is_a_usage_error() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("n");
    for list in [
        "127.0.0.1:7400,bogus",
        "127.0.0.1:7400,,127.0.0.1:7401",
        "localhost",
    ] {
        let out = std::process::Command::new(ferry_bin())
            .args([
                "serve",
                "--data",
                data.to_str().expect("utf-8"),
                "--follow",
                list,
            ])
            .output()
            .expect("run ferry serve");
        assert_eq!(out.status.code(), Some(2), "--follow {list}: {out:?}");
    }
}
