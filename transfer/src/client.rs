//! The connecting side: dial a node, authenticate, and keep the control
//! stream for later requests.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};

use crate::auth::{exported_keying_material, join_proof, ClientAuth, SERVER_NAME};
use crate::endpoint::{client_config, EndpointError, TransportOptions};
use crate::protocol::{ErrorCode, Frame, Role, PROTOCOL_VERSION};
use crate::wire::{expect_frame, write_frame, WireError};

/// Errors of connecting to a node.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Setup(#[from] EndpointError),
    /// The QUIC connection could not be set up (unreachable, timed out, TLS failed).
    #[error("cannot connect to {peer}: {source}{hint}", hint = connect_hint(source))]
    Connect {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    /// quinn refused to start the connection.
    #[error("cannot connect to {peer}: {source}")]
    Start {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    /// The node refused us after the TLS handshake.
    #[error("{peer} refused the connection ({code:?}): {message}")]
    Refused {
        peer: SocketAddr,
        code: ErrorCode,
        message: String,
    },
    /// The handshake broke off.
    #[error("handshake with {peer}: {source}")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: WireError,
    },
    /// The handshake did not finish in time.
    #[error("{peer} did not answer the handshake within {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
}

fn connect_hint(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TimedOut => " (is `ferry serve` running there, and is the UDP port reachable?)",
        quinn::ConnectionError::TransportError(t) if t.code.to_string().contains("crypto") || t.reason.contains("certificate") => {
            " (the node's certificate does not chain to the cluster CA in the token: wrong token or wrong cluster?)"
        }
        _ => "",
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// An authenticated connection to a node.
pub struct Client {
    pub conn: Connection,
    pub peer: SocketAddr,
    /// The node's id and latest sequence from its `Welcome`.
    pub node_id: String,
    pub latest_seq: u64,
    /// The protocol version both sides speak (the lower of the two).
    pub version: u16,
    ctrl: (SendStream, RecvStream),
}

impl Client {
    /// Connects to `peer`, authenticates as `node_id` in `role`.
    pub async fn connect(
        endpoint: &Endpoint,
        peer: SocketAddr,
        auth: &ClientAuth,
        transport: &TransportOptions,
        node_id: &str,
        role: Role,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            Self::connect_inner(endpoint, peer, auth, transport, node_id, role),
        )
        .await
        .map_err(|_| ConnectError::Timeout {
            peer,
            after: HANDSHAKE_TIMEOUT,
        })?
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        peer: SocketAddr,
        auth: &ClientAuth,
        transport: &TransportOptions,
        node_id: &str,
        role: Role,
    ) -> Result<Self, ConnectError> {
        let cfg = client_config(auth, transport)?;
        let conn = endpoint
            .connect_with(cfg, peer, SERVER_NAME)
            .map_err(|source| ConnectError::Start { peer, source })?
            .await
            .map_err(|source| ConnectError::Connect { peer, source })?;
        let hs = |source| ConnectError::Handshake { peer, source };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ConnectError::Connect { peer, source: e })?;
        let proof = match (auth.secret, exported_keying_material(&conn)) {
            (Some(secret), Some(exported)) => join_proof(&secret, &exported, node_id),
            _ => [0u8; 32],
        };
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            role,
            node_id: node_id.to_owned(),
            cluster: auth.cluster,
            proof,
        };
        write_frame(&mut send, &hello).await.map_err(hs)?;
        match expect_frame(&mut recv).await {
            Ok(Frame::Welcome {
                version,
                node_id,
                latest_seq,
            }) => Ok(Self {
                conn,
                peer,
                node_id,
                latest_seq,
                version: version.min(PROTOCOL_VERSION),
                ctrl: (send, recv),
            }),
            Ok(other) => Err(hs(WireError::Unexpected {
                got: other.name(),
                state: "waiting for Welcome",
            })),
            Err(WireError::Peer { code, message }) => Err(ConnectError::Refused {
                peer,
                code,
                message,
            }),
            Err(e) => Err(hs(e)),
        }
    }

    /// Sends a frame on the control stream and reads the answer.
    pub async fn request(&mut self, frame: &Frame) -> Result<Frame, WireError> {
        write_frame(&mut self.ctrl.0, frame).await?;
        expect_frame(&mut self.ctrl.1).await
    }

    /// Opens a new stream for one request.
    pub async fn open(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        self.conn.open_bi().await
    }

    /// Closes the connection after the control stream is done.
    pub async fn close(mut self) {
        let _ = self.ctrl.0.finish();
        self.conn.close(0u32.into(), b"done");
    }
}

/// Asks `peer` what it is: whether it leads, its sequence and its history.
/// The whole exchange is bounded by `timeout`.
pub async fn probe(
    endpoint: &Endpoint,
    peer: SocketAddr,
    auth: &ClientAuth,
    transport: &TransportOptions,
    node_id: &str,
    timeout: Duration,
) -> Result<crate::leader::NodeInfo, ConnectError> {
    let ask = async {
        let mut client =
            Client::connect(endpoint, peer, auth, transport, node_id, Role::Observer).await?;
        let hs = |source| ConnectError::Handshake { peer, source };
        let reply = client.request(&Frame::Probe).await.map_err(|e| match e {
            WireError::Peer { code, message } => ConnectError::Refused {
                peer,
                code,
                message,
            },
            e => hs(e),
        })?;
        client.close().await;
        crate::leader::NodeInfo::from_frame(reply).ok_or(hs(WireError::Unexpected {
            got: "another frame",
            state: "waiting for NodeInfo",
        }))
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| ConnectError::Timeout {
            peer,
            after: timeout,
        })?
}
