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
    /// Keep-alive interval; dead peers are detected by the idle timeout.
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// The largest UDP payload this endpoint accepts and MTU discovery may
    /// probe up to. Discovery stops at the path's real MTU (1472 on a
    /// 1500-byte Ethernet path); loopback and jumbo frames carry more.
    /// quinn hands up to 10 datagrams to one segmentation-offload (GSO) send,
    /// and the kernel refuses a GSO send over 64 KiB, so above about 6.5 KB
    /// whole batches would be dropped: 6400 is the most that is safe.
    pub max_udp_payload: u16,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            stream_window: 8 << 20,
            connection_window: 64 << 20,
            max_streams: 256,
            socket_buffer: 8 << 20,
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(15),
            max_udp_payload: std::env::var("FERRY_MAX_UDP_PAYLOAD")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(6400),
        }
    }
}

impl TransportOptions {
    pub fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.connection_window));
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .unwrap_or(VarInt::from_u32(15_000).into()),
        ));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        // A loss burst on a busy receiver makes quinn fall back to the
        // minimum MTU; probe again after seconds rather than ten minutes.
        mtu.interval(Duration::from_secs(30));
        mtu.black_hole_cooldown(Duration::from_secs(10));
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

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

fn endpoint_config(opts: &TransportOptions) -> EndpointConfig {
    let mut c = EndpointConfig::default();
    let _ = c.max_udp_payload_size(opts.max_udp_payload.max(1200));
    c
}

/// An endpoint that accepts connections (and can also connect out).
pub fn server_endpoint(
    addr: SocketAddr,
    auth: &NodeAuth,
    opts: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(auth.server_crypto()?)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.transport()));
    cfg.migration(false);
    let sock = socket(addr, opts)?;
    let runtime = quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
        addr,
        source: std::io::Error::other("no async runtime"),
    })?;
    Endpoint::new(endpoint_config(opts), Some(cfg), sock, runtime)
        .map_err(|source| EndpointError::Bind { addr, source })
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
    Endpoint::new(endpoint_config(opts), None, sock, runtime)
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
