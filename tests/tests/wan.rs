//! Seeds over an impaired path: ferry's UDP proxy between the follower and
//! the leader drops, duplicates, corrupts and delays datagrams, or goes
//! silent. The seed must complete, verify, and after a blackout longer
//! than the peer timeout resume with only the missing chunks.

use std::time::Duration;

use ferry_engine::{Store, StoreOptions};
use ferry_tests::{fill_sized, TestLeader};
use ferry_transfer::netsim::{Impairments, Proxy};
use ferry_transfer::ServeOptions;

fn leader_with_data(mb: usize, serve: ServeOptions) -> TestLeader {
    let leader = TestLeader::start(StoreOptions::default(), serve);
    fill_sized(&leader.store, mb << 20, 7);
    leader.store.flush().expect("flush");
    leader
}

/// A proxy with `imp` in front of `leader`, and a seed config through it.
async fn through_proxy(
    leader: &TestLeader,
    imp: Impairments,
    target: &std::path::Path,
) -> (Proxy, ferry_transfer::SeedConfig) {
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), leader.addr, imp)
        .await
        .expect("proxy");
    let mut cfg = leader.seed_config(target);
    cfg.leader = proxy.addr();
    (proxy, cfg)
}

/// The seeded copy opens and matches the leader's checkpoint at `seq`.
fn assert_seeded(target: &std::path::Path, leader: &TestLeader, seq: u64) {
    assert_eq!(
        Store::open_read_only(target)
            .expect("the seeded copy opens")
            .digest()
            .expect("digest"),
        leader.checkpoint_digest(seq)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_over_loss_duplicates_bit_flips_and_reordering_verifies() {
    let leader = leader_with_data(24, ServeOptions::default());
    let target = tempfile::tempdir().expect("tempdir");
    let imp = Impairments {
        loss: 0.03,
        duplicate: 0.01,
        corrupt: 0.01,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
    };
    let (proxy, cfg) = through_proxy(&leader, imp, target.path()).await;
    let report = ferry_transfer::seed(cfg)
        .await
        .expect("seed over a bad path");
    let st = proxy.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert!(
        st.dropped.load(Relaxed) > 100 && st.corrupted.load(Relaxed) > 10,
        "the path was impaired: dropped {} corrupted {} duplicated {}",
        st.dropped.load(Relaxed),
        st.corrupted.load(Relaxed),
        st.duplicated.load(Relaxed)
    );
    assert_seeded(target.path(), &leader, report.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_across_a_blackout_longer_than_the_peer_timeout_resumes() {
    // 48 MB at 8 MB/s: the blackout lands mid-seed.
    let leader = leader_with_data(
        48,
        ServeOptions {
            max_rate: Some(8 << 20),
            ..ServeOptions::default()
        },
    );
    let target = tempfile::tempdir().expect("tempdir");
    let (proxy, mut cfg) = through_proxy(&leader, Impairments::default(), target.path()).await;
    cfg.parallel = 2;
    cfg.transport = cfg
        .transport
        .clone()
        .with_idle_timeout(Duration::from_millis(1500));
    proxy.set_impairments(Impairments {
        delay: Duration::from_millis(20),
        ..Default::default()
    });
    let seed = tokio::spawn(ferry_transfer::seed(cfg));
    // Wait for durable progress, then cut the path for twice the timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if ferry_tests::verified_chunks(target.path()) >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set_blackout(true);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    proxy.set_blackout(false);
    let report = seed.await.expect("join").expect("the seed resumes");
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(
        report.chunks_resumed >= 3,
        "chunks verified before the blackout are not fetched again: {report:?}"
    );
    // Nothing fetched twice: fetched chunks plus resumed ones make the
    // whole, except chunks in flight when the path went dark.
    assert!(
        report.chunks_fetched <= report.chunks_total + 2 * 2,
        "{report:?}"
    );
    assert_seeded(target.path(), &leader, report.seq);
}

/// On a sub-millisecond path (loopback here, a LAN in the field) quinn's
/// BBR alone leaves startup within a millisecond and sends with a window
/// of four packets until its bandwidth samples catch up, which held a
/// 1 Gbit/s seed at 30-40 MB/s for its first 0.2 s. ferry's controller
/// keeps Cubic's window beside BBR's, so the window grows from the first
/// round trip (transfer::congestion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_sender_on_a_short_path_opens_its_window_from_the_start() {
    use ferry_transfer::endpoint::{client_config, client_endpoint, server_endpoint};
    use ferry_transfer::{ClientAuth, NodeAuth, TransportOptions};
    const BYTES: usize = 24 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (auth, token) = NodeAuth::load_or_init(dir.path(), "sender").expect("auth");
    let opts = TransportOptions::default();
    let server =
        server_endpoint("127.0.0.1:0".parse().expect("addr"), &auth, &opts).expect("server");
    let addr = server.local_addr().expect("addr");
    let sender = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("connection");
        let (mut send, _recv) = conn.accept_bi().await.expect("stream");
        // The window each millisecond while the first half goes out.
        let watch = conn.clone();
        let windows = tokio::spawn(async move {
            let mut windows = Vec::new();
            while watch.stats().udp_tx.bytes < (BYTES / 2) as u64 {
                windows.push(watch.stats().path.cwnd);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            windows
        });
        send.write_all(&vec![7u8; BYTES]).await.expect("write");
        send.finish().expect("finish");
        let _ = send.stopped().await;
        windows.await.expect("watch")
    });
    let client = client_endpoint("127.0.0.1:0".parse().expect("addr"), &opts).expect("client");
    let cfg = client_config(&ClientAuth::from_token(&token), &opts).expect("config");
    let conn = client
        .connect_with(cfg, addr, "ferry")
        .expect("connect")
        .await
        .expect("connection");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"go").await.expect("write");
    let got = recv.read_to_end(BYTES + 1).await.expect("read");
    assert_eq!(got.len(), BYTES);
    let windows = sender.await.expect("sender");
    let early = windows.iter().copied().max().unwrap_or(0);
    assert!(
        early >= 1 << 20,
        "the window stayed at {early} bytes while the first {} MiB went out",
        BYTES >> 21
    );
}

/// Compression is limited to one chunk per core at a time, but a chunk's
/// permit must cover its encoding only. Held until the peer had the chunk,
/// it let two chunks be in flight, and a compressed seed across a 150 ms
/// path ran at a third of its speed. (There is a permit per core: on a
/// machine with eight or more cores the old permit would pass this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_chunks_fill_a_long_path_like_raw_ones() {
    use std::sync::atomic::Ordering::Relaxed;
    let leader = leader_with_data(
        40,
        ServeOptions {
            compression: ferry_transfer::Compression::Always { level: 1 },
            ..ServeOptions::default()
        },
    );
    let target = tempfile::tempdir().expect("tempdir");
    let imp = Impairments {
        delay: Duration::from_millis(20),
        ..Impairments::default()
    };
    let (_proxy, cfg) = through_proxy(&leader, imp, target.path()).await;
    let report = ferry_transfer::seed(cfg).await.expect("seed");
    let st = &leader.server.stats;
    assert!(
        st.chunk_bytes_sent.load(Relaxed) > 0 && report.chunks_fetched >= 16,
        "{report:?}"
    );
    let peak = st.chunks_on_the_wire_peak.load(Relaxed);
    assert!(
        peak >= 8,
        "at most {peak} compressed chunks were on the wire at once (the follower asks for 16)"
    );
    assert_seeded(target.path(), &leader, report.seq);
}
