//! Where ferry keeps its files, and how it replaces them: plain `std`, so
//! the codecs can be built (and fuzzed) without RocksDB.

use std::path::{Path, PathBuf};

use crate::error::{io, Result};

/// The directory, inside a data directory, where ferry keeps its own files.
pub const FERRY_DIR: &str = ".ferry";
const SEED_DIR: &str = "seed";

/// The directory where ferry keeps its own files for the data dir `data`.
pub fn ferry_dir(data: &Path) -> PathBuf {
    data.join(FERRY_DIR)
}

/// Where an unfinished seed of `data` is staged.
pub fn seed_dir(data: &Path) -> PathBuf {
    ferry_dir(data).join(SEED_DIR)
}

/// Writes `data` to `path` atomically and durably: a temporary file beside
/// it, fsync, rename, fsync of the directory. A crash leaves the old file
/// or the new one, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, None)
}

/// [`write_atomic`] for a secret: the file is readable by its owner only.
pub fn write_atomic_private(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, Some(0o600))
}

fn write_atomic_mode(path: &Path, data: &[u8], mode: Option<u32>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if let Some(m) = mode {
        o.mode(m);
    }
    let mut f = o.open(&tmp).map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))?;
    Ok(())
}
