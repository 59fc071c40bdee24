//! Compression dictionaries for chunks.
//!
//! A chunk compressed on its own cannot use repeats that lie in other
//! chunks, and in RocksDB files they often do (db_bench's values repeat a
//! 1 MB buffer; real tables repeat key prefixes and schemas file-wide). So a
//! follower that holds a chunk of a file, verified, offers it in its
//! `ChunkRequest`s for the file's other chunks, and a network-bound leader
//! compresses against it as a raw-content zstd dictionary
//! ([`crate::protocol::Codec::ZstdDict`]). Nothing extra crosses the wire:
//! the dictionary is a chunk the follower fetched anyway, and it checks that
//! chunk against the manifest again before using it.
//!
//! Both ends keep the few dictionaries in use in a [`DictCache`].

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

/// The chunk a follower offers as the dictionary for the other chunks of
/// its file: the first. The follower fetches every file's first chunk
/// before the rest.
pub const DICT_CHUNK: u32 = 0;

/// The few most recently used dictionaries, by key. Chunks are fetched
/// roughly file by file, so a handful covers the files in flight.
pub struct DictCache<K, T> {
    slots: Mutex<VecDeque<(K, Slot<T>)>>,
    capacity: usize,
}

/// One key's dictionary, loaded once by whoever asks first; the others
/// asking for the same key wait for that load, and nobody else does.
type Slot<T> = Arc<OnceLock<Option<Arc<T>>>>;

impl<K: PartialEq + Copy, T> DictCache<K, T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
        }
    }

    /// The dictionary for `key`, loaded with `load` if it is not cached. A
    /// failed load is not cached: the next caller tries again.
    pub fn get_or_load<E>(&self, key: K, load: impl FnOnce() -> Result<T, E>) -> Result<Arc<T>, E> {
        let mut load = Some(load);
        loop {
            let slot = {
                let mut slots = self.slots.lock();
                let slot = match slots.iter().position(|(k, _)| *k == key) {
                    Some(i) => slots.remove(i).expect("position is in range").1,
                    None => Slot::default(),
                };
                slots.push_front((key, Arc::clone(&slot)));
                slots.truncate(self.capacity);
                slot
            };
            let mut failed = None;
            let loaded = slot.get_or_init(|| {
                let load = load.take().expect("a load runs at most once per call");
                match load() {
                    Ok(v) => Some(Arc::new(v)),
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                }
            });
            if let Some(v) = loaded {
                return Ok(Arc::clone(v));
            }
            self.slots.lock().retain(|(_, s)| !Arc::ptr_eq(s, &slot));
            if let Some(e) = failed {
                return Err(e);
            }
            // Another caller's load failed while this one waited: try with
            // this caller's own load.
        }
    }
}

impl<K, T> std::fmt::Debug for DictCache<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DictCache")
            .field("cached", &self.slots.lock().len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recently_used() {
        let cache = DictCache::new(2);
        let mut loads = 0;
        let mut get = |k: u32| {
            *cache
                .get_or_load(k, || {
                    loads += 1;
                    Ok::<_, ()>(k * 10)
                })
                .unwrap()
        };
        assert_eq!(get(1), 10);
        assert_eq!(get(2), 20);
        assert_eq!(get(1), 10); // cached: 1 is now the most recent
        assert_eq!(get(3), 30); // evicts 2
        assert_eq!(get(1), 10);
        assert_eq!(get(2), 20); // loaded again
        assert_eq!(loads, 4);
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let cache: DictCache<u32, u32> = DictCache::new(2);
        assert!(cache.get_or_load(1, || Err("no")).is_err());
        assert_eq!(*cache.get_or_load(1, || Ok::<_, ()>(5)).unwrap(), 5);
    }

    #[test]
    fn a_raw_chunk_works_as_a_zstd_dictionary() {
        use zstd::dict::{DecoderDictionary, EncoderDictionary};
        // Two "chunks" that share a 64 KiB run of noise, 1 MiB apart in
        // the file: each alone barely compresses; with the other as its
        // dictionary the shared run costs almost nothing.
        let noise = |seed: u64, n: usize| -> Vec<u8> {
            let mut x = seed;
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect()
        };
        let shared = noise(1, 64 << 10);
        let first = [noise(2, 16 << 10), shared.clone()].concat();
        let second = [shared, noise(3, 16 << 10)].concat();
        let alone = zstd::bulk::compress(&second, 3).unwrap();
        let enc = EncoderDictionary::copy(&first, 3);
        let with = zstd::bulk::Compressor::with_prepared_dictionary(&enc)
            .unwrap()
            .compress(&second)
            .unwrap();
        assert!(alone.len() > 70 << 10, "{}", alone.len());
        assert!(with.len() < 20 << 10, "{}", with.len());
        let dec = DecoderDictionary::copy(&first);
        let back = zstd::bulk::Decompressor::with_prepared_dictionary(&dec)
            .unwrap()
            .decompress(&with, second.len())
            .unwrap();
        assert_eq!(back, second);
        // Without the dictionary the data does not decode.
        assert!(zstd::bulk::decompress(&with, second.len()).map_or(true, |b| b != second));
    }
}
