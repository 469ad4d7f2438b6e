//! The cost of ordered write-back: the same workloads over a slow backend
//! (2 ms writes), run interleaved with --writeback-order ordered and relaxed,
//! printing IOPS and the ratio. The journal-like load rewrites a few hot blocks
//! with a flush after each, which is where ordering makes writes wait for
//! older epochs to reach the backend.
//!   cargo run --release -p ublk-cache-benches --bin writeback-order [-- ROUNDS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use policies::{CacheMode, WritebackOrder};
use rbd_backend::{Backend, FaultyBackend, MemBackend};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::summary;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy)]
enum Load {
    /// Hot-block rewrites, each followed by a flush (a filesystem journal).
    Journal,
    /// Random 4 KiB writes, a flush every 64.
    Random,
}

fn run(order: WritebackOrder, load: Load, seconds: f64) -> f64 {
    let backend = Arc::new(
        FaultyBackend::builder(Arc::new(MemBackend::new((256 * MIB) as usize)))
            .write_delay(Duration::from_millis(2))
            .flush_delay(Duration::from_millis(2))
            .build(),
    );
    let cache = Arc::new(MemBackend::new((33 * MIB) as usize));
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        order,
        shadow_dir: ublk_cache_benches::shadow_dir(),
        ..EngineConfig::default()
    };
    let e = Engine::open(backend, Some(cache as Arc<dyn Backend>), cfg).expect("attach");
    let data = vec![7u8; 4096];
    let (mut n, mut rng) = (0u64, testkit::Rng::new(12345));
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < seconds {
        let x = rng.next_u64();
        match load {
            Load::Journal => {
                e.write((x % 8) * 4096, &data, false).expect("write");
                e.flush().expect("flush");
            }
            Load::Random => {
                e.write((x % (256 * MIB / 4096)) * 4096, &data, false)
                    .expect("write");
                if n % 64 == 63 {
                    e.flush().expect("flush");
                }
            }
        }
        n += 1;
    }
    let iops = n as f64 / t.elapsed().as_secs_f64();
    e.abandon();
    e.forget_crash_shadow();
    iops
}

/// Ordered against relaxed write-back, interleaved.
#[derive(Debug, clap::Parser)]
#[command(name = "writeback-order")]
struct Opts {
    /// Rounds of each load and order.
    #[arg(default_value_t = 5)]
    rounds: usize,
}

fn main() {
    let shadow = tempfile::tempdir().expect("shadow dir");
    ublk_cache_benches::use_shadow_dir(shadow.path());
    let rounds = Opts::parse().rounds;
    println!("| load (backend: 2 ms writes and flushes) | ordered IOPS (median, min-max) | relaxed IOPS | ordered / relaxed |");
    println!("|---|---|---|---|");
    for (name, load) in [
        ("journal: hot 4 KiB rewrite + flush", Load::Journal),
        ("random 4 KiB, flush every 64", Load::Random),
    ] {
        let (mut o, mut r) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            o.push(run(WritebackOrder::Ordered, load, 1.0));
            r.push(run(WritebackOrder::Relaxed, load, 1.0));
        }
        let (om, omin, omax) = summary(o);
        let (rm, rmin, rmax) = summary(r);
        println!(
            "| {name} | {om:.0} ({omin:.0}-{omax:.0}) | {rm:.0} ({rmin:.0}-{rmax:.0}) | {:.2} |",
            om / rm
        );
    }
}
