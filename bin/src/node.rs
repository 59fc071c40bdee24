//! The daemon: one node that owns a data directory. A leader takes writes
//! and feeds followers; a follower seeds itself, catches up from the
//! leader's WAL, then follows the live stream. Every node listens for QUIC
//! (seeds, status) and, optionally, HTTP (the API).
//!
//! Follower states, persisted in `DIR/.ferry/node.json` and reported:
//! `empty → seeding → catching-up → live`, plus `reseeding` (the leader's
//! WAL no longer reaches this node's sequence) and `diverged` (stopped).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_engine::{Store, StoreOptions};
use ferry_transfer::auth::{Enrollment, JoinToken, NodeAuth};
use ferry_transfer::follower::{replicate, ReplicaConfig, ReplicaStatus, ReplicationEnd};
use ferry_transfer::protocol::Role as WireRole;
use ferry_transfer::replication::{Replication, ReplicationOptions};
use ferry_transfer::{ClientAuth, Progress, SeedConfig, ServeOptions, Server, TransportOptions};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub node_id: String,
    /// Follow the leader among these peers (QUIC addresses); without any
    /// the node leads. With one address that node is the leader; with
    /// several, the follower probes them for the one that leads the newest
    /// history, and switches after a promotion.
    pub follow: Vec<SocketAddr>,
    /// A leader's peers: probed at start and every second for a newer
    /// history, which fences this node (it then takes no writes).
    pub peers: Vec<SocketAddr>,
    /// Seed from this node instead of the leader (cascading seed).
    pub seed_from: Option<SocketAddr>,
    pub token: Option<JoinToken>,
    /// Operator TLS files: CA, certificate, key.
    pub tls_files: Option<(PathBuf, PathBuf, PathBuf)>,
    pub store: StoreOptions,
    pub serve: ServeOptions,
    /// The first wait before a re-seed that follows soon after another.
    pub reseed_backoff: Duration,
    /// How long the certificates this node issues stay valid.
    pub cert_lifetime: Duration,
    /// How often to scrub the database for corruption at rest.
    pub scrub_interval: Option<Duration>,
    /// QUIC settings (windows, keep-alive and idle timeout) of every
    /// connection this node makes or accepts.
    pub transport: TransportOptions,
    /// What a follower does when the leader refuses it as diverged.
    pub on_divergence: OnDivergence,
    /// Followers that must acknowledge a write before the API answers it
    /// (`?acks=N` overrides it per request).
    pub min_acks: usize,
    /// How many databases set aside on divergence to keep (the oldest go
    /// first).
    pub keep_aside: usize,
}

/// What a diverged follower does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDivergence {
    /// Re-seed from the leader, reusing every local file whose hash matches.
    Reseed,
    /// Stop replicating and stay `diverged` until an operator acts.
    Stop,
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Leader,
    Empty,
    Seeding,
    CatchingUp,
    Live,
    /// A follower whose leader has gone silent or cannot be reached; it
    /// keeps serving reads, which say how stale they may be.
    Unreachable,
    Reseeding,
    Diverged,
    /// A leader that found a newer history among its peers (another node
    /// was promoted): it takes no writes and serves no follower.
    Fenced,
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Leader => "leader",
            NodeState::Empty => "empty",
            NodeState::Seeding => "seeding",
            NodeState::CatchingUp => "catching-up",
            NodeState::Live => "live",
            NodeState::Unreachable => "unreachable",
            NodeState::Reseeding => "reseeding",
            NodeState::Diverged => "diverged",
            NodeState::Fenced => "fenced",
            NodeState::Stopped => "stopped",
        }
    }
}

/// What `node.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    state: NodeState,
    leader: Option<String>,
    reseeds: u64,
    last_reseed_unix: u64,
    detail: Option<String>,
    /// This node was promoted: it restarts as the leader even though its
    /// command line names peers to follow (until it is fenced).
    #[serde(default)]
    promoted: bool,
    /// Why this node, a leader, was fenced: another node leads a newer
    /// history. It survives restarts, so the node never leads again unless
    /// an operator makes it a follower (`--follow`) first.
    #[serde(default)]
    fenced: Option<String>,
}

/// A running node, shared with the HTTP API.
pub struct Node {
    pub cfg: NodeConfig,
    store: RwLock<Option<Store>>,
    state: RwLock<NodeState>,
    detail: RwLock<Option<String>>,
    /// The leader's replication service.
    pub replication: std::sync::OnceLock<Arc<Replication>>,
    pub replica: Arc<ReplicaStatus>,
    pub seed_progress: Mutex<Option<Progress>>,
    pub last_seed: Mutex<Option<ferry_transfer::SeedReport>>,
    server: RwLock<Option<Arc<Server>>>,
    pub reseeds: AtomicU64,
    /// Times the leader refused this follower as diverged.
    pub divergences: AtomicU64,
    /// The replication history (a leader's own; a follower's copy of its
    /// leader's).
    pub history: RwLock<Option<ferry_engine::History>>,
    pub quic_addr: RwLock<Option<SocketAddr>>,
    pub http_addr: RwLock<Option<SocketAddr>>,
    pub started: Instant,
    shutdown: watch::Sender<bool>,
    /// Whether this node is the leader (a follower becomes one when it is
    /// promoted).
    leading: AtomicBool,
    promoted: AtomicBool,
    /// Why this leader is fenced, if it is.
    fenced: RwLock<Option<String>>,
    /// The leader a follower follows now.
    leader: RwLock<Option<SocketAddr>>,
    /// Promotion requests, served by the follower loop.
    promote_tx: mpsc::Sender<PromoteRequest>,
    promote_rx: tokio::sync::Mutex<mpsc::Receiver<PromoteRequest>>,
    /// Why this follower must repair its database (set by a scrub that
    /// found corruption at rest), with the follower loop's wake-up.
    repair: Mutex<Option<String>>,
    repair_wake: tokio::sync::Notify,
    persist_lock: Mutex<()>,
}

/// What a scrub found, and whether the node is repairing itself.
#[derive(Debug, Clone, Serialize)]
pub struct Scrubbed {
    #[serde(flatten)]
    pub report: ferry_engine::ScrubReport,
    pub repairing: bool,
}

/// What a promotion produced: the new term.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    pub history: String,
    /// The new term begins after this sequence.
    pub seq: u64,
    pub previous_leader: Option<String>,
    /// What the operator must still see to.
    pub warning: String,
}

/// Why a promotion was refused.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The node cannot be promoted in its state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The promotion did not finish (HTTP 503).
    #[error("{0}")]
    Failed(String),
}

type PromoteRequest = oneshot::Sender<Result<Promoted, String>>;

impl Node {
    /// Whether the node is the leader (fenced or not).
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Why this leader is fenced, if it is: it then takes no writes.
    pub fn fenced(&self) -> Option<String> {
        self.fenced.read().clone()
    }

    /// The leader this follower follows now.
    pub fn leader(&self) -> Option<SocketAddr> {
        *self.leader.read()
    }

    /// The peers a leader checks for a newer history.
    fn peers(&self) -> Vec<SocketAddr> {
        let mut p: Vec<SocketAddr> = self
            .cfg
            .peers
            .iter()
            .chain(&self.cfg.follow)
            .copied()
            .collect();
        p.sort();
        p.dedup();
        p
    }

    /// Asks a replicating follower to replace its database, corrupt at
    /// rest, by a re-seed from its leader that reuses every sound chunk.
    /// Returns false where that cannot help: on a leader (nothing to seed
    /// from; promote a follower instead) or a follower not yet replicating.
    pub fn request_repair(&self, why: String) -> bool {
        if self.is_leader() || !matches!(self.state(), NodeState::CatchingUp | NodeState::Live) {
            return false;
        }
        *self.repair.lock() = Some(why);
        self.repair_wake.notify_one();
        true
    }

    /// When this node's certificate expires (Unix seconds), and whether it
    /// can renew it: a leader that holds the CA key, or a follower (its
    /// leader signs). A promoted follower has no CA key and cannot.
    pub fn certificate(&self) -> Option<(i64, bool)> {
        if self.cfg.tls_files.is_some() {
            return None;
        }
        let auth = NodeAuth::load_dir(&tls_dir(&self.cfg.data))
            .ok()
            .flatten()?;
        let expires = auth.validity().ok()?.1;
        Some((expires, !self.is_leader() || auth.can_sign()))
    }

    /// Checks every live SST's block checksums. Corruption is counted in
    /// `ferry_corrupt_files_total`; a replicating follower then repairs
    /// itself ([`Node::request_repair`]), a leader only reports it.
    pub async fn scrub(&self) -> Result<Scrubbed> {
        let store = self.store().with_context(|| {
            format!("the node is {}; no database is open", self.state().as_str())
        })?;
        let report = tokio::task::spawn_blocking(move || store.scrub())
            .await
            .context("the scrub task failed")??;
        let mut repairing = false;
        if !report.corrupt.is_empty() {
            metrics::counter!("ferry_corrupt_files_total").increment(report.corrupt.len() as u64);
            let files: Vec<&str> = report.corrupt.iter().map(|c| c.file.as_str()).collect();
            let why = format!("corrupt at rest: {}", files.join(", "));
            repairing = self.request_repair(why.clone());
            tracing::error!(
                files = ?files,
                repairing,
                "scrub found corrupt SSTs{}",
                if self.is_leader() {
                    "; this leader cannot repair itself: promote a sound follower, then re-seed this node"
                } else {
                    ""
                }
            );
        }
        Ok(Scrubbed { report, repairing })
    }

    /// The history this follower last received from its leader.
    fn replica_history(&self) -> Option<ferry_engine::History> {
        ferry_engine::History::load(&self.cfg.data).ok().flatten()
    }

    /// Makes this follower the leader at its applied sequence, under a new
    /// history term. Refused on a leader, on a node that is not caught up,
    /// and while its leader is still reachable, unless `force`.
    pub async fn promote(&self, force: bool) -> Result<Promoted, PromoteError> {
        if self.is_leader() {
            return Err(PromoteError::Conflict(match self.fenced() {
                Some(why) => format!("this node is a fenced leader ({why}); restart it with --follow to make it a follower"),
                None => "this node is already the leader".into(),
            }));
        }
        let state = self.state();
        if !has_database(&self.cfg.data) {
            return Err(PromoteError::Conflict(format!(
                "this follower is {} and holds no complete database to lead with",
                state.as_str()
            )));
        }
        let r = self.replica.snapshot();
        let leader = self.leader().map(|a| a.to_string()).unwrap_or_default();
        match state {
            NodeState::Live | NodeState::Unreachable => {}
            NodeState::CatchingUp if force => {}
            NodeState::CatchingUp => {
                return Err(PromoteError::Conflict(format!(
                    "this follower is still catching up (applied {} of the leader's {}); use --force to promote it anyway",
                    r.applied_seq, r.leader_seq
                )))
            }
            s => {
                return Err(PromoteError::Conflict(format!(
                    "this follower is {} and holds no complete database to lead with",
                    s.as_str()
                )))
            }
        }
        let heard_ms = r
            .last_contact_unix_ms
            .map(|t| ferry_transfer::follower::unix_ms().saturating_sub(t));
        // `unreachable` means no heartbeat for a second (or no connection):
        // anything else means the leader is alive and may take writes.
        if !force && state != NodeState::Unreachable {
            return Err(PromoteError::Conflict(format!(
                "the leader {leader} is still reachable (heard from {} ms ago) and may be taking writes: stop it first, or use --force (two leaders would then take writes)",
                heard_ms.unwrap_or(0)
            )));
        }
        if !force {
            self.refuse_if_a_follower_is_ahead().await?;
        }
        let (tx, rx) = oneshot::channel();
        self.promote_tx
            .try_send(tx)
            .map_err(|_| PromoteError::Failed("another promotion is in progress".into()))?;
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(p))) => Ok(p),
            Ok(Ok(Err(e))) => Err(PromoteError::Failed(e)),
            Ok(Err(_)) => Err(PromoteError::Failed(
                "the follower stopped before it was promoted".into(),
            )),
            Err(_) => Err(PromoteError::Failed(
                "the promotion did not finish within 30 s".into(),
            )),
        }
    }

    /// Asks the reachable peers where they are: a follower of this node's
    /// history that holds more than this node may hold acknowledged writes
    /// this one lacks, so promoting this one would lose them. Refused then
    /// (naming them); peers that do not answer within a second are not
    /// waited for.
    async fn refuse_if_a_follower_is_ahead(&self) -> Result<(), PromoteError> {
        let peers = self.peers();
        if peers.is_empty() {
            return Ok(());
        }
        // A follower with no leader to follow has no store open.
        let ours = match self.store() {
            Some(s) => s.latest_seq(),
            None => {
                let data = self.cfg.data.clone();
                tokio::task::spawn_blocking(move || {
                    Store::open_read_only(&data).map(|s| s.latest_seq())
                })
                .await
                .map_err(|e| PromoteError::Failed(e.to_string()))?
                .map_err(|e| {
                    PromoteError::Failed(format!(
                        "cannot read this node's sequence to compare it with its peers: {e}"
                    ))
                })?
            }
        };
        let history = self.replica_history();
        let same = |h: &Option<ferry_engine::History>| match (&history, h) {
            (Some(a), Some(b)) => a.is_prefix_of(b) || b.is_prefix_of(a),
            _ => true,
        };
        let mut ahead: Vec<String> = probe_peers(self, &peers)
            .await
            .into_iter()
            .filter(|(_, i)| !i.leading && i.latest_seq > ours && same(&i.history))
            .map(|(a, i)| format!("{a} (at {})", i.latest_seq))
            .collect();
        if ahead.is_empty() {
            return Ok(());
        }
        ahead.sort();
        metrics::counter!("ferry_promotions_refused_total").increment(1);
        Err(PromoteError::Conflict(format!(
            "another follower is ahead of this node (at {ours}): {}; promote the most advanced follower instead, or use --force (writes beyond {ours} that only they hold would then be moved aside on them)",
            ahead.join(", ")
        )))
    }

    /// The open store, unless the node is seeding.
    pub fn store(&self) -> Option<Store> {
        self.store.read().clone()
    }

    pub fn state(&self) -> NodeState {
        *self.state.read()
    }

    pub fn detail(&self) -> Option<String> {
        self.detail.read().clone()
    }

    pub fn server(&self) -> Option<Arc<Server>> {
        self.server.read().clone()
    }

    /// Asks the node to stop.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn set_state(&self, s: NodeState, detail: Option<String>) {
        let changed = {
            let mut st = self.state.write();
            let changed = *st != s;
            *st = s;
            changed
        };
        *self.detail.write() = detail.clone();
        if changed {
            tracing::info!(
                state = s.as_str(),
                detail = detail.as_deref().unwrap_or(""),
                "node state"
            );
        }
        self.persist();
    }

    fn persist(&self) {
        self.persist_with(|_| {});
    }

    /// Writes `node.json` atomically (and durably) from the node's state,
    /// after `f` adjusts it.
    fn persist_with(&self, f: impl FnOnce(&mut Persisted)) {
        let _serial = self.persist_lock.lock();
        let mut p = Persisted {
            state: self.state(),
            leader: self.leader().map(|a| a.to_string()),
            reseeds: self.reseeds.load(Ordering::SeqCst),
            last_reseed_unix: read_persisted(&self.cfg.data)
                .map(|p| p.last_reseed_unix)
                .unwrap_or(0),
            detail: self.detail(),
            promoted: self.promoted.load(Ordering::SeqCst),
            fenced: self.fenced(),
        };
        f(&mut p);
        let path = ferry_engine::ferry_dir(&self.cfg.data).join("node.json");
        if let Ok(data) = serde_json::to_vec_pretty(&p) {
            // An fsync: off the async workers' hot path where possible.
            let write = || ferry_engine::write_atomic(&path, &data);
            let r = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(write)
                }
                _ => write(),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot record the node's state");
            }
        }
    }

    fn note_reseed(&self) -> u64 {
        let n = self.reseeds.fetch_add(1, Ordering::SeqCst) + 1;
        self.persist_with(|p| {
            p.reseeds = n;
            p.last_reseed_unix = unix_now();
        });
        n
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_persisted(data: &Path) -> Option<Persisted> {
    let b = std::fs::read(ferry_engine::ferry_dir(data).join("node.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

pub fn tls_dir(data: &Path) -> PathBuf {
    ferry_engine::ferry_dir(data).join("tls")
}

/// Why a data directory must not be started as a leader without `--follow`,
/// if it must not: it was fenced, or it has followed another node and was
/// never promoted. Leadership then comes only through `ferry promote`, whose
/// checks (the old leader is gone, no reachable follower is ahead) a bare
/// restart would skip. `None` for a leader's directory and a new one.
pub fn implicit_leadership_refused(data: &Path) -> Option<String> {
    let ferry = ferry_engine::ferry_dir(data);
    let node_json = ferry.join("node.json");
    let persisted = match std::fs::read(&node_json) {
        Ok(b) => match serde_json::from_slice::<Persisted>(&b) {
            Ok(p) => Some(p),
            // Unreadable: it cannot tell what this node was, so it does
            // not lead on a guess.
            Err(e) => {
                return Some(format!(
                    "{} cannot be read ({e}), so whether this node followed another cannot be told",
                    node_json.display()
                ))
            }
        },
        Err(_) => None,
    };
    if let Some(p) = &persisted {
        if let Some(why) = p.fenced.as_ref().or((p.state == NodeState::Fenced)
            .then_some(&p.detail)
            .and_then(|d| d.as_ref()))
        {
            return Some(format!(
                "this node was fenced as a leader ({why}); it must not lead again. Restart it with --follow naming the new leader (or the peer set): it then rejoins, and writes only it held are moved aside, not deleted"
            ));
        }
        if p.promoted {
            return None;
        }
        let followed =
            p.leader.is_some() || !matches!(p.state, NodeState::Leader | NodeState::Stopped);
        if followed {
            let leader = p.leader.as_deref().unwrap_or("its leader");
            return Some(format!(
                "this data directory belongs to a follower of {leader} (last state {}); started without --follow it would lead a second history beside the real leader. Restart it with --follow {leader} (or the peer set). To make it the leader, start it as a follower and run `ferry promote`, which refuses while the leader is reachable or another follower is ahead",
                p.state.as_str()
            ));
        }
    }
    if ferry.join("replica.json").exists() && !persisted.as_ref().is_some_and(|p| p.promoted) {
        return Some(
            "this data directory holds a follower's replication state (.ferry/replica.json: it was seeded from, or followed, another node); start it with --follow naming that node, or promote it with `ferry promote`. A copy meant to lead a cluster of its own must not share its source's history: remove its .ferry directory first (it then starts a new history and identity)".into(),
        );
    }
    None
}

/// Starts a node; returns once it is running (the work goes on in tasks).
pub async fn start(cfg: NodeConfig) -> Result<Arc<Node>> {
    let (shutdown, _) = watch::channel(false);
    let persisted = read_persisted(&cfg.data);
    // A promoted node leads after a restart too, whatever peers its command
    // line names (fencing clears the mark).
    let promoted = persisted
        .as_ref()
        .is_some_and(|p| p.promoted && p.fenced.is_none())
        && has_database(&cfg.data);
    if cfg.follow.is_empty() && !promoted {
        if let Some(why) = implicit_leadership_refused(&cfg.data) {
            return Err(crate::config::usage(format!(
                "refusing to start {} as a leader: {why}",
                cfg.data.display()
            )));
        }
    }
    let leads = cfg.follow.is_empty() || promoted;
    let (promote_tx, promote_rx) = mpsc::channel(1);
    let node = Arc::new(Node {
        leading: AtomicBool::new(leads),
        promoted: AtomicBool::new(promoted),
        fenced: RwLock::new(None),
        leader: RwLock::new(cfg.follow.first().copied().filter(|_| !leads)),
        promote_tx,
        promote_rx: tokio::sync::Mutex::new(promote_rx),
        repair: Mutex::new(None),
        repair_wake: tokio::sync::Notify::new(),
        persist_lock: Mutex::new(()),
        replication: std::sync::OnceLock::new(),
        replica: Arc::default(),
        store: RwLock::new(None),
        state: RwLock::new(if leads {
            NodeState::Leader
        } else {
            NodeState::Empty
        }),
        detail: RwLock::new(None),
        seed_progress: Mutex::new(None),
        last_seed: Mutex::new(None),
        server: RwLock::new(None),
        reseeds: AtomicU64::new(persisted.map(|p| p.reseeds).unwrap_or(0)),
        divergences: AtomicU64::new(0),
        history: RwLock::new(None),
        quic_addr: RwLock::new(None),
        http_addr: RwLock::new(None),
        started: Instant::now(),
        shutdown,
        cfg,
    });
    if let Some(every) = node.cfg.scrub_interval {
        tokio::spawn(scrub_every(Arc::clone(&node), every));
    }
    if node.is_leader() {
        start_leader(node).await
    } else {
        start_follower(node).await
    }
}

async fn start_leader(node: Arc<Node>) -> Result<Arc<Node>> {
    let cfg = node.cfg.clone();
    let auth = match &cfg.tls_files {
        Some((ca, cert, key)) => {
            NodeAuth::from_files(ca, cert, key).context("load the TLS files")?
        }
        None => {
            let (mut auth, token) = NodeAuth::load_or_init(&tls_dir(&cfg.data), &cfg.node_id)
                .context("load or create the cluster identity")?;
            auth.set_cert_lifetime(cfg.cert_lifetime);
            if (auth.renewal_due() || auth.outlives_lifetime()) && auth.can_sign() {
                auth = auth
                    .renew_own(&cfg.node_id)
                    .context("renew this leader's certificate")?;
                tracing::info!("renewed this leader's certificate");
            }
            let path = tls_dir(&cfg.data).join("join-token");
            ferry_transfer::auth::write_private(&path, token.to_string().as_bytes())?;
            tracing::info!(token_file = %path.display(), "join token written (print it with `ferry token --data {}`)", cfg.data.display());
            auth
        }
    };
    let (data, opts) = (cfg.data.clone(), cfg.store.clone());
    let store = tokio::task::spawn_blocking(move || Store::open(&data, opts))
        .await?
        .with_context(|| format!("open the store in {}", cfg.data.display()))?;
    // The history: this leader's term (a new history for a database that
    // never had one). A directory that followed another node never gets
    // here ([`implicit_leadership_refused`]): it leads only by promotion.
    let history = {
        let (data, latest) = (cfg.data.clone(), store.latest_seq());
        tokio::task::spawn_blocking(move || -> Result<ferry_engine::History> {
            let h = match ferry_engine::History::load(&data)
                .with_context(|| format!("read the replication history in {}", data.display()))?
            {
                Some(h) if !h.terms.is_empty() => h,
                _ => ferry_engine::History::new(latest),
            };
            h.save(&data)?;
            Ok(h)
        })
        .await??
    };
    tracing::info!(history = %history.current().id, start = history.current().start, "replication history");
    *node.store.write() = Some(store.clone());
    let (endpoint, server) = serve_quic(&node, &store, auth.clone())?;
    tokio::spawn(Arc::clone(&server).run(endpoint.clone()));
    if cfg.tls_files.is_none() && auth.can_sign() {
        tokio::spawn(renew_own_certificate(
            Arc::clone(&node),
            endpoint.clone(),
            auth,
        ));
    }
    tokio::spawn(close_on_shutdown(endpoint, node.shutdown_requested()));
    become_leader(&node, &store, &server, history).await;
    tracing::info!(quic = %cfg.listen, node = %cfg.node_id, seq = store.latest_seq(), "leader running");
    Ok(node)
}

/// How often a node checks whether its certificate is due for renewal: a
/// tenth of its lifetime, between a second and an hour.
fn renewal_check_interval(auth: &NodeAuth) -> Duration {
    let (nb, na) = auth.validity().unwrap_or((0, 36_000));
    Duration::from_secs(((na - nb).max(0) as u64 / 10).clamp(1, 3600))
}

/// Renews this follower's certificate at `leader`, authenticating with the
/// certificate itself; one that already expired is replaced by enrolling
/// again with the join token, when the node has one.
async fn renew_follower_certificate(node: &Node, leader: SocketAddr) -> Result<()> {
    let cfg = &node.cfg;
    let dir = tls_dir(&cfg.data);
    let auth = NodeAuth::load_dir(&dir)?.context("no node identity to renew")?;
    let expired = auth
        .validity()
        .is_ok_and(|(_, na)| na <= ferry_transfer::auth::unix_now());
    if !expired {
        let e = Enrollment::renewal(&dir, &cfg.node_id)?;
        let (cert, ca) = ferry_transfer::follower::enroll(
            leader,
            &auth.client_credentials(),
            &cfg.node_id,
            &cfg.transport,
            &e.csr_pem,
        )
        .await
        .context("renew the certificate at the leader")?;
        let renewed = e.save_renewed(&dir, &cert, &ca)?;
        tracing::info!(
            expires_unix = renewed.validity().map(|v| v.1).unwrap_or(0),
            "renewed this node's certificate"
        );
        return Ok(());
    }
    enroll_with_token(
        cfg,
        leader,
        "this node's certificate expired and it has no join token to enroll again: start it with a current --token",
    )
    .await?;
    tracing::info!("enrolled again: the old certificate had expired");
    Ok(())
}

/// Enrolls at `leader` with the join token: a new key, a certificate signed
/// by the cluster CA, saved under the data directory.
async fn enroll_with_token(cfg: &NodeConfig, leader: SocketAddr, no_token: &str) -> Result<()> {
    let token = cfg.token.clone().with_context(|| no_token.to_owned())?;
    let e = Enrollment::new(&cfg.node_id)?;
    let (cert, ca) = ferry_transfer::follower::enroll(
        leader,
        &ClientAuth::from_token(&token),
        &cfg.node_id,
        &cfg.transport,
        &e.csr_pem,
    )
    .await
    .context("enroll with the leader")?;
    e.save(&tls_dir(&cfg.data), &cert, &ca, &token)?;
    Ok(())
}

/// The leader re-issues its own certificate (it holds the CA key) when a
/// third of its lifetime is left, and swaps it into the running endpoint:
/// connections made from then on see the new one.
async fn renew_own_certificate(
    node: Arc<Node>,
    endpoint: ferry_transfer::quinn::Endpoint,
    mut auth: NodeAuth,
) {
    let mut shutdown = node.shutdown_requested();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(renewal_check_interval(&auth)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !auth.renewal_due() {
            continue;
        }
        let renewed = auth
            .renew_own(&node.cfg.node_id)
            .map_err(anyhow::Error::from)
            .and_then(|a| {
                let sc = ferry_transfer::endpoint::server_config(&a, &node.cfg.transport)?;
                endpoint.set_server_config(Some(sc));
                Ok(a)
            });
        match renewed {
            Ok(a) => {
                tracing::info!(
                    expires_unix = a.validity().map(|v| v.1).unwrap_or(0),
                    "renewed this leader's certificate"
                );
                auth = a;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "could not renew this leader's certificate")
            }
        }
    }
}

/// Makes the node a leader of `history` on an open store and a running
/// server: replication is served, `Probe` says so, writes are taken. With
/// peers, it first checks them for a newer history (and keeps checking).
async fn become_leader(
    node: &Arc<Node>,
    store: &Store,
    server: &Arc<Server>,
    history: ferry_engine::History,
) {
    store.set_follower(false);
    // The HTTP API times writes end to end for the seeds' busy control.
    store.set_external_write_latency(true);
    let replication = Replication::new(store.clone(), ReplicationOptions::default());
    replication.set_history(history.clone());
    *node.history.write() = Some(history);
    let _ = node.replication.set(Arc::clone(&replication));
    *node.leader.write() = None;
    node.leading.store(true, Ordering::SeqCst);
    let n = Arc::downgrade(node);
    let st = store.clone();
    server.set_info_provider(Arc::new(move || {
        let node = n.upgrade();
        ferry_transfer::leader::NodeInfo {
            leading: node.as_ref().is_some_and(|n| n.fenced().is_none()),
            latest_seq: st.latest_seq(),
            history: node.and_then(|n| n.history.read().clone()),
        }
    }));
    server.set_stream_handler(Arc::clone(&replication) as _);
    node.set_state(NodeState::Leader, None);
    let peers = node.peers();
    if peers.is_empty() {
        tracing::warn!("fencing is off: this leader has no --peers, so it cannot learn that another node was promoted and would keep taking writes beside it");
    }
    if !peers.is_empty() {
        // Take no write before the peers had their say.
        check_fence(node, &peers).await;
        tokio::spawn(fence_watch(Arc::clone(node), peers));
    }
}

/// Every second, asks the peers whether one of them holds a newer history
/// than this leader's: then another node was promoted, and this one must
/// not take writes.
async fn fence_watch(node: Arc<Node>, peers: Vec<SocketAddr>) {
    let mut shutdown = node.shutdown_requested();
    while node.fenced().is_none() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        check_fence(&node, &peers).await;
    }
}

async fn check_fence(node: &Arc<Node>, peers: &[SocketAddr]) {
    let Some(ours) = node.history.read().clone() else {
        return;
    };
    let current = ours.current();
    for (addr, info) in probe_peers(node, peers).await {
        let Some(theirs) = info.history else { continue };
        // Our term is followed by another in their history: a node was
        // promoted after this one's term began.
        let Some(i) = theirs.terms.iter().position(|t| t.id == current.id) else {
            continue;
        };
        if let Some(next) = theirs.terms.get(i + 1) {
            let why = format!(
                "peer {addr} holds history {} that began at sequence {} after this node's term {current_id}; another node was promoted",
                next.id,
                next.start,
                current_id = current.id
            );
            tracing::error!("fenced: {why}; taking no writes (restart this node with --follow to make it a follower)");
            if let Some(r) = node.replication.get() {
                r.fence(why.clone());
            }
            *node.fenced.write() = Some(why.clone());
            node.promoted.store(false, Ordering::SeqCst);
            node.set_state(NodeState::Fenced, Some(why));
            metrics::counter!("ferry_fenced_total").increment(1);
            return;
        }
    }
}

/// Asks every peer what it is, at once; peers that do not answer within a
/// second are left out.
async fn probe_peers(
    node: &Node,
    peers: &[SocketAddr],
) -> Vec<(SocketAddr, ferry_transfer::leader::NodeInfo)> {
    let Ok(auth) = probe_auth(&node.cfg) else {
        return Vec::new();
    };
    let own = *node.quic_addr.read();
    let mut set = tokio::task::JoinSet::new();
    for &peer in peers
        .iter()
        .filter(|p| Some(**p) != own && **p != node.cfg.listen)
    {
        let (auth, transport, id) = (
            auth.clone(),
            node.cfg.transport.clone(),
            node.cfg.node_id.clone(),
        );
        set.spawn(async move {
            let endpoint = ferry_transfer::endpoint::client_endpoint(
                ferry_transfer::endpoint::unspecified_for(peer),
                &transport,
            )
            .ok()?;
            let r = ferry_transfer::client::probe(
                &endpoint,
                peer,
                &auth,
                &transport,
                &id,
                PROBE_TIMEOUT,
            )
            .await;
            endpoint.close(0u32.into(), b"probed");
            match r {
                Ok(info) => Some((peer, info)),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "peer did not answer the probe");
                    None
                }
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(x)) = r {
            out.push(x);
        }
    }
    out.sort_by_key(|(a, _)| peers.iter().position(|p| p == a));
    out
}

/// How long one peer probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The credentials this node presents to its peers.
fn probe_auth(cfg: &NodeConfig) -> Result<ClientAuth> {
    if cfg.tls_files.is_none() {
        if let Some(auth) = NodeAuth::load_dir(&tls_dir(&cfg.data))? {
            return Ok(auth.client_credentials());
        }
    }
    follower_client_auth(cfg)
}

async fn close_on_shutdown(
    endpoint: ferry_transfer::quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = shutdown.wait_for(|s| *s).await;
    endpoint.close(0u32.into(), b"shutdown");
}

/// Binds the node's QUIC endpoint and creates its server (seeds, and
/// replication on a leader); the caller runs it.
fn serve_quic(
    node: &Node,
    store: &Store,
    auth: NodeAuth,
) -> Result<(ferry_transfer::quinn::Endpoint, Arc<Server>)> {
    let cfg = &node.cfg;
    let endpoint = ferry_transfer::endpoint::server_endpoint(cfg.listen, &auth, &cfg.transport)
        .with_context(|| format!("listen for QUIC on {}", cfg.listen))?;
    *node.quic_addr.write() = Some(endpoint.local_addr()?);
    let server = Server::new(
        store.clone(),
        auth,
        ServeOptions {
            node_id: cfg.node_id.clone(),
            ..cfg.serve.clone()
        },
    );
    *node.server.write() = Some(Arc::clone(&server));
    Ok((endpoint, server))
}

/// How a follower authenticates to the leader.
fn follower_client_auth(cfg: &NodeConfig) -> Result<ClientAuth> {
    if let Some((ca, cert, key)) = &cfg.tls_files {
        return Ok(NodeAuth::from_files(ca, cert, key)
            .context("load the TLS files")?
            .client_credentials());
    }
    if let Some(auth) = NodeAuth::load_dir(&tls_dir(&cfg.data))? {
        return Ok(auth.client_credentials());
    }
    match &cfg.token {
        Some(t) => Ok(ClientAuth::from_token(t)),
        None => Err(crate::config::usage(
            "a join token (--token or FERRY_TOKEN) is required for a follower's first start",
        )),
    }
}

async fn start_follower(node: Arc<Node>) -> Result<Arc<Node>> {
    // Fail fast on missing credentials.
    follower_client_auth(&node.cfg)?;
    let n = Arc::clone(&node);
    tokio::spawn(async move {
        if let Err(e) = follower_lifecycle(Arc::clone(&n)).await {
            tracing::error!(error = %format!("{e:#}"), "follower stopped");
            n.set_state(NodeState::Stopped, Some(format!("{e:#}")));
        }
    });
    Ok(node)
}

/// Scrubs the open database every `every` until shutdown.
async fn scrub_every(node: Arc<Node>, every: Duration) {
    let mut shutdown = node.shutdown_requested();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if node.store().is_none() {
            continue;
        }
        match node.scrub().await {
            Ok(s) => tracing::info!(
                files = s.report.files_checked,
                bytes = s.report.bytes_checked,
                corrupt = s.report.corrupt.len(),
                "scrubbed"
            ),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "scrub failed"),
        }
    }
}

fn has_database(data: &Path) -> bool {
    data.join("CURRENT").exists() && !ferry_engine::seed_dir(data).exists()
}

async fn follower_lifecycle(node: Arc<Node>) -> Result<()> {
    let cfg = node.cfg.clone();
    let mut shutdown = node.shutdown_requested();
    let mut reseed = false;
    let mut reseed_wait = cfg.reseed_backoff;
    loop {
        if *shutdown.borrow() {
            break;
        }
        // 0. Find the leader among the peers (or be promoted while none
        //    leads).
        let (leader, mut pending) = match find_leader(&node).await {
            Some(Found::Leader(a)) => (a, None),
            Some(Found::Promote(reply)) => {
                let enrolled =
                    cfg.tls_files.is_some() || NodeAuth::load_dir(&tls_dir(&cfg.data))?.is_some();
                if reseed || !has_database(&cfg.data) || !enrolled {
                    let _ = reply.send(Err(
                        "this node holds no complete database to lead with".into()
                    ));
                    continue;
                }
                (cfg.follow[0], Some(reply))
            }
            None => break,
        };
        if pending.is_none() {
            *node.leader.write() = Some(leader);
        }
        // 1. Seed when there is no database (or an unfinished seed).
        if pending.is_none() && (reseed || !has_database(&cfg.data)) {
            node.set_state(
                if reseed {
                    NodeState::Reseeding
                } else {
                    NodeState::Seeding
                },
                None,
            );
            let source = cfg.seed_from.unwrap_or(leader);
            // The token pins the leader; a seed source the operator named
            // is another node, trusted through the cluster CA.
            let mut auth = follower_client_auth(&cfg)?;
            if cfg.seed_from.is_some() {
                auth = auth.unpinned();
            }
            // What this node proved it held no longer applies after a seed.
            ferry_transfer::follower::forget_proof(&cfg.data);
            let mut sc = SeedConfig::new(&cfg.data, source, auth);
            sc.node_id = cfg.node_id.clone();
            sc.role = WireRole::Follower;
            sc.reuse_existing = reseed;
            sc.reconnects = 3;
            sc.transport = cfg.transport.clone();
            sc.priority = cfg.serve.seed_priority;
            let n2 = Arc::clone(&node);
            sc.progress = Some(Arc::new(move |p: &Progress| {
                *n2.seed_progress.lock() = Some(p.clone())
            }));
            let result = tokio::select! {
                r = ferry_transfer::seed(sc) => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            match result {
                Ok(report) => {
                    tracing::info!(
                        seq = report.seq,
                        bytes = report.bytes_total,
                        fetched = report.bytes_fetched,
                        reused = report.bytes_reused,
                        secs = report.elapsed_secs,
                        "seeded"
                    );
                    *node.last_seed.lock() = Some(report);
                }
                Err(e) => {
                    let msg = format!("seed from {source} failed: {e}");
                    tracing::warn!("{msg}; retrying in {reseed_wait:?}");
                    node.set_state(NodeState::Seeding, Some(msg));
                    tokio::select! {
                        _ = tokio::time::sleep(reseed_wait) => {}
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                    reseed_wait = (reseed_wait * 2).min(Duration::from_secs(300));
                    continue;
                }
            }
        }
        // 2. A token-joined follower gets a certificate from the leader, so
        //    it can serve seeds to nodes that join after it.
        if cfg.tls_files.is_none() {
            match NodeAuth::load_dir(&tls_dir(&cfg.data))? {
                None => {
                    enroll_with_token(&cfg, leader, "a join token is required to enroll").await?;
                    tracing::info!("enrolled: certificate signed by the cluster CA");
                }
                Some(a) if a.renewal_due() => {
                    if let Err(e) = renew_follower_certificate(&node, leader).await {
                        tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying later");
                    }
                }
                Some(_) => {}
            }
        }
        // 3. Open the store as a follower and serve seeds from it.
        let (data, opts) = (cfg.data.clone(), cfg.store.clone());
        let store = tokio::task::spawn_blocking(move || Store::open(&data, opts)).await??;
        store.set_follower(true);
        *node.store.write() = Some(store.clone());
        let auth = match &cfg.tls_files {
            Some((ca, cert, key)) => NodeAuth::from_files(ca, cert, key)?,
            None => NodeAuth::load_dir(&tls_dir(&cfg.data))?.context("no node identity")?,
        };
        let (endpoint, server) = serve_quic(&node, &store, auth)?;
        {
            // Probes learn the history this follower holds, so a returning
            // old leader finds the newer one here too.
            let (st, data) = (store.clone(), cfg.data.clone());
            server.set_info_provider(Arc::new(move || ferry_transfer::leader::NodeInfo {
                leading: false,
                latest_seq: st.latest_seq(),
                history: ferry_engine::History::load(&data).ok().flatten(),
            }));
        }
        let serving = tokio::spawn(Arc::clone(&server).run(endpoint.clone()));

        // 4. Catch up and follow, publishing the replica's state, until
        //    shutdown, a promotion, or a newer leader among the peers.
        node.set_state(NodeState::CatchingUp, None);
        let watcher = tokio::spawn(watch_replica(Arc::clone(&node)));
        let mut rc = ReplicaConfig::new(leader, follower_client_auth(&cfg)?, cfg.node_id.clone());
        rc.transport = cfg.transport.clone();
        let (end, interrupt) = match pending.take() {
            Some(reply) => (ReplicationEnd::Shutdown, Some(Interrupt::Promote(reply))),
            None => {
                let (stop_tx, stop_rx) = watch::channel(false);
                let interrupts = tokio::spawn(interrupts(Arc::clone(&node), leader, stop_tx));
                let end = replicate(store.clone(), rc, Arc::clone(&node.replica), stop_rx).await;
                interrupts.abort();
                (end, interrupts.await.ok().flatten())
            }
        };
        watcher.abort();
        if let Some(Interrupt::Promote(reply)) = interrupt {
            if reply.is_closed() {
                tracing::warn!("a promotion request was abandoned before it was served");
            }
            let r = promote_here(&node, &store, &server).await;
            match r {
                Ok(p) => {
                    tracing::info!(history = %p.history, seq = p.seq, "promoted: this node leads now");
                    if let Some((expires, false)) = node.certificate() {
                        tracing::warn!(expires_unix = expires, "this promoted leader holds no CA key: it cannot renew its certificate or its followers'; copy ca.key from the old leader's .ferry/tls into this node's and restart it before then");
                    }
                    let _ = reply.send(Ok(p));
                    // The endpoint and server keep running as the leader's.
                    let _ = shutdown.wait_for(|s| *s).await;
                    endpoint.close(0u32.into(), b"shutdown");
                    let _ = store.sync_wal();
                    return Ok(());
                }
                Err(e) => {
                    let _ = reply.send(Err(format!("{e:#}")));
                    tracing::error!(error = %format!("{e:#}"), "promotion failed; following again");
                    store.set_follower(true);
                    serving.abort();
                    *node.server.write() = None;
                    *node.store.write() = None;
                    endpoint.close(0u32.into(), b"restarting");
                    continue;
                }
            }
        }

        // 5. Stop serving and release the database before anything else.
        endpoint.close(0u32.into(), b"restarting");
        let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
        serving.abort();
        *node.server.write() = None;
        drop(server);
        *node.store.write() = None;
        let _ = store.sync_wal();
        // A database the leader refused is about to be replaced: keep it
        // aside first, so writes only it held are never destroyed silently.
        let set_aside_why = match (&end, &interrupt, cfg.on_divergence) {
            (ReplicationEnd::Diverged { message }, None, OnDivergence::Reseed) => {
                Some(message.clone())
            }
            // Not known to differ, but not known not to: kept all the same.
            (ReplicationEnd::Unproven { message }, None, _) => Some(format!("unproven: {message}")),
            _ => None,
        };
        if let Some(why) = set_aside_why {
            let s2 = store.clone();
            let keep = cfg.keep_aside;
            match tokio::task::spawn_blocking(move || s2.set_aside(&why, keep)).await? {
                Ok(a) => {
                    metrics::counter!("ferry_databases_set_aside_total").increment(1);
                    tracing::warn!(aside = %a.name, seq = a.seq, "the database is set aside before the re-seed; list it with `ferry aside --data {}`", cfg.data.display());
                }
                Err(e) => {
                    // Fail closed: without the copy, nothing is replaced.
                    let msg =
                        format!("cannot set the database aside ({e}); not re-seeding over it");
                    tracing::error!("{msg}");
                    node.set_state(NodeState::Diverged, Some(msg));
                    store.set_follower(true);
                    *node.store.write() = Some(store);
                    let _ = shutdown.wait_for(|s| *s).await;
                    *node.store.write() = None;
                    break;
                }
            }
        }
        // Everything that still holds the database is asked to let go; the
        // node waits for it (re-seeding under an open database would break
        // it) and says so, but never gives up for good.
        store.request_close();
        let since = Instant::now();
        let mut warned = since;
        while store.handles() > 1 {
            if *shutdown.borrow() {
                break;
            }
            if warned.elapsed() >= Duration::from_secs(30) {
                tracing::warn!(
                    handles = store.handles() - 1,
                    waited_secs = since.elapsed().as_secs(),
                    "the database is still in use; waiting before replacing it"
                );
                warned = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(store);
        if let Some(Interrupt::Switch { to, why }) = interrupt {
            tracing::warn!(from = %leader, %to, "switching leader: {why}");
            continue;
        }
        if let Some(Interrupt::Renewed) = interrupt {
            continue;
        }

        if let Some(Interrupt::Repair { why }) = interrupt {
            tracing::error!(%why, "this follower's database is corrupt at rest: re-seeding, reusing its sound chunks");
            node.set_state(NodeState::Reseeding, Some(why));
        } else {
            match end {
                ReplicationEnd::Shutdown => break,
                ReplicationEnd::Diverged { message } => {
                    node.divergences.fetch_add(1, Ordering::SeqCst);
                    node.set_state(NodeState::Diverged, Some(message.clone()));
                    if cfg.on_divergence == OnDivergence::Stop {
                        tracing::error!(%message, "replication stopped: this follower diverged from the leader (--on-divergence stop)");
                        // Keep serving reads of what it holds, for the operator.
                        let (data, opts) = (cfg.data.clone(), cfg.store.clone());
                        if let Ok(Ok(store)) =
                            tokio::task::spawn_blocking(move || Store::open(&data, opts)).await
                        {
                            store.set_follower(true);
                            *node.store.write() = Some(store);
                        }
                        let _ = shutdown.wait_for(|s| *s).await;
                        *node.store.write() = None;
                        break;
                    }
                    tracing::error!(%message, "this follower diverged from the leader: re-seeding to the leader's content");
                }
                ReplicationEnd::WalPurged { message } => {
                    tracing::warn!(%message, "the leader's WAL no longer reaches this follower: re-seeding");
                    node.set_state(NodeState::Reseeding, Some(message));
                }
                ReplicationEnd::Unproven { message } => {
                    tracing::warn!(%message, "the leader cannot check this follower's position: re-seeding (the old database is set aside)");
                    node.set_state(NodeState::Reseeding, Some(message));
                }
            }
        }
        // Re-seed, reusing local files; back off when re-seeds follow each
        // other, so a slow link cannot become an endless full-sync loop.
        let (n, wait) = reseed_delay(&node, reseed_wait);
        tracing::info!(
            reseeds = n,
            wait_secs = wait.as_secs_f64(),
            "re-seeding, reusing local files"
        );
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            reseed_wait = (reseed_wait * 2).min(Duration::from_secs(600));
        }
        reseed = true;
    }
    node.set_state(NodeState::Stopped, None);
    Ok(())
}

/// Why a follower stopped replicating from its leader while it still could.
enum Interrupt {
    Promote(PromoteRequest),
    Switch {
        to: SocketAddr,
        why: String,
    },
    /// A scrub found this follower's database corrupt at rest.
    Repair {
        why: String,
    },
    /// This follower's certificate was renewed: reconnect with it.
    Renewed,
}

/// Stops replication (through `stop`) on shutdown, on a promotion request,
/// or, with several peers, when another peer leads a newer history or the
/// current leader no longer leads; returns why.
async fn interrupts(
    node: Arc<Node>,
    leader: SocketAddr,
    stop: watch::Sender<bool>,
) -> Option<Interrupt> {
    let mut shutdown = node.shutdown_requested();
    let mut requests = node.promote_rx.lock().await;
    let multi = node.cfg.follow.len() > 1;
    let own = (node.cfg.tls_files.is_none())
        .then(|| NodeAuth::load_dir(&tls_dir(&node.cfg.data)).ok().flatten())
        .flatten();
    let renew_every = own.as_ref().map(renewal_check_interval);
    // An interval, not a sleep per turn: the other branches fire more often.
    let mut renew_tick = tokio::time::interval(renew_every.unwrap_or(Duration::from_secs(3600)));
    renew_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        let probe_due = tokio::select! {
            _ = renew_tick.tick(), if renew_every.is_some() => {
                if own.as_ref().is_some_and(|a| a.renewal_due()) {
                    match renew_follower_certificate(&node, leader).await {
                        // Reconnect with the new certificate.
                        Ok(()) => break Some(Interrupt::Renewed),
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying later"),
                    }
                }
                false
            }
            _ = shutdown.changed() => false,
            _ = node.repair_wake.notified() => match node.repair.lock().take() {
                Some(why) => break Some(Interrupt::Repair { why }),
                None => continue,
            },
            r = requests.recv() => match r {
                Some(reply) if !reply.is_closed() => break Some(Interrupt::Promote(reply)),
                Some(_) => continue,
                None => break None,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)), if multi => true,
        };
        if *shutdown.borrow() {
            break None;
        }
        if !probe_due {
            continue;
        }
        let infos = probe_peers(&node, &node.cfg.follow).await;
        let ours = node.replica_history();
        let current = infos
            .iter()
            .find(|(a, _)| *a == leader)
            .map(|(_, i)| i.clone());
        let Some((best, info)) = best_leader(&infos, ours.as_ref()) else {
            continue;
        };
        if best == leader {
            continue;
        }
        let newer = match (&current, &info.history) {
            (Some(c), Some(h)) => c
                .history
                .as_ref()
                .is_some_and(|ch| ch.is_prefix_of(h) && ch.terms.len() < h.terms.len()),
            _ => false,
        };
        let gone = current.as_ref().is_none_or(|c| !c.leading);
        if newer || gone {
            break Some(Interrupt::Switch {
                to: best,
                why: if newer {
                    format!("{best} leads a newer history")
                } else {
                    format!("{leader} no longer leads; {best} does")
                },
            });
        }
    };
    stop.send_replace(true);
    why
}

/// What `find_leader` found.
enum Found {
    Leader(SocketAddr),
    /// No peer leads, and an operator promoted this node.
    Promote(PromoteRequest),
}

/// The leader to follow among the peers: the only one given, or the one
/// that leads the newest history this follower can follow. Waits (and says
/// so in the status) until one answers, or this node is promoted; `None`
/// on shutdown.
async fn find_leader(node: &Arc<Node>) -> Option<Found> {
    let peers = &node.cfg.follow;
    if peers.len() == 1 {
        return Some(Found::Leader(peers[0]));
    }
    let mut shutdown = node.shutdown_requested();
    loop {
        let infos = probe_peers(node, peers).await;
        if let Some((a, _)) = best_leader(&infos, node.replica_history().as_ref()) {
            tracing::info!(leader = %a, "found the leader among the peers");
            return Some(Found::Leader(a));
        }
        let list = peers
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let detail = format!(
            "no leader among the peers {list}: {} answered, none leads",
            infos.len()
        );
        if node.state() != NodeState::Unreachable || node.detail().as_deref() != Some(&detail) {
            node.set_state(NodeState::Unreachable, Some(detail));
        }
        let mut requests = node.promote_rx.lock().await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            r = requests.recv() => {
                if let Some(reply) = r.filter(|r| !r.is_closed()) {
                    return Some(Found::Promote(reply));
                }
            }
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return None;
        }
    }
}

/// The best leader among probed peers: leading, not on a history older
/// than this follower's own (that is a stale leader, soon fenced), and of
/// those the one with the most terms, then the highest sequence.
fn best_leader(
    infos: &[(SocketAddr, ferry_transfer::leader::NodeInfo)],
    ours: Option<&ferry_engine::History>,
) -> Option<(SocketAddr, ferry_transfer::leader::NodeInfo)> {
    infos
        .iter()
        .filter(|(_, i)| i.leading)
        .filter(|(_, i)| match (ours, &i.history) {
            (Some(o), Some(h)) => !(h.is_prefix_of(o) && h.terms.len() < o.terms.len()),
            _ => true,
        })
        .max_by_key(|(_, i)| {
            (
                ours.is_none_or(|o| i.history.as_ref().is_some_and(|h| o.is_prefix_of(h))),
                i.history.as_ref().map_or(0, |h| h.terms.len()),
                i.latest_seq,
            )
        })
        .cloned()
}

/// Promotes this follower in place: its store, QUIC endpoint and server
/// stay open; it begins a new term at its applied sequence and leads.
async fn promote_here(node: &Arc<Node>, store: &Store, server: &Arc<Server>) -> Result<Promoted> {
    let previous = node.leader().map(|a| a.to_string());
    let data = node.cfg.data.clone();
    let s2 = store.clone();
    let history = tokio::task::spawn_blocking(move || -> Result<ferry_engine::History> {
        s2.sync_wal().context("sync the WAL before leading")?;
        let latest = s2.latest_seq();
        let mut h =
            ferry_engine::History::load(&data)?.unwrap_or_else(|| ferry_engine::History::new(0));
        h.begin_term(latest);
        h.save(&data).context("record the new history")?;
        Ok(h)
    })
    .await??;
    let term = history.current();
    node.promoted.store(true, Ordering::SeqCst);
    become_leader(node, store, server, history).await;
    Ok(Promoted {
        history: term.id.to_string(),
        seq: term.start,
        previous_leader: previous,
        warning: "the old leader stops taking writes only if it runs with --peers naming this node (it then fences itself when it can reach it); otherwise make sure it is stopped, and restart it with --follow".into(),
    })
}

/// Counts a re-seed and returns the count and how long to wait first: re-
/// seeds that follow each other within 10 minutes back off, so a slow link
/// cannot turn into an endless full-sync loop.
fn reseed_delay(node: &Node, backoff: Duration) -> (u64, Duration) {
    let last = read_persisted(&node.cfg.data)
        .map(|p| p.last_reseed_unix)
        .unwrap_or(0);
    let n = node.note_reseed();
    let recent = unix_now().saturating_sub(last) < 600;
    (
        n,
        if recent && n > 1 {
            backoff
        } else {
            Duration::ZERO
        },
    )
}

/// A live stream silent this long makes the follower report its leader
/// unreachable (the leader sends a heartbeat every 250 ms); the connection
/// itself is declared lost after the transport's idle timeout.
const LIVE_SILENCE: Duration = Duration::from_secs(1);

/// Mirrors the replica's state into the node's state: `live` only while the
/// leader is heard from, `unreachable` (with the time of the last contact)
/// when it is not.
async fn watch_replica(node: Arc<Node>) {
    loop {
        let (state, detail) = replica_state(&node);
        if node.state() != state {
            node.set_state(state, detail);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn replica_state(node: &Node) -> (NodeState, Option<String>) {
    let s = node.replica.snapshot();
    let leader = node.leader().map(|a| a.to_string()).unwrap_or_default();
    let silent_ms = s
        .last_contact_unix_ms
        .map(|t| ferry_transfer::follower::unix_ms().saturating_sub(t));
    let since = s
        .last_contact_unix_ms
        .map(|t| {
            format!(
                "since {}",
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(t))
            )
        })
        .unwrap_or_else(|| "since this node started".into());
    if !s.connected && s.last_error.is_some() {
        let why = s.last_error.unwrap_or_default();
        return (
            NodeState::Unreachable,
            Some(format!("leader {leader} unreachable {since}: {why}")),
        );
    }
    if s.connected
        && s.state == "live"
        && silent_ms.is_some_and(|m| m > LIVE_SILENCE.as_millis() as u64)
    {
        return (
            NodeState::Unreachable,
            Some(format!(
                "leader {leader} unreachable {since}: no heartbeat for {} ms",
                silent_ms.unwrap_or(0)
            )),
        );
    }
    match s.state {
        "live" => (NodeState::Live, None),
        _ => (NodeState::CatchingUp, None),
    }
}
