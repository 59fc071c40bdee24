//! Proofs of history, engine level: a follower proves it holds its leader's
//! operations by hashes of its own operations, and the leader recomputes
//! them from its feed or WAL. These tests attack the proof the way a fork
//! does: the same sequences cut into different batches, ranges that start
//! and end inside batches, a WAL read after a restart (no feed), and a WAL
//! purged past the proof, which is the only case that may say "cannot
//! check".

use ferry_engine::{Batch, RawBatch, Store, StoreOptions, WriteId, PROOF_WINDOWS};
use ferry_tests::temp_store;

fn opts() -> StoreOptions {
    StoreOptions {
        durable_shipping: false,
        ..StoreOptions::default()
    }
}

/// Writes `ops` puts, cut into batches of the given sizes (cycled).
fn write_cut(store: &Store, prefix: &str, ops: usize, sizes: &[usize]) {
    let mut i = 0;
    let mut k = 0;
    while i < ops {
        let n = sizes[k % sizes.len()].min(ops - i);
        let mut b = Batch::new();
        for j in i..i + n {
            b.put(format!("{prefix}{j:06}"), format!("value-{j}"));
        }
        store.write(&b).expect("write");
        i += n;
        k += 1;
    }
}

/// Every batch of `from`'s WAL, applied to `to` in groups of `group`.
fn replicate(from: &Store, to: &Store, group: usize) {
    let batches: Vec<RawBatch> = from
        .wal_since(to.latest_seq())
        .expect("wal")
        .map(|b| b.expect("batch"))
        .collect();
    for g in batches.chunks(group) {
        to.apply_many(g).expect("apply");
    }
}

fn reopen(dir: &std::path::Path, store: Store) -> Store {
    drop(store);
    Store::open(dir, opts()).expect("reopen")
}

/// The leader's verdict on each of a follower's proofs.
fn check(leader: &Store, proofs: &[WriteId]) -> Vec<Option<bool>> {
    proofs
        .iter()
        .map(|w| {
            leader
                .range_hash(w.first, w.last)
                .expect("the range must be hashable or purged, never an error")
                .map(|l| l.hash == w.hash)
        })
        .collect()
}

#[test]
fn the_same_operations_in_different_batches_prove_the_same_history() {
    // The follower applies the leader's batches of 3 in groups of 5; a
    // promoted peer wrote them as batches of 7: records, not cuts, count.
    let (_dl, leader) = temp_store(opts());
    let (_df, follower) = temp_store(opts());
    let (_dp, peer) = temp_store(opts());
    write_cut(&leader, "k", 500, &[3]);
    write_cut(&peer, "k", 500, &[7]);
    replicate(&leader, &follower, 5);
    assert_eq!(follower.latest_seq(), 500);
    let proofs = follower.proofs(500);
    assert_eq!(proofs.len(), PROOF_WINDOWS.len(), "{proofs:?}");
    assert_eq!(proofs[0].first, 500, "the shortest window starts mid-batch");
    for store in [&leader, &peer] {
        assert!(check(store, &proofs).iter().all(|v| *v == Some(true)));
    }
    // Also from the WAL alone, after restarts (no feed).
    let (dl, dp) = (_dl.path().to_owned(), _dp.path().to_owned());
    let leader = reopen(&dl, leader);
    let peer = reopen(&dp, peer);
    let follower = reopen(_df.path(), follower);
    let again = follower.proofs(500);
    assert_eq!(
        again, proofs,
        "proofs from the WAL equal proofs from memory"
    );
    for store in [&leader, &peer] {
        assert!(check(store, &proofs).iter().all(|v| *v == Some(true)));
    }
}

#[test]
fn a_fork_over_the_same_sequences_in_other_batches_is_a_mismatch_never_unknown() {
    // The issue's case: the follower's last two writes were single puts;
    // the restored leader wrote one two-op batch over the same sequences
    // (other values), then more. Every window must say "differs".
    for (follower_cut, fork_cut) in [(&[1usize][..], &[2usize][..]), (&[2], &[1]), (&[3], &[5])] {
        let (_dl, leader) = temp_store(opts());
        let (_df, follower) = temp_store(opts());
        write_cut(&leader, "base", 100, &[4]);
        replicate(&leader, &follower, 3);
        // The follower receives writes the leader will lose.
        let (_dx, lost) = temp_store(opts());
        replicate(&leader, &lost, 1);
        write_cut(&lost, "lost", 6, follower_cut);
        replicate(&lost, &follower, 1);
        // The leader takes other writes on the same sequences.
        write_cut(&leader, "other", 6, fork_cut);
        write_cut(&leader, "more", 100, &[1]);
        let at = follower.latest_seq();
        assert_eq!(at, 106);
        let proofs = follower.proofs(at);
        assert!(!proofs.is_empty());
        let verdicts = check(&leader, &proofs);
        assert!(
            verdicts.iter().all(|v| *v == Some(false)),
            "cuts {follower_cut:?} vs {fork_cut:?}, from the feed: {verdicts:?}"
        );
        let leader = reopen(_dl.path(), leader);
        let verdicts = check(&leader, &proofs);
        assert!(
            verdicts.iter().all(|v| *v == Some(false)),
            "cuts {follower_cut:?} vs {fork_cut:?}, from the WAL: {verdicts:?}"
        );
    }
}

#[test]
fn the_last_operation_alone_catches_a_fork_inside_one_batch() {
    // Same keys, same batch cut, one value differs in the middle of the
    // last batch: the one-op window passes, the longer ones fail.
    let (_dl, leader) = temp_store(opts());
    let (_df, follower) = temp_store(opts());
    write_cut(&leader, "k", 10, &[10]);
    let mut b = Batch::new();
    b.put("x1", "a").put("x2", "same").put("x3", "same");
    leader.write(&b).expect("write");
    let mut b = Batch::new();
    b.put("x1", "B").put("x2", "same").put("x3", "same");
    replicate(&leader, &follower, 1);
    // Rewrite the follower's view: a store with the other middle value.
    let (_dg, fork) = temp_store(opts());
    write_cut(&fork, "k", 10, &[10]);
    fork.write(&b).expect("write");
    let proofs = fork.proofs(13);
    let verdicts = check(&leader, &proofs);
    assert_eq!(verdicts[0], Some(true), "x3 is the same");
    assert!(
        verdicts[1..].iter().all(|v| *v == Some(false)),
        "{verdicts:?}"
    );
    assert!(check(&leader, &follower.proofs(13))
        .iter()
        .all(|v| *v == Some(true)));
}

#[test]
fn only_a_wal_purged_past_the_proof_cannot_be_checked() {
    // No retention: a flush makes the old WAL obsolete and it is deleted.
    // A feed of one batch: everything else comes from the WAL.
    let no_retention = StoreOptions {
        wal_ttl_seconds: 0,
        wal_size_limit_mb: 0,
        feed: ferry_engine::FeedLimits {
            max_batches: 1,
            max_bytes: 1,
        },
        ..opts()
    };
    let (_d, leader) = temp_store(no_retention);
    write_cut(&leader, "a", 50, &[5]);
    leader.flush().expect("flush");
    write_cut(&leader, "b", 50, &[5]);
    let oldest = leader.oldest_wal_seq().expect("oldest").expect("some");
    assert!(oldest > 40, "the first WAL was purged (oldest {oldest})");
    assert_eq!(
        leader.range_hash(40, 60).expect("purged is not an error"),
        None
    );
    assert!(leader.range_hash(oldest, 100).expect("hash").is_some());
    // Its own proofs are clipped to where its WAL starts.
    let proofs = leader.proofs(100);
    assert!(
        proofs.iter().all(|w| w.first >= oldest && w.last == 100),
        "{proofs:?}"
    );
    assert!(proofs.iter().any(|w| w.first == oldest), "{proofs:?}");
}

#[test]
fn a_store_remembers_the_seed_checkpoints_it_issued_and_only_those() {
    // The proof of last resort: when the WAL no longer reaches a follower
    // seeded from a checkpoint, the leader accepts the checkpoint's manifest
    // id, but only one it issued itself, at that sequence, and remembered
    // across a restart.
    let (d, leader) = temp_store(opts());
    write_cut(&leader, "a", 30, &[3]);
    assert!(leader.issued().is_empty());
    let cp = leader.checkpoint_tagged("seed").expect("checkpoint");
    let (manifest, _) = leader.manifest(&cp).expect("manifest");
    let want = ferry_engine::Issued {
        seq: cp.seq,
        manifest: manifest.id().0,
    };
    assert_eq!(leader.issued(), vec![want]);
    // The id is the manifest as it goes on the wire: a follower computes
    // the same from the bytes it received.
    let decoded = ferry_engine::Manifest::decode(&manifest.encode()).expect("decode");
    assert_eq!(decoded.id().0, want.manifest);
    let leader = reopen(d.path(), leader);
    assert_eq!(leader.issued(), vec![want], "kept across a restart");
    // Bounded: the oldest are forgotten first.
    for i in 0..ferry_engine::MAX_ISSUED as u64 + 5 {
        leader.record_issued(1000 + i, [7; 32]).expect("record");
    }
    let all = leader.issued();
    assert_eq!(all.len(), ferry_engine::MAX_ISSUED);
    assert!(!all.contains(&want), "the oldest is forgotten");
    // An unreadable record reads as none, never as a match.
    std::fs::write(
        ferry_engine::ferry_dir(d.path()).join("issued.json"),
        b"{not json",
    )
    .expect("write");
    assert!(leader.issued().is_empty());
}
