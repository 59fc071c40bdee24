//! Seeding a new node over QUIC: consistency under load, boundary file
//! sizes, corruption, resumption after a kill, authentication, and hostile
//! manifests and frames.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::manifest::build_manifest;
use ferry_engine::{
    CheckpointInfo, Error as EngineError, HashCache, Manifest, Store, StoreOptions,
};
use ferry_tests::{fill, TestLeader};
use ferry_transfer::auth::{ClusterCa, JoinToken};
use ferry_transfer::client::{Client, ConnectError};
use ferry_transfer::leader::SnapshotSource;
use ferry_transfer::protocol::{ErrorCode, Frame, Role};
use ferry_transfer::{ClientAuth, SeedError, ServeOptions, TransportOptions};

const CHUNK: u32 = 64 * 1024;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: CHUNK,
        ..StoreOptions::default()
    }
}

/// Values that do not compress, so files span many chunks.
fn fill_incompressible(store: &Store, n: usize) {
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    for i in 0..n {
        let v: Vec<u8> = (0..1000)
            .map(|_| {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                rng_state as u8
            })
            .collect();
        store.put(format!("bulk-{i:08}"), v).unwrap();
    }
    store.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_of_a_store_under_load_matches_the_checkpoint() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill(&leader.store, 3000, 1);
    leader.store.flush().unwrap();
    fill_incompressible(&leader.store, 2000);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (leader.store.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                store.put(format!("live-{i}"), vec![7u8; 64]).unwrap();
                i += 1;
            }
            i
        })
    };
    let target = tempfile::tempdir().unwrap();
    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert!(report.chunks_total > 10 && report.chunks_fetched == report.chunks_total);
    assert_eq!(report.bytes_fetched, report.bytes_total);
    let seeded = Store::open_read_only(target.path()).unwrap();
    assert_eq!(seeded.latest_seq(), report.seq);
    assert_eq!(
        seeded.digest().unwrap(),
        leader.checkpoint_digest(report.seq)
    );
    assert!(
        !ferry_engine::seed_dir(target.path()).exists(),
        "staging is removed"
    );
    // The seeded directory opens read-write too, at the same sequence.
    drop(seeded);
    assert_eq!(
        Store::open(target.path(), opts()).unwrap().latest_seq(),
        report.seq
    );
}

/// A real checkpoint plus extra files (`{900 + i:06}.blob`).
struct PaddedSource {
    store: Store,
    blobs: Vec<Vec<u8>>,
}

impl SnapshotSource for PaddedSource {
    fn take(&self) -> Result<(CheckpointInfo, Manifest), EngineError> {
        let info = self.store.checkpoint_tagged("-seed")?;
        for (i, data) in self.blobs.iter().enumerate() {
            std::fs::write(info.path.join(format!("{:06}.blob", 900 + i)), data).unwrap();
        }
        let (m, _) = build_manifest(
            &info.path,
            info.seq,
            CHUNK,
            "test",
            &mut HashCache::in_memory(),
        )?;
        Ok((info, m))
    }
    fn release(&self, cp: &CheckpointInfo) {
        let _ = self.store.delete_checkpoint(&cp.name);
    }
}

/// A QUIC connection to the leader with the token's credentials, before
/// any frame: for tests that speak the protocol by hand.
async fn raw_connection(
    endpoint: &ferry_transfer::quinn::Endpoint,
    leader: &TestLeader,
) -> Result<ferry_transfer::quinn::Connection, ferry_transfer::quinn::ConnectionError> {
    let cfg = ferry_transfer::endpoint::client_config(
        &ClientAuth::from_token(&leader.token),
        &TransportOptions::default(),
    )
    .unwrap();
    endpoint
        .connect_with(cfg, leader.addr, "ferry")
        .unwrap()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundary_file_sizes_arrive_intact() {
    let c = u64::from(CHUNK);
    let sizes = vec![0, 1, c - 1, c, c + 1, 2 * c, 5 * c + 17];
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    fill(&store, 100, 2);
    let source = Arc::new(PaddedSource {
        store: store.clone(),
        blobs: sizes
            .iter()
            .enumerate()
            .map(|(i, size)| (0..*size).map(|b| (b * 7 + i as u64) as u8).collect())
            .collect(),
    });
    let leader = TestLeader::start_on(dir, store, ServeOptions::default(), Some(source));
    let target = tempfile::tempdir().unwrap();
    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    for (i, size) in sizes.iter().enumerate() {
        let got = std::fs::read(target.path().join(format!("{:06}.blob", 900 + i))).unwrap();
        let want: Vec<u8> = (0..*size).map(|b| (b * 7 + i as u64) as u8).collect();
        assert_eq!(got.len() as u64, *size);
        assert!(got == want, "file of {size} bytes differs");
    }
    assert_eq!(
        Store::open_read_only(target.path()).unwrap().latest_seq(),
        report.seq
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_detected_and_fetched_again() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill_incompressible(&leader.store, 1500);
    leader
        .server_faults()
        .corrupt_chunks
        .store(3, Ordering::SeqCst);
    let target = tempfile::tempdir().unwrap();
    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    assert_eq!(report.chunks_refetched, 3);
    assert_eq!(
        Store::open_read_only(target.path())
            .unwrap()
            .digest()
            .unwrap(),
        leader.checkpoint_digest(report.seq)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_never_verifies_is_never_written() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill_incompressible(&leader.store, 300);
    leader
        .server_faults()
        .corrupt_chunks
        .store(u32::MAX, Ordering::SeqCst);
    let target = tempfile::tempdir().unwrap();
    let mut cfg = leader.seed_config(target.path());
    cfg.chunk_attempts = 2;
    cfg.parallel = 1;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(
        matches!(err, SeedError::BadChunk { attempts: 2, .. }),
        "{err}"
    );
    // Nothing was written into the staged files: they are still all zeros.
    let staging = ferry_engine::seed_dir(target.path());
    for e in std::fs::read_dir(&staging).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sst") || name == "CURRENT" {
            assert!(
                std::fs::read(e.path()).unwrap().iter().all(|&b| b == 0),
                "{name} holds unverified bytes"
            );
        }
    }
    // And the half-seeded directory does not open as a database.
    assert!(matches!(
        Store::open(target.path(), opts()),
        Err(EngineError::SeedInProgress { .. })
    ));
    assert!(matches!(
        Store::open_read_only(target.path()),
        Err(EngineError::SeedInProgress { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_seed_resumes_and_fetches_only_what_is_missing() {
    // About 8 MB at 4 MB/s: the seed is killed midway.
    let leader = TestLeader::start(
        opts(),
        ServeOptions {
            max_rate: Some(4 << 20),
            ..ServeOptions::default()
        },
    );
    fill_incompressible(&leader.store, 8000);
    let target = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(ferry_tests::ferry_bin())
        .args([
            "seed",
            "--leader",
            &leader.addr.to_string(),
            "--data",
            target.path().to_str().unwrap(),
            "--no-progress",
        ])
        .env("FERRY_TOKEN", leader.token.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until some chunks are durably recorded, then kill -9.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if ferry_tests::verified_chunks(target.path()) >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the seed made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(
        Store::open(target.path(), opts()),
        Err(EngineError::SeedInProgress { .. })
    ));

    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    assert!(
        report.chunks_resumed >= 20,
        "resumed {}",
        report.chunks_resumed
    );
    assert_eq!(report.chunks_reused, 0, "no old local files to reuse");
    assert!(report.chunks_fetched < report.chunks_total);
    assert_eq!(
        report.chunks_fetched + report.chunks_resumed,
        report.chunks_total
    );
    assert_eq!(
        report.bytes_fetched + report.bytes_resumed,
        report.bytes_total
    );
    assert_eq!(
        Store::open_read_only(target.path())
            .unwrap()
            .digest()
            .unwrap(),
        leader.checkpoint_digest(report.seq)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_right_credential_get_no_data() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill(&leader.store, 100, 3);
    let target = tempfile::tempdir().unwrap();

    // Right CA, wrong secret.
    let wrong = JoinToken {
        ca: leader.token.ca,
        secret: [0x55; 32],
        leader: leader.token.leader,
    };
    let mut cfg = leader.seed_config(target.path());
    cfg.auth = ClientAuth::from_token(&wrong);
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(
        matches!(
            &err,
            SeedError::Connect(ConnectError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            })
        ),
        "{err}"
    );

    // No secret at all.
    let mut cfg = leader.seed_config(target.path());
    cfg.auth.secret = None;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(
        matches!(
            &err,
            SeedError::Connect(ConnectError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            })
        ),
        "{err}"
    );

    // A token for another cluster: the leader's certificate does not chain to it.
    let other = ClusterCa::generate("other").unwrap();
    let mut cfg = leader.seed_config(target.path());
    cfg.auth = ClientAuth::from_token(&JoinToken {
        ca: other.fingerprint().unwrap(),
        secret: leader.token.secret,
        leader: None,
    });
    cfg.reconnects = 0;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(
        matches!(&err, SeedError::Connect(ConnectError::Connect { .. })),
        "{err}"
    );

    // A client certificate from another CA.
    let other_node = other
        .issue("intruder", ferry_transfer::auth::DEFAULT_CERT_LIFETIME)
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.pem"), &other.cert_pem).unwrap();
    std::fs::write(d.path().join("n.pem"), &other_node.cert_pem).unwrap();
    std::fs::write(d.path().join("n.key"), &other_node.key_pem).unwrap();
    let intruder = ferry_transfer::NodeAuth::from_files(
        &d.path().join("ca.pem"),
        &d.path().join("n.pem"),
        &d.path().join("n.key"),
    )
    .unwrap();
    let mut auth = intruder.client_credentials();
    auth.cluster = leader.token.ca;
    auth.ca = None;
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    let r = Client::connect(
        &endpoint,
        leader.addr,
        &auth,
        &TransportOptions::default(),
        "intruder",
        Role::Seeder,
    )
    .await;
    assert!(
        r.is_err(),
        "a certificate from another CA must not authenticate"
    );

    // A client that skips Hello and asks for the manifest right away.
    let conn = raw_connection(&endpoint, &leader).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    ferry_transfer::wire::write_frame(&mut send, &Frame::ManifestRequest)
        .await
        .unwrap();
    match tokio::time::timeout(
        Duration::from_secs(5),
        ferry_transfer::wire::read_frame(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(Frame::ManifestReply { .. }))) => {
            panic!("an unauthenticated peer got a manifest")
        }
        _ => {}
    }

    let stats = &leader.server.stats;
    assert_eq!(stats.seeds_started.load(Ordering::SeqCst), 0);
    assert_eq!(stats.chunks_served.load(Ordering::SeqCst), 0);
    assert!(stats.auth_failures.load(Ordering::SeqCst) >= 3);
    assert!(
        leader.store.checkpoints().unwrap().is_empty(),
        "no checkpoint was taken for them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificates_authenticate_both_ways() {
    let ca = ClusterCa::generate("ops").unwrap();
    let d = tempfile::tempdir().unwrap();
    let write = |name: &str, data: &str| std::fs::write(d.path().join(name), data).unwrap();
    write("ca.pem", &ca.cert_pem);
    for n in ["leader", "follower"] {
        let ck = ca
            .issue(n, ferry_transfer::auth::DEFAULT_CERT_LIFETIME)
            .unwrap();
        write(&format!("{n}.pem"), &ck.cert_pem);
        write(&format!("{n}.key"), &ck.key_pem);
    }
    let load = |n: &str| {
        ferry_transfer::NodeAuth::from_files(
            &d.path().join("ca.pem"),
            &d.path().join(format!("{n}.pem")),
            &d.path().join(format!("{n}.key")),
        )
        .unwrap()
    };
    let ldir = tempfile::tempdir().unwrap();
    let store = Store::open(ldir.path(), opts()).unwrap();
    fill(&store, 200, 4);
    let endpoint = ferry_transfer::endpoint::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &load("leader"),
        &TransportOptions::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server =
        ferry_transfer::Server::new(store.clone(), load("leader"), ServeOptions::default());
    tokio::spawn(server.run(endpoint));
    let target = tempfile::tempdir().unwrap();
    let cfg =
        ferry_transfer::SeedConfig::new(target.path(), addr, load("follower").client_credentials());
    let report = ferry_transfer::seed(cfg).await.unwrap();
    assert_eq!(
        Store::open_read_only(target.path()).unwrap().latest_seq(),
        report.seq
    );
}

/// A fake leader that authenticates nobody and answers every manifest
/// request with `manifest`.
async fn hostile_leader(manifest: Vec<u8>) -> (std::net::SocketAddr, JoinToken) {
    let dir = tempfile::tempdir().unwrap();
    let (auth, token) = ferry_transfer::NodeAuth::load_or_init(dir.path(), "evil").unwrap();
    let endpoint = ferry_transfer::endpoint::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &auth,
        &TransportOptions::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        let _keep = dir;
        while let Some(inc) = endpoint.accept().await {
            let manifest = manifest.clone();
            tokio::spawn(async move {
                let conn = inc.await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let _hello = ferry_transfer::wire::read_frame(&mut recv).await;
                let welcome = Frame::Welcome {
                    version: 1,
                    node_id: "evil".into(),
                    latest_seq: 1,
                };
                ferry_transfer::wire::write_frame(&mut send, &welcome)
                    .await
                    .unwrap();
                let _req = ferry_transfer::wire::read_frame(&mut recv).await;
                let reply = Frame::ManifestReply {
                    session: 1,
                    manifest: manifest.into(),
                };
                ferry_transfer::wire::write_frame(&mut send, &reply)
                    .await
                    .unwrap();
                let _ = conn.closed().await;
            });
        }
    });
    (addr, token)
}

fn evil_manifest(name: &str) -> Vec<u8> {
    let mut m = b"FMAN\x01".to_vec();
    m.extend_from_slice(&1u64.to_le_bytes());
    m.extend_from_slice(&CHUNK.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.push(name.len() as u8);
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(blake3::hash(b"").as_bytes());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifest_names_are_refused_before_touching_the_disk() {
    let outer = tempfile::tempdir().unwrap();
    let target = outer.path().join("target");
    for name in [
        "../escape.sst",
        "/tmp/abs.sst",
        "sub/000001.sst",
        "..",
        "LOCK",
        "notes.txt",
        "000001.sst/",
    ] {
        let (addr, token) = hostile_leader(evil_manifest(name)).await;
        let mut cfg =
            ferry_transfer::SeedConfig::new(&target, addr, ClientAuth::from_token(&token));
        cfg.reconnects = 0;
        let err = ferry_transfer::seed(cfg).await.unwrap_err();
        assert!(
            matches!(err, SeedError::Engine(EngineError::Malformed { .. })),
            "{name}: {err}"
        );
        let staged: Vec<_> = std::fs::read_dir(ferry_engine::seed_dir(&target))
            .unwrap()
            .collect();
        assert!(staged.is_empty(), "{name}: something was written");
        assert!(!outer.path().join("escape.sst").exists());
        assert!(!Path::new("/tmp/abs.sst").exists());
    }
    // The control case: a valid name passes the name check and fails on the
    // next rule (a manifest without CURRENT is no database).
    let (addr, token) = hostile_leader(evil_manifest("000001.sst")).await;
    let mut cfg = ferry_transfer::SeedConfig::new(&target, addr, ClientAuth::from_token(&token));
    cfg.reconnects = 0;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(err.to_string().contains("no CURRENT"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_is_refused_without_allocating_it() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    let conn = raw_connection(&endpoint, &leader).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // A Hello that claims to be 4 GiB long. (The leader gives a Hello 10 s;
    // refusing it must take far less.)
    let mut header = u32::MAX.to_le_bytes().to_vec();
    header.push(1);
    send.write_all(&header).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        ferry_transfer::wire::read_frame(&mut recv),
    )
    .await
    .expect("the leader must not wait for 4 GiB");
    assert!(!matches!(r, Ok(Some(Frame::Welcome { .. }))));

    // As a first frame, a 60 MiB frame of a type whose own bound allows it
    // (a manifest reply): before authentication only a Hello-sized frame is
    // read, so it is refused from its header, not awaited.
    let conn = raw_connection(&endpoint, &leader).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut header = (60u32 << 20).to_le_bytes().to_vec();
    header.push(5);
    send.write_all(&header).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        ferry_transfer::wire::read_frame(&mut recv),
    )
    .await
    .expect("the leader must refuse a large first frame at once");
    assert!(!matches!(r, Ok(Some(Frame::Welcome { .. }))), "{r:?}");
    // The leader still serves others.
    let target = tempfile::tempdir().unwrap();
    ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_version_is_negotiated_down_to_the_lower() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    let auth = ClientAuth::from_token(&leader.token);
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    let ours = ferry_transfer::protocol::PROTOCOL_VERSION;
    for (asked, answered) in [
        (1, None),
        (2, Some(2)),
        (ours, Some(ours)),
        (ours + 1, Some(ours)),
    ] {
        let conn = raw_connection(&endpoint, &leader).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let exported = ferry_transfer::auth::exported_keying_material(&conn).unwrap();
        let hello = Frame::Hello {
            version: asked,
            role: Role::Seeder,
            node_id: "n1".into(),
            cluster: auth.cluster,
            proof: ferry_transfer::auth::join_proof(&auth.secret.unwrap(), &exported, "n1"),
        };
        ferry_transfer::wire::write_frame(&mut send, &hello)
            .await
            .unwrap();
        let reply = ferry_transfer::wire::read_frame(&mut recv).await;
        match (answered, reply) {
            (Some(v), Ok(Some(Frame::Welcome { version, .. }))) => assert_eq!(version, v),
            (None, Ok(Some(Frame::Error { code, .. }))) => assert_eq!(code, ErrorCode::Version),
            (want, got) => panic!("version {asked}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_empty_target_is_refused() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("precious.txt"), b"x").unwrap();
    let err = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, SeedError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("precious.txt"));
    let db = tempfile::tempdir().unwrap();
    Store::open(db.path(), opts()).unwrap();
    let err = ferry_transfer::seed(leader.seed_config(db.path()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already holds a database"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_seeds_share_one_checkpoint_which_is_deleted_after_use() {
    let leader = TestLeader::start(
        opts(),
        ServeOptions {
            checkpoint_grace: Duration::from_millis(200),
            ..ServeOptions::default()
        },
    );
    fill_incompressible(&leader.store, 1000);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ra, rb) = tokio::join!(
        ferry_transfer::seed(leader.seed_config(a.path())),
        ferry_transfer::seed(leader.seed_config(b.path()))
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.manifest_id, rb.manifest_id,
        "both seeds use one checkpoint"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !leader.store.checkpoints().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the seed checkpoint was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_written_by_db_bench_seeds_a_follower_with_its_sequence_and_digest() {
    let dir = tempfile::tempdir().unwrap();
    ferry_tests::db_bench_fill(dir.path(), 50_000);
    let store = Store::open(dir.path(), opts()).unwrap();
    let leader = TestLeader::start_on(dir, store, ServeOptions::default(), None);
    let target = tempfile::tempdir().unwrap();
    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    assert_eq!(report.seq, 50_000);
    let seeded = Store::open_read_only(target.path()).unwrap();
    assert_eq!(seeded.latest_seq(), report.seq);
    let digest = seeded.digest().unwrap();
    assert_eq!(digest, leader.checkpoint_digest(report.seq));
    assert_eq!(
        digest,
        leader.store.digest().unwrap(),
        "nothing was written since"
    );
    // fillrandom draws keys with replacement: about 1 - 1/e of them are distinct.
    assert!(digest.keys > 25_000, "{digest:?}");
}

/// A new node's seed shares a young seed checkpoint and gets a new one once
/// that is older than `checkpoint_reuse` (a follower handed an old
/// checkpoint replays all the WAL written since, after its seed); a node
/// that was handed one before gets it back whatever its age, while it is
/// held, so a resume keeps every chunk it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_checkpoint_is_shared_while_young_and_kept_for_its_nodes() {
    let reuse = Duration::from_secs(3);
    let leader = TestLeader::start(
        opts(),
        ServeOptions {
            checkpoint_reuse: reuse,
            checkpoint_grace: Duration::from_secs(60),
            ..ServeOptions::default()
        },
    );
    fill_incompressible(&leader.store, 200);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let seed_as = |node: &str, i: usize| {
        let mut cfg = leader.seed_config(dirs[i].path());
        cfg.node_id = node.into();
        ferry_transfer::seed(cfg)
    };
    let a = seed_as("node-a", 0).await.unwrap();
    leader.store.put("later", "x").unwrap();
    let b = seed_as("node-b", 1).await.unwrap();
    assert_eq!(b.manifest_id, a.manifest_id, "young: shared");
    tokio::time::sleep(reuse + Duration::from_millis(200)).await;
    let c = seed_as("node-c", 2).await.unwrap();
    assert_ne!(c.manifest_id, a.manifest_id, "old: a new checkpoint");
    assert!(c.seq > a.seq, "it holds the later write: {}", c.seq);
    let again = seed_as("node-a", 3).await.unwrap();
    assert_eq!(again.manifest_id, a.manifest_id, "node-a's own, kept");
}

/// A cached seed checkpoint whose sequence the WAL no longer reaches past is
/// not handed out again: a follower seeded from it could only re-seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_checkpoint_behind_the_wal_is_not_reused() {
    // No WAL retention: obsolete WAL files go at every flush.
    let leader = TestLeader::start(
        StoreOptions {
            wal_ttl_seconds: 0,
            wal_size_limit_mb: 0,
            ..opts()
        },
        ServeOptions::default(),
    );
    ferry_tests::fill(&leader.store, 200, 1);
    let first = tempfile::tempdir().unwrap();
    let r1 = ferry_transfer::seed(leader.seed_config(first.path()))
        .await
        .unwrap();
    // More writes, flushed: the WAL after the first checkpoint is gone.
    ferry_tests::fill(&leader.store, 200, 2);
    leader.store.flush().unwrap();
    let oldest = leader.store.oldest_wal_seq().unwrap();
    assert!(
        oldest.is_none_or(|o| o > r1.seq + 1),
        "the WAL no longer holds {}: oldest {oldest:?}",
        r1.seq + 1
    );
    let second = tempfile::tempdir().unwrap();
    let r2 = ferry_transfer::seed(leader.seed_config(second.path()))
        .await
        .unwrap();
    assert!(
        r2.seq > r1.seq,
        "a fresh checkpoint, not the cached one at {}: got {}",
        r1.seq,
        r2.seq
    );
    assert_eq!(r2.seq, leader.store.latest_seq());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_and_do_not_lock_out_real_peers() {
    let leader = TestLeader::start(
        opts(),
        ServeOptions {
            max_unauthenticated: 3,
            ..ServeOptions::default()
        },
    );
    fill(&leader.store, 20, 1);
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    let connect = || raw_connection(&endpoint, &leader);
    // Three peers that finish TLS and never say Hello hold every slot ...
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect().await.expect("within the cap"));
    }
    // ... so a fourth is refused at once, not queued.
    let fourth = tokio::time::timeout(Duration::from_secs(5), connect())
        .await
        .expect("refused, not left hanging");
    assert!(fourth.is_err(), "a connection beyond the cap");
    assert!(
        leader
            .server
            .stats
            .refused_unauthenticated
            .load(Ordering::Relaxed)
            >= 1
    );
    // When they go, real peers get in.
    for c in idle.drain(..) {
        c.close(0u32.into(), b"bye");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = tempfile::tempdir().unwrap();
    let report = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .expect("a real peer seeds after the idle ones left");
    assert_eq!(report.seq, leader.store.latest_seq());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_followers_enroll() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    let auth = ClientAuth::from_token(&leader.token);
    let csr = ferry_transfer::auth::Enrollment::new("n1").unwrap().csr_pem;
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    // A one-shot seeder holds the token too, but gets no certificate.
    let mut seeder = Client::connect(
        &endpoint,
        leader.addr,
        &auth,
        &TransportOptions::default(),
        "n1",
        Role::Seeder,
    )
    .await
    .unwrap();
    let r = seeder
        .request(&Frame::CertRequest {
            csr_pem: csr.clone(),
        })
        .await;
    assert!(
        matches!(
            r,
            Ok(Frame::Error {
                code: ErrorCode::Unauthorized,
                ..
            }) | Err(ferry_transfer::wire::WireError::Peer {
                code: ErrorCode::Unauthorized,
                ..
            })
        ),
        "{r:?}"
    );
    // A follower does.
    let (cert, _ca) = ferry_transfer::follower::enroll(
        leader.addr,
        &auth,
        "n1",
        &TransportOptions::default(),
        &csr,
    )
    .await
    .expect("a follower enrolls");
    assert!(cert.contains("BEGIN CERTIFICATE"));
}

/// A leader with 2 MB of noise (it does not compress) and 6 MB of values
/// that repeat one 3 KB record: RocksDB's per-block LZ4 cannot see the
/// repeats across its 4 KiB blocks, a chunk-wide zstd window can.
fn leader_with_mixed_data(serve: ServeOptions) -> TestLeader {
    let leader = TestLeader::start(opts(), serve);
    fill_incompressible(&leader.store, 2000);
    leader.store.flush().unwrap();
    let record = ferry_tests::noise("record", 3000);
    for i in 0..2000 {
        leader
            .store
            .put(format!("rec-{i:06}"), format!("{i}:{record}"))
            .unwrap();
    }
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_compression_mode_does_what_it_says_and_the_data_arrives_intact() {
    use ferry_transfer::Compression;
    let mut wire = Vec::new();
    for compression in [
        Compression::Off,
        Compression::Always { level: 1 },
        Compression::default(),
    ] {
        let leader = leader_with_mixed_data(ServeOptions {
            compression,
            ..ServeOptions::default()
        });
        let target = tempfile::tempdir().unwrap();
        let r = ferry_transfer::seed(leader.seed_config(target.path()))
            .await
            .unwrap();
        let seeded = Store::open_read_only(target.path()).unwrap();
        assert_eq!(
            seeded.digest().unwrap(),
            leader.checkpoint_digest(r.seq),
            "{compression:?}"
        );
        wire.push((compression, r.wire_bytes as f64 / r.bytes_fetched as f64));
    }
    let ratio = |i: usize| wire[i].1;
    assert!(ratio(0) >= 1.0, "off sends every byte as is: {wire:?}");
    assert!(ratio(1) < 0.75, "always compresses the repeats: {wire:?}");
    // auto compresses the files whose first chunk shrinks by half; the
    // noise goes raw.
    assert!(ratio(2) < 0.75, "{wire:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_caps_the_seed() {
    let rate = 2u64 << 20;
    let leader = TestLeader::start(
        opts(),
        ServeOptions {
            max_rate: Some(rate),
            compression: ferry_transfer::Compression::Off,
            ..ServeOptions::default()
        },
    );
    fill_incompressible(&leader.store, 6000);
    leader.store.flush().unwrap();
    let target = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let r = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let floor = r.wire_bytes as f64 / rate as f64;
    // Never faster than the cap allows (less one second of burst).
    assert!(
        secs >= floor - 1.0,
        "{} bytes in {secs:.2} s at a cap of {rate} B/s",
        r.wire_bytes
    );
}

/// The leader's SSTs, with one rotted in place: a bit flipped in the middle
/// of its largest SST (a data block), after the leader wrote it.
fn rot_an_sst(leader: &TestLeader) -> std::path::PathBuf {
    ferry_tests::rot_largest_sst(leader.store.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sst_corrupt_at_rest_on_the_leader_is_refused_not_shipped() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill_incompressible(&leader.store, 1500);
    let sst = rot_an_sst(&leader);
    let target = tempfile::tempdir().unwrap();
    let err = ferry_transfer::seed(leader.seed_config(target.path()))
        .await
        .unwrap_err();
    let name = sst.file_name().unwrap().to_string_lossy().into_owned();
    match &err {
        SeedError::Wire {
            source: ferry_transfer::wire::WireError::Peer { code, message },
            ..
        } => {
            assert_eq!(*code, ErrorCode::Corrupt, "{message}");
            assert!(message.contains(&name), "{message}");
        }
        other => panic!("expected the leader to refuse with Corrupt, got {other}"),
    }
    // Nothing became a database, and the leader's seed checkpoint is gone.
    assert!(Store::open_read_only(target.path()).is_err());
    assert!(leader.store.checkpoints().unwrap().is_empty());
    // The leader itself keeps taking writes.
    leader.store.put("after", "rot").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rot_after_the_hash_was_cached_is_caught_by_the_follower_and_never_installed() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill_incompressible(&leader.store, 1500);
    // A first seed verifies the SSTs and caches their hashes.
    let first = tempfile::tempdir().unwrap();
    ferry_transfer::seed(leader.seed_config(first.path()))
        .await
        .unwrap();
    let sst = rot_an_sst(&leader);
    let target = tempfile::tempdir().unwrap();
    let mut cfg = leader.seed_config(target.path());
    cfg.chunk_attempts = 2;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    let name = sst.file_name().unwrap().to_string_lossy().into_owned();
    match &err {
        SeedError::BadChunk { file, .. } => assert_eq!(*file, name),
        other => panic!("expected a chunk that never verifies, got {other}"),
    }
    assert!(err.to_string().contains("corrupt at rest"), "{err}");
    assert!(matches!(
        Store::open_read_only(target.path()),
        Err(EngineError::SeedInProgress { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_cluster_certificate_cannot_pose_as_the_leader_to_a_token_holder() {
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill(&leader.store, 100, 3);
    assert!(
        leader.token.leader.is_some(),
        "a leader's token pins its key"
    );
    assert!(leader.token.to_string().starts_with("ferry2-"));
    // An impostor: another node with a certificate from the same CA (as an
    // enrolled follower has) and the join secret, serving its own data.
    let tls = leader.dir.path().join(".ferry/tls");
    let ca = ClusterCa::load(&tls.join("ca.pem"), &tls.join("ca.key")).unwrap();
    let ck = ca
        .issue("impostor", ferry_transfer::auth::DEFAULT_CERT_LIFETIME)
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("n.pem"), &ck.cert_pem).unwrap();
    std::fs::write(d.path().join("n.key"), &ck.key_pem).unwrap();
    let mut auth = ferry_transfer::NodeAuth::from_files(
        &tls.join("ca.pem"),
        &d.path().join("n.pem"),
        &d.path().join("n.key"),
    )
    .unwrap();
    auth.secret = Some(leader.token.secret);
    let (idir, istore) = ferry_tests::temp_store(opts());
    fill(&istore, 50, 99);
    let impostor = TestLeader::start_on(idir, istore, ServeOptions::default(), None);
    let endpoint = ferry_transfer::endpoint::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &auth,
        &TransportOptions::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = ferry_transfer::Server::new(impostor.store.clone(), auth, ServeOptions::default());
    tokio::spawn(Arc::clone(&server).run(endpoint.clone()));

    // With the leader's token, the impostor is refused at the handshake.
    let target = tempfile::tempdir().unwrap();
    let mut cfg =
        ferry_transfer::SeedConfig::new(target.path(), addr, ClientAuth::from_token(&leader.token));
    cfg.reconnects = 0;
    let err = ferry_transfer::seed(cfg).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("not the leader the join token was issued by")
            || format!("{err:?}").contains("not the leader the join token was issued by"),
        "{err:?}"
    );
    assert!(Store::open_read_only(target.path()).is_err());
    // Without the pin (a ferry1 token, or --seed-from) it would be believed.
    let mut cfg = ferry_transfer::SeedConfig::new(
        target.path(),
        addr,
        ClientAuth::from_token(&leader.token).unpinned(),
    );
    cfg.reconnects = 0;
    ferry_transfer::seed(cfg).await.unwrap();
    // And the real leader passes the pin.
    let real = tempfile::tempdir().unwrap();
    ferry_transfer::seed(leader.seed_config(real.path()))
        .await
        .unwrap();
}

/// A leader whose SSTs hold db_bench-like values: 200-byte slices of one
/// 256 KiB random buffer. Block compression (a 64 KiB window) shrinks them
/// little; zstd at the network level over a 2 MiB chunk shrinks them well.
fn leader_with_far_repeats(serve: ServeOptions) -> TestLeader {
    use rand::{Rng, SeedableRng};
    let leader = TestLeader::start(StoreOptions::default(), serve);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let buf: Vec<u8> = (0..1 << 18).map(|_| rng.random()).collect();
    // About 80 MB: the first wave of chunk requests (16 x 2 MiB) is decided
    // before the wire rate is measured; the rest after.
    for b in 0..400 {
        let mut batch = ferry_engine::Batch::new();
        for i in 0..1000 {
            let at = rng.random_range(0..buf.len() - 200);
            batch.put(format!("k{:08}", b * 1000 + i), &buf[at..at + 200]);
        }
        leader.store.write(&batch).unwrap();
    }
    leader.store.flush().unwrap();
    leader
}

/// A store and a source that adds one file whose chunks repeat each other
/// and nothing within: 64 KiB of noise, `copies` times. Compressed alone,
/// no chunk shrinks; against the file's first chunk, which the follower
/// already holds, each is a few bytes.
fn repeating_file(copies: usize) -> (tempfile::TempDir, Store, Arc<PaddedSource>, Vec<u8>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let noise: Vec<u8> = (0..CHUNK).map(|_| rng.random()).collect();
    let blob = noise.repeat(copies);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    fill(&store, 10, 1);
    let source = Arc::new(PaddedSource {
        store: store.clone(),
        blobs: vec![blob.clone()],
    });
    (dir, store, source, blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_compresses_chunks_against_their_files_first_chunk() {
    let (dir, store, source, blob) = repeating_file(300);
    // A 4 MB/s cap stands in for a slow link.
    let serve = ServeOptions {
        max_rate: Some(4_000_000),
        busy_max_rate: None,
        ..ServeOptions::default()
    };
    let leader = TestLeader::start_on(dir, store, serve, Some(source));
    let target = tempfile::tempdir().unwrap();
    let mut cfg = leader.seed_config(target.path());
    cfg.parallel = 4;
    let r = ferry_transfer::seed(cfg).await.unwrap();
    let ratio = r.bytes_fetched as f64 / r.wire_bytes as f64;
    eprintln!("data/wire {ratio:.2} in {:.1} s", r.elapsed_secs);
    // The first half second or so goes raw while the leader measures the
    // link; after that nearly nothing crosses it.
    assert!(ratio > 4.0, "data/wire {ratio:.2}");
    assert!(std::fs::read(target.path().join("000900.blob")).unwrap() == blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_held_back_for_the_leaders_writes_is_not_compressed() {
    // A file whose chunks shrink to nothing against the first: on a link,
    // compression would win at once.
    let (dir, store, source, blob) = repeating_file(200);
    // No link limit, but the leader takes writes all along, so the
    // foreground protection holds seeds to 4 MB/s. The seed then looks
    // network-bound, yet compressing would spend the CPU the writes need.
    let serve = ServeOptions {
        max_rate: None,
        busy_max_rate: Some(4_000_000),
        ..ServeOptions::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store.put(format!("fg-{i:08}"), b"v".to_vec()).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let leader = TestLeader::start_on(dir, store, serve, Some(source));
    let target = tempfile::tempdir().unwrap();
    let mut cfg = leader.seed_config(target.path());
    cfg.parallel = 4;
    let r = ferry_transfer::seed(cfg).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let ratio = r.bytes_fetched as f64 / r.wire_bytes as f64;
    eprintln!("data/wire {ratio:.2} in {:.1} s", r.elapsed_secs);
    assert!(
        r.elapsed_secs > 2.0,
        "the foreground protection held the seed back"
    );
    assert!(ratio < 1.1, "data/wire {ratio:.2}");
    assert!(std::fs::read(target.path().join("000900.blob")).unwrap() == blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_follows_the_bottleneck_per_connection() {
    // A fast path (loopback): the CPU is the bottleneck, these files do not
    // pass auto's 2x test, so they go raw as before.
    let fast = leader_with_far_repeats(ServeOptions::default());
    let target = tempfile::tempdir().unwrap();
    let r = ferry_transfer::seed(fast.seed_config(target.path()))
        .await
        .unwrap();
    let fast_ratio = r.bytes_fetched as f64 / r.wire_bytes as f64;
    // A slow path (a 10 MB/s cap stands in for the link): the leader
    // measures what the connection delivers raw, tries compressing at the
    // network level, finds it delivers more and keeps it.
    let slow = leader_with_far_repeats(ServeOptions {
        max_rate: Some(10_000_000),
        busy_max_rate: None,
        ..ServeOptions::default()
    });
    let target2 = tempfile::tempdir().unwrap();
    let mut cfg = slow.seed_config(target2.path());
    // Fewer chunks in flight, so the trial is not all spent waiting for
    // the first raw ones.
    cfg.parallel = 4;
    let r2 = ferry_transfer::seed(cfg).await.unwrap();
    let slow_ratio = r2.bytes_fetched as f64 / r2.wire_bytes as f64;
    eprintln!("data/wire: fast {fast_ratio:.2}, slow {slow_ratio:.2}");
    assert!(
        fast_ratio < 1.2 && slow_ratio > 1.4,
        "data/wire on the fast path {fast_ratio:.2}, on the slow path {slow_ratio:.2}"
    );
    // Either way the data arrives intact.
    for (leader, dir, seq) in [(&fast, &target, r.seq), (&slow, &target2, r2.seq)] {
        assert_eq!(
            Store::open_read_only(dir.path()).unwrap().digest().unwrap(),
            leader.checkpoint_digest(seq)
        );
    }
}

/// With `SeedPriority::Idle` a seed's work (receiving, verifying, writing)
/// runs on `SCHED_IDLE` threads, so it takes only CPU the host's other work
/// leaves free; `SeedPriority::Normal`, the default, keeps it on the
/// caller's threads.
#[tokio::test]
async fn a_seed_runs_at_idle_priority_when_told_to() {
    use ferry_transfer::priority::current_thread_is_idle;
    use ferry_transfer::SeedPriority;
    let leader = TestLeader::start(StoreOptions::default(), ServeOptions::default());
    fill(&leader.store, 500, 3);
    leader.store.flush().unwrap();
    assert_eq!(
        leader.seed_config(Path::new("x")).priority,
        SeedPriority::Normal
    );
    for (priority, idle) in [(SeedPriority::Idle, true), (SeedPriority::Normal, false)] {
        let target = tempfile::tempdir().unwrap();
        let mut cfg = leader.seed_config(target.path());
        cfg.priority = priority;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        cfg.progress = Some(Arc::new(move |_: &ferry_transfer::Progress| {
            s2.lock().unwrap().push(current_thread_is_idle())
        }));
        ferry_transfer::seed(cfg).await.unwrap();
        let seen = seen.lock().unwrap();
        assert!(
            !seen.is_empty() && seen.iter().all(|&i| i == idle),
            "{priority:?}: {seen:?}"
        );
        let follower = Store::open_read_only(target.path()).unwrap();
        assert_eq!(follower.digest().unwrap(), leader.store.digest().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_takes_no_datagram_frames_from_anyone() {
    // Before authentication a peer could otherwise fill quinn's DATAGRAM
    // receive buffer (about 1.25 MB a connection) on every slot.
    let leader = TestLeader::start(opts(), ServeOptions::default());
    let endpoint = ferry_transfer::endpoint::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .unwrap();
    let conn = raw_connection(&endpoint, &leader).await.unwrap();
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the leader must not advertise DATAGRAM support"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseed_removes_the_old_databases_archived_wal() {
    // Archived WAL files of the old database, left beside the new one,
    // would be read as the new database's history at reused sequences.
    let leader = TestLeader::start(opts(), ServeOptions::default());
    fill(&leader.store, 200, 1);
    let target = tempfile::tempdir().unwrap();
    {
        let old = Store::open(target.path(), opts()).unwrap();
        fill(&old, 300, 99);
        old.flush().unwrap();
        fill(&old, 10, 98);
        old.flush().unwrap();
    }
    let archive = target.path().join("archive");
    assert!(archive.is_dir(), "the old database archived its WAL");
    let mut cfg = leader.seed_config(target.path());
    cfg.reuse_existing = true;
    ferry_transfer::seed(cfg).await.unwrap();
    assert!(!archive.exists(), "the old archive survived the re-seed");
    let d = Store::open(target.path(), opts())
        .unwrap()
        .digest()
        .unwrap();
    assert_eq!(d, leader.store.digest().unwrap());
}
