//! The `ferry` command: run a node, seed a follower, take checkpoints and
//! digests, manage certificates.
//!
//! Exit codes: 0 success, 1 failure (the error is printed), 2 usage error,
//! 3 verification found a mismatch.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_engine::{Store, StoreOptions};
use ferry_transfer::auth::{ClusterCa, JoinToken, NodeAuth};
use ferry_transfer::{ClientAuth, Compression, ServeOptions};

mod bench;
mod client;
mod config;
mod datagen;
mod demo;
mod http;
mod netlink;
mod node;
mod util;

/// ferry adds followers to a RocksDB leader without downtime: a consistent
/// checkpoint shipped over QUIC as verified chunks, then WAL catch-up.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "FERRY_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing syntax), e.g. `info` or `ferry_transfer=debug`.
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG")]
    log: String,
    /// A TOML file whose keys are flag names (`max-rate = "100M"`). A flag
    /// beats its environment variable, which beats the file.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Take a hard-linked checkpoint of the store in DIR (no write pause) and
    /// print its path, sequence, file count, bytes and manifest id.
    Checkpoint {
        /// The data directory (a RocksDB directory; an existing one is adopted).
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// Print JSON: path, seq, files, bytes, manifest_id.
        #[arg(long)]
        json: bool,
    },
    /// Print a digest of every key and value in DIR and the sequence it is
    /// taken at (opens the database read-only; works on checkpoints too).
    Digest {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// Print JSON: digest, seq, keys, bytes.
        #[arg(long)]
        json: bool,
    },
    /// Run a node on DIR: a leader (takes writes, serves seeds, feeds
    /// followers) or, with --follow, a follower that seeds itself, catches
    /// up from the leader's WAL and stays live.
    Serve(ServeArgs),
    /// Print a node's status: role, state, sequence, followers and lag.
    Status {
        /// The node's HTTP address.
        #[arg(long, env = "FERRY_HTTP")]
        http: SocketAddr,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare a leader's and a follower's digests at the same sequence;
    /// exits 3 on a mismatch.
    Verify {
        /// The leader's HTTP address.
        #[arg(long, env = "FERRY_LEADER_HTTP")]
        leader_http: SocketAddr,
        /// The follower's HTTP address.
        #[arg(long, env = "FERRY_FOLLOWER_HTTP")]
        follower_http: SocketAddr,
        /// How long to wait for the follower to reach the leader's sequence.
        #[arg(long, env = "FERRY_TIMEOUT_SECS", default_value_t = 60)]
        timeout_secs: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a caught-up follower the leader at its applied sequence, under a
    /// new replication history; prints the history id and sequence. Refused
    /// on a leader and while the old leader is reachable, unless --force.
    Promote {
        /// The follower's HTTP address.
        #[arg(long, env = "FERRY_HTTP")]
        http: SocketAddr,
        /// Promote even though the old leader is still reachable or the
        /// follower is still catching up (two leaders may then take writes;
        /// give the old one --peers so it fences itself).
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node of the cluster led from DIR: the leader refuses its
    /// connections (and closes the ones it has), its renewals and its
    /// enrollment. The join secret is rotated too, since the node may hold
    /// it; the new token is printed.
    Revoke {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// The node's id (the name in its certificate).
        #[arg(long, env = "FERRY_NODE")]
        node: String,
    },
    /// List the databases this node set aside when its leader refused it as
    /// diverged (writes the cluster does not have), or export one's
    /// operations as JSON lines: seq, op, key, value.
    Aside {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// Export this set-aside database's operations.
        #[arg(long, env = "FERRY_EXPORT")]
        export: Option<String>,
        /// Export from this sequence on (default: the first its WAL holds).
        #[arg(long, env = "FERRY_FROM", requires = "export")]
        from: Option<u64>,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every live SST of a running node against its block checksums.
    /// Exits 3 when some are corrupt; a follower then re-seeds itself from
    /// its leader, fetching only the damaged chunks.
    Scrub {
        /// The node's HTTP address.
        #[arg(long, env = "FERRY_HTTP")]
        http: SocketAddr,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seed an empty directory from a leader over QUIC and print the
    /// snapshot's sequence. Resumes an interrupted seed of the same directory.
    Seed(SeedArgs),
    /// Print the join token of the node whose data directory is DIR.
    Token {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// Replace the join secret with a new one and print the new token:
        /// the old token admits no one from then on (the running leader
        /// reads the new secret at the next Hello; enrolled nodes keep
        /// their certificates).
        #[arg(long)]
        rotate: bool,
    },
    /// Run the whole story on local defaults: a leader with data and a live
    /// write load, a new follower seeded over QUIC, catch-up, verification.
    Demo(demo::DemoArgs),
    /// Measure the whole job with real processes on loopback: seed speed,
    /// time to live, catch-up, lag, the leader's write rate during a seed,
    /// memory and CPU.
    Bench(bench::BenchArgs),
    /// Create a cluster CA and node certificates for operator-managed TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a new cluster CA (ca.pem, ca.key) in OUT.
    InitCa {
        /// The directory to write ca.pem and ca.key to.
        #[arg(long, env = "FERRY_OUT")]
        out: PathBuf,
    },
    /// Issue a node certificate (NAME.pem, NAME.key) signed by the CA in CA_DIR.
    Issue {
        /// The directory that holds ca.pem and ca.key.
        #[arg(long, env = "FERRY_CA_DIR")]
        ca_dir: PathBuf,
        /// The node's name (the certificate's common name).
        #[arg(long, env = "FERRY_NAME")]
        name: String,
        /// The directory to write NAME.pem and NAME.key to.
        #[arg(long, env = "FERRY_OUT")]
        out: PathBuf,
        /// How long the certificate stays valid (operator certificates are
        /// renewed by the operator, by issuing again).
        #[arg(long, env = "FERRY_DAYS", default_value_t = 365)]
        days: u64,
    },
}

/// TLS material supplied by the operator instead of a join token.
#[derive(Args, Debug, Clone)]
struct TlsArgs {
    /// The cluster CA certificate (PEM). With --cert and --key: mutual TLS.
    #[arg(long, env = "FERRY_CA", requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the CA.
    #[arg(long, env = "FERRY_CERT", requires = "ca")]
    cert: Option<PathBuf>,
    /// This node's private key (PEM, PKCS#8).
    #[arg(long, env = "FERRY_KEY", requires = "ca")]
    key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[arg(long, env = "FERRY_DATA")]
    data: PathBuf,
    /// QUIC address to listen on.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// This node's id (defaults to the host name and a hash of the data
    /// directory: the same across restarts).
    #[arg(long, env = "FERRY_NODE_ID")]
    node_id: Option<String>,
    /// Upper bound on seed bandwidth, bytes per second (suffixes K, M, G).
    #[arg(long, env = "FERRY_MAX_RATE", value_parser = util::parse_size)]
    max_rate: Option<u64>,
    /// Seed bandwidth while this node is taking writes, so that seeds yield
    /// to the foreground load; an idle node seeds at full speed.
    #[arg(long, env = "FERRY_BUSY_MAX_RATE", value_parser = util::parse_size, default_value = "100M")]
    busy_max_rate: u64,
    /// How much slower, in percent, this node's writes may get while a
    /// seed runs under them before the seed is slowed: a closed-loop
    /// writer whose latency grows by P % keeps 100/(100+P) of its rate.
    #[arg(long, env = "FERRY_BUSY_SLOWDOWN", default_value_t = ferry_transfer::leader::DEFAULT_BUSY_SLOWDOWN_PCT,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    busy_slowdown: u32,
    /// Never slow seeds down for the foreground load.
    #[arg(long, env = "FERRY_NO_BUSY_LIMIT")]
    no_busy_limit: bool,
    /// Chunk compression: auto compresses files that shrink well (WAL,
    /// MANIFEST, uncompressed SSTs) and sends block-compressed SSTs as is.
    #[arg(long, env = "FERRY_COMPRESSION", value_enum, default_value_t = CompressionArg::Auto)]
    compression: CompressionArg,
    /// zstd level for compressed chunks.
    #[arg(long, env = "FERRY_ZSTD_LEVEL", default_value_t = 1)]
    zstd_level: i32,
    /// A new node's seed reuses a seed checkpoint younger than this many
    /// seconds (followers joining together share one); an older one would
    /// cost the new follower the WAL written since, replayed after its
    /// seed. A node resuming its seed gets its own checkpoint back while
    /// it is kept (60 s after its last use).
    #[arg(long, env = "FERRY_CHECKPOINT_REUSE_SECS", default_value_t = 10)]
    checkpoint_reuse_secs: u64,
    /// Keep obsolete WAL files this many seconds for catching-up followers.
    #[arg(long, env = "FERRY_WAL_TTL_SECS", default_value_t = 6 * 3600)]
    wal_ttl_secs: u64,
    /// ... and at most this many MiB of them.
    #[arg(long, env = "FERRY_WAL_SIZE_LIMIT_MB", default_value_t = 8192)]
    wal_size_limit_mb: u64,
    /// HTTP API address (JSON API, /v1/status, /metrics).
    #[arg(long, env = "FERRY_HTTP")]
    http: Option<SocketAddr>,
    /// Follow the leader (its QUIC address): seed, catch up, stay live.
    /// Several comma-separated peers: follow whichever of them leads the
    /// newest history, and switch to a promoted one. Without it the node
    /// is a leader.
    #[arg(long, env = "FERRY_FOLLOW", value_delimiter = ',')]
    follow: Vec<SocketAddr>,
    /// A leader's peers (comma-separated QUIC addresses), asked at start
    /// and every second for a newer history: if another node was promoted,
    /// this one is fenced and takes no writes.
    #[arg(long, env = "FERRY_PEERS", value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Seed from this node (any caught-up follower) instead of the leader.
    #[arg(long, env = "FERRY_SEED_FROM", requires = "follow")]
    seed_from: Option<SocketAddr>,
    /// The join token printed by the leader (a follower's first start).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// First wait before a re-seed that follows another within 10 minutes
    /// (doubles each time, up to 10 minutes).
    #[arg(long, env = "FERRY_RESEED_BACKOFF_SECS", default_value_t = 30)]
    reseed_backoff_secs: u64,
    /// Check every live SST's block checksums this often (0: only when
    /// asked, with `ferry scrub`). A follower that finds corruption
    /// re-seeds itself, fetching only the damaged chunks.
    #[arg(long, env = "FERRY_SCRUB_INTERVAL_SECS", default_value_t = 0)]
    scrub_interval_secs: u64,
    /// How long the certificates this leader issues (its own and its
    /// followers') stay valid; nodes renew theirs when a third is left.
    #[arg(long, env = "FERRY_CERT_LIFETIME_SECS", default_value_t = 30 * 24 * 3600)]
    cert_lifetime_secs: u64,
    /// A peer silent this long is declared lost (keep-alives go out at a
    /// twelfth of it; a restarted peer is noticed at the next keep-alive).
    #[arg(long, env = "FERRY_PEER_TIMEOUT_MS", default_value_t = 3000)]
    peer_timeout_ms: u64,
    /// Congestion control of QUIC connections: bbr keeps its speed under
    /// random loss; cubic (TCP's) yields more to competing flows.
    #[arg(long, env = "FERRY_CONGESTION", value_enum, default_value_t = CongestionArg::Bbr)]
    congestion: CongestionArg,
    /// The CPU priority of seed work, as leader and as a new follower
    /// (idle: SCHED_IDLE threads, which take only CPU nothing else on the
    /// host wants, so on a saturated host the seed crawls; normal: as any
    /// thread).
    #[arg(long, env = "FERRY_SEED_PRIORITY", value_enum, default_value_t = SeedPriorityArg::Normal)]
    seed_priority: SeedPriorityArg,
    /// What a follower does when its leader refuses it as diverged (it holds
    /// writes the leader does not): re-seed to the leader's content, reusing
    /// matching local files, or stop and stay `diverged`.
    #[arg(long, env = "FERRY_ON_DIVERGENCE", value_enum, default_value_t = node::OnDivergence::Reseed)]
    on_divergence: node::OnDivergence,
    /// Ship writes to followers before the leader's WAL is synced. Lower
    /// write latency, but after a power cut followers can hold writes the
    /// leader lost; they are then refused as diverged and re-seeded.
    #[arg(long, env = "FERRY_SHIP_UNSYNCED")]
    ship_unsynced: bool,
    /// Semi-synchronous writes by default: the HTTP API answers a write only
    /// after this many followers durably applied it (`?acks=N` per request).
    #[arg(long, env = "FERRY_MIN_ACKS", default_value_t = 0)]
    min_acks: usize,
    /// How many databases set aside on divergence to keep under
    /// DIR/.ferry/aside (the oldest are removed first).
    #[arg(long, env = "FERRY_KEEP_ASIDE", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    keep_aside: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SeedPriorityArg {
    Idle,
    Normal,
}

impl From<SeedPriorityArg> for ferry_transfer::SeedPriority {
    fn from(p: SeedPriorityArg) -> Self {
        match p {
            SeedPriorityArg::Idle => Self::Idle,
            SeedPriorityArg::Normal => Self::Normal,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
}

impl CongestionArg {
    fn transport(self, peer_timeout_ms: u64) -> ferry_transfer::TransportOptions {
        let mut t = ferry_transfer::TransportOptions::default()
            .with_idle_timeout(Duration::from_millis(peer_timeout_ms));
        t.congestion = match self {
            CongestionArg::Bbr => ferry_transfer::Congestion::Bbr,
            CongestionArg::Cubic => ferry_transfer::Congestion::Cubic,
        };
        t
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressionArg {
    Auto,
    Off,
    Always,
}

#[derive(Args, Debug)]
struct SeedArgs {
    /// The leader's QUIC address.
    #[arg(long, env = "FERRY_LEADER")]
    leader: SocketAddr,
    /// The directory to seed; must be empty (or hold an unfinished seed).
    #[arg(long, env = "FERRY_DATA")]
    data: PathBuf,
    /// The join token printed by the leader.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Chunks in flight at once.
    #[arg(long, env = "FERRY_PARALLEL", default_value_t = 16)]
    parallel: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Never draw a progress bar, even on a terminal.
    #[arg(long, env = "FERRY_NO_PROGRESS")]
    no_progress: bool,
    /// A leader silent this long is declared lost; the seed reconnects and
    /// resumes.
    #[arg(long, env = "FERRY_PEER_TIMEOUT_MS", default_value_t = 3000)]
    peer_timeout_ms: u64,
    /// Congestion control of QUIC connections: bbr keeps its speed under
    /// random loss; cubic (TCP's) yields more to competing flows.
    #[arg(long, env = "FERRY_CONGESTION", value_enum, default_value_t = CongestionArg::Bbr)]
    congestion: CongestionArg,
    /// The CPU priority of this seed's work (idle: SCHED_IDLE threads,
    /// which take only CPU nothing else on the host wants, so on a
    /// saturated host the seed crawls; normal: as any thread).
    #[arg(long, env = "FERRY_SEED_PRIORITY", value_enum, default_value_t = SeedPriorityArg::Normal)]
    seed_priority: SeedPriorityArg,
    #[command(flatten)]
    tls: TlsArgs,
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = config::apply(&args, &<Cli as clap::CommandFactory>::command()) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let cli = Cli::parse_from(args);
    // The demo tells its own story; library logs only for warnings unless asked.
    let filter = if matches!(cli.command, Command::Demo(_)) && cli.log == "info" {
        "warn"
    } else {
        cli.log.as_str()
    };
    util::init_logging(filter, matches!(cli.log_format, LogFormat::Json));
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<config::UsageError>()) {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

/// `ferry aside`: the set-aside databases of DIR, or one's operations.
fn aside(
    data: &std::path::Path,
    export: Option<&str>,
    from: Option<u64>,
    json: bool,
) -> Result<i32> {
    use std::io::Write;
    if !data.join("CURRENT").exists() && !ferry_engine::ferry_dir(data).exists() {
        return Err(config::usage(format!(
            "no ferry node at {}",
            data.display()
        )));
    }
    let Some(name) = export else {
        let list = ferry_engine::list_asides(data)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else if list.is_empty() {
            println!("no database set aside in {}", data.display());
        } else {
            println!("{:<48} {:>12} {:>12}  REASON", "NAME", "SEQ", "WAL FROM");
            for a in &list {
                let from = a
                    .oldest_wal_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into());
                println!("{:<48} {:>12} {:>12}  {}", a.name, a.seq, from, a.reason);
            }
        }
        return Ok(0);
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let text = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => serde_json::json!(s),
        Err(_) => {
            serde_json::json!({ "base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b) })
        }
    };
    ferry_engine::export_aside(data, name, from, |op| {
        let line = serde_json::json!({
            "seq": op.seq,
            "op": op.op,
            "key": text(&op.key),
            "value": op.value.as_deref().map(text),
        });
        writeln!(out, "{line}").map_err(|e| ferry_engine::Error::Malformed {
            what: "export",
            reason: e.to_string(),
        })
    })
    .map_err(|e| match e {
        ferry_engine::Error::NoCheckpoint { name, .. } => config::usage(format!(
            "no set-aside database {name} in {} (list them with `ferry aside --data {}`)",
            data.display(),
            data.display()
        )),
        e => e.into(),
    })?;
    out.flush()?;
    Ok(0)
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Checkpoint { data, json } => checkpoint(&data, json),
        Command::Digest { data, json } => digest(&data, json),
        Command::Serve(args) => runtime()?.block_on(serve(args)),
        Command::Seed(args) => runtime()?.block_on(seed(args)),
        Command::Token { data, rotate } => {
            if rotate {
                let dir = node::tls_dir(&data);
                let token = NodeAuth::rotate_secret(&dir).map_err(|e| {
                    config::usage(format!(
                        "cannot rotate the join secret of {}: {e}",
                        data.display()
                    ))
                })?;
                ferry_transfer::auth::write_private(
                    &dir.join("join-token"),
                    token.to_string().as_bytes(),
                )?;
                eprintln!("rotated: the old token no longer admits new nodes here; followers that enrolled before keep their certificates (and their copy of the old secret: rotate on them too, or restart them with --token)");
                println!("{token}");
                return Ok(0);
            }
            let auth = NodeAuth::load_dir(&node::tls_dir(&data))?.ok_or_else(|| {
                config::usage(format!(
                    "no ferry node at {} (a leader creates its identity on its first `ferry serve --data {}`)",
                    data.display(),
                    data.display()
                ))
            })?;
            let token = auth.token().ok_or_else(|| {
                config::usage(format!(
                    "the node at {} holds no join secret: only a leader issues join tokens",
                    data.display()
                ))
            })?;
            println!("{token}");
            Ok(0)
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Aside {
            data,
            export,
            from,
            json,
        } => aside(&data, export.as_deref(), from, json),
        Command::Bench(args) => bench::run(args),
        Command::Status { http, json } => client::status(http, json),
        Command::Verify {
            leader_http,
            follower_http,
            timeout_secs,
            json,
        } => client::verify(
            leader_http,
            follower_http,
            Duration::from_secs(timeout_secs),
            json,
        ),
        Command::Certs(c) => certs(c),
        Command::Promote { http, force, json } => client::promote(http, force, json),
        Command::Scrub { http, json } => client::scrub(http, json),
        Command::Revoke { data, node } => {
            let dir = node::tls_dir(&data);
            if !dir.join("ca.key").exists() {
                return Err(config::usage(format!(
                    "{} holds no cluster CA: revoke on the node that created the cluster",
                    data.display()
                )));
            }
            ferry_transfer::seed::validate_node_id(&node).map_err(config::usage)?;
            NodeAuth::revoke(&dir, &node)
                .with_context(|| format!("revoke {node} in {}", dir.display()))?;
            let token = NodeAuth::rotate_secret(&dir)
                .with_context(|| format!("rotate the join secret in {}", dir.display()))?;
            println!("revoked {node}: the leader refuses it from now on (within a second on a running leader)");
            println!("the join secret was rotated; the new token is:");
            println!("{token}");
            Ok(0)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn checkpoint(data: &Path, json: bool) -> Result<i32> {
    let opts = StoreOptions {
        create_if_missing: false,
        ..StoreOptions::default()
    };
    let store =
        Store::open(data, opts).with_context(|| format!("open the store in {}", data.display()))?;
    let cp = store.checkpoint().context("take a checkpoint")?;
    let (manifest, _) = store
        .manifest(&cp)
        .context("build the checkpoint's manifest")?;
    let out = serde_json::json!({
        "path": cp.path,
        "seq": cp.seq,
        "files": manifest.files.len(),
        "bytes": manifest.total_bytes(),
        "manifest_id": manifest.id().to_string(),
    });
    if json {
        println!("{out}");
    } else {
        println!("checkpoint   {}", cp.path.display());
        println!("sequence     {}", cp.seq);
        println!("files        {}", manifest.files.len());
        println!(
            "bytes        {} ({})",
            manifest.total_bytes(),
            util::human_bytes(manifest.total_bytes())
        );
        println!("manifest id  {}", manifest.id());
    }
    Ok(0)
}

fn digest(data: &Path, json: bool) -> Result<i32> {
    let store = Store::open_read_only(data)
        .with_context(|| format!("open {} read-only", data.display()))?;
    let d = store.digest().context("compute the digest")?;
    if json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        println!("digest    {}", d.digest);
        println!("sequence  {}", d.seq);
        println!("keys      {}", d.keys);
        println!("bytes     {}", d.bytes);
    }
    Ok(0)
}

async fn serve(args: ServeArgs) -> Result<i32> {
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| ferry_transfer::seed::default_node_id(&args.data));
    ferry_transfer::seed::validate_node_id(&node_id).map_err(config::usage)?;
    let compression = match args.compression {
        CompressionArg::Off => Compression::Off,
        CompressionArg::Always => Compression::Always {
            level: args.zstd_level,
        },
        CompressionArg::Auto => {
            // On a link slower than zstd -1 (about 250 MB/s on two cores)
            // compression pays for itself even on block-compressed SSTs.
            let min_ratio = if args.max_rate.is_some_and(|r| r < 200_000_000) {
                1.1
            } else {
                2.0
            };
            Compression::Auto {
                level: args.zstd_level,
                min_ratio,
            }
        }
    };
    let token = args
        .token
        .as_deref()
        .map(str::parse::<JoinToken>)
        .transpose()?;
    let cfg = node::NodeConfig {
        data: args.data.clone(),
        listen: args.listen,
        node_id: node_id.clone(),
        follow: args.follow,
        peers: args.peers,
        seed_from: args.seed_from,
        token,
        tls_files: match (&args.tls.ca, &args.tls.cert, &args.tls.key) {
            (Some(a), Some(b), Some(c)) => Some((a.clone(), b.clone(), c.clone())),
            _ => None,
        },
        store: StoreOptions {
            wal_ttl_seconds: args.wal_ttl_secs,
            wal_size_limit_mb: args.wal_size_limit_mb,
            durable_shipping: !args.ship_unsynced,
            ..StoreOptions::default()
        },
        serve: ServeOptions {
            node_id,
            max_rate: args.max_rate,
            busy_max_rate: (!args.no_busy_limit).then_some(args.busy_max_rate),
            busy_slowdown_pct: args.busy_slowdown,
            seed_priority: args.seed_priority.into(),
            compression,
            checkpoint_reuse: Duration::from_secs(args.checkpoint_reuse_secs),
            ..ServeOptions::default()
        },
        reseed_backoff: Duration::from_secs(args.reseed_backoff_secs),
        cert_lifetime: Duration::from_secs(args.cert_lifetime_secs.max(10)),
        scrub_interval: (args.scrub_interval_secs > 0)
            .then(|| Duration::from_secs(args.scrub_interval_secs)),
        transport: args.congestion.transport(args.peer_timeout_ms),
        on_divergence: args.on_divergence,
        min_acks: args.min_acks,
        keep_aside: args.keep_aside as usize,
    };
    http::init_metrics();
    let node = node::start(cfg).await?;
    if let Some(addr) = args.http {
        let bound = http::serve(Arc::clone(&node), addr).await?;
        *node.http_addr.write() = Some(bound);
        tracing::info!(http = %bound, "HTTP API listening");
    }
    let mut stopped = node.shutdown_requested();
    tokio::select! {
        _ = util::shutdown_signal() => tracing::info!("signal received; shutting down"),
        _ = stopped.wait_for(|s| *s) => {}
    }
    node.shutdown();
    // Let the follower loop and the servers wind down, then flush.
    for _ in 0..50 {
        if matches!(
            node.state(),
            node::NodeState::Stopped | node::NodeState::Leader
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(store) = node.store() {
        let _ = store.sync_wal();
    }
    Ok(0)
}

async fn seed(args: SeedArgs) -> Result<i32> {
    let auth = match (&args.token, &args.tls.ca, &args.tls.cert, &args.tls.key) {
        (Some(t), _, _, _) => ClientAuth::from_token(&t.parse::<JoinToken>()?),
        (None, Some(ca), Some(cert), Some(key)) => NodeAuth::from_files(ca, cert, key).context("load the TLS files")?.client_credentials(),
        _ => return Err(config::usage("a join token (--token or FERRY_TOKEN) or --ca/--cert/--key is required to authenticate to the leader")),
    };
    let mut cfg = ferry_transfer::SeedConfig::new(&args.data, args.leader, auth);
    cfg.parallel = args.parallel.max(1);
    cfg.transport = args.congestion.transport(args.peer_timeout_ms);
    cfg.priority = args.seed_priority.into();
    let bar = (!args.no_progress && std::io::stderr().is_terminal()).then(util::progress_bar);
    cfg.progress = Some(util::progress_callback(bar.clone()));
    let report = ferry_transfer::seed(cfg)
        .await
        .with_context(|| format!("seed {} from {}", args.data.display(), args.leader))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        let me = std::process::id();
        if let Some(o) = v.as_object_mut() {
            o.insert("peak_rss_bytes".into(), bench::proc_peak_rss(me).into());
            o.insert("cpu_secs".into(), bench::proc_cpu_secs(me).into());
        }
        println!("{v}");
    } else {
        let rate = report.bytes_fetched as f64 / report.elapsed_secs.max(1e-9);
        println!(
            "seeded {} at sequence {}: {} files, {} in {:.2}s ({}/s); fetched {} chunks ({} on the wire), resumed {}, reused {} from local files, re-fetched {}, {} reconnects",
            args.data.display(),
            report.seq,
            report.files,
            util::human_bytes(report.bytes_total),
            report.elapsed_secs,
            util::human_bytes(rate as u64),
            report.chunks_fetched,
            util::human_bytes(report.wire_bytes),
            report.chunks_resumed,
            report.chunks_reused,
            report.chunks_refetched,
            report.reconnects,
        );
    }
    Ok(0)
}

fn certs(c: CertsCommand) -> Result<i32> {
    match c {
        CertsCommand::InitCa { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            let ca = ClusterCa::generate("ferry cluster CA")?;
            ferry_transfer::auth::write_private(&out.join("ca.key"), ca.key_pem().as_bytes())?;
            std::fs::write(out.join("ca.pem"), &ca.cert_pem)?;
            println!(
                "created {} and {}",
                out.join("ca.pem").display(),
                out.join("ca.key").display()
            );
        }
        CertsCommand::Issue {
            ca_dir,
            name,
            out,
            days,
        } => {
            let ca = ClusterCa::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key"))?;
            let ck = ca.issue(&name, Duration::from_secs(days.saturating_mul(86_400)))?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join(format!("{name}.pem")), &ck.cert_pem)?;
            ferry_transfer::auth::write_private(
                &out.join(format!("{name}.key")),
                ck.key_pem.as_bytes(),
            )?;
            println!(
                "issued {} and {}",
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}.key")).display()
            );
        }
    }
    Ok(0)
}
