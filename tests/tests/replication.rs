//! The replication stream between a real leader store and a real follower
//! store over QUIC on loopback, for cases the daemon cannot easily produce.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::{Batch, StoreOptions};
use ferry_tests::{temp_store, TestLeader};
use ferry_transfer::follower::{replicate, ReplicaConfig, ReplicaStatus, ReplicationEnd};
use ferry_transfer::replication::{Replication, ReplicationOptions};
use ferry_transfer::{ClientAuth, ServeOptions};

fn opts() -> StoreOptions {
    StoreOptions {
        durable_shipping: false,
        ..StoreOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_for_a_frame_sends_the_follower_to_reseed_instead_of_wedging_it() {
    let (dir, store) = temp_store(opts());
    let leader = TestLeader::start_on(dir, store.clone(), ServeOptions::default(), None);
    leader.server.set_stream_handler(Replication::new(
        store.clone(),
        ReplicationOptions::default(),
    ));
    let mut small = Batch::new();
    small.put("a", "1");
    let first = store.write(&small).expect("write").last;
    // One batch of 70 MiB: larger than any Batches frame may be.
    let mut huge = Batch::new();
    for i in 0..70 {
        huge.put(format!("big-{i:02}"), vec![i as u8; 1 << 20]);
    }
    store.write(&huge).expect("write huge");
    store.write(&small).expect("write after");

    let (_fdir, follower) = temp_store(opts());
    follower.set_follower(true);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let cfg = ReplicaConfig::new(
        leader.addr,
        ClientAuth::from_token(&leader.token),
        "f1".into(),
    );
    let end = tokio::time::timeout(
        Duration::from_secs(60),
        replicate(
            follower.clone(),
            cfg,
            Arc::new(ReplicaStatus::default()),
            stop,
        ),
    )
    .await
    .expect("the follower is told, not left reconnecting");
    match end {
        ReplicationEnd::WalPurged { message } => {
            assert!(message.contains("frame limit"), "{message}")
        }
        other => panic!("expected a re-seed, got {other:?}"),
    }
    // Everything before the huge batch arrived, in order; nothing after it.
    assert_eq!(follower.latest_seq(), first);
}
