//! QUIC endpoints tuned for bulk transfer.
//!
//! quinn's defaults suit 100 Mbit/s links: a stream window of about 1.25 MB
//! and small UDP socket buffers. A seed moves gigabytes over one connection
//! with many chunk streams in flight, so the windows, the stream limit and
//! the socket buffers are raised here, and the path MTU is allowed to grow
//! (loopback and jumbo-frame networks carry far larger datagrams than 1500).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::auth::{AuthError, ClientAuth, NodeAuth};

/// Knobs of the transport.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Receive window per stream.
    pub stream_window: u32,
    /// Receive and send window per connection.
    pub connection_window: u32,
    /// Concurrent bidirectional streams a peer may open.
    pub max_streams: u32,
    /// UDP socket send/receive buffer size.
    pub socket_buffer: usize,
    /// Keep-alive interval: a live connection is never silent longer than
    /// this, and a peer that restarted answers the next keep-alive with a
    /// stateless reset (see [`crate::auth::NodeAuth::reset_key`]).
    pub keep_alive: Duration,
    /// A peer silent this long is declared lost (power off, partition).
    pub idle_timeout: Duration,
    /// The largest UDP payload this endpoint accepts and MTU discovery may
    /// probe up to. Discovery stops at the path's real MTU (1472 on a
    /// 1500-byte Ethernet path); loopback and jumbo frames carry more.
    /// quinn hands up to 10 datagrams to one segmentation-offload (GSO) send,
    /// and the kernel refuses a GSO send over 64 KiB, so above about 6.5 KB
    /// whole batches would be dropped: 6400 is the most that is safe.
    pub max_udp_payload: u16,
    /// The congestion controller of every connection.
    pub congestion: Congestion,
}

/// Which congestion controller a connection uses.
///
/// BBR paces by the measured bottleneck bandwidth and round trip, so random
/// loss (a lossy WAN, a busy Wi-Fi hop) does not collapse it; Cubic, like
/// TCP, halves its window on every loss and crawls at 1% loss. The cost of
/// BBR is fairness: against Cubic flows on a shared bottleneck it tends to
/// take more than an equal share. Seeds are bulk transfers that an operator
/// bounds with `--max-rate`; pick `cubic` on a link shared with
/// loss-sensitive traffic that must win. `Bbr` is quinn's BBR with Cubic's
/// window beside it ([`crate::congestion`]), which fills a short path from
/// the first round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
}

/// The default time after which a silent peer is declared lost.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The default keep-alive interval: a restarted peer is noticed within it.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(250);

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            stream_window: 8 << 20,
            connection_window: 64 << 20,
            max_streams: 256,
            socket_buffer: 8 << 20,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_udp_payload: std::env::var("FERRY_MAX_UDP_PAYLOAD")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(6400),
            congestion: Congestion::default(),
        }
    }
}

impl TransportOptions {
    /// Sets the idle timeout, with keep-alives at a twelfth of it (so a
    /// few lost keep-alives never end a healthy connection).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle.max(Duration::from_millis(100));
        self.keep_alive =
            (self.idle_timeout / 12).clamp(Duration::from_millis(20), DEFAULT_KEEP_ALIVE);
        self
    }

    pub fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.connection_window));
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        // ferry sends no DATAGRAM frames: advertise none, so no peer (and
        // none before it authenticates) can fill a receive buffer with them.
        t.datagram_receive_buffer_size(None);
        t.keep_alive_interval(Some(self.keep_alive));
        // quinn assumes 333 ms before it has measured the path; a lost first
        // Initial (a peer that is just coming back) is then retried after
        // about a second. Assume 100 ms: retries come sooner, and a real
        // WAN's RTT replaces the guess after the first round trip.
        t.initial_rtt(Duration::from_millis(100));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .unwrap_or(VarInt::from_u32(3_000).into()),
        ));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        // A loss burst on a busy receiver makes quinn fall back to the
        // minimum MTU; probe again after seconds rather than ten minutes.
        mtu.interval(Duration::from_secs(30));
        mtu.black_hole_cooldown(Duration::from_secs(10));
        t.mtu_discovery_config(Some(mtu));
        match self.congestion {
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(
                crate::congestion::BulkBbrConfig::default(),
            )),
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
        };
        t
    }
}

/// A server's per-stream receive window: requests, `Hello`s and
/// acknowledgements are small.
pub const SERVER_STREAM_WINDOW: u32 = 256 << 10;
/// What an unauthenticated peer may have in flight to a server.
pub const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 64 << 10;
/// A server's connection receive window once the peer authenticated.
pub const AUTHENTICATED_RECEIVE_WINDOW: u32 = 4 << 20;
/// Streams an authenticated peer may open at once (its chunk requests).
pub const AUTHENTICATED_STREAMS: u32 = 256;

/// Errors of endpoint setup.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be created or bound.
    #[error("bind udp {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

fn socket(addr: SocketAddr, opts: &TransportOptions) -> Result<std::net::UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| EndpointError::Bind { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(opts.socket_buffer);
    let _ = s.set_send_buffer_size(opts.socket_buffer);
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

/// With `reset_key` (a server's), the endpoint recognises its own
/// connection ids and signs its stateless resets the same way after a
/// restart: both the connection-id check key and the reset key derive from
/// it. (With per-start random keys a restarted server silently drops the
/// packets of connections it forgot, and the peer waits for its idle timeout.)
fn endpoint_config(opts: &TransportOptions, reset_key: Option<[u8; 32]>) -> EndpointConfig {
    let mut c = match reset_key {
        Some(k) => {
            let mut c =
                EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)));
            let cid_key = u64::from_le_bytes(
                blake3::derive_key("ferry 2026-11 QUIC connection id key", &k)[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            c.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            c
        }
        None => EndpointConfig::default(),
    };
    let _ = c.max_udp_payload_size(opts.max_udp_payload.max(1200));
    c
}

/// An endpoint that accepts connections (and can also connect out).
pub fn server_endpoint(
    addr: SocketAddr,
    auth: &NodeAuth,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let cfg = server_config(auth, opts)?;
    let sock = socket(addr, opts)?;
    let runtime = quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
        addr,
        source: std::io::Error::other("no async runtime"),
    })?;
    Endpoint::new(
        endpoint_config(opts, Some(auth.reset_key())),
        Some(cfg),
        sock,
        runtime,
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// The server side of a node's QUIC endpoint: its TLS identity and the
/// small pre-authentication windows. Swapped in with
/// `Endpoint::set_server_config` when the node's certificate is renewed.
pub fn server_config(
    auth: &NodeAuth,
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(auth.server_crypto()?)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A server receives only small requests and acknowledgements; before a
    // peer authenticates it may open one stream and have 64 KiB in flight
    // (a Hello's bound). The server raises both after the Hello checks out.
    let mut t = opts.transport();
    t.stream_receive_window(VarInt::from_u32(SERVER_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(UNAUTHENTICATED_RECEIVE_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    cfg.transport_config(Arc::new(t));
    cfg.migration(false);
    Ok(cfg)
}

/// An endpoint for outgoing connections only.
pub fn client_endpoint(
    bind: SocketAddr,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let sock = socket(bind, opts)?;
    let runtime = quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime"),
    })?;
    Endpoint::new(endpoint_config(opts, None), None, sock, runtime)
        .map_err(|source| EndpointError::Bind { addr: bind, source })
}

/// The client configuration for `auth`.
pub fn client_config(
    auth: &ClientAuth,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(auth.crypto()?)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.transport()));
    Ok(cfg)
}

/// The wildcard address of the same family as `peer`, for a client socket.
pub fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap_or(peer),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap_or(peer),
    }
}
