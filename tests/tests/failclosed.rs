//! Leadership fails closed, with real `ferry serve` processes: a node that
//! followed never leads because a flag was missing at a restart, a fenced
//! leader stays fenced across restarts, and a promotion is refused while a
//! reachable follower holds more than the candidate.

use std::time::{Duration, Instant};

use ferry_tests::{ferry_bin, get, put_bytes, verify, Proc};

const T: Duration = Duration::from_secs(90);

/// Runs `ferry serve ARGS` expecting it to exit by itself; returns its exit
/// code and output. Fails (and kills it) if it is still running after 20 s.
fn serve_exits(args: &[String]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(ferry_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (out.status.code(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "ferry serve {args:?} kept running (it took leadership?): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `serve --data D --listen Q --http H`, nothing else: what a missing line
/// in an environment file leaves.
fn bare_args(p: &Proc) -> Vec<String> {
    vec![
        "serve".into(),
        "--data".into(),
        p.data.to_str().expect("utf-8").into(),
        "--listen".into(),
        p.quic.to_string(),
        "--http".into(),
        p.http.to_string(),
    ]
}

fn promote(node: &Proc, force: bool) -> (i32, String) {
    let http = node.http.to_string();
    let mut args = vec!["promote", "--http", &http];
    if force {
        args.push("--force");
    }
    ferry_tests::ferry_status(&args)
}

#[test]
fn a_follower_restarted_without_follow_refuses_to_lead_and_no_acknowledged_write_is_lost() {
    let d = tempfile::tempdir().expect("tempdir");
    let (lq, f1q, f2q) = (Proc::free_addr(), Proc::free_addr(), Proc::free_addr());
    let peers = format!("{lq},{f1q},{f2q}");
    let leader = Proc::start_at(
        &d.path().join("leader"),
        lq,
        &["--node-id", "leader", "--peers", &format!("{f1q},{f2q}")],
    );
    leader.fill("base-", 500, 100, 100);
    let token = leader.token();
    let follower = |name: &str, q| {
        Proc::start_at(
            &d.path().join(name),
            q,
            &["--node-id", name, "--follow", &peers, "--token", &token],
        )
    };
    let mut f1 = follower("f1", f1q);
    let f2 = follower("f2", f2q);
    f1.wait_state("live", T);
    f2.wait_state("live", T);

    // F1 is down; the leader takes 300 writes that F2 acknowledges.
    assert!(f1.stop().success());
    let mut acked = 0;
    for i in 0..300 {
        let r = put_bytes(&leader.url(&format!("/v1/kv/acked-{i:04}?acks=1")), b"v");
        assert_eq!(r.status, 200, "{}", r.text());
        acked = r.json()["seq"].as_u64().expect("seq");
    }

    // F1 comes back with only --data --listen --http: it must not lead.
    let (code, out) = serve_exits(&bare_args(&f1));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("--follow") && out.contains("ferry promote"),
        "the refusal says what to run instead: {out}"
    );
    // Nothing changed: the leader leads, unfenced, and takes writes.
    std::thread::sleep(Duration::from_secs(2));
    let s = leader.status();
    assert_eq!(s["state"], "leader", "{s}");
    assert!(s["fenced"].is_null(), "{s}");
    assert_eq!(put_bytes(&leader.url("/v1/kv/after"), b"x").status, 200);

    // Started properly, it rejoins and holds every acknowledged write.
    f1.spawn();
    f1.wait_state("live", T);
    let r = get(&f1.url(&format!("/v1/kv/acked-0299?min_seq={acked}")));
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out) = verify(&leader, &f1);
    assert_eq!(code, 0, "{out}");
    assert_eq!(f1.status()["reseeds"], 0);
}

#[test]
fn a_fenced_leader_stays_fenced_across_a_restart_with_no_peer_answering() {
    let d = tempfile::tempdir().expect("tempdir");
    let (lq, f1q) = (Proc::free_addr(), Proc::free_addr());
    let mut leader = Proc::start_at(&d.path().join("leader"), lq, &["--node-id", "leader"]);
    leader.fill("base-", 200, 50, 100);
    let token = leader.token();
    let peers = format!("{lq},{f1q}");
    let mut f1 = Proc::start_at(
        &d.path().join("f1"),
        f1q,
        &["--node-id", "f1", "--follow", &peers, "--token", &token],
    );
    f1.wait_state("live", T);
    leader.kill();
    f1.wait_state("unreachable", T);
    let (code, out) = promote(&f1, false);
    assert_eq!(code, 0, "{out}");

    // The old leader returns naming its peer: fenced.
    leader.args.extend(["--peers".to_owned(), f1q.to_string()]);
    leader.spawn();
    leader.wait_state("fenced", T);
    assert!(leader.stop().success());

    // Now no peer answers: a restart must not lead again.
    f1.kill();
    let mut args = bare_args(&leader);
    args.extend(["--peers".to_owned(), f1q.to_string()]);
    let (code, out) = serve_exits(&args);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("fenced"), "{out}");

    // With --follow it becomes a follower of the new leader, and its
    // fenced mark is gone: the operator decided.
    f1.spawn();
    f1.wait_state("leader", T);
    leader.args = bare_args(&leader);
    leader.args.extend([
        "--node-id".to_owned(),
        "leader".to_owned(),
        "--follow".to_owned(),
        peers.clone(),
    ]);
    leader.spawn();
    leader.wait_until("the old leader follows the new one", T, |s| {
        s["state"] == "live" && s["leader"] == f1q.to_string()
    });
    let (code, out) = verify(&f1, &leader);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn promotion_is_refused_while_another_reachable_follower_is_ahead() {
    let d = tempfile::tempdir().expect("tempdir");
    let (lq, f1q, f2q) = (Proc::free_addr(), Proc::free_addr(), Proc::free_addr());
    let peers = format!("{lq},{f1q},{f2q}");
    let mut leader = Proc::start_at(&d.path().join("leader"), lq, &["--node-id", "leader"]);
    leader.fill("base-", 200, 50, 100);
    let token = leader.token();
    let follower = |name: &str, q| {
        Proc::start_at(
            &d.path().join(name),
            q,
            &["--node-id", name, "--follow", &peers, "--token", &token],
        )
    };
    let mut f1 = follower("f1", f1q);
    let f2 = follower("f2", f2q);
    f1.wait_state("live", T);
    f2.wait_state("live", T);

    // F1 falls behind (stopped); F2 acknowledges writes F1 never gets.
    assert!(f1.stop().success());
    let mut acked = 0;
    for i in 0..50 {
        let r = put_bytes(&leader.url(&format!("/v1/kv/only-f2-{i:04}?acks=1")), b"v");
        assert_eq!(r.status, 200, "{}", r.text());
        acked = r.json()["seq"].as_u64().expect("seq");
    }
    leader.kill();
    f1.spawn();
    f1.wait_state("unreachable", T);
    f2.wait_state("unreachable", T);

    // F1 is behind F2: refused, naming F2.
    let (code, out) = promote(&f1, false);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("409") && out.contains(&f2q.to_string()) && out.contains("ahead"),
        "{out}"
    );
    assert_eq!(f1.status()["role"], "follower");

    // F2 holds every acknowledged write: it may lead, and F1 follows it
    // without losing anything.
    let (code, out) = promote(&f2, false);
    assert_eq!(code, 0, "{out}");
    f1.wait_until("f1 follows f2", T, |s| {
        s["state"] == "live" && s["leader"] == f2q.to_string()
    });
    let r = get(&f1.url(&format!("/v1/kv/only-f2-0049?min_seq={acked}")));
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out) = verify(&f2, &f1);
    assert_eq!(code, 0, "{out}");
}
