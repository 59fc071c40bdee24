//! The HTTP API of a node (JSON; see README.md for the reference).
//!
//! Every response of a node with an open database carries `X-Ferry-Seq`,
//! the sequence it reflects (errors and `/metrics` included). Bodies,
//! keys, scan limits and waits are bounded; bad input is a 4xx with a
//! message.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use ferry_engine::{Batch, Error as EngineError, Scan, Store};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::json;

use crate::node::Node;

/// Largest request body.
pub const MAX_BODY: usize = 8 << 20;
/// Longest key.
pub const MAX_KEY: usize = 4096;
/// Most operations in one batch.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Most items one scan returns.
pub const MAX_SCAN: usize = 10_000;
/// Most key and value bytes one scan returns (at least one pair always).
pub const MAX_SCAN_BYTES: usize = 8 << 20;
/// Longest wait for `min_seq` or a digest.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

type Shared = Arc<Node>;

/// Serves the API on `addr`; returns the bound address.
pub async fn serve(node: Shared, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listen for HTTP on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = router(Arc::clone(&node));
    let mut shutdown = node.shutdown_requested();
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(bound)
}

pub fn router(node: Shared) -> Router {
    Router::new()
        .route("/v1/kv/{key}", get(get_kv).put(put_kv).delete(delete_kv))
        .route("/v1/batch", post(batch))
        .route("/v1/scan", get(scan))
        .route("/v1/status", get(status))
        .route("/v1/digest", get(digest))
        .route("/v1/admin/flush", post(flush))
        .route("/v1/admin/promote", post(promote))
        .route("/v1/admin/scrub", post(scrub))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&node),
            time_writes,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response_with_state(
            Arc::clone(&node),
            add_seq_header,
        ))
        .with_state(node)
}

/// Gives every response of a node with an open database `X-Ferry-Seq`:
/// errors and `/metrics` too. Handlers that answer for a particular
/// sequence (a write's, a digest's) set it themselves.
///
/// A follower adds `X-Ferry-Last-Contact`, when it last heard from its
/// leader (RFC 3339): with the sequence, how stale a read may be while the
/// leader is unreachable.
async fn add_seq_header(State(node): State<Shared>, mut resp: Response) -> Response {
    if !resp.headers().contains_key("x-ferry-seq") {
        if let Some(store) = node.store() {
            resp.headers_mut()
                .insert("x-ferry-seq", HeaderValue::from(store.latest_seq()));
        }
    }
    if !node.is_leader() {
        if let Some(t) = node.replica.snapshot().last_contact_unix_ms {
            let at =
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(t));
            if let Ok(v) = HeaderValue::from_str(&at.to_string()) {
                resp.headers_mut().insert("x-ferry-last-contact", v);
            }
        }
    }
    resp
}

/// Reports each write's latency, as the client sees it from here, to the
/// store: seeds served by this node back off when it grows (the leader is
/// short of CPU or disk for its foreground load).
async fn time_writes(
    State(node): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let write = matches!(
        *req.method(),
        axum::http::Method::PUT | axum::http::Method::DELETE | axum::http::Method::POST
    ) && !req.uri().path().starts_with("/v1/admin");
    let started = Instant::now();
    let resp = next.run(req).await;
    if write && resp.status().is_success() {
        if let Some(store) = node.store() {
            store.record_write_latency(started.elapsed());
        }
    }
    resp
}

/// An API error: a status and a message.
struct ApiError {
    status: StatusCode,
    message: String,
    extra: Option<serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            extra: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        counter("ferry_http_errors_total");
        let mut body = json!({ "error": self.message });
        if let (Some(extra), Some(obj)) = (self.extra, body.as_object_mut()) {
            if let Some(e) = extra.as_object() {
                obj.extend(e.clone());
            }
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match e {
            EngineError::ReadOnly => StatusCode::MISDIRECTED_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

fn counter(name: &'static str) {
    metrics::counter!(name).increment(1);
}

fn seq_header(seq: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-ferry-seq", HeaderValue::from(seq));
    h
}

fn store_of(node: &Node) -> Result<Store, ApiError> {
    node.store().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the node is {}; no database is open yet",
                node.state().as_str()
            ),
        )
    })
}

fn writable(node: &Node) -> Result<Store, ApiError> {
    if let Some(why) = node.fenced() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this node is fenced and takes no writes: {why}"),
        ));
    }
    if !node.is_leader() {
        let leader = node.leader().map(|a| a.to_string()).unwrap_or_default();
        let mut e = ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this node is a follower and takes no writes; write to the leader at {leader}"),
        );
        e.extra = Some(json!({ "leader": leader }));
        return Err(e);
    }
    store_of(node)
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("keys are 1 to {MAX_KEY} bytes"),
        ));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Deserialize)]
struct ReadParams {
    /// Wait until this sequence is applied (read-your-writes on followers).
    min_seq: Option<u64>,
    /// How long to wait for `min_seq`, in milliseconds (default 5000).
    timeout_ms: Option<u64>,
}

/// Waits (bounded) until the store has applied `min_seq`.
async fn wait_for_seq(
    store: &Store,
    min_seq: Option<u64>,
    timeout_ms: Option<u64>,
) -> Result<(), ApiError> {
    let Some(min) = min_seq else { return Ok(()) };
    let timeout = Duration::from_millis(timeout_ms.unwrap_or(5000)).min(MAX_WAIT);
    let mut news = store.feed().subscribe();
    let mut closing = store.closing();
    let deadline = tokio::time::Instant::now() + timeout;
    while store.latest_seq() < min {
        // The node is about to replace its database (a re-seed): let go
        // of the handle rather than hold the re-seed up.
        if *closing.borrow() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the node is closing its database (re-seeding or stopping) at sequence {}; retry",
                    store.latest_seq()
                ),
            ));
        }
        let woke = tokio::select! {
            r = tokio::time::timeout_at(deadline, news.changed()) => r.is_ok(),
            _ = closing.changed() => true,
        };
        if !woke {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "sequence {min} was not applied within {} ms (at {})",
                    timeout.as_millis(),
                    store.latest_seq()
                ),
            ));
        }
    }
    Ok(())
}

async fn get_kv(
    State(node): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<ReadParams>,
) -> Result<Response, ApiError> {
    counter("ferry_http_reads_total");
    check_key(&key)?;
    let store = store_of(&node)?;
    wait_for_seq(&store, p.min_seq, p.timeout_ms).await?;
    let s2 = store.clone();
    let (value, seq) = blocking(move || s2.get(key.as_bytes())).await?;
    Ok(match value {
        Some(v) => (StatusCode::OK, seq_header(seq), v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            seq_header(seq),
            Json(json!({ "error": "no such key" })),
        )
            .into_response(),
    })
}

/// Semi-synchronous writes: `?acks=N` waits (at most `timeout_ms`, default
/// 5 s, at most 60 s) until N followers have durably applied the write.
#[derive(Deserialize, Default)]
struct WriteParams {
    acks: Option<usize>,
    timeout_ms: Option<u64>,
}

/// Answers a write at `seq` once the followers it asks for have it.
async fn write_reply(
    node: &Node,
    seq: u64,
    p: &WriteParams,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let n = p.acks.unwrap_or(node.cfg.min_acks);
    if n > 0 {
        let timeout = Duration::from_millis(p.timeout_ms.unwrap_or(5000)).min(MAX_WAIT);
        let repl = node.replication.get().cloned().ok_or_else(|| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no replication service")
        })?;
        if let Err(acked) = repl.wait_acks(seq, n, timeout).await {
            counter("ferry_http_ack_timeouts_total");
            let mut e = ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{acked} of the {n} followers asked for acknowledged sequence {seq} within {} ms; the write remains on the leader and reaches followers as they catch up",
                    timeout.as_millis()
                ),
            );
            e.extra = Some(json!({ "seq": seq, "acked": acked }));
            return Err(e);
        }
    }
    Ok((StatusCode::OK, seq_header(seq), Json(body)).into_response())
}

async fn put_kv(
    State(node): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    counter("ferry_http_writes_total");
    check_key(&key)?;
    let store = writable(&node)?;
    let r = blocking(move || store.put(key.into_bytes(), body.to_vec())).await?;
    write_reply(&node, r.last, &p, json!({ "seq": r.last })).await
}

async fn delete_kv(
    State(node): State<Shared>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
) -> Result<Response, ApiError> {
    counter("ferry_http_writes_total");
    check_key(&key)?;
    let store = writable(&node)?;
    let r = blocking(move || store.delete(key.into_bytes())).await?;
    write_reply(&node, r.last, &p, json!({ "seq": r.last })).await
}

#[derive(Deserialize)]
struct BatchRequest {
    ops: Vec<BatchOp>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum BatchOp {
    Put {
        key: String,
        value: Option<String>,
        value_b64: Option<String>,
    },
    Delete {
        key: String,
    },
}

async fn batch(
    State(node): State<Shared>,
    Query(p): Query<WriteParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    counter("ferry_http_writes_total");
    let req: BatchRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad batch: {e}")))?;
    if req.ops.is_empty() || req.ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a batch holds 1 to {MAX_BATCH_OPS} operations"),
        ));
    }
    let mut b = Batch::new();
    for op in req.ops {
        match op {
            BatchOp::Put {
                key,
                value,
                value_b64,
            } => {
                check_key(&key)?;
                let v = match (value, value_b64) {
                    (Some(v), None) => v.into_bytes(),
                    (None, Some(b)) => base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|e| {
                            ApiError::new(
                                StatusCode::BAD_REQUEST,
                                format!("bad value_b64 for {key}: {e}"),
                            )
                        })?,
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("put {key}: give exactly one of value, value_b64"),
                        ))
                    }
                };
                b.put(key.into_bytes(), v);
            }
            BatchOp::Delete { key } => {
                check_key(&key)?;
                b.delete(key.into_bytes());
            }
        }
    }
    let store = writable(&node)?;
    let r = blocking(move || store.write(&b)).await?;
    write_reply(
        &node,
        r.last,
        &p,
        json!({ "first_seq": r.first, "seq": r.last }),
    )
    .await
}

#[derive(Deserialize)]
struct ScanParams {
    prefix: Option<String>,
    start: Option<String>,
    /// `start` as base64, for binary keys (a scan's `next_b64`).
    start_b64: Option<String>,
    limit: Option<usize>,
    min_seq: Option<u64>,
    timeout_ms: Option<u64>,
}

async fn scan(
    State(node): State<Shared>,
    Query(p): Query<ScanParams>,
) -> Result<Response, ApiError> {
    counter("ferry_http_reads_total");
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_SCAN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit is 1 to {MAX_SCAN}"),
        ));
    }
    let store = store_of(&node)?;
    wait_for_seq(&store, p.min_seq, p.timeout_ms).await?;
    let scan = Scan {
        prefix: p.prefix.unwrap_or_default().into_bytes(),
        start: match (p.start, p.start_b64) {
            (Some(s), None) => Some(s.into_bytes()),
            (None, Some(b)) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| {
                        ApiError::new(StatusCode::BAD_REQUEST, format!("bad start_b64: {e}"))
                    })?,
            ),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "give at most one of start, start_b64",
                ))
            }
        },
        limit,
        max_bytes: MAX_SCAN_BYTES,
    };
    let (page, seq) = blocking(move || store.scan(&scan)).await?;
    let next = page.next.map(|k| match String::from_utf8(k) {
        Ok(k) => json!({ "next": k }),
        Err(e) => {
            json!({ "next_b64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) })
        }
    });
    let items: Vec<_> = page
        .items
        .into_iter()
        .map(
            |(k, v)| match (String::from_utf8(k.clone()), String::from_utf8(v.clone())) {
                (Ok(k), Ok(v)) => json!({ "key": k, "value": v }),
                _ => {
                    let b64 = &base64::engine::general_purpose::STANDARD;
                    json!({ "key_b64": b64.encode(k), "value_b64": b64.encode(v) })
                }
            },
        )
        .collect();
    let mut body = json!({ "seq": seq, "items": items });
    if let (Some(n), Some(o)) = (next, body.as_object_mut()) {
        if let Some(n) = n.as_object() {
            o.extend(n.clone());
        }
    }
    Ok((StatusCode::OK, seq_header(seq), Json(body)).into_response())
}

/// The node's status document (also used by `ferry status`).
pub fn status_json(node: &Node) -> serde_json::Value {
    let store = node.store();
    let seq = store.as_ref().map(|s| s.latest_seq());
    let oldest_wal = store
        .as_ref()
        .and_then(|s| s.oldest_wal_seq().ok().flatten());
    let followers = node
        .replication
        .get()
        .map(|r| r.followers())
        .unwrap_or_default();
    let seed = node.seed_progress.lock().clone().map(|p| {
        json!({
            "bytes_total": p.bytes_total,
            "bytes_done": p.bytes_done,
            "bytes_reused": p.bytes_reused,
            "elapsed_secs": p.elapsed.as_secs_f64(),
        })
    });
    let server = node.server();
    json!({
        "node_id": node.cfg.node_id,
        "role": if node.is_leader() { "leader" } else { "follower" },
        "state": node.state().as_str(),
        "detail": node.detail(),
        "seq": seq,
        "oldest_wal_seq": oldest_wal,
        "leader": node.leader().map(|a| a.to_string()),
        "peers": node.cfg.follow.iter().chain(&node.cfg.peers).map(|a| a.to_string()).collect::<Vec<_>>(),
        "fenced": node.fenced(),
        // A leader with no peers to check cannot learn that another node
        // was promoted: it is not fenced by anything.
        "fencing": if node.is_leader() {
            if node.cfg.peers.is_empty() && node.cfg.follow.is_empty() { "off" } else { "peers" }
        } else { "-" },
        "set_aside": ferry_engine::list_asides(&node.cfg.data).unwrap_or_default(),
        "quic": node.quic_addr.read().map(|a| a.to_string()),
        "uptime_secs": node.started.elapsed().as_secs(),
        "followers": followers,
        "replica": (!node.is_leader()).then(|| node.replica.snapshot()),
        "seed": seed,
        "last_seed": *node.last_seed.lock(),
        "reseeds": node.reseeds.load(Ordering::SeqCst),
        "certificate": node.certificate().map(|(expires, renews)| json!({
            "expires_unix": expires,
            "renews": renews,
        })),
        "seeds_served": server.as_ref().map(|s| s.stats.seeds_completed.load(Ordering::Relaxed)),
        "seeds_active": server.as_ref().map(|s| s.active_seeds()),
        "divergences": node.divergences.load(Ordering::SeqCst),
        "history": node.history.read().as_ref().map(|h| json!({
            "id": h.current().id.to_string(),
            "start": h.current().start,
            "terms": h.terms,
        })).or_else(|| node.replica.snapshot().history.map(|id| json!({ "id": id }))),
    })
}

async fn status(State(node): State<Shared>) -> Response {
    // It reads the oldest WAL file's sequence from disk.
    let n = Arc::clone(&node);
    let doc = tokio::task::spawn_blocking(move || status_json(&n))
        .await
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    let seq = doc["seq"].as_u64().unwrap_or(0);
    (StatusCode::OK, seq_header(seq), Json(doc)).into_response()
}

#[derive(Deserialize)]
struct PromoteQuery {
    #[serde(default)]
    force: bool,
}

/// Makes this follower the leader under a new history (`?force=true`
/// overrides the refusals a reachable leader or an unfinished catch-up
/// cause).
async fn promote(
    State(node): State<Shared>,
    Query(q): Query<PromoteQuery>,
) -> Result<Response, ApiError> {
    match node.promote(q.force).await {
        Ok(p) => {
            counter("ferry_promotions_total");
            let seq = p.seq;
            Ok((StatusCode::OK, seq_header(seq), Json(p)).into_response())
        }
        Err(crate::node::PromoteError::Conflict(m)) => Err(ApiError::new(StatusCode::CONFLICT, m)),
        Err(crate::node::PromoteError::Failed(m)) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m))
        }
    }
}

/// Checks every live SST's block checksums; a follower that finds
/// corruption re-seeds itself, reusing its sound chunks.
async fn scrub(State(node): State<Shared>) -> Result<Response, ApiError> {
    store_of(&node)?;
    // A scrub reads every table: it shares the digests' slots.
    let _slot = digest_slots().try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_DIGESTS} full scans (digests, scrubs) are already running here; retry when they finish"),
        )
    })?;
    match node.scrub().await {
        Ok(s) => Ok((StatusCode::OK, Json(s)).into_response()),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e:#}"),
        )),
    }
}

/// Flushes the memtable to an SST (obsolete WAL files then age out under
/// the retention settings).
async fn flush(State(node): State<Shared>) -> Result<Response, ApiError> {
    let store = store_of(&node)?;
    let s2 = store.clone();
    blocking(move || s2.flush()).await?;
    let seq = store.latest_seq();
    Ok((
        StatusCode::OK,
        seq_header(seq),
        Json(json!({ "seq": seq, "oldest_wal_seq": store.oldest_wal_seq().ok().flatten() })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct DigestParams {
    /// Leader: also mark this sequence in every follower's stream.
    mark: Option<bool>,
    /// Follower: the digest at exactly this sequence (taken at its mark).
    seq: Option<u64>,
    timeout_ms: Option<u64>,
}

async fn digest(
    State(node): State<Shared>,
    Query(p): Query<DigestParams>,
) -> Result<Response, ApiError> {
    let store = store_of(&node)?;
    // Each digest reads the whole database on a thread of its own.
    let _slot = digest_slots().try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_DIGESTS} digests are already running here; retry when they finish"),
        )
    })?;
    let d = match (p.seq, p.mark.unwrap_or(false), node.replication.get()) {
        (None, true, Some(repl)) => {
            let repl = Arc::clone(repl);
            blocking(move || {
                let (_, handle) = repl.spawn_marked_digest()?;
                handle.join().unwrap_or_else(|_| {
                    Err(EngineError::Malformed {
                        what: "digest",
                        reason: "thread panicked".into(),
                    })
                })
            })
            .await?
        }
        (Some(seq), _, _) => digest_at(&node, &store, seq, p.timeout_ms).await?,
        _ => blocking(move || store.digest()).await?,
    };
    Ok((StatusCode::OK, seq_header(d.seq), Json(d)).into_response())
}

/// Digests computed at once per node (each scans the whole database).
const MAX_DIGESTS: usize = 2;

fn digest_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_DIGESTS);
    &SLOTS
}

/// The digest at exactly `seq`: the one a mark produced, or a fresh one
/// when the store is still at `seq`.
async fn digest_at(
    node: &Node,
    store: &Store,
    seq: u64,
    timeout_ms: Option<u64>,
) -> Result<ferry_engine::Digest, ApiError> {
    let deadline =
        Instant::now() + Duration::from_millis(timeout_ms.unwrap_or(30_000)).min(MAX_WAIT);
    loop {
        match node.replica.marked_digest(seq) {
            Some(Some(Ok(d))) => return Ok(d),
            Some(Some(Err(e))) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
            Some(None) => {}
            None => {
                let local = store.latest_seq();
                if local == seq {
                    let s2 = store.clone();
                    let d = blocking(move || s2.digest()).await?;
                    if d.seq == seq {
                        return Ok(d);
                    }
                } else if local > seq {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!("this node passed sequence {seq} (it is at {local}) without a mark; ask the leader for a marked digest first"),
                    ));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no digest at sequence {seq} in time (at {})",
                    store.latest_seq()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Latencies from half a millisecond (a live ack on a LAN) to ten
        // seconds (a chunk on a congested WAN).
        const BUCKETS: &[f64] = &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        // Gauges are refreshed at every scrape; one that was not for ten
        // minutes belongs to a follower that is gone (peers choose their
        // ids, so their series must not pile up).
        let builder = PrometheusBuilder::new().idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(Duration::from_secs(600)),
        );
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Installs the metrics recorder (call once at start) and registers the
/// event counters, so they are exported (at 0) before their first event.
pub fn init_metrics() {
    let _ = prometheus();
    for name in [
        "ferry_http_reads_total",
        "ferry_http_writes_total",
        "ferry_http_errors_total",
        "ferry_http_ack_timeouts_total",
        "ferry_followers_refused_diverged_total",
        "ferry_followers_refused_unproven_total",
        "ferry_replication_wal_batches_total",
        "ferry_oversize_batches_total",
        "ferry_promotions_total",
        "ferry_fenced_total",
        "ferry_corrupt_files_total",
        "ferry_databases_set_aside_total",
        "ferry_promotions_refused_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

async fn metrics(State(node): State<Shared>) -> Response {
    let id = node.cfg.node_id.clone();
    let g = |name: &'static str, v: f64| metrics::gauge!(name, "node" => id.clone()).set(v);
    // Counters kept as atomics elsewhere are mirrored as counters.
    let c = |name: &'static str, v: u64| metrics::counter!(name, "node" => id.clone()).absolute(v);
    if let Some(store) = node.store() {
        g("ferry_latest_seq", store.latest_seq() as f64);
        g(
            "ferry_rocksdb_compactions_running",
            store.compactions_running() as f64,
        );
    }
    c("ferry_reseeds_total", node.reseeds.load(Ordering::SeqCst));
    c(
        "ferry_divergences_total",
        node.divergences.load(Ordering::SeqCst),
    );
    g("ferry_up_seconds", node.started.elapsed().as_secs_f64());
    if let Some((expires, _)) = node.certificate() {
        g("ferry_certificate_expiry_timestamp_seconds", expires as f64);
    }
    if let Some(s) = node.server() {
        if let Some(rate) = s.busy_rate() {
            metrics::gauge!("ferry_seed_busy_rate_bytes").set(rate);
        }
        let st = &s.stats;
        c(
            "ferry_seeds_started_total",
            st.seeds_started.load(Ordering::Relaxed),
        );
        c(
            "ferry_seeds_completed_total",
            st.seeds_completed.load(Ordering::Relaxed),
        );
        c(
            "ferry_seed_chunks_served_total",
            st.chunks_served.load(Ordering::Relaxed),
        );
        c(
            "ferry_seed_bytes_sent_total",
            st.chunk_bytes_sent.load(Ordering::Relaxed),
        );
        c(
            "ferry_seed_bytes_raw_total",
            st.chunk_bytes_raw.load(Ordering::Relaxed),
        );
        c(
            "ferry_auth_failures_total",
            st.auth_failures.load(Ordering::Relaxed),
        );
        g("ferry_seeds_active", s.active_seeds() as f64);
        g(
            "ferry_seed_chunks_on_the_wire",
            st.chunks_on_the_wire.load(Ordering::Relaxed) as f64,
        );
    }
    if let Some(r) = node.replication.get() {
        for f in r.followers() {
            let labels = [("node", id.clone()), ("follower", f.node_id.clone())];
            metrics::gauge!("ferry_follower_lag_seqs", &labels).set(f.lag_seqs as f64);
            metrics::gauge!("ferry_follower_lag_ms", &labels).set(f.lag_ms as f64);
            metrics::gauge!("ferry_follower_lag_bytes", &labels).set(f.lag_bytes as f64);
            metrics::gauge!("ferry_follower_acked_seq", &labels).set(f.acked_seq as f64);
            metrics::gauge!("ferry_follower_in_sync", &labels).set(if f.in_sync {
                1.0
            } else {
                0.0
            });
            metrics::gauge!("ferry_follower_live", &labels).set(if f.state == "live" {
                1.0
            } else {
                0.0
            });
        }
    }
    if !node.is_leader() {
        let r = node.replica.snapshot();
        g("ferry_replica_applied_seq", r.applied_seq as f64);
        g("ferry_replica_leader_seq", r.leader_seq as f64);
        g(
            "ferry_replica_lag_seqs",
            r.leader_seq.saturating_sub(r.applied_seq) as f64,
        );
        c("ferry_replica_reconnects_total", r.reconnects);
        g(
            "ferry_replica_leader_reachable",
            if node.state() == crate::node::NodeState::Unreachable {
                0.0
            } else {
                1.0
            },
        );
        if let Some(t) = r.last_contact_unix_ms {
            g(
                "ferry_replica_last_contact_age_seconds",
                ferry_transfer::follower::unix_ms().saturating_sub(t) as f64 / 1000.0,
            );
        }
        c("ferry_replica_batches_applied_total", r.batches_applied);
    }
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}
