//! The engine's error type: one enum, each variant carrying the path or
//! sequence it concerns.

use std::path::PathBuf;

/// Sequence numbers, as RocksDB assigns them: one per operation in a batch.
pub type Seq = u64;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB returned an error for an operation on the store at `path`.
    #[cfg(feature = "rocksdb")]
    #[error("rocksdb error in {path}: {source}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// A filesystem call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The WAL no longer holds the batches right after `requested`.
    #[error("wal purged: batches after sequence {requested} are gone (oldest available is {oldest_available})")]
    WalPurged {
        requested: Seq,
        oldest_available: Seq,
    },
    /// Two consecutive WAL batches do not follow each other.
    #[error("wal gap: expected a batch starting at {expected}, found one at {found}")]
    WalGap { expected: Seq, found: Seq },
    /// A batch from the leader does not continue the local sequence.
    #[error("divergence: {0}")]
    Divergence(#[from] DivergenceError),
    /// A serialized batch or manifest is malformed.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// The directory holds an unfinished seed and must not be opened as a database.
    #[error("{path} holds an unfinished seed; finish it with `ferry seed` or empty the directory")]
    SeedInProgress { path: PathBuf },
    /// The directory does not hold a database and creating one was not asked for.
    #[error("no database in {path}")]
    NoDatabase { path: PathBuf },
    /// A checkpoint was not found.
    #[error("no checkpoint {name} in {path}")]
    NoCheckpoint { name: String, path: PathBuf },
    /// A file failed its integrity check at rest: an SST whose block
    /// checksums do not match (see [`crate::sst::verify`]).
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The store is a follower and takes no client writes.
    #[error("this node is a follower and takes no client writes")]
    ReadOnly,
}

/// Why a batch from the leader was refused by the applier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DivergenceError {
    /// The batch does not start right after the local latest sequence.
    #[error("batch starts at {first} but the local store is at {local} (expected {})", local + 1)]
    OutOfOrder { first: Seq, local: Seq },
    /// After applying, the local sequence is not the batch's last sequence.
    #[error("after applying the batch {first}..={last} the local store is at {local}")]
    SequenceMismatch { first: Seq, last: Seq, local: Seq },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
