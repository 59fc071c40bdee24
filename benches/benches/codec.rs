//! Micro-benchmarks of the per-chunk and per-batch hot paths:
//! `cargo bench -p ferry-benches --bench codec`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_engine::manifest::{chunk_hash, file_hash_from_chunks};
use ferry_engine::RawBatch;
use ferry_transfer::protocol::{Codec, Frame, FrameHeader, HEADER_LEN};

fn chunks(c: &mut Criterion) {
    let size = 2 << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i * 2654435761usize >> 7) as u8)
        .collect();
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("blake3 chaining value (2 MiB)", |b| {
        b.iter(|| chunk_hash(1 << 30, size as u32, 3, &data))
    });
    let frame = Frame::ChunkReply {
        codec: Codec::Raw,
        raw_len: size as u32,
        data: Bytes::from(data.clone()),
    };
    let mut enc = Vec::new();
    frame.encode(&mut enc);
    g.bench_function("decode ChunkReply (2 MiB)", |b| {
        b.iter(|| {
            let h =
                FrameHeader::parse(enc[..HEADER_LEN].try_into().expect("header")).expect("parse");
            Frame::decode(h, Bytes::copy_from_slice(&enc[HEADER_LEN..])).expect("decode")
        })
    });
    g.finish();
    let cvs: Vec<[u8; 32]> = (0..1024u32)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    c.bench_function("merge 1024 chunk hashes into a file hash", |b| {
        b.iter(|| file_hash_from_chunks(&cvs))
    });
}

fn batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    for ops in [1usize, 100] {
        let mut data = vec![0u8; 8];
        data.extend_from_slice(&(ops as u32).to_le_bytes());
        for i in 0..ops {
            let key = format!("key-{i:08}");
            data.push(1);
            data.push(key.len() as u8);
            data.extend_from_slice(key.as_bytes());
            data.push(100);
            data.extend_from_slice(&[7u8; 100]);
        }
        let data = Bytes::from(data);
        g.throughput(Throughput::Elements(ops as u64));
        g.bench_with_input(BenchmarkId::new("parse", ops), &data, |b, d| {
            b.iter(|| RawBatch::parse(1, d.clone()).expect("parse"))
        });
    }
    g.finish();
}

criterion_group!(benches, chunks, batches);
criterion_main!(benches);
