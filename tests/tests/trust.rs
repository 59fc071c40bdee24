//! Certificates with real `ferry serve` processes: short-lived certificates
//! renew before they expire (the leader's own and its followers'), an
//! enrolled follower survives a token rotation, and a revoked node is cut
//! off at once.

use std::time::{Duration, Instant};

use ferry_tests::{verify, Proc};
use ferry_transfer::auth::{pem_certs, validity};

const T: Duration = Duration::from_secs(90);

/// The validity (Unix seconds) of the node certificate under `data`.
fn cert_validity(data: &std::path::Path) -> (i64, i64) {
    let pem = std::fs::read_to_string(data.join(".ferry/tls/node.pem")).expect("node.pem");
    validity(&pem_certs(&pem).expect("pem")[0]).expect("validity")
}

#[test]
fn short_lived_certificates_renew_and_the_cluster_outlives_the_first_ones() {
    let d = tempfile::tempdir().expect("tempdir");
    let (ldir, fdir) = (d.path().join("leader"), d.path().join("f1"));
    let leader = Proc::start(
        &ldir,
        &["--node-id", "leader", "--cert-lifetime-secs", "12"],
    );
    leader.fill("base-", 2000, 500, 100);
    let mut follower = Proc::follower(&fdir, "f1", leader.quic, &leader.token(), &[]);
    follower.wait_state("live", T);
    let (l0, f0) = (cert_validity(&ldir), cert_validity(&fdir));
    assert!(f0.1 - f0.0 <= 12 + 300, "a short-lived certificate: {f0:?}");
    // Both renew once a third of the lifetime is left, well before expiry.
    let deadline = Instant::now() + T;
    while cert_validity(&ldir).1 <= l0.1 || cert_validity(&fdir).1 <= f0.1 {
        assert!(
            Instant::now() < deadline,
            "no renewal: leader {:?} follower {:?}\n{}",
            cert_validity(&ldir),
            cert_validity(&fdir),
            follower.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Status and metrics report the renewed expiry.
    let st = leader.status();
    assert_eq!(st["certificate"]["renews"], true, "{st}");
    assert!(st["certificate"]["expires_unix"].as_i64().expect("expiry") > l0.1);
    assert!(leader.metric("ferry_certificate_expiry_timestamp_seconds") > l0.1 as f64);
    // Past the first certificates' expiry, a restarted follower connects
    // with the renewed ones and catches up.
    let now = ferry_transfer::auth::unix_now();
    let past = (l0.1.max(f0.1) - now + 1).max(0) as u64;
    std::thread::sleep(Duration::from_secs(past));
    follower.kill();
    leader.fill("later-", 500, 500, 100);
    follower.spawn();
    follower.wait_state("live", T);
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn an_enrolled_follower_survives_a_token_rotation_and_a_revoked_one_is_cut_off() {
    let d = tempfile::tempdir().expect("tempdir");
    let (ldir, fdir) = (d.path().join("leader"), d.path().join("f1"));
    let leader = Proc::start(&ldir, &["--node-id", "leader"]);
    leader.fill("base-", 2000, 500, 100);
    let mut follower = Proc::follower(&fdir, "f1", leader.quic, &leader.token(), &[]);
    follower.wait_state("live", T);

    // A rotation does not lock out an enrolled follower: it authenticates
    // with its certificate, not the old secret.
    ferry_tests::ferry(&["token", "--rotate", "--data", ldir.to_str().expect("utf-8")]);
    follower.kill();
    leader.fill("later-", 500, 500, 100);
    follower.spawn();
    follower.wait_state("live", T);
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");

    // A revocation closes its connection within a second or two and keeps
    // it out.
    let out = ferry_tests::ferry(&[
        "revoke",
        "--data",
        ldir.to_str().expect("utf-8"),
        "--node",
        "f1",
    ]);
    assert!(
        out.contains("revoked f1") && out.contains("ferry2-"),
        "{out}"
    );
    let deadline = Instant::now() + T;
    loop {
        let st = leader.status();
        let live = st["followers"].as_array().is_some_and(|fs| {
            fs.iter()
                .any(|f| f["node_id"] == "f1" && f["state"] == "live")
        });
        if !live && follower.log_text().contains("revoked") {
            break;
        }
        assert!(Instant::now() < deadline, "still connected: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Writes no longer reach it.
    let before = follower.status()["seq"].as_u64().expect("seq");
    leader.fill("after-revoke-", 200, 100, 50);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(follower.status()["seq"].as_u64().expect("seq"), before);
}
