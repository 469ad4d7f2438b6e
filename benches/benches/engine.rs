//! Criterion benches of the engine's hot paths, in-process on in-memory
//! devices (no I/O cost, so what is left is the engine's own work):
//!
//! - `map_lookup`: the line map's type (`HashMap<u64, u32>`, backend line →
//!   slot) at 16 Ki and 1 Mi entries (1 GiB and 64 GiB of 64 KiB lines);
//! - `hit`: a 4 KiB and a 64 KiB read of cached data through `Engine::read`
//!   (line lock, state lock, map lookup, LRU touch, copy from the cache);
//! - `promote`: a 4 KiB read miss into a free slot (backend read, cache write,
//!   map insert, metadata mirrored to the crash shadow);
//! - `evict`: a 4 KiB read miss on a full cache of clean lines (the LRU victim
//!   is released and persisted before its slot is reused);
//! - `dirty`: a 4 KiB `back`-mode write to a cached line (dirty bitmap, epoch
//!   index, shadow update), with write-back held off;
//! - `lru`: the eviction policy alone (touch, and pop + insert) at 64 Ki slots;
//! - `bits_runs`: splitting a line's sector bitmap into hit/miss runs.
//!
//!   cargo bench -p ublk-cache-benches --bench engine
//!
//! Metadata RAM per GiB of cache is measured by `metadata-ram` (a bin: it
//! needs a process of its own to read RSS).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion};
use policies::{CacheMode, EvictionPolicy, LruPolicy};
use rbd_backend::{Backend, FaultyBackend, MemBackend};
use testkit::Rng;
use ublk_cache::engine::bits;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const LINE: u64 = 64 * KIB;

struct Setup {
    engine: Arc<Engine>,
    backend: Arc<FaultyBackend<MemBackend>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.backend.release();
        self.engine.abandon();
        self.engine.forget_crash_shadow();
    }
}

/// An engine over an in-memory backend of `backend_lines` lines with a cache
/// of about `cache_lines` lines.
fn setup(mode: CacheMode, backend_lines: u64, cache_lines: u64) -> Setup {
    // Filled with a pattern, not zeroes, so that every page is touched here
    // and no page fault lands inside a timed request.
    let mem = |n: u64| MemBackend::builder().data(vec![0x11; n as usize]).build();
    let backend = Arc::new(FaultyBackend::new(mem(backend_lines * LINE)));
    // Data lines plus room for the metadata table and superblocks.
    let cache_bytes = cache_lines * LINE + 2 * MIB;
    let cache = Arc::new(mem(cache_bytes));
    let cfg = EngineConfig {
        mode,
        // The cache device holds the pattern, not zeroes: format it anyway.
        format: true,
        cache_bytes: Some(cache_bytes),
        line_size: Some(LINE as u32),
        shadow_dir: ublk_cache_benches::shadow_dir(),
        ..EngineConfig::default()
    };
    let engine = Engine::open(
        backend.clone() as Arc<dyn Backend>,
        Some(cache as Arc<dyn Backend>),
        cfg,
    )
    .expect("attach an in-memory cache");
    Setup { engine, backend }
}

fn warm(e: &Engine, lines: u64) {
    let mut buf = vec![0u8; LINE as usize];
    for l in 0..lines {
        e.read(l * LINE, &mut buf).expect("warm read");
    }
}

fn map_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_lookup");
    for n in [16 * 1024u64, 1024 * 1024] {
        let mut rng = Rng::new(7);
        let mut m: HashMap<u64, u32> = HashMap::with_capacity(n as usize);
        // Backend lines of a 16 TiB disk, spread out.
        for slot in 0..n {
            m.insert(rng.next_u64() % (1 << 28), slot as u32);
        }
        let keys: Vec<u64> = m.keys().copied().collect();
        let mut i = 0usize;
        g.bench_function(format!("hit_{n}_entries"), |b| {
            b.iter(|| {
                i = (i + 7919) % keys.len();
                black_box(m.get(&keys[i]))
            })
        });
    }
    g.finish();
}

fn hit(c: &mut Criterion) {
    let lines = 1024;
    let s = setup(CacheMode::Back, lines, lines + 64);
    warm(&s.engine, lines);
    let mut g = c.benchmark_group("hit");
    for size in [4 * KIB, 64 * KIB] {
        let mut buf = vec![0u8; size as usize];
        let mut rng = Rng::new(11);
        g.bench_function(format!("read_{}k", size / KIB), |b| {
            b.iter(|| {
                let off = (rng.next_u64() % (lines * LINE / size)) * size;
                s.engine.read(off, &mut buf).expect("read");
            })
        });
    }
    g.finish();
}

fn promote(c: &mut Criterion) {
    let mut g = c.benchmark_group("promote");
    // Each timed read misses a line nobody read before, into a free slot.
    // Engines are built outside the timing, one per 2048 reads.
    const PER_ENGINE: u64 = 2048;
    g.bench_function("miss_4k_free_slot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut buf = vec![0u8; 4096];
            while left > 0 {
                let n = left.min(PER_ENGINE);
                let s = setup(CacheMode::Back, PER_ENGINE, PER_ENGINE + 64);
                let t = Instant::now();
                for l in 0..n {
                    s.engine.read(l * LINE, &mut buf).expect("read");
                }
                total += t.elapsed();
                left -= n;
            }
            total
        })
    });
    g.finish();
}

fn evict(c: &mut Criterion) {
    let mut g = c.benchmark_group("evict");
    // Cycling over twice as many lines as the cache holds: under LRU every
    // read misses and evicts the least recently used line.
    let cache_lines = 512;
    let s = setup(CacheMode::Back, 4 * cache_lines, cache_lines);
    let span = 2 * s.engine.stats().cache_lines;
    warm(&s.engine, span);
    let mut buf = vec![0u8; 4096];
    let mut l = 0u64;
    g.bench_function("miss_4k_full_cache", |b| {
        b.iter(|| {
            s.engine.read(l * LINE, &mut buf).expect("read");
            l = (l + 1) % span;
        })
    });
    g.finish();
}

fn dirty(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty");
    let lines = 1024;
    let s = setup(CacheMode::Back, lines, lines + 64);
    warm(&s.engine, lines);
    // Hold write-back off so that every write lands on the dirty-tracking path
    // alone (no flusher competing for the state lock).
    s.backend.stall();
    let data = vec![0x5au8; 4096];
    let mut rng = Rng::new(13);
    g.bench_function("write_4k_back", |b| {
        b.iter(|| {
            let off = (rng.next_u64() % (lines * LINE / 4096)) * 4096;
            s.engine.write(off, &data, false).expect("write");
        })
    });
    g.finish();
    drop(s);
}

fn lru(c: &mut Criterion) {
    let mut g = c.benchmark_group("lru");
    let n = 64 * 1024u32;
    let mut p = LruPolicy::new();
    for s in 0..n {
        p.insert(s);
    }
    let mut rng = Rng::new(17);
    g.bench_function("touch_64k_slots", |b| {
        b.iter(|| p.touch((rng.next_u64() % n as u64) as u32))
    });
    g.bench_function("pop_victim_and_insert_64k_slots", |b| {
        b.iter(|| {
            let v = p.pop_victim(&mut |_| true).expect("a victim");
            p.insert(black_box(v));
        })
    });
    g.bench_function("insert_remove_64k_slots", |b| {
        b.iter_batched(
            || (rng.next_u64() % n as u64) as u32,
            |s| {
                p.remove(s);
                p.insert(s);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bits_runs(c: &mut Criterion) {
    let b0 = bits::or(&bits::range(0, 3), &bits::range(8, 12));
    c.bench_function("bits_runs_16_sectors", |b| {
        b.iter(|| black_box(bits::runs(black_box(&b0), 0, 16)))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = map_lookup, hit, promote, evict, dirty, lru, bits_runs
}

fn main() {
    // Crash shadows go to a private tmpfs directory (as in production), removed at the end.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("a directory for crash shadows");
    ublk_cache_benches::use_shadow_dir(dir.path());
    benches();
    Criterion::default().configure_from_args().final_summary();
}
