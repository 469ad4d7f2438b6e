//! Write-back pacing: two disks on one backend link, one draining, one
//! reading. The draining disk (`back`, its cache holding `--dirty` of dirty
//! data) and the reading one (`none`, 4 KiB random reads at queue depth 1,
//! the victim) each have a `FaultyBackend` of their own over one shared link
//! of `--bandwidth` (a saturated path to a busy Ceph pool in miniature: every
//! op waits for the bytes queued on the link before it).
//!
//! Arms, interleaved in every repeat: `alone` (the victim with no drain),
//! `unpaced` (write-back as fast as it goes), `static` (`--writeback-rate`
//! at `--static-rate`) and `controlled` (the dirty-level controller with its
//! default watermarks, 10 % and 70 %); then the reader on the draining disk
//! itself, on lines it never cached: `own-alone` (nothing dirty), `own-equal`
//! (unpaced write-back keeping its full window) and `own-reads-first`
//! (write-back making way for the guest's backend reads, the default). For
//! each it prints the reader's p50, p99, mean and maximum read latency over
//! `--seconds` (or while write-back runs, if that ends sooner) and the
//! drain's backend write rate over the same time, then the reader's p99 and
//! mean against its arm with nothing dirty and each drain rate against
//! `unpaced`, ratios of the medians over the repeats. One JSON object on
//! stdout.
//!
//!   writeback-pacing [--dirty 256M] [--cache 1G] [--bandwidth 80000000]
//!     [--seconds 10] [--repeats 3] [--static-rate 40000000]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use policies::{BackendPriority, CacheMode, DirtyLevel, WritebackLimit};
use rbd_backend::{Backend, FaultyBackend, MemBackend};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::{parse_ms, parse_size, summary};

const MIB: u64 = 1 << 20;
/// The victim's disk.
const VICTIM_BYTES: u64 = 256 * MIB;

#[derive(Debug, clap::Parser)]
#[command(name = "writeback-pacing")]
struct Opts {
    /// Dirty data in the draining disk's cache at the start of each arm.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    dirty: u64,
    /// The draining disk's cache.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    cache: u64,
    /// The shared link's bytes per second (80 MB/s, the figure of Ceph in
    /// the original request).
    #[arg(long, value_parser = parse_size, default_value = "80000000")]
    bandwidth: u64,
    /// Each backend read waits this long first (besides the link).
    #[arg(long, value_parser = parse_ms, default_value = "1")]
    read_delay: Duration,
    /// Each backend write and flush waits this long first.
    #[arg(long, value_parser = parse_ms, default_value = "2")]
    write_delay: Duration,
    /// How long the victim reads in each arm.
    #[arg(long, default_value = "10")]
    seconds: f64,
    #[arg(long, default_value = "3")]
    repeats: usize,
    /// The `static` arm's --writeback-rate (by default half the link: the
    /// share a static cap gives one of two draining disks).
    #[arg(long, value_parser = parse_size, default_value = "40000000")]
    static_rate: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arm {
    Alone,
    Unpaced,
    Static,
    Controlled,
    /// The reader on the draining disk itself (uncached lines), nothing dirty.
    OwnAlone,
    /// ... while unpaced write-back keeps its full window.
    OwnEqual,
    /// ... while write-back makes way for the guest's reads (the default).
    OwnReadsFirst,
}

const ARMS: [Arm; 7] = [
    Arm::Alone,
    Arm::Unpaced,
    Arm::Static,
    Arm::Controlled,
    Arm::OwnAlone,
    Arm::OwnEqual,
    Arm::OwnReadsFirst,
];

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Alone => "alone",
            Arm::Unpaced => "unpaced",
            Arm::Static => "static",
            Arm::Controlled => "controlled",
            Arm::OwnAlone => "own-alone",
            Arm::OwnEqual => "own-equal",
            Arm::OwnReadsFirst => "own-reads-first",
        }
    }

    /// Whether the reader reads the draining disk (else the other one).
    fn own(self) -> bool {
        matches!(self, Arm::OwnAlone | Arm::OwnEqual | Arm::OwnReadsFirst)
    }

    /// Whether the draining disk starts with dirty data.
    fn dirty(self) -> bool {
        !matches!(self, Arm::Alone | Arm::OwnAlone)
    }

    /// The arm the reader's latency is compared with.
    fn baseline(self) -> Arm {
        if self.own() {
            Arm::OwnAlone
        } else {
            Arm::Alone
        }
    }
}

/// What one arm measured.
#[derive(Debug, Clone, Default)]
struct Cell {
    p50_ms: f64,
    p99_ms: f64,
    /// A read stuck behind a long queue is one sample however long it
    /// waits: the mean and the maximum show what the percentiles hide.
    mean_ms: f64,
    max_ms: f64,
    reads: usize,
    /// How long the victim read.
    secs: f64,
    /// The controller's state and rate at the end (empty without a drain).
    control: String,
    /// The drain's backend write bytes per second over the victim's run.
    drain_mib_s: f64,
    /// Dirty bytes left when the victim stopped.
    dirty_left: u64,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn run_arm(o: &Opts, arm: Arm, seed: u64) -> Result<Cell, String> {
    let victim_b = Arc::new(
        FaultyBackend::builder(Arc::new(MemBackend::new(VICTIM_BYTES as usize)))
            .read_delay(o.read_delay)
            .bandwidth(o.bandwidth)
            .build(),
    );
    let victim = Engine::open(
        victim_b.clone() as Arc<dyn Backend>,
        None,
        EngineConfig {
            mode: CacheMode::None,
            shadow_dir: ublk_cache_benches::shadow_dir(),
            ..EngineConfig::default()
        },
    )
    .map_err(|e| format!("attaching the victim: {e}"))?;

    // The dirty part, then (for the reader on this disk) lines never cached.
    let drain_b = Arc::new(
        FaultyBackend::builder(Arc::new(MemBackend::new((o.dirty + VICTIM_BYTES) as usize)))
            .write_delay(o.write_delay)
            .flush_delay(o.write_delay)
            .read_delay(o.read_delay)
            .share_link_with(&victim_b)
            .build(),
    );
    let drain = if arm == Arm::Alone {
        None
    } else {
        let backend_priority = if arm == Arm::OwnEqual {
            BackendPriority::Equal
        } else {
            BackendPriority::GuestReads
        };
        let cfg = EngineConfig {
            mode: CacheMode::Back,
            cache_bytes: Some(o.cache),
            shadow_dir: ublk_cache_benches::shadow_dir(),
            writeback_limit: WritebackLimit {
                bytes_per_sec: (arm == Arm::Static).then_some(o.static_rate),
                writes_per_sec: None,
            },
            dirty_level: (arm == Arm::Controlled).then(DirtyLevel::default),
            backend_priority,
            ..EngineConfig::default()
        };
        // Room for the metadata besides the lines.
        let cache = Arc::new(MemBackend::new((o.cache + o.cache / 16 + 8 * MIB) as usize));
        let e = Engine::open(
            drain_b.clone() as Arc<dyn Backend>,
            Some(cache as Arc<dyn Backend>),
            cfg,
        )
        .map_err(|e| format!("attaching the draining disk: {e}"))?;
        // Dirty whole lines while the backend holds write-back.
        drain_b.stall();
        let data = vec![0x5au8; MIB as usize];
        for i in 0..(if arm.dirty() { o.dirty / MIB } else { 0 }) {
            e.write(i * MIB, &data, false)
                .map_err(|err| format!("dirtying the cache: {err}"))?;
        }
        e.flush().map_err(|err| format!("flush: {err}"))?;
        Some(e)
    };

    drain_b.reset_stats();
    let stop = Arc::new(AtomicBool::new(false));
    let (read_from, base) = match &drain {
        Some(e) if arm.own() => (e.clone(), o.dirty),
        _ => (victim.clone(), 0),
    };
    let reader = {
        let (victim, stop) = (read_from, stop.clone());
        std::thread::spawn(move || -> Result<Vec<Duration>, String> {
            let mut rng = testkit::Rng::new(seed);
            let mut buf = vec![0u8; 4096];
            let mut lat = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let off = base + (rng.next_u64() % (VICTIM_BYTES / 4096)) * 4096;
                let t = Instant::now();
                victim
                    .read(off, &mut buf)
                    .map_err(|e| format!("victim read: {e}"))?;
                lat.push(t.elapsed());
            }
            Ok(lat)
        })
    };
    let t = Instant::now();
    drain_b.release();
    // The victim reads for the window, or (a drain that ends sooner) while
    // write-back runs: its latency is measured under write-back only.
    let window = Duration::from_secs_f64(o.seconds);
    while t.elapsed() < window {
        std::thread::sleep(Duration::from_millis(10));
        if arm.dirty() && drain.as_ref().is_some_and(|e| e.stats().dirty_bytes == 0) {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let mut lat = reader
        .join()
        .map_err(|_| "the victim's thread panicked".to_string())??;
    let secs = t.elapsed().as_secs_f64();
    let written = drain_b.stats().bytes_written;
    let st = drain.as_ref().map(|e| e.stats());
    let dirty_left = st.as_ref().map_or(0, |s| s.dirty_bytes);
    let control = st.as_ref().map_or(String::new(), |s| {
        format!(
            "{} at {:.2} MiB/s",
            s.writeback_control,
            s.writeback_control_rate as f64 / MIB as f64
        )
    });
    // The rest drains at stop; lift the link first so that it takes no time.
    drain_b.set_bandwidth(0);
    if let Some(e) = drain {
        e.shutdown()
            .map_err(|err| format!("stopping the draining disk: {err}"))?;
    }
    victim
        .shutdown()
        .map_err(|err| format!("stopping the victim: {err}"))?;
    lat.sort();
    Ok(Cell {
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        reads: lat.len(),
        drain_mib_s: written as f64 / MIB as f64 / secs,
        dirty_left,
        mean_ms: if lat.is_empty() {
            0.0
        } else {
            lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() * 1000.0 / lat.len() as f64
        },
        max_ms: lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        secs,
        control,
    })
}

fn run() -> Result<(), String> {
    let o = Opts::parse();
    if o.dirty < MIB || !o.dirty.is_multiple_of(MIB) || o.dirty > o.cache {
        return Err(format!(
            "--dirty {}: must be a positive multiple of 1 MiB, at most --cache {}",
            o.dirty, o.cache
        ));
    }
    if o.bandwidth == 0 || !o.seconds.is_finite() || o.seconds <= 0.0 || o.repeats == 0 {
        return Err("--bandwidth, --seconds and --repeats must be positive".into());
    }
    let shadow = tempfile::tempdir().map_err(|e| format!("shadow dir: {e}"))?;
    ublk_cache_benches::use_shadow_dir(shadow.path());
    let mut cells: Vec<Vec<Cell>> = vec![Vec::new(); ARMS.len()];
    for r in 0..o.repeats {
        for (i, &arm) in ARMS.iter().enumerate() {
            let c = run_arm(&o, arm, 1000 + r as u64)?;
            eprintln!(
                "writeback-pacing: repeat {} {:>15}: victim p50 {:.3} p99 {:.3} mean {:.3} max {:.1} ms ({} reads in {:.1} s); drain {:.2} MiB/s, {} MiB still dirty; control {}",
                r + 1,
                arm.name(),
                c.p50_ms,
                c.p99_ms,
                c.mean_ms,
                c.max_ms,
                c.reads,
                c.secs,
                c.drain_mib_s,
                c.dirty_left / MIB,
                if c.control.is_empty() { "-" } else { &c.control }
            );
            cells[i].push(c);
        }
    }
    let med = |i: usize, f: fn(&Cell) -> f64| summary(cells[i].iter().map(f).collect()).0;
    let index = |a: Arm| ARMS.iter().position(|&x| x == a).expect("an arm");
    let unpaced_rate = med(index(Arm::Unpaced), |c| c.drain_mib_s);
    let mut arms = Vec::new();
    for (i, &arm) in ARMS.iter().enumerate() {
        let alone_p99 = med(index(arm.baseline()), |c| c.p99_ms);
        let alone_mean = med(index(arm.baseline()), |c| c.mean_ms);
        let p99 = med(i, |c| c.p99_ms);
        let mean = med(i, |c| c.mean_ms);
        let rate = med(i, |c| c.drain_mib_s);
        let vs = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        eprintln!(
            "writeback-pacing: {:>15}: victim p50 {:.3} ms, p99 {:.3} ms = {:.2}x alone, mean {mean:.3} ms = {:.2}x alone; drain {:.2} MiB/s = {:.3}x unpaced",
            arm.name(),
            med(i, |c| c.p50_ms),
            p99,
            vs(p99, alone_p99),
            vs(mean, alone_mean),
            rate,
            vs(rate, unpaced_rate)
        );
        arms.push(format!(
            "\"{}\": {{\"victim_p50_ms\": {:.4}, \"victim_p99_ms\": {p99:.4}, \"p99_vs_alone\": {:.3}, \"victim_mean_ms\": {mean:.4}, \"mean_vs_alone\": {:.3}, \"victim_max_ms\": {:.2}, \"drain_mib_s\": {rate:.3}, \"drain_vs_unpaced\": {:.4}, \"dirty_left_mib\": {:.1}}}",
            arm.name(),
            med(i, |c| c.p50_ms),
            vs(p99, alone_p99),
            vs(mean, alone_mean),
            med(i, |c| c.max_ms),
            vs(rate, unpaced_rate),
            med(i, |c| c.dirty_left as f64) / MIB as f64
        ));
    }
    println!(
        "{{\"dirty_mib\": {}, \"cache_mib\": {}, \"bandwidth\": {}, \"seconds\": {}, \"repeats\": {}, \"static_rate\": {}, \"arms\": {{{}}}}}",
        o.dirty / MIB,
        o.cache / MIB,
        o.bandwidth,
        o.seconds,
        o.repeats,
        o.static_rate,
        arms.join(", ")
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("writeback-pacing: {e}");
        std::process::exit(1);
    }
}
