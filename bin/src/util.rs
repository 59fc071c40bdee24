//! Small helpers of the command line: logging, sizes, progress, signals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Parses a byte size: `1048576`, `64K`, `100M`, `1G`, `256MiB`, `2GB`
/// (every suffix is a power of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1024, &["ib", "b"])
        .map_err(|_| format!("{s:?} is not a size like 500K, 100M, 256MiB or 1G"))
}

/// Parses a rate in bits per second: `1000000`, `100M`, `1G`, `10Gbit`
/// (decimal suffixes, as network links are rated).
pub fn parse_bits(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1000, &["bit", "bps"])
        .map_err(|_| format!("{s:?} is not a rate like 100M, 1G or 10Gbit (bits per second)"))
}

fn parse_scaled(s: &str, base: u64, units: &[&str]) -> Result<u64, ()> {
    let mut t = s.trim().to_ascii_lowercase();
    for u in units {
        if let Some(x) = t.strip_suffix(u) {
            t = x.to_owned();
            break;
        }
    }
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], base),
        Some('m') => (&t[..t.len() - 1], base.pow(2)),
        Some('g') => (&t[..t.len() - 1], base.pow(3)),
        Some('t') => (&t[..t.len() - 1], base.pow(4)),
        _ => (t.as_str(), 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| ())?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(());
    }
    Ok((n * mult as f64) as u64)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} seeding [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Drives a progress bar on a terminal, or logs a line every two seconds.
pub fn progress_callback(
    bar: Option<ProgressBar>,
) -> Arc<dyn Fn(&ferry_transfer::Progress) + Send + Sync> {
    let throttle = Throttle::new(Duration::from_secs(2));
    Arc::new(move |p: &ferry_transfer::Progress| match &bar {
        Some(b) => {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        }
        None => {
            if throttle.ready() || p.bytes_done == p.bytes_total {
                let fetched = p.bytes_done - p.bytes_reused;
                let rate = fetched as f64 / p.elapsed.as_secs_f64().max(1e-9);
                let left = p.bytes_total - p.bytes_done;
                let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
                tracing::info!(
                    done = %human_bytes(p.bytes_done),
                    total = %human_bytes(p.bytes_total),
                    rate = %format!("{}/s", human_bytes(rate as u64)),
                    eta_secs = eta.round(),
                    "seed progress"
                );
            }
        }
    })
}

/// Lets through one call per interval.
struct Throttle {
    every: Duration,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: std::sync::Mutex::new(None),
        }
    }

    fn ready(&self) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        match *last {
            Some(t) if t.elapsed() < self.every => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_bits("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bits("10Gbit"), Ok(10_000_000_000));
        assert_eq!(parse_bits("100mbps"), Ok(100_000_000));
    }
}
