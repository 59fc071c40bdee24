//! ferry's QUIC transfer: the wire protocol, authentication, and both ends
//! of a seed (moving a checkpoint to a new node).
//!
//! - [`protocol`]: frames and their codec, with no I/O.
//! - [`auth`]: the cluster CA, join tokens, TLS configuration.
//! - [`endpoint`]: quinn endpoints tuned for bulk transfer.
//! - [`leader`]: the serving side (seeds from checkpoints).
//! - [`seed`]: the receiving side (verified, parallel, resumable).
//! - [`replication`], [`follower`]: WAL catch-up and the live stream, both sides.
//! - [`client`], [`wire`]: connecting, and frames over streams.
//! - [`dict`]: chunks as compression dictionaries for their files.
//! - [`priority`]: seed work on `SCHED_IDLE` threads.
//! - [`netsim`]: a UDP impairment proxy (loss, delay, reordering, blackouts)
//!   for tests and `ferry bench`.
//!
//! Only this crate names quinn types.

pub mod auth;
pub mod client;
pub mod congestion;
pub mod dict;
pub mod endpoint;
pub mod follower;
pub mod leader;
pub mod netsim;
pub mod priority;
pub mod protocol;
pub mod replication;
pub mod seed;
pub mod wire;

pub use auth::{ClientAuth, JoinToken, NodeAuth};
pub use endpoint::{Congestion, TransportOptions};
pub use leader::{Compression, ServeOptions, Server};
pub use priority::SeedPriority;
pub use quinn;
pub use seed::{seed, Phases, Progress, SeedConfig, SeedError, SeedReport};
