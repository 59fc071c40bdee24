//! Replication, follower side: subscribe from the local sequence, apply
//! every batch in order, acknowledge what is durable, reconnect with
//! back-off, and stop on divergence or a purged WAL (the caller re-seeds).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{
    Digest, Error as EngineError, History, HistoryId, RawBatch, Seq, Store, Term, WriteId,
};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::ClientAuth;
use crate::client::{Client, ConnectError};
use crate::endpoint::TransportOptions;
use crate::protocol::{ErrorCode, Frame, Role};
use crate::wire::{read_frame, write_frame, WireError};

/// How a follower reaches its leader.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub leader: SocketAddr,
    pub auth: ClientAuth,
    pub node_id: String,
    pub transport: TransportOptions,
    /// Acknowledge (and fsync the WAL) at most this often.
    pub ack_interval: Duration,
    /// How long one connection attempt may take before the next one starts
    /// (a restarted leader is then found within about this long).
    pub connect_timeout: Duration,
    /// The longest wait between connection attempts.
    pub max_backoff: Duration,
}

impl ReplicaConfig {
    pub fn new(leader: SocketAddr, auth: ClientAuth, node_id: String) -> Self {
        Self {
            leader,
            auth,
            node_id,
            transport: TransportOptions::default(),
            ack_interval: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Why replication stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEnd {
    /// The leader's WAL no longer holds what this follower needs: re-seed.
    WalPurged { message: String },
    /// The follower's data and the leader's stream disagree: stop.
    Diverged { message: String },
    /// The leader cannot check that this follower holds only its operations
    /// (its WAL no longer reaches the follower's position): keep the data
    /// aside, then re-seed.
    Unproven { message: String },
    /// Shutdown was requested.
    Shutdown,
}

/// What the follower side reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaSnapshot {
    /// `connecting`, `catching-up` or `live`.
    pub state: &'static str,
    pub leader_seq: Seq,
    pub applied_seq: Seq,
    pub acked_seq: Seq,
    pub batches_applied: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Whether a stream to the leader is open now.
    pub connected: bool,
    /// The leader's current history id, as last received.
    pub history: Option<String>,
    /// When the leader was last heard from (any frame; it sends a heartbeat
    /// at least every 250 ms), in milliseconds since the Unix epoch.
    pub last_contact_unix_ms: Option<u64>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Shared, live state of the follower side.
#[derive(Default)]
pub struct ReplicaStatus {
    inner: Mutex<ReplicaSnapshot>,
    /// Digests taken at marks: `None` while computing.
    digests: Mutex<BTreeMap<Seq, Option<Result<Digest, String>>>>,
}

impl ReplicaStatus {
    pub fn snapshot(&self) -> ReplicaSnapshot {
        self.inner.lock().clone()
    }

    /// The digest taken at the mark `seq`: `None` if no mark arrived for it,
    /// `Some(None)` while it is being computed.
    pub fn marked_digest(&self, seq: Seq) -> Option<Option<Result<Digest, String>>> {
        self.digests.lock().get(&seq).cloned()
    }

    fn update(&self, f: impl FnOnce(&mut ReplicaSnapshot)) {
        f(&mut self.inner.lock());
    }

    fn start_digest(self: &Arc<Self>, store: &Store, seq: Seq) {
        let local = store.latest_seq();
        if local != seq {
            tracing::warn!(
                mark = seq,
                local,
                "a mark arrived at another sequence; ignoring it"
            );
            return;
        }
        {
            let mut d = self.digests.lock();
            d.insert(seq, None);
            while d.len() > 16 {
                let first = *d.keys().next().unwrap_or(&seq);
                d.remove(&first);
            }
        }
        // The snapshot is taken before this returns, so no later batch is in it.
        match store.spawn_digest(|_| {}) {
            Ok((_, handle)) => {
                let this = Arc::clone(self);
                std::thread::spawn(move || {
                    let r = match handle.join() {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err("digest thread panicked".into()),
                    };
                    this.digests.lock().insert(seq, Some(r));
                });
            }
            Err(e) => {
                self.digests.lock().insert(seq, Some(Err(e.to_string())));
            }
        }
    }
}

/// Why one connection's stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the leader refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("bad batch from the leader: {0}")]
    BadBatch(EngineError),
    #[error("apply: {0}")]
    Apply(EngineError),
    #[error("shutdown")]
    Shutdown,
}

/// Replicates from the leader into `store` until replication must stop.
pub async fn replicate(
    store: Store,
    cfg: ReplicaConfig,
    status: Arc<ReplicaStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> ReplicationEnd {
    let endpoint = match crate::endpoint::client_endpoint(
        crate::endpoint::unspecified_for(cfg.leader),
        &cfg.transport,
    ) {
        Ok(e) => e,
        Err(e) => {
            return ReplicationEnd::Diverged {
                message: format!("cannot create a QUIC endpoint: {e}"),
            }
        }
    };
    let mut backoff = Duration::from_millis(100);
    let end = loop {
        if *shutdown.borrow() {
            break ReplicationEnd::Shutdown;
        }
        status.update(|s| s.state = "connecting");
        let started = Instant::now();
        let r = stream_once(&endpoint, &store, &cfg, &status, &mut shutdown).await;
        let err = match r {
            Ok(()) | Err(StreamError::Shutdown) => break ReplicationEnd::Shutdown,
            Err(StreamError::Refused {
                code: ErrorCode::WalPurged,
                message,
            }) => break ReplicationEnd::WalPurged { message },
            Err(StreamError::Refused {
                code: ErrorCode::Unproven,
                message,
            }) => break ReplicationEnd::Unproven { message },
            Err(StreamError::Apply(EngineError::Divergence(d))) => {
                break ReplicationEnd::Diverged {
                    message: d.to_string(),
                }
            }
            Err(StreamError::Refused {
                code: ErrorCode::Diverged,
                message,
            }) => break ReplicationEnd::Diverged { message },
            Err(StreamError::Refused {
                code: ErrorCode::Protocol,
                message,
            }) if message.contains("diverged") => break ReplicationEnd::Diverged { message },
            Err(StreamError::Apply(e)) => {
                break ReplicationEnd::Diverged {
                    message: format!("cannot apply: {e}"),
                }
            }
            Err(e) => e,
        };
        let was_connected = status.snapshot().connected;
        // A stream that ran a while is a fresh start; quick failures back
        // off. Attempts begin at most every `backoff`: an attempt that
        // itself timed out waits no longer.
        let ran = started.elapsed();
        if was_connected && ran >= Duration::from_secs(1) {
            backoff = Duration::from_millis(100);
        }
        if was_connected {
            tracing::warn!(leader = %cfg.leader, error = %err, retry_in = ?backoff, "replication interrupted");
        } else {
            tracing::debug!(leader = %cfg.leader, error = %err, retry_in = ?backoff, "leader still unreachable");
        }
        status.update(|s| {
            s.reconnects += u64::from(was_connected);
            s.connected = false;
            s.last_error = Some(err.to_string());
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff.saturating_sub(ran)) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    };
    status.update(|s| s.connected = false);
    endpoint.close(0u32.into(), b"bye");
    end
}

async fn stream_once(
    endpoint: &quinn::Endpoint,
    store: &Store,
    cfg: &ReplicaConfig,
    status: &Arc<ReplicaStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let client = tokio::time::timeout(
        cfg.connect_timeout,
        Client::connect(
            endpoint,
            cfg.leader,
            &cfg.auth,
            &cfg.transport,
            &cfg.node_id,
            Role::Follower,
        ),
    )
    .await
    .map_err(|_| ConnectError::Timeout {
        peer: cfg.leader,
        after: cfg.connect_timeout,
    })??;
    let (mut send, mut recv) = client.open().await?;
    // What this follower holds: the term it followed and its last write,
    // for the leader to check before it sends anything.
    let s2 = store.clone();
    let (after, history, proofs) = tokio::task::spawn_blocking(move || {
        // The leader counts `after` as acknowledged: make it durable first
        // (a restart after a crash may hold applied writes never synced).
        let synced = s2.sync_wal();
        let history = History::load(s2.path()).ok().flatten();
        synced.map(|()| (s2.latest_seq(), history, local_proofs(&s2)))
    })
    .await
    .map_err(|e| {
        StreamError::Apply(EngineError::Malformed {
            what: "store task",
            reason: e.to_string(),
        })
    })?
    .map_err(StreamError::Apply)?;
    write_frame(
        &mut send,
        &Frame::Subscribe {
            after,
            history: history.as_ref().map(|h| h.current().id.0),
            proofs: proofs.0.iter().map(|w| (w.first, w.hash)).collect(),
            seeded: proofs.1.map(|s| (s.seq, s.manifest)),
        },
    )
    .await?;
    tracing::info!(leader = %cfg.leader, after, history = %history.as_ref().map(|h| h.current().id.to_string()).unwrap_or_default(), proofs = proofs.0.len(), seeded = proofs.1.is_some(), "subscribed");
    status.update(|s| {
        s.state = "catching-up";
        s.applied_seq = after;
        s.leader_seq = s.leader_seq.max(client.latest_seq);
        s.connected = true;
        s.last_contact_unix_ms = Some(unix_ms());
    });
    // Acknowledgements run beside the apply loop: an fsync never delays
    // applying the next batch.
    let mut acker = AbortOnDrop(tokio::spawn(ack_loop(
        store.clone(),
        send,
        after,
        cfg.ack_interval,
        Arc::clone(status),
    )));
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut recv) => f?,
            r = &mut acker.0 => {
                return match r {
                    Ok(Err(e)) => Err(e),
                    _ => Err(WireError::FinishedEarly(0).into()),
                };
            }
            _ = shutdown.changed() => {
                let applied = store.latest_seq();
                let _ = on_store(store, |s| s.sync_wal()).await;
                if let Some(w) = store.last_write() {
                    let _ = on_store(store, move |s| save_proof(s, &w)).await;
                }
                tracing::info!(applied, "replication stopped for shutdown");
                return Err(StreamError::Shutdown);
            }
        };
        if frame.is_some() {
            let now = unix_ms();
            status.update(|s| s.last_contact_unix_ms = Some(now));
        }
        match frame {
            Some(Frame::Batches { batches }) => {
                // Parse everything before applying anything: bytes from the
                // wire are untrusted.
                let parsed = batches
                    .into_iter()
                    .map(|(first, _count, data)| RawBatch::parse(first, data))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StreamError::BadBatch)?;
                let n = parsed.len() as u64;
                on_store(store, move |s| s.apply_many(&parsed)).await?;
                let applied = store.latest_seq();
                status.update(|s| {
                    s.applied_seq = applied;
                    s.batches_applied += n;
                    s.leader_seq = s.leader_seq.max(applied);
                });
            }
            Some(Frame::Heartbeat { leader_seq, live }) => {
                status.update(|s| {
                    s.leader_seq = s.leader_seq.max(leader_seq);
                    s.state = if live { "live" } else { "catching-up" };
                });
            }
            Some(Frame::Mark { seq }) => status.start_digest(store, seq),
            Some(Frame::History { terms }) => {
                let h = History {
                    terms: terms
                        .into_iter()
                        .map(|(id, start)| Term {
                            id: HistoryId(id),
                            start,
                        })
                        .collect(),
                };
                status.update(|s| s.history = Some(h.current().id.to_string()));
                let data = store.path().to_path_buf();
                on_store(store, move |_| {
                    if History::load(&data).ok().flatten().as_ref() != Some(&h) {
                        h.save(&data)?;
                    }
                    Ok(())
                })
                .await?;
            }
            Some(Frame::Error { code, message }) => {
                return Err(StreamError::Refused { code, message })
            }
            Some(other) => {
                return Err(WireError::Unexpected {
                    got: other.name(),
                    state: "replicating",
                }
                .into())
            }
            None => return Err(WireError::FinishedEarly(0).into()),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs blocking store work (apply, fsync) off the async threads.
async fn on_store<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, StreamError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| {
            StreamError::Apply(EngineError::Malformed {
                what: "store task",
                reason: e.to_string(),
            })
        })?
        .map_err(StreamError::Apply)
}

/// Every `interval`, makes applied batches durable (fsync of the WAL) and
/// acknowledges them to the leader.
async fn ack_loop(
    store: Store,
    mut send: quinn::SendStream,
    mut acked: Seq,
    interval: Duration,
    status: Arc<ReplicaStatus>,
) -> Result<(), StreamError> {
    let mut news = store.feed().subscribe();
    let mut saved = Instant::now() - Duration::from_secs(1);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(500), news.changed()).await;
        tokio::time::sleep(interval).await;
        let applied = store.latest_seq();
        if applied == acked {
            continue;
        }
        on_store(&store, |s| s.sync_wal()).await?;
        write_frame(&mut send, &Frame::Applied { seq: applied }).await?;
        acked = applied;
        status.update(|s| s.acked_seq = applied);
        // Remember the last write, so a restarted follower can prove what
        // it holds (the WAL supplies anything applied after it).
        if saved.elapsed() >= Duration::from_secs(1) {
            saved = Instant::now();
            if let Some(w) = store.last_write() {
                on_store(&store, move |s| save_proof(s, &w)).await?;
            }
        }
    }
}

/// Asks the leader to sign a certificate for this node (enrollment), over
/// a token-authenticated connection.
pub async fn enroll(
    leader: SocketAddr,
    auth: &ClientAuth,
    node_id: &str,
    transport: &TransportOptions,
    csr_pem: &str,
) -> Result<(String, String), EnrollError> {
    let endpoint =
        crate::endpoint::client_endpoint(crate::endpoint::unspecified_for(leader), transport)
            .map_err(|e| EnrollError(e.to_string()))?;
    let mut client = Client::connect(&endpoint, leader, auth, transport, node_id, Role::Follower)
        .await
        .map_err(|e| EnrollError(e.to_string()))?;
    let reply = client
        .request(&Frame::CertRequest {
            csr_pem: csr_pem.to_owned(),
        })
        .await
        .map_err(|e| EnrollError(e.to_string()))?;
    client.close().await;
    endpoint.close(0u32.into(), b"bye");
    match reply {
        Frame::CertReply { cert_pem, ca_pem } => Ok((cert_pem, ca_pem)),
        other => Err(EnrollError(format!(
            "unexpected {} in reply to CertRequest",
            other.name()
        ))),
    }
}

/// An enrollment failure.
#[derive(Debug, thiserror::Error)]
#[error("enrollment failed: {0}")]
pub struct EnrollError(pub String);

/// Where a follower remembers its last write.
fn proof_path(store: &Store) -> std::path::PathBuf {
    ferry_engine::ferry_dir(store.path()).join("replica.json")
}

fn save_proof(store: &Store, w: &WriteId) -> Result<(), EngineError> {
    let b = serde_json::to_vec(&serde_json::json!({ "last_write": w })).map_err(|e| {
        EngineError::Malformed {
            what: "replica.json",
            reason: e.to_string(),
        }
    })?;
    ferry_engine::write_atomic(&proof_path(store), &b)
}

/// Forgets what this follower held (before a seed replaces it).
pub fn forget_proof(data: &std::path::Path) {
    let _ = std::fs::remove_file(ferry_engine::ferry_dir(data).join("replica.json"));
    let _ = std::fs::remove_file(ferry_engine::ferry_dir(data).join("history.json"));
}

/// What this follower shows its leader to prove it holds the leader's
/// operations up to its latest sequence: hashes over its own WAL (windows of
/// [`ferry_engine::store::PROOF_WINDOWS`]), its last applied write, and
/// whatever `replica.json` holds that ends there (the last write
/// remembered before a restart, or proofs a seed left), and the seed
/// checkpoint it was installed from while it has written nothing since.
/// Empty when nothing is known; the leader then refuses it as unproven.
fn local_proofs(store: &Store) -> (Vec<WriteId>, Option<ferry_engine::Issued>) {
    let latest = store.latest_seq();
    let mut out = store.proofs(latest);
    if let Some(w) = store.last_write().filter(|w| w.last == latest) {
        out.push(w);
    }
    let saved = std::fs::read(proof_path(store))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let mut seeded = None;
    if let Some(v) = saved {
        let last: Option<WriteId> = v
            .get("last_write")
            .and_then(|w| serde_json::from_value(w.clone()).ok());
        let proofs: Vec<WriteId> = v
            .get("proofs")
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        out.extend(last.into_iter().chain(proofs).filter(|w| w.last == latest));
        // The checkpoint counts only while nothing was written past it.
        seeded = v
            .get("seeded")
            .and_then(|s| serde_json::from_value::<ferry_engine::Issued>(s.clone()).ok())
            .filter(|s| s.seq == latest);
    }
    out.sort_by_key(|w| std::cmp::Reverse(w.first));
    out.dedup_by_key(|w| w.first);
    out.truncate(crate::protocol::MAX_PROOFS);
    (out, seeded)
}
