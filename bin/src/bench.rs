//! `ferry bench`: the whole job, measured, with real processes.
//!
//! A leader (`ferry serve`) on a generated or adopted dataset, a new
//! follower (`ferry serve --follow`) that seeds over QUIC, catches up and
//! goes live, and a write load through the leader's HTTP API. Phases:
//!
//! 1. idle: once the compactions that opening the dataset started are
//!    done, the load writes as fast as one client can for `--idle-secs`
//!    (the leader's idle write rate, long enough to include the flushes
//!    and compactions the load causes); the share of each window with a
//!    RocksDB compaction running is reported beside the ratio; with
//!    `--idle-repeat`, a second idle window follows, and its rate against
//!    the first (an A/A test) shows the noise of the ratio itself;
//! 2. seed: the follower starts; the same load runs during the whole seed
//!    (the leader's write rate during a seed, against idle), until it is live;
//!    with `--seed-rounds N`, phases 1 and 2 run N times, each round with a
//!    new follower (an earlier round's is verified and removed), and every
//!    round's ratio is reported with their median and minimum;
//! 3. live: the load at `--write-rate`; probes measure the time from a
//!    write's acknowledgement on the leader to its visibility on the
//!    follower (lag p50/p99);
//! 4. catch-up: the follower is paused (SIGSTOP) for a few seconds under the
//!    load, then resumed; the backlog it applies per second against the
//!    write rate is the catch-up ratio;
//! 5. verify: digests at one sequence, under load.
//!
//! Peak RSS and CPU seconds per GB seeded come from /proc for each process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::datagen::{self, Values};
use crate::{client, util};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Size of the generated dataset on disk (K, M, G; KiB, MiB, GiB).
    #[arg(long, env = "FERRY_SIZE", value_parser = util::parse_size, default_value = "256MiB")]
    size: u64,
    /// Kind of values of the generated dataset.
    #[arg(long, env = "FERRY_VALUES", value_enum, default_value_t = Values::Realistic)]
    values: Values,
    /// Benchmark a copy of this RocksDB directory instead of generated data
    /// (SSTs are hard-linked, the rest copied; DIR itself is never written).
    #[arg(long, env = "FERRY_DATA")]
    data: Option<PathBuf>,
    /// Keys per second of the write load in the live and catch-up phases.
    #[arg(long, env = "FERRY_WRITE_RATE", default_value_t = 5000)]
    write_rate: u64,
    /// Seconds of the idle window. It must hold the memtable flushes and
    /// the compactions they start that the same load causes during a seed
    /// (about one flush per 10 s here): a window of a few seconds measures
    /// the memtable alone, a rate the leader cannot sustain.
    #[arg(long, env = "FERRY_IDLE_SECS", default_value_t = 20)]
    idle_secs: u64,
    /// Measure a second idle window of the same length right after the
    /// first, before the seed. Its write rate against the first is an A/A
    /// test: how far the ratio moves on this host with no seed at all,
    /// beside which the seed's ratio is read.
    #[arg(long, env = "FERRY_IDLE_REPEAT")]
    idle_repeat: bool,
    /// Seed this many times under the load, each seed after its own idle
    /// window (and A/A window), and report every round's write ratio with
    /// their median and minimum: one ratio is one sample of a noisy
    /// measurement. An earlier round's follower is verified, stopped and
    /// removed before the next round; the last round goes on to the live,
    /// catch-up and verify phases. The first seed also hashes the leader's
    /// SSTs; later rounds find the hashes cached.
    #[arg(
        long,
        env = "FERRY_SEED_ROUNDS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=50)
    )]
    seed_rounds: u32,
    /// Distinct keys the write load writes (0: a new key every write).
    /// Bounded, the load inserts until the keys are taken and then
    /// overwrites them, so the database stops growing and round after
    /// round seeds and compacts about the same data. Unbounded, it grows by
    /// every write, as many megabytes a second as the load runs at.
    #[arg(long, env = "FERRY_LOAD_KEYS", default_value_t = 0)]
    load_keys: u64,
    /// Measure the seed's cost to the writes in pairs as well: during the
    /// seed the follower is paused (SIGSTOP) and resumed every this many
    /// milliseconds, and each slice with the seed running is compared with
    /// the paused slices on either side of it, so drift and compactions
    /// fall on both sides alike (an idle window before the seed cannot
    /// promise that). The A/A window, with --idle-repeat, is cut into the
    /// same slices with no seed at all. The first fifth of each slice, the
    /// switch settling, is not counted. The seed takes about twice as
    /// long. At most 2000, so that a paused follower stays well inside
    /// the QUIC idle timeout (3 s); 0 turns it off.
    #[arg(
        long,
        env = "FERRY_PAIRED_SLICE_MS",
        default_value_t = 0,
        value_parser = parse_slice_ms
    )]
    paired_slice_ms: u64,
    /// Seconds of the live phase (lag measurement).
    #[arg(long, env = "FERRY_LIVE_SECS", default_value_t = 5)]
    live_secs: u64,
    /// Seconds the follower is paused before the catch-up measurement.
    #[arg(long, env = "FERRY_PAUSE_SECS", default_value_t = 4)]
    pause_secs: u64,
    /// Put the leader in a network namespace behind a veth link shaped by
    /// tbf to this many bits per second (e.g. 1G); needs root and `ip`/`tc`.
    #[arg(long, env = "FERRY_LINK", value_parser = util::parse_bits)]
    link: Option<u64>,
    /// Random loss on the follower's path to the leader, through ferry's
    /// UDP impairment proxy (e.g. 0.01 for 1%).
    #[arg(long, env = "FERRY_LOSS")]
    loss: Option<f64>,
    /// One-way delay in milliseconds on that path (the RTT is twice this).
    #[arg(long, env = "FERRY_DELAY_MS")]
    delay_ms: Option<u64>,
    /// Extra flags for both `ferry serve` processes (repeatable), e.g.
    /// `--serve-arg=--compression=always`.
    #[arg(
        long = "serve-arg",
        env = "FERRY_SERVE_ARG",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    serve_args: Vec<String>,
    /// Work in this directory (kept) instead of a temporary one.
    #[arg(long, env = "FERRY_WORKDIR")]
    workdir: Option<PathBuf>,
    /// Put the follower's data in a temporary directory under this one
    /// (removed after, unless --keep), e.g. on another disk. A follower on
    /// another host never shares the leader's disk; on one disk, its
    /// writeback delays the leader's WAL syncs.
    #[arg(long, env = "FERRY_FOLLOWER_PARENT")]
    follower_parent: Option<PathBuf>,
    /// Run the follower at this nice value (0-19). On one host the
    /// follower's work (decompressing, hashing, writing) competes with the
    /// leader's writes for the cores, which a follower on another host
    /// does not; at 19 it runs only when a core is free.
    #[arg(long, env = "FERRY_FOLLOWER_NICE", value_parser = clap::value_parser!(u8).range(0..=19))]
    follower_nice: Option<u8>,
    /// Keep the temporary directory.
    #[arg(long, env = "FERRY_KEEP")]
    keep: bool,
    /// Only create the dataset (in WORKDIR/leader) and exit.
    #[arg(long, env = "FERRY_PREPARE_ONLY", requires = "workdir")]
    prepare_only: bool,
    /// Print the results as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Prints phase messages: a spinner on a terminal, plain lines elsewhere
/// (at most one a second within a phase).
struct Phases {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last: parking_lot::Mutex<(String, Instant)>,
}

impl Phases {
    fn new() -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Self {
            bar,
            started: Instant::now(),
            last: parking_lot::Mutex::new((String::new(), Instant::now())),
        }
    }

    fn say(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => {
                // The phase is the text before a colon.
                let phase = msg.split(':').next().unwrap_or("").to_owned();
                let mut last = self.last.lock();
                if phase != last.0 || last.1.elapsed() >= Duration::from_secs(1) {
                    eprintln!("[{:>6.1}s] {msg}", self.started.elapsed().as_secs_f64());
                    *last = (phase, Instant::now());
                }
            }
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub fn run(args: BenchArgs) -> Result<i32> {
    if let Some(l) = args.loss {
        ensure!(
            (0.0..1.0).contains(&l),
            crate::config::usage("--loss is a fraction in [0, 1)")
        );
    }
    let mut tmp = None;
    let root = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ferry-bench-")
                .tempdir()
                .context("create a temp directory")?;
            let p = t.path().to_path_buf();
            tmp = Some(t);
            p
        }
    };
    let follower_tmp = match &args.follower_parent {
        Some(d) => Some(
            tempfile::Builder::new()
                .prefix("ferry-bench-follower-")
                .tempdir_in(d)
                .with_context(|| format!("create a directory in {}", d.display()))?,
        ),
        None => None,
    };
    let follower_dir = match &follower_tmp {
        Some(t) => t.path().join("follower"),
        None => root.join("follower"),
    };
    let phases = Phases::new();
    let result = bench(&args, &root, &follower_dir, &phases);
    phases.done();
    if args.keep {
        for t in [tmp, follower_tmp].into_iter().flatten() {
            eprintln!("kept {}", t.keep().display());
        }
    }
    let out = result?;
    if args.prepare_only {
        println!("{out}");
        return Ok(0);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&out);
    }
    Ok(if out["verified"] == true { 0 } else { 3 })
}

fn bench(args: &BenchArgs, root: &Path, follower_dir: &Path, phases: &Phases) -> Result<Value> {
    let leader_dir = root.join("leader");
    for d in [leader_dir.as_path(), follower_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clear {}", d.display()))?;
        }
    }
    // 0. The dataset.
    let t = Instant::now();
    match &args.data {
        Some(src) => {
            phases.say(format!("copying {} (SSTs hard-linked)", src.display()));
            copy_db(src, &leader_dir)?;
        }
        None => {
            phases.say(format!(
                "generating {} of {:?} values",
                util::human_bytes(args.size),
                args.values
            ));
            datagen::generate(&leader_dir, args.values, args.size, 42)?;
        }
    }
    let dataset_bytes = datagen::dir_size(&leader_dir);
    let gen_secs = t.elapsed().as_secs_f64();
    if args.prepare_only {
        return Ok(json!({
            "dataset": { "path": leader_dir, "bytes": dataset_bytes, "generate_secs": round(gen_secs, 1) },
            "verified": true,
        }));
    }

    // 1. The leader, possibly behind a shaped link.
    let link = match args.link {
        Some(rate) => Some(crate::netlink::Link::create("ferry-bench", rate)?),
        None => None,
    };
    let host = link.as_ref().map(|l| l.inner_addr).unwrap_or_else(|| {
        "127.0.0.1"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into())
    });
    let leader_quic = SocketAddr::new(host, free_port()?);
    let leader_http = SocketAddr::new(host, free_port()?);
    let mut leader = Node::spawn(
        root,
        "leader",
        &leader_dir,
        leader_quic,
        leader_http,
        &[],
        &args.serve_args,
        &match &link {
            Some(l) => vec!["ip", "netns", "exec", l.netns.as_str()],
            None => vec![],
        },
    )?;
    leader.wait_up(Duration::from_secs(120))?;
    let token = leader_token(&leader_dir)?;

    // The follower reaches the leader directly or through the proxy.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let proxy = if args.loss.is_some() || args.delay_ms.is_some() {
        let imp = ferry_transfer::netsim::Impairments {
            loss: args.loss.unwrap_or(0.0),
            delay: Duration::from_millis(args.delay_ms.unwrap_or(0)),
            ..Default::default()
        };
        Some(rt.block_on(ferry_transfer::netsim::Proxy::start(
            "127.0.0.1:0".parse()?,
            leader_quic,
            imp,
        ))?)
    } else {
        None
    };
    let follow = proxy.as_ref().map(|p| p.addr()).unwrap_or(leader_quic);

    // 2. Idle write rate, then 3. the seed under the same load, once per
    // round: the follower seeds, catches up and goes live.
    settle_compactions(leader_http, Duration::from_secs(120));
    let load = Load::start(leader_http, None, args.load_keys);
    let compactions = Compactions::start(leader_http, Arc::clone(&load.written));
    // One idle window from the last mark: the write rate, the share of
    // the time compacting, and the rate outside compactions.
    let idle_window = || {
        std::thread::sleep(Duration::from_secs(args.idle_secs.max(1)));
        (load.rate_since_mark(), compactions.since_mark())
    };
    let slice = (args.paired_slice_ms > 0).then(|| Duration::from_millis(args.paired_slice_ms));
    let rounds_total = args.seed_rounds.max(1);
    let mut rounds: Vec<Value> = Vec::new();
    let (idle_rate, idle_compacting, idle_quiet_rate, repeat, mut follower, f_http, seeded) = loop {
        let n = rounds.len() as u32 + 1;
        let of = if rounds_total > 1 {
            format!(" (round {n} of {rounds_total})")
        } else {
            String::new()
        };
        load.set_rate(None);
        load.mark();
        compactions.mark();
        phases.say(format!("measuring the leader's idle write rate{of}"));
        let (idle_rate, (idle_compacting, idle_quiet_rate)) = idle_window();
        let mut aa_slices = None;
        let repeat = args.idle_repeat.then(|| {
            phases.say(format!(
                "measuring the leader's idle write rate again (A/A){of}"
            ));
            load.mark();
            compactions.mark();
            let pauser = slice.map(|len| Pauser::start(None, Arc::clone(&load.written), len));
            let (rate, (compacting, _)) = idle_window();
            aa_slices = pauser.map(Pauser::finish);
            (rate, compacting)
        });
        phases.say(format!("seeding the follower{of}"));
        load.mark();
        compactions.mark();
        let name = if n == rounds_total {
            "follower".to_owned()
        } else {
            format!("follower-round{n}")
        };
        let f_http = SocketAddr::new("127.0.0.1".parse()?, free_port()?);
        let (mut follower, seeded) = seed_follower(
            args,
            root,
            &name,
            follower_dir,
            follow,
            &token,
            f_http,
            &leader,
            &load,
            &compactions,
            phases,
        )?;
        let ratio = seeded.rate / idle_rate.max(1e-9);
        rounds.push(json!({
            "round": n,
            "leader_idle_writes_per_sec": idle_rate.round(),
            "leader_idle_repeat_ratio": repeat.map(|(r, _)| round(r / idle_rate.max(1e-9), 3)),
            "leader_seed_writes_per_sec": seeded.rate.round(),
            "leader_write_ratio": round(ratio, 3),
            "seed_secs": round(seeded.secs(), 3),
            "seed_bytes_per_sec": (seeded.bytes() as f64 / seeded.secs().max(1e-9)).round(),
            "paired": seeded.paired.as_ref().map(Slices::summary),
            // With --paired-slice-ms: the seed's rate while it ran.
            "seed_running_bytes_per_sec": seeded.paired.as_ref().map(|p| {
                (seeded.bytes() as f64 / (seeded.secs() - p.paused.as_secs_f64()).max(1e-9)).round()
            }),
            "paired_aa": aa_slices.as_ref().map(Slices::summary),
        }));
        if n == rounds_total {
            break (
                idle_rate,
                idle_compacting,
                idle_quiet_rate,
                repeat,
                follower,
                f_http,
                seeded,
            );
        }
        phases.say(format!("verifying the seed of round {n}"));
        let (verified, _, _) = client::compare(leader_http, f_http, Duration::from_secs(120))?;
        ensure!(
            verified,
            "round {n}: the follower's digest does not match the leader's"
        );
        follower.stop();
        std::fs::remove_dir_all(follower_dir)
            .with_context(|| format!("remove {}", follower_dir.display()))?;
    };
    let (seed_secs, seed_bytes) = (seeded.secs(), seeded.bytes());
    let SeedRound {
        report: seed_report,
        rate: seed_rate,
        compacting: seed_compacting,
        quiet_rate: seed_quiet_rate,
        leader_cpu: l_cpu_seed,
        follower_cpu: f_cpu_seed,
        follower_rss: f_rss_seed,
        to_live,
        paired: _,
    } = seeded;
    let gb = seed_bytes as f64 / 1e9;

    // 4. Live: lag under load.
    phases.say(format!(
        "live: measuring lag at {} writes/s",
        args.write_rate
    ));
    load.set_rate(Some(args.write_rate));
    let lags = probe_lag(leader_http, f_http, Duration::from_secs(args.live_secs))?;

    // 5. Catch-up after a pause.
    phases.say(format!(
        "catch-up: pausing the follower for {}s under load",
        args.pause_secs
    ));
    let leader_seq0 = seq_of(leader_http)?;
    let paused = Instant::now();
    // What it had applied as it stopped (a stopped process answers nothing).
    let applied_before = seq_of(f_http).ok();
    follower.signal("STOP")?;
    std::thread::sleep(Duration::from_secs(args.pause_secs));
    let backlog_target = seq_of(leader_http)?;
    let write_seq_rate = (backlog_target - leader_seq0) as f64 / paused.elapsed().as_secs_f64();
    follower.signal("CONT")?;
    let applied_before = applied_before.unwrap_or(leader_seq0);
    let resumed = Instant::now();
    loop {
        if seq_of(f_http).unwrap_or(0) >= backlog_target {
            break;
        }
        ensure!(
            resumed.elapsed() < Duration::from_secs(300),
            "the follower did not catch up within 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let catchup_secs = resumed.elapsed().as_secs_f64();
    let applied = backlog_target.saturating_sub(applied_before);
    let catchup_rate = applied as f64 / catchup_secs.max(1e-9);
    let catchup_ratio = catchup_rate / write_seq_rate.max(1e-9);

    // 6. Verify at one sequence, under load.
    phases.say("verifying digests at one sequence");
    let (verified, _, _) = client::compare(leader_http, f_http, Duration::from_secs(120))?;
    load.stop();

    let out = json!({
        "dataset": {
            "values": if args.data.is_some() { Value::from("adopted") } else { json!(args.values) },
            "bytes": dataset_bytes,
            "generate_secs": round(gen_secs, 1),
        },
        "link_bits_per_sec": args.link,
        "loss": args.loss,
        "delay_ms": args.delay_ms,
        "seed_bytes": seed_bytes,
        "seed_secs": round(seed_secs, 3),
        "seed_bytes_per_sec": (seed_bytes as f64 / seed_secs.max(1e-9)).round(),
        "seed_wire_bytes": seed_report["wire_bytes"],
        "time_to_live_secs": round(to_live.as_secs_f64(), 3),
        "write_rate": args.write_rate,
        "lag_p50_ms": round(pct(&lags, 0.50), 2),
        "lag_p99_ms": round(pct(&lags, 0.99), 2),
        "lag_samples": lags.len(),
        "catchup_backlog_seqs": applied,
        "catchup_secs": round(catchup_secs, 3),
        "catchup_ratio": round(catchup_ratio, 2),
        "leader_idle_secs": args.idle_secs.max(1),
        "leader_idle_writes_per_sec": idle_rate.round(),
        "leader_seed_writes_per_sec": seed_rate.round(),
        "leader_write_ratio": round(seed_rate / idle_rate.max(1e-9), 3),
        "leader_idle_compacting_share": round(idle_compacting, 2),
        "leader_idle_repeat_writes_per_sec": repeat.map(|(r, _)| r.round()),
        "leader_idle_repeat_ratio": repeat.map(|(r, _)| round(r / idle_rate.max(1e-9), 3)),
        "leader_idle_repeat_compacting_share": repeat.map(|(_, c)| round(c, 2)),
        "leader_seed_compacting_share": round(seed_compacting, 2),
        "leader_idle_quiet_writes_per_sec": idle_quiet_rate.map(f64::round),
        "leader_seed_quiet_writes_per_sec": seed_quiet_rate.map(f64::round),
        "paired_slice_ms": slice.map(|d| d.as_millis() as u64),
        "follower_nice": args.follower_nice,
        "leader_paired": rounds.last().map(|r| r["paired"].clone()),
        "seed_running_bytes_per_sec": rounds.last().map(|r| r["seed_running_bytes_per_sec"].clone()),
        "leader_paired_aa": rounds.last().map(|r| r["paired_aa"].clone()),
        "rounds": rounds_summary(&rounds),
        "leader_write_ratio_outside_compactions": idle_quiet_rate
            .zip(seed_quiet_rate)
            .map(|(idle, seed)| round(seed / idle.max(1e-9), 3)),
        "leader_peak_rss_bytes": leader.peak_rss(),
        "follower_peak_rss_bytes": follower.peak_rss(),
        "follower_seed_peak_rss_bytes": f_rss_seed,
        "leader_cpu_secs_per_gb": round(l_cpu_seed / gb.max(1e-9), 2),
        "follower_cpu_secs_per_gb": round(f_cpu_seed / gb.max(1e-9), 2),
        "verified": verified,
    });
    follower.stop();
    leader.stop();
    drop(proxy);
    drop(link);
    Ok(out)
}

/// What one seed under the load measured.
struct SeedRound {
    /// The follower's report of the seed (`last_seed` in its status).
    report: Value,
    /// The load's write rate during the seed.
    rate: f64,
    /// The share of the seed with a compaction running on the leader.
    compacting: f64,
    /// The write rate outside compactions, if long enough to tell.
    quiet_rate: Option<f64>,
    leader_cpu: f64,
    follower_cpu: f64,
    /// The follower's peak RSS at the end of the seed.
    follower_rss: u64,
    /// From the follower's start until it was live.
    to_live: Duration,
    /// The write rates of the slices with the seed running and paused
    /// (with --paired-slice-ms).
    paired: Option<Slices>,
}

impl SeedRound {
    fn secs(&self) -> f64 {
        self.report["elapsed_secs"].as_f64().unwrap_or(0.0)
    }

    fn bytes(&self) -> u64 {
        self.report["bytes_total"].as_u64().unwrap_or(0)
    }
}

/// Starts a follower on the empty `dir`, and measures its seed under the
/// load (from the marks the caller set) until it is live.
#[allow(clippy::too_many_arguments)]
fn seed_follower(
    args: &BenchArgs,
    root: &Path,
    name: &str,
    dir: &Path,
    follow: SocketAddr,
    token: &str,
    f_http: SocketAddr,
    leader: &Node,
    load: &Load,
    compactions: &Compactions,
    phases: &Phases,
) -> Result<(Node, SeedRound)> {
    let l_cpu0 = leader.cpu_secs();
    let nice = args.follower_nice.map(|n| n.to_string());
    let f_quic = SocketAddr::new("127.0.0.1".parse()?, free_port()?);
    let started = Instant::now();
    let mut follower = Node::spawn(
        root,
        name,
        dir,
        f_quic,
        f_http,
        &["--follow", &follow.to_string(), "--token", token],
        &args.serve_args,
        &match &nice {
            Some(n) => vec!["nice", "-n", n.as_str()],
            None => vec![],
        },
    )?;
    follower.wait_up(Duration::from_secs(60))?;
    // A status request to a paused follower waits until it is resumed.
    let mut pauser = (args.paired_slice_ms > 0).then(|| {
        Pauser::start(
            Some(follower.pid()),
            Arc::clone(&load.written),
            Duration::from_millis(args.paired_slice_ms),
        )
    });
    let mut seeded: Option<SeedRound> = None;
    loop {
        let s = follower.status()?;
        if seeded.is_none() && s["last_seed"].is_object() {
            // The slice under way when the seed ended is not counted.
            let paired = pauser.take().map(Pauser::finish);
            let (compacting, quiet_rate) = compactions.since_mark();
            seeded = Some(SeedRound {
                report: s["last_seed"].clone(),
                rate: load.rate_since_mark(),
                compacting,
                quiet_rate,
                leader_cpu: leader.cpu_secs() - l_cpu0,
                follower_cpu: follower.cpu_secs(),
                // The seed's own peak: before the write load reaches the new
                // database (its memtables are sized by RocksDB, not the seed).
                follower_rss: follower.peak_rss(),
                to_live: Duration::ZERO,
                paired,
            });
            load.set_rate(Some(args.write_rate));
            phases.say("catching up");
        } else if let Some(p) = s["seed"].as_object() {
            if seeded.is_none() {
                phases.say(format!(
                    "seeding the follower: {} of {}",
                    util::human_bytes(p["bytes_done"].as_u64().unwrap_or(0)),
                    util::human_bytes(p["bytes_total"].as_u64().unwrap_or(0))
                ));
            }
        }
        if s["state"] == "live" {
            if let Some(mut r) = seeded.take() {
                r.to_live = started.elapsed();
                return Ok((follower, r));
            }
        }
        if matches!(s["state"].as_str(), Some("diverged" | "stopped")) {
            bail!("the follower stopped: {}", s["detail"]);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the follower was not live within an hour"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--paired-slice-ms`: 0 (off) or 200 to 2000.
fn parse_slice_ms(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(ms) if ms == 0 || (200..=2000).contains(&ms) => Ok(ms),
        Ok(ms) => Err(format!("{ms} ms: use 0 (off) or 200 to 2000")),
        Err(e) => Err(e.to_string()),
    }
}

/// The load's write rates in alternating slices, in order: `on[i]` came
/// just before `off[i]`.
#[derive(Debug, Default)]
struct Slices {
    on: Vec<f64>,
    off: Vec<f64>,
    /// How long the process was paused in all (the uncounted parts too).
    paused: Duration,
}

impl Slices {
    /// Each `on` slice that has an `off` slice after it, against the mean
    /// of the `off` slices on either side (only the one after, for the
    /// first): a drift at a steady pace cancels.
    fn pairs(&self) -> Vec<(f64, f64)> {
        (0..self.on.len().min(self.off.len()))
            .map(|i| {
                let base = match i {
                    0 => self.off[0],
                    _ => (self.off[i - 1] + self.off[i]) / 2.0,
                };
                (self.on[i], base)
            })
            .collect()
    }

    /// The pooled ratio (mean `on` rate over mean baseline), and each
    /// pair's median and minimum.
    fn summary(&self) -> Value {
        let pairs = self.pairs();
        let n = pairs.len();
        let on = pairs.iter().map(|p| p.0).sum::<f64>() / n.max(1) as f64;
        let base = pairs.iter().map(|p| p.1).sum::<f64>() / n.max(1) as f64;
        let each: Vec<f64> = pairs.iter().map(|(a, b)| a / b.max(1e-9)).collect();
        json!({
            "pairs": n,
            "on_writes_per_sec": on.round(),
            "off_writes_per_sec": base.round(),
            "ratio": (n > 0).then(|| round(on / base.max(1e-9), 3)),
            "ratio_median": (n > 0).then(|| round(median(&each), 3)),
            "ratio_min": each.iter().copied().reduce(f64::min).map(|r| round(r, 3)),
            "paused_secs": round(self.paused.as_secs_f64(), 3),
        })
    }
}

/// Alternates slices of `len`, pausing a process (SIGSTOP) in every
/// second one and resuming it (SIGCONT) in the next, and measures the
/// load's write rate in each, leaving out its first fifth (the switch
/// settling). With no process, the slices are labels only: an A/A test
/// of the pairing.
struct Pauser {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Slices>>,
}

impl Pauser {
    fn start(pid: Option<u32>, written: Arc<AtomicU64>, len: Duration) -> Pauser {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                // Sleeps until `t`, or returns false when told to stop.
                let until = |t: Instant| {
                    while let Some(left) = t.checked_duration_since(Instant::now()) {
                        if stop.load(Ordering::Relaxed) {
                            return false;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(10)));
                    }
                    !stop.load(Ordering::Relaxed)
                };
                let mut slices = Slices::default();
                let mut running = true;
                let mut paused_at = Instant::now();
                loop {
                    let start = Instant::now();
                    if !until(start + len / 5) {
                        break;
                    }
                    let (t0, n0) = (Instant::now(), written.load(Ordering::Relaxed));
                    if !until(start + len) {
                        break;
                    }
                    let rate = (written.load(Ordering::Relaxed) - n0) as f64
                        / t0.elapsed().as_secs_f64().max(1e-9);
                    if running {
                        slices.on.push(rate);
                    } else {
                        slices.off.push(rate);
                    }
                    running = !running;
                    match running {
                        false => paused_at = Instant::now(),
                        true => slices.paused += paused_at.elapsed(),
                    }
                    if let Some(pid) = pid {
                        let sig = if running { "CONT" } else { "STOP" };
                        if let Err(e) = send_signal(pid, sig) {
                            tracing::warn!("paired slices: {e:#}");
                        }
                    }
                }
                if !running {
                    slices.paused += paused_at.elapsed();
                    if let Some(pid) = pid {
                        if let Err(e) = send_signal(pid, "CONT") {
                            tracing::warn!("paired slices: {e:#}");
                        }
                    }
                }
                slices
            })
        };
        Pauser {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops slicing (the slice under way is not counted) and leaves the
    /// process running.
    fn finish(mut self) -> Slices {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Pauser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `kill -SIG pid`.
fn send_signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// Every round's figures, with the median and the minimum of the seed's
/// write ratio and the range of the A/A ratio across rounds.
fn rounds_summary(rounds: &[Value]) -> Value {
    let of = |k: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[k].as_f64()).collect() };
    let of_paired = |k: &str| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| r[k]["ratio"].as_f64())
            .collect()
    };
    let ratios = of("leader_write_ratio");
    let aa = of("leader_idle_repeat_ratio");
    let paired = of_paired("paired");
    let paired_aa = of_paired("paired_aa");
    let min = |v: &[f64]| v.iter().copied().reduce(f64::min);
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max);
    json!({
        "count": rounds.len(),
        "leader_write_ratio_median": (!ratios.is_empty()).then(|| round(median(&ratios), 3)),
        "leader_write_ratio_min": min(&ratios),
        "leader_idle_repeat_ratio_min": min(&aa),
        "leader_idle_repeat_ratio_max": max(&aa),
        "paired_ratio_median": (!paired.is_empty()).then(|| round(median(&paired), 3)),
        "paired_ratio_min": min(&paired),
        "paired_aa_ratio_min": min(&paired_aa),
        "paired_aa_ratio_max": max(&paired_aa),
        "each": rounds,
    })
}

/// The median (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn print_table(o: &Value) {
    let mb = |k: &str| o[k].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let mut rows = vec![
        (
            "dataset",
            format!(
                "{} ({})",
                util::human_bytes(o["dataset"]["bytes"].as_u64().unwrap_or(0)),
                o["dataset"]["values"].as_str().unwrap_or("?")
            ),
        ),
        (
            "seed",
            format!(
                "{} in {:.2} s = {:.1} MiB/s ({} on the wire)",
                util::human_bytes(o["seed_bytes"].as_u64().unwrap_or(0)),
                o["seed_secs"].as_f64().unwrap_or(0.0),
                mb("seed_bytes_per_sec"),
                util::human_bytes(o["seed_wire_bytes"].as_u64().unwrap_or(0)),
            ),
        ),
        (
            "time to live",
            format!("{:.2} s", o["time_to_live_secs"].as_f64().unwrap_or(0.0)),
        ),
        (
            if o["paired_slice_ms"].is_u64() {
                "leader writes during seed (pauses included)"
            } else {
                "leader writes during seed"
            },
            format!(
                "{:.0}/s vs {:.0}/s idle = {:.2}x",
                o["leader_seed_writes_per_sec"].as_f64().unwrap_or(0.0),
                o["leader_idle_writes_per_sec"].as_f64().unwrap_or(0.0),
                o["leader_write_ratio"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "leader compacting (share of the time)",
            format!(
                "{:.0}% of the seed, {:.0}% of the {} s idle window",
                o["leader_seed_compacting_share"].as_f64().unwrap_or(0.0) * 100.0,
                o["leader_idle_compacting_share"].as_f64().unwrap_or(0.0) * 100.0,
                o["leader_idle_secs"].as_u64().unwrap_or(0),
            ),
        ),
        (
            "leader writes outside compactions",
            match o["leader_write_ratio_outside_compactions"].as_f64() {
                Some(r) => format!(
                    "{:.0}/s vs {:.0}/s idle = {r:.2}x",
                    o["leader_seed_quiet_writes_per_sec"]
                        .as_f64()
                        .unwrap_or(0.0),
                    o["leader_idle_quiet_writes_per_sec"]
                        .as_f64()
                        .unwrap_or(0.0),
                ),
                None => "too little time without a compaction to tell".into(),
            },
        ),
    ];
    if let Some(r) = o["leader_idle_repeat_ratio"].as_f64() {
        rows.push((
            "leader writes, idle again (A/A, no seed)",
            format!(
                "{:.0}/s vs {:.0}/s idle = {r:.2}x ({:.0}% compacting)",
                o["leader_idle_repeat_writes_per_sec"]
                    .as_f64()
                    .unwrap_or(0.0),
                o["leader_idle_writes_per_sec"].as_f64().unwrap_or(0.0),
                o["leader_idle_repeat_compacting_share"]
                    .as_f64()
                    .unwrap_or(0.0)
                    * 100.0,
            ),
        ));
    }
    let paired = |p: &Value| -> Option<String> {
        Some(format!(
            "{:.2}x: {:.0}/s vs {:.0}/s over {} pairs of {} ms slices (each pair: median {:.2}x, min {:.2}x)",
            p["ratio"].as_f64()?,
            p["on_writes_per_sec"].as_f64().unwrap_or(0.0),
            p["off_writes_per_sec"].as_f64().unwrap_or(0.0),
            p["pairs"],
            o["paired_slice_ms"],
            p["ratio_median"].as_f64().unwrap_or(0.0),
            p["ratio_min"].as_f64().unwrap_or(0.0),
        ))
    };
    if let Some(v) = paired(&o["leader_paired"]) {
        rows.push(("leader writes, seed running vs paused (paired)", v));
        if let Some(r) = o["seed_running_bytes_per_sec"].as_f64() {
            rows.push((
                "seed while running (paired)",
                format!(
                    "{:.1} MiB/s, paused {:.1} s of {:.2} s",
                    r / (1 << 20) as f64,
                    o["leader_paired"]["paused_secs"].as_f64().unwrap_or(0.0),
                    o["seed_secs"].as_f64().unwrap_or(0.0)
                ),
            ));
        }
    }
    if let Some(v) = paired(&o["leader_paired_aa"]) {
        rows.push(("paired A/A (slices with no seed)", v));
    }
    let rounds = &o["rounds"];
    if rounds["count"].as_u64().unwrap_or(0) > 1 {
        // Every round's value at the JSON pointer `k`, times `scale`, with
        // `digits` decimals.
        let each = |k: &str, digits: usize, scale: f64| -> String {
            let v: Vec<String> = rounds["each"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| match r.pointer(k).and_then(Value::as_f64) {
                    Some(x) => format!("{:.digits$}", x * scale),
                    None => "-".into(),
                })
                .collect();
            v.join(" ")
        };
        rows.push((
            if o["paired_slice_ms"].is_u64() {
                "leader writes during seed, every round (pauses included)"
            } else {
                "leader writes during seed, every round"
            },
            format!(
                "median {:.2}x, min {:.2}x over {} rounds ({}); seeds MiB/s: {}",
                rounds["leader_write_ratio_median"].as_f64().unwrap_or(0.0),
                rounds["leader_write_ratio_min"].as_f64().unwrap_or(0.0),
                rounds["count"],
                each("/leader_write_ratio", 2, 1.0),
                each("/seed_bytes_per_sec", 1, 1.0 / (1 << 20) as f64),
            ),
        ));
        if let (Some(lo), Some(hi)) = (
            rounds["leader_idle_repeat_ratio_min"].as_f64(),
            rounds["leader_idle_repeat_ratio_max"].as_f64(),
        ) {
            rows.push((
                "A/A, every round (no seed)",
                format!(
                    "{lo:.2}x to {hi:.2}x ({})",
                    each("/leader_idle_repeat_ratio", 2, 1.0)
                ),
            ));
        }
        if let Some(m) = rounds["paired_ratio_median"].as_f64() {
            rows.push((
                "paired, every round",
                format!(
                    "median {m:.2}x, min {:.2}x ({}); seeds MiB/s while running: {}",
                    rounds["paired_ratio_min"].as_f64().unwrap_or(0.0),
                    each("/paired/ratio", 2, 1.0),
                    each("/seed_running_bytes_per_sec", 1, 1.0 / (1 << 20) as f64),
                ),
            ));
        }
        if let (Some(lo), Some(hi)) = (
            rounds["paired_aa_ratio_min"].as_f64(),
            rounds["paired_aa_ratio_max"].as_f64(),
        ) {
            rows.push((
                "paired A/A, every round (no seed)",
                format!(
                    "{lo:.2}x to {hi:.2}x ({})",
                    each("/paired_aa/ratio", 2, 1.0)
                ),
            ));
        }
    }
    rows.extend([
        (
            "lag (write on leader -> visible on follower)",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms at {} writes/s ({} probes)",
                o["lag_p50_ms"].as_f64().unwrap_or(0.0),
                o["lag_p99_ms"].as_f64().unwrap_or(0.0),
                o["write_rate"],
                o["lag_samples"]
            ),
        ),
        (
            "catch-up",
            format!(
                "{} seqs in {:.2} s = {:.1}x the write rate",
                o["catchup_backlog_seqs"],
                o["catchup_secs"].as_f64().unwrap_or(0.0),
                o["catchup_ratio"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "peak RSS",
            format!(
                "leader {}, follower {} ({} at the end of the seed)",
                util::human_bytes(o["leader_peak_rss_bytes"].as_u64().unwrap_or(0)),
                util::human_bytes(o["follower_peak_rss_bytes"].as_u64().unwrap_or(0)),
                util::human_bytes(o["follower_seed_peak_rss_bytes"].as_u64().unwrap_or(0))
            ),
        ),
        (
            "CPU per GB seeded",
            format!(
                "leader {:.2} s (with the write load), follower {:.2} s",
                o["leader_cpu_secs_per_gb"].as_f64().unwrap_or(0.0),
                o["follower_cpu_secs_per_gb"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "verified",
            if o["verified"] == true {
                "digests match at one sequence".to_owned()
            } else {
                "MISMATCH".to_owned()
            },
        ),
    ]);
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

/// A `ferry serve` child process.
struct Node {
    child: Option<Child>,
    http: SocketAddr,
    log: PathBuf,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        root: &Path,
        name: &str,
        data: &Path,
        quic: SocketAddr,
        http: SocketAddr,
        extra: &[&str],
        serve_args: &[String],
        prefix: &[&str],
    ) -> Result<Node> {
        let exe = std::env::current_exe().context("find the ferry binary")?;
        let log = root.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        // A prefix that execs the binary (`ip netns exec NS`, `nice -n N`),
        // so the child's pid stays the node's.
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(quic.to_string())
            .arg("--http")
            .arg(http.to_string())
            .arg("--node-id")
            .arg(format!("bench-{name}"))
            .args(extra)
            .args(serve_args.iter().filter(|a| !a.is_empty()))
            .env("FERRY_LOG", "info")
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        let child = cmd.spawn().context("start ferry serve")?;
        Ok(Node {
            child: Some(child),
            http,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn wait_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "ferry serve exited ({st}); log {}:\n{}",
                        self.log.display(),
                        tail(&self.log)
                    );
                }
            }
            ensure!(
                Instant::now() < deadline,
                "ferry serve did not come up; log {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Result<Value> {
        client::get_json(
            &format!("http://{}/v1/status", self.http),
            Duration::from_secs(10),
        )
    }

    fn signal(&self, sig: &str) -> Result<()> {
        send_signal(self.pid(), sig)
    }

    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.pid()).unwrap_or(0.0)
    }

    fn peak_rss(&self) -> u64 {
        proc_peak_rss(self.pid()).unwrap_or(0)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// User plus system CPU seconds of a process (all its threads).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The peak resident set size of a process, in bytes.
pub fn proc_peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn free_port() -> Result<u16> {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

fn leader_token(data: &Path) -> Result<String> {
    let auth = ferry_transfer::NodeAuth::load_dir(&crate::node::tls_dir(data))?
        .context("the leader wrote no identity")?;
    Ok(auth
        .token()
        .context("the leader has no join secret")?
        .to_string())
}

fn seq_of(http: SocketAddr) -> Result<u64> {
    let s = client::get_json(&format!("http://{http}/v1/status"), Duration::from_secs(5))?;
    s["seq"].as_u64().context("no sequence in the status")
}

/// Copies a RocksDB directory: SSTs hard-linked (they are immutable),
/// everything else copied.
fn copy_db(src: &Path, dst: &Path) -> Result<()> {
    ensure!(
        src.join("CURRENT").exists(),
        "{} holds no RocksDB database",
        src.display()
    );
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("read {}", src.display()))? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let name = e.file_name();
        let to = dst.join(&name);
        let is_sst = name.to_string_lossy().ends_with(".sst");
        if !(is_sst && std::fs::hard_link(e.path(), &to).is_ok()) {
            std::fs::copy(e.path(), &to).with_context(|| format!("copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// A write load through the leader's HTTP API: batches of 100 keys with
/// realistic values, as fast as one client goes or at a set rate.
struct Load {
    stop: Arc<AtomicBool>,
    /// Keys per second; 0 = as fast as possible.
    rate: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    mark: parking_lot::Mutex<(Instant, u64)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const LOAD_BATCH: u64 = 100;

impl Load {
    /// Writes `LOAD_BATCH`-key batches to the leader until stopped, at
    /// `rate` keys a second (or as fast as one client can), over `keys`
    /// distinct keys (0: unbounded).
    fn start(http: SocketAddr, rate: Option<u64>, keys: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let rate_a = Arc::new(AtomicU64::new(rate.unwrap_or(0)));
        let written = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, rate, written) =
                (Arc::clone(&stop), Arc::clone(&rate_a), Arc::clone(&written));
            std::thread::spawn(move || {
                let agent = client::agent(Duration::from_secs(30));
                let url = format!("http://{http}/v1/batch");
                let mut rng = StdRng::seed_from_u64(7);
                let mut n = 0u64;
                let mut paced_from = (Instant::now(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let ops: Vec<Value> = (0..LOAD_BATCH)
                        .map(|i| {
                            let v = datagen::realistic_value(&mut rng, n + i, 200);
                            let key = match keys {
                                0 => rng.random::<u64>(),
                                k => rng.random_range(0..k),
                            };
                            json!({"op": "put", "key": format!("load:{key:016x}"), "value": String::from_utf8_lossy(&v)})
                        })
                        .collect();
                    let ok = agent
                        .post(&url)
                        .send_json(json!({ "ops": ops }))
                        .map(|r| r.status().is_success())
                        .unwrap_or(false);
                    if !ok {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    n += LOAD_BATCH;
                    written.store(n, Ordering::Relaxed);
                    let r = rate.load(Ordering::Relaxed);
                    if r != paced_from.2 {
                        paced_from = (Instant::now(), n, r);
                    }
                    if r > 0 {
                        let due = paced_from.0
                            + Duration::from_secs_f64((n - paced_from.1) as f64 / r as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            })
        };
        Load {
            stop,
            rate: rate_a,
            written,
            mark: parking_lot::Mutex::new((Instant::now(), 0)),
            thread: Some(thread),
        }
    }

    fn set_rate(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    fn mark(&self) {
        *self.mark.lock() = (Instant::now(), self.written.load(Ordering::Relaxed));
    }

    /// Keys per second since the last mark.
    fn rate_since_mark(&self) -> f64 {
        let (t, n) = *self.mark.lock();
        (self.written.load(Ordering::Relaxed) - n) as f64 / t.elapsed().as_secs_f64().max(1e-9)
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Samples the leader's running RocksDB compactions (its metrics) every
/// 100 ms: a compaction that lands in the idle window or in the seed's
/// moves the write ratio, whatever the seed does (BENCHMARKS.md §1). It
/// also counts the load's writes in the samples without a compaction, so
/// a window's write rate outside compactions can be compared with
/// another's.
struct Compactions {
    stop: Arc<AtomicBool>,
    sampled: Arc<Sampled>,
    mark: parking_lot::Mutex<[u64; 3]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Milliseconds sampled; of them, those with a compaction running; and the
/// load's writes in the samples without one.
#[derive(Default)]
struct Sampled([AtomicU64; 3]);

impl Sampled {
    fn get(&self) -> [u64; 3] {
        self.0.each_ref().map(|a| a.load(Ordering::Relaxed))
    }

    /// One sample: `ms` long, ending with a compaction running or not, in
    /// which the load wrote `writes` keys.
    fn add(&self, ms: u64, compacting: bool, writes: u64) {
        self.0[0].fetch_add(ms, Ordering::Relaxed);
        if compacting {
            self.0[1].fetch_add(ms, Ordering::Relaxed);
        } else {
            self.0[2].fetch_add(writes, Ordering::Relaxed);
        }
    }

    /// Of the samples between two readings `from` and `to`: the share of
    /// the time with a compaction running, and the writes per second in
    /// the rest (none with under [`Compactions::QUIET_ENOUGH_MS`] of it).
    fn between(from: [u64; 3], to: [u64; 3]) -> (f64, Option<f64>) {
        let [ms, compacting, writes] = [0, 1, 2].map(|i| to[i] - from[i]);
        let quiet = ms - compacting;
        (
            compacting as f64 / ms.max(1) as f64,
            (quiet >= Compactions::QUIET_ENOUGH_MS).then(|| writes as f64 * 1000.0 / quiet as f64),
        )
    }
}

impl Compactions {
    const EVERY: Duration = Duration::from_millis(100);
    /// Less time than this outside compactions gives no rate.
    const QUIET_ENOUGH_MS: u64 = 2_000;

    fn start(http: SocketAddr, written: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sampled = Arc::new(Sampled::default());
        let thread = {
            let (stop, sampled) = (Arc::clone(&stop), Arc::clone(&sampled));
            std::thread::spawn(move || {
                let agent = client::agent(Duration::from_secs(5));
                let url = format!("http://{http}/metrics");
                let mut last = Instant::now();
                let mut last_written = written.load(Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Self::EVERY);
                    let running = compactions_running(&agent, &url);
                    let ms = last.elapsed().as_millis() as u64;
                    last = Instant::now();
                    let w = written.load(Ordering::Relaxed);
                    sampled.add(ms, running > 0.0, w - last_written);
                    last_written = w;
                }
            })
        };
        Self {
            stop,
            sampled,
            mark: parking_lot::Mutex::new([0; 3]),
            thread: Some(thread),
        }
    }

    fn mark(&self) {
        *self.mark.lock() = self.sampled.get();
    }

    /// Since the last mark: the share of the time with a compaction
    /// running, and the load's writes per second in the rest (see
    /// [`Sampled::between`]).
    fn since_mark(&self) -> (f64, Option<f64>) {
        Sampled::between(*self.mark.lock(), self.sampled.get())
    }
}

impl Drop for Compactions {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The leader's running compactions, from its metrics (0 when unknown).
fn compactions_running(agent: &ureq::Agent, url: &str) -> f64 {
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("ferry_rocksdb_compactions_running"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Waits (at most `limit`) until the leader has run no compaction for a
/// second: opening a freshly generated dataset starts compactions that a
/// leader in service is not running, and they would slow the idle window.
fn settle_compactions(http: SocketAddr, limit: Duration) {
    let agent = client::agent(Duration::from_secs(5));
    let url = format!("http://{http}/metrics");
    let end = Instant::now() + limit;
    let mut quiet = 0;
    while quiet < 10 && Instant::now() < end {
        std::thread::sleep(Compactions::EVERY);
        quiet = if compactions_running(&agent, &url) > 0.0 {
            0
        } else {
            quiet + 1
        };
    }
}

/// Writes a probe key on the leader every 10 ms and times how long until
/// the follower serves it (`min_seq` wakes on apply, not by polling).
fn probe_lag(leader: SocketAddr, follower: SocketAddr, dur: Duration) -> Result<Vec<f64>> {
    let agent = client::agent(Duration::from_secs(10));
    let mut lags = Vec::new();
    let end = Instant::now() + dur;
    let mut i = 0u64;
    while Instant::now() < end {
        i += 1;
        let mut r = agent
            .put(&format!("http://{leader}/v1/kv/probe:{i}"))
            .send(format!("probe {i}").as_bytes())
            .context("probe write")?;
        let acked = Instant::now();
        let seq = r.body_mut().read_json::<Value>()?["seq"]
            .as_u64()
            .context("no seq in the write's reply")?;
        let g = agent
            .get(&format!(
                "http://{follower}/v1/kv/probe:{i}?min_seq={seq}&timeout_ms=10000"
            ))
            .call()
            .context("probe read")?;
        ensure!(
            g.status().is_success(),
            "the follower did not serve the probe: HTTP {}",
            g.status()
        );
        lags.push(acked.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(lags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_report_the_median_and_the_worst_ratio() {
        let r = |ratio: f64, aa: Option<f64>| json!({ "leader_write_ratio": ratio, "leader_idle_repeat_ratio": aa });
        let s = rounds_summary(&[r(0.9, Some(1.1)), r(0.7, Some(0.85)), r(0.85, None)]);
        assert_eq!(s["count"], 3);
        assert_eq!(s["leader_write_ratio_median"], 0.85);
        assert_eq!(s["leader_write_ratio_min"], 0.7);
        assert_eq!(s["leader_idle_repeat_ratio_min"], 0.85);
        assert_eq!(s["leader_idle_repeat_ratio_max"], 1.1);
        // An even count: the mean of the middle two.
        let s = rounds_summary(&[r(0.8, None), r(0.9, None)]);
        assert_eq!(s["leader_write_ratio_median"], 0.85);
        assert!(s["leader_idle_repeat_ratio_min"].is_null());
    }

    #[test]
    fn paired_slices_cancel_a_steady_drift() {
        // The writes speed up by 10/s every slice, seed or not: on slices
        // at 0, 2, 4, 6 and off slices at 1, 3, 5, 7, and the seed costs
        // a fifth of the rate.
        let at = |i: usize| 1000.0 + 10.0 * i as f64;
        let s = Slices {
            on: (0..4).map(|i| 0.8 * at(2 * i)).collect(),
            off: (0..4).map(|i| at(2 * i + 1)).collect(),
            paused: Duration::ZERO,
        };
        let p = s.pairs();
        assert_eq!(p.len(), 4);
        // Between two off slices, the baseline is the on slice's own time.
        for (i, (on, base)) in p.iter().enumerate().skip(1) {
            assert_eq!(*base, at(2 * i));
            assert!((on / base - 0.8).abs() < 1e-12);
        }
        let sum = s.summary();
        assert_eq!(sum["pairs"], 4);
        assert_eq!(sum["ratio_median"], 0.8);
        // Only the first pair, with no off slice before it, sees the drift.
        assert_eq!(sum["ratio_min"], 0.792);
        // An on slice without the off slice after it is not a pair.
        let s = Slices {
            on: vec![900.0, 1.0],
            off: vec![1000.0],
            paused: Duration::ZERO,
        };
        assert_eq!(s.summary()["pairs"], 1);
        assert_eq!(s.summary()["ratio"], 0.9);
        assert!(Slices::default().summary()["ratio"].is_null());
    }

    #[test]
    fn slices_are_0_or_200_to_2000_ms() {
        assert_eq!(parse_slice_ms("0"), Ok(0));
        assert_eq!(parse_slice_ms("1500"), Ok(1500));
        assert!(parse_slice_ms("100").is_err());
        assert!(parse_slice_ms("2500").is_err());
        assert!(parse_slice_ms("x").is_err());
    }

    #[test]
    fn writes_during_compactions_count_only_in_the_whole_window() {
        let s = Sampled::default();
        let start = s.get();
        // 3 s without a compaction at 1,000 writes/s, then 1 s of
        // compaction at 100 writes/s.
        for _ in 0..30 {
            s.add(100, false, 100);
        }
        for _ in 0..10 {
            s.add(100, true, 10);
        }
        let (share, quiet) = Sampled::between(start, s.get());
        assert_eq!(share, 0.25);
        assert_eq!(quiet, Some(1000.0));
        // From a mark where the compaction began: no quiet time, no rate.
        let (share, quiet) = Sampled::between([3000, 0, 3000], s.get());
        assert_eq!(share, 1.0);
        assert_eq!(quiet, None);
    }
}
