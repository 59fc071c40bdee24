//! The receiving side of a seed: fetch a checkpoint from a node into an
//! empty data directory, verified chunk by chunk, resumable.
//!
//! ### To ensure correctness:
//! - every chunk is checked against its blake3 hash from the manifest before
//!   it is written at its offset; a mismatch is fetched again (bounded) and
//!   never written;
//! - a chunk counts as done in the persisted bitmap only after the file it
//!   was written to has been fsynced, so a killed seed resumes from durable
//!   state and refetches whatever was not synced;
//! - the chunk hashes of each file merge into its whole-file hash (see
//!   [`ferry_engine::manifest::chunk_hash`]), checked before installing;
//! - files are staged in `DIR/.ferry/seed/`, renamed into `DIR` with
//!   `CURRENT` last and the directory fsynced in between; while the staging
//!   directory exists the store refuses to open, so a half-seeded directory
//!   never opens as a database.
//!
//! Staging layout: `seed/manifest.bin` (the manifest being fetched),
//! `seed/verified.bin` (one bit per chunk, manifest order),
//! `seed/installing` (present once every chunk is verified), `seed/moving`
//! (present while an old database is set aside into `seed/reuse/`), and the
//! files. A finished staging directory is renamed to `seed.trash` before it
//! is deleted.
//!
//! The code is split by concern: this module drives a seed (connect,
//! reconcile, fetch, install, report); [`staging`] holds the durable
//! staging state and its crash-safety argument; `fetch` verifies and writes
//! chunks (`direct`: past the page cache where the filesystem allows);
//! `reuse` takes matching chunks from an old database; `install` moves a
//! finished seed into place.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_engine::manifest::{chunk_hash, file_hash_from_chunks};
use ferry_engine::{seed_dir, Manifest, Seq, Store};
use parking_lot::Mutex;
use quinn::Connection;
use tokio::sync::mpsc;

use crate::auth::ClientAuth;
use crate::client::{Client, ConnectError};
use crate::dict::{DictCache, DICT_CHUNK};
use crate::endpoint::{client_endpoint, unspecified_for, EndpointError, TransportOptions};
use crate::priority::SeedPriority;
use crate::protocol::{Codec, Frame, Role};
use crate::wire::{expect_frame, write_frame, WireError};

mod direct;
mod fetch;
mod install;
mod reuse;
pub mod staging;

use fetch::*;
use install::*;
use reuse::*;
use staging::*;
pub use staging::{carry_over, Bitmap};

/// Errors of a seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A stream to the leader failed.
    #[error("transfer from {peer}: {source}")]
    Wire {
        peer: SocketAddr,
        #[source]
        source: WireError,
    },
    /// The connection to the leader was lost.
    #[error("connection to {peer} lost: {source}")]
    Connection {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    /// The target directory is not empty.
    #[error("{path} is not empty ({reason}); seed into an empty directory")]
    NotEmpty { path: PathBuf, reason: String },
    /// A filesystem call failed (a full disk shows up here).
    #[error("{op} {path}: {source}{hint}", hint = if source.raw_os_error() == Some(28) { " (the disk is full)" } else { "" })]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] ferry_engine::Error),
    /// The disk cannot hold the seed. Nothing is lost: the staged state is
    /// kept, and the same seed resumes once there is room.
    #[error("the disk holding {path} is full: the seed needs {needed} more bytes, {available} are free; free some space and run the seed again, it resumes", needed = crate::seed::human(*needed), available = crate::seed::human(*available))]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    /// A chunk kept failing verification.
    #[error("chunk {chunk} of {file} failed verification {attempts} times; if the link is sound, the sender's copy is corrupt at rest")]
    BadChunk {
        file: String,
        chunk: usize,
        attempts: u32,
    },
    /// A file's chunk hashes do not merge into its file hash.
    #[error("the manifest's chunk hashes of {file} do not match its file hash")]
    FileHash { file: String },
    /// The installed database does not hold the manifest's sequence.
    #[error("the seeded database is at sequence {found}, the manifest says {expected}")]
    SequenceMismatch { expected: Seq, found: Seq },
}

impl SeedError {
    /// Whether reconnecting may help.
    fn retryable(&self) -> bool {
        match self {
            SeedError::Connect(
                ConnectError::Connect { .. }
                | ConnectError::Timeout { .. }
                | ConnectError::Handshake { .. },
            ) => true,
            SeedError::Wire { source, .. } => {
                !matches!(source, WireError::Peer { .. } | WireError::Decode(_))
            }
            SeedError::Connection { .. } => true,
            _ => false,
        }
    }
}

fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SeedError {
    let path = path.into();
    move |source| SeedError::Io { op, path, source }
}

/// How a seed runs.
#[derive(Clone)]
pub struct SeedConfig {
    pub data_dir: PathBuf,
    pub leader: SocketAddr,
    pub auth: ClientAuth,
    pub node_id: String,
    pub role: Role,
    /// Chunks in flight at once.
    pub parallel: usize,
    /// Fetches of one chunk before giving up on it.
    pub chunk_attempts: u32,
    /// Reconnects after a lost connection before giving up.
    pub reconnects: u32,
    pub transport: TransportOptions,
    /// Called with progress at most a few times a second.
    pub progress: Option<ProgressFn>,
    /// Re-seed a directory that holds a database: its files are kept aside
    /// and every chunk whose hash matches the new manifest is reused
    /// instead of fetched.
    pub reuse_existing: bool,
    /// The CPU priority of the seed's work on this node: receiving,
    /// decrypting, verifying and writing (see [`crate::priority`]).
    pub priority: SeedPriority,
}

impl std::fmt::Debug for SeedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedConfig")
            .field("data_dir", &self.data_dir)
            .field("leader", &self.leader)
            .finish_non_exhaustive()
    }
}

impl SeedConfig {
    pub fn new(data_dir: impl Into<PathBuf>, leader: SocketAddr, auth: ClientAuth) -> Self {
        let data_dir = data_dir.into();
        Self {
            node_id: node_id_for_dir(&data_dir),
            data_dir,
            leader,
            auth,
            role: Role::Seeder,
            parallel: 16,
            chunk_attempts: 5,
            reconnects: 5,
            transport: TransportOptions::default(),
            progress: None,
            reuse_existing: false,
            priority: SeedPriority::default(),
        }
    }
}

/// A daemon's default node id: the host name and a hash of its data
/// directory. It stays the same across restarts, so a follower restarted
/// during its first seed gets its checkpoint back from the leader (and
/// keeps every chunk it has), and keeps its place in the leader's list of
/// followers; two nodes on one host have different directories.
pub fn default_node_id(data_dir: &Path) -> String {
    shorten_host(&host_name(), &format!("-{}", dir_hash(data_dir)))
}

/// 12 hex digits of the blake3 hash of `dir`, made absolute.
fn dir_hash(dir: &Path) -> String {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex()[..12].to_owned()
}

/// This host's name, or "node" when it has none to read.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "node".into())
}

/// A seed's node id: the host name and a hash of the directory it seeds,
/// the same in every run on that directory. A leader hands a node the
/// checkpoint it was handed before, while it keeps it, so a seed killed and
/// started again resumes from the checkpoint it was fetching.
pub fn node_id_for_dir(dir: &Path) -> String {
    shorten_host(&host_name(), &format!("-seed-{}", dir_hash(dir)))
}

/// `host` and `suffix`, the host shortened (at a character boundary) to
/// fit a node id.
fn shorten_host(host: &str, suffix: &str) -> String {
    let mut host: String = host.chars().filter(|c| !c.is_control()).collect();
    while host.len() + suffix.len() > crate::protocol::MAX_NODE_ID {
        host.pop();
    }
    if host.is_empty() {
        host.push_str("node");
    }
    host + suffix
}

/// Checks a node id before it is used on the wire: 1 to 64 bytes of UTF-8
/// without control characters.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > crate::protocol::MAX_NODE_ID {
        return Err(format!(
            "a node id is 1 to {} bytes; {id:?} is {}",
            crate::protocol::MAX_NODE_ID,
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("a node id has no control characters: {id:?}"));
    }
    Ok(())
}

/// Called with the progress of a running seed (about once a second).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Progress of a running seed.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub bytes_total: u64,
    /// Verified bytes, including reused ones.
    pub bytes_done: u64,
    /// Bytes reused from an earlier, interrupted run.
    pub bytes_reused: u64,
    /// Bytes received on the wire (after compression).
    pub wire_bytes: u64,
    pub elapsed: Duration,
}

/// What a finished seed did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeedReport {
    pub seq: Seq,
    pub manifest_id: String,
    pub files: usize,
    pub bytes_total: u64,
    pub chunks_total: usize,
    /// Chunks fetched in this run.
    pub chunks_fetched: usize,
    /// Raw bytes of the chunks fetched in this run.
    pub bytes_fetched: u64,
    /// Bytes received on the wire for them.
    pub wire_bytes: u64,
    /// Chunks that were already verified when the last attempt began:
    /// fetched by an earlier attempt of this run (before a reconnect) or by
    /// an earlier, interrupted run.
    pub chunks_resumed: usize,
    pub bytes_resumed: u64,
    /// Chunks taken from this node's own old files (a re-seed) instead of
    /// the network.
    pub chunks_reused: usize,
    pub bytes_reused: u64,
    /// Chunks that failed verification and were fetched again.
    pub chunks_refetched: usize,
    pub reconnects: u32,
    pub elapsed_secs: f64,
    /// Where the last attempt's time went.
    pub phases: Phases,
}

/// Seconds of the last attempt, phase by phase, in order.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Phases {
    /// QUIC handshake and `Hello`/`Welcome`.
    pub connect: f64,
    /// Asking for the manifest, receiving and checking it.
    pub manifest: f64,
    /// Reconciling the staging directory (resume, reuse) and reserving
    /// its space.
    pub staging: f64,
    /// Fetching, verifying and writing the missing chunks.
    pub transfer: f64,
    /// The last fsync of the written files and bitmap.
    pub sync: f64,
    /// Moving the files into place, with their fsyncs.
    pub install: f64,
    /// Telling the leader and closing the connection.
    pub close: f64,
}

/// Seeds `cfg.data_dir` from `cfg.leader`; resumes an interrupted seed.
pub async fn seed(cfg: SeedConfig) -> Result<SeedReport, SeedError> {
    // At idle priority every task and blocking call of the seed, its QUIC
    // endpoint's among them, runs on the idle runtime.
    crate::priority::run(cfg.priority, seed_here(cfg))
        .await
        .map_err(join_err)?
}

async fn seed_here(cfg: SeedConfig) -> Result<SeedReport, SeedError> {
    let started = Instant::now();
    let staging = prepare_target(&cfg.data_dir, cfg.reuse_existing)?;
    if staging.join(INSTALLING).exists() {
        // Every chunk was verified before the crash; finish the install.
        let manifest = read_manifest(&staging)?;
        let (data, st, m) = (cfg.data_dir.clone(), staging.clone(), manifest.clone());
        let seq = tokio::task::spawn_blocking(move || finish_install(&data, &st, &m))
            .await
            .map_err(join_err)??;
        tracing::info!(seq, "finished an interrupted install");
        return Ok(SeedReport {
            seq,
            manifest_id: manifest.id().to_string(),
            files: manifest.files.len(),
            bytes_total: manifest.total_bytes(),
            chunks_total: manifest.total_chunks(),
            chunks_fetched: 0,
            bytes_fetched: 0,
            wire_bytes: 0,
            chunks_resumed: manifest.total_chunks(),
            bytes_resumed: manifest.total_bytes(),
            chunks_reused: 0,
            bytes_reused: 0,
            chunks_refetched: 0,
            reconnects: 0,
            phases: Phases::default(),
            elapsed_secs: started.elapsed().as_secs_f64(),
        });
    }
    let endpoint = client_endpoint(unspecified_for(cfg.leader), &cfg.transport)?;
    let mut tally = Tally::default();
    let mut attempt = 0;
    let result = loop {
        match seed_once(&cfg, &endpoint, &staging, &mut tally, started).await {
            Ok(r) => break Ok(r),
            Err(e) if e.retryable() && attempt < cfg.reconnects => {
                attempt += 1;
                tally.reconnects = attempt;
                let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(6)));
                tracing::warn!(error = %e, attempt, ?wait, "seed interrupted; reconnecting");
                tokio::time::sleep(wait).await;
            }
            Err(e) => break Err(e),
        }
    };
    endpoint.close(0u32.into(), b"bye");
    // Long enough for the close to go out; the full draining period (three
    // probe timeouts, about 0.1 s even on loopback) only absorbs stray
    // packets, and the seed is installed by now.
    let _ = tokio::time::timeout(Duration::from_millis(20), endpoint.wait_idle()).await;
    result
}

#[derive(Default)]
struct Tally {
    /// Carried over from durable state when the latest attempt began.
    resumed: (usize, u64),
    /// Taken from old local files, over all attempts.
    reused: (usize, u64),
    chunks_fetched: usize,
    bytes_fetched: u64,
    wire_bytes: u64,
    refetched: usize,
    reconnects: u32,
}

struct Done {
    index: usize,
    file: usize,
    raw: u64,
    wire: u64,
    refetched: usize,
}

async fn seed_once(
    cfg: &SeedConfig,
    endpoint: &quinn::Endpoint,
    staging: &Path,
    tally: &mut Tally,
    started: Instant,
) -> Result<SeedReport, SeedError> {
    let peer = cfg.leader;
    let wire = |source| SeedError::Wire { peer, source };
    let mut phases = Phases::default();
    let mut lap = Instant::now();
    let mut mark = |phase: &mut f64| {
        *phase = lap.elapsed().as_secs_f64();
        lap = Instant::now();
    };
    let mut client = Client::connect(
        endpoint,
        peer,
        &cfg.auth,
        &cfg.transport,
        &cfg.node_id,
        cfg.role,
    )
    .await?;
    mark(&mut phases.connect);
    let (session, manifest) = match client
        .request(&Frame::ManifestRequest)
        .await
        .map_err(wire)?
    {
        Frame::ManifestReply { session, manifest } => (session, Manifest::decode(&manifest)?),
        other => {
            return Err(wire(WireError::Unexpected {
                got: other.name(),
                state: "waiting for the manifest",
            }))
        }
    };
    let manifest = Arc::new(manifest);
    // Check the manifest is self-consistent before fetching anything.
    for f in &manifest.files {
        if file_hash_from_chunks(&f.chunks) != f.hash {
            return Err(SeedError::FileHash {
                file: f.name.to_string(),
            });
        }
    }
    mark(&mut phases.manifest);
    let staging2 = staging.to_path_buf();
    let m2 = Arc::clone(&manifest);
    let (bits, carried, local) = tokio::task::spawn_blocking(move || reconcile(&staging2, &m2))
        .await
        .map_err(join_err)??;
    mark(&mut phases.staging);
    let offsets = chunk_offsets(&manifest);
    // Every file's first chunk goes first: it is the dictionary the leader
    // may compress the file's other chunks against (crate::dict).
    let mut queue = VecDeque::new();
    let mut rest = VecDeque::new();
    let mut reused_bytes = 0;
    for (fi, f) in manifest.files.iter().enumerate() {
        for c in 0..f.chunks.len() {
            if bits.get(offsets[fi] + c) {
                let (s, e) = f.chunk_range(c, manifest.chunk_size);
                reused_bytes += e - s;
            } else if c == DICT_CHUNK as usize {
                queue.push_back((fi, c));
            } else {
                rest.push_back((fi, c));
            }
        }
    }
    queue.append(&mut rest);
    let dicts = Arc::new(Dictionaries::new(
        client.version >= 3,
        manifest
            .files
            .iter()
            .enumerate()
            .map(|(fi, _)| bits.get(offsets[fi] + DICT_CHUNK as usize)),
    ));
    let reused_chunks = bits.count();
    tally.resumed = carried;
    tally.reused.0 += local.0;
    tally.reused.1 += local.1;
    tracing::info!(
        seq = manifest.seq,
        files = manifest.files.len(),
        bytes = manifest.total_bytes(),
        missing_chunks = queue.len(),
        reused_chunks,
        "seeding"
    );

    let queue = Arc::new(Mutex::new(queue));
    let (tx, rx) = mpsc::channel::<Done>(1024);
    let keeper = tokio::spawn(keep_state(
        staging.to_path_buf(),
        Arc::clone(&manifest),
        bits,
        rx,
        cfg.progress.clone(),
        reused_bytes,
        started,
    ));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.parallel.max(1) {
        let (queue, tx, manifest, conn, dicts) = (
            Arc::clone(&queue),
            tx.clone(),
            Arc::clone(&manifest),
            client.conn.clone(),
            Arc::clone(&dicts),
        );
        let staging = staging.to_path_buf();
        let attempts = cfg.chunk_attempts.max(1);
        workers.spawn(async move {
            loop {
                let next = queue.lock().pop_front();
                let Some((file, chunk)) = next else {
                    return Ok(());
                };
                let done = fetch_chunk(
                    &conn,
                    peer,
                    session,
                    &manifest,
                    &staging,
                    (file, chunk),
                    &dicts,
                    attempts,
                )
                .await?;
                let index = chunk_offsets_one(&manifest, file) + chunk;
                if tx.send(Done { index, ..done }).await.is_err() {
                    return Ok(());
                }
            }
        });
    }
    drop(tx);
    let mut failure = None;
    while let Some(r) = workers.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                workers.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(join_err(e));
            }
        }
    }
    mark(&mut phases.transfer);
    // The keeper persists whatever was verified, even on failure.
    let (bits, fetched) = keeper.await.map_err(join_err)??;
    mark(&mut phases.sync);
    tally.chunks_fetched += fetched.chunks;
    tally.bytes_fetched += fetched.raw;
    tally.wire_bytes += fetched.wire;
    tally.refetched += fetched.refetched;
    if let Some(e) = failure {
        return Err(e);
    }
    if bits.count() != manifest.total_chunks() {
        return Err(wire(WireError::FinishedEarly(0)));
    }

    let (data, staging2, m2) = (
        cfg.data_dir.clone(),
        staging.to_path_buf(),
        Arc::clone(&manifest),
    );
    let seq = tokio::task::spawn_blocking(move || {
        write_atomic(&staging2.join(INSTALLING), b"")?;
        finish_install(&data, &staging2, &m2)
    })
    .await
    .map_err(join_err)??;
    mark(&mut phases.install);

    let stats = client.conn.stats();
    tracing::debug!(
        mtu = stats.path.current_mtu,
        rtt_us = stats.path.rtt.as_micros() as u64,
        cwnd = stats.path.cwnd,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        udp_rx_datagrams = stats.udp_rx.datagrams,
        udp_rx_bytes = stats.udp_rx.bytes,
        "connection stats"
    );
    // Let the leader release the checkpoint.
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.request(&Frame::SeedDone { session }),
    )
    .await
    {
        Ok(Ok(Frame::SeedDoneAck)) => {}
        other => tracing::debug!(?other, "no SeedDone acknowledgement"),
    }
    client.close().await;
    mark(&mut phases.close);
    Ok(SeedReport {
        seq,
        manifest_id: manifest.id().to_string(),
        files: manifest.files.len(),
        bytes_total: manifest.total_bytes(),
        chunks_total: manifest.total_chunks(),
        chunks_fetched: tally.chunks_fetched,
        bytes_fetched: tally.bytes_fetched,
        wire_bytes: tally.wire_bytes,
        chunks_resumed: tally.resumed.0,
        bytes_resumed: tally.resumed.1,
        chunks_reused: tally.reused.0,
        bytes_reused: tally.reused.1,
        chunks_refetched: tally.refetched,
        reconnects: tally.reconnects,
        elapsed_secs: started.elapsed().as_secs_f64(),
        phases,
    })
}

fn chunk_offsets_one(m: &Manifest, file: usize) -> usize {
    m.files[..file].iter().map(|f| f.chunks.len()).sum()
}

fn join_err(e: tokio::task::JoinError) -> SeedError {
    SeedError::Io {
        op: "join task",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::{FileEntry, FileName};

    fn manifest(files: &[(&str, Vec<[u8; 32]>)]) -> Manifest {
        Manifest {
            seq: 1,
            chunk_size: 1 << 16,
            files: files
                .iter()
                .map(|(n, c)| FileEntry {
                    name: FileName::parse(n).unwrap(),
                    size: c.len() as u64 * 65536,
                    hash: [0; 32],
                    chunks: c.clone(),
                })
                .collect(),
            proofs: vec![],
        }
    }

    #[test]
    fn a_dictionary_chunk_that_no_longer_verifies_is_never_used() {
        // A file of two 64 KiB chunks; the second repeats the first, so it
        // compresses to almost nothing against it.
        let chunk: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let body = [chunk.clone(), chunk.clone()].concat();
        let hashes: Vec<[u8; 32]> = (0..2)
            .map(|i| {
                chunk_hash(
                    body.len() as u64,
                    1 << 16,
                    i,
                    &body[i * 65536..(i + 1) * 65536],
                )
            })
            .collect();
        let m = manifest(&[("000001.sst", hashes)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000001.sst");
        let enc = zstd::dict::EncoderDictionary::copy(&chunk, 3);
        let packed = zstd::bulk::Compressor::with_prepared_dictionary(&enc)
            .unwrap()
            .compress(&chunk)
            .unwrap();
        let reply = || (Codec::ZstdDict, 65536u32, Bytes::from(packed.clone()));

        // The staged first chunk has rotted since it was verified.
        let mut staged = vec![0u8; body.len()];
        staged[..65536].copy_from_slice(&chunk);
        staged[100] ^= 1;
        std::fs::write(&path, &staged).unwrap();
        let dicts = Dictionaries::new(true, [true].into_iter());
        // It is caught as such, before decoding: not only by the chunk's
        // own hash after.
        let r = verify_and_write(&m, (0, 1), reply(), Some(&dicts), &path);
        assert!(matches!(
            r,
            Err(Fault::Mismatch("the dictionary chunk no longer verifies"))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), staged, "nothing written");

        // A reply in the dictionary codec to a request that offered none.
        let r = verify_and_write(&m, (0, 1), reply(), None, &path);
        assert!(matches!(
            r,
            Err(Fault::Mismatch("a dictionary that was not offered"))
        ));

        // With the first chunk sound, the same reply decodes, verifies and
        // is written.
        staged[100] ^= 1;
        std::fs::write(&path, &staged).unwrap();
        let dicts = Dictionaries::new(true, [true].into_iter());
        assert_eq!(
            verify_and_write(&m, (0, 1), reply(), Some(&dicts), &path).ok(),
            Some(65536)
        );
        assert_eq!(std::fs::read(&path).unwrap(), body);
    }

    #[test]
    fn a_seed_is_the_same_node_in_every_run_on_its_directory() {
        let a = node_id_for_dir(Path::new("/data/ferry/a"));
        assert_eq!(a, node_id_for_dir(Path::new("/data/ferry/a")));
        assert_ne!(a, node_id_for_dir(Path::new("/data/ferry/b")));
        assert_eq!(validate_node_id(&a), Ok(()));
        // A daemon's default is as stable, and not a seed's.
        let d = default_node_id(Path::new("/data/ferry/a"));
        assert_eq!(d, default_node_id(Path::new("/data/ferry/a")));
        assert_ne!(d, default_node_id(Path::new("/data/ferry/b")));
        assert_ne!(d, a);
        assert_eq!(validate_node_id(&d), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let (_, token) = crate::auth::NodeAuth::load_or_init(dir.path(), "leader").unwrap();
        let auth = ClientAuth::from_token(&token);
        let cfg = SeedConfig::new("/data/ferry/a", "127.0.0.1:1".parse().unwrap(), auth);
        assert_eq!(cfg.node_id, a);
    }

    #[test]
    fn node_ids_fit_and_never_split_a_character() {
        let long = "ñ".repeat(60);
        let id = shorten_host(&long, "-123456");
        assert!(id.len() <= crate::protocol::MAX_NODE_ID, "{id}");
        assert!(id.ends_with("-123456"));
        assert_eq!(validate_node_id(&id), Ok(()));
        assert_eq!(shorten_host("", "-7"), "node-7");
        assert!(validate_node_id(&"x".repeat(65)).is_err());
        assert!(validate_node_id("").is_err());
        assert!(validate_node_id("a\nb").is_err());
        assert_eq!(validate_node_id("leader-1"), Ok(()));
    }

    #[test]
    fn bitmap_bits() {
        let mut b = Bitmap::new(10);
        b.set(0);
        b.set(9);
        b.set(10);
        assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(10));
        assert_eq!(b.count(), 2);
        assert_eq!(Bitmap::from_bytes(b.as_bytes(), 10), Some(b));
        assert_eq!(Bitmap::from_bytes(&[0; 3], 10), None);
    }

    #[test]
    fn carry_over_keeps_only_matching_verified_chunks() {
        let old = manifest(&[
            ("000001.sst", vec![[1; 32], [2; 32], [3; 32]]),
            ("000002.log", vec![[4; 32]]),
        ]);
        let mut bits = Bitmap::new(4);
        for i in [0, 2, 3] {
            bits.set(i);
        }
        // The SST is unchanged, the log grew and changed, a new file appeared.
        let new = manifest(&[
            ("000001.sst", vec![[1; 32], [2; 32], [3; 32]]),
            ("000002.log", vec![[9; 32], [5; 32]]),
            ("000003.sst", vec![[1; 32]]),
        ]);
        let carried = carry_over(&old, &bits, &new);
        let got: Vec<bool> = (0..6).map(|i| carried.get(i)).collect();
        assert_eq!(got, vec![true, false, true, false, false, false]);
        let mut other = new.clone();
        other.chunk_size = 1 << 17;
        assert_eq!(carry_over(&old, &bits, &other).count(), 0);
    }

    #[test]
    fn a_bitmap_written_for_a_new_manifest_never_pairs_with_the_old_one() {
        // Resume state for `old`: its first file's chunks all verified.
        let old = manifest(&[
            ("000001.sst", vec![[1; 32], [2; 32]]),
            ("000002.log", vec![[4; 32]]),
            ("CURRENT", vec![[5; 32]]),
        ]);
        // The next manifest lists a new file first: its bit 0 is another
        // file's chunk than old's bit 0.
        let new = manifest(&[
            ("000000.sst", vec![[7; 32], [8; 32]]),
            ("000001.sst", vec![[1; 32], [2; 32]]),
            ("000002.log", vec![[4; 32]]),
            ("CURRENT", vec![[5; 32]]),
        ]);
        let d = tempfile::tempdir().unwrap();
        let staging = d.path();
        std::fs::write(staging.join(MANIFEST_FILE), old.encode()).unwrap();
        assert_eq!(read_manifest(staging).unwrap(), old);
        // A crash after the new bitmap (all of the new SST verified, say)
        // was written and before the new manifest was.
        let mut newbits = Bitmap::new(6);
        newbits.set(0);
        newbits.set(1);
        std::fs::write(staging.join(BITMAP_FILE), newbits.encode_for(&new.id())).unwrap();
        // On resume against `old` the bitmap is not taken as old's ...
        let (bits, carried, _) = reconcile(staging, &old).unwrap();
        assert_eq!(bits.count(), 0, "chunks never written count as verified");
        assert_eq!(carried, (0, 0));
        // ... while a bitmap that does belong to the manifest is.
        let mut oldbits = Bitmap::new(4);
        oldbits.set(2);
        std::fs::write(staging.join(BITMAP_FILE), oldbits.encode_for(&old.id())).unwrap();
        let (bits, _, _) = reconcile(staging, &old).unwrap();
        assert!(bits.get(2) && bits.count() == 1);
    }

    #[test]
    fn a_crash_while_setting_the_old_database_aside_is_finished_on_restart() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path();
        for name in [
            "CURRENT",
            "MANIFEST-000005",
            "000007.log",
            "000008.sst",
            "LOG",
        ] {
            std::fs::write(data.join(name), name).unwrap();
        }
        // The crash: staging and the marker exist, only CURRENT was moved.
        let staging = seed_dir(data);
        std::fs::create_dir_all(staging.join(REUSE_DIR)).unwrap();
        std::fs::write(staging.join(MOVING), b"").unwrap();
        std::fs::rename(
            data.join("CURRENT"),
            staging.join(REUSE_DIR).join("CURRENT"),
        )
        .unwrap();
        // And a finished seed's staging directory whose deletion was cut short.
        std::fs::create_dir_all(trash_dir(data).join("x")).unwrap();

        assert_eq!(prepare_target(data, true).unwrap(), staging);
        let left: Vec<String> = std::fs::read_dir(data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ferry_engine::FERRY_DIR)
            .collect();
        assert!(
            left.is_empty(),
            "old files beside the new database: {left:?}"
        );
        for name in ["CURRENT", "MANIFEST-000005", "000007.log", "000008.sst"] {
            assert!(
                staging.join(REUSE_DIR).join(name).exists(),
                "{name} kept for reuse"
            );
        }
        assert!(!staging.join(MOVING).exists());
        assert!(!trash_dir(data).exists());
    }
}

/// A byte count for messages: `12.3 MiB`.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
