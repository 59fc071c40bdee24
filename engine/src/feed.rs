//! The live feed: committed batches kept in memory, in sequence order, so
//! that caught-up followers are served without re-reading the WAL.
//!
//! The writer publishes under the store's write lock and never blocks on
//! readers. The buffer is bounded by batch count and bytes; a reader whose
//! position has already been dropped from it gets [`FeedBehind`] and falls
//! back to the WAL reader. Readers wait for news on a `watch` channel that
//! carries the last published sequence.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::batch::RawBatch;
use crate::error::Seq;

/// The reader's position is older than anything the feed still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("feed behind: asked for batches after {after}, the feed starts at {oldest}")]
pub struct FeedBehind {
    pub after: Seq,
    /// The first sequence the feed still holds.
    pub oldest: Seq,
}

/// Bounds of the feed's buffer.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    pub max_batches: usize,
    pub max_bytes: usize,
}

impl Default for FeedLimits {
    fn default() -> Self {
        Self {
            max_batches: 200_000,
            max_bytes: 64 << 20,
        }
    }
}

#[derive(Debug)]
pub struct Feed {
    buf: Mutex<Buffer>,
    tx: watch::Sender<Seq>,
}

#[derive(Debug)]
struct Buffer {
    batches: VecDeque<Arc<RawBatch>>,
    bytes: usize,
    /// The sequence the next published batch must start at.
    next: Seq,
    limits: FeedLimits,
}

impl Feed {
    /// A feed whose next batch starts after `latest`.
    pub fn new(latest: Seq, limits: FeedLimits) -> Self {
        let (tx, _) = watch::channel(latest);
        Self {
            buf: Mutex::new(Buffer {
                batches: VecDeque::new(),
                bytes: 0,
                next: latest + 1,
                limits,
            }),
            tx,
        }
    }

    /// Appends a committed batch. Called in commit order; a batch that does
    /// not continue the feed (the store was written around it) clears the
    /// buffer so that readers re-sync from the WAL instead of seeing a gap.
    pub fn publish(&self, batch: RawBatch) {
        let last = batch.last();
        {
            let mut b = self.buf.lock();
            if batch.first() != b.next {
                tracing::warn!(
                    expected = b.next,
                    found = batch.first(),
                    "feed discontinuity; readers will re-sync from the WAL"
                );
                b.batches.clear();
                b.bytes = 0;
            }
            b.next = last + 1;
            b.bytes += batch.data().len();
            b.batches.push_back(Arc::new(batch));
            while b.batches.len() > b.limits.max_batches
                || (b.bytes > b.limits.max_bytes && b.batches.len() > 1)
            {
                if let Some(old) = b.batches.pop_front() {
                    b.bytes -= old.data().len();
                }
            }
        }
        self.tx.send_replace(last);
    }

    /// Up to `max` batches that follow `after`, in order; empty when the
    /// reader is caught up.
    pub fn read_after(&self, after: Seq, max: usize) -> Result<Vec<Arc<RawBatch>>, FeedBehind> {
        let b = self.buf.lock();
        if after + 1 == b.next {
            return Ok(Vec::new());
        }
        let oldest = b.batches.front().map_or(b.next, |f| f.first());
        let idx = b.batches.partition_point(|x| x.last() <= after);
        match b.batches.get(idx) {
            Some(first) if first.first() == after + 1 => {
                Ok(b.batches.range(idx..).take(max).cloned().collect())
            }
            _ => Err(FeedBehind { after, oldest }),
        }
    }

    /// The batches from the one that holds sequence `seq` on, in order, up
    /// to `max`; `None` when the feed no longer (or not yet) holds `seq`.
    pub fn read_from(&self, seq: Seq, max: usize) -> Option<Vec<Arc<RawBatch>>> {
        let b = self.buf.lock();
        let idx = b.batches.partition_point(|x| x.last() < seq);
        match b.batches.get(idx) {
            Some(first) if first.first() <= seq => {
                Some(b.batches.range(idx..).take(max).cloned().collect())
            }
            _ => None,
        }
    }

    /// The last published sequence.
    pub fn latest(&self) -> Seq {
        *self.tx.borrow()
    }

    /// A receiver that changes whenever a batch is published.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(first: Seq, count: u32) -> RawBatch {
        RawBatch::from_trusted(first, count, Bytes::from(vec![0u8; 100]))
    }

    #[test]
    fn reads_in_order_and_reports_behind() {
        let feed = Feed::new(
            10,
            FeedLimits {
                max_batches: 3,
                max_bytes: 1 << 20,
            },
        );
        assert_eq!(feed.read_after(10, 10).unwrap().len(), 0);
        assert!(feed.read_after(5, 10).is_err());
        for (f, c) in [(11, 2), (13, 1), (14, 3), (17, 1)] {
            feed.publish(batch(f, c));
        }
        assert_eq!(feed.latest(), 17);
        // (11, 2) was evicted: max 3 batches.
        assert_eq!(
            feed.read_after(10, 10),
            Err(FeedBehind {
                after: 10,
                oldest: 13
            })
        );
        let got: Vec<_> = feed
            .read_after(12, 10)
            .unwrap()
            .iter()
            .map(|b| b.first())
            .collect();
        assert_eq!(got, vec![13, 14, 17]);
        assert_eq!(feed.read_after(13, 1).unwrap()[0].first(), 14);
        // Mid-batch positions are not served.
        assert!(feed.read_after(15, 10).is_err());
        assert!(feed.read_after(17, 10).unwrap().is_empty());
    }

    #[test]
    fn bytes_bound_and_discontinuity() {
        let feed = Feed::new(
            0,
            FeedLimits {
                max_batches: 100,
                max_bytes: 250,
            },
        );
        for i in 1..=5 {
            feed.publish(batch(i, 1));
        }
        // 250 bytes hold two 100-byte batches: 4 and 5.
        assert_eq!(feed.read_after(3, 10).unwrap().len(), 2);
        assert_eq!(
            feed.read_after(2, 10),
            Err(FeedBehind {
                after: 2,
                oldest: 4
            })
        );
        feed.publish(batch(100, 1));
        assert!(feed.read_after(5, 10).is_err());
        assert!(feed.read_after(99, 10).unwrap().len() == 1);
    }
}
