//! How long attach takes after a clean stop, a daemon crash and a power cut,
//! for caches of growing size (sparse files). Recovery scans the line table, so
//! its time follows the metadata size; the data area is never read.
//!   cargo run --release -p ublk-cache-benches --bin recovery-time [-- GIB...]
//! Default sizes: 8 and 64 GiB.

use clap::Parser;
use std::sync::Arc;
use std::time::Instant;

use policies::CacheMode;
use rbd_backend::{Backend, FileBackend, OpenOptions};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::ms;

fn open(dir: &std::path::Path, cache_bytes: u64) -> (Arc<dyn Backend>, Arc<dyn Backend>) {
    let b = dir.join("backend.img");
    let c = dir.join("cache.img");
    for (p, n) in [(&b, 1u64 << 40), (&c, cache_bytes)] {
        if !p.exists() {
            std::fs::File::create(p)
                .and_then(|f| f.set_len(n))
                .expect("sparse file");
        }
    }
    let o = OpenOptions::default();
    (
        Arc::new(FileBackend::open(&b, o).expect("backend")),
        Arc::new(FileBackend::open(&c, o).expect("cache")),
    )
}

fn attach(dir: &std::path::Path, cache_bytes: u64) -> (Arc<Engine>, f64) {
    let (b, c) = open(dir, cache_bytes);
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        cache_bytes: Some(cache_bytes),
        shadow_dir: ublk_cache_benches::shadow_dir(),
        ..EngineConfig::default()
    };
    let t = Instant::now();
    let e = Engine::open(b, Some(c), cfg).expect("attach");
    (e, ms(t.elapsed()))
}

/// Attach times after a clean detach, a daemon crash and a power cut.
#[derive(Debug, clap::Parser)]
#[command(name = "recovery-time")]
struct Opts {
    /// Cache sizes in GiB.
    #[arg(default_values_t = [8u64, 64])]
    gib: Vec<u64>,
}

fn main() {
    let shadow = tempfile::tempdir().expect("shadow dir");
    ublk_cache_benches::use_shadow_dir(shadow.path());
    let sizes = Opts::parse().gib;
    println!("| cache | lines (64 KiB) | metadata | format | clean re-attach | after daemon crash | after power cut |");
    println!("|---|---|---|---|---|---|---|");
    for gib in sizes {
        let dir =
            tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
                .expect("bench dir");
        let bytes = gib << 30;
        let (e, format_ms) = attach(dir.path(), bytes);
        // Populate: 20,000 lines with a dirty 4 KiB sector each, spread out.
        let lines = (bytes >> 16).min(1 << 22);
        let data = vec![0x5au8; 4096];
        for i in 0..20_000u64 {
            e.write((i * 7919 % lines) << 16, &data, false)
                .expect("write");
        }
        e.flush().expect("flush");
        e.detach_keep_dirty().expect("detach");
        let (e, clean_ms) = attach(dir.path(), bytes);
        e.write(0, &data, false).expect("write");
        e.abandon();
        let (e, crash_ms) = attach(dir.path(), bytes);
        e.abandon();
        e.forget_crash_shadow();
        let (e, cut_ms) = attach(dir.path(), bytes);
        let meta_mib = (lines * 32) as f64 / (1 << 20) as f64;
        println!(
            "| {gib} GiB | {lines} | {meta_mib:.1} MiB | {format_ms:.0} ms | {clean_ms:.0} ms | {crash_ms:.0} ms | {cut_ms:.0} ms |"
        );
        e.detach_keep_dirty().expect("detach");
    }
}
