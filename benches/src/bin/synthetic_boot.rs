//! Write a deterministic synthetic boot as an io-trace (see
//! `ublk_cache_benches::synthetic_boot` for its shape), for `io-replay`.
//!   synthetic-boot --out FILE [--disk 2G] [--read-pct 6.5] [--streams 4]
//!                  [--read-latency-ms 5] [--seed 1] [--drift-pct 0 --drift-seed 2]

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ublk_cache_benches::synthetic_boot::{generate, render, BootShape};
use ublk_cache_benches::{parse_ms, parse_size};

#[derive(Parser)]
#[command(about = "Write a deterministic synthetic boot as an io-trace")]
struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_parser = parse_size, default_value = "2G")]
    disk: u64,
    /// Percent of the disk the boot reads.
    #[arg(long, default_value_t = 6.5)]
    read_pct: f64,
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// The recording device's time per request.
    #[arg(long = "read-latency-ms", value_parser = parse_ms, default_value = "5")]
    read_latency: std::time::Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Percent of the runs another boot of the same system reads instead.
    #[arg(long, default_value_t = 0)]
    drift_pct: u64,
    #[arg(long, default_value_t = 2)]
    drift_seed: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !(a.read_pct > 0.0 && a.read_pct <= 50.0) {
        bail!("--read-pct {}: give more than 0 and at most 50", a.read_pct);
    }
    if a.drift_pct > 100 || a.streams == 0 || a.disk < (256 << 20) {
        bail!("--drift-pct is at most 100, --streams at least 1, --disk at least 256M");
    }
    let shape = BootShape {
        disk: a.disk,
        read_pct: a.read_pct,
        streams: a.streams,
        read_latency: a.read_latency,
        seed: a.seed,
        drift_pct: a.drift_pct,
        drift_seed: a.drift_seed,
    };
    let t = generate(&shape);
    std::fs::write(&a.out, render(&t)).with_context(|| format!("writing {}", a.out.display()))?;
    let read: u64 = t
        .iter()
        .filter(|r| r.op == ublk_cache::io_trace::TraceOp::Read)
        .map(|r| r.len)
        .sum();
    println!(
        "synthetic-boot: {} requests, {} MiB read, to {}",
        t.len(),
        read >> 20,
        a.out.display()
    );
    Ok(())
}
