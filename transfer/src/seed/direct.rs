//! Writing verified chunks with direct I/O (`O_DIRECT`), past the page
//! cache.
//!
//! A buffered write copies every byte into a new page-cache page, and the
//! kernel writes it back later; on loopback that was most of a follower's
//! CPU (`copy_folio_from_iter_atomic` alone took 36 % of `ferry seed`'s
//! samples, and system time was 5.2 s for a 1.93 GB seed). A direct write
//! sends the chunk to the device from a buffer of the writer's own. The
//! chunk is still only marked verified after the keeper's fsync, which
//! also commits the file's metadata and flushes the device's cache, so the
//! crash argument of [`super::staging`] holds unchanged.
//!
//! Direct I/O needs the offset, the length and the memory aligned. Chunk
//! boundaries are (chunks are a multiple of [`ALIGN`]); a file's short last
//! chunk is not, and goes through the page cache, as does every chunk on a
//! filesystem that refuses `O_DIRECT` (tmpfs, for one).

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::io::Errno;

/// The alignment direct writes keep: offsets, lengths and memory. 4 KiB
/// covers the logical block size of the disks and filesystems in use.
pub(super) const ALIGN: usize = 4096;

/// The most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// One aligned block of a thread's write buffer.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; ALIGN]);

thread_local! {
    /// Each blocking thread keeps its buffer (a chunk's worth, 2 MiB by
    /// default) for the chunks it writes next: a fresh one would fault in
    /// every page again.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Whether a write of `len` bytes at `start` can go direct.
pub(super) fn aligned(start: u64, len: usize) -> bool {
    len > 0 && start.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// Writes `data` at `start` of the file at `path` with direct I/O; `data`
/// and `start` must be [`aligned`]. Returns `Ok(false)`, having written
/// nothing, when the filesystem does not take direct writes there: the
/// caller writes through the page cache instead.
pub(super) fn write(path: &Path, data: &[u8], start: u64) -> std::io::Result<bool> {
    debug_assert!(aligned(start, data.len()));
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => return Ok(false),
        Err(e) => return Err(e),
    };
    BLOCKS.with_borrow_mut(|blocks| {
        let n = data.len() / ALIGN;
        if blocks.len() < n {
            blocks.resize(n, Block([0; ALIGN]));
        }
        for (b, src) in blocks.iter_mut().zip(data.chunks_exact(ALIGN)) {
            b.0.copy_from_slice(src);
        }
        let mut done = 0;
        while done < n {
            let bufs: Vec<IoSlice<'_>> = blocks[done..n]
                .iter()
                .take(IOV_MAX)
                .map(|b| IoSlice::new(&b.0))
                .collect();
            let at = start + (done * ALIGN) as u64;
            match rustix::io::pwritev(&file, &bufs, at) {
                Ok(w) if w > 0 && w.is_multiple_of(ALIGN) => done += w / ALIGN,
                // A direct write that stops inside a block, or not at all:
                // let the page cache write the chunk (it covers all of it).
                Ok(_) => return Ok(false),
                // The filesystem takes O_DIRECT opens but not this
                // alignment: nothing was written yet.
                Err(Errno::INVAL) if done == 0 => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn a_direct_write_lands_every_byte_at_its_offset() {
        // Beside the test binary: on disk, where direct I/O works (a tmpfs
        // /tmp would test only the refusal).
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let path = dir.path().join("f");
        let size = 3 * (2 << 20) + 100;
        std::fs::File::create(&path)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        let second = pattern(2 << 20, 7);
        let written = write(&path, &second, 2 << 20).unwrap();
        // Two writes on one thread reuse its buffer: the second must not
        // carry the first's bytes.
        let first = pattern(ALIGN * 3, 9);
        assert_eq!(write(&path, &first, 0).unwrap(), written);
        let back = std::fs::read(&path).unwrap();
        if written {
            assert!(back[..first.len()] == first[..], "first chunk");
            assert!(back[2 << 20..4 << 20] == second[..], "second chunk");
            assert!(back[first.len()..2 << 20].iter().all(|&b| b == 0));
            assert!(back[4 << 20..].iter().all(|&b| b == 0));
        } else {
            // Refused: nothing written.
            assert!(back.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn only_whole_blocks_at_block_offsets_go_direct() {
        assert!(aligned(0, 2 << 20));
        assert!(aligned(4 << 20, ALIGN));
        assert!(!aligned(0, 0));
        assert!(!aligned(2 << 20, (1 << 20) + 100));
        assert!(!aligned(100, ALIGN));
    }
}
