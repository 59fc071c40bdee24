//! A WAL batch from a leader, in RocksDB's serialization: parsed record by
//! record and bounded before a follower applies it.
#![no_main]
use ferry_engine::RawBatch;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let first = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if let Ok(b) = RawBatch::parse(first, bytes::Bytes::copy_from_slice(&data[8..])) {
        let _ = b.last();
    }
});
