//! One harness run: record a workload, then rebuild and check crash states.
//!
//! The device model for a power cut at time `t`: everything a device completed
//! before its last completed flush is durable; of what it completed after, any
//! subset may have reached the media, in any order, and a multi-sector write
//! may be torn at 512-byte granularity. The crash shadow (tmpfs) is gone.

use std::sync::Arc;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::{Backend, BlockIo};
use ublk_cache::format::FormatVersion;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

use crate::check::History;
use crate::overlay::{Delta, Overlay};
use crate::recording::{Clock, DevOp, Logged, Recording, Stamped};
use crate::workload::{self, WorkloadConfig, SECTOR};
use testkit::Rng;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: CacheMode,
    pub order: WritebackOrder,
    pub seed: u64,
    pub ops: usize,
    pub line_size: u32,
    /// Crash points per run (besides one just after every device flush).
    pub points: usize,
    /// Device-window variants per crash point.
    pub variants: usize,
    /// Test-only fault: write back newest epoch first. The harness must catch it.
    pub reverse_writeback_bug: bool,
    /// The on-disk format a fresh cache gets (v1 caches made by older releases
    /// are still served, so both are checked).
    pub format: FormatVersion,
    /// Test-only fault: recovery trusts the newest log record's data without
    /// its checksums. The harness must catch it.
    pub skip_log_checksums_bug: bool,
    /// Test-only fault: recovery checks only the newest record's data, not
    /// that of the FUA rounds before it (which flushed nothing). The harness
    /// must catch it.
    pub check_only_newest_record_bug: bool,
    /// Where the engines keep their crash shadows (a private directory).
    pub shadow_dir: std::path::PathBuf,
    /// Test-only fault: the engine recovered after a crash writes back newest
    /// epoch first (the one before the crash does not). The double-failure
    /// check must catch it.
    pub reverse_writeback_after_recovery_bug: bool,
    /// Backend flushes take `SLOW_FLUSH` while the guest runs: write-back lags
    /// behind, so lines gain versions and relaxed order drops superseded ones.
    pub slow_writeback: bool,
}

/// A backend flush with `slow_writeback` (a few per write-back step).
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(3);

#[derive(Debug, Default)]
pub struct RunReport {
    pub states: u64,
    pub violations: Vec<String>,
}

const BACKEND_BYTES: usize = 512 * 1024;
const CACHE_LINES: u64 = 16;

/// A device's log replayed up to a point, kept incrementally.
struct Replay {
    log: Vec<Stamped>,
    /// Image after applying log[..applied].
    durable: Arc<Vec<u8>>,
    applied: usize,
}

fn apply(img: &mut [u8], op: &DevOp) {
    match op {
        DevOp::Write { off, data, .. } => {
            img[*off as usize..*off as usize + data.len()].copy_from_slice(data)
        }
        DevOp::Zero { off, len } | DevOp::Discard { off, len } => {
            img[*off as usize..(*off + *len) as usize].fill(0)
        }
        DevOp::Flush => {}
    }
}

impl Replay {
    fn new(rec: &Recording) -> Self {
        Self {
            log: rec.log(),
            // A recorded device starts zeroed.
            durable: Arc::new(vec![0u8; rec.size() as usize]),
            applied: 0,
        }
    }

    /// Crash image at `t`: durable up to the last flush at or before `t`, plus a
    /// chosen subset of the later completed operations.
    fn state_at(&mut self, t: u64, variant: usize, rng: &mut Rng) -> (Arc<Vec<u8>>, Delta) {
        let upto = self.log.partition_point(|s| s.seq <= t);
        let last_flush = self.log[..upto]
            .iter()
            .rposition(|s| matches!(s.op, DevOp::Flush));
        let durable_end = last_flush.map_or(0, |f| f + 1);
        if durable_end > self.applied {
            let mut img = (*self.durable).clone();
            for s in &self.log[self.applied..durable_end] {
                apply(&mut img, &s.op);
            }
            self.durable = Arc::new(img);
            self.applied = durable_end;
        }
        // Crash points are visited in time order, so the durable image only moves forward.
        debug_assert_eq!(self.applied, durable_end);
        let mut window: Vec<&Stamped> = self.log[durable_end..upto].iter().collect();
        let is_durable = |op: &DevOp| matches!(op, DevOp::Write { durable: true, .. });
        // Variant 0: everything in the window arrived; 1: nothing did; others:
        // a random subset, in random order, with torn writes. A durable write
        // always arrived, whole, and what completed before it never lands over
        // it (nor it over what completed after it and arrived).
        let torn = variant >= 2;
        match variant {
            0 => {}
            1 => window.retain(|s| is_durable(&s.op)),
            _ => {
                window.retain(|s| is_durable(&s.op) || rng.chance(60));
                for i in (1..window.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    window.swap(i, j);
                }
            }
        }
        // Each sector's newest durable write: it is there, and nothing that
        // completed before it lands over it.
        let mut delta = Delta::new();
        let mut durable_at: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let sectors = |op: &DevOp| match op {
            DevOp::Write { off, data, .. } => Some((*off / SECTOR, data.len() as u64 / SECTOR)),
            DevOp::Zero { off, len } | DevOp::Discard { off, len } => {
                Some((*off / SECTOR, *len / SECTOR))
            }
            DevOp::Flush => None,
        };
        let mut by_stamp: Vec<&&Stamped> = window.iter().filter(|s| is_durable(&s.op)).collect();
        by_stamp.sort_by_key(|s| s.seq);
        for st in by_stamp {
            if let (Some((first, n)), DevOp::Write { data, .. }) = (sectors(&st.op), &st.op) {
                for k in 0..n {
                    let mut sec = Box::new([0u8; 512]);
                    sec.copy_from_slice(&data[(k * SECTOR) as usize..((k + 1) * SECTOR) as usize]);
                    delta.insert(first + k, sec);
                    durable_at.insert(first + k, st.seq);
                }
            }
        }
        // The rest in the chosen order, torn, over those only where later.
        for st in window {
            let op = &st.op;
            if is_durable(op) {
                continue;
            }
            let Some((first, n)) = sectors(op) else {
                continue;
            };
            let data = match op {
                DevOp::Write { data, .. } => Some(data),
                _ => None,
            };
            for k in 0..n {
                if torn && n > 1 && rng.chance(25) {
                    continue;
                }
                let s = first + k;
                if durable_at.get(&s).is_some_and(|&d| d > st.seq) {
                    continue;
                }
                let mut sec = Box::new([0u8; 512]);
                if let Some(d) = data {
                    sec.copy_from_slice(&d[(k * SECTOR) as usize..((k + 1) * SECTOR) as usize]);
                }
                delta.insert(s, sec);
            }
        }
        (Arc::clone(&self.durable), delta)
    }
}

fn read_sector(base: &[u8], delta: &Delta, s: u64) -> Vec<u8> {
    match delta.get(&s) {
        Some(d) => d.to_vec(),
        None => base[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec(),
    }
}

pub fn run(cfg: &RunConfig) -> RunReport {
    let mut report = RunReport::default();
    let clock = Arc::new(Clock::default());
    // Offline mode keeps the whole image in the cache; the others get a tiny
    // cache so that eviction and write-back race the guest.
    let lines = if cfg.mode == CacheMode::Offline {
        (BACKEND_BYTES as u64).div_ceil(cfg.line_size as u64) + 1
    } else {
        CACHE_LINES
    };
    let cache_bytes = (1 << 20) + lines as usize * cfg.line_size as usize;
    let backend = Arc::new(Recording::new(BACKEND_BYTES, "backend", Arc::clone(&clock)));
    let cache = Arc::new(Recording::new(cache_bytes, "cache", Arc::clone(&clock)));
    let ecfg = EngineConfig {
        mode: cfg.mode,
        order: cfg.order,
        line_size: Some(cfg.line_size),
        format_version: cfg.format,
        shadow_dir: cfg.shadow_dir.clone(),
        ..EngineConfig::default()
    };
    let served: Arc<dyn Backend> = if cfg.slow_writeback {
        Arc::new(
            rbd_backend::FaultyBackend::builder(backend.clone())
                .flush_delay(SLOW_FLUSH)
                .build(),
        )
    } else {
        backend.clone()
    };
    let engine = match Engine::open(
        served,
        Some(cache.clone() as Arc<dyn BlockIo>),
        ecfg.clone(),
    ) {
        Ok(e) => e,
        Err(e) => {
            report
                .violations
                .push(format!("initial attach failed: {e}"));
            return report;
        }
    };
    engine.reverse_writeback_for_tests.store(
        cfg.reverse_writeback_bug,
        std::sync::atomic::Ordering::Relaxed,
    );
    let start = clock.now();
    let mut rng = Rng::new(cfg.seed);
    let workload = workload::run(
        &engine,
        &clock,
        &mut rng,
        &WorkloadConfig {
            ops: cfg.ops,
            max_sectors: 24,
        },
    );
    engine.abandon();
    let end = clock.now();
    for m in workload.read_mismatches {
        report.violations.push(format!("{cfg:?}: {m}"));
    }
    let history = History::new(workload.ops, BACKEND_BYTES as u64 / SECTOR);

    let mut points: Vec<u64> = cache
        .log()
        .iter()
        .chain(backend.log().iter())
        .filter(|s| s.seq > start && matches!(s.op, DevOp::Flush))
        .map(|s| s.seq)
        .collect();
    for _ in 0..cfg.points {
        points.push(start + 1 + rng.below(end - start));
    }
    points.sort_unstable();
    points.dedup();

    let mut rb = Replay::new(&backend);
    let mut rc = Replay::new(&cache);
    let mut debugged = false;
    let ordered_back = cfg.mode == CacheMode::Back && cfg.order == WritebackOrder::Ordered;
    for (pi, &t) in points.iter().enumerate() {
        for variant in 0..cfg.variants {
            let (bbase, bdelta) = rb.state_at(t, variant, &mut rng);
            let (cbase, cdelta) = rc.state_at(t, variant, &mut rng);
            report.states += 1;
            // One state per crash point also loses the cache during the
            // recovered engine's drain (see `check_drain`).
            let double_failure = ordered_back && variant == pi % cfg.variants;
            if ordered_back {
                if let Err(e) =
                    history.check_backend_consistent(t, |s| read_sector(&bbase, &bdelta, s))
                {
                    report
                        .violations
                        .push(format!("G3 {cfg:?} variant {variant}: {e}"));
                }
            }
            // Power cut: the tmpfs shadow is gone (the recovered engines share the
            // cache's uuid, so this removes theirs too).
            engine.forget_crash_shadow();
            let (dbg_b, dbg_c) = (
                (bbase.clone(), bdelta.clone()),
                (cbase.clone(), cdelta.clone()),
            );
            let b = Arc::new(Logged::wrap(
                Overlay::new(bbase, bdelta, backend.identity()),
                Arc::new(Clock::default()),
            ));
            let c = Arc::new(Overlay::new(cbase, cdelta, cache.identity()));
            let rcfg = EngineConfig {
                skip_log_checksums_for_tests: cfg.skip_log_checksums_bug,
                check_only_newest_record_for_tests: cfg.check_only_newest_record_bug,
                ..ecfg.clone()
            };
            let rec = match Engine::open(b.clone(), Some(c as Arc<dyn BlockIo>), rcfg) {
                Ok(e) => {
                    e.reverse_writeback_for_tests.store(
                        cfg.reverse_writeback_after_recovery_bug,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    e
                }
                Err(e) => {
                    report
                        .violations
                        .push(format!("recovery refused at t={t} variant {variant}: {e}"));
                    continue;
                }
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut bad = None;
            'read: for chunk in 0..(BACKEND_BYTES / buf.len()) as u64 {
                if let Err(e) = rec.read(chunk * buf.len() as u64, &mut buf) {
                    bad = Some(format!("read after recovery failed: {e}"));
                    break;
                }
                for (i, sec) in buf.chunks(SECTOR as usize).enumerate() {
                    let s = chunk * (buf.len() as u64 / SECTOR) + i as u64;
                    if let Err(e) = history.check_recovered(s, t, sec) {
                        bad = Some(e);
                        break 'read;
                    }
                }
            }
            if double_failure && bad.is_none() {
                // The recovered engine writes everything back (a clean stop);
                // the cache may be lost at any point of that.
                match rec.shutdown() {
                    Ok(()) => {
                        if let Err(e) = check_drain(&history, t, &dbg_b, &b.log(), &mut rng) {
                            report.violations.push(format!(
                                "G3 after a second failure {cfg:?} variant {variant}: {e}"
                            ));
                        }
                    }
                    Err(e) => report.violations.push(format!(
                        "the recovery drain failed at t={t} variant {variant}: {e}"
                    )),
                }
            } else {
                rec.abandon();
            }
            if let (Some(e), true) = (&bad, std::env::var_os("CRASH_DEBUG").is_some() && !debugged)
            {
                debugged = true;
                let s: u64 = e
                    .split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                eprintln!("DEBUG {e}\n{}", history.describe(s));
                eprintln!(
                    "  backend holds {:?} at sector {s}",
                    workload::decode(s, &read_sector(&dbg_b.0, &dbg_b.1, s))
                );
                for (name, log) in [("cache", cache.log()), ("backend", backend.log())] {
                    for st in log.iter().filter(|st| st.seq > start && st.seq <= t) {
                        let d = match &st.op {
                            DevOp::Write { off, data, durable } => {
                                format!(
                                    "write {off}+{}{}",
                                    data.len(),
                                    if *durable { " durable" } else { "" }
                                )
                            }
                            DevOp::Flush => "flush".to_string(),
                            DevOp::Discard { off, len } => format!("discard {off}+{len}"),
                            DevOp::Zero { off, len } => format!("zero {off}+{len}"),
                        };
                        eprintln!("  {name} seq {} {d}", st.seq);
                    }
                }
                let sub = tracing_subscriber::fmt()
                    .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
                    .with_writer(std::io::stderr)
                    .finish();
                tracing::subscriber::with_default(sub, || {
                    let b = Arc::new(Overlay::new(
                        dbg_b.0.clone(),
                        dbg_b.1.clone(),
                        backend.identity(),
                    ));
                    let c = Arc::new(Overlay::new(
                        dbg_c.0.clone(),
                        dbg_c.1.clone(),
                        cache.identity(),
                    ));
                    if let Ok(e) = Engine::open(b, Some(c as Arc<dyn BlockIo>), ecfg.clone()) {
                        e.abandon();
                    }
                });
            }
            if let Some(e) = bad {
                report.violations.push(format!(
                    "G1/G2 {:?} seed {} variant {variant}: {e}",
                    cfg.mode, cfg.seed
                ));
            }
        }
    }
    engine.forget_crash_shadow();
    report
}

/// A double failure: a power cut at `t`, recovery, and then the cache device
/// is lost while the recovered engine writes its dirty data back. Ordered
/// write-back promises that the backend alone is still the disk at one of the
/// guest's FLUSH points (plus some writes of the next epoch) whenever that
/// happens: at every backend flush of the drain (`drain` is what reached the
/// backend, replayed over its crash image `base`), at a random subset (torn at
/// 512 bytes) of the writes between two such flushes, and at the end.
fn check_drain(
    history: &History,
    t: u64,
    base: &(Arc<Vec<u8>>, Delta),
    drain: &[Stamped],
    rng: &mut Rng,
) -> Result<(), String> {
    let mut img = (*base.0).clone();
    for (s, sec) in &base.1 {
        img[(*s * SECTOR) as usize..((*s + 1) * SECTOR) as usize].copy_from_slice(&sec[..]);
    }
    let check = |img: &[u8], at: &str| {
        history
            .check_backend_consistent(t, |s| {
                img[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec()
            })
            .map_err(|e| format!("{at} of the recovery drain: {e}"))
    };
    let mut pending: Vec<&DevOp> = Vec::new();
    let mut flushes = 0;
    for op in drain.iter().map(|s| &s.op) {
        if !matches!(op, DevOp::Flush) {
            pending.push(op);
            continue;
        }
        flushes += 1;
        let mut torn = img.clone();
        for op in &pending {
            if matches!(op, DevOp::Write { durable: true, .. }) || rng.chance(60) {
                apply_torn(&mut torn, op, rng);
            }
        }
        check(
            &torn,
            &format!("before backend flush {flushes} (some writes lost)"),
        )?;
        for op in pending.drain(..) {
            apply(&mut img, op);
        }
        check(&img, &format!("at backend flush {flushes}"))?;
    }
    for op in pending.drain(..) {
        apply(&mut img, op);
    }
    check(&img, "at the end")
}

/// `apply`, with each 512-byte sector of a multi-sector write kept or lost
/// (a durable write arrived whole).
fn apply_torn(img: &mut [u8], op: &DevOp, rng: &mut Rng) {
    match op {
        DevOp::Write {
            off,
            data,
            durable: false,
        } if data.len() as u64 > SECTOR => {
            for (k, sec) in data.chunks(SECTOR as usize).enumerate() {
                if rng.chance(75) {
                    let at = *off as usize + k * SECTOR as usize;
                    img[at..at + sec.len()].copy_from_slice(sec);
                }
            }
        }
        _ => apply(img, op),
    }
}
