//! Taking chunks from an old database kept aside for a re-seed.

use super::*;

/// Takes every chunk of the kept-aside old database that matches the new
/// manifest: whole files by rename when all their chunks match, single
/// chunks by copy otherwise. Touched files are fsynced before the caller
/// persists the bitmap.
pub(super) fn reuse_local_files(
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
