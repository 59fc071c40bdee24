//! Fetching one chunk, verifying it against its hash, writing it.

use super::*;

/// Why a received chunk was refused.
pub(super) enum Fault {
    /// It does not match the manifest: fetch it again.
    Mismatch(&'static str),
    /// Writing it failed: give up.
    Io(SeedError),
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_chunk(
    conn: &Connection,
    peer: SocketAddr,
    session: u64,
    manifest: &Arc<Manifest>,
    staging: &Path,
    file: usize,
    chunk: usize,
    attempts: u32,
) -> Result<Done, SeedError> {
    let wire = |source| SeedError::Wire { peer, source };
    let mut refetched = 0;
    for attempt in 1..=attempts {
        let asked = Instant::now();
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| SeedError::Connection { peer, source })?;
        write_frame(
            &mut send,
            &Frame::ChunkRequest {
                session,
                file: file as u32,
                chunk: chunk as u32,
            },
        )
        .await
        .map_err(wire)?;
        let _ = send.finish();
        let (codec, raw_len, data) = match expect_frame(&mut recv).await.map_err(wire)? {
            Frame::ChunkReply {
                codec,
                raw_len,
                data,
            } => (codec, raw_len, data),
            other => {
                return Err(wire(WireError::Unexpected {
                    got: other.name(),
                    state: "waiting for a chunk",
                }))
            }
        };
        metrics::histogram!("ferry_seed_chunk_fetch_seconds").record(asked.elapsed().as_secs_f64());
        let wire_len = data.len() as u64;
        let (m, path) = (
            Arc::clone(manifest),
            staging.join(manifest.files[file].name.as_str()),
        );
        let verdict = tokio::task::spawn_blocking(move || {
            verify_and_write(&m, file, chunk, codec, raw_len, data, &path)
        })
        .await
        .map_err(join_err)?;
        match verdict {
            Ok(raw) => {
                return Ok(Done {
                    index: 0,
                    file,
                    raw,
                    wire: wire_len,
                    refetched,
                })
            }
            Err(Fault::Io(e)) => return Err(e),
            Err(Fault::Mismatch(why)) => {
                refetched += 1;
                tracing::warn!(file = %manifest.files[file].name, chunk, attempt, why, "chunk failed verification; fetching it again");
            }
        }
    }
    Err(SeedError::BadChunk {
        file: manifest.files[file].name.to_string(),
        chunk,
        attempts,
    })
}

/// Decodes, verifies and writes one chunk. Nothing is written unless the
/// hash matches.
pub(super) fn verify_and_write(
    m: &Manifest,
    file: usize,
    chunk: usize,
    codec: Codec,
    raw_len: u32,
    data: Bytes,
    path: &Path,
) -> Result<u64, Fault> {
    use std::os::unix::fs::FileExt;
    let entry = &m.files[file];
    let (start, end) = entry.chunk_range(chunk, m.chunk_size);
    let expected = (end - start) as usize;
    if raw_len as usize != expected {
        return Err(Fault::Mismatch("wrong length"));
    }
    let raw: Bytes = match codec {
        Codec::Raw => data,
        Codec::Zstd => match zstd::bulk::decompress(&data, expected) {
            Ok(v) => Bytes::from(v),
            Err(_) => return Err(Fault::Mismatch("bad zstd data")),
        },
    };
    if raw.len() != expected {
        return Err(Fault::Mismatch("wrong length"));
    }
    if chunk_hash(entry.size, m.chunk_size, chunk, &raw) != entry.chunks[chunk] {
        return Err(Fault::Mismatch("hash mismatch"));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Fault::Io(io("open", path)(e)))?;
    f.write_all_at(&raw, start)
        .map_err(|e| Fault::Io(io("write", path)(e)))?;
    Ok(expected as u64)
}
