//! Verifying an SST's block checksums before it is shipped.
//!
//! blake3 protects a chunk on the wire, not the bytes on the leader's disk:
//! an SST that rotted at rest would be hashed and shipped as it is, and
//! every follower seeded from it would inherit the damage (TiKV spread
//! corrupt SSTs to replicas this way, tikv#15986). So before an SST's hash
//! enters a manifest or the hash cache, RocksDB's own table reader checks
//! the checksum in every block's trailer. The C API has no such call, so a
//! small C++ shim (`cxx/sst_verify.cc`) calls `SstFileReader::VerifyChecksum`.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};

#[allow(unsafe_code)]
mod ffi {
    use std::os::raw::{c_char, c_int};
    extern "C" {
        pub fn ferry_sst_verify(path: *const c_char, err: *mut *mut c_char) -> c_int;
        pub fn ferry_sst_free(p: *mut c_char);
    }
}

/// Checks every block checksum of the SST at `path`.
///
/// Returns [`Error::Corrupt`] with RocksDB's message when a block does not
/// match its checksum or the file does not parse as a table.
pub fn verify(path: &Path) -> Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Corrupt {
        path: path.to_owned(),
        reason: "the path holds a NUL byte".into(),
    })?;
    let mut err: *mut std::os::raw::c_char = std::ptr::null_mut();
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call; `err` is a valid out-pointer. The shim reports through its
    // return value and catches every C++ exception, so nothing unwinds, and when it sets
    // `err` the string is malloc'd and freed here exactly once.
    #[allow(unsafe_code)]
    let (rc, msg) = unsafe {
        let rc = ffi::ferry_sst_verify(c_path.as_ptr(), &mut err);
        let msg = if err.is_null() {
            None
        } else {
            let m = CStr::from_ptr(err).to_string_lossy().into_owned();
            ffi::ferry_sst_free(err);
            Some(m)
        };
        (rc, msg)
    };
    if rc == 0 {
        return Ok(());
    }
    Err(Error::Corrupt {
        path: path.to_owned(),
        reason: msg.unwrap_or_else(|| "verification failed".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One flushed SST of `n` keys; returns its path.
    fn table(dir: &Path, n: u32) -> std::path::PathBuf {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir).unwrap();
        for i in 0..n {
            db.put(
                format!("key{i:08}"),
                format!("value {i} {}", "x".repeat(100)),
            )
            .unwrap();
        }
        db.flush().unwrap();
        drop(db);
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "sst"))
            .unwrap()
    }

    fn flip(path: &Path, at: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }

    #[test]
    fn a_sound_table_verifies_and_a_flipped_bit_anywhere_does_not() {
        let d = tempfile::tempdir().unwrap();
        let sst = table(d.path(), 20_000);
        verify(&sst).unwrap();
        let len = std::fs::metadata(&sst).unwrap().len();
        // A data block near the start, one in the middle, and the index and
        // meta blocks near the end.
        for at in [100, len / 2, len - 300] {
            let copy = d.path().join("copy.sst");
            std::fs::copy(&sst, &copy).unwrap();
            flip(&copy, at);
            match verify(&copy) {
                Err(Error::Corrupt { path, reason }) => {
                    assert_eq!(path, copy);
                    assert!(!reason.is_empty());
                }
                other => panic!("a bit flipped at {at} of {len} passed: {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_that_is_no_table_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("000009.sst");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        assert!(matches!(verify(&p), Err(Error::Corrupt { .. })));
        assert!(matches!(
            verify(&d.path().join("missing.sst")),
            Err(Error::Corrupt { .. })
        ));
    }
}
