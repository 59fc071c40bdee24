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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_engine::{Store, StoreOptions};
use ferry_transfer::auth::{Enrollment, JoinToken, NodeAuth};
use ferry_transfer::follower::{replicate, ReplicaConfig, ReplicaStatus, ReplicationEnd};
use ferry_transfer::protocol::Role as WireRole;
use ferry_transfer::replication::{Replication, ReplicationOptions};
use ferry_transfer::{ClientAuth, Progress, SeedConfig, ServeOptions, Server, TransportOptions};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub node_id: String,
    /// Follow this leader (QUIC address); without it the node leads.
    pub follow: Option<SocketAddr>,
    /// Seed from this node instead of the leader (cascading seed).
    pub seed_from: Option<SocketAddr>,
    pub token: Option<JoinToken>,
    /// Operator TLS files: CA, certificate, key.
    pub tls_files: Option<(PathBuf, PathBuf, PathBuf)>,
    pub store: StoreOptions,
    pub serve: ServeOptions,
    /// The first wait before a re-seed that follows soon after another.
    pub reseed_backoff: Duration,
    /// QUIC settings (windows, keep-alive and idle timeout) of every
    /// connection this node makes or accepts.
    pub transport: TransportOptions,
    /// What a follower does when the leader refuses it as diverged.
    pub on_divergence: OnDivergence,
    /// Followers that must acknowledge a write before the API answers it
    /// (`?acks=N` overrides it per request).
    pub min_acks: usize,
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
}

impl Node {
    pub fn is_leader(&self) -> bool {
        self.cfg.follow.is_none()
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
        let p = Persisted {
            state: self.state(),
            leader: self.cfg.follow.map(|a| a.to_string()),
            reseeds: self.reseeds.load(Ordering::SeqCst),
            last_reseed_unix: read_persisted(&self.cfg.data)
                .map(|p| p.last_reseed_unix)
                .unwrap_or(0),
            detail: self.detail(),
        };
        let dir = ferry_engine::ferry_dir(&self.cfg.data);
        let _ = std::fs::create_dir_all(&dir);
        let tmp = dir.join("node.json.tmp");
        if let Ok(data) = serde_json::to_vec_pretty(&p) {
            if std::fs::write(&tmp, data).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("node.json"));
            }
        }
    }

    fn note_reseed(&self) -> u64 {
        let n = self.reseeds.fetch_add(1, Ordering::SeqCst) + 1;
        let mut p = read_persisted(&self.cfg.data).unwrap_or(Persisted {
            state: NodeState::Reseeding,
            leader: None,
            reseeds: 0,
            last_reseed_unix: 0,
            detail: None,
        });
        p.reseeds = n;
        p.last_reseed_unix = unix_now();
        let path = ferry_engine::ferry_dir(&self.cfg.data).join("node.json");
        if let Ok(data) = serde_json::to_vec_pretty(&p) {
            let _ = std::fs::write(path, data);
        }
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

/// Starts a node; returns once it is running (the work goes on in tasks).
pub async fn start(cfg: NodeConfig) -> Result<Arc<Node>> {
    let (shutdown, _) = watch::channel(false);
    let node = Arc::new(Node {
        replication: std::sync::OnceLock::new(),
        replica: Arc::default(),
        store: RwLock::new(None),
        state: RwLock::new(if cfg.follow.is_some() {
            NodeState::Empty
        } else {
            NodeState::Leader
        }),
        detail: RwLock::new(None),
        seed_progress: Mutex::new(None),
        last_seed: Mutex::new(None),
        server: RwLock::new(None),
        reseeds: AtomicU64::new(read_persisted(&cfg.data).map(|p| p.reseeds).unwrap_or(0)),
        divergences: AtomicU64::new(0),
        history: RwLock::new(None),
        quic_addr: RwLock::new(None),
        http_addr: RwLock::new(None),
        started: Instant::now(),
        shutdown,
        cfg,
    });
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
            let (auth, token) = NodeAuth::load_or_init(&tls_dir(&cfg.data), &cfg.node_id)
                .context("load or create the cluster identity")?;
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
    // The history: this leader's term, a new one when this node followed
    // another before (it was promoted by being started as a leader).
    let was_follower = read_persisted(&cfg.data).is_some_and(|p| p.leader.is_some());
    let history = {
        let (data, latest) = (cfg.data.clone(), store.latest_seq());
        tokio::task::spawn_blocking(move || -> Result<ferry_engine::History> {
            let mut h = match ferry_engine::History::load(&data)? {
                Some(h) if !was_follower => h,
                Some(mut h) => {
                    h.begin_term(latest);
                    h
                }
                None => ferry_engine::History::new(latest),
            };
            if h.terms.is_empty() {
                h = ferry_engine::History::new(latest);
            }
            h.save(&data)?;
            Ok(h)
        })
        .await??
    };
    tracing::info!(history = %history.current().id, start = history.current().start, "replication history");
    let replication = Replication::new(store.clone(), ReplicationOptions::default());
    replication.set_history(history.clone());
    *node.history.write() = Some(history);
    let _ = node.replication.set(Arc::clone(&replication));
    *node.store.write() = Some(store.clone());
    let (endpoint, server) = serve_quic(&node, &store, auth)?;
    server.set_stream_handler(replication);
    tokio::spawn(Arc::clone(&server).run(endpoint.clone()));
    tokio::spawn(close_on_shutdown(endpoint, node.shutdown_requested()));
    node.set_state(NodeState::Leader, None);
    tracing::info!(quic = %cfg.listen, node = %cfg.node_id, seq = store.latest_seq(), "leader running");
    Ok(node)
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

fn has_database(data: &Path) -> bool {
    data.join("CURRENT").exists() && !ferry_engine::seed_dir(data).exists()
}

async fn follower_lifecycle(node: Arc<Node>) -> Result<()> {
    let cfg = node.cfg.clone();
    let leader = cfg.follow.context("no leader")?;
    let mut shutdown = node.shutdown_requested();
    let mut reseed = false;
    let mut reseed_wait = cfg.reseed_backoff;
    loop {
        if *shutdown.borrow() {
            break;
        }
        // 1. Seed when there is no database (or an unfinished seed).
        if reseed || !has_database(&cfg.data) {
            node.set_state(
                if reseed {
                    NodeState::Reseeding
                } else {
                    NodeState::Seeding
                },
                None,
            );
            let source = cfg.seed_from.unwrap_or(leader);
            let auth = follower_client_auth(&cfg)?;
            // What this node proved it held no longer applies after a seed.
            ferry_transfer::follower::forget_proof(&cfg.data);
            let mut sc = SeedConfig::new(&cfg.data, source, auth);
            sc.node_id = cfg.node_id.clone();
            sc.role = WireRole::Follower;
            sc.reuse_existing = reseed;
            sc.reconnects = 3;
            sc.transport = cfg.transport.clone();
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
        if cfg.tls_files.is_none() && NodeAuth::load_dir(&tls_dir(&cfg.data))?.is_none() {
            let token = cfg
                .token
                .clone()
                .context("a join token is required to enroll")?;
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
            tracing::info!("enrolled: certificate signed by the cluster CA");
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
        let serving = tokio::spawn(Arc::clone(&server).run(endpoint.clone()));

        // 4. Catch up and follow, publishing the replica's state.
        node.set_state(NodeState::CatchingUp, None);
        let watcher = tokio::spawn(watch_replica(Arc::clone(&node)));
        let mut rc = ReplicaConfig::new(leader, follower_client_auth(&cfg)?, cfg.node_id.clone());
        rc.transport = cfg.transport.clone();
        let end = replicate(
            store.clone(),
            rc,
            Arc::clone(&node.replica),
            node.shutdown_requested(),
        )
        .await;
        watcher.abort();

        // 5. Stop serving and release the database before anything else.
        endpoint.close(0u32.into(), b"restarting");
        let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
        serving.abort();
        *node.server.write() = None;
        drop(server);
        *node.store.write() = None;
        let _ = store.sync_wal();
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.handles() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if store.handles() > 1 {
            bail!("the database is still in use after 30s; not re-seeding under it");
        }
        drop(store);

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
    let leader = node.cfg.follow.map(|a| a.to_string()).unwrap_or_default();
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
