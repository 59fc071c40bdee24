//! Manifests: the list of files in a checkpoint, with a blake3 hash per
//! fixed-size chunk and per file, and the sequence the checkpoint holds.
//!
//! A manifest crosses the wire, so it has a compact binary encoding whose
//! decoder bounds every count and length before it allocates, and whose file
//! names are parsed into [`FileName`] (only RocksDB's own file names: no
//! separators, no `..`) before any filesystem call sees them. Its id is the
//! blake3 hash of that encoding.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! magic "FMAN" | version u8 = 1 | seq u64 | chunk_size u32 | file_count u32
//! per file: name_len u8 | name | size u64 | file hash [32] | chunk hashes [32] * ceil(size / chunk_size)
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result, Seq};

/// A blake3 hash.
pub type Hash = [u8; 32];

const MAGIC: &[u8; 4] = b"FMAN";
const VERSION: u8 = 1;
/// The smallest chunk size a manifest may use.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// The largest chunk size a manifest may use.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// The default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 2 * 1024 * 1024;
/// The most files a manifest may list.
pub const MAX_FILES: u32 = 1_000_000;
/// The largest file a manifest may list (16 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 44;
/// The longest file name a manifest may hold.
pub const MAX_NAME_LEN: usize = 64;

/// A file name that RocksDB writes into a database directory: `CURRENT`,
/// `IDENTITY`, `MANIFEST-<n>`, `OPTIONS-<n>`, or `<n>.sst`, `<n>.log`,
/// `<n>.blob`. Nothing else, so it can never name a path outside the
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FileName(String);

/// The kinds of file a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Current,
    Identity,
    Manifest,
    Options,
    Table,
    Wal,
    Blob,
}

impl FileName {
    pub fn parse(name: &str) -> Result<Self> {
        Self::kind_of(name)
            .map(|_| Self(name.to_owned()))
            .ok_or_else(|| Error::Malformed {
                what: "file name",
                reason: format!("{name:?} is not a RocksDB file name"),
            })
    }

    fn kind_of(name: &str) -> Option<FileKind> {
        fn digits(s: &str) -> bool {
            !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
        }
        if name.len() > MAX_NAME_LEN {
            return None;
        }
        match name {
            "CURRENT" => return Some(FileKind::Current),
            "IDENTITY" => return Some(FileKind::Identity),
            _ => {}
        }
        if let Some(n) = name.strip_prefix("MANIFEST-") {
            return digits(n).then_some(FileKind::Manifest);
        }
        if let Some(n) = name.strip_prefix("OPTIONS-") {
            return digits(n).then_some(FileKind::Options);
        }
        let (stem, ext) = name.split_once('.')?;
        if !digits(stem) {
            return None;
        }
        match ext {
            "sst" => Some(FileKind::Table),
            "log" => Some(FileKind::Wal),
            "blob" => Some(FileKind::Blob),
            _ => None,
        }
    }

    pub fn kind(&self) -> FileKind {
        // The name was parsed on construction.
        Self::kind_of(&self.0).unwrap_or(FileKind::Current)
    }

    /// Table and blob files never change once written, so their hashes can be cached.
    pub fn is_immutable(&self) -> bool {
        matches!(self.kind(), FileKind::Table | FileKind::Blob)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FileName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<FileName> for String {
    fn from(n: FileName) -> String {
        n.0
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub name: FileName,
    pub size: u64,
    /// blake3 of the whole file.
    pub hash: Hash,
    /// blake3 of each chunk, in order; `ceil(size / chunk_size)` of them.
    pub chunks: Vec<Hash>,
}

impl FileEntry {
    /// The byte range of chunk `index` of this file.
    pub fn chunk_range(&self, index: usize, chunk_size: u32) -> (u64, u64) {
        let start = index as u64 * u64::from(chunk_size);
        let end = (start + u64::from(chunk_size)).min(self.size);
        (start, end)
    }
}

/// The files of a checkpoint and the sequence it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub seq: Seq,
    pub chunk_size: u32,
    /// Sorted by name; `CURRENT` is among them and must be installed last.
    pub files: Vec<FileEntry>,
    /// The leader's proofs of its operations up to `seq`: `(first, hash)`
    /// of its operations `first..=seq` (see `Store::range_hash`). A node
    /// seeded from this checkpoint shows them to prove its position when
    /// the checkpoint carried no WAL to prove it from. Encoded after the
    /// files only when present, so manifests without them read as before.
    pub proofs: Vec<(Seq, Hash)>,
}

/// The most proofs a manifest carries.
pub const MAX_MANIFEST_PROOFS: usize = 8;
/// Marks the optional proofs section after the files.
const PROOFS_TAG: u8 = b'P';

/// The id of a manifest: the blake3 hash of its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ManifestId(pub Hash);

impl fmt::Display for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The next `n` bytes of a manifest being decoded.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        return Err(Error::Malformed {
            what: "manifest",
            reason: "truncated".into(),
        });
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

impl Manifest {
    pub fn id(&self) -> ManifestId {
        ManifestId(*blake3::hash(&self.encode()).as_bytes())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn total_chunks(&self) -> usize {
        self.files.iter().map(|f| f.chunks.len()).sum()
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name.as_str() == name)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            21 + self
                .files
                .iter()
                .map(|f| 73 + 32 * f.chunks.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for f in &self.files {
            out.push(f.name.0.len() as u8);
            out.extend_from_slice(f.name.0.as_bytes());
            out.extend_from_slice(&f.size.to_le_bytes());
            out.extend_from_slice(&f.hash);
            for c in &f.chunks {
                out.extend_from_slice(c);
            }
        }
        let proofs = &self.proofs[..self.proofs.len().min(MAX_MANIFEST_PROOFS)];
        if !proofs.is_empty() {
            out.push(PROOFS_TAG);
            out.push(proofs.len() as u8);
            for (first, hash) in proofs {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(hash);
            }
        }
        out
    }

    /// Decodes and validates a manifest from untrusted bytes.
    pub fn decode(mut buf: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Malformed {
            what: "manifest",
            reason,
        };
        if take(&mut buf, 4)? != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let version = take(&mut buf, 1)?[0];
        if version != VERSION {
            return Err(bad(format!("unsupported version {version}")));
        }
        let seq = u64::from_le_bytes(
            take(&mut buf, 8)?
                .try_into()
                .map_err(|_| bad("seq".into()))?,
        );
        let chunk_size = u32::from_le_bytes(
            take(&mut buf, 4)?
                .try_into()
                .map_err(|_| bad("chunk size".into()))?,
        );
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(bad(format!(
                "chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            )));
        }
        if !chunk_size.is_power_of_two() {
            return Err(bad(format!(
                "chunk size {chunk_size} is not a power of two"
            )));
        }
        let count = u32::from_le_bytes(
            take(&mut buf, 4)?
                .try_into()
                .map_err(|_| bad("count".into()))?,
        );
        if count > MAX_FILES {
            return Err(bad(format!(
                "{count} files exceeds the maximum {MAX_FILES}"
            )));
        }
        let mut files = Vec::with_capacity((count as usize).min(4096));
        let mut seen = HashSet::new();
        for _ in 0..count {
            let len = take(&mut buf, 1)?[0] as usize;
            let name = std::str::from_utf8(take(&mut buf, len)?)
                .map_err(|_| bad("file name is not utf-8".into()))?;
            let name = FileName::parse(name)?;
            if !seen.insert(name.clone()) {
                return Err(bad(format!("file {name} is listed twice")));
            }
            let size = u64::from_le_bytes(
                take(&mut buf, 8)?
                    .try_into()
                    .map_err(|_| bad("size".into()))?,
            );
            if size > MAX_FILE_SIZE {
                return Err(bad(format!(
                    "file {name} of {size} bytes exceeds the maximum"
                )));
            }
            let hash: Hash = take(&mut buf, 32)?
                .try_into()
                .map_err(|_| bad("hash".into()))?;
            let n = size.div_ceil(u64::from(chunk_size)) as usize;
            // Bound the allocation by what is actually left in the buffer.
            let raw = take(
                &mut buf,
                n.checked_mul(32)
                    .ok_or_else(|| bad("chunk count overflows".into()))?,
            )?;
            let chunks = raw
                .chunks_exact(32)
                .map(|c| c.try_into().unwrap_or([0; 32]))
                .collect();
            files.push(FileEntry {
                name,
                size,
                hash,
                chunks,
            });
        }
        let mut proofs = Vec::new();
        if !buf.is_empty() {
            if take(&mut buf, 1)?[0] != PROOFS_TAG {
                return Err(bad("unknown section after the files".into()));
            }
            let n = take(&mut buf, 1)?[0] as usize;
            if n == 0 || n > MAX_MANIFEST_PROOFS {
                return Err(bad(format!(
                    "{n} proofs is outside 1..={MAX_MANIFEST_PROOFS}"
                )));
            }
            for _ in 0..n {
                let first = u64::from_le_bytes(
                    take(&mut buf, 8)?
                        .try_into()
                        .map_err(|_| bad("proof".into()))?,
                );
                let hash: Hash = take(&mut buf, 32)?
                    .try_into()
                    .map_err(|_| bad("proof".into()))?;
                if first == 0 || first > seq {
                    return Err(bad(format!("proof {first}..={seq} is not a range")));
                }
                proofs.push((first, hash));
            }
        }
        if !buf.is_empty() {
            return Err(bad(format!("{} trailing bytes", buf.len())));
        }
        if !files.iter().any(|f| f.name.kind() == FileKind::Current) {
            return Err(bad("it lists no CURRENT file, so it is no database".into()));
        }
        Ok(Self {
            seq,
            chunk_size,
            files,
            proofs,
        })
    }
}

/// Hashes of immutable files, keyed by database identity, name, size and
/// chunk size, persisted as JSON so that a second checkpoint (even from
/// another process) does not re-read unchanged SSTs.
#[derive(Debug, Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, CachedHashes>,
    dirty: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedHashes {
    hash: String,
    chunks: Vec<String>,
}

/// What building a manifest cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashStats {
    /// Files read and hashed.
    pub files_hashed: usize,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    /// Files whose hashes came from the cache.
    pub cache_hits: usize,
    /// SSTs whose block checksums were verified.
    pub tables_verified: usize,
}

impl HashCache {
    /// Loads the cache at `path`; a missing or unreadable cache starts empty.
    pub fn load(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path: Some(path),
            entries,
            dirty: false,
        }
    }

    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Writes the cache back (temp file, then rename) if it changed.
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        // Keep the cache from growing forever: it only needs recent files.
        const MAX_ENTRIES: usize = 100_000;
        while self.entries.len() > MAX_ENTRIES {
            let first = self.entries.keys().next().cloned().unwrap_or_default();
            self.entries.remove(&first);
        }
        let data = serde_json::to_vec(&self.entries).map_err(|e| Error::Malformed {
            what: "hash cache",
            reason: e.to_string(),
        })?;
        crate::paths::write_atomic(path, &data)?;
        self.dirty = false;
        Ok(())
    }

    /// A file's cache key. Name and size are not enough: a re-seeded node
    /// keeps its database identity and reuses file numbers, so a new file
    /// can have an old file's name and size. The inode and modification
    /// time tell them apart (a checkpoint's hard link shares both with the
    /// live file, so the cache still serves every checkpoint).
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    fn key(identity: &str, name: &FileName, meta: &std::fs::Metadata, chunk_size: u32) -> String {
        use std::os::unix::fs::MetadataExt;
        format!(
            "{identity}/{name}/{}/{chunk_size}/{}/{}.{}",
            meta.len(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec()
        )
    }

    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    fn lookup(&self, key: &str) -> Option<(Hash, Vec<Hash>)> {
        let e = self.entries.get(key)?;
        let parse = |s: &str| -> Option<Hash> { hex::decode(s).ok()?.try_into().ok() };
        let chunks = e
            .chunks
            .iter()
            .map(|c| parse(c))
            .collect::<Option<Vec<_>>>()?;
        Some((parse(&e.hash)?, chunks))
    }
}

/// Builds the manifest of the checkpoint in `dir`, which holds `seq`.
#[cfg(feature = "rocksdb")]
///
/// Files that are not RocksDB database files (`LOCK`, `LOG*`, anything of
/// ferry's) are left out. `identity` scopes the cache to one database.
pub fn build_manifest(
    dir: &Path,
    seq: Seq,
    chunk_size: u32,
    identity: &str,
    cache: &mut HashCache,
) -> Result<(Manifest, HashStats)> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return Err(Error::Malformed {
            what: "chunk size",
            reason: format!(
                "{chunk_size} must be a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            ),
        });
    }
    let mut stats = HashStats::default();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("read directory", dir))? {
        let entry = entry.map_err(io("read directory", dir))?;
        let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| FileName::parse(n).ok())
        else {
            continue;
        };
        if entry
            .file_type()
            .map_err(io("stat", entry.path()))?
            .is_file()
        {
            names.push(name);
        }
    }
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(name.as_str());
        let meta = std::fs::metadata(&path).map_err(io("stat", &path))?;
        let size = meta.len();
        let key = HashCache::key(identity, &name, &meta, chunk_size);
        if name.is_immutable() {
            if let Some((hash, chunks)) = cache.lookup(&key) {
                stats.cache_hits += 1;
                files.push(FileEntry {
                    name,
                    size,
                    hash,
                    chunks,
                });
                continue;
            }
        }
        // An SST is checked against its own block checksums before its hash
        // can enter the manifest or the cache: blake3 would faithfully
        // protect rotten bytes on the wire.
        if name.kind() == FileKind::Table {
            crate::sst::verify(&path)?;
            stats.tables_verified += 1;
        }
        let (hash, chunks, read) = hash_file(&path, chunk_size)?;
        if read != size {
            return Err(Error::Malformed {
                what: "checkpoint file",
                reason: format!("{} changed size while hashed", path.display()),
            });
        }
        stats.files_hashed += 1;
        stats.bytes_hashed += read;
        if name.is_immutable() {
            cache.entries.insert(
                key,
                CachedHashes {
                    hash: hex::encode(hash),
                    chunks: chunks.iter().map(hex::encode).collect(),
                },
            );
            cache.dirty = true;
        }
        files.push(FileEntry {
            name,
            size,
            hash,
            chunks,
        });
    }
    cache.save()?;
    Ok((
        Manifest {
            seq,
            chunk_size,
            files,
            proofs: Vec::new(),
        },
        stats,
    ))
}

/// The hash of chunk `index` of a file of `file_size` bytes.
///
/// For a file of one chunk (or none) it is the file's blake3 hash. For a
/// larger file it is the blake3 *chaining value* of the chunk at its offset
/// (chunk sizes are powers of two, so every chunk is a complete subtree of
/// blake3's tree). [`file_hash_from_chunks`] merges those into the file's
/// ordinary blake3 hash, so a receiver that verified every chunk also
/// verifies the whole file without reading it again.
pub fn chunk_hash(file_size: u64, chunk_size: u32, index: usize, data: &[u8]) -> Hash {
    use blake3::hazmat::HasherExt;
    if file_size <= u64::from(chunk_size) {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index as u64 * u64::from(chunk_size));
    h.update(data);
    h.finalize_non_root()
}

/// Merges the chunk hashes of a file (see [`chunk_hash`]) into its blake3
/// hash. `chunks` must have `ceil(file_size / chunk_size)` entries.
pub fn file_hash_from_chunks(chunks: &[Hash]) -> Hash {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn merge(cvs: &[Hash], root: bool) -> Hash {
        if cvs.len() == 1 {
            return cvs[0];
        }
        // blake3's left subtree is the largest power of two strictly below the length.
        let below = cvs.len() - 1;
        let split = 1usize << (usize::BITS - 1 - below.leading_zeros());
        let (l, r) = (merge(&cvs[..split], false), merge(&cvs[split..], false));
        if root {
            *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
        } else {
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        }
    }
    match chunks.len() {
        0 => *blake3::hash(&[]).as_bytes(),
        _ => merge(chunks, true),
    }
}

/// Hashes a file chunk by chunk; returns the whole-file hash, the chunk
/// hashes and the number of bytes read.
pub fn hash_file(path: &Path, chunk_size: u32) -> Result<(Hash, Vec<Hash>, u64)> {
    let mut file = File::open(path).map_err(io("open", path))?;
    let size = file.metadata().map_err(io("stat", path))?.len();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..]).map_err(io("read", path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        chunks.push(chunk_hash(size, chunk_size, chunks.len(), &buf[..filled]));
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok((file_hash_from_chunks(&chunks), chunks, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_with_an_old_name_and_size_is_hashed_again() {
        // A re-seeded node keeps its identity and reuses file numbers.
        let d = tempfile::tempdir().unwrap();
        let cache_path = d.path().join("hash-cache.json");
        // A blob file: cached like an SST, but not a table to verify.
        let sst = d.path().join("000009.blob");
        std::fs::write(&sst, vec![1u8; 5000]).unwrap();
        let mut cache = HashCache::load(&cache_path);
        let (m1, _) = build_manifest(d.path(), 1, MIN_CHUNK_SIZE, "id", &mut cache).unwrap();
        cache.save().unwrap();
        // Replaced the way a seed installs files: a new file renamed over.
        let tmp = d.path().join("new.tmp");
        std::fs::write(&tmp, vec![2u8; 5000]).unwrap();
        std::fs::rename(&tmp, &sst).unwrap();
        let mut cache = HashCache::load(&cache_path);
        let (m2, _) = build_manifest(d.path(), 1, MIN_CHUNK_SIZE, "id", &mut cache).unwrap();
        assert_ne!(m1.files[0].hash, m2.files[0].hash, "a stale cached hash");
        assert_eq!(m2.files[0].hash, hash_file(&sst, MIN_CHUNK_SIZE).unwrap().0);
        // An untouched file still comes from the cache.
        let (_, stats) = build_manifest(d.path(), 1, MIN_CHUNK_SIZE, "id", &mut cache).unwrap();
        assert_eq!(stats.cache_hits, 1);
    }

    #[test]
    fn file_names() {
        for ok in [
            "CURRENT",
            "IDENTITY",
            "MANIFEST-000005",
            "OPTIONS-000007",
            "000012.sst",
            "000003.log",
            "000001.blob",
        ] {
            assert!(FileName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../CURRENT",
            "/etc/passwd",
            "a/000012.sst",
            "LOCK",
            "LOG",
            "LOG.old.1",
            "12.txt",
            ".sst",
            "MANIFEST-",
            "MANIFEST-12a",
            "000012.sst/",
            "x.sst",
            "CURRENT\0",
        ] {
            assert!(FileName::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn sample() -> Manifest {
        Manifest {
            seq: 42,
            chunk_size: MIN_CHUNK_SIZE,
            files: vec![
                FileEntry {
                    name: FileName::parse("000001.sst").unwrap(),
                    size: MIN_CHUNK_SIZE as u64 + 1,
                    hash: [1; 32],
                    chunks: vec![[2; 32], [3; 32]],
                },
                FileEntry {
                    name: FileName::parse("CURRENT").unwrap(),
                    size: 0,
                    hash: [4; 32],
                    chunks: vec![],
                },
            ],
            proofs: vec![],
        }
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        assert_eq!(m.id(), Manifest::decode(&enc).unwrap().id());
        let mut p = sample();
        p.proofs = vec![(42, [7; 32]), (1, [8; 32])];
        let enc = p.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), p);
        assert_ne!(p.id(), m.id());
        for cut in sample().encode().len() + 1..enc.len() {
            assert!(Manifest::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut past = sample();
        past.proofs = vec![(43, [7; 32])];
        assert!(
            Manifest::decode(&past.encode()).is_err(),
            "a proof past seq"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let enc = sample().encode();
        for cut in 0..enc.len() {
            assert!(Manifest::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(Manifest::decode(&trailing).is_err());
        // A huge file count or file size must fail without allocating for it.
        let mut huge = enc.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&huge).is_err());
        let mut big_file = enc.clone();
        let size_at = 21 + 1 + 10;
        big_file[size_at..size_at + 8].copy_from_slice(&(MAX_FILE_SIZE - 1).to_le_bytes());
        assert!(Manifest::decode(&big_file).is_err());
        // A traversal name is refused.
        let mut evil = sample();
        evil.files[1].name = FileName("../../x".into());
        assert!(Manifest::decode(&evil.encode()).is_err());
    }

    #[test]
    fn chunk_hashes_merge_into_the_file_hash() {
        let cs = MIN_CHUNK_SIZE as usize;
        let data: Vec<u8> = (0..cs * 9 + 77).map(|i| (i * 31 % 251) as u8).collect();
        for len in [
            0,
            1,
            1023,
            1024,
            1025,
            cs - 1,
            cs,
            cs + 1,
            2 * cs,
            2 * cs + 1,
            3 * cs,
            4 * cs + 5,
            5 * cs,
            8 * cs,
            9 * cs + 77,
        ] {
            let d = &data[..len];
            let chunks: Vec<Hash> = d
                .chunks(cs)
                .enumerate()
                .map(|(i, c)| chunk_hash(len as u64, MIN_CHUNK_SIZE, i, c))
                .collect();
            assert_eq!(
                file_hash_from_chunks(&chunks),
                *blake3::hash(d).as_bytes(),
                "len {len}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data: Vec<u8>) {
            let _ = Manifest::decode(&data);
        }
    }
}
