//! The durable state of a seed in progress, and why a crash anywhere
//! leaves something that resumes or finishes, never a half-seeded database
//! that opens:
//!
//! - `seed/` exists from the first step to the last; while it does, the
//!   store refuses to open the directory.
//! - `verified.bin` marks a chunk only after the file it was written to
//!   was fsynced, and it starts with the id of the manifest whose chunk
//!   order it follows: after a crash between writing a new bitmap and its
//!   new `manifest.bin`, the pair does not match and the bitmap is dropped
//!   (chunks are fetched again, never assumed).
//! - Setting an old database aside (`reuse/`) is bracketed by the `moving`
//!   marker: a restart finishes the move, so no old WAL file stays beside
//!   the new database.
//! - `installing` is written once every chunk is verified; from then on a
//!   restart only finishes the install (see `install`), which checks the
//!   staged database's sequence before anything becomes visible, renames
//!   the files with `CURRENT` last, and renames `seed/` to `seed.trash` in
//!   one step before deleting it.

use super::*;

pub(super) const MANIFEST_FILE: &str = "manifest.bin";
pub(super) const BITMAP_FILE: &str = "verified.bin";
pub(super) const INSTALLING: &str = "installing";
/// The old database's files, kept aside during a re-seed.
pub(super) const REUSE_DIR: &str = "reuse";
/// Present while the old database is being moved into `reuse/`.
pub(super) const MOVING: &str = "moving";

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
pub(super) fn chunk_offsets(m: &Manifest) -> Vec<usize> {
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

/// Checks that the target is empty (or holds an unfinished seed) and
/// returns the staging directory.
pub(super) fn prepare_target(data: &Path, reuse_existing: bool) -> Result<PathBuf, SeedError> {
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
pub(super) fn move_aside(data: &Path, staging: &Path) -> Result<(), SeedError> {
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
        } else if name == "archive" && from.is_dir() {
            // RocksDB's archived WAL files belong to the old database: left
            // beside the new one, its WAL reader would find batches of the
            // old history at sequences the new one reuses.
            std::fs::remove_dir_all(&from).map_err(io("remove", &from))?;
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
pub(super) fn trash_dir(data: &Path) -> PathBuf {
    ferry_engine::ferry_dir(data).join("seed.trash")
}

pub(super) fn remove_trash(data: &Path) -> Result<(), SeedError> {
    let trash = trash_dir(data);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    }
    Ok(())
}

pub(super) fn read_manifest(staging: &Path) -> Result<Manifest, SeedError> {
    let p = staging.join(MANIFEST_FILE);
    let bytes = std::fs::read(&p).map_err(io("read", &p))?;
    Ok(Manifest::decode(&bytes)?)
}

/// Writes a small file atomically and durably.
pub(super) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SeedError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SeedError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// Lines up the staging directory with `manifest`: keeps verified chunks
/// that are still valid, sizes every file, removes files it no longer lists.
/// Returns the verified chunks, and how many of them (chunks, bytes) were
/// carried over from the durable bitmap and were taken from old local files.
pub(super) fn reconcile(
    staging: &Path,
    manifest: &Manifest,
) -> Result<(Bitmap, Extent, Extent), SeedError> {
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
    reserve_space(staging, manifest)?;
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

/// Free space kept beyond the staged files: the bitmap's atomic rewrites,
/// and RocksDB's new MANIFEST, WAL and OPTIONS files at the first open.
pub(super) const SPACE_RESERVE: u64 = 8 << 20;

/// Allocates every staged file's blocks now (`fallocate`), so a disk too
/// small for the seed fails it at once, before a byte is fetched, and chunk
/// writes cannot hit a full disk later, even when something else fills it
/// during the seed. Then requires [`SPACE_RESERVE`] to be left free.
fn reserve_space(staging: &Path, manifest: &Manifest) -> Result<(), SeedError> {
    use std::os::unix::fs::MetadataExt;
    let needed = |manifest: &Manifest| -> u64 {
        manifest
            .files
            .iter()
            .map(|f| {
                let allocated = std::fs::metadata(staging.join(f.name.as_str()))
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0);
                f.size.saturating_sub(allocated)
            })
            .sum()
    };
    let available = || {
        rustix::fs::statvfs(staging)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX)
    };
    let full = |needed: u64, available: u64| SeedError::NoSpace {
        path: staging.to_owned(),
        needed,
        available,
    };
    let before = needed(manifest);
    if before.saturating_add(SPACE_RESERVE) > available() {
        return Err(full(before.saturating_add(SPACE_RESERVE), available()));
    }
    for f in &manifest.files {
        if f.size == 0 {
            continue;
        }
        let p = staging.join(f.name.as_str());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io("open", &p))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, f.size) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOSPC) => {
                return Err(full(
                    needed(manifest).saturating_add(SPACE_RESERVE),
                    available(),
                ))
            }
            // Filesystems without fallocate: the check above is all there is.
            Err(rustix::io::Errno::OPNOTSUPP) => break,
            Err(e) => return Err(io("allocate", &p)(e.into())),
        }
    }
    if available() < SPACE_RESERVE {
        return Err(full(SPACE_RESERVE, available()));
    }
    Ok(())
}

/// A number of chunks and their bytes.
pub(super) type Extent = (usize, u64);

/// How many chunks, and bytes, `bits` marks verified.
pub(super) fn verified_extent(manifest: &Manifest, bits: &Bitmap) -> Extent {
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

#[derive(Default)]
pub(super) struct Fetched {
    pub(super) chunks: usize,
    pub(super) raw: u64,
    pub(super) wire: u64,
    pub(super) refetched: usize,
}

/// Owns the bitmap: marks chunks as they arrive, and every second (or
/// 256 MiB) fsyncs the files written since and persists the bitmap.
pub(super) async fn keep_state(
    staging: PathBuf,
    manifest: Arc<Manifest>,
    mut bits: Bitmap,
    mut rx: mpsc::Receiver<Done>,
    progress: Option<ProgressFn>,
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
