//! Boot prefetch: the replay set fetched in trace order, in runs of
//! adjacent lines, several at once, each once the guest is near enough.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

use super::IDLE_POLL;
use crate::boot_trace::BootReplay;
use crate::daemon::stop::StopToken;
use crate::engine::PreloadOptions;
use crate::Engine;

/// Backend reads boot prefetch has in flight at once. A boot's reads are
/// scattered: one at a time, a backend's latency would let the guest
/// overtake prefetch. `--preload-rate` still bounds the bytes per second.
const PREFETCH_DEPTH: usize = 8;
/// One read covers the adjacent lines of an extent up to this many bytes
/// (a backend's cost is mostly per request: one RADOS object op, one 5 ms
/// seek, for a line or for 16).
const PREFETCH_RUN_BYTES: u64 = 1 << 20;

/// The replay set in trace order as runs of adjacent lines of one extent:
/// (extent, offset, length).
fn runs_in_order(r: &BootReplay) -> Vec<(usize, u64, u64)> {
    let ls = r.line_size();
    let run = (PREFETCH_RUN_BYTES / ls).max(1) * ls;
    let mut out = Vec::new();
    for (i, e) in r.extents().iter().enumerate() {
        let (mut at, end) = (e.offset(), e.offset() + e.len());
        while at < end {
            // A run from a line's start (extents start at one).
            let n = ((at / ls) * ls + run).min(end) - at;
            out.push((i, at, n));
            at += n;
        }
    }
    out
}

/// One boot prefetch: what its workers share.
struct Prefetch<'a> {
    engine: &'a Engine,
    r: &'a BootReplay,
    stop: &'a StopToken,
    /// `--preload-rate` (bytes/s), and when the next run may start: each run
    /// books its length at the rate before it is read, and gets back what it
    /// found cached. So no worker starts a run beyond the rate, and no credit
    /// builds up while prefetch waits for the guest.
    pace: Option<(u64, Mutex<Instant>)>,
    limit: Duration,
    started: Instant,
    runs: Vec<(usize, u64, u64)>,
    /// The next entry of `runs` a worker takes.
    next: AtomicUsize,
    /// Per extent: its runs not done yet.
    left: Vec<AtomicUsize>,
    failed: AtomicU64,
}

impl Prefetch<'_> {
    fn over(&self) -> bool {
        self.started.elapsed() > self.limit
    }

    /// Take runs in trace order, each once its extent is due, until none
    /// are left, the limit passes or a stop.
    fn work(&self) {
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(i, at, n)) = self.runs.get(k) else {
                return;
            };
            // Soon after the guest's read that makes it due.
            let due = self
                .stop
                .wait_until(Duration::from_millis(10), || self.r.due(i) || self.over());
            if !due || self.over() {
                return;
            }
            if k == 0 || self.runs[k - 1].0 != i {
                self.r.starting(i);
            }
            if let Some((rate, next)) = &self.pace {
                let at = {
                    let mut next = next.lock();
                    let at = (*next).max(Instant::now());
                    *next = at + Duration::from_secs_f64(n as f64 / *rate as f64);
                    at
                };
                // A stop ends the wait.
                if !self
                    .stop
                    .wait_until(Duration::from_millis(10), || Instant::now() >= at)
                {
                    return;
                }
            }
            if self.stop.requested().is_some() {
                return;
            }
            let ls = self.r.line_size();
            let lines = at / ls..(at + n).div_ceil(ls);
            for l in lines.clone() {
                self.r.fetching(l);
            }
            let fetched = match self.engine.prefetch_lines(at, n) {
                Ok(v) => v,
                Err(err) => {
                    if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!(
                            "boot prefetch of {at}+{n} failed (skipped; later failures counted): {err}"
                        );
                    }
                    Vec::new()
                }
            };
            for (j, l) in lines.enumerate() {
                self.r.fetched(l, fetched.get(j).copied().unwrap_or(0));
            }
            if let Some((rate, next)) = &self.pace {
                // What was cached already cost the backend nothing.
                let unread = n.saturating_sub(fetched.iter().sum());
                let back = Duration::from_secs_f64(unread as f64 / *rate as f64);
                let mut next = next.lock();
                *next = next.checked_sub(back).unwrap_or(*next).max(Instant::now());
            }
            if self.left[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                let e = self.r.extents()[i];
                tracing::debug!(
                    extent = i,
                    offset = e.offset(),
                    len = e.len(),
                    "boot prefetch: extent done"
                );
            }
        }
    }
}

/// Fetch the replay set in trace order, each run of lines once its extent
/// is due (within the lead of the guest), `PREFETCH_DEPTH` runs at a time,
/// until all are fetched, `limit` passes or a stop. A backend error skips
/// the run: the guest never sees it. Returns whether the replay ran its course
/// (its boot is over, not cut short by a stop): only such a replay says how
/// good its trace is.
pub(super) fn prefetch(
    engine: &Engine,
    r: &BootReplay,
    stop: &StopToken,
    opts: PreloadOptions,
    limit: Duration,
) -> bool {
    let runs = runs_in_order(r);
    let mut left: Vec<AtomicUsize> = r.extents().iter().map(|_| AtomicUsize::new(0)).collect();
    for &(i, _, _) in &runs {
        *left[i].get_mut() += 1;
    }
    let p = Prefetch {
        engine,
        r,
        stop,
        pace: opts
            .rate
            .filter(|&r| r > 0)
            .map(|r| (r, Mutex::new(Instant::now()))),
        limit,
        started: Instant::now(),
        runs,
        next: AtomicUsize::new(0),
        left,
        failed: AtomicU64::new(0),
    };
    std::thread::scope(|s| {
        let mut workers = 0;
        for n in 1..PREFETCH_DEPTH.min(p.runs.len()) {
            match std::thread::Builder::new()
                .name(format!("boot-prefetch-{n}"))
                .spawn_scoped(s, || p.work())
            {
                Ok(_) => workers += 1,
                Err(e) => {
                    warn!("boot prefetch: {workers} more reads at once, not more: {e}");
                    break;
                }
            }
        }
        // This thread is one of them.
        p.work();
    });
    let rep = r.report();
    info!(
        fetched_lines = rep.fetched_lines,
        fetched_bytes = rep.fetched_bytes,
        failed = p.failed.load(Ordering::Relaxed),
        elapsed_ms = p.started.elapsed().as_millis() as u64,
        "boot prefetch finished"
    );
    // Guest reads count for the report until the boot is over.
    let over = stop.wait_until(IDLE_POLL, || p.over());
    r.finish();
    over
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_reads_an_extent_in_runs_of_up_to_1_mib_in_trace_order() {
        use crate::boot_trace::Extent;
        const LS: u64 = 65536;
        let ext = |line: u64, lines: u32, t_ms: u32| Extent {
            sector: line * LS / 512,
            sectors: lines * (LS / 512) as u32,
            t_ms,
            seen: 1,
            flags: 0,
        };
        let r = BootReplay::new(
            vec![ext(100, 3, 0), ext(0, 40, 5)],
            LS,
            Duration::from_secs(1),
        );
        let mib = 1 << 20;
        assert_eq!(
            runs_in_order(&r),
            [
                (0, 100 * LS, 3 * LS),
                (1, 0, mib),
                (1, mib, mib),
                (1, 2 * mib, 8 * LS)
            ]
        );
        let two = Extent {
            sectors: (8 * mib / 512) as u32,
            ..ext(0, 0, 0)
        };
        let big = BootReplay::new(vec![two], 4 * mib, Duration::from_secs(1));
        assert_eq!(
            runs_in_order(&big),
            [(0, 0, 4 * mib), (0, 4 * mib, 4 * mib)],
            "a run is a line at least"
        );
    }
}
