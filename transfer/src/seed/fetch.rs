//! Fetching one chunk, verifying it against its hash, writing it.

use std::sync::atomic::{AtomicBool, Ordering};

use zstd::dict::DecoderDictionary;

use super::*;

/// The dictionary chunks (crate::dict) of a seed: which files' this
/// follower holds, and their decoders.
pub(super) struct Dictionaries {
    /// Whether the leader takes dictionaries (protocol version 3).
    offer: bool,
    held: Vec<AtomicBool>,
    landed: tokio::sync::Notify,
    cache: DictCache<usize, DecoderDictionary<'static>>,
}

impl Dictionaries {
    pub(super) fn new(offer: bool, held: impl Iterator<Item = bool>) -> Self {
        Self {
            offer,
            held: held.map(AtomicBool::new).collect(),
            landed: tokio::sync::Notify::new(),
            cache: DictCache::new(8),
        }
    }

    /// The dictionary to offer with a request for `chunk` of `file`. Waits
    /// until the file's dictionary chunk has landed: it was queued first,
    /// so it is in flight already (or the seed fails and this is aborted).
    async fn offer(&self, file: usize, chunk: usize) -> Option<u32> {
        if !self.offer || chunk == DICT_CHUNK as usize {
            return None;
        }
        loop {
            let landed = self.landed.notified();
            if self.held[file].load(Ordering::Acquire) {
                return Some(DICT_CHUNK);
            }
            landed.await;
        }
    }

    fn landed(&self, file: usize) {
        self.held[file].store(true, Ordering::Release);
        self.landed.notify_waiters();
    }

    /// The decoder for `file`'s dictionary chunk, read back from the staged
    /// file and checked against the manifest again.
    fn decoder(
        &self,
        m: &Manifest,
        file: usize,
        path: &Path,
    ) -> Result<Arc<DecoderDictionary<'static>>, Fault> {
        self.cache.get_or_load(file, || {
            let entry = &m.files[file];
            let chunk = DICT_CHUNK as usize;
            let (start, end) = entry.chunk_range(chunk, m.chunk_size);
            let buf = crate::leader::read_range(path, start, end)
                .map_err(|_| Fault::Mismatch("the dictionary chunk cannot be read"))?;
            if chunk_hash(entry.size, m.chunk_size, chunk, &buf) != entry.chunks[chunk] {
                return Err(Fault::Mismatch("the dictionary chunk no longer verifies"));
            }
            Ok(DecoderDictionary::copy(&buf))
        })
    }
}

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
    (file, chunk): (usize, usize),
    dicts: &Arc<Dictionaries>,
    attempts: u32,
) -> Result<Done, SeedError> {
    let wire = |source| SeedError::Wire { peer, source };
    let mut refetched = 0;
    for attempt in 1..=attempts {
        // A chunk that failed verification is asked for again without a
        // dictionary: it takes one suspect out of the path.
        let dict = match attempt {
            1 => dicts.offer(file, chunk).await,
            _ => None,
        };
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
                dict,
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
        let (m, path, d) = (
            Arc::clone(manifest),
            staging.join(manifest.files[file].name.as_str()),
            Arc::clone(dicts),
        );
        let verdict = tokio::task::spawn_blocking(move || {
            let dict = dict.map(|_| &*d);
            verify_and_write(&m, (file, chunk), (codec, raw_len, data), dict, &path)
        })
        .await
        .map_err(join_err)?;
        match verdict {
            Ok(raw) => {
                if chunk == DICT_CHUNK as usize {
                    dicts.landed(file);
                }
                return Ok(Done {
                    index: 0,
                    file,
                    raw,
                    wire: wire_len,
                    refetched,
                });
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
    (file, chunk): (usize, usize),
    (codec, raw_len, data): (Codec, u32, Bytes),
    dict: Option<&Dictionaries>,
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
        Codec::ZstdDict => {
            let Some(dicts) = dict else {
                return Err(Fault::Mismatch("a dictionary that was not offered"));
            };
            let d = dicts.decoder(m, file, path)?;
            match zstd::bulk::Decompressor::with_prepared_dictionary(&d)
                .and_then(|mut z| z.decompress(&data, expected))
            {
                Ok(v) => Bytes::from(v),
                Err(_) => return Err(Fault::Mismatch("bad zstd data")),
            }
        }
    };
    if raw.len() != expected {
        return Err(Fault::Mismatch("wrong length"));
    }
    if chunk_hash(entry.size, m.chunk_size, chunk, &raw) != entry.chunks[chunk] {
        return Err(Fault::Mismatch("hash mismatch"));
    }
    if direct::aligned(start, raw.len()) {
        match direct::write(path, &raw, start) {
            Ok(true) => return Ok(expected as u64),
            Ok(false) => buffered_once(path),
            Err(e) => return Err(Fault::Io(io("write", path)(e))),
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Fault::Io(io("open", path)(e)))?;
    f.write_all_at(&raw, start)
        .map_err(|e| Fault::Io(io("write", path)(e)))?;
    // (A file's short last chunk, or a filesystem without direct I/O.)
    // No `fadvise(DONTNEED)` after the write. Dropping each chunk's pages
    // once written back freed memory while the seed ran. On a VM whose
    // balloon driver reports free memory to its host (the benchmark
    // machine), later chunks then faulted that memory back in. A 1 GB seed
    // took 2.1-3.8 s with the advice and 1.5-1.6 s without (alternating
    // runs); 2 GB seeds and the 1 Gbit/s link measured the same either way,
    // the link's last fsync 0.015 s longer. The keeper's fsync every second
    // (`keep_state`) bounds the dirty data.
    Ok(expected as u64)
}

/// Says once per process that chunks go through the page cache here.
fn buffered_once(path: &Path) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::info!(path = %path.display(), "the filesystem refuses direct I/O; writing chunks through the page cache");
    });
}
