//! BBR for bulk transfer: quinn's BBR with quinn's Cubic beside it.
//!
//! quinn's BBR (BBRv1-like) keeps its speed under random loss, which is why
//! seeds use it (BENCHMARKS.md section 2b; Cubic crawled at 3.5 MiB/s at
//! 1 % loss). But on a sub-millisecond path it leaves startup at once: its
//! rounds last one round trip, so on a LAN (50 µs across this machine's
//! veth pair, less on loopback) the three rounds without growth that end
//! startup pass within a millisecond, while the connection is still limited
//! by its handshake. Its window is then 2 x bandwidth x min RTT, which is
//! its floor of four packets, until its bandwidth samples catch up: a seed
//! across a 1 Gbit/s link crawled at 30-40 MB/s for its first 0.2 s.
//!
//! So Cubic's window (slow start, then loss-based) is kept beside BBR's,
//! both are fed every event, and the larger window rules. On a clean short
//! path Cubic's slow start fills the link from the first round trip; under
//! random loss Cubic's window collapses and BBR's rules, as before. The
//! sum is never less aggressive than BBR alone, and no more than the more
//! aggressive of two standard controllers.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn_proto::congestion::{
    BbrConfig, Controller, ControllerFactory, ControllerMetrics, CubicConfig,
};
use quinn_proto::RttEstimator;

/// Builds [`BulkBbr`] controllers.
#[derive(Debug, Clone, Default)]
pub struct BulkBbrConfig {
    bbr: BbrConfig,
    cubic: CubicConfig,
}

impl ControllerFactory for BulkBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(BulkBbr {
            bbr: Arc::new(self.bbr.clone()).build(now, current_mtu),
            cubic: Arc::new(self.cubic.clone()).build(now, current_mtu),
        })
    }
}

/// quinn's BBR and Cubic, fed the same events; the larger window rules.
pub struct BulkBbr {
    bbr: Box<dyn Controller>,
    cubic: Box<dyn Controller>,
}

impl BulkBbr {
    fn both(&mut self, f: impl Fn(&mut dyn Controller)) {
        f(self.bbr.as_mut());
        f(self.cubic.as_mut());
    }
}

impl Controller for BulkBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.both(|c| c.on_sent(now, bytes, last_packet_number));
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.both(|c| c.on_ack(now, sent, bytes, app_limited, rtt));
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.both(|c| c.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked));
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.both(|c| c.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes));
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.both(|c| c.on_mtu_update(new_mtu));
    }

    fn window(&self) -> u64 {
        self.bbr.window().max(self.cubic.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.bbr.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self {
            bbr: self.bbr.clone_box(),
            cubic: self.cubic.clone_box(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window().max(self.cubic.initial_window())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
