//! A manifest from a leader: decode, and for what decodes, every derived
//! quantity a follower computes from it must be in bounds.
#![no_main]
use ferry_engine::Manifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    let _ = m.total_bytes();
    let _ = m.id();
    for f in &m.files {
        for c in 0..f.chunks.len() {
            let (start, end) = f.chunk_range(c, m.chunk_size);
            assert!(
                start <= end && end <= f.size,
                "chunk {c} of {} out of bounds",
                f.name
            );
        }
    }
    let again = Manifest::decode(&m.encode()).expect("an encoded manifest decodes");
    assert_eq!(again.encode(), m.encode());
});
