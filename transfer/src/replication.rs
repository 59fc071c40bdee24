//! Replication, leader side: every batch after a follower's sequence, first
//! from the WAL on disk, then from the in-memory live feed, with no gap and
//! no duplicate; and per-follower tracking of what was acknowledged.
//!
//! The stream position `pos` is the last sequence sent. Each step reads the
//! batches after `pos`: from the feed when it still holds them, otherwise
//! from the WAL (on a blocking thread, through a bounded channel). Both
//! sources are keyed by sequence and checked for continuity, so the
//! hand-over between them cannot skip or repeat a batch. When the WAL no
//! longer holds `pos + 1` the follower is told `WalPurged` and re-seeds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_engine::{Error as EngineError, History, HistoryId, RawBatch, Seq, Store};
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::leader::{Peer, StreamHandler};
use crate::protocol::{ErrorCode, Frame};
use crate::wire::{read_frame, send_error, write_frame, WireError};

/// Knobs of the replication stream.
#[derive(Debug, Clone)]
pub struct ReplicationOptions {
    /// Largest `Batches` frame body, in bytes (soft: one batch may exceed it).
    pub max_frame_bytes: usize,
    /// Heartbeat interval when idle.
    pub heartbeat: Duration,
}

impl Default for ReplicationOptions {
    fn default() -> Self {
        Self {
            max_frame_bytes: 4 << 20,
            heartbeat: Duration::from_millis(250),
        }
    }
}

/// What the leader knows about one follower.
#[derive(Debug, Clone, Serialize)]
pub struct FollowerInfo {
    pub node_id: String,
    pub addr: String,
    /// `catching-up` (served from the WAL), `live` (from the feed) or `disconnected`.
    pub state: &'static str,
    pub sent_seq: Seq,
    /// The last sequence the follower durably applied.
    pub acked_seq: Seq,
    /// Sequences the follower is behind the leader.
    pub lag_seqs: u64,
    /// Bytes sent and not yet acknowledged.
    pub lag_bytes: u64,
    /// Age of the oldest batch sent and not yet acknowledged.
    pub lag_ms: u64,
    pub bytes_sent: u64,
    /// Seconds since it connected (since it disconnected, when it did).
    pub connected_secs: u64,
    /// Live, with nothing sent more than a second ago still unacknowledged:
    /// a semi-synchronous write would not wait on it.
    pub in_sync: bool,
}

struct FollowerState {
    node_id: String,
    addr: SocketAddr,
    inner: Mutex<Tracking>,
}

struct Tracking {
    state: &'static str,
    sent: Seq,
    acked: Seq,
    bytes_sent: u64,
    /// (last sequence, when sent, bytes) of frames not yet acknowledged.
    unacked: VecDeque<(Seq, Instant, u64)>,
    since: Instant,
}

const MAX_UNACKED: usize = 1 << 20;

impl FollowerState {
    fn sent(&self, last: Seq, bytes: u64) {
        let mut t = self.inner.lock();
        t.sent = last;
        t.bytes_sent += bytes;
        if t.unacked.len() < MAX_UNACKED {
            t.unacked.push_back((last, Instant::now(), bytes));
        } else if let Some(back) = t.unacked.back_mut() {
            // Keep the oldest send time; fold the newest frames together.
            back.0 = last;
            back.2 += bytes;
        }
    }

    fn acked(&self, seq: Seq) {
        let mut t = self.inner.lock();
        if seq > t.acked {
            t.acked = seq;
        }
        let now = Instant::now();
        while let Some(f) = t.unacked.front() {
            if f.0 > seq {
                break;
            }
            // Commit (send) to durable on the follower.
            metrics::histogram!("ferry_replication_ack_seconds")
                .record(now.duration_since(f.1).as_secs_f64());
            t.unacked.pop_front();
        }
    }

    fn set_state(&self, s: &'static str) {
        let mut t = self.inner.lock();
        if s == "disconnected" && t.state != s {
            // From now on `since` dates the disconnection.
            t.since = Instant::now();
        }
        t.state = s;
    }

    fn info(&self, latest: Seq) -> FollowerInfo {
        let t = self.inner.lock();
        FollowerInfo {
            node_id: self.node_id.clone(),
            addr: self.addr.to_string(),
            state: t.state,
            sent_seq: t.sent,
            acked_seq: t.acked,
            lag_seqs: latest.saturating_sub(t.acked),
            lag_bytes: t.unacked.iter().map(|u| u.2).sum(),
            lag_ms: t
                .unacked
                .front()
                .map_or(0, |u| u.1.elapsed().as_millis() as u64),
            bytes_sent: t.bytes_sent,
            connected_secs: t.since.elapsed().as_secs(),
            in_sync: t.state == "live"
                && t.unacked
                    .front()
                    .is_none_or(|u| u.1.elapsed() < Duration::from_secs(1)),
        }
    }
}

/// Why a replication stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the follower went away")]
    Gone,
    #[error("this node is fenced: {0}")]
    Fenced(String),
    /// One WAL batch is larger than a `Batches` frame may be: it cannot be
    /// streamed, and the follower must get past it with a re-seed.
    #[error("the batch at sequences {first}..={last} is {bytes} bytes, over the {limit}-byte frame limit")]
    Oversize {
        first: Seq,
        last: Seq,
        bytes: usize,
        limit: u32,
    },
}

/// The largest batch a `Batches` frame carries (its header and the frame's
/// own count take the rest).
const MAX_STREAMED_BATCH: usize = crate::protocol::MAX_BATCHES_FRAME as usize - 64;

/// What a follower's `Subscribe` asks for: the sequence after which to
/// stream, its history term, and the proofs of its operations up to it.
/// A `Subscribe` frame's fields: after, history, proofs, seed checkpoint.
type Subscription = (
    Seq,
    Option<[u8; 16]>,
    Vec<(Seq, [u8; 32])>,
    Option<(Seq, [u8; 32])>,
);

/// Why a follower is refused at subscribe.
#[derive(Debug)]
enum Refusal {
    /// It holds operations this leader does not (or is ahead of it).
    Diverged(String),
    /// This leader cannot check that it does not.
    Unproven(String),
}

/// Disconnected followers are forgotten after this long, and beyond this
/// many entries the longest-disconnected go first: peers choose their node
/// ids, so the table must not grow with every id ever seen.
const FORGET_DISCONNECTED: Duration = Duration::from_secs(3600);
const MAX_TRACKED_FOLLOWERS: usize = 256;

/// The leader's replication service; install it with
/// [`crate::Server::set_stream_handler`].
pub struct Replication {
    store: Store,
    opts: ReplicationOptions,
    followers: Mutex<BTreeMap<String, Arc<FollowerState>>>,
    marks: Mutex<BTreeSet<Seq>>,
    marks_tx: watch::Sender<u64>,
    /// The leader's history; followers are checked against it.
    history: Mutex<Option<History>>,
    /// Bumped on every acknowledgement from any follower.
    acks_tx: watch::Sender<u64>,
    /// Set when a newer history was found among the peers: this node must
    /// not lead any more, and serves no follower.
    fenced: watch::Sender<Option<String>>,
}

impl Replication {
    pub fn new(store: Store, opts: ReplicationOptions) -> Arc<Self> {
        let (marks_tx, _) = watch::channel(0);
        Arc::new(Self {
            store,
            opts,
            followers: Mutex::default(),
            marks: Mutex::default(),
            marks_tx,
            history: Mutex::new(None),
            acks_tx: watch::channel(0).0,
            fenced: watch::channel(None).0,
        })
    }

    /// Fences this leader: every follower stream ends, and new ones are
    /// refused with `reason`.
    pub fn fence(&self, reason: String) {
        self.fenced.send_replace(Some(reason));
    }

    /// Why this leader is fenced, if it is.
    pub fn fenced(&self) -> Option<String> {
        self.fenced.borrow().clone()
    }

    /// Forgets followers that have been away long, and the oldest away
    /// ones beyond the table's bound.
    fn prune_followers(&self) {
        let mut f = self.followers.lock();
        f.retain(|_, st| {
            let t = st.inner.lock();
            t.state != "disconnected" || t.since.elapsed() < FORGET_DISCONNECTED
        });
        while f.len() > MAX_TRACKED_FOLLOWERS {
            let oldest = f
                .iter()
                .filter(|(_, st)| st.inner.lock().state == "disconnected")
                .min_by_key(|(_, st)| st.inner.lock().since)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    f.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Followers connected now that have durably applied `seq`.
    pub fn acked_by(&self, seq: Seq) -> usize {
        self.followers
            .lock()
            .values()
            .filter(|f| {
                let t = f.inner.lock();
                t.state != "disconnected" && t.acked >= seq
            })
            .count()
    }

    /// Waits until `n` connected followers have durably applied `seq`
    /// (semi-synchronous writes). `Err(k)`: only `k` had after `timeout`.
    pub async fn wait_acks(&self, seq: Seq, n: usize, timeout: Duration) -> Result<(), usize> {
        let mut acks = self.acks_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let k = self.acked_by(seq);
            if k >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, acks.changed())
                .await
                .is_err()
            {
                return Err(self.acked_by(seq));
            }
        }
    }

    /// Sets the history followers are checked against and are sent.
    pub fn set_history(&self, h: History) {
        *self.history.lock() = Some(h);
    }

    /// Checks that a follower at `after` on `history` holds nothing this
    /// leader does not, from its proofs: hashes of its operations
    /// `first..=after` for one or more `first`, or the seed checkpoint it
    /// was installed from and has not written past.
    ///
    /// ### Fails closed
    /// Every proof this leader can recompute must match, or the follower is
    /// [`Refusal::Diverged`]. A proof it cannot recompute is one whose range
    /// its WAL no longer reaches; when none is left to check, the follower
    /// sent none, and it shows no checkpoint this leader remembers issuing
    /// at `after`, it is [`Refusal::Unproven`]: never accepted on its
    /// history alone (a leader restored from an older copy keeps its history
    /// id), and kept aside by the follower before it re-seeds. The one
    /// exception is a follower at the very start of this history's first
    /// term with no WAL on either side to compare: no ferry write precedes
    /// that point.
    async fn check_follower(
        &self,
        after: Seq,
        history: Option<[u8; 16]>,
        proofs: Vec<(Seq, [u8; 32])>,
        seeded: Option<(Seq, [u8; 32])>,
    ) -> Result<(), Refusal> {
        let latest = self.store.latest_seq();
        if after > latest {
            return Err(Refusal::Diverged(format!("the follower is at sequence {after}, ahead of this leader at {latest}: the leader lost writes the follower holds")));
        }
        let ours = self.history.lock().clone();
        if let (Some(h), Some(id)) = (&ours, history) {
            h.check(HistoryId(id), after)
                .map_err(|m| Refusal::Diverged(m.to_string()))?;
        }
        if after == 0 {
            return Ok(());
        }
        let current = ours
            .as_ref()
            .map(|h| h.current().id.to_string())
            .unwrap_or_default();
        for &(first, _) in &proofs {
            if first == 0 || first > after {
                return Err(Refusal::Diverged(format!(
                    "the follower's proof {first}..={after} is not a range"
                )));
            }
        }
        let store = self.store.clone();
        let (checks, issued, oldest) = tokio::task::spawn_blocking(move || {
            let checks = proofs
                .into_iter()
                .map(|(first, hash)| (first, hash, store.range_hash(first, after)))
                .collect::<Vec<_>>();
            (checks, store.issued(), store.oldest_wal_seq())
        })
        .await
        .map_err(|e| Refusal::Unproven(e.to_string()))?;
        let mut checked = 0;
        for (first, hash, ours_w) in checks {
            match ours_w {
                Ok(Some(w)) if w.hash == hash => checked += 1,
                Ok(Some(_)) => return Err(Refusal::Diverged(format!(
                    "the follower's write {first}..={after} differs from this leader's (history {current}): the leader lost writes the follower holds"
                ))),
                Ok(None) => {}
                Err(e) => return Err(Refusal::Unproven(format!(
                    "cannot check the follower's operations {first}..={after} against this leader's (history {current}): {e}"
                ))),
            }
        }
        if checked > 0 {
            return Ok(());
        }
        if let Some((seq, id)) = seeded.filter(|&(seq, _)| seq == after) {
            if issued.iter().any(|i| i.seq == seq && i.manifest == id) {
                tracing::info!(
                    after,
                    "a follower proves its position by the seed checkpoint this leader issued"
                );
                return Ok(());
            }
        }
        let oldest = oldest.map_err(|e| Refusal::Unproven(e.to_string()))?;
        let first_start = ours.as_ref().and_then(|h| h.terms.first()).map(|t| t.start);
        if first_start == Some(after) && oldest.is_none_or(|o| o > after) {
            tracing::warn!(
                after,
                "a follower at the start of this history's first term: nothing to compare, accepted"
            );
            return Ok(());
        }
        Err(Refusal::Unproven(format!(
            "the follower at sequence {after} cannot prove it holds this leader's operations (history {current}): {}",
            match oldest {
                Some(o) if o > after => format!("this leader's WAL starts at {o}, after it, and it shows no checkpoint this leader issued there"),
                _ => "it sent no proof this leader's WAL still covers".to_owned(),
            }
        )))
    }

    /// Every follower seen since start, with its lag.
    pub fn followers(&self) -> Vec<FollowerInfo> {
        let latest = self.store.latest_seq();
        self.followers
            .lock()
            .values()
            .map(|f| f.info(latest))
            .collect()
    }

    /// Takes a snapshot, asks every follower to mark the same sequence
    /// (a barrier in the stream), and computes the leader's digest.
    pub fn spawn_marked_digest(
        self: &Arc<Self>,
    ) -> Result<
        (
            Seq,
            std::thread::JoinHandle<ferry_engine::Result<ferry_engine::Digest>>,
        ),
        EngineError,
    > {
        let this = Arc::clone(self);
        // The mark is registered while writes are held off, so a sender can
        // never pass the sequence without seeing it.
        self.store.spawn_digest(move |seq| this.add_mark(seq))
    }

    fn add_mark(&self, seq: Seq) {
        let mut m = self.marks.lock();
        m.insert(seq);
        while m.len() > 64 {
            let first = *m.iter().next().unwrap_or(&seq);
            m.remove(&first);
        }
        drop(m);
        self.marks_tx.send_modify(|g| *g += 1);
    }

    fn next_mark_after(&self, pos: Seq) -> Option<Seq> {
        self.marks.lock().range(pos + 1..).next().copied()
    }

    fn has_mark(&self, seq: Seq) -> bool {
        self.marks.lock().contains(&seq)
    }

    async fn serve(
        self: Arc<Self>,
        peer: Peer,
        (after, history, proofs, seeded): Subscription,
        mut send: SendStream,
        recv: RecvStream,
    ) {
        let latest = self.store.latest_seq();
        if let Some(why) = self.fenced() {
            return send_error(
                &mut send,
                ErrorCode::Unavailable,
                format!("this node is fenced and does not lead: {why}"),
            )
            .await;
        }
        match self.check_follower(after, history, proofs, seeded).await {
            Ok(()) => {}
            Err(Refusal::Diverged(msg)) => {
                tracing::error!(node = %peer.node_id, "refusing a diverged follower: {msg}");
                metrics::counter!("ferry_followers_refused_diverged_total").increment(1);
                return send_error(&mut send, ErrorCode::Diverged, msg).await;
            }
            Err(Refusal::Unproven(msg)) => {
                tracing::warn!(node = %peer.node_id, "refusing an unproven follower (it re-seeds): {msg}");
                metrics::counter!("ferry_followers_refused_unproven_total").increment(1);
                return send_error(&mut send, ErrorCode::Unproven, msg).await;
            }
        }
        let terms = self.history.lock().as_ref().map(|h| {
            h.terms
                .iter()
                .map(|t| (t.id.0, t.start))
                .collect::<Vec<_>>()
        });
        if let Some(terms) = terms {
            if let Err(e) = write_frame(&mut send, &Frame::History { terms }).await {
                tracing::info!(node = %peer.node_id, error = %e, "follower stream ended");
                return;
            }
        }
        let st = Arc::new(FollowerState {
            node_id: peer.node_id.clone(),
            addr: peer.addr,
            inner: Mutex::new(Tracking {
                state: "catching-up",
                sent: after,
                acked: after,
                bytes_sent: 0,
                unacked: VecDeque::new(),
                since: Instant::now(),
            }),
        });
        self.followers
            .lock()
            .insert(peer.node_id.clone(), Arc::clone(&st));
        self.prune_followers();
        tracing::info!(node = %peer.node_id, after, leader_seq = latest, "follower subscribed");
        let acks = tokio::spawn(read_acks(recv, Arc::clone(&st), self.acks_tx.clone()));
        let mut fenced = self.fenced.subscribe();
        let end = tokio::select! {
            end = self.stream(&st, after, &mut send) => end,
            f = fenced.wait_for(|f| f.is_some()) => Err(StreamEnd::Fenced(
                f.ok().and_then(|f| f.clone()).unwrap_or_default(),
            )),
        };
        match end {
            Err(StreamEnd::Fenced(why)) => {
                tracing::warn!(node = %peer.node_id, "ending a follower stream: this node is fenced");
                send_error(
                    &mut send,
                    ErrorCode::Unavailable,
                    format!("this node is fenced and does not lead: {why}"),
                )
                .await;
            }
            Err(StreamEnd::Engine(EngineError::WalPurged {
                requested,
                oldest_available,
            })) => {
                tracing::warn!(node = %peer.node_id, requested, oldest_available, "WAL purged past the follower; it must re-seed");
                let msg = format!(
                    "the WAL no longer holds sequence {} (oldest is {oldest_available})",
                    requested + 1
                );
                send_error(&mut send, ErrorCode::WalPurged, msg).await;
            }
            Err(e @ StreamEnd::Oversize { .. }) => {
                tracing::error!(node = %peer.node_id, error = %e, "a batch too large to stream: the follower must re-seed past it");
                metrics::counter!("ferry_oversize_batches_total").increment(1);
                let msg = format!("{e}; it cannot be streamed, re-seed past it");
                send_error(&mut send, ErrorCode::WalPurged, msg).await;
            }
            Err(StreamEnd::Engine(e)) => {
                tracing::error!(node = %peer.node_id, error = %e, "replication failed");
                send_error(&mut send, ErrorCode::Internal, e.to_string()).await;
            }
            Err(e) => tracing::info!(node = %peer.node_id, reason = %e, "follower stream ended"),
            Ok(()) => {}
        }
        acks.abort();
        st.set_state("disconnected");
    }

    async fn stream(
        &self,
        st: &FollowerState,
        mut pos: Seq,
        send: &mut SendStream,
    ) -> Result<(), StreamEnd> {
        let feed = self.store.feed();
        let mut news = feed.subscribe();
        let mut marks = self.marks_tx.subscribe();
        let mut live = false;
        // The last mark sent, so an idle stream sends each mark once.
        let mut marked: Option<Seq> = None;
        loop {
            // A mark at the current position goes out before any later
            // batch (send_batches only looks at marks after `pos`).
            if self.has_mark(pos) && marked != Some(pos) {
                write_frame(send, &Frame::Mark { seq: pos }).await?;
                marked = Some(pos);
            }
            match feed.read_after(pos, 16_384) {
                Ok(batches) if !batches.is_empty() => {
                    if !live {
                        live = true;
                        st.set_state("live");
                        self.heartbeat(send, true).await?;
                    }
                    pos = self
                        .send_batches(
                            st,
                            send,
                            batches.iter().map(|b| (**b).clone()),
                            pos,
                            &mut marked,
                        )
                        .await?;
                }
                Ok(_) => {
                    if !live {
                        live = true;
                        st.set_state("live");
                        self.heartbeat(send, true).await?;
                    }
                    tokio::select! {
                        r = news.changed() => if r.is_err() { return Ok(()) },
                        r = marks.changed() => if r.is_err() { return Ok(()) },
                        _ = tokio::time::sleep(self.opts.heartbeat) => self.heartbeat(send, true).await?,
                    }
                }
                Err(_behind) => {
                    if live {
                        live = false;
                        st.set_state("catching-up");
                        self.heartbeat(send, false).await?;
                    }
                    pos = self.catch_up_from_wal(st, send, pos, &mut marked).await?;
                }
            }
        }
    }

    async fn heartbeat(&self, send: &mut SendStream, live: bool) -> Result<(), StreamEnd> {
        write_frame(
            send,
            &Frame::Heartbeat {
                leader_seq: self.store.latest_seq(),
                live,
            },
        )
        .await?;
        Ok(())
    }

    /// Reads the WAL after `pos` on a blocking thread and sends it.
    async fn catch_up_from_wal(
        &self,
        st: &FollowerState,
        send: &mut SendStream,
        pos: Seq,
        marked: &mut Option<Seq>,
    ) -> Result<Seq, StreamEnd> {
        let (tx, mut rx) = mpsc::channel::<Result<Vec<RawBatch>, EngineError>>(8);
        let store = self.store.clone();
        let max = self.opts.max_frame_bytes;
        let reader = tokio::task::spawn_blocking(move || {
            // Only what is synced: a batch past the durable sequence is in
            // the WAL file but may not survive a power cut on this node. It
            // reaches the follower from the feed once the sync publishes it.
            let durable = store.durable_seq();
            let iter = match store.wal_since(pos) {
                Ok(it) => it,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let (mut group, mut bytes) = (Vec::new(), 0);
            for b in iter {
                match b {
                    Ok(b) if b.first() > durable => break,
                    Ok(b) => {
                        bytes += b.data().len();
                        group.push(b);
                        if bytes >= max || group.len() >= 16_384 {
                            if tx.blocking_send(Ok(std::mem::take(&mut group))).is_err() {
                                return;
                            }
                            bytes = 0;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if !group.is_empty() {
                let _ = tx.blocking_send(Ok(group));
            }
        });
        tracing::info!(node = %st.node_id, after = pos, "catching the follower up from the WAL");
        let mut at = pos;
        while let Some(group) = rx.recv().await {
            let group = group?;
            metrics::counter!("ferry_replication_wal_batches_total").increment(group.len() as u64);
            at = self
                .send_batches(st, send, group.into_iter(), at, marked)
                .await?;
        }
        let _ = reader.await;
        Ok(at)
    }

    /// Sends consecutive batches after `pos` in frames of bounded size,
    /// splitting at marks; returns the new position.
    async fn send_batches(
        &self,
        st: &FollowerState,
        send: &mut SendStream,
        batches: impl Iterator<Item = RawBatch>,
        mut pos: Seq,
        marked: &mut Option<Seq>,
    ) -> Result<Seq, StreamEnd> {
        let mut frame: Vec<(Seq, u32, Bytes)> = Vec::new();
        let mut bytes = 0usize;
        let mut mark = self.next_mark_after(pos);
        for b in batches {
            if b.first() != pos + 1 {
                // Both sources are contiguous; this would be a bug, never a skip.
                return Err(EngineError::WalGap {
                    expected: pos + 1,
                    found: b.first(),
                }
                .into());
            }
            let len = b.data().len();
            if len > MAX_STREAMED_BATCH {
                if !frame.is_empty() {
                    self.flush(st, send, &mut frame, pos, bytes).await?;
                }
                return Err(StreamEnd::Oversize {
                    first: b.first(),
                    last: b.last(),
                    bytes: len,
                    limit: crate::protocol::MAX_BATCHES_FRAME,
                });
            }
            // A frame never grows past the limit: what is gathered goes
            // first when this batch would not fit beside it.
            if !frame.is_empty() && bytes + len + 16 * (frame.len() + 1) > MAX_STREAMED_BATCH {
                self.flush(st, send, &mut frame, pos, bytes).await?;
                bytes = 0;
            }
            pos = b.last();
            bytes += len;
            frame.push((b.first(), b.count(), b.data().clone()));
            let at_mark = mark == Some(pos);
            if bytes >= self.opts.max_frame_bytes || at_mark {
                self.flush(st, send, &mut frame, pos, bytes).await?;
                bytes = 0;
                if at_mark {
                    write_frame(send, &Frame::Mark { seq: pos }).await?;
                    *marked = Some(pos);
                }
                mark = self.next_mark_after(pos);
            }
        }
        if !frame.is_empty() {
            self.flush(st, send, &mut frame, pos, bytes).await?;
        }
        Ok(pos)
    }

    async fn flush(
        &self,
        st: &FollowerState,
        send: &mut SendStream,
        frame: &mut Vec<(Seq, u32, Bytes)>,
        last: Seq,
        bytes: usize,
    ) -> Result<(), StreamEnd> {
        if frame.is_empty() {
            return Ok(());
        }
        write_frame(
            send,
            &Frame::Batches {
                batches: std::mem::take(frame),
            },
        )
        .await?;
        st.sent(last, bytes as u64);
        Ok(())
    }
}

async fn read_acks(
    mut recv: RecvStream,
    st: Arc<FollowerState>,
    acks: watch::Sender<u64>,
) -> Result<(), StreamEnd> {
    loop {
        match read_frame(&mut recv).await? {
            Some(Frame::Applied { seq }) => {
                st.acked(seq);
                acks.send_modify(|n| *n += 1);
            }
            Some(_) => {}
            None => return Err(StreamEnd::Gone),
        }
    }
}

impl StreamHandler for Replication {
    fn handle(
        self: Arc<Self>,
        peer: Peer,
        first: Frame,
        mut send: SendStream,
        recv: RecvStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let this = self;
        Box::pin(async move {
            match first {
                Frame::Subscribe {
                    after,
                    history,
                    proofs,
                    seeded,
                } => {
                    this.serve(peer, (after, history, proofs, seeded), send, recv)
                        .await
                }
                other => {
                    send_error(
                        &mut send,
                        ErrorCode::Protocol,
                        format!("unexpected {}", other.name()),
                    )
                    .await
                }
            }
        })
    }
}
