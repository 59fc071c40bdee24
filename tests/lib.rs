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
        for _ in 0..rng.random_range(1..4) {
            let k = format!("key-{:06}", rng.random_range(0..5000));
            if rng.random_ratio(1, 8) {
                b.delete(k);
            } else {
                let len = rng.random_range(0..300);
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
    // Tests run from target/release/deps, benchmark binaries from target/release.
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    let bin = [here, here.parent().unwrap_or(here)]
        .iter()
        .map(|d| d.join("ferry"))
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join("ferry"));
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p ferry`",
        bin.display()
    );
    bin
}

/// Writes about `bytes` of incompressible values (2 KiB each), so the
/// database has real size on disk.
pub fn fill_sized(store: &Store, bytes: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut written = 0;
    let mut i = 0u64;
    while written < bytes {
        let mut b = Batch::new();
        for _ in 0..256 {
            let mut v = vec![0u8; 2048];
            rng.fill(&mut v[..]);
            b.put(format!("blob-{i:010}"), v);
            written += 2048 + 15;
            i += 1;
        }
        store.write(&b).expect("write");
    }
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

/// A finished command's exit code and its stdout followed by its stderr.
pub fn code_and_text(out: &std::process::Output) -> (i32, String) {
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `ferry` with `args`; returns its exit code and output, whatever it is.
pub fn ferry_status(args: &[&str]) -> (i32, String) {
    code_and_text(
        &Command::new(ferry_bin())
            .args(args)
            .output()
            .expect("run ferry"),
    )
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

/// A response of the HTTP API: status, headers and body, whatever the status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {}: not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON body of a 2xx reply; panics with the body otherwise.
    pub fn ok_json(&self) -> serde_json::Value {
        assert!(
            (200..300).contains(&self.status),
            "HTTP {}: {}",
            self.status,
            self.text()
        );
        self.json()
    }
}

/// One HTTP request: `method url`, with an optional body and content type.
/// Error statuses are replies too; transport failures are `Err`.
pub fn http(method: &str, url: &str, body: Option<(&str, &[u8])>) -> Result<Reply, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into();
    let r = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        ("POST", None) => agent.post(url).send_empty(),
        ("PUT", None) => agent.put(url).send_empty(),
        ("POST", Some((ct, b))) => agent.post(url).header("content-type", ct).send(b),
        ("PUT", Some((ct, b))) => agent.put(url).header("content-type", ct).send(b),
        _ => panic!("unsupported method {method}"),
    };
    let mut r = r.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = r
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: body: {e}"))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn get(url: &str) -> Reply {
    http("GET", url, None).expect("GET")
}

pub fn post_json(url: &str, v: &serde_json::Value) -> Reply {
    let b = serde_json::to_vec(v).expect("json");
    http("POST", url, Some(("application/json", &b))).expect("POST")
}

pub fn post(url: &str) -> Reply {
    http("POST", url, None).expect("POST")
}

pub fn put_bytes(url: &str, b: &[u8]) -> Reply {
    http("PUT", url, Some(("application/octet-stream", b))).expect("PUT")
}

pub fn delete(url: &str) -> Reply {
    http("DELETE", url, None).expect("DELETE")
}

/// A free loopback port (for both TCP and UDP).
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `ferry serve` process.
pub struct Proc {
    pub child: Option<std::process::Child>,
    pub data: PathBuf,
    pub quic: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `ferry serve --data DATA` with fresh ports and `extra` flags.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        Self::start_at(data, Self::free_addr(), extra)
    }

    /// A free loopback address, for a node whose address others must know
    /// before it starts.
    pub fn free_addr() -> std::net::SocketAddr {
        format!("127.0.0.1:{}", free_port()).parse().expect("addr")
    }

    /// Starts `ferry serve --data DATA` listening for QUIC on `quic`.
    pub fn start_at(data: &Path, quic: std::net::SocketAddr, extra: &[&str]) -> Self {
        let http = Self::free_addr();
        let mut args: Vec<String> = [
            "serve",
            "--data",
            data.to_str().expect("utf-8 path"),
            "--listen",
            &quic.to_string(),
            "--http",
            &http.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = data.with_extension("log");
        let mut p = Self {
            child: None,
            data: data.to_path_buf(),
            quic,
            http,
            args,
            log,
        };
        p.spawn();
        p
    }

    /// Starts a follower `id` of the node at `follow` (a QUIC address),
    /// joining with `token`, with `extra` flags.
    pub fn follower(
        data: &Path,
        id: &str,
        follow: std::net::SocketAddr,
        token: &str,
        extra: &[&str],
    ) -> Self {
        let follow = follow.to_string();
        let mut args = vec!["--node-id", id, "--follow", &follow, "--token", token];
        args.extend_from_slice(extra);
        Self::start(data, &args)
    }

    /// (Re)starts the process with the same arguments and ports.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(ferry_bin())
            .args(&self.args)
            .env("FERRY_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry serve");
        self.child = Some(child);
        self.wait_http(std::time::Duration::from_secs(30));
    }

    fn wait_http(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if http("GET", &self.url("/v1/status"), None).is_ok_and(|r| r.status == 200) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("ferry serve did not come up; log:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        get(&self.url("/v1/status")).ok_json()
    }

    /// Waits until the node reports `state`.
    pub fn wait_state(&self, state: &str, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.status();
            if s["state"] == state {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node did not reach {state}: {s}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits until the status document satisfies `f`; panics with `what`,
    /// the status and the log when it does not within `timeout`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: std::time::Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.status();
            if f(&s) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {s}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The value of the first sample of metric `name` on `/metrics` (0 if
    /// it is not exported).
    pub fn metric(&self, name: &str) -> f64 {
        get(&self.url("/metrics"))
            .text()
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// PUT a key; returns the sequence.
    pub fn put(&self, key: &str, value: &[u8]) -> u64 {
        let r = put_bytes(&self.url(&format!("/v1/kv/{key}")), value).ok_json();
        r["seq"].as_u64().expect("seq")
    }

    /// Writes `n` keys with `prefix` in batches of `per` (values of `size` bytes).
    pub fn fill(&self, prefix: &str, n: usize, per: usize, size: usize) -> u64 {
        let mut seq = 0;
        for chunk in (0..n).collect::<Vec<_>>().chunks(per) {
            let ops: Vec<_> = chunk
                .iter()
                .map(|i| serde_json::json!({"op": "put", "key": format!("{prefix}{i:08}"), "value": noise(&format!("{prefix}{i}"), size)}))
                .collect();
            let r = post_json(&self.url("/v1/batch"), &serde_json::json!({ "ops": ops })).ok_json();
            seq = r["seq"].as_u64().expect("seq");
        }
        seq
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "ferry serve did not stop on SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The join token of a leader.
    pub fn token(&self) -> String {
        ferry(&["token", "--data", self.data.to_str().expect("utf-8")])
            .trim()
            .to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many chunks the seed staged under `data` has durably verified:
/// `verified.bin` holds the manifest id (32 bytes), then one bit per chunk.
pub fn verified_chunks(data: &Path) -> u32 {
    std::fs::read(ferry_engine::seed_dir(data).join("verified.bin"))
        .map(|b| b.iter().skip(32).map(|x| x.count_ones()).sum())
        .unwrap_or(0)
}

/// Runs `ferry verify` between two nodes; returns its exit code and output.
pub fn verify(leader: &Proc, follower: &Proc) -> (i32, String) {
    ferry_status(&[
        "verify",
        "--leader-http",
        &leader.http.to_string(),
        "--follower-http",
        &follower.http.to_string(),
        "--timeout-secs",
        "60",
    ])
}

/// `size` characters of hex noise derived from `seed`: values that RocksDB's
/// block compression cannot shrink much, so datasets have real size on disk.
pub fn noise(seed: &str, size: usize) -> String {
    let mut bytes = vec![0u8; size.div_ceil(2)];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut bytes);
    let mut s = hex_encode(&bytes);
    s.truncate(size);
    s
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Flips one bit of the byte at `at` in `path`, in place, keeping the
/// file's size (and, on most filesystems, its identity): bit rot at rest.
pub fn flip_bit(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the file to corrupt");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read the byte");
    f.write_all_at(&[b[0] ^ 0x10], at).expect("write the byte");
    f.sync_all().expect("sync");
}

/// Rots the largest SST directly in `dir` (a bit flipped in its middle,
/// inside a data block); returns its path.
pub fn rot_largest_sst(dir: &Path) -> PathBuf {
    let sst = sst_files(dir).into_iter().next().expect("an SST");
    let len = std::fs::metadata(&sst).expect("stat").len();
    flip_bit(&sst, len / 2);
    sst
}

/// The SST files directly in `dir`, largest first.
pub fn sst_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .map(|p| (std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0), p))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0));
    v.into_iter().map(|(_, p)| p).collect()
}
