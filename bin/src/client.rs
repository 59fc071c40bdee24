//! `ferry status` and `ferry verify`: clients of a node's HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// An HTTP client that returns error statuses as responses (their bodies
/// carry the message) and gives up after `timeout`.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GETs `url` and returns its JSON body; an error status is an error with
/// the server's message.
pub fn get_json(url: &str, timeout: Duration) -> Result<Value> {
    let mut r = agent(timeout)
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let code = r.status().as_u16();
    let body: Value = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_json()
        .unwrap_or(Value::Null);
    if !(200..300).contains(&code) {
        bail!(
            "{url}: HTTP {code}: {}",
            body["error"].as_str().unwrap_or("(no message)")
        );
    }
    if body.is_null() {
        bail!("bad JSON from {url}");
    }
    Ok(body)
}

/// Prints a node's status.
pub fn status(http: SocketAddr, json: bool) -> Result<i32> {
    let s = get_json(&format!("http://{http}/v1/status"), Duration::from_secs(10))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    let v = |k: &str| match &s[k] {
        Value::Null => "-".to_owned(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    };
    println!("node       {}", v("node_id"));
    println!("role       {}", v("role"));
    println!(
        "state      {}{}",
        v("state"),
        s["detail"]
            .as_str()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    println!("sequence   {}", v("seq"));
    if let Some(h) = s["history"].as_object() {
        println!(
            "history    {}{}",
            h.get("id").and_then(|v| v.as_str()).unwrap_or("?"),
            h.get("start")
                .map(|st| format!(" (began after {st})"))
                .unwrap_or_default()
        );
    }
    println!("oldest WAL {}", v("oldest_wal_seq"));
    if s["fencing"] == "off" {
        println!("fencing    off: no --peers, so this leader cannot learn that another node was promoted");
    }
    if let Some(a) = s["set_aside"].as_array().filter(|a| !a.is_empty()) {
        println!(
            "set aside  {} database(s) with writes the cluster does not have (ferry aside --data DIR)",
            a.len()
        );
    }
    if s["role"] == "follower" {
        let r = &s["replica"];
        println!("leader     {} (at {})", v("leader"), r["leader_seq"]);
        println!(
            "applied    {} (acked {}, lag {} seqs)",
            r["applied_seq"],
            r["acked_seq"],
            r["leader_seq"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(r["applied_seq"].as_u64().unwrap_or(0))
        );
    }
    if let Some(p) = s["seed"].as_object() {
        if s["state"] == "seeding" || s["state"] == "reseeding" {
            println!(
                "seed       {} of {} bytes",
                p["bytes_done"], p["bytes_total"]
            );
        }
    }
    if let Some(fs) = s["followers"].as_array() {
        if !fs.is_empty() {
            println!();
            println!(
                "{:<24} {:<22} {:<12} {:>12} {:>10} {:>10} {:>12}",
                "FOLLOWER", "ADDRESS", "STATE", "ACKED", "LAG SEQS", "LAG MS", "LAG BYTES"
            );
            for f in fs {
                let n = |k: &str| f[k].to_string();
                println!(
                    "{:<24} {:<22} {:<12} {:>12} {:>10} {:>10} {:>12}",
                    f["node_id"].as_str().unwrap_or("?"),
                    f["addr"].as_str().unwrap_or("?"),
                    f["state"].as_str().unwrap_or("?"),
                    n("acked_seq"),
                    n("lag_seqs"),
                    n("lag_ms"),
                    n("lag_bytes")
                );
            }
        }
    }
    Ok(0)
}

/// Compares digests at the same sequence; 0 when equal, 3 when not.
pub fn verify(
    leader: SocketAddr,
    follower: SocketAddr,
    timeout: Duration,
    json: bool,
) -> Result<i32> {
    let (same, l, f) = compare(leader, follower, timeout)?;
    let seq = l["seq"].clone();
    if json {
        println!(
            "{}",
            serde_json::json!({ "match": same, "seq": seq, "leader": l, "follower": f })
        );
    } else {
        println!(
            "leader    {} at {} ({} keys)",
            l["digest"].as_str().unwrap_or("?"),
            l["seq"],
            l["keys"]
        );
        println!(
            "follower  {} at {} ({} keys)",
            f["digest"].as_str().unwrap_or("?"),
            f["seq"],
            f["keys"]
        );
        println!("{}", if same { "match" } else { "MISMATCH" });
    }
    Ok(if same { 0 } else { 3 })
}

/// The leader's and the follower's digests at one sequence, and whether
/// they match.
pub fn compare(
    leader: SocketAddr,
    follower: SocketAddr,
    timeout: Duration,
) -> Result<(bool, Value, Value)> {
    // The leader takes a snapshot and marks its sequence in every follower's
    // stream, so the follower's digest is taken at exactly that sequence.
    let l = get_json(
        &format!("http://{leader}/v1/digest?mark=true"),
        Duration::from_secs(3600),
    )
    .context("leader digest")?;
    let seq = l["seq"]
        .as_u64()
        .context("the leader's digest has no sequence")?;
    let url = format!(
        "http://{follower}/v1/digest?seq={seq}&timeout_ms={}",
        timeout.as_millis()
    );
    let f = get_json(&url, timeout + Duration::from_secs(3600)).context("follower digest")?;
    let same = l["digest"] == f["digest"] && l["seq"] == f["seq"];
    Ok((same, l, f))
}

/// POSTs to an admin endpoint of the node at `http`; returns the JSON body,
/// or fails with "`failed` (HTTP code): the node's reason".
fn post_admin(http: SocketAddr, path: &str, timeout: Duration, failed: &str) -> Result<Value> {
    let url = format!("http://{http}{path}");
    let mut r = agent(timeout)
        .post(&url)
        .send_empty()
        .with_context(|| format!("POST {url}"))?;
    let code = r.status().as_u16();
    let body: Value = r.body_mut().read_json().unwrap_or(Value::Null);
    if !(200..300).contains(&code) {
        bail!(
            "{failed} (HTTP {code}): {}",
            body["error"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(body)
}

/// Promotes the follower at `http`; prints the new history and sequence.
/// A refusal (409) exits 1 with the node's reason.
pub fn promote(http: SocketAddr, force: bool, json: bool) -> Result<i32> {
    let path = format!(
        "/v1/admin/promote{}",
        if force { "?force=true" } else { "" }
    );
    let body = post_admin(
        http,
        &path,
        Duration::from_secs(40),
        &format!("promotion refused by {http}"),
    )?;
    if json {
        println!("{body}");
    } else {
        println!(
            "promoted {http}: history {} begins after sequence {}{}",
            body["history"].as_str().unwrap_or("?"),
            body["seq"],
            body["previous_leader"]
                .as_str()
                .map(|l| format!(" (previous leader {l})"))
                .unwrap_or_default()
        );
        if let Some(w) = body["warning"].as_str() {
            eprintln!("warning: {w}");
        }
    }
    Ok(0)
}

/// `ferry scrub`: asks a node to check every live SST's block checksums.
/// Exit 0 when all are sound, 3 when some are corrupt (a follower then
/// repairs itself by a re-seed that reuses its sound chunks).
pub fn scrub(http: SocketAddr, json: bool) -> Result<i32> {
    let body = post_admin(
        http,
        "/v1/admin/scrub",
        Duration::from_secs(3600),
        &format!("scrub failed on {http}"),
    )?;
    let corrupt = body["corrupt"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{body}");
    } else {
        println!(
            "{http}: {} SSTs ({}) checked, {} corrupt",
            body["files_checked"],
            crate::util::human_bytes(body["bytes_checked"].as_u64().unwrap_or(0)),
            corrupt.len()
        );
        for c in &corrupt {
            println!(
                "  {}: {}",
                c["file"].as_str().unwrap_or("?"),
                c["reason"].as_str().unwrap_or("?")
            );
        }
        if body["repairing"] == Value::Bool(true) {
            println!("the follower is re-seeding from its leader to repair them");
        } else if !corrupt.is_empty() {
            println!("not repairing here: a leader cannot re-seed itself; promote a sound follower, then re-seed this node");
        }
    }
    Ok(if corrupt.is_empty() { 0 } else { 3 })
}
