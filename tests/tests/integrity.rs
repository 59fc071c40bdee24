//! Corruption at rest and full disks, with real `ferry serve` processes:
//! a scrub finds a rotted SST, a follower repairs itself by a re-seed that
//! fetches only the damaged chunks, a leader refuses to ship what rotted,
//! and a seed into a full disk fails clearly and resumes once there is room.

use std::process::Command;
use std::time::Duration;

use ferry_tests::{ferry_bin, ferry_status, rot_largest_sst, verify, Proc};

const T: Duration = Duration::from_secs(90);

/// `ferry scrub --http ADDR`: exit code and output.
fn scrub(node: &Proc) -> (i32, String) {
    ferry_status(&["scrub", "--http", &node.http.to_string()])
}

/// Rots the largest SST in `dir`; returns its file name.
fn rot(dir: &std::path::Path) -> String {
    rot_largest_sst(dir)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_follower_repairs_a_rotted_sst_fetching_only_the_damaged_chunk() {
    let d = tempfile::tempdir().expect("tempdir");
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    // About 16 MB of SSTs: 1 MiB chunks, so one damaged chunk is a small part.
    leader.fill("base-", 80_000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let fdir = d.path().join("f1");
    let follower = Proc::follower(
        &fdir,
        "f1",
        leader.quic,
        &leader.token(),
        &["--reseed-backoff-secs", "1"],
    );
    follower.wait_state("live", T);
    let (code, out) = scrub(&follower);
    assert_eq!(code, 0, "a sound follower scrubs clean: {out}");

    // Bit rot in the middle of the follower's largest SST.
    let name = rot(&fdir);

    let (code, out) = scrub(&follower);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&name) && out.contains("re-seeding"), "{out}");
    follower.wait_until("repaired by a re-seed", T, |s| {
        s["state"] == "live" && s["reseeds"] == 1
    });
    let seed = &follower.status()["last_seed"];
    let (total, fetched, reused) = (
        seed["bytes_total"].as_u64().expect("total"),
        seed["bytes_fetched"].as_u64().expect("fetched"),
        seed["bytes_reused"].as_u64().expect("reused"),
    );
    assert!(
        reused > total * 3 / 4 && fetched < total / 6,
        "the repair reused the sound chunks and fetched the damaged one: {seed}"
    );
    assert!(follower.metric("ferry_corrupt_files_total") >= 1.0);
    let (code, out) = scrub(&follower);
    assert_eq!(code, 0, "repaired: {out}");
    let (code, out) = verify(&leader, &follower);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_leader_with_a_rotted_sst_reports_it_and_ships_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let ldir = d.path().join("leader");
    let leader = Proc::start(&ldir, &["--node-id", "leader"]);
    leader.fill("base-", 20_000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let name = rot(&ldir);

    let (code, out) = scrub(&leader);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&name) && out.contains("promote"), "{out}");

    // A new node's seed is refused with the reason, and nothing is installed.
    let target = d.path().join("new");
    let (code, text) = ferry_status(&[
        "seed",
        "--no-progress",
        "--leader",
        &leader.quic.to_string(),
        "--token",
        &leader.token(),
        "--data",
        target.to_str().expect("utf-8"),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("corrupt") && text.contains(&name), "{text}");
    assert!(!target.join("CURRENT").exists());
    assert!(leader.metric("ferry_corrupt_files_total") >= 2.0);
    // The leader still takes writes.
    assert_eq!(
        ferry_tests::put_bytes(&leader.url("/v1/kv/after"), b"rot").status,
        200
    );
}

/// Runs `script` with `sh` in a private mount namespace (as root, or as
/// root of a new user namespace otherwise), so it can mount a small tmpfs
/// that vanishes with it.
fn in_mount_namespace(script: &str, env: &[(&str, &std::path::Path)]) -> std::process::Output {
    let root = running_as_root();
    let mut cmd = Command::new("unshare");
    if !root {
        cmd.arg("--map-root-user");
    }
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run unshare (util-linux)");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("unshare failed"),
        "cannot make a mount namespace for the disk-full test: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The leader's address and token as `ferry seed` arguments into `$MNT/db`.
fn seed_cmd(leader: &Proc) -> String {
    format!(
        "\"$FERRY\" seed --no-progress --json --leader {} --token {} --data \"$MNT/db\"",
        leader.quic,
        leader.token()
    )
}

/// Runs `script` in a mount namespace with `$FERRY`, `$MNT` (an empty
/// directory for a tmpfs) and `$OUT` (outside it) set; returns a reader of
/// the files the script left in `$OUT`.
fn run_disk_script(d: &std::path::Path, script: &str) -> impl Fn(&str) -> String {
    let (mnt, out_dir) = (d.join("small-disk"), d.join("out"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let ferry = ferry_bin();
    let out = in_mount_namespace(
        script,
        &[("FERRY", &ferry), ("MNT", &mnt), ("OUT", &out_dir)],
    );
    assert!(
        out.status.success(),
        "the script failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
    );
    move |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap_or_default()
}

fn bits(b: &[u8]) -> u32 {
    b.iter().skip(32).map(|x| x.count_ones()).sum()
}

fn assert_leaders_data(leader: &Proc, digest_json: &str) {
    let digest: serde_json::Value = serde_json::from_str(digest_json).expect("digest");
    let lead = ferry_tests::get(&leader.url("/v1/digest")).ok_json();
    assert_eq!(digest["digest"], lead["digest"], "{digest} vs {lead}");
    assert_eq!(leader.status()["state"], "leader");
    assert_eq!(
        ferry_tests::put_bytes(&leader.url("/v1/kv/after"), b"full").status,
        200
    );
}

#[test]
fn a_seed_too_big_for_the_disk_is_refused_before_fetching_and_resumes_with_room() {
    let d = tempfile::tempdir().expect("tempdir");
    let leader = Proc::start(&d.path().join("leader"), &["--node-id", "leader"]);
    // About 16 MB of SSTs for a 6 MB disk.
    leader.fill("base-", 80_000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let seed = seed_cmd(&leader);
    let read = run_disk_script(
        d.path(),
        &format!(
            "set -u
             mount -t tmpfs -o size=6m tmpfs \"$MNT\" || exit 90
             {seed} > \"$OUT/first.json\" 2> \"$OUT/first.err\"; echo $? > \"$OUT/first.code\"
             mount -o remount,size=200m \"$MNT\" || exit 91
             {seed} > \"$OUT/second.json\" 2> \"$OUT/second.err\"; echo $? > \"$OUT/second.code\"
             \"$FERRY\" digest --json --data \"$MNT/db\" > \"$OUT/digest.json\" 2>&1"
        ),
    );
    assert_ne!(read("first.code").trim(), "0", "{}", read("first.json"));
    let err = read("first.err");
    assert!(
        err.contains("is full") && err.contains("needs") && err.contains("resumes"),
        "{err}"
    );
    assert_eq!(read("second.code").trim(), "0", "{}", read("second.err"));
    assert_leaders_data(&leader, &read("digest.json"));
}

#[test]
fn a_disk_that_fills_during_a_seed_fails_it_clearly_and_the_seed_resumes() {
    let d = tempfile::tempdir().expect("tempdir");
    // A slow link, so the disk fills while the seed runs.
    let leader = Proc::start(
        &d.path().join("leader"),
        &[
            "--node-id",
            "leader",
            "--max-rate",
            "4M",
            "--compression",
            "off",
        ],
    );
    leader.fill("base-", 80_000, 1000, 200);
    ferry_tests::post(&leader.url("/v1/admin/flush")).ok_json();
    let seed = seed_cmd(&leader);
    // The seed starts on a 40 MB disk; after 2 s another writer takes all
    // the free space; once the seed has failed, that file is removed and
    // the seed runs again.
    let read = run_disk_script(
        d.path(),
        &format!(
            "set -u
             mount -t tmpfs -o size=40m tmpfs \"$MNT\" || exit 90
             {seed} > \"$OUT/first.json\" 2> \"$OUT/first.err\" &
             pid=$!
             sleep 2
             dd if=/dev/zero of=\"$MNT/filler\" bs=64k 2>/dev/null
             wait $pid; echo $? > \"$OUT/first.code\"
             cp \"$MNT/db/.ferry/seed/verified.bin\" \"$OUT/verified.bin\"
             rm -f \"$MNT/filler\"
             {seed} > \"$OUT/second.json\" 2> \"$OUT/second.err\"; echo $? > \"$OUT/second.code\"
             \"$FERRY\" digest --json --data \"$MNT/db\" > \"$OUT/digest.json\" 2>&1"
        ),
    );
    assert_ne!(read("first.code").trim(), "0", "{}", read("first.json"));
    let err = read("first.err");
    assert!(err.contains("disk is full"), "{err}");
    // What was verified before the disk filled was kept...
    let kept = bits(&std::fs::read(d.path().join("out/verified.bin")).unwrap_or_default());
    assert!(kept > 0, "no verified chunk was kept: {err}");
    // ...and the second run resumed from it.
    assert_eq!(read("second.code").trim(), "0", "{}", read("second.err"));
    let report: serde_json::Value =
        serde_json::from_str(&read("second.json")).expect("seed report");
    assert!(
        report["chunks_resumed"].as_u64().expect("resumed") >= u64::from(kept),
        "{report}"
    );
    assert_leaders_data(&leader, &read("digest.json"));
}
