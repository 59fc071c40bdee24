//! Helpers shared by the integration tests: temp stores, data generators,
//! the `ferry` binary and RocksDB's own tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_engine::{Batch, Store, StoreOptions};
use rand::{Rng, SeedableRng};

/// Opens a fresh store in a new temp dir.
pub fn temp_store(opts: StoreOptions) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts).expect("open store");
    (dir, store)
}

/// Writes `n` batches of random puts and deletes (deterministic for `seed`).
pub fn fill(store: &Store, n: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let mut b = Batch::new();
        for _ in 0..rng.gen_range(1..4) {
            let k = format!("key-{:06}", rng.gen_range(0..5000));
            if rng.gen_ratio(1, 8) {
                b.delete(k);
            } else {
                let len = rng.gen_range(0..300);
                let v: Vec<u8> = (0..len).map(|j| ((i + j) % 251) as u8).collect();
                b.put(k, v);
            }
        }
        store.write(&b).expect("write");
    }
}

/// Copies the regular files of `src` into `dst` (not subdirectories).
pub fn copy_files(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
        }
    }
}

/// The `ferry` binary of this build (target/<profile>/ferry).
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("ferry");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p ferry`",
        bin.display()
    );
    bin
}

/// Runs `ferry` with `args` and returns stdout, failing on a non-zero exit.
pub fn ferry(args: &[&str]) -> String {
    let out = Command::new(ferry_bin())
        .args(args)
        .output()
        .expect("run ferry");
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Finds a RocksDB tool (`db_bench`, `ldb`) from Debian's rocksdb-tools.
pub fn rocksdb_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's rocksdb-tools (scripts/test does)");
}

/// Writes a database with RocksDB's own db_bench (RocksDB 7.8 on Debian 12).
pub fn db_bench_fill(dir: &Path, keys: u64) {
    let st = Command::new(rocksdb_tool("db_bench"))
        .args([
            "--benchmarks=fillrandom",
            &format!("--num={keys}"),
            &format!("--db={}", dir.display()),
            "--value_size=200",
            "--compression_type=lz4",
            "--write_buffer_size=1048576",
            "--target_file_size_base=1048576",
            "--threads=1",
        ])
        .output()
        .expect("run db_bench");
    assert!(
        st.status.success(),
        "db_bench failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A leader serving seeds on 127.0.0.1 in this process.
pub struct TestLeader {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub addr: std::net::SocketAddr,
    pub token: ferry_transfer::JoinToken,
    pub auth: ferry_transfer::NodeAuth,
    pub server: std::sync::Arc<ferry_transfer::Server>,
    pub endpoint: ferry_transfer::quinn::Endpoint,
}

impl TestLeader {
    /// Starts a leader on a fresh store (call inside a tokio runtime).
    pub fn start(opts: StoreOptions, serve: ferry_transfer::ServeOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), opts).expect("open store");
        Self::start_on(dir, store, serve, None)
    }

    /// Starts a leader on `store`, optionally serving seeds from `source`.
    pub fn start_on(
        dir: tempfile::TempDir,
        store: Store,
        serve: ferry_transfer::ServeOptions,
        source: Option<std::sync::Arc<dyn ferry_transfer::leader::SnapshotSource>>,
    ) -> Self {
        let (auth, token) =
            ferry_transfer::NodeAuth::load_or_init(&dir.path().join(".ferry/tls"), "leader")
                .expect("identity");
        let endpoint = ferry_transfer::endpoint::server_endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            &auth,
            &ferry_transfer::TransportOptions::default(),
        )
        .expect("endpoint");
        let addr = endpoint.local_addr().expect("local addr");
        let server = match source {
            Some(src) => {
                ferry_transfer::Server::with_source(store.clone(), src, auth.clone(), serve)
            }
            None => ferry_transfer::Server::new(store.clone(), auth.clone(), serve),
        };
        tokio::spawn(std::sync::Arc::clone(&server).run(endpoint.clone()));
        Self {
            dir,
            store,
            addr,
            token,
            auth,
            server,
            endpoint,
        }
    }

    /// A seed configuration for `target` with this leader's token.
    pub fn seed_config(&self, target: &Path) -> ferry_transfer::SeedConfig {
        ferry_transfer::SeedConfig::new(
            target,
            self.addr,
            ferry_transfer::ClientAuth::from_token(&self.token),
        )
    }

    /// The digest of the leader's seed checkpoint at `seq`.
    pub fn checkpoint_digest(&self, seq: u64) -> ferry_engine::Digest {
        let cp = self
            .store
            .checkpoints()
            .expect("list")
            .into_iter()
            .find(|c| c.seq == seq)
            .expect("checkpoint at seq");
        Store::open_read_only(&cp.path)
            .expect("open checkpoint")
            .digest()
            .expect("digest")
    }
}

impl TestLeader {
    /// The leader's fault injection switches.
    pub fn server_faults(&self) -> std::sync::Arc<ferry_transfer::leader::Faults> {
        self.server.faults()
    }
}
