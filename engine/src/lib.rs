//! ferry's storage engine: a RocksDB database with everything that adding a
//! follower needs.
//!
//! - [`Store`]: open or adopt a database, write batches that report their
//!   sequence range, read at an exact sequence, take sequence-tagged
//!   checkpoints, read the WAL after a sequence, apply a leader's batches.
//! - [`Manifest`]: the files of a checkpoint with per-chunk blake3 hashes.
//! - [`Feed`]: committed batches in memory for live followers.
//! - [`RawBatch`]: a batch in RocksDB's serialization, parsed and bounded.
//!
//! Only this crate names RocksDB types.

pub mod batch;
pub mod error;
pub mod feed;
pub mod history;
pub mod manifest;
pub mod paths;
#[cfg(feature = "rocksdb")]
pub mod sst;
#[cfg(feature = "rocksdb")]
pub mod store;

pub use batch::{Batch, Op, RawBatch};
pub use error::{DivergenceError, Error, Result, Seq};
pub use feed::{Feed, FeedBehind, FeedLimits};
pub use history::{History, HistoryId, HistoryMismatch, Term};
pub use manifest::{
    FileEntry, FileKind, FileName, Hash, HashCache, HashStats, Manifest, ManifestId,
};
pub use paths::{ferry_dir, seed_dir, write_atomic, FERRY_DIR};
#[cfg(feature = "rocksdb")]
pub use store::{
    export_aside, list_asides, list_checkpoints, AsideInfo, CheckpointInfo, CorruptFile, Digest,
    ExportedOp, Issued, Scan, ScanPage, ScrubReport, SeqRange, Store, StoreOptions, WalIter,
    WriteId, MAX_ISSUED, PROOF_WINDOWS,
};
