//! No silent forks, with real `ferry serve` processes: a leader restored
//! from an older copy reuses sequence numbers for different writes; its
//! follower must be refused as diverged (with the reason, a status and a
//! metric) and re-seed to exactly the leader's content, or stay diverged
//! with `--on-divergence stop`. The history persists across restarts.

use std::time::Duration;

use ferry_tests::{get, verify, Proc};

const T: Duration = Duration::from_secs(90);

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

/// Leader L and follower F live; L is stopped and its directory copied;
/// L takes `lost` writes that F applies; L is replaced by the copy and
/// takes `other` different writes.
/// With `crash`, the follower is killed with `kill -9` and its remembered
/// last write removed, as if it died before first writing it down: the
/// proof then comes from its own WAL.
fn fork(extra_follower_flags: &[&str], crash: bool) -> (tempfile::TempDir, Proc, Proc) {
    let d = tempfile::tempdir().expect("tempdir");
    let ldir = d.path().join("leader");
    let mut leader = Proc::start(&ldir, &["--node-id", "leader"]);
    leader.fill("base-", 3000, 500, 100);
    let mut flags = vec![
        "--node-id".to_owned(),
        "f1".to_owned(),
        "--follow".to_owned(),
        leader.quic.to_string(),
        "--token".to_owned(),
        leader.token(),
    ];
    flags.extend(extra_follower_flags.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut follower = Proc::start(&d.path().join("f1"), &flags);
    follower.wait_state("live", T);
    let history = leader.status()["history"]["id"].clone();
    assert!(history.is_string(), "{}", leader.status());

    // A copy taken while the leader is stopped: what a restore brings back.
    assert!(leader.stop().success());
    copy_dir(&ldir, &d.path().join("leader-copy"));
    leader.spawn();
    assert_eq!(
        leader.status()["history"]["id"],
        history,
        "the history persists across restarts"
    );
    let lost = leader.fill("lost-", 500, 50, 100);
    let r = get(&follower.url(&format!("/v1/kv/lost-00000499?min_seq={lost}")));
    assert_eq!(
        r.status, 200,
        "the follower applied the writes the leader will lose"
    );

    // The leader comes back without them and takes different writes on the
    // same sequence numbers, while the follower is down; then the follower
    // asks for everything after its sequence, which the leader now has.
    if crash {
        follower.kill();
        let proof = d.path().join("f1/.ferry/replica.json");
        let _ = std::fs::remove_file(&proof);
    } else {
        assert!(follower.stop().success());
    }
    leader.kill();
    std::fs::remove_dir_all(&ldir).expect("rm");
    std::fs::rename(d.path().join("leader-copy"), &ldir).expect("restore");
    leader.spawn();
    let other = leader.fill("other-", 800, 50, 100);
    assert!(other > lost, "the leader reuses the follower's sequences");
    follower.spawn();
    (d, leader, follower)
}

#[test]
fn a_follower_of_a_leader_that_lost_writes_is_refused_and_reseeds_to_its_content() {
    let (_d, leader, follower) = fork(&[], false);
    // Refused with the reason, never silently live on a fork: it re-seeds
    // and ends with exactly the leader's content.
    follower.wait_until("no re-seed after the divergence", T, |s| {
        s["state"] == "live" && s["divergences"].as_u64() >= Some(1)
    });
    let log = follower.log_text();
    assert!(
        log.contains("differs from this leader's"),
        "the log says why: {log}"
    );
    assert!(follower.metric("ferry_divergences_total") >= 1.0);
    assert!(leader.log_text().contains("refusing a diverged follower"));
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        get(&follower.url("/v1/kv/lost-00000499")).status,
        404,
        "the lost writes are gone from the follower too"
    );
}

#[test]
fn with_on_divergence_stop_the_follower_stays_diverged_with_the_reason() {
    // Killed before it wrote down its last write: it still proves it.
    let (_d, _leader, follower) = fork(&["--on-divergence", "stop"], true);
    follower.wait_state("diverged", T);
    let s = follower.status();
    let detail = s["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains("differs from this leader's"), "{s}");
    assert_eq!(s["reseeds"], 0);
    // It keeps what it had, and stays diverged.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(follower.status()["state"], "diverged");
    assert_eq!(get(&follower.url("/v1/kv/lost-00000499")).status, 200);
}

#[test]
fn semi_synchronous_writes_are_readable_on_the_follower_at_once() {
    let d = tempfile::tempdir().expect("tempdir");
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    let mut follower = Proc::follower(
        &d.path().join("f1"),
        "f1",
        leader.quic,
        &leader.token(),
        &[],
    );
    follower.wait_state("live", T);
    for i in 0..100 {
        let r = ferry_tests::put_bytes(
            &leader.url(&format!("/v1/kv/sync-{i}?acks=1")),
            format!("v{i}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        // No min_seq: acknowledged means applied there.
        let g = get(&follower.url(&format!("/v1/kv/sync-{i}")));
        assert_eq!((g.status, g.text()), (200, format!("v{i}")), "write {i}");
    }
    let b = ferry_tests::post_json(
        &leader.url("/v1/batch?acks=1"),
        &serde_json::json!({"ops": [{"op": "put", "key": "b1", "value": "x"}, {"op": "delete", "key": "sync-0"}]}),
    );
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(get(&follower.url("/v1/kv/sync-0")).status, 404);
    let st = leader.status();
    assert_eq!(st["followers"][0]["in_sync"], true, "{st}");

    // More acknowledgements than followers: a 504 after the timeout.
    let t = std::time::Instant::now();
    let r = ferry_tests::put_bytes(&leader.url("/v1/kv/two?acks=2&timeout_ms=300"), b"v");
    assert_eq!(r.status, 504, "{}", r.text());
    let v = r.json();
    assert_eq!(v["acked"], 1, "{v}");
    assert!(v["seq"].as_u64().is_some(), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("remains on the leader"),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // No follower at all: the write fails within its timeout, never hangs.
    follower.kill();
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    let r = ferry_tests::delete(&leader.url("/v1/kv/b1?acks=1&timeout_ms=500"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["acked"], 0);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // It stays on the leader.
    assert_eq!(get(&leader.url("/v1/kv/b1")).status, 404);
}

/// The issue-25 fork: the follower's last two writes were single PUTs; the
/// leader, restored from a copy taken before them, takes one two-op batch
/// over the same sequences and then 100 more writes. No batch of the
/// leader starts where the follower's last write starts, which once looked
/// like a purged WAL and was accepted. It must be refused, the follower's
/// database set aside (not deleted) and its lost writes exportable.
#[test]
fn a_fork_that_cuts_the_same_sequences_into_other_batches_is_refused_and_set_aside() {
    let d = tempfile::tempdir().expect("tempdir");
    let ldir = d.path().join("leader");
    let mut leader = Proc::start(&ldir, &["--node-id", "leader"]);
    leader.fill("base-", 300, 50, 100);
    let fdir = d.path().join("f1");
    let mut follower = Proc::follower(&fdir, "f1", leader.quic, &leader.token(), &[]);
    follower.wait_state("live", T);
    assert!(leader.stop().success());
    copy_dir(&ldir, &d.path().join("leader-copy"));
    leader.spawn();
    leader.put("lost-1", b"first");
    let lost = leader.put("lost-2", b"second");
    let r = get(&follower.url(&format!("/v1/kv/lost-2?min_seq={lost}")));
    assert_eq!(r.status, 200, "the follower applied both single puts");
    assert!(follower.stop().success());
    leader.kill();
    std::fs::remove_dir_all(&ldir).expect("rm");
    std::fs::rename(d.path().join("leader-copy"), &ldir).expect("restore");
    leader.spawn();
    let other = leader.fill("other-", 2, 2, 100);
    assert_eq!(
        other, lost,
        "one batch over exactly the follower's two writes"
    );
    leader.fill("more-", 100, 1, 100);

    follower.spawn();
    follower.wait_until("refused and re-seeded", T, |s| {
        s["state"] == "live" && s["divergences"].as_u64() >= Some(1)
    });
    assert!(
        follower.log_text().contains("differs from this leader's"),
        "{}",
        follower.log_text()
    );
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
    assert_eq!(get(&follower.url("/v1/kv/lost-2")).status, 404);

    // Kept aside, with the sequences it held, and exportable.
    let s = follower.status();
    let aside = s["set_aside"].as_array().cloned().unwrap_or_default();
    assert_eq!(aside.len(), 1, "{s}");
    assert_eq!(aside[0]["seq"].as_u64(), Some(lost), "{s}");
    let name = aside[0]["name"].as_str().expect("name").to_owned();
    let data = fdir.to_str().expect("utf-8");
    let out = ferry_tests::ferry(&[
        "aside",
        "--data",
        data,
        "--export",
        &name,
        "--from",
        &(lost - 1).to_string(),
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["key"], "lost-1", "{out}");
    assert_eq!(lines[1]["key"], "lost-2", "{out}");
    assert_eq!(lines[1]["value"], "second", "{out}");
    assert_eq!(lines[1]["seq"].as_u64(), Some(lost), "{out}");
    let listed = ferry_tests::ferry(&["aside", "--data", data]);
    assert!(listed.contains(&name), "{listed}");
}
