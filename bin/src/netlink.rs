//! A rate-limited link to a network namespace, for `ferry bench --link`.
//!
//! netem is not available on every kernel, but tbf is: a veth pair into a
//! new network namespace, with a token bucket on both ends, makes a real
//! link of a given rate. The namespace and the pair are removed on drop.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// A shaped veth link into a network namespace.
pub struct Link {
    pub netns: String,
    /// The namespace's side of the link (run the server here); the host's
    /// side is the `.1` of the same /30.
    pub inner_addr: IpAddr,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Link {
    /// Creates namespace `NAME-PID` and a veth pair shaped to `bits_per_sec`.
    pub fn create(name: &str, bits_per_sec: u64) -> Result<Link> {
        ensure!(is_root(), "--link needs root (network namespaces and tc)");
        ensure!(
            bits_per_sec >= 1_000_000,
            "--link is in bits per second; {bits_per_sec} is below 1 Mbit/s"
        );
        let pid = std::process::id();
        let netns = format!("{name}-{pid}");
        let (host_if, ns_if) = (
            format!("fy{}h", pid % 100_000),
            format!("fy{}n", pid % 100_000),
        );
        let net = 1 + pid % 250;
        let (outer, inner) = (format!("10.213.{net}.1"), format!("10.213.{net}.2"));
        let link = Link {
            netns: netns.clone(),
            inner_addr: inner.parse()?,
        };
        // From here on, Drop cleans up whatever was created.
        run(&["ip", "netns", "add", &netns])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &netns])?;
        run(&["ip", "addr", "add", &format!("{outer}/30"), "dev", &host_if])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        let inns = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", netns.as_str()];
            v.extend_from_slice(a);
            run(&v)
        };
        inns(&["ip", "addr", "add", &format!("{inner}/30"), "dev", &ns_if])?;
        inns(&["ip", "link", "set", &ns_if, "up"])?;
        inns(&["ip", "link", "set", "lo", "up"])?;
        // A bucket of 10 ms of traffic (at least 64 KiB), queue up to 20 ms.
        let rate = format!("{bits_per_sec}bit");
        let burst = format!("{}", (bits_per_sec / 8 / 100).max(64 << 10));
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms",
        ];
        let mut host = vec!["tc", "qdisc", "add", "dev", host_if.as_str()];
        host.extend_from_slice(&tbf);
        run(&host)?;
        let mut ns = vec!["tc", "qdisc", "add", "dev", ns_if.as_str()];
        ns.extend_from_slice(&tbf);
        inns(&ns)?;
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it
        // the host's end.
        let _ = run(&["ip", "netns", "del", &self.netns]);
    }
}
