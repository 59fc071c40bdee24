//! ferry's wire protocol.
//!
//! **Goals:** move a checkpoint's files from a leader to a new node as
//! verified chunks, many in flight on one QUIC connection, so that an
//! interrupted seed resumes; and carry the replication stream.
//! **Non-goals:** encryption and integrity of bytes in transit (QUIC/TLS
//! does that), and general file transfer (only RocksDB file names).
//!
//! Every message is one frame: `len: u32 LE | type: u8 | body` where `len`
//! counts the body only. A reader checks `len` against the maximum for that
//! type *before* it allocates anything ([`FrameHeader::parse`]). Decoding is
//! plain code with no I/O ([`Frame::decode`]); [`crate::wire`] drives it over
//! quinn streams.
//!
//! Stream grammar:
//!
//! ```text
//! control stream (the first bi stream the client opens):
//!   C: Hello            S: Welcome | Error
//!   C: ManifestRequest  S: ManifestReply | Error      (repeatable)
//!   C: SeedDone         S: SeedDoneAck
//! chunk streams (one bi stream per chunk, only after Welcome):
//!   C: ChunkRequest     S: ChunkReply | Error
//! replication stream (after Welcome):
//!   C: Subscribe        S: History (Batches | Heartbeat | Mark)*   C: Applied*
//!                       S: Error(WalPurged) when the WAL no longer has it
//!                       S: Error(Diverged) when the follower's history or
//!                          last write is not the leader's
//!                       S: Error(Unproven) when the leader cannot check
//!                          that it is (set it aside, re-seed)
//! enrollment (on the control stream, token-authenticated followers):
//!   C: CertRequest      S: CertReply | Error
//! ```
//!
//! On the replication stream batches are consecutive: each starts at the
//! previous one's last sequence plus one. `Mark` is a barrier in that order:
//! the follower has applied exactly up to `seq` when it reads it.

use bytes::{Buf, BufMut, Bytes};
use ferry_engine::manifest::MAX_CHUNK_SIZE;
use ferry_engine::Seq;

/// The ALPN of ferry's protocol.
pub const ALPN: &[u8] = b"ferry/1";
/// The protocol version carried in `Hello` and `Welcome`. A node accepts a
/// `Hello` from [`MIN_PROTOCOL_VERSION`] up to its own version and answers
/// with the lower of the two, which both then speak. Version 3 added the
/// dictionary of a `ChunkRequest` ([`Codec::ZstdDict`]).
pub const PROTOCOL_VERSION: u16 = 3;
/// The most proofs of history a `Subscribe` carries.
pub const MAX_PROOFS: usize = 8;
/// The oldest version a node still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The size of a frame header.
pub const HEADER_LEN: usize = 5;
/// The largest control frame body.
pub const MAX_CONTROL_FRAME: u32 = 64 * 1024;
/// The largest manifest a peer may send (about 4 TiB of data at 2 MiB chunks).
pub const MAX_MANIFEST_FRAME: u32 = 64 << 20;
/// The largest chunk frame body: a chunk plus its small header.
pub const MAX_CHUNK_FRAME: u32 = MAX_CHUNK_SIZE + 64;
/// The largest batches frame body.
pub const MAX_BATCHES_FRAME: u32 = 64 << 20;
/// The most batches one `Batches` frame may carry.
pub const MAX_BATCHES_PER_FRAME: u32 = 100_000;
/// The longest node id.
pub const MAX_NODE_ID: usize = 64;
/// The longest error message.
pub const MAX_MESSAGE: usize = 4096;
/// The most terms a `History` frame carries.
pub const MAX_TERMS: usize = 1024;

/// Error codes carried by `Error` frames and QUIC close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer sent something that breaks the protocol.
    Protocol = 1,
    /// The peer did not authenticate.
    Unauthorized = 2,
    /// The peer speaks another protocol version.
    Version = 3,
    /// The peer belongs to another cluster.
    WrongCluster = 4,
    /// No such seed session, file or chunk.
    NotFound = 5,
    /// The node failed to do what was asked.
    Internal = 6,
    /// The node is not in a state to serve this (a follower asked to lead).
    Unavailable = 7,
    /// The WAL no longer holds what was asked for: re-seed.
    WalPurged = 8,
    /// The follower's history or last write is not the leader's: it holds
    /// writes the leader does not (re-seed, or stop).
    Diverged = 9,
    /// A file on the sending node failed its integrity check at rest (an SST
    /// whose block checksums do not match); it is not shipped.
    Corrupt = 10,
    /// The leader cannot check that the follower's operations are its own
    /// (no proof it can reach): the follower keeps a copy and re-seeds.
    Unproven = 11,
    /// An unknown code from a newer peer.
    Unknown = 0xffff,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Protocol,
            2 => Self::Unauthorized,
            3 => Self::Version,
            4 => Self::WrongCluster,
            5 => Self::NotFound,
            6 => Self::Internal,
            7 => Self::Unavailable,
            8 => Self::WalPurged,
            9 => Self::Diverged,
            10 => Self::Corrupt,
            11 => Self::Unproven,
            _ => Self::Unknown,
        }
    }
}

/// What a connecting node wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// A node that only seeds (one-shot `ferry seed`).
    Seeder = 1,
    /// A follower that seeds and replicates.
    Follower = 2,
    /// An operator tool reading status.
    Observer = 3,
}

impl Role {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Seeder),
            2 => Some(Self::Follower),
            3 => Some(Self::Observer),
            _ => None,
        }
    }
}

/// How a chunk's bytes are encoded in a `ChunkReply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// zstd with the raw bytes of the chunk that the request named as its
    /// dictionary (a chunk of the same file the requester already holds,
    /// verified). Only sent in answer to a request that named one.
    ZstdDict = 2,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        role: Role,
        node_id: String,
        cluster: [u8; 32],
        proof: [u8; 32],
    },
    Welcome {
        version: u16,
        node_id: String,
        latest_seq: Seq,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    ManifestRequest,
    ManifestReply {
        session: u64,
        manifest: Bytes,
    },
    /// `dict`: a chunk of the same file that the requester holds, verified,
    /// and offers as a compression dictionary (version 3; sent as four
    /// trailing bytes only when present).
    ChunkRequest {
        session: u64,
        file: u32,
        chunk: u32,
        dict: Option<u32>,
    },
    ChunkReply {
        codec: Codec,
        raw_len: u32,
        data: Bytes,
    },
    SeedDone {
        session: u64,
    },
    SeedDoneAck,
    /// Ask for every batch after `after`, then live batches. `history` is
    /// the term the follower last followed; `proof` the first sequence and
    /// hash of its last write (ending at `after`), so the leader can check
    /// that it holds the same.
    ///
    /// `seeded` is the sequence and manifest id of the seed checkpoint the
    /// follower was installed from, sent when it has written nothing since:
    /// the leader that issued that checkpoint accepts it as proof when its
    /// WAL no longer reaches back to `after`.
    Subscribe {
        after: Seq,
        history: Option<[u8; 16]>,
        proofs: Vec<(Seq, [u8; 32])>,
        seeded: Option<(Seq, [u8; 32])>,
    },
    /// The leader's replication history: `(term id, start)`, oldest first.
    History {
        terms: Vec<([u8; 16], Seq)>,
    },
    /// Consecutive batches: `(first sequence, count, RocksDB batch bytes)`.
    Batches {
        batches: Vec<(Seq, u32, Bytes)>,
    },
    /// The follower has durably applied everything up to `seq`.
    Applied {
        seq: Seq,
    },
    /// The leader's latest sequence, and whether this stream now serves
    /// the live feed (caught up) or the WAL (catching up).
    Heartbeat {
        leader_seq: Seq,
        live: bool,
    },
    /// A barrier: everything up to `seq` was sent before it, nothing after.
    Mark {
        seq: Seq,
    },
    /// A certificate signing request (PEM) for this node's key.
    CertRequest {
        csr_pem: String,
    },
    /// The signed certificate and the cluster CA (PEM).
    CertReply {
        cert_pem: String,
        ca_pem: String,
    },
    /// Asks a node what it is (on the control stream): a follower of a set
    /// of peers looks for the leader, a leader for a newer history.
    Probe,
    /// The answer to `Probe`: whether the node leads (and is not fenced),
    /// its latest sequence and its replication history (a follower's copy
    /// of its leader's), oldest term first.
    NodeInfo {
        leading: bool,
        latest_seq: Seq,
        terms: Vec<([u8; 16], Seq)>,
    },
}

/// The type byte of each frame.
mod ty {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const MANIFEST_REQUEST: u8 = 4;
    pub const MANIFEST_REPLY: u8 = 5;
    pub const CHUNK_REQUEST: u8 = 6;
    pub const CHUNK_REPLY: u8 = 7;
    pub const SEED_DONE: u8 = 8;
    pub const SEED_DONE_ACK: u8 = 9;
    pub const SUBSCRIBE: u8 = 10;
    pub const BATCHES: u8 = 11;
    pub const APPLIED: u8 = 12;
    pub const HEARTBEAT: u8 = 13;
    pub const MARK: u8 = 14;
    pub const CERT_REQUEST: u8 = 15;
    pub const CERT_REPLY: u8 = 16;
    pub const HISTORY: u8 = 17;
    pub const PROBE: u8 = 18;
    pub const NODE_INFO: u8 = 19;
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type byte names no frame.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The length prefix exceeds the maximum for the frame type.
    #[error("frame type {ty} of {len} bytes exceeds the maximum {max}")]
    TooLarge { ty: u8, len: u32, max: u32 },
    /// The body ended early or has bytes left over.
    #[error("frame type {ty} has a malformed body: {reason}")]
    Malformed { ty: u8, reason: &'static str },
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ty: u8,
    pub len: u32,
}

impl FrameHeader {
    /// Parses and bounds a header; nothing is allocated for a frame that is
    /// refused here.
    pub fn parse(b: [u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let ty = b[4];
        let max = max_len(ty).ok_or(DecodeError::UnknownType(ty))?;
        if len > max {
            return Err(DecodeError::TooLarge { ty, len, max });
        }
        Ok(Self { ty, len })
    }
}

fn max_len(ty: u8) -> Option<u32> {
    Some(match ty {
        ty::MANIFEST_REPLY => MAX_MANIFEST_FRAME,
        ty::CHUNK_REPLY => MAX_CHUNK_FRAME,
        ty::BATCHES => MAX_BATCHES_FRAME,
        1..=19 => MAX_CONTROL_FRAME,
        _ => return None,
    })
}

impl Frame {
    fn ty(&self) -> u8 {
        match self {
            Frame::Hello { .. } => ty::HELLO,
            Frame::Welcome { .. } => ty::WELCOME,
            Frame::Error { .. } => ty::ERROR,
            Frame::ManifestRequest => ty::MANIFEST_REQUEST,
            Frame::ManifestReply { .. } => ty::MANIFEST_REPLY,
            Frame::ChunkRequest { .. } => ty::CHUNK_REQUEST,
            Frame::ChunkReply { .. } => ty::CHUNK_REPLY,
            Frame::SeedDone { .. } => ty::SEED_DONE,
            Frame::SeedDoneAck => ty::SEED_DONE_ACK,
            Frame::Subscribe { .. } => ty::SUBSCRIBE,
            Frame::Batches { .. } => ty::BATCHES,
            Frame::Applied { .. } => ty::APPLIED,
            Frame::Heartbeat { .. } => ty::HEARTBEAT,
            Frame::Mark { .. } => ty::MARK,
            Frame::CertRequest { .. } => ty::CERT_REQUEST,
            Frame::CertReply { .. } => ty::CERT_REPLY,
            Frame::History { .. } => ty::HISTORY,
            Frame::Probe => ty::PROBE,
            Frame::NodeInfo { .. } => ty::NODE_INFO,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Error { .. } => "Error",
            Frame::ManifestRequest => "ManifestRequest",
            Frame::ManifestReply { .. } => "ManifestReply",
            Frame::ChunkRequest { .. } => "ChunkRequest",
            Frame::ChunkReply { .. } => "ChunkReply",
            Frame::SeedDone { .. } => "SeedDone",
            Frame::SeedDoneAck => "SeedDoneAck",
            Frame::Subscribe { .. } => "Subscribe",
            Frame::Batches { .. } => "Batches",
            Frame::Applied { .. } => "Applied",
            Frame::Heartbeat { .. } => "Heartbeat",
            Frame::Mark { .. } => "Mark",
            Frame::CertRequest { .. } => "CertRequest",
            Frame::CertReply { .. } => "CertReply",
            Frame::History { .. } => "History",
            Frame::Probe => "Probe",
            Frame::NodeInfo { .. } => "NodeInfo",
        }
    }

    /// Encodes the header and the body of small frames; for frames that
    /// carry bulk bytes (`ManifestReply`, `ChunkReply`) the bulk is returned
    /// separately so that it is written to the stream without a copy.
    pub fn encode_split(&self, out: &mut Vec<u8>) -> Option<Bytes> {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u8(self.ty());
        let mut bulk = None;
        match self {
            Frame::Hello {
                version,
                role,
                node_id,
                cluster,
                proof,
            } => {
                out.put_u16_le(*version);
                out.put_u8(*role as u8);
                put_str8(out, node_id);
                out.put_slice(cluster);
                out.put_slice(proof);
            }
            Frame::Welcome {
                version,
                node_id,
                latest_seq,
            } => {
                out.put_u16_le(*version);
                put_str8(out, node_id);
                out.put_u64_le(*latest_seq);
            }
            Frame::Error { code, message } => {
                out.put_u16_le(*code as u16);
                let m = truncate(message, MAX_MESSAGE);
                out.put_u16_le(m.len() as u16);
                out.put_slice(m.as_bytes());
            }
            Frame::ManifestRequest | Frame::SeedDoneAck | Frame::Probe => {}
            Frame::ManifestReply { session, manifest } => {
                out.put_u64_le(*session);
                bulk = Some(manifest.clone());
            }
            Frame::ChunkRequest {
                session,
                file,
                chunk,
                dict,
            } => {
                out.put_u64_le(*session);
                out.put_u32_le(*file);
                out.put_u32_le(*chunk);
                if let Some(d) = dict {
                    out.put_u32_le(*d);
                }
            }
            Frame::ChunkReply {
                codec,
                raw_len,
                data,
            } => {
                out.put_u8(*codec as u8);
                out.put_u32_le(*raw_len);
                bulk = Some(data.clone());
            }
            Frame::SeedDone { session } => out.put_u64_le(*session),
            Frame::Subscribe {
                after,
                history,
                proofs,
                seeded,
            } => {
                out.put_u64_le(*after);
                // One proof keeps version 2's layout (flag 2); several are
                // counted (flag 4); a seed checkpoint follows them (flag 8).
                let proofs = &proofs[..proofs.len().min(MAX_PROOFS)];
                let flags = u8::from(history.is_some())
                    | (u8::from(proofs.len() == 1) << 1)
                    | (u8::from(proofs.len() > 1) << 2)
                    | (u8::from(seeded.is_some()) << 3);
                out.put_u8(flags);
                if let Some(h) = history {
                    out.put_slice(h);
                }
                if proofs.len() > 1 {
                    out.put_u8(proofs.len() as u8);
                }
                for (first, hash) in proofs {
                    out.put_u64_le(*first);
                    out.put_slice(hash);
                }
                if let Some((seq, id)) = seeded {
                    out.put_u64_le(*seq);
                    out.put_slice(id);
                }
            }
            Frame::History { terms } => put_terms(out, terms),
            Frame::NodeInfo {
                leading,
                latest_seq,
                terms,
            } => {
                out.put_u8(u8::from(*leading));
                out.put_u64_le(*latest_seq);
                put_terms(out, terms);
            }
            Frame::Batches { batches } => {
                out.put_u32_le(batches.len() as u32);
                for (first, count, data) in batches {
                    out.put_u64_le(*first);
                    out.put_u32_le(*count);
                    out.put_u32_le(data.len() as u32);
                    out.put_slice(data);
                }
            }
            Frame::Applied { seq } => out.put_u64_le(*seq),
            Frame::Heartbeat { leader_seq, live } => {
                out.put_u64_le(*leader_seq);
                out.put_u8(u8::from(*live));
            }
            Frame::Mark { seq } => out.put_u64_le(*seq),
            Frame::CertRequest { csr_pem } => put_str16(out, csr_pem),
            Frame::CertReply { cert_pem, ca_pem } => {
                put_str16(out, cert_pem);
                put_str16(out, ca_pem);
            }
        }
        let len = out.len() - start - HEADER_LEN + bulk.as_ref().map_or(0, |b| b.len());
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        bulk
    }

    /// Encodes the whole frame into one buffer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Some(bulk) = self.encode_split(out) {
            out.extend_from_slice(&bulk);
        }
    }

    /// Decodes a frame body of the type named in its header.
    pub fn decode(header: FrameHeader, mut body: Bytes) -> Result<Self, DecodeError> {
        let t = header.ty;
        let short = DecodeError::Malformed {
            ty: t,
            reason: "truncated",
        };
        macro_rules! need {
            ($n:expr) => {
                if body.remaining() < $n {
                    return Err(short);
                }
            };
        }
        let frame = match t {
            ty::HELLO => {
                need!(3);
                let version = body.get_u16_le();
                let role = Role::from_u8(body.get_u8()).ok_or(DecodeError::Malformed {
                    ty: t,
                    reason: "unknown role",
                })?;
                let node_id = get_str8(&mut body, t)?;
                need!(64);
                let mut cluster = [0u8; 32];
                body.copy_to_slice(&mut cluster);
                let mut proof = [0u8; 32];
                body.copy_to_slice(&mut proof);
                Frame::Hello {
                    version,
                    role,
                    node_id,
                    cluster,
                    proof,
                }
            }
            ty::WELCOME => {
                need!(2);
                let version = body.get_u16_le();
                let node_id = get_str8(&mut body, t)?;
                need!(8);
                Frame::Welcome {
                    version,
                    node_id,
                    latest_seq: body.get_u64_le(),
                }
            }
            ty::ERROR => {
                need!(4);
                let code = ErrorCode::from_u16(body.get_u16_le());
                let len = body.get_u16_le() as usize;
                if len > MAX_MESSAGE {
                    return Err(DecodeError::Malformed {
                        ty: t,
                        reason: "message too long",
                    });
                }
                need!(len);
                let message = String::from_utf8_lossy(&body.split_to(len)).into_owned();
                Frame::Error { code, message }
            }
            ty::MANIFEST_REQUEST => Frame::ManifestRequest,
            ty::SEED_DONE_ACK => Frame::SeedDoneAck,
            ty::MANIFEST_REPLY => {
                need!(8);
                let session = body.get_u64_le();
                let manifest = body.split_to(body.remaining());
                Frame::ManifestReply { session, manifest }
            }
            ty::CHUNK_REQUEST => {
                need!(16);
                let (session, file, chunk) =
                    (body.get_u64_le(), body.get_u32_le(), body.get_u32_le());
                let dict = if body.remaining() >= 4 {
                    Some(body.get_u32_le())
                } else {
                    None
                };
                Frame::ChunkRequest {
                    session,
                    file,
                    chunk,
                    dict,
                }
            }
            ty::CHUNK_REPLY => {
                need!(5);
                let codec = match body.get_u8() {
                    0 => Codec::Raw,
                    1 => Codec::Zstd,
                    2 => Codec::ZstdDict,
                    _ => {
                        return Err(DecodeError::Malformed {
                            ty: t,
                            reason: "unknown codec",
                        })
                    }
                };
                let raw_len = body.get_u32_le();
                if raw_len > MAX_CHUNK_SIZE {
                    return Err(DecodeError::Malformed {
                        ty: t,
                        reason: "chunk larger than the maximum",
                    });
                }
                let data = body.split_to(body.remaining());
                Frame::ChunkReply {
                    codec,
                    raw_len,
                    data,
                }
            }
            ty::SEED_DONE => {
                need!(8);
                Frame::SeedDone {
                    session: body.get_u64_le(),
                }
            }
            ty::SUBSCRIBE => {
                need!(9);
                let after = body.get_u64_le();
                let flags = body.get_u8();
                if flags & !0b1111 != 0 || flags & 0b110 == 0b110 {
                    return Err(DecodeError::Malformed {
                        ty: t,
                        reason: "unknown flags",
                    });
                }
                let history = if flags & 1 != 0 {
                    need!(16);
                    let mut h = [0u8; 16];
                    body.copy_to_slice(&mut h);
                    Some(h)
                } else {
                    None
                };
                let n = if flags & 2 != 0 {
                    1
                } else if flags & 4 != 0 {
                    need!(1);
                    let n = body.get_u8() as usize;
                    if !(2..=MAX_PROOFS).contains(&n) {
                        return Err(DecodeError::Malformed {
                            ty: t,
                            reason: "proof count out of range",
                        });
                    }
                    n
                } else {
                    0
                };
                let mut proofs = Vec::with_capacity(n);
                for _ in 0..n {
                    need!(40);
                    let first = body.get_u64_le();
                    let mut hash = [0u8; 32];
                    body.copy_to_slice(&mut hash);
                    proofs.push((first, hash));
                }
                let seeded = if flags & 8 != 0 {
                    need!(40);
                    let seq = body.get_u64_le();
                    let mut id = [0u8; 32];
                    body.copy_to_slice(&mut id);
                    Some((seq, id))
                } else {
                    None
                };
                Frame::Subscribe {
                    after,
                    history,
                    proofs,
                    seeded,
                }
            }
            ty::HISTORY => Frame::History {
                terms: get_terms(&mut body, t)?,
            },
            ty::PROBE => Frame::Probe,
            ty::NODE_INFO => {
                need!(9);
                let leading = get_flag(&mut body, t)?;
                let latest_seq = body.get_u64_le();
                Frame::NodeInfo {
                    leading,
                    latest_seq,
                    terms: get_terms(&mut body, t)?,
                }
            }
            ty::BATCHES => {
                need!(4);
                let n = body.get_u32_le();
                if n > MAX_BATCHES_PER_FRAME {
                    return Err(DecodeError::Malformed {
                        ty: t,
                        reason: "too many batches",
                    });
                }
                // Each batch takes at least 16 bytes: bound the allocation by the body.
                if (n as usize).saturating_mul(16) > body.remaining() {
                    return Err(short);
                }
                let mut batches = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    need!(16);
                    let first = body.get_u64_le();
                    let count = body.get_u32_le();
                    let len = body.get_u32_le() as usize;
                    need!(len);
                    batches.push((first, count, body.split_to(len)));
                }
                Frame::Batches { batches }
            }
            ty::APPLIED => {
                need!(8);
                Frame::Applied {
                    seq: body.get_u64_le(),
                }
            }
            ty::HEARTBEAT => {
                need!(9);
                let leader_seq = body.get_u64_le();
                let live = get_flag(&mut body, t)?;
                Frame::Heartbeat { leader_seq, live }
            }
            ty::MARK => {
                need!(8);
                Frame::Mark {
                    seq: body.get_u64_le(),
                }
            }
            ty::CERT_REQUEST => Frame::CertRequest {
                csr_pem: get_str16(&mut body, t)?,
            },
            ty::CERT_REPLY => {
                let cert_pem = get_str16(&mut body, t)?;
                Frame::CertReply {
                    cert_pem,
                    ca_pem: get_str16(&mut body, t)?,
                }
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if body.has_remaining() {
            return Err(DecodeError::Malformed {
                ty: t,
                reason: "trailing bytes",
            });
        }
        Ok(frame)
    }
}

/// A boolean byte: 0 or 1, anything else is malformed.
fn get_flag(body: &mut Bytes, t: u8) -> Result<bool, DecodeError> {
    match body.get_u8() {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Malformed {
            ty: t,
            reason: "bad flag",
        }),
    }
}

/// Terms as a count and `(id, start)` pairs; only the newest `MAX_TERMS`.
fn put_terms(out: &mut Vec<u8>, terms: &[([u8; 16], Seq)]) {
    let n = terms.len().min(MAX_TERMS);
    out.put_u16_le(n as u16);
    for (id, start) in &terms[terms.len() - n..] {
        out.put_slice(id);
        out.put_u64_le(*start);
    }
}

fn get_terms(body: &mut Bytes, t: u8) -> Result<Vec<([u8; 16], Seq)>, DecodeError> {
    let short = DecodeError::Malformed {
        ty: t,
        reason: "truncated",
    };
    if body.remaining() < 2 {
        return Err(short);
    }
    let n = body.get_u16_le() as usize;
    if n > MAX_TERMS {
        return Err(DecodeError::Malformed {
            ty: t,
            reason: "too many terms",
        });
    }
    if body.remaining() < n * 24 {
        return Err(short);
    }
    let mut terms = Vec::with_capacity(n);
    for _ in 0..n {
        let mut id = [0u8; 16];
        body.copy_to_slice(&mut id);
        terms.push((id, body.get_u64_le()));
    }
    Ok(terms)
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s, MAX_NODE_ID);
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn get_str8(body: &mut Bytes, t: u8) -> Result<String, DecodeError> {
    if !body.has_remaining() {
        return Err(DecodeError::Malformed {
            ty: t,
            reason: "truncated",
        });
    }
    let len = body.get_u8() as usize;
    take_str(body, t, len, MAX_NODE_ID)
}

/// Takes a UTF-8 string of `len` bytes, at most `max`, from the body.
fn take_str(body: &mut Bytes, t: u8, len: usize, max: usize) -> Result<String, DecodeError> {
    if len > max || body.remaining() < len {
        return Err(DecodeError::Malformed {
            ty: t,
            reason: "bad string length",
        });
    }
    String::from_utf8(body.split_to(len).to_vec()).map_err(|_| DecodeError::Malformed {
        ty: t,
        reason: "string is not utf-8",
    })
}

/// The longest PEM string a frame carries.
pub const MAX_PEM: usize = 16 * 1024;

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s, MAX_PEM);
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn get_str16(body: &mut Bytes, t: u8) -> Result<String, DecodeError> {
    if body.remaining() < 2 {
        return Err(DecodeError::Malformed {
            ty: t,
            reason: "truncated",
        });
    }
    let len = body.get_u16_le() as usize;
    take_str(body, t, len, MAX_PEM)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: &Frame) -> Frame {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let header = FrameHeader::parse(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.len as usize, buf.len() - HEADER_LEN);
        Frame::decode(header, Bytes::from(buf[HEADER_LEN..].to_vec())).unwrap()
    }

    /// The wire format is pinned: these bytes must not change by accident.
    #[test]
    fn golden_bytes() {
        let mut buf = Vec::new();
        Frame::ChunkRequest {
            session: 0x0102030405060708,
            file: 3,
            chunk: 0x10,
            dict: None,
        }
        .encode(&mut buf);
        assert_eq!(
            hex::encode(&buf),
            concat!(
                "10000000",         // body length 16
                "06",               // ChunkRequest
                "0807060504030201", // session
                "03000000",         // file index
                "10000000",         // chunk index
            )
        );
        buf.clear();
        Frame::ChunkRequest {
            session: 0x0102030405060708,
            file: 3,
            chunk: 0x10,
            dict: Some(0),
        }
        .encode(&mut buf);
        assert_eq!(
            hex::encode(&buf),
            concat!(
                "14000000",         // body length 20
                "06",               // ChunkRequest
                "0807060504030201", // session
                "03000000",         // file index
                "10000000",         // chunk index
                "00000000",         // dictionary: chunk 0
            )
        );
        buf.clear();
        Frame::Hello {
            version: 1,
            role: Role::Follower,
            node_id: "n1".into(),
            cluster: [0xaa; 32],
            proof: [0xbb; 32],
        }
        .encode(&mut buf);
        assert_eq!(
            hex::encode(&buf[..11]),
            concat!(
                "46000000", /* body length 70 */
                "01",       /* Hello */
                "0100",     /* version 1 */
                "02",       /* follower */
                "02",       /* id length */
                "6e31"      /* "n1" */
            )
        );
        buf.clear();
        Frame::ChunkReply {
            codec: Codec::Zstd,
            raw_len: 5,
            data: Bytes::from_static(b"abc"),
        }
        .encode(&mut buf);
        assert_eq!(
            hex::encode(&buf),
            concat!(
                "08000000", "07",       /* ChunkReply */
                "01",       /* zstd */
                "05000000", /* raw length */
                "616263"
            )
        );
        buf.clear();
        Frame::Batches {
            batches: vec![(7, 1, Bytes::from_static(b"xy"))],
        }
        .encode(&mut buf);
        assert_eq!(
            hex::encode(&buf),
            concat!(
                "16000000",
                "0b",               /* Batches */
                "01000000",         /* one batch */
                "0700000000000000", /* first */
                "01000000",         /* count */
                "02000000",         /* length */
                "7879"
            )
        );
    }

    #[test]
    fn golden_replication_frames() {
        let enc = |f: Frame| {
            let mut b = Vec::new();
            f.encode(&mut b);
            hex::encode(b)
        };
        assert_eq!(
            enc(Frame::Subscribe {
                after: 9,
                history: None,
                proofs: vec![],
                seeded: None,
            }),
            concat!("09000000", "0a", "0900000000000000", "00")
        );
        assert_eq!(
            enc(Frame::Subscribe {
                after: 9,
                history: None,
                proofs: vec![],
                seeded: Some((9, [0xee; 32])),
            }),
            concat!(
                "31000000",
                "0a",
                "0900000000000000",
                "08",
                "0900000000000000",
                "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"
            )
        );
        assert_eq!(
            enc(Frame::Subscribe {
                after: 9,
                history: Some([0xab; 16]),
                proofs: vec![(7, [0xcd; 32])],
                seeded: None,
            }),
            concat!(
                "41000000",
                "0a",
                "0900000000000000",
                "03",
                "abababababababababababababababab",
                "0700000000000000",
                "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
            )
        );
        assert_eq!(
            enc(Frame::Subscribe {
                after: 9,
                history: None,
                proofs: vec![(9, [0x01; 32]), (1, [0x02; 32])],
                seeded: None,
            }),
            concat!(
                "5a000000",
                "0a",
                "0900000000000000",
                "04",
                "02",
                "0900000000000000",
                "0101010101010101010101010101010101010101010101010101010101010101",
                "0100000000000000",
                "0202020202020202020202020202020202020202020202020202020202020202"
            )
        );
        assert_eq!(
            enc(Frame::History {
                terms: vec![([1; 16], 5)]
            }),
            concat!(
                "1a000000",
                "11",
                "0100",
                "01010101010101010101010101010101",
                "0500000000000000"
            )
        );
        assert_eq!(
            enc(Frame::Applied { seq: 258 }),
            concat!("08000000", "0c", "0201000000000000")
        );
        assert_eq!(
            enc(Frame::Heartbeat {
                leader_seq: 1,
                live: true
            }),
            concat!("09000000", "0d", "0100000000000000", "01")
        );
        assert_eq!(
            enc(Frame::Mark { seq: 2 }),
            concat!("08000000", "0e", "0200000000000000")
        );
        assert_eq!(enc(Frame::Probe), concat!("00000000", "12"));
        assert_eq!(
            enc(Frame::NodeInfo {
                leading: true,
                latest_seq: 3,
                terms: vec![([2; 16], 1)]
            }),
            concat!(
                "23000000",
                "13",
                "01",
                "0300000000000000",
                "0100",
                "02020202020202020202020202020202",
                "0100000000000000"
            )
        );
    }

    #[test]
    fn oversize_frames_are_refused_from_the_header() {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&(MAX_CONTROL_FRAME + 1).to_le_bytes());
        h[4] = ty::HELLO;
        assert!(matches!(
            FrameHeader::parse(h),
            Err(DecodeError::TooLarge { .. })
        ));
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        h[4] = ty::CHUNK_REPLY;
        assert!(matches!(
            FrameHeader::parse(h),
            Err(DecodeError::TooLarge { .. })
        ));
        h[4] = 200;
        assert_eq!(FrameHeader::parse(h), Err(DecodeError::UnknownType(200)));
    }

    #[test]
    fn batches_count_is_bounded_by_the_body() {
        let mut body = Vec::new();
        body.put_u32_le(50_000);
        let h = FrameHeader {
            ty: ty::BATCHES,
            len: body.len() as u32,
        };
        assert!(Frame::decode(h, Bytes::from(body)).is_err());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from);
        prop_oneof![
            (
                any::<u16>(),
                1u8..=3,
                "[a-z0-9-]{0,64}",
                any::<[u8; 32]>(),
                any::<[u8; 32]>()
            )
                .prop_map(|(version, r, node_id, cluster, proof)| Frame::Hello {
                    version,
                    role: Role::from_u8(r).unwrap(),
                    node_id,
                    cluster,
                    proof
                }),
            (any::<u16>(), "[a-z0-9-]{0,64}", any::<u64>()).prop_map(
                |(version, node_id, latest_seq)| Frame::Welcome {
                    version,
                    node_id,
                    latest_seq
                }
            ),
            (1u16..=8, ".{0,100}").prop_map(|(c, message)| Frame::Error {
                code: ErrorCode::from_u16(c),
                message
            }),
            Just(Frame::ManifestRequest),
            (any::<u64>(), bytes.clone())
                .prop_map(|(session, manifest)| Frame::ManifestReply { session, manifest }),
            (
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(session, file, chunk, dict)| Frame::ChunkRequest {
                    session,
                    file,
                    chunk,
                    dict,
                }),
            (0..3u8, 0..=MAX_CHUNK_SIZE, bytes.clone()).prop_map(|(z, raw_len, data)| {
                Frame::ChunkReply {
                    codec: [Codec::Raw, Codec::Zstd, Codec::ZstdDict][usize::from(z)],
                    raw_len,
                    data,
                }
            }),
            any::<u64>().prop_map(|session| Frame::SeedDone { session }),
            Just(Frame::SeedDoneAck),
            (
                any::<u64>(),
                proptest::option::of(any::<[u8; 16]>()),
                proptest::collection::vec((any::<u64>(), any::<[u8; 32]>()), 0..=MAX_PROOFS),
                proptest::option::of((any::<u64>(), any::<[u8; 32]>())),
            )
                .prop_map(|(after, history, proofs, seeded)| Frame::Subscribe {
                    after,
                    history,
                    proofs,
                    seeded,
                }),
            proptest::collection::vec((any::<[u8; 16]>(), any::<u64>()), 0..5)
                .prop_map(|terms| Frame::History { terms }),
            proptest::collection::vec((any::<u64>(), any::<u32>(), bytes), 0..5)
                .prop_map(|batches| Frame::Batches { batches }),
            any::<u64>().prop_map(|seq| Frame::Applied { seq }),
            (any::<u64>(), any::<bool>())
                .prop_map(|(leader_seq, live)| Frame::Heartbeat { leader_seq, live }),
            any::<u64>().prop_map(|seq| Frame::Mark { seq }),
            ".{0,300}".prop_map(|csr_pem| Frame::CertRequest { csr_pem }),
            (".{0,300}", ".{0,300}")
                .prop_map(|(cert_pem, ca_pem)| Frame::CertReply { cert_pem, ca_pem }),
            Just(Frame::Probe),
            (
                any::<bool>(),
                any::<u64>(),
                proptest::collection::vec((any::<[u8; 16]>(), any::<u64>()), 0..5)
            )
                .prop_map(|(leading, latest_seq, terms)| Frame::NodeInfo {
                    leading,
                    latest_seq,
                    terms
                }),
        ]
    }

    proptest! {
        #[test]
        fn codec_round_trips(f in arb_frame()) {
            prop_assert_eq!(round_trip(&f), f);
        }

        #[test]
        fn decode_never_panics(ty in 0u8..24, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(FrameHeader { ty, len: body.len() as u32 }, Bytes::from(body));
        }
    }
}
