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
use crate::endpoint::{client_endpoint, unspecified_for, EndpointError, TransportOptions};
use crate::protocol::{Codec, Frame, Role};
use crate::wire::{expect_frame, write_frame, WireError};

const MANIFEST_FILE: &str = "manifest.bin";
const BITMAP_FILE: &str = "verified.bin";
const INSTALLING: &str = "installing";
/// The old database's files, kept aside during a re-seed.
const REUSE_DIR: &str = "reuse";
/// Present while the old database is being moved into `reuse/`.
const MOVING: &str = "moving";

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
    /// A chunk kept failing verification.
    #[error("chunk {chunk} of {file} failed verification {attempts} times")]
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
    pub progress: Option<Arc<dyn Fn(&Progress) + Send + Sync>>,
    /// Re-seed a directory that holds a database: its files are kept aside
    /// and every chunk whose hash matches the new manifest is reused
    /// instead of fetched.
    pub reuse_existing: bool,
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
        Self {
            data_dir: data_dir.into(),
            leader,
            auth,
            node_id: default_node_id(),
            role: Role::Seeder,
            parallel: 16,
            chunk_attempts: 5,
            reconnects: 5,
            transport: TransportOptions::default(),
            progress: None,
            reuse_existing: false,
        }
    }
}

/// A node id from the host name and process id.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "node".into());
    node_id_from(&host, std::process::id())
}

/// `host-pid`, shortened (at a character boundary) to fit a node id.
pub fn node_id_from(host: &str, pid: u32) -> String {
    let suffix = format!("-{pid}");
    let mut host: String = host.chars().filter(|c| !c.is_control()).collect();
    while host.len() + suffix.len() > crate::protocol::MAX_NODE_ID {
        host.pop();
    }
    if host.is_empty() {
        host.push_str("node");
    }
    host + &suffix
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
}

/// One bit per chunk of a manifest, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: usize,
}

impl Bitmap {
    pub fn new(len: usize) -> Self {
        Self {
            bits: vec![0; len.div_ceil(8)],
            len,
        }
    }

    pub fn from_bytes(bytes: &[u8], len: usize) -> Option<Self> {
        (bytes.len() == len.div_ceil(8)).then(|| Self {
            bits: bytes.to_vec(),
            len,
        })
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.bits[i / 8] |= 1 << (i % 8);
        }
    }

    pub fn count(&self) -> usize {
        (0..self.len).filter(|&i| self.get(i)).count()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// The bitmap as stored: the id of the manifest whose chunk order it
    /// follows, then the bits. A bitmap is only ever read back against the
    /// same manifest, so a crash between writing a new bitmap and its new
    /// manifest cannot pair it with the old one.
    pub fn encode_for(&self, manifest: &ferry_engine::ManifestId) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.bits.len());
        out.extend_from_slice(&manifest.0);
        out.extend_from_slice(&self.bits);
        out
    }

    /// Reads a stored bitmap if it belongs to `manifest`.
    pub fn decode_for(bytes: &[u8], manifest: &Manifest) -> Option<Self> {
        let (id, bits) = bytes.split_at_checked(32)?;
        if id != manifest.id().0 {
            return None;
        }
        Self::from_bytes(bits, manifest.total_chunks())
    }
}

/// The global index of each file's first chunk.
fn chunk_offsets(m: &Manifest) -> Vec<usize> {
    let mut at = 0;
    m.files
        .iter()
        .map(|f| {
            let o = at;
            at += f.chunks.len();
            o
        })
        .collect()
}

/// Which chunks of `new` are already verified on disk, given the manifest
/// and bitmap of an earlier run: same file name, same chunk index, same
/// chunk size and same hash.
pub fn carry_over(old: &Manifest, old_bits: &Bitmap, new: &Manifest) -> Bitmap {
    let mut bits = Bitmap::new(new.total_chunks());
    if old.chunk_size != new.chunk_size {
        return bits;
    }
    let old_offsets = chunk_offsets(old);
    let new_offsets = chunk_offsets(new);
    for (nf, &noff) in new.files.iter().zip(&new_offsets) {
        let Some(oi) = old.files.iter().position(|f| f.name == nf.name) else {
            continue;
        };
        let (of, ooff) = (&old.files[oi], old_offsets[oi]);
        for (c, h) in nf.chunks.iter().enumerate() {
            if of.chunks.get(c) == Some(h) && old_bits.get(ooff + c) {
                bits.set(noff + c);
            }
        }
    }
    bits
}

/// Seeds `cfg.data_dir` from `cfg.leader`; resumes an interrupted seed.
pub async fn seed(cfg: SeedConfig) -> Result<SeedReport, SeedError> {
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
    endpoint.wait_idle().await;
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

/// Checks that the target is empty (or holds an unfinished seed) and
/// returns the staging directory.
fn prepare_target(data: &Path, reuse_existing: bool) -> Result<PathBuf, SeedError> {
    std::fs::create_dir_all(data).map_err(io("create directory", data))?;
    let staging = seed_dir(data);
    remove_trash(data)?;
    if staging.exists() {
        if staging.join(MOVING).exists() {
            // A crash while the old database was being set aside: finish.
            move_aside(data, &staging)?;
        }
        return Ok(staging);
    }
    let mut others = Vec::new();
    for e in std::fs::read_dir(data).map_err(io("read directory", data))? {
        let e = e.map_err(io("read directory", data))?;
        if e.file_name() != ferry_engine::FERRY_DIR {
            others.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    if reuse_existing && others.iter().any(|n| n == "CURRENT") {
        // Keep the old database's files aside for reuse; from here on the
        // directory is a seed in progress and never opens as a database.
        // The `moving` marker makes the move resumable: a crash half-way
        // must not leave old WAL files beside the new database.
        let reuse = staging.join(REUSE_DIR);
        std::fs::create_dir_all(&reuse).map_err(io("create directory", &reuse))?;
        write_atomic(&staging.join(MOVING), b"")?;
        sync_dir(&ferry_engine::ferry_dir(data))?;
        move_aside(data, &staging)?;
        return Ok(staging);
    }
    if others.iter().any(|n| n == "CURRENT") {
        return Err(SeedError::NotEmpty {
            path: data.into(),
            reason: "it already holds a database".into(),
        });
    }
    if !others.is_empty() {
        others.sort();
        others.truncate(3);
        return Err(SeedError::NotEmpty {
            path: data.into(),
            reason: format!("it holds {}", others.join(", ")),
        });
    }
    std::fs::create_dir_all(&staging).map_err(io("create directory", &staging))?;
    Ok(staging)
}

/// Moves the old database's files into `staging/reuse` (CURRENT first:
/// without it the rest is no database) and deletes its other files; then
/// removes the `moving` marker. Safe to run again after a crash.
fn move_aside(data: &Path, staging: &Path) -> Result<(), SeedError> {
    let reuse = staging.join(REUSE_DIR);
    std::fs::create_dir_all(&reuse).map_err(io("create directory", &reuse))?;
    let mut names = Vec::new();
    for e in std::fs::read_dir(data).map_err(io("read directory", data))? {
        let e = e.map_err(io("read directory", data))?;
        if e.file_name() != ferry_engine::FERRY_DIR {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort_by_key(|n| n != "CURRENT");
    for name in &names {
        let from = data.join(name);
        if ferry_engine::FileName::parse(name).is_ok() {
            std::fs::rename(&from, reuse.join(name)).map_err(io("rename", &from))?;
        } else if from.is_file() {
            std::fs::remove_file(&from).map_err(io("remove", &from))?;
        }
    }
    sync_dir(&reuse)?;
    sync_dir(data)?;
    let marker = staging.join(MOVING);
    std::fs::remove_file(&marker).map_err(io("remove", &marker))?;
    sync_dir(staging)
}

/// Where a finished staging directory goes to be deleted: renamed there
/// in one step, so a crash during the deletion leaves no half-deleted
/// staging directory behind (which would look like a seed to resume).
fn trash_dir(data: &Path) -> PathBuf {
    ferry_engine::ferry_dir(data).join("seed.trash")
}

fn remove_trash(data: &Path) -> Result<(), SeedError> {
    let trash = trash_dir(data);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    }
    Ok(())
}

fn read_manifest(staging: &Path) -> Result<Manifest, SeedError> {
    let p = staging.join(MANIFEST_FILE);
    let bytes = std::fs::read(&p).map_err(io("read", &p))?;
    Ok(Manifest::decode(&bytes)?)
}

/// Writes a small file atomically and durably.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SeedError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), SeedError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// Lines up the staging directory with `manifest`: keeps verified chunks
/// that are still valid, sizes every file, removes files it no longer lists.
/// Returns the verified chunks, and how many of them (chunks, bytes) were
/// carried over from the durable bitmap and were taken from old local files.
fn reconcile(staging: &Path, manifest: &Manifest) -> Result<(Bitmap, Extent, Extent), SeedError> {
    let old = read_manifest(staging).ok();
    let bits = match &old {
        Some(old) => {
            let bytes = std::fs::read(staging.join(BITMAP_FILE)).unwrap_or_default();
            let old_bits = Bitmap::decode_for(&bytes, old).unwrap_or_else(|| {
                tracing::warn!("the verified-chunk bitmap does not belong to the staged manifest; starting its chunks over");
                Bitmap::new(old.total_chunks())
            });
            carry_over(old, &old_bits, manifest)
        }
        None => Bitmap::new(manifest.total_chunks()),
    };
    let wanted: BTreeSet<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    for e in std::fs::read_dir(staging).map_err(io("read directory", staging))? {
        let e = e.map_err(io("read directory", staging))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE
            && name != BITMAP_FILE
            && name != REUSE_DIR
            && !wanted.contains(name.as_str())
        {
            std::fs::remove_file(e.path()).map_err(io("remove", e.path()))?;
        }
    }
    for f in &manifest.files {
        let p = staging.join(f.name.as_str());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("create", &p))?;
        file.set_len(f.size).map_err(io("resize", &p))?;
    }
    let mut bits = bits;
    let carried = verified_extent(manifest, &bits);
    reuse_local_files(staging, manifest, &mut bits)?;
    let after = verified_extent(manifest, &bits);
    // The bitmap names the manifest it follows: after a crash between the
    // two writes it does not match the manifest on disk and is dropped.
    write_atomic(&staging.join(BITMAP_FILE), &bits.encode_for(&manifest.id()))?;
    write_atomic(&staging.join(MANIFEST_FILE), &manifest.encode())?;
    Ok((bits, carried, (after.0 - carried.0, after.1 - carried.1)))
}

/// A number of chunks and their bytes.
type Extent = (usize, u64);

/// How many chunks, and bytes, `bits` marks verified.
fn verified_extent(manifest: &Manifest, bits: &Bitmap) -> Extent {
    let mut i = 0;
    let (mut n, mut bytes) = (0, 0);
    for f in &manifest.files {
        for c in 0..f.chunks.len() {
            if bits.get(i) {
                let (s, e) = f.chunk_range(c, manifest.chunk_size);
                n += 1;
                bytes += e - s;
            }
            i += 1;
        }
    }
    (n, bytes)
}

/// Takes every chunk of the kept-aside old database that matches the new
/// manifest: whole files by rename when all their chunks match, single
/// chunks by copy otherwise. Touched files are fsynced before the caller
/// persists the bitmap.
fn reuse_local_files(
    staging: &Path,
    manifest: &Manifest,
    bits: &mut Bitmap,
) -> Result<(), SeedError> {
    use std::os::unix::fs::FileExt;
    let reuse = staging.join(REUSE_DIR);
    if !reuse.exists() {
        return Ok(());
    }
    let offsets = chunk_offsets(manifest);
    let mut reused = 0u64;
    for (fi, f) in manifest.files.iter().enumerate() {
        let old = reuse.join(f.name.as_str());
        let missing: Vec<usize> = (0..f.chunks.len())
            .filter(|&c| !bits.get(offsets[fi] + c))
            .collect();
        if missing.is_empty() || !old.exists() {
            continue;
        }
        let (hash, chunks, size) = ferry_engine::manifest::hash_file(&old, manifest.chunk_size)?;
        let target = staging.join(f.name.as_str());
        if size == f.size && hash == f.hash {
            std::fs::rename(&old, &target).map_err(io("rename", &old))?;
            for c in 0..f.chunks.len() {
                bits.set(offsets[fi] + c);
            }
            reused += f.size;
            continue;
        }
        let src = std::fs::File::open(&old).map_err(io("open", &old))?;
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .map_err(io("open", &target))?;
        let mut copied = false;
        for c in missing {
            // A chunk hash depends on the file size (one-chunk files hash as a
            // whole), so compare with hashes computed for the new size.
            let (start, end) = f.chunk_range(c, manifest.chunk_size);
            if end > size || chunks.get(c).is_none() {
                continue;
            }
            let mut buf = vec![0u8; (end - start) as usize];
            src.read_exact_at(&mut buf, start)
                .map_err(io("read", &old))?;
            if chunk_hash(f.size, manifest.chunk_size, c, &buf) == f.chunks[c] {
                dst.write_all_at(&buf, start)
                    .map_err(io("write", &target))?;
                bits.set(offsets[fi] + c);
                reused += buf.len() as u64;
                copied = true;
            }
        }
        if copied {
            dst.sync_data().map_err(io("sync", &target))?;
        }
    }
    if reused > 0 {
        sync_dir(staging)?;
        tracing::info!(bytes = reused, "reused local files for the re-seed");
    }
    Ok(())
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
    let mut client = Client::connect(
        endpoint,
        peer,
        &cfg.auth,
        &cfg.transport,
        &cfg.node_id,
        cfg.role,
    )
    .await?;
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
    let staging2 = staging.to_path_buf();
    let m2 = Arc::clone(&manifest);
    let (bits, carried, local) = tokio::task::spawn_blocking(move || reconcile(&staging2, &m2))
        .await
        .map_err(join_err)??;
    let offsets = chunk_offsets(&manifest);
    let mut queue = VecDeque::new();
    let mut reused_bytes = 0;
    for (fi, f) in manifest.files.iter().enumerate() {
        for c in 0..f.chunks.len() {
            if bits.get(offsets[fi] + c) {
                let (s, e) = f.chunk_range(c, manifest.chunk_size);
                reused_bytes += e - s;
            } else {
                queue.push_back((fi, c));
            }
        }
    }
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
        let (queue, tx, manifest, conn) = (
            Arc::clone(&queue),
            tx.clone(),
            Arc::clone(&manifest),
            client.conn.clone(),
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
                    &conn, peer, session, &manifest, &staging, file, chunk, attempts,
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
    // The keeper persists whatever was verified, even on failure.
    let (bits, fetched) = keeper.await.map_err(join_err)??;
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

/// Why a received chunk was refused.
enum Fault {
    /// It does not match the manifest: fetch it again.
    Mismatch(&'static str),
    /// Writing it failed: give up.
    Io(SeedError),
}

#[allow(clippy::too_many_arguments)]
async fn fetch_chunk(
    conn: &Connection,
    peer: SocketAddr,
    session: u64,
    manifest: &Arc<Manifest>,
    staging: &Path,
    file: usize,
    chunk: usize,
    attempts: u32,
) -> Result<Done, SeedError> {
    let wire = |source| SeedError::Wire { peer, source };
    let mut refetched = 0;
    for attempt in 1..=attempts {
        let asked = Instant::now();
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| SeedError::Connection { peer, source })?;
        write_frame(
            &mut send,
            &Frame::ChunkRequest {
                session,
                file: file as u32,
                chunk: chunk as u32,
            },
        )
        .await
        .map_err(wire)?;
        let _ = send.finish();
        let (codec, raw_len, data) = match expect_frame(&mut recv).await.map_err(wire)? {
            Frame::ChunkReply {
                codec,
                raw_len,
                data,
            } => (codec, raw_len, data),
            other => {
                return Err(wire(WireError::Unexpected {
                    got: other.name(),
                    state: "waiting for a chunk",
                }))
            }
        };
        metrics::histogram!("ferry_seed_chunk_fetch_seconds").record(asked.elapsed().as_secs_f64());
        let wire_len = data.len() as u64;
        let (m, path) = (
            Arc::clone(manifest),
            staging.join(manifest.files[file].name.as_str()),
        );
        let verdict = tokio::task::spawn_blocking(move || {
            verify_and_write(&m, file, chunk, codec, raw_len, data, &path)
        })
        .await
        .map_err(join_err)?;
        match verdict {
            Ok(raw) => {
                return Ok(Done {
                    index: 0,
                    file,
                    raw,
                    wire: wire_len,
                    refetched,
                })
            }
            Err(Fault::Io(e)) => return Err(e),
            Err(Fault::Mismatch(why)) => {
                refetched += 1;
                tracing::warn!(file = %manifest.files[file].name, chunk, attempt, why, "chunk failed verification; fetching it again");
            }
        }
    }
    Err(SeedError::BadChunk {
        file: manifest.files[file].name.to_string(),
        chunk,
        attempts,
    })
}

/// Decodes, verifies and writes one chunk. Nothing is written unless the
/// hash matches.
fn verify_and_write(
    m: &Manifest,
    file: usize,
    chunk: usize,
    codec: Codec,
    raw_len: u32,
    data: Bytes,
    path: &Path,
) -> Result<u64, Fault> {
    use std::os::unix::fs::FileExt;
    let entry = &m.files[file];
    let (start, end) = entry.chunk_range(chunk, m.chunk_size);
    let expected = (end - start) as usize;
    if raw_len as usize != expected {
        return Err(Fault::Mismatch("wrong length"));
    }
    let raw: Bytes = match codec {
        Codec::Raw => data,
        Codec::Zstd => match zstd::bulk::decompress(&data, expected) {
            Ok(v) => Bytes::from(v),
            Err(_) => return Err(Fault::Mismatch("bad zstd data")),
        },
    };
    if raw.len() != expected {
        return Err(Fault::Mismatch("wrong length"));
    }
    if chunk_hash(entry.size, m.chunk_size, chunk, &raw) != entry.chunks[chunk] {
        return Err(Fault::Mismatch("hash mismatch"));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Fault::Io(io("open", path)(e)))?;
    f.write_all_at(&raw, start)
        .map_err(|e| Fault::Io(io("write", path)(e)))?;
    Ok(expected as u64)
}

#[derive(Default)]
struct Fetched {
    chunks: usize,
    raw: u64,
    wire: u64,
    refetched: usize,
}

/// Owns the bitmap: marks chunks as they arrive, and every second (or
/// 256 MiB) fsyncs the files written since and persists the bitmap.
async fn keep_state(
    staging: PathBuf,
    manifest: Arc<Manifest>,
    mut bits: Bitmap,
    mut rx: mpsc::Receiver<Done>,
    progress: Option<Arc<dyn Fn(&Progress) + Send + Sync>>,
    reused: u64,
    started: Instant,
) -> Result<(Bitmap, Fetched), SeedError> {
    let mut fetched = Fetched::default();
    let mut pending: Vec<usize> = Vec::new();
    let mut dirty: BTreeSet<usize> = BTreeSet::new();
    let mut pending_bytes = 0u64;
    let mut last_save = Instant::now();
    let mut last_progress = Instant::now();
    let mut done_bytes = reused;
    let total = manifest.total_bytes();
    let manifest_id = manifest.id();
    let report = |done: u64, wire: u64| {
        if let Some(p) = &progress {
            p(&Progress {
                bytes_total: total,
                bytes_done: done,
                bytes_reused: reused,
                wire_bytes: wire,
                elapsed: started.elapsed(),
            });
        }
    };
    loop {
        let msg = tokio::time::timeout(Duration::from_millis(250), rx.recv()).await;
        let closed = matches!(msg, Ok(None));
        if let Ok(Some(d)) = msg {
            pending.push(d.index);
            dirty.insert(d.file);
            pending_bytes += d.raw;
            done_bytes += d.raw;
            fetched.chunks += 1;
            fetched.raw += d.raw;
            fetched.wire += d.wire;
            fetched.refetched += d.refetched;
        }
        if closed
            || (!pending.is_empty()
                && (last_save.elapsed() >= Duration::from_secs(1) || pending_bytes >= 256 << 20))
        {
            let files: Vec<PathBuf> = dirty
                .iter()
                .map(|&i| staging.join(manifest.files[i].name.as_str()))
                .collect();
            let mut next = bits.clone();
            for &i in &pending {
                next.set(i);
            }
            let (st, snapshot) = (staging.clone(), next.encode_for(&manifest_id));
            tokio::task::spawn_blocking(move || -> Result<(), SeedError> {
                for p in &files {
                    std::fs::File::open(p)
                        .and_then(|f| f.sync_data())
                        .map_err(io("sync", p))?;
                }
                write_atomic(&st.join(BITMAP_FILE), &snapshot)
            })
            .await
            .map_err(join_err)??;
            bits = next;
            pending.clear();
            dirty.clear();
            pending_bytes = 0;
            last_save = Instant::now();
        }
        if closed || last_progress.elapsed() >= Duration::from_millis(200) {
            report(done_bytes, fetched.wire);
            last_progress = Instant::now();
        }
        if closed {
            return Ok((bits, fetched));
        }
    }
}

/// Renames the staged files into the data directory, `CURRENT` last, and
/// removes the staging directory; then opens the result read-only and
/// checks it holds the manifest's sequence.
fn finish_install(data: &Path, staging: &Path, manifest: &Manifest) -> Result<Seq, SeedError> {
    // The staged database must be at the manifest's sequence before any of
    // it becomes visible (after a crash half-way CURRENT may be in place
    // already; the check after the install covers that case).
    if staging.join("CURRENT").exists() {
        let found = Store::open_read_only(staging)?.latest_seq();
        if found != manifest.seq {
            return Err(SeedError::SequenceMismatch {
                expected: manifest.seq,
                found,
            });
        }
    }
    for f in manifest
        .files
        .iter()
        .filter(|f| f.name.as_str() != "CURRENT")
    {
        let from = staging.join(f.name.as_str());
        if from.exists() {
            std::fs::File::open(&from)
                .and_then(|h| h.sync_all())
                .map_err(io("sync", &from))?;
            std::fs::rename(&from, data.join(f.name.as_str())).map_err(io("rename", &from))?;
        }
    }
    sync_dir(data)?;
    let current = staging.join("CURRENT");
    if current.exists() {
        std::fs::File::open(&current)
            .and_then(|h| h.sync_all())
            .map_err(io("sync", &current))?;
        std::fs::rename(&current, data.join("CURRENT")).map_err(io("rename", &current))?;
        sync_dir(data)?;
    }
    // One rename ends the seed; the deletion after it may be cut short.
    let trash = trash_dir(data);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    }
    std::fs::rename(staging, &trash).map_err(io("rename", staging))?;
    sync_dir(&ferry_engine::ferry_dir(data))?;
    std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    let found = Store::open_read_only(data)?.latest_seq();
    if found != manifest.seq {
        return Err(SeedError::SequenceMismatch {
            expected: manifest.seq,
            found,
        });
    }
    Ok(found)
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
        }
    }

    #[test]
    fn node_ids_fit_and_never_split_a_character() {
        let long = "ñ".repeat(60);
        let id = node_id_from(&long, 123456);
        assert!(id.len() <= crate::protocol::MAX_NODE_ID, "{id}");
        assert!(id.ends_with("-123456"));
        assert_eq!(validate_node_id(&id), Ok(()));
        assert_eq!(node_id_from("", 7), "node-7");
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
