//! The serving side: answers seeds from checkpoints, and hands replication
//! streams to a [`StreamHandler`].
//!
//! A connection is served only after its `Hello` authenticates (a CA-signed
//! client certificate, or a join-token proof bound to this TLS session);
//! until then no other stream is even accepted. One checkpoint serves every
//! seed that starts while it is fresh; it is deleted once no seed has used it
//! for the grace period.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_engine::{CheckpointInfo, Manifest, Store};
use parking_lot::Mutex;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::Semaphore;

use crate::auth::{check_proof, exported_keying_material, NodeAuth};
use crate::dict::{DictCache, DICT_CHUNK};
use crate::priority::SeedPriority;
use crate::protocol::{Codec, ErrorCode, Frame, Role, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::wire::{read_frame, read_frame_within, send_error, write_frame, WireError};

/// The largest first frame a peer may send before it authenticates.
const MAX_HELLO_FRAME: u32 = 64 * 1024;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    /// Never compress.
    Off,
    /// Follows the bottleneck, per connection. While the connection's
    /// measured wire rate is well below what the cores can compress (the
    /// network is the bottleneck: a WAN or a 1 Gbit/s link), every chunk is
    /// compressed at [`NET_LEVEL`] and sent so when it saves 5 % (a file
    /// whose first chunk does not is sent raw). Otherwise (loopback, fast
    /// links: the CPU is the bottleneck) only the files whose first chunk
    /// shrinks by at least `min_ratio` at `level` are compressed (WAL,
    /// MANIFEST and uncompressed SSTs; block-compressed SSTs are not).
    Auto { level: i32, min_ratio: f32 },
    /// Compress every chunk; send it compressed when that saves 5 %.
    Always { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Auto {
            level: 1,
            min_ratio: 2.0,
        }
    }
}

/// Test-only fault injection, compiled only with the `faults` feature (the
/// integration tests enable it; `cargo install` and `cargo build -p ferry`
/// leave it out of the shipped binary).
#[cfg(feature = "faults")]
#[derive(Debug, Default)]
pub struct Faults {
    /// Corrupt this many of the next chunk replies (one byte flipped after
    /// the hash was taken, as a bad disk or buggy sender would).
    pub corrupt_chunks: std::sync::atomic::AtomicU32,
}

/// Settings of the serving side.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub node_id: String,
    /// Upper bound on chunk bytes sent per second, across all seeds.
    pub max_rate: Option<u64>,
    /// A lower bound that applies only while the store is taking writes
    /// (its sequence moved in the last half second), so that seeds yield to
    /// the foreground load; an idle node seeds at full speed.
    pub busy_max_rate: Option<u64>,
    /// How much slower, in percent, the writes may get than while no seed
    /// runs before the busy control cuts a seed under writes (1-100). A
    /// closed-loop writer whose latency grows by P % runs at 100/(100+P)
    /// of its rate: 15 keeps it near 0.87x.
    pub busy_slowdown_pct: u32,
    pub compression: Compression,
    /// The CPU priority of this node's seed work as a leader: reading and
    /// compressing chunks (see [`crate::priority`]).
    pub seed_priority: SeedPriority,
    /// How long an unused checkpoint is kept for a seed that reconnects.
    pub checkpoint_grace: Duration,
    /// A new node's seed reuses a checkpoint younger than this (followers
    /// joining together share one). An older one would cost the new
    /// follower all the WAL written since, replayed after its seed. A node
    /// that was handed a checkpoint gets it back while it is held, however
    /// old: a resume then keeps every chunk it has.
    pub checkpoint_reuse: Duration,
    /// Chunk requests served at once per connection.
    pub max_chunks_in_flight: usize,
    /// Connections that have not authenticated yet (in the TLS handshake or
    /// before their `Hello`); further ones are refused until some finish.
    pub max_unauthenticated: usize,
    #[cfg(feature = "faults")]
    pub faults: Arc<Faults>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            node_id: "leader".into(),
            max_rate: None,
            busy_max_rate: Some(100 << 20),
            busy_slowdown_pct: DEFAULT_BUSY_SLOWDOWN_PCT,
            compression: Compression::default(),
            seed_priority: SeedPriority::default(),
            checkpoint_grace: Duration::from_secs(60),
            checkpoint_reuse: Duration::from_secs(10),
            max_chunks_in_flight: 64,
            max_unauthenticated: 64,
            #[cfg(feature = "faults")]
            faults: Arc::default(),
        }
    }
}

/// The default of [`ServeOptions::busy_slowdown_pct`].
pub const DEFAULT_BUSY_SLOWDOWN_PCT: u32 = 15;

/// The zstd level of the network-bound mode. Measured on db_bench SSTs in
/// 2 MiB chunks (one core): level 1 shrinks them 1.5x at 245 MB/s, level 2
/// 2.6x at 174 MB/s, level 3 3.8x at 151 MB/s (the repeats lie further
/// apart than level 1's tables reach). Across a 1 Gbit/s link on two cores
/// shared by both ends, level 2 delivered the most (benches/link.sh).
pub const NET_LEVEL: i32 = 2;

/// Compression is only tried on a connection whose raw rate is below what
/// the cores could compress by this margin (170 MB/s on 2 cores: above the
/// up to 141 MB/s measured raw across a 1 Gbit/s link, whose 100 ms
/// samples are bursty, and below the 280 MB/s and more of loopback).
const NET_MARGIN: f64 = 2.0;

/// zstd at [`NET_LEVEL`] on one core, raw bytes per second (measured on
/// db_bench chunks on this class of machine).
const NET_LEVEL_SPEED: f64 = 170e6;

/// One connection's delivery of chunks, whether its chunks are compressed
/// for the network now (see [`Prober`]), and how many it may have in
/// flight (see [`in_flight_budget`]).
#[derive(Debug)]
pub struct LinkMeter {
    in_flight: AtomicUsize,
    /// Chunks that may be in flight (read, encoded, queued or unacknowledged)
    /// at once.
    budget: AtomicUsize,
    /// Woken when a chunk leaves flight or the budget grows.
    freed: tokio::sync::Notify,
    /// Requests waiting for the budget now.
    waiting: AtomicUsize,
    /// Chunks the peer has received in full.
    delivered_chunks: AtomicU64,
    /// Chunks in flight that were read in each mode (raw, compressed).
    in_flight_mode: [AtomicUsize; 2],
    /// Set when no chunk was in flight at some moment since the last tick.
    idle_seen: AtomicBool,
    /// Raw bytes of the chunks the peer has received in full.
    delivered: AtomicU64,
    /// The chunk replies written since the last tick, in either mode: what
    /// the bytes on the wire carry, and what encoding them cost.
    sent: Mutex<Encoding>,
    /// Set when the foreground protection ([`BusyControl`]) held a chunk
    /// back since the last tick: the rate says nothing about the link.
    held_for_foreground: AtomicBool,
    compress: AtomicBool,
}

impl LinkMeter {
    fn new(budget: usize) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            budget: AtomicUsize::new(budget.max(1)),
            freed: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
            delivered_chunks: AtomicU64::new(0),
            in_flight_mode: Default::default(),
            idle_seen: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            sent: Mutex::default(),
            held_for_foreground: AtomicBool::new(false),
            compress: AtomicBool::new(false),
        }
    }

    /// Waits until fewer chunks than the budget are in flight, then counts
    /// one more. A chunk's encoding is chosen after this, so it follows
    /// what the link does now, not what it did when the request came.
    async fn admit(&self) {
        loop {
            let freed = self.freed.notified();
            let budget = self.budget.load(Ordering::Relaxed);
            let now = self.in_flight.load(Ordering::Relaxed);
            if now < budget {
                if self
                    .in_flight
                    .compare_exchange(now, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            let _waiting = Waiting::new(&self.waiting);
            freed.await;
        }
    }

    fn set_budget(&self, budget: usize) {
        if self.budget.swap(budget.max(1), Ordering::Relaxed) < budget {
            self.freed.notify_waiters();
        }
    }

    /// After [`LinkMeter::admit`]: the chunk is read in this mode.
    fn begin(&self, compressed: bool) {
        self.in_flight_mode[usize::from(compressed)].fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk left flight; the peer received `delivered` raw bytes of it
    /// (0 if it did not get the chunk).
    fn end(&self, delivered: u64, compressed: bool) {
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        if delivered > 0 {
            self.delivered_chunks.fetch_add(1, Ordering::Relaxed);
        }
        self.in_flight_mode[usize::from(compressed)].fetch_sub(1, Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_seen.store(true, Ordering::Relaxed);
        }
        self.freed.notify_waiters();
    }

    /// Whether the sender was saturated over a tick in which the chunks in
    /// flight were `samples`: requests are waiting for the budget, or the
    /// chunks in flight held steady, on average at least 3/4 of their peak
    /// (the follower asks again as soon as a chunk lands; one that is slow
    /// to ask lets them drain).
    fn saturated(&self, samples: &[usize]) -> bool {
        let peak = samples.iter().copied().max().unwrap_or(0);
        let sum: usize = samples.iter().sum();
        self.waiting.load(Ordering::Relaxed) > 0
            || (peak > 0 && sum * 4 >= peak * 3 * samples.len())
    }

    /// Whether chunks were in flight for the whole time since the last call.
    fn busy(&self) -> bool {
        !self.idle_seen.swap(false, Ordering::Relaxed) && self.in_flight.load(Ordering::Relaxed) > 0
    }

    pub fn compressing(&self) -> bool {
        self.compress.load(Ordering::Relaxed)
    }

    /// Whether chunks read in the other mode than `compressing` are still
    /// on their way: what arrives now does not measure the current mode.
    fn stale(&self, compressing: bool) -> bool {
        self.in_flight_mode[usize::from(!compressing)].load(Ordering::Relaxed) > 0
    }
}

/// Raw bytes, bytes sent and CPU seconds of encoded chunks.
#[derive(Debug, Default, Clone, Copy)]
struct Encoding {
    raw: u64,
    wire: u64,
    cpu_secs: f64,
}

impl std::ops::AddAssign for Encoding {
    fn add_assign(&mut self, o: Self) {
        self.raw += o.raw;
        self.wire += o.wire;
        self.cpu_secs += o.cpu_secs;
    }
}

/// One tick's look at a connection's [`LinkMeter`].
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    /// How long the tick took (0: one [`PROBE_TICK`]).
    secs: f64,
    /// Raw bytes of the chunks the peer received in full.
    delivered: u64,
    /// Raw bytes that left the socket, as [`WireMeter`] counts them.
    carried: u64,
    /// Chunks were in flight all along.
    busy: bool,
    /// As [`LinkMeter::saturated`].
    saturated: bool,
    /// Chunks of the other mode than the current one are still arriving.
    stale: bool,
    /// The chunk replies written in the tick.
    encoded: Encoding,
}

/// The raw bytes a connection carried per tick, from what left its socket:
/// the UDP bytes sent less those lost, scaled by the raw to encoded ratio
/// of the chunk replies written in the last few ticks.
///
/// Counting the raw bytes of the chunks that landed is too coarse for the
/// [`Prober`]'s raw phase: a follower's raw chunks in flight share the
/// link and land together, bursts of 16 chunks (32 MiB) that a 0.4 s
/// window catches whole or not at all. On a 1 Gbit/s link one seed in
/// three measured its raw rate that way at 190 MB/s, above the cap, and
/// never tried compression (`benches/link.sh`, db_bench data).
#[derive(Debug, Default)]
struct WireMeter {
    /// The connection's UDP bytes sent and lost at the last tick.
    tx: u64,
    lost: u64,
    /// The chunk replies written in the last [`WireMeter::WINDOW`] ticks.
    sent: VecDeque<Encoding>,
}

impl WireMeter {
    const WINDOW: usize = 5;

    /// One tick: the connection's totals so far, and the replies written
    /// since the last tick. Returns the raw bytes the tick carried.
    fn tick(&mut self, tx: u64, lost: u64, sent: Encoding) -> u64 {
        let wire = tx
            .saturating_sub(self.tx)
            .saturating_sub(lost.saturating_sub(self.lost));
        (self.tx, self.lost) = (tx.max(self.tx), lost.max(self.lost));
        if self.sent.len() == Self::WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back(sent);
        let (raw, encoded) = self
            .sent
            .iter()
            .fold((0u64, 0u64), |(r, w), e| (r + e.raw, w + e.wire));
        if encoded == 0 {
            return wire;
        }
        (wire as f64 * raw as f64 / encoded as f64) as u64
    }
}

/// Counts a waiter for as long as it waits (also when its future is
/// dropped mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Finds out, per connection, whether compressing for the network pays.
///
/// It measures the raw bytes delivered per second without compression
/// while the sender is saturated. Where that is below what the cores could
/// compress and the network is the bottleneck (see [`Prober::tick`]), it
/// compresses, and measures again. It keeps compressing when that delivers
/// more, or when what the compressed chunks showed (their ratio, and the
/// CPU time they took) predicts 10 % more and the measured rate is not
/// more than 10 % worse: on a seed of a few seconds, the compressed phase
/// also pays the first dictionary trials, and one sample of it is noisy.
/// (With a 10 % margin on the measured rate too, two trials in five of a
/// 1 Gbit/s seed of db_bench data dropped compression that made whole
/// seeds 1.3x faster.) Then it holds the verdict for [`Prober::HOLD`]
/// ticks and measures again.
#[derive(Debug)]
struct Prober {
    /// Raw bytes per second above which compression cannot pay.
    cap: f64,
    /// The cores' compression capacity that the model may use.
    cores: f64,
    phase: Phase,
    /// Busy ticks into the phase, and the raw bytes and seconds counted
    /// in it.
    ticks: u32,
    bytes: u64,
    secs: f64,
    /// Measured ticks in which the sender was saturated.
    saturated: u32,
    /// The chunks encoded for the network in the measured ticks.
    encoded: Encoding,
    raw_rate: f64,
    /// The trial under way started with the connection, from a host's
    /// remembered trial, rather than right after a raw phase.
    fresh_trial: bool,
    /// The last trial was dropped right after a raw phase: the next
    /// connection from the host should try again from its start.
    retry: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Measuring without compression.
    Raw,
    /// Measuring with compression.
    Compressed,
    /// Keeping the chosen mode for a while.
    Hold,
}

impl Prober {
    /// Ticks (of [`PROBE_TICK`]) to skip at a phase's start, once the
    /// previous mode's chunks have all arrived, then to measure. A seed
    /// starts raw: two ticks in, BBR's startup still overfilled a shaped
    /// 1 Gbit/s link, and the raw rate read 120-137 MB/s where the link
    /// carries 110.
    const SKIP: u32 = 4;
    const MEASURE: u32 = 4;
    /// The compressed trial measures a tick longer: its ticks swing more,
    /// with each file's level trial and a refill of the pipeline.
    const TRIAL_MEASURE: u32 = 5;
    const HOLD: u32 = 300;

    /// The ticks this phase measures (after [`Prober::SKIP`]).
    fn measure(&self) -> u32 {
        match self.phase {
            Phase::Compressed => Self::TRIAL_MEASURE,
            _ => Self::MEASURE,
        }
    }

    fn new(cores: u64) -> Self {
        Self {
            cap: cores as f64 * NET_LEVEL_SPEED / NET_MARGIN,
            cores: cores as f64 / NET_MARGIN,
            phase: Phase::Raw,
            ticks: 0,
            bytes: 0,
            secs: 0.0,
            saturated: 0,
            encoded: Encoding::default(),
            raw_rate: 0.0,
            fresh_trial: false,
            retry: false,
        }
    }

    /// A prober for a link whose verdict is already known (from the same
    /// host's last connection, `age` ago): it holds that mode for the rest
    /// of the verdict's hold, then measures again as usual.
    fn resume(cores: u64, v: &Verdict) -> Self {
        if v.trial {
            return Self {
                phase: Phase::Compressed,
                raw_rate: v.raw_rate,
                fresh_trial: true,
                ..Self::new(cores)
            };
        }
        let age = v.at.elapsed();
        let held = (age.as_millis() / PROBE_TICK.as_millis()).min(u128::from(Self::HOLD)) as u32;
        Self {
            phase: Phase::Hold,
            ticks: held,
            raw_rate: v.raw_rate,
            ..Self::new(cores)
        }
    }

    /// One tick. Returns whether to compress from now on.
    ///
    /// Compression is tried only where the network may be the bottleneck:
    /// the raw rate is below the cap *and* the sender was saturated in at
    /// least half the measured ticks (a follower that is slow to ask says
    /// nothing about the link). Saturation does not tell loopback from a
    /// link (a default follower's requests sit at the leader in both); the
    /// cap does, and the trial's rule guards the rest.
    fn tick(&mut self, sample: Sample, compressing: bool) -> bool {
        if self.phase == Phase::Hold {
            self.ticks += 1;
            if self.ticks >= Self::HOLD {
                self.start(Phase::Raw);
                return false;
            }
            return compressing;
        }
        if !sample.busy || sample.stale {
            // An idle sender says nothing about the link, and chunks of the
            // other mode say nothing about this one: start the phase over.
            let phase = self.phase;
            self.start(phase);
            return compressing;
        }
        self.ticks += 1;
        let measure = self.measure();
        if self.ticks > Self::SKIP {
            // Raw chunks, 16 of 2 MiB sharing a link, land in bursts that
            // a window catches whole or not at all: count what leaves the
            // socket. Compressed chunks are small on the wire and land
            // steadily, and the socket's bytes would need the ratio of
            // chunks yet to land: count those that did.
            self.bytes += match self.phase {
                Phase::Compressed => sample.delivered,
                _ => sample.carried,
            };
            self.secs += if sample.secs > 0.0 {
                sample.secs
            } else {
                PROBE_TICK.as_secs_f64()
            };
            self.saturated += u32::from(sample.saturated);
            self.encoded += sample.encoded;
        }
        if self.ticks < Self::SKIP + measure {
            return compressing;
        }
        let rate = self.bytes as f64 / self.secs.max(1e-3);
        let network_bound = rate < self.cap && self.saturated * 2 >= measure;
        tracing::debug!(phase = ?self.phase, rate = rate as u64, raw_rate = self.raw_rate as u64, saturated = self.saturated, "link measured");
        match self.phase {
            Phase::Raw if network_bound => {
                self.raw_rate = rate;
                self.start(Phase::Compressed);
                true
            }
            Phase::Raw => {
                self.start(Phase::Hold);
                false
            }
            Phase::Compressed => {
                let e = self.encoded;
                let ratio = e.raw as f64 / e.wire.max(1) as f64;
                let speed = e.raw as f64 / e.cpu_secs.max(1e-6);
                let predicted = (self.raw_rate * ratio).min(speed * self.cores);
                tracing::debug!(
                    ratio,
                    speed = speed as u64,
                    predicted = predicted as u64,
                    "compressed chunks"
                );
                // Within 10 % of raw, the chunks decide: they predict a
                // gain, or they halve what crosses the network, which is
                // worth the leader's CPU when the speed is a wash (the
                // trial follows the raw phase, while the follower still
                // writes its raw chunks: one trial in ten of a 1 Gbit/s
                // db_bench seed read 0.95x raw at an 8x ratio, where whole
                // compressed seeds ran 1.4x faster).
                let close = e.raw > 0 && rate > self.raw_rate * 0.9;
                let better = rate > self.raw_rate
                    || (close && (predicted > self.raw_rate * 1.1 || ratio >= 2.0));
                // A trial right after the raw phase starts while the
                // follower still writes the raw chunks, on cores it may
                // share with the leader; one in three of a 1 Gbit/s
                // db_bench seed's read 0.8x raw where whole compressed
                // seeds ran 1.4x faster. Dropped there, it gets one more
                // try from the start of the host's next connection.
                self.retry = !better && !self.fresh_trial && ratio >= 2.0;
                self.fresh_trial = false;
                self.start(Phase::Hold);
                better
            }
            Phase::Hold => compressing,
        }
    }

    fn start(&mut self, phase: Phase) {
        self.phase = phase;
        self.ticks = 0;
        self.bytes = 0;
        self.secs = 0.0;
        self.saturated = 0;
        self.encoded = Encoding::default();
    }
}

/// How often a connection's [`Prober`] looks at its [`LinkMeter`].
const PROBE_TICK: Duration = Duration::from_millis(100);

/// The fewest chunks a connection may have in flight: what a follower asks
/// for at once by default (`ferry seed --parallel`). Fewer starved lossy
/// long paths, where a chunk waits for its retransmissions: with a floor
/// of 8, a seed at 1 % loss and 150 ms took 10.0 s instead of 7.3 s.
const MIN_BUDGET: usize = 16;
/// What is in flight beyond the round trip, in seconds of the link's
/// recent peak rate.
const BUDGET_HEADROOM: f64 = 0.25;

/// How many chunks a connection may have in flight: a round trip plus
/// [`BUDGET_HEADROOM`] at the recent peak rate (raw bytes per second), in
/// chunks of `chunk_bytes`, within [`MIN_BUDGET`]..=`max`. The budget
/// keeps the link full, with room to speed up, while bounding what is
/// queued for a follower that asks for many chunks at once: a chunk's
/// encoding is chosen when it enters flight, so the queue is how late a
/// change of mode takes effect (at 64 chunks of 2 MiB on a 1 Gbit/s link,
/// a second).
fn in_flight_budget(peak_rate: f64, rtt: Duration, chunk_bytes: f64, max: usize) -> usize {
    let want = peak_rate * (rtt.as_secs_f64() + BUDGET_HEADROOM) / chunk_bytes.max(1.0);
    (want.ceil() as usize).clamp(MIN_BUDGET.min(max), max.max(1))
}

/// Counters of the serving side.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub seeds_started: AtomicU64,
    pub seeds_completed: AtomicU64,
    pub chunks_served: AtomicU64,
    pub chunk_bytes_raw: AtomicU64,
    pub chunk_bytes_sent: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Connections refused because too many were still unauthenticated.
    pub refused_unauthenticated: AtomicU64,
    /// Chunk replies written and not yet received in full by their peer.
    pub chunks_on_the_wire: AtomicU64,
    /// The most chunk replies that were on the wire at once.
    pub chunks_on_the_wire_peak: AtomicU64,
}

/// Counts a chunk reply as on the wire while it lives.
struct OnTheWire<'a>(&'a ServerStats);

impl<'a> OnTheWire<'a> {
    fn new(stats: &'a ServerStats) -> Self {
        let now = stats.chunks_on_the_wire.fetch_add(1, Ordering::Relaxed) + 1;
        stats
            .chunks_on_the_wire_peak
            .fetch_max(now, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for OnTheWire<'_> {
    fn drop(&mut self) {
        self.0.chunks_on_the_wire.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handler for streams that are not part of seeding (replication).
pub trait StreamHandler: Send + Sync + 'static {
    /// Called for an authenticated stream whose first frame is `first`.
    fn handle(
        self: Arc<Self>,
        peer: Peer,
        first: Frame,
        send: SendStream,
        recv: RecvStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Where seed checkpoints come from. The store is the real source; tests
/// use others to serve files of chosen sizes.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Takes a checkpoint and builds its manifest (blocking).
    fn take(&self) -> Result<(CheckpointInfo, Manifest), ferry_engine::Error>;
    /// Deletes a checkpoint no seed needs any more (blocking).
    fn release(&self, cp: &CheckpointInfo);
    /// The oldest checkpoint sequence a follower seeded now could still
    /// catch up from (blocking); older cached checkpoints are not reused.
    fn oldest_catchable(&self) -> ferry_engine::Seq {
        0
    }
}

impl SnapshotSource for Store {
    fn take(&self) -> Result<(CheckpointInfo, Manifest), ferry_engine::Error> {
        let info = self.checkpoint_tagged(SEED_TAG)?;
        match self.manifest(&info) {
            Ok((manifest, stats)) => {
                tracing::info!(checkpoint = %info.name, seq = info.seq, hashed_files = stats.files_hashed, cached_files = stats.cache_hits, "checkpoint ready");
                Ok((info, manifest))
            }
            Err(e) => {
                let _ = self.delete_checkpoint(&info.name);
                Err(e)
            }
        }
    }

    fn release(&self, cp: &CheckpointInfo) {
        if let Err(e) = self.delete_checkpoint(&cp.name) {
            tracing::warn!(checkpoint = %cp.name, error = %e, "could not delete a seed checkpoint");
        }
    }

    fn oldest_catchable(&self) -> ferry_engine::Seq {
        // The WAL must still hold the batch right after the checkpoint.
        let latest = self.latest_seq();
        match self.oldest_wal_seq() {
            Ok(Some(oldest)) => oldest.saturating_sub(1).min(latest),
            _ => latest,
        }
    }
}

/// An authenticated peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub node_id: String,
    /// The name in the peer's client certificate, when it presented one:
    /// what a renewal is issued for and what a revocation names.
    pub cert_name: Option<String>,
    pub role: Role,
    pub conn: Connection,
}

/// The serving side of a node.
pub struct Server {
    store: Store,
    auth: NodeAuth,
    opts: ServeOptions,
    registry: Registry,
    limiter: Option<RateLimiter>,
    /// One permit per core for chunks compressed for the network: up to
    /// 64 chunks may be in flight, and more compressions at once than
    /// cores only slice the cores' caches among them. (One A/B run of
    /// `benches/link.sh` on db_bench data: 1.04x and 1.06x `rsync -z`
    /// with it, 0.99x without; within this machine's noise.)
    encoders: Semaphore,
    /// Seed bandwidth while the store takes writes, steered by their
    /// latency (see [`BusyControl`]).
    busy: Option<BusyControl>,
    /// The store's sequence when last seen, and when it last moved.
    activity: Mutex<(u64, Instant)>,
    pub stats: ServerStats,
    streams: Mutex<Option<Arc<dyn StreamHandler>>>,
    info: Mutex<Option<InfoProvider>>,
    links: LinkMemory,
}

/// What the leader learned about its recent peers' links, by host: a new
/// connection from the same host within the verdict's hold (a reconnect
/// after a blackout, the next seed) starts in the mode the last one chose
/// instead of measuring from raw again, which costs most of a second of a
/// 1 Gbit/s link.
#[derive(Debug, Default)]
struct LinkMemory {
    by_host: Mutex<HashMap<IpAddr, Verdict>>,
}

#[derive(Debug, Clone, Copy)]
struct Verdict {
    compress: bool,
    raw_rate: f64,
    /// The raw phase found the network the bottleneck, and the connection
    /// ended before the compressed trial did: the next one tries
    /// compression at once, or seeds of a few seconds never finish a trial.
    trial: bool,
    at: Instant,
}

impl LinkMemory {
    /// How long a verdict is trusted: as long as a connection holds one.
    const TTL: Duration =
        Duration::from_millis(PROBE_TICK.as_millis() as u64 * Prober::HOLD as u64);
    /// The most hosts remembered.
    const MAX: usize = 1024;

    fn recall(&self, host: IpAddr) -> Option<Verdict> {
        self.by_host
            .lock()
            .get(&host)
            .filter(|v| v.at.elapsed() < Self::TTL)
            .copied()
    }

    fn remember(&self, host: IpAddr, compress: bool, raw_rate: f64) {
        self.insert(host, compress, raw_rate, false);
    }

    /// The raw phase measured `raw_rate` and the compressed trial starts.
    fn remember_trial(&self, host: IpAddr, raw_rate: f64) {
        self.insert(host, true, raw_rate, true);
    }

    fn insert(&self, host: IpAddr, compress: bool, raw_rate: f64, trial: bool) {
        let mut m = self.by_host.lock();
        m.insert(
            host,
            Verdict {
                compress,
                raw_rate,
                trial,
                at: Instant::now(),
            },
        );
        if m.len() > Self::MAX {
            if let Some(oldest) = m.iter().min_by_key(|(_, v)| v.at).map(|(h, _)| *h) {
                m.remove(&oldest);
            }
        }
    }
}

/// What a node answers to `Probe`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node leads and takes writes (a fenced leader does not).
    pub leading: bool,
    pub latest_seq: ferry_engine::Seq,
    /// Its replication history, oldest term first (a follower's copy of
    /// its leader's).
    pub history: Option<ferry_engine::History>,
}

impl NodeInfo {
    fn to_frame(&self) -> Frame {
        Frame::NodeInfo {
            leading: self.leading,
            latest_seq: self.latest_seq,
            terms: self
                .history
                .as_ref()
                .map(|h| h.terms.iter().map(|t| (t.id.0, t.start)).collect())
                .unwrap_or_default(),
        }
    }

    /// Reads a `NodeInfo` frame.
    pub fn from_frame(f: Frame) -> Option<Self> {
        let Frame::NodeInfo {
            leading,
            latest_seq,
            terms,
        } = f
        else {
            return None;
        };
        let history = (!terms.is_empty()).then(|| ferry_engine::History {
            terms: terms
                .into_iter()
                .map(|(id, start)| ferry_engine::Term {
                    id: ferry_engine::HistoryId(id),
                    start,
                })
                .collect(),
        });
        Some(Self {
            leading,
            latest_seq,
            history,
        })
    }
}

/// Tells a prober what this node is (the daemon knows its role).
pub type InfoProvider = Arc<dyn Fn() -> NodeInfo + Send + Sync>;

impl Server {
    pub fn new(store: Store, auth: NodeAuth, opts: ServeOptions) -> Arc<Self> {
        Self::with_source(store.clone(), Arc::new(store), auth, opts)
    }

    /// A server whose seeds come from `source` instead of the store.
    pub fn with_source(
        store: Store,
        source: Arc<dyn SnapshotSource>,
        auth: NodeAuth,
        opts: ServeOptions,
    ) -> Arc<Self> {
        let limiter = opts.max_rate.map(RateLimiter::new);
        let busy = opts
            .busy_max_rate
            .map(|c| BusyControl::new(c, opts.busy_slowdown_pct));
        let idle_since = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        let activity = Mutex::new((store.latest_seq(), idle_since));
        Arc::new(Self {
            busy,
            activity,
            registry: Registry::new(source),
            store,
            auth,
            opts,
            limiter,
            encoders: Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
            stats: ServerStats::default(),
            streams: Mutex::new(None),
            info: Mutex::new(None),
            links: LinkMemory::default(),
        })
    }

    /// Whether the store's sequence moved in the last half second.
    fn taking_writes(&self) -> bool {
        let seq = self.store.latest_seq();
        let mut a = self.activity.lock();
        if seq != a.0 {
            *a = (seq, Instant::now());
        }
        a.1.elapsed() < Duration::from_millis(500)
    }

    /// Installs the handler for replication streams.
    pub fn set_stream_handler(&self, h: Arc<dyn StreamHandler>) {
        *self.streams.lock() = Some(h);
    }

    /// The seed rate the busy control allows now (bytes per second), if
    /// seeds yield to the foreground on this node.
    pub fn busy_rate(&self) -> Option<f64> {
        self.busy.as_ref().map(|b| b.limiter.rate())
    }

    /// Installs what `Probe` answers; without it the node reports that it
    /// does not lead, with its sequence and no history.
    pub fn set_info_provider(&self, f: InfoProvider) {
        *self.info.lock() = Some(f);
    }

    fn info(&self) -> NodeInfo {
        let provider = self.info.lock().clone();
        match provider {
            Some(f) => f(),
            None => NodeInfo {
                leading: false,
                latest_seq: self.store.latest_seq(),
                history: None,
            },
        }
    }

    /// The fault injection switches (tests only arm them).
    #[cfg(feature = "faults")]
    pub fn faults(&self) -> Arc<Faults> {
        Arc::clone(&self.opts.faults)
    }

    /// Seeds in progress (checkpoints leased).
    pub fn active_seeds(&self) -> usize {
        self.registry
            .inner
            .lock()
            .held
            .iter()
            .map(|h| h.users)
            .sum()
    }

    /// Accepts connections until the endpoint closes.
    pub async fn run(self: Arc<Self>, endpoint: Endpoint) {
        // Checkpoints left by a previous run serve no seed any more.
        if let Ok(cps) = self.store.checkpoints() {
            for cp in cps.into_iter().filter(|c| c.name.ends_with(SEED_TAG)) {
                let _ = self.store.delete_checkpoint(&cp.name);
            }
        }
        // The reaper holds only a weak handle, and is aborted when `run` ends
        // or is itself aborted, so it never keeps the store open.
        let _reaper = AbortOnDrop(tokio::spawn({
            let this = Arc::downgrade(&self);
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(this) = this.upgrade() else { return };
                    this.registry.reap(this.opts.checkpoint_grace).await;
                }
            }
        }));
        let _steering = AbortOnDrop(tokio::spawn({
            let this = Arc::downgrade(&self);
            async move {
                loop {
                    tokio::time::sleep(BusyControl::TICK).await;
                    let Some(this) = this.upgrade() else { return };
                    if let Some(b) = &this.busy {
                        let seeding = this.active_seeds() > 0 && this.taking_writes();
                        b.tick(this.store.take_write_latency(), seeding);
                    }
                }
            }
        }));
        let unauthenticated = Arc::new(Semaphore::new(self.opts.max_unauthenticated.max(1)));
        while let Some(incoming) = endpoint.accept().await {
            // An unauthenticated peer gets a slot, a small receive window
            // and one stream, and nothing more until its Hello checks out.
            let Ok(slot) = Arc::clone(&unauthenticated).try_acquire_owned() else {
                self.stats
                    .refused_unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %incoming.remote_address(), "refused: too many unauthenticated connections");
                incoming.refuse();
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let peer = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        if let Err(e) = this.serve_connection(conn, slot).await {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "handshake failed"),
                }
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        conn: Connection,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), WireError> {
        let addr = conn.remote_address();
        let Ok(Ok((mut send, mut recv))) =
            tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
        else {
            conn.close((ErrorCode::Protocol as u32).into(), b"no hello");
            return Ok(());
        };
        // Before authentication only a Hello-sized frame is read: a peer
        // that claims a 60 MiB first frame is refused from the header.
        let hello = match tokio::time::timeout(
            Duration::from_secs(10),
            read_frame_within(&mut recv, MAX_HELLO_FRAME),
        )
        .await
        {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Err(WireError::FinishedEarly(0)),
            Ok(Err(e)) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %addr, error = %e, "refused before authentication");
                send_error(&mut send, ErrorCode::Protocol, e.to_string()).await;
                conn.close((ErrorCode::Protocol as u32).into(), b"bad hello");
                return Ok(());
            }
            Err(_) => {
                conn.close((ErrorCode::Protocol as u32).into(), b"hello timeout");
                return Ok(());
            }
        };
        // Both sides speak the lower of the two versions.
        let version = match &hello {
            Frame::Hello { version, .. } => (*version).min(PROTOCOL_VERSION),
            _ => PROTOCOL_VERSION,
        };
        let peer = match self.authenticate(&conn, hello) {
            Ok(p) => p,
            Err((code, msg)) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %addr, ?code, "refused: {msg}");
                send_error(&mut send, code, msg).await;
                // Let the error frame arrive before closing.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close((code as u32).into(), b"refused");
                return Ok(());
            }
        };
        tracing::info!(peer = %addr, node = %peer.node_id, role = ?peer.role, "peer authenticated");
        drop(slot);
        conn.set_receive_window(quinn::VarInt::from_u32(
            crate::endpoint::AUTHENTICATED_RECEIVE_WINDOW,
        ));
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
            crate::endpoint::AUTHENTICATED_STREAMS,
        ));
        write_frame(
            &mut send,
            &Frame::Welcome {
                version,
                node_id: self.opts.node_id.clone(),
                latest_seq: self.store.latest_seq(),
            },
        )
        .await?;

        let leases: Arc<Mutex<HashMap<u64, Lease>>> = Arc::default();
        let control = tokio::spawn(Arc::clone(&self).control_stream(
            peer.clone(),
            send,
            recv,
            Arc::clone(&leases),
        ));
        // A revocation (`ferry revoke`) cuts the peer's connection too, not
        // only its next one.
        let _revocation = {
            let (this, conn, names) = (
                Arc::clone(&self),
                conn.clone(),
                [Some(peer.node_id.clone()), peer.cert_name.clone()],
            );
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if names.iter().flatten().any(|n| this.auth.is_revoked(n)) {
                        tracing::warn!(peer = %conn.remote_address(), "closing the connection of a revoked node");
                        conn.close((ErrorCode::Unauthorized as u32).into(), b"revoked");
                        return;
                    }
                }
            }))
        };
        // Whether compression pays on this connection, found by trying.
        let max_in_flight = self.opts.max_chunks_in_flight;
        let link = Arc::new(LinkMeter::new(MIN_BUDGET.min(max_in_flight)));
        let _prober = {
            let (link, addr, conn, this) =
                (Arc::clone(&link), addr, conn.clone(), Arc::clone(&self));
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
            let mut p = match self.links.recall(addr.ip()) {
                Some(v) => {
                    tracing::debug!(peer = %addr, compress = v.compress, trial = v.trial, raw_rate = v.raw_rate as u64, "starting from this host's last link verdict");
                    link.compress.store(v.compress, Ordering::Relaxed);
                    Prober::resume(cores, &v)
                }
                None => Prober::new(cores),
            };
            AbortOnDrop(tokio::spawn(async move {
                let mut last = 0;
                let mut wire = WireMeter::default();
                let mut ticked = Instant::now();
                // The rates of the last few ticks, for the in-flight budget.
                let mut rates = VecDeque::from([0.0; 5]);
                let mut in_flight = [0; 10];
                loop {
                    if link.in_flight.load(Ordering::Relaxed) == 0 {
                        // No seed on this connection (a replication stream,
                        // or between seeds): one wake-up a tick, not ten.
                        tokio::time::sleep(PROBE_TICK).await;
                        in_flight = [0; 10];
                    } else {
                        for n in in_flight.iter_mut() {
                            tokio::time::sleep(PROBE_TICK / 10).await;
                            *n = link.in_flight.load(Ordering::Relaxed);
                        }
                    }
                    let now = link.delivered.load(Ordering::Relaxed);
                    // A tick of ten short sleeps runs 10-50 % over
                    // PROBE_TICK: rates divide by the time that passed.
                    let secs = ticked.elapsed().as_secs_f64();
                    ticked = Instant::now();
                    let was = link.compressing();
                    // Held back for the foreground's sake, the sender looks
                    // network-bound on any link: compressing would then
                    // spend the CPU the writes need. Such ticks measure
                    // nothing (on loopback under a write load, a trial
                    // kept compression and the leader's CPU per GB seeded
                    // went from 10 to 15.6 s).
                    let busy =
                        link.busy() & !link.held_for_foreground.swap(false, Ordering::Relaxed);
                    let phase = p.phase;
                    let stats = conn.stats();
                    let sent = std::mem::take(&mut *link.sent.lock());
                    let carried = wire.tick(stats.udp_tx.bytes, stats.path.lost_bytes, sent);
                    let sample = Sample {
                        secs,
                        delivered: now - last,
                        carried,
                        busy,
                        saturated: link.saturated(&in_flight),
                        stale: link.stale(was),
                        encoded: sent,
                    };
                    let next = p.tick(sample, was);
                    match (phase, p.phase) {
                        (Phase::Raw, Phase::Compressed) => {
                            this.links.remember_trial(addr.ip(), p.raw_rate)
                        }
                        (Phase::Compressed, Phase::Hold) if p.retry => {
                            this.links.remember_trial(addr.ip(), p.raw_rate)
                        }
                        (Phase::Raw | Phase::Compressed, Phase::Hold) => {
                            this.links.remember(addr.ip(), next, p.raw_rate)
                        }
                        _ => {}
                    }
                    rates.pop_front();
                    rates.push_back((now - last) as f64 / secs.max(1e-3));
                    tracing::trace!(peer = %addr, carried, delivered = now - last, busy, compressing = next, in_flight = link.in_flight.load(Ordering::Relaxed), budget = link.budget.load(Ordering::Relaxed), "link tick");
                    last = now;
                    if busy {
                        let chunks = link.delivered_chunks.load(Ordering::Relaxed).max(1);
                        let chunk_bytes = now as f64 / chunks as f64;
                        let peak = rates.iter().copied().fold(0.0, f64::max);
                        if chunk_bytes > 0.0 {
                            link.set_budget(in_flight_budget(
                                peak,
                                conn.rtt(),
                                chunk_bytes,
                                max_in_flight,
                            ));
                        }
                    }
                    if next != was {
                        tracing::info!(peer = %addr, compress = next, raw_rate = p.raw_rate as u64, "chunk compression for this peer changed");
                        link.compress.store(next, Ordering::Relaxed);
                    }
                }
            }))
        };
        let chunk_slots = Arc::new(Semaphore::new(self.opts.max_chunks_in_flight));
        loop {
            let (send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let this = Arc::clone(&self);
            let leases = Arc::clone(&leases);
            let slots = Arc::clone(&chunk_slots);
            let peer = peer.clone();
            let link = Arc::clone(&link);
            tokio::spawn(async move {
                let first = match read_frame(&mut recv).await {
                    Ok(Some(f)) => f,
                    _ => return,
                };
                match first {
                    Frame::ChunkRequest {
                        session,
                        file,
                        chunk,
                        dict,
                    } => {
                        let Ok(_permit) = slots.acquire().await else {
                            return;
                        };
                        let cp = leases.lock().get(&session).map(|l| Arc::clone(&l.cp));
                        link.admit().await;
                        let mode = link.compressing();
                        let network = mode.then_some(NetworkBound { dict });
                        link.begin(mode);
                        let delivered = this
                            .serve_chunk(cp, file, chunk, send, network, &link)
                            .await;
                        link.end(delivered, mode);
                    }
                    other => {
                        let handler = this.streams.lock().clone();
                        match handler {
                            Some(h) => h.handle(peer, other, send, recv).await,
                            None => {
                                let mut send = send;
                                send_error(
                                    &mut send,
                                    ErrorCode::Unavailable,
                                    format!("{} is not served here", other.name()),
                                )
                                .await
                            }
                        }
                    }
                }
            });
        }
        control.abort();
        leases.lock().clear();
        let stats = conn.stats();
        tracing::debug!(
            peer = %addr,
            mtu = stats.path.current_mtu,
            sent_packets = stats.path.sent_packets,
            lost_packets = stats.path.lost_packets,
            congestion_events = stats.path.congestion_events,
            udp_tx_datagrams = stats.udp_tx.datagrams,
            udp_tx_bytes = stats.udp_tx.bytes,
            udp_rx_datagrams = stats.udp_rx.datagrams,
            acks_received = stats.frame_rx.acks,
            "connection stats"
        );
        Ok(())
    }

    fn authenticate(&self, conn: &Connection, hello: Frame) -> Result<Peer, (ErrorCode, String)> {
        let Frame::Hello {
            version,
            role,
            node_id,
            cluster,
            proof,
        } = hello
        else {
            return Err((ErrorCode::Protocol, "expected Hello".into()));
        };
        // A newer peer speaks this node's version; an older one must be at
        // least the oldest this node still speaks.
        if version < MIN_PROTOCOL_VERSION {
            return Err((ErrorCode::Version, format!("protocol version {version} is not supported (this node speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})")));
        }
        if cluster != self.auth.cluster() {
            return Err((
                ErrorCode::WrongCluster,
                "the join token or CA belongs to another cluster".into(),
            ));
        }
        // A client certificate was verified against the cluster CA by rustls.
        let cert_name = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().and_then(crate::auth::common_name));
        let by_cert = conn.peer_identity().is_some();
        if let Some(name) = [cert_name.as_deref(), Some(node_id.as_str())]
            .into_iter()
            .flatten()
            .find(|n| self.auth.is_revoked(n))
        {
            return Err((
                ErrorCode::Unauthorized,
                format!("node {name} is revoked here"),
            ));
        }
        let by_token = match (self.auth.current_secret(), exported_keying_material(conn)) {
            (Some(secret), Some(exported)) => check_proof(&secret, &exported, &node_id, &proof),
            _ => false,
        };
        if !(by_cert || by_token) {
            return Err((
                ErrorCode::Unauthorized,
                "authentication failed: wrong or missing join token".into(),
            ));
        }
        Ok(Peer {
            addr: conn.remote_address(),
            node_id,
            cert_name,
            role,
            conn: conn.clone(),
        })
    }

    async fn control_stream(
        self: Arc<Self>,
        peer: Peer,
        mut send: SendStream,
        mut recv: RecvStream,
        leases: Arc<Mutex<HashMap<u64, Lease>>>,
    ) {
        loop {
            let frame = match read_frame(&mut recv).await {
                Ok(Some(f)) => f,
                _ => return,
            };
            let reply = match frame {
                Frame::ManifestRequest => {
                    let who = peer.cert_name.as_deref().unwrap_or(&peer.node_id);
                    match self.registry.acquire(self.opts.checkpoint_reuse, who).await {
                        Ok(lease) => {
                            self.stats.seeds_started.fetch_add(1, Ordering::Relaxed);
                            let f = Frame::ManifestReply {
                                session: lease.cp.id,
                                manifest: lease.cp.encoded.clone(),
                            };
                            tracing::info!(
                                seq = lease.cp.manifest.seq,
                                files = lease.cp.manifest.files.len(),
                                bytes = lease.cp.manifest.total_bytes(),
                                "serving seed"
                            );
                            leases.lock().insert(lease.cp.id, lease);
                            f
                        }
                        Err(e @ ferry_engine::Error::Corrupt { .. }) => {
                            metrics::counter!("ferry_corrupt_files_total").increment(1);
                            tracing::error!(error = %e, "refusing to ship a corrupt file; repair or re-seed this node");
                            Frame::Error {
                                code: ErrorCode::Corrupt,
                                message: format!("this node's database is corrupt at rest, so it ships nothing: {e}"),
                            }
                        }
                        Err(e) => Frame::Error {
                            code: ErrorCode::Internal,
                            message: format!("checkpoint failed: {e}"),
                        },
                    }
                }
                Frame::CertRequest { .. } if peer.role != Role::Follower => Frame::Error {
                    code: ErrorCode::Unauthorized,
                    message: format!(
                        "only followers enroll; a {:?} gets no certificate",
                        peer.role
                    ),
                },
                Frame::CertRequest { csr_pem } => match self
                    .auth
                    .sign_csr(&csr_pem, peer.cert_name.as_deref().unwrap_or(&peer.node_id))
                {
                    Ok(cert_pem) => {
                        tracing::info!(node = %peer.node_id, "signed a certificate for a joining node");
                        Frame::CertReply {
                            cert_pem,
                            ca_pem: self.auth.ca_pem(),
                        }
                    }
                    Err(e) => Frame::Error {
                        code: ErrorCode::Unavailable,
                        message: format!("cannot sign a certificate here: {e}"),
                    },
                },
                Frame::Probe => self.info().to_frame(),
                Frame::SeedDone { session } => {
                    if leases.lock().remove(&session).is_some() {
                        self.stats.seeds_completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Frame::SeedDoneAck
                }
                other => {
                    send_error(
                        &mut send,
                        ErrorCode::Protocol,
                        format!("unexpected {} on the control stream", other.name()),
                    )
                    .await;
                    return;
                }
            };
            if write_frame(&mut send, &reply).await.is_err() {
                return;
            }
        }
    }

    async fn serve_chunk(
        &self,
        cp: Option<Arc<SeedCheckpoint>>,
        file: u32,
        chunk: u32,
        mut send: SendStream,
        network: Option<NetworkBound>,
        link: &LinkMeter,
    ) -> u64 {
        let Some(cp) = cp else {
            send_error(
                &mut send,
                ErrorCode::NotFound,
                "no such seed session on this connection",
            )
            .await;
            return 0;
        };
        let compression = self.opts.compression;
        // One chunk compressed per core at a time (for the network, or
        // always by the operator's choice). The permit covers the encoding
        // only, never the sending: held until the peer had the chunk, it
        // let two chunks be in flight on a long path.
        let encoder = match (network, compression) {
            (Some(_), _) | (_, Compression::Always { .. }) => self.encoders.acquire().await.ok(),
            _ => None,
        };
        let read = crate::priority::spawn_blocking(self.opts.seed_priority, move || {
            cp.read_chunk(file as usize, chunk as usize, compression, network)
        })
        .await;
        drop(encoder);
        #[cfg_attr(not(feature = "faults"), allow(unused_mut))]
        let Encoded {
            codec,
            raw_len,
            mut data,
            cpu_secs,
        } = match read {
            Ok(Ok(r)) => r,
            Ok(Err((code, msg))) => {
                send_error(&mut send, code, msg).await;
                return 0;
            }
            Err(e) => {
                send_error(&mut send, ErrorCode::Internal, e.to_string()).await;
                return 0;
            }
        };
        #[cfg(feature = "faults")]
        if self
            .opts
            .faults
            .corrupt_chunks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
            && !data.is_empty()
        {
            let mut v = data.to_vec();
            v[0] ^= 0xff;
            data = Bytes::from(v);
        }
        if let Some(l) = &self.limiter {
            l.acquire(data.len() as u64, || {}).await;
        }
        if let (Some(b), true) = (&self.busy, self.taking_writes()) {
            // Marked at every look while held, not once released: a tick
            // in which a chunk only waited measured the foreground, not the
            // link.
            b.acquire(data.len() as u64, || {
                link.held_for_foreground.store(true, Ordering::Relaxed)
            })
            .await;
        }
        *link.sent.lock() += Encoding {
            raw: u64::from(raw_len),
            wire: data.len() as u64,
            cpu_secs,
        };
        self.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
        self.stats
            .chunk_bytes_raw
            .fetch_add(u64::from(raw_len), Ordering::Relaxed);
        self.stats
            .chunk_bytes_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let _wire = OnTheWire::new(&self.stats);
        if write_frame(
            &mut send,
            &Frame::ChunkReply {
                codec,
                raw_len,
                data,
            },
        )
        .await
        .is_ok()
            && send.finish().is_ok()
        {
            // Until the peer has the whole chunk, its bytes are queued on
            // this connection: the link meter counts the sender as busy.
            if send.stopped().await.is_ok() {
                return u64::from(raw_len);
            }
        }
        0
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The suffix of checkpoints made for seeds (deleted by the server).
pub const SEED_TAG: &str = "-seed";

/// A checkpoint with its manifest, open for chunk reads.
pub struct SeedCheckpoint {
    pub id: u64,
    pub info: CheckpointInfo,
    pub manifest: Manifest,
    encoded: Bytes,
    compress: Vec<OnceLock<bool>>,
    /// Per file, in the network-bound mode: whether its first chunk shrank.
    net_compress: Vec<OnceLock<bool>>,
    /// Per file: the level chosen for chunks compressed with a dictionary.
    dict_level: Vec<OnceLock<i32>>,
    dicts: EncoderDicts,
}

impl SeedCheckpoint {
    fn read_chunk(
        &self,
        file: usize,
        chunk: usize,
        compression: Compression,
        network: Option<NetworkBound>,
    ) -> Result<Encoded, (ErrorCode, String)> {
        SETUP_SECS.with(|s| s.set(0.0));
        let started = thread_cpu_secs();
        let (codec, raw_len, data) = self.encode_chunk(file, chunk, compression, network)?;
        let setup = SETUP_SECS.with(|s| s.get());
        Ok(Encoded {
            codec,
            raw_len,
            data,
            cpu_secs: (thread_cpu_secs() - started - setup).max(0.0),
        })
    }

    fn encode_chunk(
        &self,
        file: usize,
        chunk: usize,
        compression: Compression,
        network: Option<NetworkBound>,
    ) -> Result<(Codec, u32, Bytes), (ErrorCode, String)> {
        let entry = self
            .manifest
            .files
            .get(file)
            .ok_or((ErrorCode::NotFound, format!("no file {file}")))?;
        if chunk >= entry.chunks.len() {
            return Err((
                ErrorCode::NotFound,
                format!("no chunk {chunk} in {}", entry.name),
            ));
        }
        let (start, end) = entry.chunk_range(chunk, self.manifest.chunk_size);
        let path = self.info.path.join(entry.name.as_str());
        let buf = read_range(&path, start, end)
            .map_err(|e| (ErrorCode::Internal, format!("read {}: {e}", path.display())))?;
        let raw_len = buf.len() as u32;
        let (level, worth) = match compression {
            Compression::Off => return Ok((Codec::Raw, raw_len, Bytes::from(buf))),
            Compression::Always { level } => (level, true),
            Compression::Auto { .. } if network.is_some() => {
                // The network is the bottleneck: spend the cores on ratio.
                if self.net_compress[file].get() == Some(&false) {
                    return Ok((Codec::Raw, raw_len, Bytes::from(buf)));
                }
                let net = network.expect("matched is_some");
                let dict = net
                    .dict
                    .map(|d| d as usize)
                    .filter(|&d| d < entry.chunks.len() && d != chunk);
                let c = match dict {
                    Some(d) => self
                        .compress_with_dict(file, d, &buf)
                        .map(|c| (Codec::ZstdDict, c)),
                    None => None,
                }
                .or_else(|| {
                    zstd::bulk::compress(&buf, NET_LEVEL)
                        .ok()
                        .map(|c| (Codec::Zstd, c))
                });
                let saves = c
                    .as_ref()
                    .is_some_and(|(_, c)| (c.len() as u64) * 100 < u64::from(raw_len) * 95);
                // The dictionary chunk itself says nothing about how the
                // file's other chunks compress against it.
                if chunk != DICT_CHUNK as usize || entry.chunks.len() == 1 {
                    let _ = self.net_compress[file].set(saves);
                }
                return Ok(match c {
                    Some((codec, c)) if saves => (codec, raw_len, Bytes::from(c)),
                    _ => (Codec::Raw, raw_len, Bytes::from(buf)),
                });
            }
            Compression::Auto { level, min_ratio } => {
                let worth = *self.compress[file].get_or_init(|| {
                    let sample = &buf[..buf.len().min(256 * 1024)];
                    match zstd::bulk::compress(sample, level) {
                        Ok(c) => sample.len() as f32 >= c.len().max(1) as f32 * min_ratio,
                        Err(_) => false,
                    }
                });
                (level, worth)
            }
        };
        if worth {
            if let Ok(c) = zstd::bulk::compress(&buf, level) {
                if (c.len() as u64) * 100 < u64::from(raw_len) * 95 {
                    return Ok((Codec::Zstd, raw_len, Bytes::from(c)));
                }
            }
        }
        Ok((Codec::Raw, raw_len, Bytes::from(buf)))
    }
}

impl SeedCheckpoint {
    /// Compresses `buf`, a chunk of `file`, against the file's chunk `dict`
    /// (which the peer holds). The level is chosen per file, on its first
    /// such chunk: each of [`DICT_LEVELS`] is tried and timed, and a higher
    /// level wins when it at least doubles the ratio (the file repeats
    /// itself over distances the lower level's tables miss, and long
    /// matches are fast), or when it shrinks more at 80 % of the speed or
    /// better. The choice depends on the data only, not on the link, since
    /// the checkpoint's seeds share it: with the link in it, one seed over
    /// a slow path chose level 3 for realistic records (1.7x at 60 MB/s
    /// against 1.5x at 190 MB/s), and the next seeds over a 1 Gbit/s link
    /// ran at 61 MB/s instead of 109. `None` when the dictionary cannot be
    /// read.
    fn compress_with_dict(&self, file: usize, dict: usize, buf: &[u8]) -> Option<Vec<u8>> {
        let entry = &self.manifest.files[file];
        let load = |level: i32| {
            self.dicts
                .get_or_load((file, dict, level), || {
                    setup(|| {
                        let (start, end) = entry.chunk_range(dict, self.manifest.chunk_size);
                        read_range(&self.info.path.join(entry.name.as_str()), start, end)
                            .map(|d| zstd::dict::EncoderDictionary::copy(&d, level))
                    })
                })
                .ok()
        };
        let compress = |d: &zstd::dict::EncoderDictionary<'static>| {
            zstd::bulk::Compressor::with_prepared_dictionary(d)
                .and_then(|mut c| c.compress(buf))
                .ok()
        };
        // The first chunk of the file to get here runs the trial; chunks
        // that arrive meanwhile wait for its verdict.
        let mut tried = None;
        let level = *self.dict_level[file].get_or_init(|| {
            // (speed, ratio, level, output)
            let mut best: Option<(f64, f64, i32, Vec<u8>)> = None;
            let mut trial_secs = 0.0;
            for level in DICT_LEVELS {
                let Some(d) = load(level) else { break };
                // CPU time, not wall time: the other chunks in flight
                // share the cores.
                let started = thread_cpu_secs();
                let Some(c) = compress(&d) else { break };
                let secs = thread_cpu_secs() - started;
                trial_secs += secs;
                let speed = buf.len() as f64 / secs.max(1e-6);
                let ratio = buf.len() as f64 / c.len().max(1) as f64;
                tracing::debug!(file = %entry.name, level, ratio, speed, "dictionary level trial");
                if best
                    .as_ref()
                    .is_none_or(|b| ratio >= b.1 * 2.0 || (ratio > b.1 && speed >= b.0 * 0.8))
                {
                    best = Some((speed, ratio, level, c));
                }
            }
            let Some((speed, _, level, c)) = best else {
                return DICT_LEVELS[0];
            };
            // The levels that lost cost setup, not this chunk.
            let chosen = buf.len() as f64 / speed;
            SETUP_SECS.with(|s| s.set(s.get() + (trial_secs - chosen).max(0.0)));
            tried = Some(c);
            level
        });
        match tried {
            Some(c) => Some(c),
            None => compress(&*load(level)?),
        }
    }
}

thread_local! {
    /// CPU seconds of one-off work (loading a dictionary, trying the
    /// levels that lost) in the chunk being encoded on this thread. The
    /// [`Prober`] predicts from what chunks cost once that is done: with
    /// it, the trial's chunks of a 1 Gbit/s seed of db_bench data measured
    /// 92-134 MB/s a core, and compression that made the seed 1.5x faster
    /// was dropped.
    static SETUP_SECS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Runs `f`, counting its CPU time as setup (see [`SETUP_SECS`]).
fn setup<T>(f: impl FnOnce() -> T) -> T {
    let started = thread_cpu_secs();
    let r = f();
    let secs = thread_cpu_secs() - started;
    SETUP_SECS.with(|s| s.set(s.get() + secs));
    r
}

/// The CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// A chunk read and encoded for sending, and the CPU time that took.
struct Encoded {
    codec: Codec,
    raw_len: u32,
    data: Bytes,
    cpu_secs: f64,
}

/// What a chunk request's connection knows when the network is its
/// bottleneck.
#[derive(Debug, Clone, Copy)]
struct NetworkBound {
    /// The chunk of the same file the peer offers as a dictionary.
    dict: Option<u32>,
}

/// The zstd levels a file's chunks are compressed at against a dictionary
/// (see [`SeedCheckpoint::compress_with_dict`]). Measured on 2 MiB chunks
/// of db_bench SSTs, with the file's first chunk as the dictionary: level 1
/// 1.5x at 260 MB/s, level 3 9.6x at 270 MB/s; on realistic records level
/// 1 1.5x at 190 MB/s, level 3 1.7x at 60 MB/s (one core).
const DICT_LEVELS: [i32; 2] = [1, 3];

/// Encoder dictionaries a checkpoint keeps: (file, chunk, level).
type EncoderDicts = DictCache<(usize, usize, i32), zstd::dict::EncoderDictionary<'static>>;

struct Held {
    cp: Arc<SeedCheckpoint>,
    users: usize,
    created: Instant,
    idle_since: Option<Instant>,
    /// The peers (certificate name, or node id) that were handed it, at
    /// most [`Registry::PEERS_KEPT`]: one of them asking again is resuming.
    peers: Vec<String>,
}

struct RegistryInner {
    held: Vec<Held>,
}

/// Remembers `peer`, the oldest forgotten past [`Registry::PEERS_KEPT`].
fn note_peer(peers: &mut Vec<String>, peer: &str) {
    if !peers.iter().any(|p| p == peer) {
        if peers.len() >= Registry::PEERS_KEPT {
            peers.remove(0);
        }
        peers.push(peer.to_owned());
    }
}

/// The checkpoints that seeds use, with their users.
struct Registry {
    source: Arc<dyn SnapshotSource>,
    inner: Arc<Mutex<RegistryInner>>,
    creating: tokio::sync::Mutex<()>,
}

/// One seed's use of a checkpoint; released on drop.
struct Lease {
    cp: Arc<SeedCheckpoint>,
    inner: Arc<Mutex<RegistryInner>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.inner.lock();
        if let Some(h) = g.held.iter_mut().find(|h| h.cp.id == self.cp.id) {
            h.users = h.users.saturating_sub(1);
            if h.users == 0 {
                h.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Registry {
    fn new(source: Arc<dyn SnapshotSource>) -> Self {
        Self {
            source,
            inner: Arc::new(Mutex::new(RegistryInner { held: Vec::new() })),
            creating: tokio::sync::Mutex::new(()),
        }
    }

    /// Peers remembered per checkpoint.
    const PEERS_KEPT: usize = 64;

    /// The newest held checkpoint that `peer` was handed before, whatever
    /// its age, or else the newest younger than `reuse`; either only if
    /// the WAL still reaches back to it.
    fn try_reuse(&self, reuse: Duration, oldest: ferry_engine::Seq, peer: &str) -> Option<Lease> {
        let mut g = self.inner.lock();
        let newest = |g: &RegistryInner, pick: &dyn Fn(&Held) -> bool| {
            g.held
                .iter()
                .enumerate()
                .filter(|(_, h)| h.cp.info.seq >= oldest && pick(h))
                .max_by_key(|(_, h)| h.created)
                .map(|(i, _)| i)
        };
        let i = newest(&g, &|h| h.peers.iter().any(|p| p == peer))
            .or_else(|| newest(&g, &|h| h.created.elapsed() < reuse))?;
        let h = &mut g.held[i];
        h.users += 1;
        h.idle_since = None;
        note_peer(&mut h.peers, peer);
        Some(Lease {
            cp: Arc::clone(&h.cp),
            inner: Arc::clone(&self.inner),
        })
    }

    /// A checkpoint for `peer`'s seed: the one it was handed before if it
    /// is still held (a resume keeps every chunk it has), else one younger
    /// than `reuse` (followers joining together share it), else a new one.
    async fn acquire(&self, reuse: Duration, peer: &str) -> Result<Lease, ferry_engine::Error> {
        // A cached checkpoint the WAL no longer reaches past would send the
        // new follower straight into a re-seed: never hand it out again.
        let source = Arc::clone(&self.source);
        let oldest = tokio::task::spawn_blocking(move || source.oldest_catchable())
            .await
            .unwrap_or(u64::MAX);
        if let Some(l) = self.try_reuse(reuse, oldest, peer) {
            return Ok(l);
        }
        let _creating = self.creating.lock().await;
        if let Some(l) = self.try_reuse(reuse, oldest, peer) {
            return Ok(l);
        }
        let source = Arc::clone(&self.source);
        let cp =
            tokio::task::spawn_blocking(move || -> Result<SeedCheckpoint, ferry_engine::Error> {
                let (info, manifest) = source.take()?;
                let n = manifest.files.len();
                Ok(SeedCheckpoint {
                    id: rand::random(),
                    encoded: Bytes::from(manifest.encode()),
                    info,
                    manifest,
                    compress: (0..n).map(|_| OnceLock::new()).collect(),
                    net_compress: (0..n).map(|_| OnceLock::new()).collect(),
                    dict_level: (0..n).map(|_| OnceLock::new()).collect(),
                    dicts: DictCache::new(8),
                })
            })
            .await
            .map_err(|e| ferry_engine::Error::Malformed {
                what: "checkpoint task",
                reason: e.to_string(),
            })??;
        let cp = Arc::new(cp);
        self.inner.lock().held.push(Held {
            cp: Arc::clone(&cp),
            users: 1,
            created: Instant::now(),
            idle_since: None,
            peers: vec![peer.to_owned()],
        });
        Ok(Lease {
            cp,
            inner: Arc::clone(&self.inner),
        })
    }

    /// Deletes checkpoints no seed has used for `grace`.
    async fn reap(&self, grace: Duration) {
        let expired: Vec<Arc<SeedCheckpoint>> = {
            let mut g = self.inner.lock();
            let (gone, keep): (Vec<_>, Vec<_>) = g
                .held
                .drain(..)
                .partition(|h| h.users == 0 && h.idle_since.is_some_and(|t| t.elapsed() >= grace));
            g.held = keep;
            gone.into_iter().map(|h| h.cp).collect()
        };
        for cp in expired {
            let source = Arc::clone(&self.source);
            let info = cp.info.clone();
            drop(cp);
            let name = info.name.clone();
            let _ = tokio::task::spawn_blocking(move || source.release(&info)).await;
            tracing::info!(checkpoint = %name, "seed checkpoint released");
        }
    }
}

/// Foreground protection by feedback: while the store takes writes, seeds
/// get a bandwidth steered by two signals of the foreground's health, each
/// sampled every tick: the mean write latency against its idle baseline,
/// the median of its per-second means over the last 30 s without a seed
/// (above 1.15x by default, [`ServeOptions::busy_slowdown_pct`]: a
/// closed-loop writer at 1.25x runs at 80 % of its idle rate, and the
/// margin covers the ticks the control needs to react), and the host's
/// idle CPU (under 10 % means the seed's reading, compression and
/// encryption compete with the writes for CPU). Either cuts the seed rate
/// by a fifth, and so do a few writes (under [`BusyControl::MIN_WRITES`])
/// that slow: writes stalled behind a sync. Writes far over the threshold cut deeper, to the threshold's
/// share of their latency and at most by half. Any other tick in which the
/// limiter held the seed back raises it by a twentieth of the ceiling
/// (`busy_max_rate`), or by a quarter of that
/// within 15 % of the rate at which the last run of cuts began: latency
/// answers a tick or two late, and full steps there overshot into 30 ms
/// writes. A tick in which the seed took less than its rate (the follower
/// or the network held it up) leaves the rate as it was: it showed nothing
/// about a higher one. A seed that starts while the store takes writes
/// starts at a quarter of the ceiling and grows. So a seed takes what the
/// foreground leaves free and no more.
struct BusyControl {
    limiter: RateLimiter,
    ceiling: f64,
    /// Write latency over its idle baseline that counts as suffering
    /// (1.15 for a 15 % slowdown).
    slow: f64,
    /// Set when the limiter held a chunk back since the last tick: the
    /// seed wanted more than its rate.
    held: AtomicBool,
    state: Mutex<BusyState>,
}

#[derive(Default)]
struct BusyState {
    /// Mean write latency while no seed runs, nanoseconds (0 until known),
    /// moving with each tick: the baseline until a whole second is known.
    idle_latency: f64,
    /// The mean write latency of each of the last
    /// [`BusyControl::IDLE_SECONDS`] seconds without a seed, nanoseconds,
    /// newest last: their median is the baseline.
    idle_seconds: std::collections::VecDeque<f64>,
    /// The current second's idle writes: total latency (ns), count, ticks.
    idle_second: (f64, u64, u32),
    /// The host's CPU counters at the last tick.
    cpu: Option<CpuTimes>,
    /// Whether a seed ran under writes at the last tick.
    seeding: bool,
    /// The seed rate when the last run of cuts of this seed began (0
    /// before any): growth slows near it.
    last_cut: f64,
    /// Whether the last tick cut.
    cutting: bool,
}

/// Busy and total jiffies of the host, from `/proc/stat`.
#[derive(Clone, Copy)]
struct CpuTimes {
    idle: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some(Self {
            idle,
            total: v.iter().take(8).sum(),
        })
    }
}

impl BusyState {
    /// Adds an idle tick's writes to the current second, and a finished
    /// second with enough writes to the baseline's seconds.
    fn note_idle(&mut self, latency: Option<(Duration, u64)>) {
        if let Some((mean, n)) = latency {
            self.idle_second.0 += mean.as_nanos() as f64 * n as f64;
            self.idle_second.1 += n;
        }
        self.idle_second.2 += 1;
        if self.idle_second.2 < BusyControl::TICKS_A_SECOND {
            return;
        }
        let (nanos, n, _) = std::mem::take(&mut self.idle_second);
        if n >= BusyControl::MIN_WRITES {
            self.idle_seconds.push_back(nanos / n as f64);
            if self.idle_seconds.len() > BusyControl::IDLE_SECONDS {
                self.idle_seconds.pop_front();
            }
        }
    }

    /// The idle write latency a seed is held to, nanoseconds: the median
    /// of the last idle seconds' means, or the moving mean before a whole
    /// second is known. The moving mean alone spans about a second: a
    /// flush or a compaction in the second before a seed raised it, and
    /// with it the bar the seed had to keep under.
    fn baseline(&self) -> f64 {
        if self.idle_seconds.is_empty() {
            return self.idle_latency;
        }
        let mut v: Vec<f64> = self.idle_seconds.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

impl BusyControl {
    const TICK: Duration = Duration::from_millis(100);
    const TICKS_A_SECOND: u32 = 10;
    /// Idle seconds the baseline is the median of.
    const IDLE_SECONDS: usize = 30;
    /// The least a seed gets, however loaded the node.
    const FLOOR: f64 = 4.0 * 1024.0 * 1024.0;
    /// Ticks with fewer writes say too little about latency.
    const MIN_WRITES: u64 = 5;
    /// What a cut keeps of the seed rate, and the most it takes.
    const CUT: f64 = 0.8;
    const DEEPEST_CUT: f64 = 0.5;
    /// Where a seed under writes starts, and what a healthy tick adds, as
    /// fractions of the ceiling. With a seed starting at the ceiling and
    /// growing by a tenth a tick, `ferry bench` kept 0.63-0.90x of the
    /// idle write rate in five runs (issue 9 asks for 0.8 in every run).
    const START: f64 = 0.25;
    const STEP: f64 = 0.05;
    /// Growth slows to a quarter step from this fraction of the rate at
    /// which the seed's last run of cuts began to that rate over it.
    const NEAR: f64 = 0.85;

    fn new(ceiling: u64, slowdown_pct: u32) -> Self {
        metrics::gauge!("ferry_seed_busy_rate_bytes").set(ceiling as f64);
        Self {
            limiter: RateLimiter::new(ceiling),
            ceiling: ceiling.max(1) as f64,
            slow: 1.0 + f64::from(slowdown_pct.clamp(1, 100)) / 100.0,
            held: AtomicBool::new(false),
            state: Mutex::new(BusyState::default()),
        }
    }

    /// Takes `n` bytes of the seed rate. While held, it marks the seed as
    /// wanting more than its rate, and calls `holding` at each look.
    async fn acquire(&self, n: u64, mut holding: impl FnMut()) {
        self.limiter
            .acquire(n, || {
                self.held.store(true, Ordering::Relaxed);
                holding()
            })
            .await
    }

    fn tick(&self, latency: Option<(Duration, u64)>, seeding: bool) {
        let limited = self.held.swap(false, Ordering::Relaxed);
        self.tick_with(latency, seeding, limited, CpuTimes::read());
    }

    /// One tick: `latency` is the writes' mean latency and count since the
    /// last, `seeding` whether a seed runs under writes, and `limited`
    /// whether the limiter held a seed's chunk back since the last tick.
    fn tick_with(
        &self,
        latency: Option<(Duration, u64)>,
        seeding: bool,
        limited: bool,
        cpu: Option<CpuTimes>,
    ) {
        let mut st = self.state.lock();
        let saturated = match (st.cpu, cpu) {
            (Some(a), Some(b)) if b.total > a.total => {
                let idle = (b.idle.saturating_sub(a.idle)) as f64 / (b.total - a.total) as f64;
                idle < 0.10
            }
            _ => false,
        };
        st.cpu = cpu;
        // The tick's mean write latency, when it steers the seed.
        let steering = match latency {
            Some((lat, n)) if n >= Self::MIN_WRITES => {
                let lat = lat.as_nanos() as f64;
                if st.idle_latency == 0.0 {
                    st.idle_latency = lat;
                } else if !seeding {
                    st.idle_latency += (lat - st.idle_latency) / 10.0;
                }
                Some(lat)
            }
            // Few writes finished, and slowly: writes stalled behind a
            // sync, the worst kind of tick. (Counted as healthy, a seed
            // of db_bench data grew through ticks of 38 and 62 ms
            // writes, against 2 ms idle.) A sparse writer, which never
            // fills a tick, has no baseline and steers nothing.
            Some((lat, _)) if st.idle_latency > 0.0 => Some(lat.as_nanos() as f64),
            _ => None,
        };
        // How far over the threshold the writes were: 1 when they were
        // not, and the share the threshold is of their latency when they
        // were (0.5 for writes twice as slow as the threshold).
        if !seeding {
            st.note_idle(latency);
        }
        let baseline = st.baseline();
        let within = steering.map_or(1.0, |lat| (baseline * self.slow / lat).min(1.0));
        let slow = within < 1.0;
        let started = seeding && !st.seeding;
        st.seeding = seeding;
        if started {
            st.last_cut = 0.0;
            st.cutting = false;
            // The unfinished idle second ends here, uncounted.
            st.idle_second = Default::default();
        }
        if !seeding {
            return;
        }
        let floor = Self::FLOOR.min(self.ceiling);
        let rate = if started {
            (self.ceiling * Self::START).max(floor)
        } else {
            self.limiter.rate()
        };
        let next = if slow || saturated {
            if !st.cutting {
                st.last_cut = rate;
            }
            st.cutting = true;
            // A fifth off, and up to half when the writes were far over:
            // they answer a tick or two late, so cutting a fifth a tick
            // after a spike left several more ticks of slow writes.
            (rate * within.clamp(Self::DEEPEST_CUT, Self::CUT)).max(floor)
        } else if !limited && !started {
            // A seed that took less than its rate (paused, or held up by
            // the network or the follower) has shown nothing about a
            // higher one. Grown through such ticks, a stalled seed came
            // back at a rate the writes had never been shown to bear.
            st.cutting = false;
            rate
        } else {
            st.cutting = false;
            // Near the rate that last hurt the writes, grow by a quarter
            // step: latency answers a tick or two late, and full steps
            // overshot into 30 ms writes.
            let step = self.ceiling * Self::STEP;
            let near = st.last_cut > 0.0
                && rate + step > st.last_cut * Self::NEAR
                && rate < st.last_cut / Self::NEAR;
            let step = if near { step / 4.0 } else { step };
            (rate + step).min(self.ceiling)
        };
        drop(st);
        tracing::debug!(
            latency_us = latency.map(|(l, _)| l.as_micros() as u64),
            baseline_us = (baseline / 1e3) as u64,
            slow,
            saturated,
            rate = next as u64,
            "busy control tick"
        );
        if next != self.limiter.rate() {
            self.limiter.set_rate(next);
            metrics::gauge!("ferry_seed_busy_rate_bytes").set(next);
        }
    }
}

/// A token bucket shared by every seed of this server.
struct RateLimiter {
    /// Bytes per second, as f64 bits (the busy control changes it).
    rate: AtomicU64,
    state: Mutex<Bucket>,
}

/// Bytes the bucket has let through or promised, and what it has paid for.
struct Bucket {
    /// Bytes of every take so far, including those still waiting.
    taken: f64,
    /// Bytes paid for at the rate over time, at most a burst ahead of
    /// `taken`.
    paid: f64,
    at: Instant,
}

impl Bucket {
    /// Pays for the time since the last look at `rate`, keeping at most a
    /// quarter second's worth of burst in hand.
    fn refill(&mut self, rate: f64) {
        let now = Instant::now();
        let burst = rate / 4.0;
        self.paid =
            (self.paid + now.duration_since(self.at).as_secs_f64() * rate).min(self.taken + burst);
        self.at = now;
    }
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        Self {
            rate: AtomicU64::new((rate.max(1) as f64).to_bits()),
            state: Mutex::new(Bucket {
                taken: 0.0,
                paid: 0.0,
                at: Instant::now(),
            }),
        }
    }

    fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    fn set_rate(&self, rate: f64) {
        self.rate.store(rate.max(1.0).to_bits(), Ordering::Relaxed);
    }

    /// How often a waiting sender looks at the bucket again.
    const POLL: Duration = Duration::from_millis(20);

    /// Takes `n` bytes' worth of tokens, in order of arrival: a taker goes
    /// once every byte taken before it is paid for, so it leaves the
    /// bucket in debt by its own size at most. It calls `holding` before
    /// each wait, and looks again at least every [`RateLimiter::POLL`], so
    /// a new rate applies to waiting senders at once: a wait computed
    /// once, at the rate of a deep cut, kept a seed's chunks queued for
    /// seconds after the busy control had raised the rate eightfold, and
    /// the prober read those seconds as a link that carried nothing.
    async fn acquire(&self, n: u64, mut holding: impl FnMut()) {
        // Where this take starts in the queue, fixed at the first look.
        let mut from = None;
        loop {
            let wait = {
                let rate = self.rate();
                let mut b = self.state.lock();
                b.refill(rate);
                let from = *from.get_or_insert_with(|| {
                    b.taken += n as f64;
                    b.taken - n as f64
                });
                if b.paid >= from {
                    return;
                }
                Duration::from_secs_f64((from - b.paid) / rate).min(Self::POLL)
            };
            holding();
            tokio::time::sleep(wait).await;
        }
    }
}

/// Reads `start..end` of the file at `path` into a new buffer, without
/// zeroing it first (a plain `read_exact_at` needs an initialised buffer).
pub(crate) fn read_range(path: &std::path::Path, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let len = (end - start) as usize;
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file shorter than its manifest entry",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a prober over ticks where the raw mode delivers `raw` bytes
    /// per tick and the compressed mode `compressed`; returns the modes.
    fn probe(p: &mut Prober, ticks: usize, raw: u64, compressed: u64) -> Vec<bool> {
        let mut mode = false;
        (0..ticks)
            .map(|_| {
                let sample = Sample {
                    delivered: if mode { compressed } else { raw },
                    carried: if mode { compressed } else { raw },
                    busy: true,
                    saturated: true,
                    ..Sample::default()
                };
                mode = p.tick(sample, mode);
                mode
            })
            .collect()
    }

    #[test]
    fn compression_is_kept_only_where_it_delivers_more() {
        let n = (Prober::SKIP + Prober::MEASURE) as usize;
        // A 1 Gbit/s link: 11.9 MB per 100 ms raw, 30 MB compressed.
        let mut p = Prober::new(2);
        let modes = probe(&mut p, 3 * n, 11_900_000, 30_000_000);
        assert!(!modes[n - 2] && modes[n - 1], "tried after one raw phase");
        assert!(modes[3 * n - 1], "and kept, since it delivers more");
        // The same link where compression turns out slower: tried, dropped.
        let mut p = Prober::new(2);
        let t = (Prober::SKIP + Prober::TRIAL_MEASURE) as usize;
        let modes = probe(&mut p, 3 * n, 11_900_000, 9_000_000);
        assert!(modes[n + t - 2] && !modes[n + t - 1] && !modes[3 * n - 1]);
        // Loopback at 1.2 GB/s: above what two cores compress, never tried.
        let mut p = Prober::new(2);
        assert!(probe(&mut p, 3 * n, 120_000_000, 0).iter().all(|m| !m));
        // Loopback with a slow disk, at 15 MB per tick: below the cap, but
        // the sender is not saturated, so the network is not the
        // bottleneck and compression is not tried.
        let mut p = Prober::new(2);
        let mut mode = false;
        for _ in 0..3 * n {
            let sample = Sample {
                carried: 15_000_000,
                busy: true,
                ..Sample::default()
            };
            mode = p.tick(sample, mode);
            assert!(!mode);
        }
        // Measured again after the hold.
        let mut p = Prober::new(2);
        let modes = probe(
            &mut p,
            n + t + Prober::HOLD as usize + 1,
            11_900_000,
            30_000_000,
        );
        assert!(
            !modes.last().copied().unwrap_or(true),
            "a new round starts raw"
        );
    }

    #[test]
    fn the_wire_meter_counts_raw_bytes_from_what_left_the_socket() {
        let sent = |raw, wire| Encoding {
            raw,
            wire,
            cpu_secs: 0.0,
        };
        let mut m = WireMeter::default();
        // Raw chunks: the raw bytes are the UDP bytes, less those lost.
        assert_eq!(m.tick(12_000_000, 0, sent(8 << 20, 8 << 20)), 12_000_000);
        assert_eq!(m.tick(24_000_000, 1_000_000, sent(0, 0)), 11_000_000);
        // A tick that wrote nothing still counts what the socket sent.
        assert_eq!(
            m.tick(36_000_000, 1_000_000, Encoding::default()),
            12_000_000
        );
        // Replies compressed 8x: what goes out carries 8 times its size
        // once the window holds only compressed replies.
        for _ in 0..WireMeter::WINDOW {
            m.tick(36_000_000, 1_000_000, sent(16 << 20, 2 << 20));
        }
        assert_eq!(
            m.tick(48_000_000, 1_000_000, sent(16 << 20, 2 << 20)),
            96_000_000
        );
        // Counters that move backwards (a loss counted before its send)
        // count nothing rather than wrap.
        assert_eq!(m.tick(48_000_000, 2_000_000, sent(16 << 20, 2 << 20)), 0);
        assert_eq!(
            m.tick(50_000_000, 2_000_000, sent(16 << 20, 2 << 20)),
            16_000_000
        );
    }

    #[test]
    fn a_remembered_verdict_is_held_then_measured_again() {
        let (host, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let memory = LinkMemory::default();
        memory.remember(host, true, 11.9e6);
        let v = memory.recall(host).expect("remembered");
        assert!(v.compress && v.raw_rate == 11.9e6);
        assert!(memory.recall(other).is_none());
        // A verdict 10 s old is held for the remaining 20 s.
        let v = Verdict {
            at: Instant::now() - Duration::from_secs(10),
            ..v
        };
        let mut p = Prober::resume(2, &v);
        let sample = Sample {
            delivered: 30_000_000,
            busy: true,
            saturated: true,
            ..Sample::default()
        };
        for _ in 101..Prober::HOLD {
            assert!(p.tick(sample, true), "held");
        }
        assert!(!p.tick(sample, true), "then measured again, from raw");
        assert_eq!(p.phase, Phase::Raw);
    }

    #[test]
    fn a_trial_cut_short_by_the_end_of_a_seed_goes_on_in_the_next() {
        let host: IpAddr = "10.0.0.1".parse().unwrap();
        let memory = LinkMemory::default();
        let n = (Prober::SKIP + Prober::MEASURE) as usize;
        // A short seed: its raw phase finds the link network-bound, and it
        // ends while compression is being tried.
        let mut p = Prober::new(2);
        let modes = probe(&mut p, n + 1, 11_900_000, 30_000_000);
        assert!(modes[n - 1] && p.phase == Phase::Compressed);
        memory.remember_trial(host, p.raw_rate);
        // The next seed from the host starts compressed, measuring.
        let v = memory.recall(host).expect("remembered");
        assert!(v.compress && v.trial);
        let mut p = Prober::resume(2, &v);
        assert_eq!(p.phase, Phase::Compressed);
        let t = (Prober::SKIP + Prober::TRIAL_MEASURE) as usize;
        let modes: Vec<bool> = (0..t)
            .map(|_| {
                let s = Sample {
                    delivered: 30_000_000,
                    busy: true,
                    saturated: true,
                    ..Sample::default()
                };
                p.tick(s, true)
            })
            .collect();
        assert!(modes.iter().all(|&m| m), "kept: it delivers more");
        assert_eq!(p.phase, Phase::Hold);
    }

    #[test]
    fn a_trial_dropped_right_after_the_raw_phase_is_tried_once_more_fresh() {
        let t = (Prober::SKIP + Prober::TRIAL_MEASURE) as usize;
        let n = (Prober::SKIP + Prober::MEASURE) as usize;
        // Chunks that shrink 7x, but the trial measures 20 % under raw.
        let shrunk = Encoding {
            raw: 25_000_000,
            wire: 3_500_000,
            cpu_secs: 0.5,
        };
        let sample = |delivered: u64, mode: bool| Sample {
            delivered,
            carried: delivered,
            busy: true,
            saturated: true,
            encoded: if mode { shrunk } else { Encoding::default() },
            ..Sample::default()
        };
        let mut p = Prober::new(2);
        let mut mode = false;
        for _ in 0..n + t {
            mode = p.tick(
                sample(if mode { 9_500_000 } else { 11_900_000 }, mode),
                mode,
            );
        }
        assert!(
            !mode && p.phase == Phase::Hold && p.retry,
            "dropped, to retry"
        );
        // The next connection tries again from its start; dropped again,
        // it is not retried.
        let memory = LinkMemory::default();
        let host: IpAddr = "10.0.0.1".parse().unwrap();
        memory.remember_trial(host, p.raw_rate);
        let mut p = Prober::resume(2, &memory.recall(host).expect("remembered"));
        let mut mode = true;
        for _ in 0..t {
            mode = p.tick(sample(9_500_000, true), mode);
        }
        assert!(!mode && p.phase == Phase::Hold && !p.retry);
        // Chunks that do not shrink are not retried either.
        let mut p = Prober::new(2);
        let mut mode = false;
        for _ in 0..n + t {
            let mut s = sample(if mode { 9_500_000 } else { 11_900_000 }, mode);
            s.encoded.wire = s.encoded.raw;
            mode = p.tick(s, mode);
        }
        assert!(!mode && !p.retry);
    }

    #[test]
    fn rates_divide_by_the_time_the_ticks_took() {
        // A 1 Gbit/s link measured over ticks that ran 25 % long: 15 MB a
        // tick is 120 MB/s, under the cap, not 150 MB/s.
        let n = (Prober::SKIP + Prober::MEASURE) as usize;
        let mut p = Prober::new(2);
        for _ in 0..n {
            let s = Sample {
                secs: 0.125,
                carried: 15_000_000,
                busy: true,
                saturated: true,
                ..Sample::default()
            };
            p.tick(s, false);
        }
        assert_eq!(p.phase, Phase::Compressed);
        assert!((p.raw_rate - 120e6).abs() < 1.0, "{}", p.raw_rate);
    }

    #[test]
    fn the_in_flight_budget_covers_a_round_trip_and_headroom() {
        let mib = 1024.0 * 1024.0;
        let ms = Duration::from_millis;
        // Before anything is measured, or on an idle link: the floor.
        assert_eq!(in_flight_budget(0.0, ms(1), 2.0 * mib, 64), MIN_BUDGET);
        // A 1 Gbit/s LAN: about a quarter second of chunks (the floor), not
        // the 64 (a second's worth) that a follower may ask for at once.
        assert_eq!(in_flight_budget(119e6, ms(1), 2.0 * mib, 64), 16);
        assert_eq!(in_flight_budget(300e6, ms(1), 2.0 * mib, 64), 36);
        // Loopback at 1 GB/s, and a long fat pipe: the cap.
        assert_eq!(in_flight_budget(1e9, ms(0), 2.0 * mib, 64), 64);
        assert_eq!(in_flight_budget(119e6, ms(150), 2.0 * mib, 64), 23);
        assert_eq!(in_flight_budget(119e6, ms(600), 2.0 * mib, 64), 49);
        // A server capped below the floor keeps its cap.
        assert_eq!(in_flight_budget(0.0, ms(1), 2.0 * mib, 4), 4);
    }

    #[test]
    fn a_trial_is_kept_on_what_its_chunks_predict_unless_the_rate_fell() {
        let n = (Prober::SKIP + Prober::MEASURE + Prober::SKIP + Prober::TRIAL_MEASURE) as usize;
        let run = |compressed_rate: u64, encoded: Encoding| {
            let mut p = Prober::new(2);
            let mut mode = false;
            for _ in 0..n {
                let sample = Sample {
                    delivered: if mode { compressed_rate } else { 11_900_000 },
                    carried: if mode { compressed_rate } else { 11_900_000 },
                    busy: true,
                    saturated: true,
                    stale: false,
                    encoded: if mode { encoded } else { Encoding::default() },
                    secs: 0.1,
                };
                mode = p.tick(sample, mode);
            }
            mode
        };
        // A 1 Gbit/s link; the trial's first chunks also paid dictionary
        // trials, so the measured rate came out 8 % under raw, but the
        // chunks shrank 7x at 250 MB/s a core: kept.
        let db_bench = Encoding {
            raw: 25_000_000,
            wire: 3_500_000,
            cpu_secs: 0.1,
        };
        assert!(run(11_000_000, db_bench));
        // The same prediction with the measured rate 20 % down: dropped.
        assert!(!run(9_500_000, db_bench));
        // Incompressible chunks predict nothing better: dropped...
        let random = Encoding {
            raw: 25_000_000,
            wire: 25_000_000,
            cpu_secs: 0.02,
        };
        assert!(!run(11_000_000, random));
        // ...unless the measured rate is higher all the same.
        assert!(run(12_500_000, random));
        // Chunks that halve what crosses the network are kept when the
        // rate is within 10 %, even on slow cores; 20 % down, dropped.
        let slow_cores = Encoding {
            raw: 25_000_000,
            wire: 3_500_000,
            cpu_secs: 0.5,
        };
        assert!(run(11_000_000, slow_cores));
        assert!(!run(9_500_000, slow_cores));
        let halved_not = Encoding {
            raw: 25_000_000,
            wire: 14_000_000,
            cpu_secs: 0.5,
        };
        assert!(!run(11_000_000, halved_not));
    }

    #[tokio::test]
    async fn admission_waits_for_the_budget() {
        let link = Arc::new(LinkMeter::new(2));
        link.admit().await;
        link.admit().await;
        let third = tokio::spawn({
            let link = Arc::clone(&link);
            async move { link.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "a third chunk waits");
        link.begin(false);
        link.end(1, false);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("admitted once one left")
            .unwrap();
        // A grown budget admits at once.
        let fourth = tokio::spawn({
            let link = Arc::clone(&link);
            async move { link.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!fourth.is_finished());
        link.set_budget(3);
        tokio::time::timeout(Duration::from_secs(1), fourth)
            .await
            .expect("admitted once the budget grew")
            .unwrap();
    }

    #[test]
    fn a_sender_is_saturated_while_its_chunks_in_flight_hold_steady() {
        let link = LinkMeter::new(16);
        // A network-bound follower: each chunk that lands is asked for
        // again at once (the trace of a 1 Gbit/s link).
        assert!(link.saturated(&[16, 16, 15, 16, 16, 16, 14, 16, 16, 16]));
        // A follower slow to ask (a trace from an early loopback build):
        // the chunks in flight drain and refill.
        assert!(!link.saturated(&[7, 3, 3, 10, 11, 6, 11, 4, 10, 2]));
        assert!(!link.saturated(&[0; 10]));
    }

    #[test]
    fn an_idle_sender_teaches_the_prober_nothing() {
        let mut p = Prober::new(2);
        for _ in 0..100 {
            assert!(!p.tick(Sample::default(), false));
        }
        assert_eq!(p.phase, Phase::Raw);
    }

    #[tokio::test]
    async fn a_held_sender_is_marked_while_it_waits_and_a_raised_rate_frees_it_at_once() {
        // At 1 MiB/s a first 2 MiB chunk leaves the bucket 2 MiB in debt:
        // the next would wait 2 s at that rate.
        let l = Arc::new(RateLimiter::new(1 << 20));
        l.acquire(2 << 20, || {}).await;
        let held = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let waiter = tokio::spawn({
            let (l, held) = (Arc::clone(&l), Arc::clone(&held));
            async move {
                l.acquire(2 << 20, || held.store(true, Ordering::Relaxed))
                    .await
            }
        });
        // Every tick it waits through reads as held, not only the tick in
        // which it is let go (the prober measures nothing in those).
        for tick in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(held.swap(false, Ordering::Relaxed), "tick {tick}");
        }
        // The busy control raises the rate: the waiting chunk goes now, not
        // when the old rate would have let it.
        l.set_rate(1024.0 * 1024.0 * 1024.0);
        waiter.await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn held_senders_go_in_the_order_they_came() {
        // 1 MiB/s and 64 KiB takes: one goes every 62 ms. Eight senders
        // arrive 2 ms apart behind a first take that left the bucket in
        // debt; they must leave in that order (a waiter that merely polls
        // for tokens can be overtaken by later ones, and the chunk a
        // follower needs first, a file's dictionary chunk, can starve).
        let l = Arc::new(RateLimiter::new(1 << 20));
        l.acquire(64 << 10, || {}).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (l, order) = (Arc::clone(&l), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                l.acquire(64 << 10, || {}).await;
                order.lock().push(i);
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_slow_second_before_a_seed_does_not_raise_the_bar() {
        const MB: f64 = 1024.0 * 1024.0;
        let b = BusyControl::new(100 << 20, DEFAULT_BUSY_SLOWDOWN_PCT);
        let ms = |m: f64| Some((Duration::from_secs_f64(m / 1e3), 100));
        let cpu = |t: u64| {
            Some(CpuTimes {
                idle: t / 2,
                total: t,
            })
        };
        let mut t = 0;
        let mut tick = |lat, seeding| {
            t += 100;
            b.tick_with(lat, seeding, true, cpu(t));
        };
        // Half a minute of 1 ms writes, then a second of 3 ms writes (a
        // compaction) just before the seed starts.
        for _ in 0..300 {
            tick(ms(1.0), false);
        }
        for _ in 0..10 {
            tick(ms(3.0), false);
        }
        // Writes at 1.5 ms under the seed are 1.5x the idle baseline: the
        // seed is cut from where it started, not let grow.
        tick(ms(1.5), true);
        assert!(b.limiter.rate() < 25.0 * MB, "{}", b.limiter.rate() / MB);
        // A baseline that is itself mostly slow seconds holds: writes at
        // 3 ms after a minute of them are healthy, and the seed grows.
        for _ in 0..600 {
            tick(ms(3.0), false);
        }
        tick(ms(3.0), true);
        assert!(b.limiter.rate() > 25.0 * MB, "{}", b.limiter.rate() / MB);
    }

    #[test]
    fn the_operator_sets_how_much_slower_the_writes_may_get() {
        const MB: f64 = 1024.0 * 1024.0;
        let ms = |m: f64| Some((Duration::from_secs_f64(m / 1e3), 100));
        let cpu = |t: u64| {
            Some(CpuTimes {
                idle: t / 2,
                total: t,
            })
        };
        // Writes at 1.12x their idle latency under a seed: within a 15 %
        // slowdown, so the seed grows from a quarter; over a 10 % one, so
        // it is cut to the threshold's share of their latency.
        let rate_after = |pct: u32| {
            let b = BusyControl::new(100 << 20, pct);
            let mut t = 0;
            for _ in 0..20 {
                t += 100;
                b.tick_with(ms(1.0), false, true, cpu(t));
            }
            t += 100;
            b.tick_with(ms(1.12), true, true, cpu(t));
            b.limiter.rate() / MB
        };
        assert!(rate_after(15) > 25.0, "{}", rate_after(15));
        let cut = rate_after(10);
        assert!((cut - 25.0 * 0.8).abs() < 1e-6, "{cut}");
    }

    #[test]
    fn a_sparse_writer_lets_a_seed_grow() {
        const MB: f64 = 1024.0 * 1024.0;
        let b = BusyControl::new(100 << 20, DEFAULT_BUSY_SLOWDOWN_PCT);
        let cpu = |idle: u64, total: u64| Some(CpuTimes { idle, total });
        // 20 writes a second: never five in a tick, so no baseline; slow
        // or not, those writes steer nothing and the seed grows from a
        // quarter to the ceiling (ferry demo's load).
        let mut t = 0;
        for i in 0..20u64 {
            t += 100;
            let lat = Some((Duration::from_millis(1 + i % 7), 2));
            b.tick_with(lat, true, true, cpu(t / 2, t));
        }
        assert_eq!(b.limiter.rate(), 100.0 * MB);
    }

    #[test]
    fn the_busy_control_backs_off_when_the_foreground_suffers_and_recovers_after() {
        const MB: f64 = 1024.0 * 1024.0;
        let b = BusyControl::new(100 << 20, DEFAULT_BUSY_SLOWDOWN_PCT);
        let ms = |m: u64| Some((Duration::from_millis(m), 100));
        let cpu = |idle: u64, total: u64| Some(CpuTimes { idle, total });
        // Idle: writes take 1 ms; that is the baseline.
        b.tick_with(ms(1), false, true, cpu(0, 0));
        b.tick_with(ms(1), false, true, cpu(50, 100));
        assert_eq!(b.limiter.rate(), 100.0 * MB);
        // A seed starts at a quarter of the ceiling. It slows the writes
        // down: the rate is cut, to the floor at most. Writes at 2 ms,
        // against a threshold of 1.15 ms, keep 1.15/2 of the rate.
        b.tick_with(ms(2), true, true, cpu(100, 200));
        let cut = b.limiter.rate() / (25.0 * MB);
        assert!((cut - 0.575).abs() < 1e-9, "{cut}");
        for _ in 0..50 {
            b.tick_with(ms(2), true, true, cpu(100, 200));
        }
        assert_eq!(b.limiter.rate(), BusyControl::FLOOR);
        // Writes are healthy again: it grows back, by quarter steps around
        // 25 MiB/s, where the cuts began (latency answers late, and full
        // steps overshot), then by full steps to the ceiling.
        let mut t = 200;
        let mut rates = Vec::new();
        for _ in 0..30 {
            t += 100;
            b.tick_with(ms(1), true, true, cpu(t / 2, t));
            rates.push(b.limiter.rate() / MB);
        }
        let steps: Vec<f64> = rates.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(steps[..2].iter().all(|&s| s == 5.0), "{rates:?}");
        assert!(steps[4..8].iter().all(|&s| s == 1.25), "{rates:?}");
        assert!(steps[12..16].iter().all(|&s| s == 5.0), "{rates:?}");
        assert_eq!(b.limiter.rate(), 100.0 * MB);
        // A host with no idle CPU cuts it even while latency looks fine.
        t += 100;
        b.tick_with(ms(1), true, true, cpu(150 + 2, t));
        assert_eq!(b.limiter.rate(), 80.0 * MB);
        // Latency 1.2x idle is suffering too.
        t += 100;
        b.tick_with(
            Some((Duration::from_micros(1200), 100)),
            true,
            true,
            cpu(t / 2, t),
        );
        assert_eq!(b.limiter.rate(), 64.0 * MB);
        // Few writes that stalled cut it too, by half (the deepest cut)
        // since they took 60 ms.
        let few = |m: u64| Some((Duration::from_millis(m), 2));
        t += 100;
        b.tick_with(few(60), true, true, cpu(t / 2, t));
        assert_eq!(b.limiter.rate(), 32.0 * MB);
        // Few fast writes, or none, grow it.
        t += 100;
        b.tick_with(few(1), true, true, cpu(t / 2, t));
        t += 100;
        b.tick_with(None, true, true, cpu(t / 2, t));
        assert_eq!(b.limiter.rate(), 42.0 * MB);
        // The next seed starts low again, and grows while writes are fine.
        b.tick_with(ms(1), false, true, cpu(t / 2, t));
        t += 100;
        b.tick_with(ms(1), true, true, cpu(t / 2, t));
        assert_eq!(b.limiter.rate(), 30.0 * MB);
    }

    #[test]
    fn a_seed_that_takes_less_than_its_rate_does_not_raise_it() {
        const MB: f64 = 1024.0 * 1024.0;
        let b = BusyControl::new(100 << 20, DEFAULT_BUSY_SLOWDOWN_PCT);
        let ms = |m: u64| Some((Duration::from_millis(m), 100));
        let cpu = |t: u64| {
            Some(CpuTimes {
                idle: t / 2,
                total: t,
            })
        };
        let mut t = 0;
        let mut tick = |lat, seeding, limited| {
            t += 100;
            b.tick_with(lat, seeding, limited, cpu(t));
        };
        tick(ms(1), false, false);
        // The seed starts at a quarter of the ceiling and a step, held or
        // not.
        tick(ms(1), true, false);
        assert_eq!(b.limiter.rate(), 30.0 * MB);
        // Paused (or held up elsewhere) for 1.5 s of healthy writes: the
        // rate stays where the writes last allowed it.
        for _ in 0..15 {
            tick(ms(1), true, false);
        }
        assert_eq!(b.limiter.rate(), 30.0 * MB);
        // Slow writes cut it whether or not the seed was held.
        tick(ms(2), true, false);
        assert!(b.limiter.rate() < 30.0 * MB);
        let cut = b.limiter.rate();
        // Held back by the limiter, it grows.
        tick(ms(1), true, true);
        assert!(b.limiter.rate() > cut);
    }

    #[tokio::test]
    async fn the_busy_control_grows_only_after_it_held_a_seed_back() {
        let b = BusyControl::new(100 << 20, DEFAULT_BUSY_SLOWDOWN_PCT);
        let cpu = |t: u64| {
            Some(CpuTimes {
                idle: t / 2,
                total: t,
            })
        };
        let healthy = Some((Duration::from_millis(1), 100));
        b.tick_with(healthy, false, false, cpu(100));
        b.tick_with(healthy, true, false, cpu(200));
        let start = b.limiter.rate();
        // The bucket fills to its burst (a quarter second of the rate).
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Within the burst: taken at once, the rate is not raised.
        b.acquire(1 << 10, || {}).await;
        b.tick_with(
            healthy,
            true,
            b.held.swap(false, Ordering::Relaxed),
            cpu(300),
        );
        assert_eq!(b.limiter.rate(), start);
        // A take goes once the takes before it are paid for: after 16 MiB,
        // more than the burst, the next is held, and the rate grows.
        b.acquire(16 << 20, || {}).await;
        let mut looks = 0;
        b.acquire(1 << 10, || looks += 1).await;
        assert!(looks > 0);
        b.tick_with(
            healthy,
            true,
            b.held.swap(false, Ordering::Relaxed),
            cpu(400),
        );
        assert!(b.limiter.rate() > start);
    }
}
