//! The storage engine: checkpoints, manifests, WAL catch-up, the applier,
//! digests, adoption of databases written by RocksDB's own tools.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_engine::manifest::{chunk_hash, hash_file};
use ferry_engine::{DivergenceError, Error, Store, StoreOptions};
use ferry_tests::{copy_files, db_bench_fill, ferry, fill, rocksdb_tool, temp_store};

/// These tests are about RocksDB mechanics (checkpoints, the WAL reader,
/// the applier) under concurrent writers, not durability: writes skip the
/// per-group WAL sync so that they make progress on a slow disk.
fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 * 1024,
        durable_shipping: false,
        ..StoreOptions::default()
    }
}

#[test]
fn checkpoint_under_concurrent_writers_holds_exactly_the_writes_up_to_its_sequence() {
    let (_d, store) = temp_store(opts());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut log = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{t}-{i:08}");
                    let r = store.put(key.clone(), vec![t as u8; 100]).unwrap();
                    assert_eq!(r.first, r.last);
                    log.push((key, r.last));
                    i += 1;
                    if i % 500 == 0 {
                        store.flush().unwrap();
                    }
                }
                log
            })
        })
        .collect();
    let mut cps = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(60));
        cps.push(store.checkpoint().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let log: Vec<(String, u64)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        log.len() > 1000,
        "writers made too little progress: {}",
        log.len()
    );
    for cp in &cps {
        let snap = Store::open_read_only(&cp.path).unwrap();
        assert_eq!(snap.latest_seq(), cp.seq);
        let (mut inside, mut outside) = (0, 0);
        for (key, seq) in &log {
            let present = snap.get(key.as_bytes()).unwrap().0.is_some();
            assert_eq!(
                present,
                *seq <= cp.seq,
                "key {key} at seq {seq}, checkpoint at {}",
                cp.seq
            );
            if present {
                inside += 1
            } else {
                outside += 1
            }
        }
        assert!(
            inside > 0 && outside > 0,
            "checkpoint should split the writes: {inside}/{outside}"
        );
    }
}

#[test]
fn wal_catch_up_from_a_checkpoint_reaches_the_leader_digest() {
    let (_d, leader) = temp_store(opts());
    fill(&leader, 2000, 1);
    leader.flush().unwrap();
    fill(&leader, 500, 2);
    let cp = leader.checkpoint().unwrap();
    // Writes after the checkpoint, across a flush (a new WAL file).
    fill(&leader, 1000, 3);
    leader.flush().unwrap();
    fill(&leader, 1000, 4);

    let fdir = tempfile::tempdir().unwrap();
    copy_files(&cp.path, fdir.path());
    let follower = Store::open(fdir.path(), opts()).unwrap();
    assert_eq!(follower.latest_seq(), cp.seq);
    let mut applied = 0;
    for b in leader.wal_since(cp.seq).unwrap() {
        follower.apply(&b.unwrap()).unwrap();
        applied += 1;
    }
    assert_eq!(applied, 2000);
    assert_eq!(follower.latest_seq(), leader.latest_seq());
    assert_eq!(follower.digest().unwrap(), leader.digest().unwrap());
}

/// The `.sst` files directly in `dir`.
fn tables(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sst"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_checkpoint_takes_the_memtable_from_the_wal_without_flushing_it() {
    let (_d, leader) = temp_store(opts());
    fill(&leader, 1000, 11);
    leader.flush().unwrap();
    // These stay in the memtable: a flush for the checkpoint would write
    // them to a new L0 table, and that table can start a compaction.
    fill(&leader, 1000, 12);
    let before = tables(leader.path());
    let cp = leader.checkpoint().unwrap();
    assert_eq!(
        tables(leader.path()),
        before,
        "the checkpoint flushed the memtable"
    );
    assert_eq!(tables(&cp.path), before);
    let wal: u64 = std::fs::read_dir(&cp.path)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(wal > 0, "the checkpoint holds no WAL");
    // Opened elsewhere, the checkpoint replays its WAL to the leader's state.
    assert_eq!(cp.seq, leader.latest_seq());
    let fdir = tempfile::tempdir().unwrap();
    copy_files(&cp.path, fdir.path());
    let follower = Store::open(fdir.path(), opts()).unwrap();
    assert_eq!(follower.latest_seq(), cp.seq);
    assert_eq!(follower.digest().unwrap(), leader.digest().unwrap());
}

#[test]
fn opening_a_store_removes_a_checkpoint_a_crash_left_unfinished() {
    let (d, store) = temp_store(opts());
    fill(&store, 200, 13);
    let done = store.checkpoint().unwrap();
    let unfinished = done.path.parent().unwrap().join("tmp-1-1");
    std::fs::create_dir(&unfinished).unwrap();
    std::fs::write(unfinished.join("000001.sst"), b"half a checkpoint").unwrap();
    drop(store);
    let store = Store::open(d.path(), opts()).unwrap();
    assert!(
        !unfinished.exists(),
        "the unfinished checkpoint is still there"
    );
    assert_eq!(store.checkpoints().unwrap(), vec![done]);
}

#[test]
fn wal_reader_batches_are_contiguous_and_match_the_feed() {
    let (_d, store) = temp_store(opts());
    let mut sub = store.feed().subscribe();
    fill(&store, 300, 5);
    let from_wal: Vec<_> = store.wal_since(0).unwrap().map(|b| b.unwrap()).collect();
    let from_feed = store.feed().read_after(0, usize::MAX).unwrap();
    assert_eq!(from_wal.len(), 300);
    assert_eq!(from_feed.len(), 300);
    let mut next = 1;
    for (w, f) in from_wal.iter().zip(&from_feed) {
        assert_eq!(w.first(), next);
        assert_eq!((w.first(), w.count()), (f.first(), f.count()));
        assert_eq!(
            &w.data()[12..],
            &f.data()[12..],
            "records differ at {}",
            w.first()
        );
        next = w.last() + 1;
    }
    assert!(sub.has_changed().unwrap());
    assert_eq!(*sub.borrow_and_update(), store.latest_seq());
    // From the middle, and from the end.
    let mid = from_wal[100].last();
    assert_eq!(
        store
            .wal_since(mid)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .first(),
        mid + 1
    );
    assert!(store
        .wal_since(store.latest_seq())
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn purged_wal_range_is_a_typed_error_and_retention_keeps_it() {
    // No retention: obsolete WAL files are deleted at once.
    let (_d, store) = temp_store(StoreOptions {
        wal_ttl_seconds: 0,
        wal_size_limit_mb: 0,
        ..opts()
    });
    fill(&store, 100, 6);
    store.flush().unwrap();
    fill(&store, 100, 7);
    store.flush().unwrap();
    fill(&store, 10, 8);
    let oldest = store.oldest_wal_seq().unwrap().expect("some WAL");
    assert!(oldest > 2, "old WAL should be gone, oldest is {oldest}");
    match store
        .wal_since(1)
        .map(|it| it.collect::<Result<Vec<_>, _>>())
    {
        Err(Error::WalPurged {
            requested: 1,
            oldest_available,
        })
        | Ok(Err(Error::WalPurged {
            requested: 1,
            oldest_available,
        })) => {
            assert_eq!(oldest_available, oldest)
        }
        other => panic!("expected WalPurged, got {other:?}"),
    }
    // What is still there reads fine.
    let rest: Vec<_> = store
        .wal_since(oldest - 1)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rest.first().unwrap().first(), oldest);

    // With retention the WAL survives flushes.
    let (_d2, kept) = temp_store(opts());
    fill(&kept, 100, 6);
    kept.flush().unwrap();
    fill(&kept, 100, 7);
    kept.flush().unwrap();
    assert_eq!(kept.oldest_wal_seq().unwrap(), Some(1));
    assert_eq!(kept.wal_since(0).unwrap().count(), 200);
}

#[test]
fn applier_rejects_out_of_order_and_duplicate_batches() {
    let (_d, leader) = temp_store(opts());
    let (_f, follower) = temp_store(opts());
    fill(&leader, 3, 9);
    let batches: Vec<_> = leader.wal_since(0).unwrap().map(|b| b.unwrap()).collect();
    let before = follower.digest().unwrap();
    let err = follower.apply(&batches[1]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Divergence(DivergenceError::OutOfOrder { local: 0, .. })
        ),
        "{err}"
    );
    assert_eq!(
        follower.digest().unwrap(),
        before,
        "nothing may be written out of order"
    );
    follower.apply(&batches[0]).unwrap();
    let dup = follower.apply(&batches[0]).unwrap_err();
    assert!(
        matches!(dup, Error::Divergence(DivergenceError::OutOfOrder { .. })),
        "{dup}"
    );
    follower.apply(&batches[1]).unwrap();
    follower.apply(&batches[2]).unwrap();
    assert_eq!(follower.digest().unwrap(), leader.digest().unwrap());
    // A follower takes no client writes.
    follower.set_follower(true);
    assert!(matches!(follower.put("k", "v"), Err(Error::ReadOnly)));
}

#[test]
fn batches_applied_together_get_the_leaders_sequences() {
    let (_d, leader) = temp_store(opts());
    let (_f, follower) = temp_store(opts());
    fill(&leader, 500, 17);
    let batches: Vec<_> = leader.wal_since(0).unwrap().map(|b| b.unwrap()).collect();
    follower.apply_many(&batches[..1]).unwrap();
    follower.apply_many(&batches[1..300]).unwrap();
    // A gap inside a group refuses the whole group.
    let mut gapped = batches[300..310].to_vec();
    gapped.remove(4);
    let before = follower.latest_seq();
    assert!(matches!(
        follower.apply_many(&gapped),
        Err(Error::Divergence(_))
    ));
    assert_eq!(follower.latest_seq(), before);
    follower.apply_many(&batches[300..]).unwrap();
    assert_eq!(follower.digest().unwrap(), leader.digest().unwrap());
    // The follower's feed holds the same batches, for its own readers.
    assert_eq!(
        follower
            .feed()
            .read_after(batches[498].last(), 10)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn manifest_hashes_match_file_contents() {
    let (_d, store) = temp_store(opts());
    fill(&store, 3000, 10);
    store.flush().unwrap();
    fill(&store, 100, 11);
    let cp = store.checkpoint().unwrap();
    let (m, _) = store.manifest(&cp).unwrap();
    assert_eq!(m.seq, cp.seq);
    let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert!(
        names.contains(&"CURRENT")
            && names.iter().any(|n| n.ends_with(".sst"))
            && names.iter().any(|n| n.ends_with(".log"))
    );
    assert!(
        m.files.iter().any(|f| f.chunks.len() > 1),
        "want a multi-chunk file"
    );
    for f in &m.files {
        let data = std::fs::read(cp.path.join(f.name.as_str())).unwrap();
        assert_eq!(data.len() as u64, f.size);
        assert_eq!(f.hash, *blake3::hash(&data).as_bytes(), "{}", f.name);
        for (i, c) in data.chunks(m.chunk_size as usize).enumerate() {
            assert_eq!(f.chunks[i], chunk_hash(f.size, m.chunk_size, i, c));
        }
        assert_eq!(
            hash_file(&cp.path.join(f.name.as_str()), m.chunk_size)
                .unwrap()
                .0,
            f.hash
        );
    }
    assert_eq!(ferry_engine::Manifest::decode(&m.encode()).unwrap(), m);
}

#[test]
fn unchanged_ssts_are_not_rehashed() {
    let (dir, store) = temp_store(opts());
    fill(&store, 2000, 12);
    store.flush().unwrap();
    fill(&store, 2000, 13);
    store.flush().unwrap();
    let cp1 = store.checkpoint().unwrap();
    let (m1, s1) = store.manifest(&cp1).unwrap();
    let ssts1: BTreeMap<_, _> = m1
        .files
        .iter()
        .filter(|f| f.name.is_immutable())
        .map(|f| (f.name.clone(), f.size))
        .collect();
    assert!(ssts1.len() >= 2);
    assert_eq!(s1.cache_hits, 0);
    fill(&store, 500, 14);
    store.flush().unwrap();
    let cp2 = store.checkpoint().unwrap();
    let (m2, s2) = store.manifest(&cp2).unwrap();
    let shared = m2
        .files
        .iter()
        .filter(|f| ssts1.get(&f.name) == Some(&f.size))
        .count();
    assert!(shared >= 2);
    assert_eq!(
        s2.cache_hits, shared,
        "every unchanged SST comes from the cache"
    );
    let new_ssts = m2.files.iter().filter(|f| f.name.is_immutable()).count() - shared;
    let mutable = m2.files.iter().filter(|f| !f.name.is_immutable()).count();
    assert_eq!(s2.files_hashed, new_ssts + mutable);

    // The cache is persisted: a new process (a fresh open) reuses it too.
    drop(store);
    let again = Store::open(dir.path(), opts()).unwrap();
    let cp3 = again.checkpoint().unwrap();
    let (_, s3) = again.manifest(&cp3).unwrap();
    assert!(s3.cache_hits >= shared);
}

#[test]
fn checkpoints_are_listed_and_deleted() {
    let (_d, store) = temp_store(opts());
    fill(&store, 10, 15);
    let a = store.checkpoint().unwrap();
    fill(&store, 10, 16);
    let b = store.checkpoint().unwrap();
    assert!(b.seq > a.seq);
    let names: Vec<_> = store
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec![a.name.clone(), b.name.clone()]);
    store.delete_checkpoint(&a.name).unwrap();
    assert!(!a.path.exists());
    assert_eq!(store.checkpoints().unwrap().len(), 1);
    assert!(matches!(
        store.delete_checkpoint("nope"),
        Err(Error::NoCheckpoint { .. })
    ));
}

#[test]
fn digest_identifies_data_and_sequence() {
    let (_a, a) = temp_store(opts());
    let (_b, b) = temp_store(opts());
    a.put("x", "1").unwrap();
    b.put("x", "1").unwrap();
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    b.put("y", "2").unwrap();
    assert_ne!(a.digest().unwrap().digest, b.digest().unwrap().digest);
    b.delete("y").unwrap();
    // Same data, different sequence: the digest string matches, the sequence does not.
    let (da, db) = (a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(da.digest, db.digest);
    assert_ne!(da.seq, db.seq);
}

#[test]
fn a_database_written_by_db_bench_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    db_bench_fill(&db, 30_000);
    // The CLI on the db_bench directory.
    let cp: serde_json::Value = serde_json::from_str(&ferry(&[
        "checkpoint",
        "--data",
        db.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let live: serde_json::Value = serde_json::from_str(&ferry(&[
        "digest",
        "--data",
        db.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let snap: serde_json::Value = serde_json::from_str(&ferry(&[
        "digest",
        "--data",
        cp["path"].as_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(live["digest"], snap["digest"]);
    assert_eq!(live["seq"], snap["seq"]);
    assert_eq!(cp["seq"], live["seq"]);
    assert!(cp["files"].as_u64().unwrap() > 3 && cp["bytes"].as_u64().unwrap() > 1_000_000);
    assert_eq!(cp["manifest_id"].as_str().unwrap().len(), 64);
    // An independent count with RocksDB's own ldb.
    let out = std::process::Command::new(rocksdb_tool("ldb"))
        .args([
            &format!("--db={}", cp["path"].as_str().unwrap()),
            "--ignore_unknown_options",
            "scan",
            "--hex",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" : "))
        .count() as u64;
    assert_eq!(lines, live["keys"].as_u64().unwrap());
    // The adopted store takes writes and reports them.
    let store = Store::open(&db, opts()).unwrap();
    let before = store.latest_seq();
    assert_eq!(store.put("new", "v").unwrap().last, before + 1);
}

/// Durable shipping: writers share WAL syncs (group commit), every batch is
/// published to the feed in commit order with no gap, and a write returns
/// only once its batch is published (so synced).
#[test]
fn group_commit_publishes_every_batch_in_order_once_synced() {
    let (_d, store) = temp_store(StoreOptions::default());
    assert!(store.options().durable_shipping);
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..300 {
                    let r = store
                        .put(format!("g{t}-{i}"), vec![t as u8; 50])
                        .expect("write");
                    assert!(
                        store.feed().latest() >= r.last,
                        "write {} returned before it was published",
                        r.last
                    );
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let batches = store.feed().read_after(0, usize::MAX).expect("feed");
    assert_eq!(batches.len(), 1200);
    let mut next = 1;
    for b in &batches {
        assert_eq!(b.first(), next, "published in commit order, no gap");
        next = b.last() + 1;
    }
    assert_eq!(store.feed().latest(), store.latest_seq());
}
