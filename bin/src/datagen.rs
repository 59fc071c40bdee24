//! Datasets for `ferry bench` and `ferry demo`.
//!
//! db_bench's values come from a repeating 1 MB random buffer, so a stream
//! compressor with a large window shrinks them several times while per-chunk
//! compression cannot: benchmarking on db_bench alone says more about
//! db_bench than about a tool. `realistic` values are structured records
//! (JSON with names, numbers, dates and words from a vocabulary) that
//! compress about 2x; `random` values do not compress at all.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use ferry_engine::{Batch, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kind of values a generated dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// RocksDB's `db_bench fillrandom` (200-byte values, LZ4).
    Dbbench,
    /// Structured records with mixed text and numbers (about 2x compressible).
    Realistic,
    /// Incompressible random bytes.
    Random,
}

const WORDS: &[&str] = &[
    "account",
    "active",
    "address",
    "after",
    "again",
    "agent",
    "amount",
    "annual",
    "answer",
    "archive",
    "area",
    "around",
    "asset",
    "audit",
    "backup",
    "balance",
    "bank",
    "basic",
    "batch",
    "before",
    "billing",
    "black",
    "block",
    "blue",
    "board",
    "bonus",
    "branch",
    "brown",
    "budget",
    "buffer",
    "build",
    "cache",
    "call",
    "campaign",
    "card",
    "carrier",
    "cart",
    "case",
    "cash",
    "catalog",
    "center",
    "change",
    "channel",
    "charge",
    "check",
    "city",
    "claim",
    "class",
    "clear",
    "client",
    "close",
    "cloud",
    "code",
    "color",
    "column",
    "commit",
    "company",
    "contact",
    "copy",
    "cost",
    "count",
    "country",
    "coupon",
    "credit",
    "current",
    "customer",
    "cycle",
    "daily",
    "data",
    "date",
    "debit",
    "default",
    "delivery",
    "deposit",
    "design",
    "device",
    "digital",
    "direct",
    "discount",
    "domain",
    "draft",
    "east",
    "email",
    "employee",
    "energy",
    "entry",
    "event",
    "express",
    "family",
    "fast",
    "field",
    "file",
    "final",
    "first",
    "fixed",
    "flag",
    "flight",
    "floor",
    "follow",
    "food",
    "form",
    "free",
    "fresh",
    "front",
    "fund",
    "garden",
    "general",
    "gift",
    "global",
    "gold",
    "green",
    "group",
    "guest",
    "health",
    "high",
    "history",
    "holiday",
    "home",
    "hotel",
    "hour",
    "house",
    "image",
    "import",
    "income",
    "index",
    "input",
    "insurance",
    "internal",
    "invoice",
    "item",
    "journal",
    "key",
    "label",
    "language",
    "large",
    "last",
    "launch",
    "ledger",
    "level",
    "light",
    "limit",
    "line",
    "list",
    "loan",
    "local",
    "login",
    "long",
    "loyalty",
    "mail",
    "main",
    "manager",
    "market",
    "master",
    "member",
    "menu",
    "merchant",
    "message",
    "method",
    "mobile",
    "model",
    "money",
    "month",
    "morning",
    "name",
    "network",
    "new",
    "night",
    "north",
    "note",
    "number",
    "offer",
    "office",
    "online",
    "open",
    "option",
    "order",
    "origin",
    "owner",
    "package",
    "page",
    "paid",
    "panel",
    "parcel",
    "partner",
    "password",
    "payment",
    "pending",
    "period",
    "phone",
    "plan",
    "point",
    "policy",
    "portal",
    "premium",
    "price",
    "primary",
    "private",
    "product",
    "profile",
    "project",
    "promo",
    "public",
    "purchase",
    "quality",
    "queue",
    "quick",
    "rate",
    "record",
    "red",
    "refund",
    "region",
    "remote",
    "report",
    "request",
    "reserve",
    "retail",
    "return",
    "review",
    "reward",
    "route",
    "sale",
    "saving",
    "schedule",
    "search",
    "season",
    "second",
    "secure",
    "segment",
    "seller",
    "service",
    "session",
    "settle",
    "share",
    "shipping",
    "shop",
    "silver",
    "single",
    "size",
    "small",
    "social",
    "source",
    "south",
    "special",
    "staff",
    "standard",
    "start",
    "state",
    "status",
    "stock",
    "store",
    "street",
    "student",
    "summer",
    "supply",
    "support",
    "system",
    "table",
    "target",
    "task",
    "team",
    "term",
    "ticket",
    "time",
    "total",
    "track",
    "trade",
    "transfer",
    "travel",
    "trial",
    "update",
    "user",
    "value",
    "vendor",
    "video",
    "visit",
    "wallet",
    "warehouse",
    "week",
    "west",
    "white",
    "winter",
    "work",
    "year",
    "zone",
];
const CITIES: &[&str] = &[
    "Lisbon", "Osaka", "Denver", "Lagos", "Hamburg", "Austin", "Porto", "Seoul", "Lyon", "Toronto",
    "Nairobi", "Krakow", "Quito", "Perth", "Dublin", "Bergen", "Cusco", "Tampere",
];
const STATUS: &[&str] = &["active", "pending", "suspended", "closed", "trial"];

/// A structured record of roughly `target` bytes.
pub fn realistic_value(rng: &mut StdRng, id: u64, target: usize) -> Vec<u8> {
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.random_range(0..list.len())];
    let name: String = (0..rng.random_range(2..4))
        .map(|_| pick(rng, WORDS))
        .collect::<Vec<_>>()
        .join(".");
    let mut s = format!(
        "{{\"id\":{id},\"user\":\"{name}{}\",\"email\":\"{name}@{}.example\",\"city\":\"{}\",\"created\":{},\"balance\":{}.{:02},\"status\":\"{}\",\"score\":{:.4},\"note\":\"",
        rng.random_range(0..10_000),
        pick(rng, WORDS),
        pick(rng, CITIES),
        1_600_000_000 + rng.random_range(0..200_000_000u64),
        rng.random_range(0..1_000_000u64),
        rng.random_range(0..100u32),
        pick(rng, STATUS),
        rng.random::<f64>(),
    );
    while s.len() + 2 < target {
        s.push_str(pick(rng, WORDS));
        s.push(' ');
        if rng.random_bool(0.1) {
            s.push_str(&format!("{} ", rng.random_range(0..100_000u32)));
        }
    }
    s.push_str("\"}");
    s.into_bytes()
}

/// A value of `size` bytes of `kind` (db_bench-like values for `Dbbench`).
pub fn value(kind: Values, rng: &mut StdRng, id: u64, size: usize) -> Vec<u8> {
    match kind {
        Values::Realistic => realistic_value(rng, id, size),
        Values::Random => {
            let mut v = vec![0u8; size];
            rng.fill(&mut v[..]);
            v
        }
        Values::Dbbench => {
            // Half random, half repeated, like db_bench's 0.5 compression ratio.
            let mut v = vec![b'x'; size];
            rng.fill(&mut v[..size / 2]);
            v
        }
    }
}

/// Total size of the SST files directly in `dir`.
pub fn sst_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sst"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Total size of the regular files directly in `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Fills a new database in `dir` until its files take about `bytes`.
pub fn generate(dir: &Path, kind: Values, bytes: u64, seed: u64) -> Result<()> {
    ensure!(
        !dir.join("CURRENT").exists(),
        "{} already holds a database",
        dir.display()
    );
    if kind == Values::Dbbench {
        return db_bench(dir, bytes);
    }
    let store = Store::open(dir, StoreOptions::default())
        .with_context(|| format!("create a database in {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let vsize = match kind {
        Values::Random => 400,
        _ => 300,
    };
    let mut id = 0u64;
    // Write in rounds and measure the files after each flush, so the result
    // is the requested size on disk whatever the compression ratio.
    let round = (bytes / 4).clamp(1 << 20, 64 << 20);
    let per_round = (round / (vsize as u64 + 21)).max(1);
    while sst_size(dir) < bytes {
        write_keys(&store, &mut rng, id, per_round, kind, vsize)?;
        id += per_round;
        store.flush()?;
    }
    Ok(())
}

/// Writes `n` random keys (ids from `first_id`) with `vsize`-byte values of
/// `kind`, 1000 to a batch.
pub fn write_keys(
    store: &Store,
    rng: &mut StdRng,
    first_id: u64,
    n: u64,
    kind: Values,
    vsize: usize,
) -> Result<()> {
    let mut b = Batch::new();
    for id in first_id..first_id + n {
        let key = format!("user:{:016x}", rng.random::<u64>());
        b.put(key.into_bytes(), value(kind, rng, id, vsize));
        if b.len() == 1000 {
            store.write(&b)?;
            b = Batch::new();
        }
    }
    if !b.is_empty() {
        store.write(&b)?;
    }
    Ok(())
}

/// `db_bench fillrandom` with about `bytes` on disk (90 bytes a key with
/// 200-byte values, LZ4, and db_bench's default 0.5 compression ratio).
fn db_bench(dir: &Path, bytes: u64) -> Result<()> {
    let num = (bytes / 90).max(1000);
    let out = Command::new("db_bench")
        .arg("--benchmarks=fillrandom")
        .arg(format!("--num={num}"))
        .arg("--value_size=200")
        .arg("--compression_type=lz4")
        .arg(format!("--db={}", dir.display()))
        .arg("--disable_wal=1")
        .output()
        .context("run db_bench (Debian package rocksdb-tools; scripts/setup installs it)")?;
    if !out.status.success() {
        bail!(
            "db_bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_values_compress_about_twice() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut raw = Vec::new();
        for i in 0..4000 {
            raw.extend(realistic_value(&mut rng, i, 300));
        }
        let z = zstd_len(&raw);
        let ratio = raw.len() as f64 / z as f64;
        assert!((1.6..4.0).contains(&ratio), "ratio {ratio:.2}");
        let v = realistic_value(&mut rng, 7, 300);
        assert!((290..360).contains(&v.len()), "{}", v.len());
        assert!(serde_json::from_slice::<serde_json::Value>(&v).is_ok());
    }

    /// Compressed size in independent 4 KiB blocks, like an SST's data blocks.
    fn zstd_len(b: &[u8]) -> usize {
        b.chunks(4096)
            .map(|c| zstd::bulk::compress(c, 1).expect("compress").len())
            .sum()
    }
}
