//! The store: one RocksDB database in a data directory, and everything a
//! leader or follower does with it. This is the only module that names
//! RocksDB types.
//!
//! Layout of a data directory:
//!
//! ```text
//! DIR/                   the RocksDB database (an existing one can be adopted)
//! DIR/.ferry/checkpoints hard-linked checkpoints, cp-<seq>-<nanos>
//! DIR/.ferry/hash-cache.json   cached hashes of immutable files
//! DIR/.ferry/seed/       an unfinished seed; while it exists DIR is not opened
//! ```
//!
//! All writes and applies take one lock, read the sequence RocksDB assigned
//! and publish the batch to the [`Feed`] before releasing it, so the feed is
//! in commit order and every read can name the exact sequence it reflects.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rocksdb::{DBWALIterator, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::Serialize;

use crate::batch::{Batch, Op, RawBatch};
use crate::error::{io, DivergenceError, Error, Result, Seq};
use crate::feed::{Feed, FeedLimits};
use crate::manifest::{build_manifest, Hash, HashCache, HashStats, Manifest, DEFAULT_CHUNK_SIZE};

pub use crate::paths::{ferry_dir, seed_dir, write_atomic, FERRY_DIR};
const CHECKPOINTS: &str = "checkpoints";
/// Checkpoints are built under this prefix and renamed to `cp-…` once
/// complete; leftovers of a crash are removed when the store next opens.
const CHECKPOINT_TMP: &str = "tmp-";
/// `log_size_for_flush` that never flushes the memtable for a checkpoint.
const CHECKPOINT_NEVER_FLUSH: u64 = u64::MAX;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Create an empty database when the directory holds none.
    pub create_if_missing: bool,
    /// Keep obsolete WAL files this long, so followers can catch up.
    pub wal_ttl_seconds: u64,
    /// ... and at most this many MiB of them.
    pub wal_size_limit_mb: u64,
    /// fsync the WAL on every write.
    pub sync_writes: bool,
    /// Publish a leader's writes to the feed (and so to followers) only
    /// once the WAL holding them is synced. One sync covers every write
    /// that arrived meanwhile (group commit), and a write returns after it.
    /// Without it a power cut can leave followers with writes the leader
    /// lost.
    pub durable_shipping: bool,
    /// Bounds of the in-memory live feed.
    pub feed: FeedLimits,
    /// Chunk size of the manifests this store builds.
    pub chunk_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            create_if_missing: true,
            // A multi-minute seed of a busy leader must still find its WAL.
            wal_ttl_seconds: 6 * 3600,
            wal_size_limit_mb: 8 * 1024,
            sync_writes: false,
            durable_shipping: true,
            feed: FeedLimits::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// The sequence range a batch was committed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqRange {
    pub first: Seq,
    pub last: Seq,
}

/// A checkpoint under the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointInfo {
    pub name: String,
    pub path: PathBuf,
    /// The sequence of the last write the checkpoint holds.
    pub seq: Seq,
}

/// A logical digest of every key and value at one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Digest {
    /// blake3 over (key length, key, value length, value) of every pair in key order.
    pub digest: String,
    pub seq: Seq,
    pub keys: u64,
    pub bytes: u64,
}

/// A range scan request.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub prefix: Vec<u8>,
    /// Start at this key (inclusive); keys before the prefix are skipped anyway.
    pub start: Option<Vec<u8>>,
    pub limit: usize,
    /// Stop once the keys and values returned take this many bytes (0: no
    /// bound); at least one pair is always returned.
    pub max_bytes: usize,
}

/// One page of a scan.
#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub items: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the next page starts, when the range holds more.
    pub next: Option<Vec<u8>>,
}

/// A handle to an open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    path: PathBuf,
    opts: StoreOptions,
    read_only: bool,
    follower: AtomicBool,
    write_lock: Mutex<()>,
    feed: Feed,
    hash_cache: Mutex<HashCache>,
    /// Written, not yet synced, so not yet published (durable shipping).
    pending: Mutex<std::collections::VecDeque<RawBatch>>,
    /// Held by the one thread that syncs the WAL for a group of writes.
    sync_lock: Mutex<()>,
    /// Everything up to here is synced and published.
    durable: std::sync::atomic::AtomicU64,
    /// The last write or applied group: what a follower proves it holds.
    last_write: Mutex<Option<WriteId>>,
    /// Serializes updates of `issued.json`.
    issued_lock: Mutex<()>,
    /// Set when the owner wants every handle released (a re-seed replaces
    /// the database): long waits holding a handle watch it and give up.
    closing: tokio::sync::watch::Sender<bool>,
    /// Total latency (nanoseconds) and count of the writes since the last
    /// `take_write_latency`: the foreground load's health, which a seed
    /// served from this store backs off from.
    write_latency: Mutex<(u128, u64)>,
    /// The owner records foreground latency itself (end to end, as its
    /// clients see it) through `record_write_latency`.
    external_latency: AtomicBool,
}

/// One RocksDB write (a client batch on a leader, an applied group of the
/// leader's batches on a follower): its sequence range and a hash of its
/// records. A follower proves to a leader that it holds the leader's
/// history by the [`WriteId`] of its last write; the leader recomputes the
/// hash over its own batches in that range ([`Store::range_hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WriteId {
    pub first: Seq,
    pub last: Seq,
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("not 32 hex bytes"))
    }
}

/// Hashes the operations with sequences `first..=last` of consecutive
/// batches, record by record.
///
/// Only the records count, never where the batches were cut: a leader's two
/// single puts and a follower's one applied group of them, or a forked
/// leader's one two-op batch over the same sequences, are compared op by
/// op. A range may start and end inside a batch. `LogData` records take no
/// sequence and are left out.
struct RangeHasher {
    h: blake3::Hasher,
    first: Seq,
    /// The next sequence to hash.
    next: Seq,
    /// The last sequence to hash.
    limit: Seq,
}

impl RangeHasher {
    /// From `first` on, without an end (a write or an applied group).
    fn new(first: Seq) -> Self {
        Self::bounded(first, Seq::MAX)
    }

    fn bounded(first: Seq, last: Seq) -> Self {
        Self {
            h: blake3::Hasher::new(),
            first,
            next: first,
            limit: last,
        }
    }

    /// Whether every sequence up to the limit was hashed.
    fn done(&self) -> bool {
        self.next > self.limit
    }

    /// Adds the operations of a batch (or a group) of `count` operations
    /// starting at `first` that fall in the range; `data` is its RocksDB
    /// serialization. False when the batch leaves a gap after what was
    /// hashed (or cannot be read): the range cannot be completed from it.
    fn add(&mut self, first: Seq, count: u32, data: &[u8]) -> bool {
        if count == 0 || self.done() {
            return true;
        }
        let last = first + u64::from(count) - 1;
        if last < self.next {
            return true;
        }
        if first > self.next {
            return false;
        }
        let mut seq = first;
        let (from, limit) = (self.next, self.limit);
        let h = &mut self.h;
        let walked = crate::batch::walk_records(data, |counts, record| {
            if counts {
                if seq >= from && seq <= limit {
                    h.update(record);
                }
                seq += 1;
            }
            Ok(())
        });
        if walked.is_err() || seq != last + 1 {
            return false;
        }
        self.next = last.min(self.limit) + 1;
        true
    }

    fn finish(&self) -> WriteId {
        let last = self.next - 1;
        let mut h = self.h.clone();
        h.update(&self.first.to_le_bytes());
        h.update(&last.to_le_bytes());
        WriteId {
            first: self.first,
            last,
            hash: *h.finalize().as_bytes(),
        }
    }
}

/// The proof windows a follower offers, in sequences ending at its last:
/// the leader checks every one its WAL still reaches.
pub const PROOF_WINDOWS: [u64; 3] = [1, 64, 4096];

/// How many issued checkpoints a store remembers ([`Store::record_issued`]).
pub const MAX_ISSUED: usize = 64;

/// A seed checkpoint a store issued: its sequence and its manifest's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Issued {
    pub seq: Seq,
    #[serde(with = "hex_array")]
    pub manifest: [u8; 32],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store in `path`.
    ///
    /// Refuses a directory that holds an unfinished seed, so a half-seeded
    /// directory never opens as a database.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if seed_dir(&path).exists() {
            return Err(Error::SeedInProgress { path });
        }
        if !opts.create_if_missing && !path.join("CURRENT").exists() {
            return Err(Error::NoDatabase { path });
        }
        std::fs::create_dir_all(ferry_dir(&path).join(CHECKPOINTS))
            .map_err(io("create directory", ferry_dir(&path)))?;
        let mut o = Options::default();
        o.create_if_missing(opts.create_if_missing);
        o.set_wal_ttl_seconds(opts.wal_ttl_seconds);
        o.set_wal_size_limit_mb(opts.wal_size_limit_mb);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_max_background_jobs(2);
        o.set_keep_log_file_num(4);
        // Table format 5 (RocksDB 6.6+) rather than 10.x's default 6, so that
        // the RocksDB tools operators already have (Debian ships 7.8's ldb
        // and sst_dump) can read every file ferry writes.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_format_version(5);
        o.set_block_based_table_factory(&table);
        let db = DB::open(&o, &path).map_err(rocks(&path))?;
        // The database's lock is held now, so no other process is building
        // a checkpoint here: unfinished ones are a crash's leftovers, and
        // their hard links would keep compacted SSTs on disk for ever.
        remove_unfinished_checkpoints(&ferry_dir(&path).join(CHECKPOINTS))?;
        Ok(Self::from_db(db, path, opts, false))
    }

    /// Opens the database in `path` read-only: nothing in it is changed, and
    /// it may be a checkpoint or a store another process has open.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if seed_dir(&path).exists() {
            return Err(Error::SeedInProgress { path });
        }
        if !path.join("CURRENT").exists() {
            return Err(Error::NoDatabase { path });
        }
        let mut o = Options::default();
        o.set_keep_log_file_num(1);
        let db = DB::open_for_read_only(&o, &path, false).map_err(rocks(&path))?;
        Ok(Self::from_db(db, path, StoreOptions::default(), true))
    }

    fn from_db(db: DB, path: PathBuf, opts: StoreOptions, read_only: bool) -> Self {
        let latest = db.latest_sequence_number();
        let feed = Feed::new(latest, opts.feed);
        let hash_cache = if read_only {
            HashCache::in_memory()
        } else {
            HashCache::load(ferry_dir(&path).join("hash-cache.json"))
        };
        Self {
            inner: Arc::new(Inner {
                db,
                path,
                opts,
                read_only,
                follower: AtomicBool::new(false),
                write_lock: Mutex::new(()),
                feed,
                hash_cache: Mutex::new(hash_cache),
                pending: Mutex::new(std::collections::VecDeque::new()),
                sync_lock: Mutex::new(()),
                durable: std::sync::atomic::AtomicU64::new(latest),
                last_write: Mutex::new(None),
                issued_lock: Mutex::new(()),
                closing: tokio::sync::watch::channel(false).0,
                write_latency: Mutex::new((0, 0)),
                external_latency: AtomicBool::new(false),
            }),
        }
    }

    /// The mean latency of `write` (commit and, with durable shipping, the
    /// WAL sync) since the last call, and how many writes it covers; `None`
    /// when there were none. One caller (the seed server's busy control)
    /// samples it.
    pub fn take_write_latency(&self) -> Option<(std::time::Duration, u64)> {
        let mut l = self.inner.write_latency.lock();
        let (ns, n) = std::mem::take(&mut *l);
        (n > 0).then(|| {
            (
                std::time::Duration::from_nanos((ns / u128::from(n)) as u64),
                n,
            )
        })
    }

    /// From now on the owner reports write latency (see
    /// [`Store::record_write_latency`]) instead of `write` measuring it.
    pub fn set_external_write_latency(&self, on: bool) {
        self.inner.external_latency.store(on, Ordering::Relaxed);
    }

    /// Records one foreground write's latency as its client saw it.
    pub fn record_write_latency(&self, took: std::time::Duration) {
        let mut l = self.inner.write_latency.lock();
        l.0 += took.as_nanos();
        l.1 += 1;
    }

    fn note_write_latency(&self, took: std::time::Duration) {
        if self.inner.external_latency.load(Ordering::Relaxed) {
            return;
        }
        let mut l = self.inner.write_latency.lock();
        l.0 += took.as_nanos();
        l.1 += 1;
    }

    /// Asks every holder of a handle to let go: the owner is about to
    /// close (or replace) the database.
    pub fn request_close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Becomes true once [`Store::request_close`] was called; waits that
    /// hold a handle select on it.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many handles share this open database (the database closes
    /// when the last one is dropped).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    /// The sequence of the last committed write.
    pub fn latest_seq(&self) -> Seq {
        self.inner.db.latest_sequence_number()
    }

    /// The last sequence known durable: synced to the WAL (with durable
    /// shipping) and published to the feed. Batches after it may still be
    /// lost to a power cut, so they are not shipped.
    pub fn durable_seq(&self) -> Seq {
        self.inner.durable.load(Ordering::SeqCst)
    }

    /// RocksDB's compactions running now (`rocksdb.num-running-compactions`;
    /// 0 if RocksDB does not say).
    pub fn compactions_running(&self) -> u64 {
        self.inner
            .db
            .property_int_value("rocksdb.num-running-compactions")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// The live feed of batches committed through this handle.
    pub fn feed(&self) -> &Feed {
        &self.inner.feed
    }

    /// Marks the store as a follower: client writes are refused from now on,
    /// only [`Store::apply`] changes it.
    pub fn set_follower(&self, follower: bool) {
        self.inner.follower.store(follower, Ordering::SeqCst);
    }

    pub fn is_follower(&self) -> bool {
        self.inner.follower.load(Ordering::SeqCst)
    }

    // ---- writes ------------------------------------------------------

    /// Commits `batch` atomically and returns the sequences it was given.
    pub fn write(&self, batch: &Batch) -> Result<SeqRange> {
        if self.inner.read_only || self.is_follower() {
            return Err(Error::ReadOnly);
        }
        if batch.is_empty() {
            let s = self.latest_seq();
            return Ok(SeqRange {
                first: s + 1,
                last: s,
            });
        }
        let mut wb = WriteBatch::default();
        for op in batch.ops() {
            match op {
                Op::Put { key, value } => wb.put(key, value),
                Op::Delete { key } => wb.delete(key),
            }
        }
        let count = wb.len() as u32;
        let data = Bytes::copy_from_slice(wb.data());
        let durable = self.inner.opts.durable_shipping && !self.inner.opts.sync_writes;
        let started = std::time::Instant::now();
        let g = self.inner.write_lock.lock();
        let before = self.latest_seq();
        self.inner
            .db
            .write_opt(wb, &self.write_options())
            .map_err(rocks(&self.inner.path))?;
        let last = self.latest_seq();
        let first = last + 1 - u64::from(count);
        if first != before + 1 {
            // Only possible if something wrote to the database around ferry.
            tracing::error!(
                before,
                first,
                last,
                "sequence moved by a write outside ferry"
            );
        }
        let mut id = RangeHasher::new(first);
        id.add(first, count, &data);
        *self.inner.last_write.lock() = Some(id.finish());
        let raw = RawBatch::from_trusted(first, count, data);
        if durable {
            self.inner.pending.lock().push_back(raw);
            drop(g);
            self.wait_durable(last)?;
        } else {
            self.inner.feed.publish(raw);
            self.inner.durable.store(last, Ordering::SeqCst);
            drop(g);
        }
        self.note_write_latency(started.elapsed());
        Ok(SeqRange { first, last })
    }

    /// Returns once the WAL is synced up to `last` and the batches up to it
    /// are published (group commit: whoever syncs takes every write
    /// committed so far, so one fsync serves all writers waiting meanwhile).
    fn wait_durable(&self, last: Seq) -> Result<()> {
        let inner = &self.inner;
        loop {
            if inner.durable.load(Ordering::SeqCst) >= last {
                return Ok(());
            }
            let _sync = inner.sync_lock.lock();
            if inner.durable.load(Ordering::SeqCst) >= last {
                return Ok(());
            }
            // Everything committed so far, in commit order.
            let group: Vec<RawBatch> = {
                let _w = inner.write_lock.lock();
                inner.pending.lock().drain(..).collect()
            };
            let Some(target) = group.last().map(RawBatch::last) else {
                continue;
            };
            if let Err(e) = inner.db.flush_wal(true) {
                // Not durable, so not shipped: put the group back for the
                // next attempt, in front of anything written since.
                let mut p = inner.pending.lock();
                for b in group.into_iter().rev() {
                    p.push_front(b);
                }
                return Err(rocks(&inner.path)(e));
            }
            for b in group {
                inner.feed.publish(b);
            }
            inner.durable.store(target, Ordering::SeqCst);
        }
    }

    /// The last write (leader) or applied group (follower) of this handle,
    /// if any since it was opened.
    pub fn last_write(&self) -> Option<WriteId> {
        *self.inner.last_write.lock()
    }

    /// The [`WriteId`] of this store's operations `first..=last`, from the
    /// feed when it still holds them, else from the WAL; the range may start
    /// and end inside batches ([`RangeHasher`]).
    ///
    /// `Ok(None)` only when this store cannot say: its WAL was purged past
    /// `first` (the oldest sequence it holds is above it). Anything else
    /// that keeps the range from being hashed (a gap, an unreadable batch)
    /// is an error, never `None`: a caller that proves history with this
    /// must not mistake a fork for a purged WAL.
    pub fn range_hash(&self, first: Seq, last: Seq) -> Result<Option<WriteId>> {
        if first == 0 || last < first || last > self.latest_seq() {
            return Err(Error::Malformed {
                what: "write range",
                reason: format!("{first}..={last} is not a range of this store"),
            });
        }
        if let Some(batches) = self.inner.feed.read_from(first, usize::MAX) {
            let mut h = RangeHasher::bounded(first, last);
            for b in batches {
                if h.done() || !h.add(b.first(), b.count(), b.data()) {
                    break;
                }
            }
            if h.done() {
                return Ok(Some(h.finish()));
            }
        }
        let mut h = RangeHasher::bounded(first, last);
        if !self.hash_wal_from(&mut h)? {
            return Ok(None);
        }
        if !h.done() {
            return Err(Error::Malformed {
                what: "write range",
                reason: format!(
                    "this store's WAL does not hold every operation of {first}..={last} (it stops at {})",
                    h.next - 1
                ),
            });
        }
        Ok(Some(h.finish()))
    }

    /// Feeds `h` from the WAL, starting with the batch that holds `h.next`.
    /// RocksDB's iterator yields only batches that start after the sequence
    /// asked for, so the batch holding `h.next` (which may start well before
    /// it) is found by asking from further and further back. False when the
    /// WAL was purged past `h.next`.
    fn hash_wal_from(&self, h: &mut RangeHasher) -> Result<bool> {
        let seq = h.next;
        let mut back: u64 = 1;
        let mut oldest: Option<Option<Seq>> = None;
        loop {
            let start = seq.saturating_sub(back);
            let mut found = false;
            if let Ok(iter) = self.inner.db.get_updates_since(start) {
                for item in iter {
                    let (bseq, wb) = item.map_err(rocks(&self.inner.path))?;
                    if wb.is_empty() {
                        continue;
                    }
                    let count = wb.len() as u32;
                    let blast = bseq + u64::from(count) - 1;
                    if !found {
                        if blast < seq {
                            continue;
                        }
                        if bseq > seq {
                            break;
                        }
                        found = true;
                    }
                    if !h.add(bseq, count, wb.data()) || h.done() {
                        break;
                    }
                }
            }
            if found {
                return Ok(true);
            }
            let oldest = *oldest.get_or_insert_with(|| self.oldest_wal_seq().ok().flatten());
            match oldest {
                Some(o) if o > seq => return Ok(false),
                None => return Ok(false),
                // Asked from before the oldest batch and still not found:
                // the WAL has a hole where `seq` should be.
                Some(o) if start < o || start == 0 => {
                    return Err(Error::WalGap {
                        expected: seq,
                        found: o,
                    })
                }
                _ => back = back.saturating_mul(64),
            }
        }
    }

    /// Proofs of this store's operations ending at `last`, one for each of
    /// [`PROOF_WINDOWS`] its feed or WAL still covers (shorter at the start
    /// of the WAL): what a follower shows its leader.
    pub fn proofs(&self, last: Seq) -> Vec<WriteId> {
        if last == 0 || last > self.latest_seq() {
            return Vec::new();
        }
        let mut out: Vec<WriteId> = Vec::new();
        for n in PROOF_WINDOWS {
            let first = last.saturating_sub(n - 1).max(1);
            match self.range_hash(first, last) {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {
                    // The WAL starts inside the window: prove from its start.
                    if let Ok(Some(o)) = self.oldest_wal_seq() {
                        if o > first && o <= last && out.last().is_none_or(|w| w.first > o) {
                            if let Ok(Some(w)) = self.range_hash(o, last) {
                                out.push(w);
                            }
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(first, last, error = %e, "cannot hash this store's own operations");
                    break;
                }
            }
            if first == 1 {
                break;
            }
        }
        out
    }

    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<SeqRange> {
        let mut b = Batch::new();
        b.put(key, value);
        self.write(&b)
    }

    pub fn delete(&self, key: impl Into<Vec<u8>>) -> Result<SeqRange> {
        let mut b = Batch::new();
        b.delete(key);
        self.write(&b)
    }

    /// Applies a batch received from the leader.
    ///
    /// ### To ensure correctness:
    /// the batch must start right after the local latest sequence, and after
    /// it is written the local latest sequence must be its last sequence.
    /// Anything else is a [`DivergenceError`] and nothing is written out of
    /// order. The write is durable only after [`Store::sync_wal`] (or with
    /// `sync_writes`).
    pub fn apply(&self, batch: &RawBatch) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.inner.write_lock.lock();
        let local = self.latest_seq();
        if batch.first() != local + 1 {
            return Err(DivergenceError::OutOfOrder {
                first: batch.first(),
                local,
            }
            .into());
        }
        let wb = WriteBatch::from_data(batch.data());
        self.inner
            .db
            .write_opt(wb, &self.write_options())
            .map_err(rocks(&self.inner.path))?;
        let now = self.latest_seq();
        if now != batch.last() {
            return Err(DivergenceError::SequenceMismatch {
                first: batch.first(),
                last: batch.last(),
                local: now,
            }
            .into());
        }
        let mut id = RangeHasher::new(batch.first());
        id.add(batch.first(), batch.count(), batch.data());
        *self.inner.last_write.lock() = Some(id.finish());
        self.inner.feed.publish(batch.clone());
        self.inner.durable.store(now, Ordering::SeqCst);
        Ok(())
    }

    /// Applies consecutive batches from the leader as one RocksDB write.
    ///
    /// RocksDB gives the records of one write consecutive sequences, so the
    /// sequences come out exactly as the leader assigned them, at a fraction
    /// of the cost of one write per batch. The same checks as
    /// [`Store::apply`] hold: the first batch starts at `local + 1`, each
    /// next one where the previous ended, and afterwards the local sequence
    /// is the last batch's last sequence.
    pub fn apply_many(&self, batches: &[RawBatch]) -> Result<()> {
        let Some(last) = batches.last() else {
            return Ok(());
        };
        if batches.len() == 1 {
            return self.apply(last);
        }
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let mut data = Vec::with_capacity(batches.iter().map(|b| b.data().len()).sum());
        data.extend_from_slice(&[0u8; crate::batch::HEADER_LEN]);
        let mut count: u32 = 0;
        let _g = self.inner.write_lock.lock();
        let local = self.latest_seq();
        let mut expected = local + 1;
        for b in batches {
            if b.first() != expected {
                return Err(DivergenceError::OutOfOrder {
                    first: b.first(),
                    local: expected - 1,
                }
                .into());
            }
            expected = b.last() + 1;
            count = count
                .checked_add(b.count())
                .ok_or_else(|| Error::Malformed {
                    what: "write batch",
                    reason: "too many operations".into(),
                })?;
            data.extend_from_slice(&b.data()[crate::batch::HEADER_LEN..]);
        }
        data[8..12].copy_from_slice(&count.to_le_bytes());
        self.inner
            .db
            .write_opt(WriteBatch::from_data(&data), &self.write_options())
            .map_err(rocks(&self.inner.path))?;
        let now = self.latest_seq();
        if now != last.last() {
            return Err(DivergenceError::SequenceMismatch {
                first: batches[0].first(),
                last: last.last(),
                local: now,
            }
            .into());
        }
        let mut id = RangeHasher::new(batches[0].first());
        for b in batches {
            id.add(b.first(), b.count(), b.data());
        }
        *self.inner.last_write.lock() = Some(id.finish());
        for b in batches {
            self.inner.feed.publish(b.clone());
        }
        self.inner.durable.store(now, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every applied write durable (fsyncs the WAL).
    pub fn sync_wal(&self) -> Result<()> {
        self.inner
            .db
            .flush_wal(true)
            .map_err(rocks(&self.inner.path))
    }

    /// Flushes the memtable into an SST (tests and benchmarks use this to
    /// shape the files on disk).
    pub fn flush(&self) -> Result<()> {
        self.inner.db.flush().map_err(rocks(&self.inner.path))
    }

    /// Compacts the whole key range.
    pub fn compact(&self) {
        self.inner.db.compact_range::<&[u8], &[u8]>(None, None);
    }

    fn write_options(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.inner.opts.sync_writes);
        wo
    }

    // ---- reads -------------------------------------------------------

    /// Runs `f` on a read snapshot, with the exact sequence it reflects.
    fn at_snapshot<T>(&self, f: impl FnOnce(ReadOptions) -> Result<T>) -> Result<(T, Seq)> {
        self.at_snapshot_then(|_| {}, f)
    }

    /// Like `at_snapshot`, calling `on_snapshot(seq)` while writes are still
    /// held off, right after the snapshot is taken.
    fn at_snapshot_then<T>(
        &self,
        on_snapshot: impl FnOnce(Seq),
        f: impl FnOnce(ReadOptions) -> Result<T>,
    ) -> Result<(T, Seq)> {
        let (snap, seq) = {
            let _g = self.inner.write_lock.lock();
            let snap = self.inner.db.snapshot();
            let seq = self.latest_seq();
            on_snapshot(seq);
            (snap, seq)
        };
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        Ok((f(ro)?, seq))
    }

    /// The value of `key`, and the sequence the read reflects.
    pub fn get(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, Seq)> {
        self.at_snapshot(|ro| {
            self.inner
                .db
                .get_opt(key, &ro)
                .map_err(rocks(&self.inner.path))
        })
    }

    /// Keys with `scan.prefix`, from `scan.start`, at most `scan.limit` of
    /// them, and the sequence the scan reflects.
    pub fn scan(&self, scan: &Scan) -> Result<(ScanPage, Seq)> {
        self.at_snapshot(|ro| {
            let mut it = self.inner.db.raw_iterator_opt(ro);
            let from = match &scan.start {
                Some(s) if s.as_slice() > scan.prefix.as_slice() => s.as_slice(),
                _ => scan.prefix.as_slice(),
            };
            it.seek(from);
            let mut page = ScanPage::default();
            let mut bytes = 0usize;
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                if !k.starts_with(&scan.prefix) {
                    break;
                }
                let full = page.items.len() >= scan.limit
                    || (scan.max_bytes > 0
                        && !page.items.is_empty()
                        && bytes + k.len() + v.len() > scan.max_bytes);
                if full {
                    page.next = Some(k.to_vec());
                    break;
                }
                bytes += k.len() + v.len();
                page.items.push((k.to_vec(), v.to_vec()));
                it.next();
            }
            it.status().map_err(rocks(&self.inner.path))?;
            Ok(page)
        })
    }

    /// Checks the block checksums of every live SST (see [`crate::sst`]):
    /// a scrub for corruption at rest. Reads every table once; run it on a
    /// blocking thread. A file compacted away while the scrub runs is
    /// skipped, not reported.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let files = self
            .inner
            .db
            .live_files()
            .map_err(rocks(&self.inner.path))?;
        let mut report = ScrubReport::default();
        for f in files {
            let name = f.name.trim_start_matches('/');
            let path = self.inner.path.join(name);
            match crate::sst::verify(&path) {
                Ok(()) => {
                    report.files_checked += 1;
                    report.bytes_checked += f.size as u64;
                }
                Err(_) if !path.exists() => {}
                Err(Error::Corrupt { reason, .. }) => {
                    report.files_checked += 1;
                    report.corrupt.push(CorruptFile {
                        file: name.to_owned(),
                        reason,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// A digest of every key and value, at a consistent snapshot.
    pub fn digest(&self) -> Result<Digest> {
        self.digest_then(|_| {})
    }

    /// Takes a snapshot now and computes its digest on a new thread.
    ///
    /// `on_snapshot(seq)` runs while writes are held off, so whatever it
    /// records (a replication barrier) is in place before any later batch
    /// commits. Returns the snapshot's sequence at once.
    pub fn spawn_digest(
        &self,
        on_snapshot: impl FnOnce(Seq) + Send + 'static,
    ) -> Result<(Seq, std::thread::JoinHandle<Result<Digest>>)> {
        let store = self.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("ferry-digest".into())
            .spawn(move || {
                store.digest_then(move |seq| {
                    on_snapshot(seq);
                    let _ = tx.send(seq);
                })
            })
            .map_err(io("spawn digest thread", &self.inner.path))?;
        match rx.recv() {
            Ok(seq) => Ok((seq, handle)),
            Err(_) => match handle.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(Error::Malformed {
                    what: "digest",
                    reason: "the digest thread failed".into(),
                }),
            },
        }
    }

    fn digest_then(&self, on_snapshot: impl FnOnce(Seq)) -> Result<Digest> {
        let ((hash, keys, bytes), seq) = self.at_snapshot_then(on_snapshot, |mut ro| {
            ro.fill_cache(false);
            let mut it = self.inner.db.raw_iterator_opt(ro);
            it.seek_to_first();
            let mut h = blake3::Hasher::new();
            let (mut keys, mut bytes) = (0u64, 0u64);
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k);
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v);
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
                it.next();
            }
            it.status().map_err(rocks(&self.inner.path))?;
            Ok((h.finalize().to_hex().to_string(), keys, bytes))
        })?;
        Ok(Digest {
            digest: hash,
            seq,
            keys,
            bytes,
        })
    }

    // ---- checkpoints -------------------------------------------------

    fn checkpoints_dir(&self) -> PathBuf {
        ferry_dir(&self.inner.path).join(CHECKPOINTS)
    }

    /// Takes a hard-linked checkpoint of the live store, without pausing
    /// writes, and tags it with the sequence it holds (read by opening the
    /// checkpoint read-only: reading the live sequence would race).
    pub fn checkpoint(&self) -> Result<CheckpointInfo> {
        self.checkpoint_tagged("")
    }

    /// Like [`Store::checkpoint`], with `tag` appended to the name so that
    /// its owner can recognise it (seed checkpoints end in `-seed`).
    pub fn checkpoint_tagged(&self, tag: &str) -> Result<CheckpointInfo> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let dir = self.checkpoints_dir();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!("{CHECKPOINT_TMP}{nanos}-{}", std::process::id()));
        // Without a flush: the memtable's writes reach the checkpoint as a
        // copy of the live WAL, replayed when the checkpoint is opened. A
        // flush would write a new L0 file, and on a loaded leader that file
        // starts a compaction which then competes with the seed and the
        // leader's own writes (BENCHMARKS.md §1). The live WAL is bounded
        // by the memtables it backs.
        rocksdb::checkpoint::Checkpoint::new(&self.inner.db)
            .and_then(|c| c.create_checkpoint_with_log_size(&tmp, CHECKPOINT_NEVER_FLUSH))
            .map_err(rocks(&tmp))?;
        // The copied WAL may hold writes the leader has not synced yet. Sync
        // them before the checkpoint is named, so that no follower is seeded
        // with a write a power cut could take from the leader.
        let seq = match read_only_seq(&tmp).and_then(|seq| self.sync_wal().map(|()| seq)) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let name = format!("cp-{seq:020}-{nanos}{tag}");
        let path = dir.join(&name);
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        tracing::debug!(%name, seq, "checkpoint created");
        Ok(CheckpointInfo { name, path, seq })
    }

    /// Sets this database aside before it is replaced (a diverged follower,
    /// an old leader that rejoins): a hard-linked checkpoint under
    /// `DIR/.ferry/aside/`, with `reason` and its sequence in
    /// `aside.json`, so writes the cluster no longer has are kept, not
    /// deleted, and can be exported ([`export_aside`]). At most `keep`
    /// copies are kept; older ones are removed (logged), so repeated
    /// divergences cannot fill the disk.
    pub fn set_aside(&self, reason: &str, keep: usize) -> Result<AsideInfo> {
        let dir = aside_dir(&self.inner.path);
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!("{CHECKPOINT_TMP}{nanos}-{}", std::process::id()));
        rocksdb::checkpoint::Checkpoint::new(&self.inner.db)
            .and_then(|c| c.create_checkpoint_with_log_size(&tmp, CHECKPOINT_NEVER_FLUSH))
            .map_err(rocks(&tmp))?;
        let seq = match read_only_seq(&tmp).and_then(|seq| {
            // A checkpoint copies only the live WAL; the writes before the
            // last restart or flush are in RocksDB's archive. Link those
            // (immutable) files too, so the export reaches them.
            link_dir_files(&self.inner.path.join("archive"), &tmp.join("archive"))?;
            Ok(seq)
        }) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let info = AsideInfo {
            name: format!("aside-{seq:020}-{nanos}"),
            seq,
            oldest_wal_seq: self.oldest_wal_seq().ok().flatten(),
            reason: reason.to_owned(),
            created_unix: (nanos / 1_000_000_000) as u64,
        };
        let meta = serde_json::to_vec_pretty(&info).map_err(|e| Error::Malformed {
            what: "aside.json",
            reason: e.to_string(),
        })?;
        write_atomic(&tmp.join(ASIDE_META), &meta)?;
        let path = dir.join(&info.name);
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", &dir))?;
        let all = list_asides(&self.inner.path)?;
        for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            let p = dir.join(&old.name);
            tracing::warn!(aside = %old.name, seq = old.seq, "removing the oldest set-aside database (over the limit of {keep})");
            std::fs::remove_dir_all(&p).map_err(io("remove", &p))?;
        }
        tracing::warn!(aside = %info.name, seq, "database set aside: {reason}");
        Ok(info)
    }

    /// The checkpoints under the data directory, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        list_checkpoints(&self.inner.path)
    }

    /// Deletes a checkpoint (its hard links; SSTs still live stay on disk).
    pub fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let cp = self
            .checkpoints()?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::NoCheckpoint {
                name: name.to_owned(),
                path: self.checkpoints_dir(),
            })?;
        std::fs::remove_dir_all(&cp.path).map_err(io("remove", &cp.path))
    }

    /// Builds the manifest of a checkpoint, reusing cached hashes of SSTs.
    pub fn manifest(&self, cp: &CheckpointInfo) -> Result<(Manifest, HashStats)> {
        let identity = identity(&self.inner.path);
        let (mut manifest, stats) = {
            let mut cache = self.inner.hash_cache.lock();
            build_manifest(
                &cp.path,
                cp.seq,
                self.inner.opts.chunk_size,
                &identity,
                &mut cache,
            )?
        };
        // What a node seeded from it shows to prove its position, should
        // the checkpoint carry no WAL to prove it from.
        manifest.proofs = self
            .proofs(cp.seq)
            .into_iter()
            .map(|w| (w.first, w.hash))
            .collect();
        // And, should no proof reach (the WAL is gone), the node can still
        // show that it holds exactly this checkpoint: remembered before the
        // manifest leaves this process.
        self.record_issued(cp.seq, manifest.id().0)?;
        Ok((manifest, stats))
    }

    /// Remembers that this store issued the checkpoint at `seq` whose
    /// manifest has id `manifest` (the last [`MAX_ISSUED`] are kept, in
    /// `.ferry/issued.json`, synced). A node seeded from it that has written
    /// nothing since holds exactly this store's content at `seq`, which
    /// proves its position when the WAL no longer does.
    pub fn record_issued(&self, seq: Seq, manifest: Hash) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let _g = self.inner.issued_lock.lock();
        let mut list = self.issued();
        let entry = Issued { seq, manifest };
        if list.contains(&entry) {
            return Ok(());
        }
        list.push(entry);
        let excess = list.len().saturating_sub(MAX_ISSUED);
        list.drain(..excess);
        let b = serde_json::to_vec(&list).map_err(|e| Error::Malformed {
            what: "issued.json",
            reason: e.to_string(),
        })?;
        write_atomic(&ferry_dir(&self.inner.path).join("issued.json"), &b)
    }

    /// The checkpoints this store remembers issuing, oldest first. An
    /// unreadable record reads as none: the proof it would give is then
    /// refused, never assumed.
    pub fn issued(&self) -> Vec<Issued> {
        let path = ferry_dir(&self.inner.path).join("issued.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable record of issued checkpoints; ignored");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    // ---- WAL ---------------------------------------------------------

    /// Every committed batch after `after`, read from the WAL, in order.
    ///
    /// The first batch must start at `after + 1`: when RocksDB has purged
    /// that part of the WAL the result is [`Error::WalPurged`], never a silent
    /// skip. Each next batch must start where the previous one ended
    /// ([`Error::WalGap`]), and the iterator's status is checked at the end.
    /// The iterator is not `Send`: use it on a blocking thread.
    pub fn wal_since(&self, after: Seq) -> Result<WalIter> {
        let latest = self.latest_seq();
        if after >= latest {
            return Ok(WalIter {
                iter: None,
                expected: after + 1,
                after,
                latest,
                yielded: false,
                done: false,
                store: self.clone(),
            });
        }
        match self.inner.db.get_updates_since(after) {
            Ok(it) => Ok(WalIter {
                iter: Some(it),
                expected: after + 1,
                after,
                latest,
                yielded: false,
                done: false,
                store: self.clone(),
            }),
            Err(e) => {
                let oldest = self.oldest_wal_seq().unwrap_or(None).unwrap_or(latest + 1);
                if oldest > after + 1 {
                    Err(Error::WalPurged {
                        requested: after,
                        oldest_available: oldest,
                    })
                } else {
                    Err(rocks(&self.inner.path)(e))
                }
            }
        }
    }

    /// The first sequence still readable from the WAL, if any batch is.
    pub fn oldest_wal_seq(&self) -> Result<Option<Seq>> {
        if self.latest_seq() == 0 {
            return Ok(None);
        }
        let Ok(mut it) = self.inner.db.get_updates_since(0) else {
            return Ok(None);
        };
        for item in it.by_ref() {
            let (seq, batch) = item.map_err(rocks(&self.inner.path))?;
            if !batch.is_empty() {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}

/// Batches read from the WAL; see [`Store::wal_since`].
pub struct WalIter {
    // Declared first so it is dropped before the store handle.
    iter: Option<DBWALIterator>,
    expected: Seq,
    after: Seq,
    latest: Seq,
    yielded: bool,
    done: bool,
    store: Store,
}

impl WalIter {
    /// The sequence the next batch must start at.
    pub fn expected(&self) -> Seq {
        self.expected
    }

    fn step(&mut self) -> Result<Option<RawBatch>> {
        let Some(it) = self.iter.as_mut() else {
            return Ok(None);
        };
        loop {
            match it.next() {
                Some(Ok((seq, wb))) => {
                    if wb.is_empty() {
                        continue;
                    }
                    if seq != self.expected {
                        return Err(if !self.yielded && seq > self.expected {
                            Error::WalPurged {
                                requested: self.after,
                                oldest_available: seq,
                            }
                        } else {
                            Error::WalGap {
                                expected: self.expected,
                                found: seq,
                            }
                        });
                    }
                    let count = wb.len() as u32;
                    let batch =
                        RawBatch::from_trusted(seq, count, Bytes::copy_from_slice(wb.data()));
                    self.expected = batch.last() + 1;
                    self.yielded = true;
                    return Ok(Some(batch));
                }
                Some(Err(e)) => return Err(rocks(&self.store.inner.path)(e)),
                None => {
                    it.status().map_err(rocks(&self.store.inner.path))?;
                    if !self.yielded && self.latest > self.after {
                        // Nothing at all after `after`, though it was written.
                        let oldest = self.store.oldest_wal_seq()?.unwrap_or(self.latest + 1);
                        return Err(Error::WalPurged {
                            requested: self.after,
                            oldest_available: oldest,
                        });
                    }
                    return Ok(None);
                }
            }
        }
    }
}

impl Iterator for WalIter {
    type Item = Result<RawBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step().transpose();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

/// Where set-aside databases live.
const ASIDE: &str = "aside";
const ASIDE_META: &str = "aside.json";

fn aside_dir(data: &Path) -> PathBuf {
    ferry_dir(data).join(ASIDE)
}

/// A database set aside before it was replaced ([`Store::set_aside`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AsideInfo {
    pub name: String,
    /// The last sequence it holds.
    pub seq: Seq,
    /// The first sequence its WAL still holds: writes from there on can be
    /// exported one by one.
    pub oldest_wal_seq: Option<Seq>,
    /// Why it was set aside (the leader's refusal).
    pub reason: String,
    pub created_unix: u64,
}

/// The databases set aside under `data`, oldest first.
pub fn list_asides(data: &Path) -> Result<Vec<AsideInfo>> {
    let dir = aside_dir(data);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read directory", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io("read directory", &dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(CHECKPOINT_TMP) {
            // Cut short while it was being made.
            let _ = std::fs::remove_dir_all(&path);
            continue;
        }
        if !name.starts_with("aside-") {
            continue;
        }
        let meta = path.join(ASIDE_META);
        let b = std::fs::read(&meta).map_err(io("read", &meta))?;
        let info: AsideInfo = serde_json::from_slice(&b).map_err(|e| Error::Malformed {
            what: "aside.json",
            reason: format!("{}: {e}", meta.display()),
        })?;
        out.push(info);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Hard-links every file of `from` (if it exists) into `to`.
fn link_dir_files(from: &Path, to: &Path) -> Result<()> {
    let rd = match std::fs::read_dir(from) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("read directory", from)(e)),
    };
    std::fs::create_dir_all(to).map_err(io("create directory", to))?;
    for e in rd {
        let e = e.map_err(io("read directory", from))?;
        if e.path().is_file() {
            std::fs::hard_link(e.path(), to.join(e.file_name())).map_err(io("link", &e.path()))?;
        }
    }
    Ok(())
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One operation exported from a set-aside database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedOp {
    pub seq: Seq,
    pub op: &'static str,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Calls `f` with every operation of the set-aside database `name` from
/// sequence `from` on (its WAL's first when `None`), in order. The copy is
/// opened through hard links in a scratch directory, so the aside copy
/// itself is never changed. Errors when its WAL no longer reaches `from`.
pub fn export_aside(
    data: &Path,
    name: &str,
    from: Option<Seq>,
    mut f: impl FnMut(ExportedOp) -> Result<()>,
) -> Result<AsideInfo> {
    let info = list_asides(data)?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| Error::NoCheckpoint {
            name: name.to_owned(),
            path: aside_dir(data),
        })?;
    let src = aside_dir(data).join(name);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let scratch = Scratch(ferry_dir(data).join(format!("export-{nanos}-{}", std::process::id())));
    let db = scratch.0.clone();
    std::fs::create_dir_all(&db).map_err(io("create directory", &db))?;
    link_dir_files(&src.join("archive"), &db.join("archive"))?;
    for e in std::fs::read_dir(&src).map_err(io("read directory", &src))? {
        let e = e.map_err(io("read directory", &src))?;
        let (from_p, to_p) = (e.path(), db.join(e.file_name()));
        if e.file_name() == ASIDE_META || !from_p.is_file() {
            continue;
        }
        // WAL and MANIFEST files change when a database opens: copy those,
        // link the immutable SSTs.
        let immutable = e.file_name().to_string_lossy().ends_with(".sst");
        if immutable {
            std::fs::hard_link(&from_p, &to_p).map_err(io("link", &from_p))?;
        } else {
            std::fs::copy(&from_p, &to_p).map_err(io("copy", &from_p))?;
        }
    }
    let store = Store::open(
        &db,
        StoreOptions {
            create_if_missing: false,
            ..StoreOptions::default()
        },
    )?;
    let start = from.or(info.oldest_wal_seq).unwrap_or(1).max(1);
    if start > store.latest_seq() {
        return Ok(info);
    }
    let result = (|| -> Result<()> {
        for b in store.wal_since(start - 1)? {
            let b = b?;
            for (i, (kind, key, value)) in
                crate::batch::decode_ops(b.data())?.into_iter().enumerate()
            {
                f(ExportedOp {
                    seq: b.first() + i as u64,
                    op: kind,
                    key,
                    value,
                })?;
            }
        }
        Ok(())
    })();
    drop(store);
    result.map(|()| info)
}

/// Removes the checkpoints in `dir` that were never completed.
fn remove_unfinished_checkpoints(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io("read directory", dir))? {
        let entry = entry.map_err(io("read directory", dir))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(CHECKPOINT_TMP))
        {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing an unfinished checkpoint");
            std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
        }
    }
    Ok(())
}

/// Lists the checkpoints under the data directory `data`, oldest first.
pub fn list_checkpoints(data: &Path) -> Result<Vec<CheckpointInfo>> {
    let dir = ferry_dir(data).join(CHECKPOINTS);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read directory", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io("read directory", &dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(seq) = name
            .strip_prefix("cp-")
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        out.push(CheckpointInfo {
            path: entry.path(),
            name,
            seq,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The database's unique id (its IDENTITY file), scoping cached hashes.
fn identity(path: &Path) -> String {
    std::fs::read_to_string(path.join("IDENTITY"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Opens `path` read-only and returns its latest sequence.
fn read_only_seq(path: &Path) -> Result<Seq> {
    let mut o = Options::default();
    o.set_keep_log_file_num(1);
    let db = DB::open_for_read_only(&o, path, false).map_err(rocks(path))?;
    Ok(db.latest_sequence_number())
}

/// What [`Store::scrub`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    pub files_checked: usize,
    pub bytes_checked: u64,
    pub corrupt: Vec<CorruptFile>,
}

/// One SST that failed its block checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorruptFile {
    pub file: String,
    pub reason: String,
}

fn rocks(path: &Path) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
    move |source| Error::Rocks {
        path: path.to_path_buf(),
        source,
    }
}
