//! The background flusher: writes dirty lines back to the backend, oldest epoch
//! first, in steps; each step is followed by one backend flush before its lines
//! count as clean. A backend that fails is retried with backoff; dirty data is
//! never dropped.
//!
//! A step is a pipeline: the step's dirty sectors, sorted by backend offset, are
//! merged into extents of up to 4 MiB across adjacent lines, and up to `WINDOW`
//! extents are in flight at once, each reading its pieces from the cache (under
//! the lines' locks, briefly) and then writing the backend. The flusher runs on a
//! thread and event loop of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbd_backend::aio::{DmaBuf, EventLoop};
use rbd_backend::WriteMode;
use tracing::{error, warn};

use super::slots::{Pin, FREE};
use super::sync::{join_all, run_window, wait_for, Piece};
use super::{bits, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineErrorKind, EngineResult};
use crate::format::FormatVersion;
use policies::dirty_control::Sample;
use policies::pacing::{READS_FIRST_WINDOW, READS_LINGER};
use policies::{BackendPriority, Regime, WritebackOrder};

/// Lines per step at most (one backend flush per step).
const STEP_LINES: usize = 4096;
/// Paced, a step holds about this long's worth of lines at the rate (at
/// least `MIN_PACED_STEP_LINES`): its lines become clean, and the
/// dirty-level controller sees progress, at its end, not a minute later.
const PACED_STEP: Duration = Duration::from_secs(1);
const MIN_PACED_STEP_LINES: usize = 16;
/// Largest backend write of a step.
const MAX_EXTENT: u64 = 4 << 20;
/// Backend writes in flight.
const WINDOW: usize = 32;
/// The first retry delay after a failure, doubled on every further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Format v2: how long a step's watermark waits for a guest round to carry
/// it before the flusher runs a round (a device flush) of its own, while the
/// guest made something durable within this time. Longer than a busy guest's
/// gap between FLUSHes, so that under load write-back costs the cache device
/// no flushes of its own; short enough that the last versions are freed
/// soon. A guest that flushes less often, and a drain, get no wait (and
/// write-back at full speed).
const RIDE_PATIENCE: Duration = Duration::from_millis(20);
/// Format v2: the flusher closes the open epoch itself (so that write-back
/// does not wait for a guest FLUSH forever) once it has held dirty data this
/// long.
/// Sooner would split a guest's epochs in two: twice the write-back steps,
/// backend flushes and watermark rounds for the same data.
const OPEN_EPOCH_MAX: Duration = Duration::from_millis(50);
/// Format v2: a bound on waiting for a round during the next step (the wait
/// ends with the step; this only keeps the deadline arithmetic finite).
const DURING_STEP: Duration = Duration::from_secs(3600);

/// The flusher's retry delay: doubles with every failure in a row (up to
/// `MAX_BACKOFF`), back to `FIRST_BACKOFF` after a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(FIRST_BACKOFF)
    }

    fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }

    fn delay(&self) -> Duration {
        self.0
    }

    /// Wait the delay (cut short by stop), then double it.
    async fn wait(&mut self, c: &Cache) {
        wait_for(&c.ev.flusher, self.0, || {
            c.st.stopping.load(Ordering::Acquire)
        })
        .await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}

/// Format v2: a step written back whose watermark may not be durable yet.
#[derive(Clone, Copy)]
struct Unconfirmed {
    /// Its watermark (`flushed` was raised to it).
    w: u64,
    /// The step's oldest epoch.
    oldest: u64,
}

/// What `next_step` found.
enum Step {
    Items(Vec<Item>),
    /// Nothing to write back now (only when asked not to wait for it).
    Idle,
    Stop,
}

/// One dirty line as the step found it.
#[derive(Clone, Copy)]
struct Item {
    tag: u64,
    slot: u32,
    gen: u32,
    epoch: u64,
    dirty: crate::format::entry::SectorBits,
}

/// Backend bytes `off..off+len`, made of pieces (slot, byte in line, len).
struct Extent {
    off: u64,
    len: u64,
    pieces: Vec<(usize, u32, u64, u64)>, // (item index, slot, in line, len)
}

impl Engine {
    pub(super) fn start_flusher(self: &Arc<Self>) -> EngineResult<()> {
        if self.cache.is_none() {
            return Ok(());
        }
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("ublk-cache-flusher".into())
            .spawn(move || match EventLoop::new() {
                Ok(lp) => {
                    if let Err(e) = lp.block_on(me.flusher_main()) {
                        error!("the flusher's event loop failed: {e}");
                    }
                }
                Err(e) => error!("the flusher cannot make its event loop: {e}"),
            })
            .map_err(|e| {
                EngineError::new(
                    EngineErrorKind::Config,
                    format!("cannot start the flusher thread: {e}"),
                )
            })?;
        *self.flusher.lock() = Some(h);
        Ok(())
    }

    pub(super) fn stop_flusher(&self) {
        if let Some(c) = self.cache.as_ref() {
            c.st.stopping.store(true, Ordering::Release);
            c.ev.flusher.notify(usize::MAX);
        }
        let h = self.flusher.lock().take();
        if let Some(h) = h {
            if h.join().is_err() {
                error!("the flusher thread panicked");
            }
        }
    }

    async fn flusher_main(&self) {
        let Some(c) = self.cache.as_ref() else { return };
        let mut backoff = Backoff::new();
        // Format v2: written back, but not yet under the durable watermark.
        let mut uncovered: Vec<Item> = Vec::new();
        // Format v2: the watermark the previous step raised, if it may not be
        // durable yet. It must be before the *next* step's backend writes
        // begin. Recovery writes back every epoch above the durable watermark
        // D again, oldest first. While the step after the previous one runs,
        // what lies above D on the backend is the previous step's epoch (whole
        // or, split over steps by STEP_LINES, in part) and what this step
        // writes of the next one; rewriting the older epoch returns the backend
        // to a state it had while this step ran (a flush point plus writes of
        // the next epoch), then the next epoch is rewritten too. With a third
        // step's epoch above D, rewriting the oldest would leave the newest's
        // data over a middle epoch missing its lines (no flush-point state).
        // So a step's watermark rides in a guest round during the step after it.
        let mut unconfirmed: Option<Unconfirmed> = None;
        // Set when making it durable failed after the next step was written
        // back: no further step until it is.
        let mut must_confirm = false;
        loop {
            if let (true, Some(u)) = (must_confirm, unconfirmed) {
                if c.st.stopping.load(Ordering::Acquire) {
                    // The lines stay dirty in the cache; recovery writes
                    // them back again.
                    return;
                }
                match self.confirm_watermark(u.w, Duration::ZERO, || false).await {
                    Ok(_) => {
                        backoff.reset();
                        must_confirm = false;
                        unconfirmed = None;
                        self.finish_clean(c, &mut uncovered, None).await;
                    }
                    Err(e) => {
                        warn!(
                            "the write-back watermark still cannot be made durable; retrying: {e}"
                        );
                        backoff.wait(c).await;
                        continue;
                    }
                }
            }
            // That step stays marked as being written until its watermark is
            // durable (a drain waits for its lines to be clean).
            let hold = unconfirmed.map(|u| u.oldest);
            let items = match self.next_step(c, hold, unconfirmed.is_none()).await {
                Step::Stop => {
                    if let Some(Unconfirmed { w, .. }) = unconfirmed {
                        // Nobody waits for a guest round any more (what
                        // could be merged stays as it is).
                        if self
                            .confirm_watermark(w, Duration::ZERO, || false)
                            .await
                            .is_ok()
                        {
                            let _ = self.clean_v2(c, &uncovered);
                        }
                    }
                    return;
                }
                Step::Idle => {
                    // No next step to overlap the watermark with: make it
                    // durable (riding a guest round that comes soon), unless a
                    // step can start meanwhile.
                    if let Some(Unconfirmed { w, .. }) = unconfirmed {
                        let patience = self.watermark_patience(None);
                        let step_ready = || self.step_ready(c);
                        match self.confirm_watermark(w, patience, step_ready).await {
                            Ok(true) => {
                                backoff.reset();
                                unconfirmed = None;
                            }
                            Ok(false) => continue,
                            Err(e) => {
                                warn!("write-back done, but its watermark could not be made durable; retrying: {e}");
                                backoff.wait(c).await;
                                continue;
                            }
                        }
                    }
                    self.finish_clean(c, &mut uncovered, None).await;
                    continue;
                }
                Step::Items(items) => items,
            };
            let step_began = Instant::now();
            let step_done = AtomicBool::new(false);
            let step = async {
                let r = self.write_back(c, &items).await;
                step_done.store(true, Ordering::Release);
                c.ev.flusher.notify(usize::MAX);
                r
            };
            let res = match unconfirmed {
                // While the step runs, the previous step's watermark rides in
                // the first round that comes, or goes at once in a round of its
                // own when someone waits (a write that needs space must not
                // wait for the whole step); what it covers is cleaned then.
                Some(Unconfirmed { w, .. }) => {
                    let confirm = async {
                        let r = self
                            .confirm_watermark(w, DURING_STEP, || step_done.load(Ordering::Acquire))
                            .await;
                        if matches!(r, Ok(true)) {
                            let writing = items.iter().map(|it| it.epoch).min();
                            self.finish_clean(c, &mut uncovered, writing).await;
                        }
                        r
                    };
                    let (res, confirmed) = futures_lite::future::zip(step, confirm).await;
                    // A failed round is seen again below, and retried.
                    if matches!(confirmed, Ok(true)) {
                        unconfirmed = None;
                    }
                    res
                }
                None => step.await,
            };
            match res {
                Ok(bytes) => {
                    backoff.reset();
                    self.note_writeback_progress();
                    if self.writeback_failing.swap(false, Ordering::AcqRel) {
                        self.warned_ordering.store(false, Ordering::Release);
                        tracing::info!("write-back works again");
                    }
                    Stats::add(&self.stats.writeback_bytes, bytes);
                    Stats::add(&self.stats.backend_write_bytes, bytes);
                    if c.st.version == FormatVersion::V2 {
                        // Every epoch up to the step's newest is on the
                        // backend, unless lines of one stayed pending (a step
                        // holds at most STEP_LINES lines).
                        let step_max = items.iter().map(|it| it.epoch).max().unwrap_or(0);
                        let w = match c.st.epochs.lock().oldest_pending() {
                            Some(p) if p <= step_max => p.saturating_sub(1),
                            _ => step_max,
                        };
                        // Raised first: a round from now on carries this
                        // step's watermark and the previous one's.
                        c.st.flushed.fetch_max(w, Ordering::AcqRel);
                        let oldest = items.iter().map(|it| it.epoch).min().unwrap_or(w);
                        uncovered.extend_from_slice(&items);
                        if let Some(prev) = unconfirmed {
                            // The previous step's watermark, before the next
                            // step (see `unconfirmed`); a guest round during
                            // this step has usually carried it already.
                            let patience = self.watermark_patience(Some(step_began.elapsed()));
                            let res = self.confirm_watermark(prev.w, patience, || false);
                            if let Err(e) = res.await {
                                warn!("write-back done, but its watermark could not be made durable; retrying: {e}");
                                // This step is on the backend and its watermark
                                // is raised: it is not written again (a retry
                                // would run while a round that carries its
                                // watermark cleans its lines). Both wait for a
                                // round that succeeds, before any other step.
                                unconfirmed = Some(Unconfirmed {
                                    w,
                                    oldest: prev.oldest.min(oldest),
                                });
                                must_confirm = true;
                                c.st.epochs.lock().writing = unconfirmed.map(|u| u.oldest);
                                backoff.wait(c).await;
                                continue;
                            }
                        }
                        unconfirmed = (c.st.flushed_durable.load(Ordering::Acquire) < w)
                            .then_some(Unconfirmed { w, oldest });
                        self.finish_clean(c, &mut uncovered, unconfirmed.map(|u| u.oldest))
                            .await;
                    } else {
                        self.mark_clean(c, &items);
                        c.st.epochs.lock().writing = None;
                        c.ev.progress.notify(usize::MAX);
                        c.ev.space.notify(usize::MAX);
                    }
                }
                Err(e) => {
                    Stats::add(&self.stats.writeback_retries, 1);
                    self.writeback_failing.store(true, Ordering::Release);
                    warn!(
                        "write-back of {} lines failed, data stays dirty in the cache; retrying in {:?}: {e}",
                        items.len(),
                        backoff.delay()
                    );
                    self.requeue(c, &items, unconfirmed.map(|u| u.oldest));
                    if c.st.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    backoff.wait(c).await;
                }
            }
        }
    }

    /// Format v2: clean what the durable watermark covers now, merge versions,
    /// and tell the waiters; the rest stays `uncovered`. `writing`: the oldest
    /// epoch of the steps still being written or waiting for their watermark
    /// (a drain waits for them).
    async fn finish_clean(&self, c: &Cache, uncovered: &mut Vec<Item>, writing: Option<u64>) {
        let merge;
        (*uncovered, merge) = self.clean_v2(c, uncovered);
        self.carry_up(c, &merge).await;
        c.st.epochs.lock().writing = writing;
        c.ev.progress.notify(usize::MAX);
        c.ev.space.notify(usize::MAX);
    }

    /// Make watermark `w` (raised already) durable, riding a guest round within `patience` (see
    /// `persist_watermark`). `Ok(false)`: `interrupt` said to stop waiting
    /// first, and nothing was done.
    async fn confirm_watermark(
        &self,
        w: u64,
        patience: Duration,
        interrupt: impl Fn() -> bool,
    ) -> EngineResult<bool> {
        match self.persist_watermark(w, patience, interrupt).await? {
            None => Ok(false),
            Some(rode) => {
                let n = if rode {
                    &self.stats.watermark_shared_rounds
                } else {
                    &self.stats.watermark_own_rounds
                };
                Stats::add(n, 1);
                Ok(true)
            }
        }
    }

    /// The deliberate bug the crash harness must catch
    /// (`reverse_writeback_for_tests`); never in a package.
    fn reverse_writeback(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.reverse_writeback_for_tests.load(Ordering::Relaxed);
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Whether the flusher could take a step now.
    fn step_ready(&self, c: &Cache) -> bool {
        self.writeback_active(c) && c.st.epochs.lock().has_closed_pending()
    }

    /// Whether a drain is asked for (stop, `ctl flush`, a mode switch,
    /// migration): write-back then goes unpaced and in whole extents.
    fn drain_asked(c: &Cache) -> bool {
        c.st.drain_requests.load(Ordering::Acquire) > 0 || c.st.stopping.load(Ordering::Acquire)
    }

    /// Whether write-back runs now: all the time in `back`, in the other
    /// modes only while someone drains.
    fn writeback_active(&self, c: &Cache) -> bool {
        self.mode().writes_back_continuously() || c.st.drain_requests.load(Ordering::Acquire) > 0
    }

    /// How long a step's watermark may wait for a guest round: `RIDE_PATIENCE`
    /// while the guest makes data durable often enough that one comes within
    /// it; not at all when it does not, or when someone waits for write-back.
    /// With the next step ready (a backlog), at most as long as the last step
    /// took (`step_took`): waiting then costs the drain at most half its speed.
    fn watermark_patience(&self, step_took: Option<Duration>) -> Duration {
        if self.writeback_is_awaited() || self.since_guest_durability() > RIDE_PATIENCE {
            return Duration::ZERO;
        }
        let c = self.cache.as_ref().expect("the flusher runs with a cache");
        match step_took {
            Some(t) if self.step_ready(c) => RIDE_PATIENCE.min(t),
            _ => RIDE_PATIENCE,
        }
    }

    /// Format v2: which epochs the next step writes back. Only closed epochs
    /// with no write still being applied: their versions are frozen. When only
    /// the open epoch has dirty data, it is closed here (that only adds an
    /// ordering point) once it has held dirty data for `OPEN_EPOCH_MAX`, or at once
    /// when someone waits for write-back, so write-back never waits for a
    /// guest FLUSH for long. Ordered: the oldest closed epoch alone; relaxed:
    /// all of them, merged.
    fn v2_step_epochs(&self, e: &mut super::state::Epochs) -> Vec<u64> {
        let Some(oldest) = e.oldest_pending() else {
            return Vec::new();
        };
        if oldest >= e.cur {
            if e.opened.elapsed() < OPEN_EPOCH_MAX && !self.writeback_is_awaited() {
                return Vec::new();
            }
            e.open(oldest + 1);
        }
        let closed = |ep: u64, e: &super::state::Epochs| e.is_closed(ep);
        if self.reverse_writeback() {
            // The deliberate bug: newest closed epoch first.
            return e
                .pending
                .keys()
                .rev()
                .copied()
                .find(|&ep| closed(ep, e))
                .into_iter()
                .collect();
        }
        match self.order {
            WritebackOrder::Ordered => {
                if closed(oldest, e) {
                    vec![oldest]
                } else {
                    Vec::new()
                }
            }
            WritebackOrder::Relaxed => e
                .pending
                .keys()
                .copied()
                .take_while(|&ep| closed(ep, e))
                .collect(),
        }
    }

    /// Put items back into their epoch's pending list (a failed step).
    /// `hold`: the oldest epoch of a step whose watermark is not durable yet,
    /// which stays marked as being written.
    fn requeue(&self, c: &Cache, items: &[Item], hold: Option<u64>) {
        let mut e = c.st.epochs.lock();
        for it in items {
            e.pending.entry(it.epoch).or_default().push(it.slot);
        }
        e.writing = hold;
    }

    /// Take the next step: dirty lines of the epoch that may go next (of every
    /// closed epoch, in relaxed order). With nothing to take, waits for work
    /// when `block`, else returns `Idle`. `hold` as in `requeue`.
    async fn next_step(&self, c: &Cache, hold: Option<u64>, block: bool) -> Step {
        let st = &c.st;
        loop {
            if st.stopping.load(Ordering::Acquire) {
                return Step::Stop;
            }
            let active = self.writeback_active(c);
            // The rate for this step's size and its writes' (`write_back`).
            self.steer(c, Instant::now());
            let step_lines = self.step_lines(c);
            let mut candidates: Vec<(u64, u32)> = Vec::new();
            // Whether an epoch's list was taken: if all of it was stale, the
            // next epoch is looked at at once (an outage with frequent guest
            // FLUSHes leaves thousands of such lists behind).
            let mut took_epoch = false;
            if active {
                let mut e = st.epochs.lock();
                let epochs: Vec<u64> = if st.version == FormatVersion::V2 {
                    self.v2_step_epochs(&mut e)
                } else if self.reverse_writeback() {
                    e.pending.keys().next_back().copied().into_iter().collect()
                } else {
                    self.order
                        .next_epoch(e.oldest_pending(), e.oldest_applying())
                        .into_iter()
                        .collect()
                };
                for ep in epochs {
                    if let Some(v) = e.pending.remove(&ep) {
                        took_epoch = true;
                        candidates.extend(v.into_iter().map(|s| (ep, s)));
                        e.writing = Some(e.writing.map_or(ep, |w| w.min(ep)));
                    }
                }
            }
            // Drop stale entries (written back, rewritten later, freed) and
            // duplicates; take lines in backend order.
            let mut items: Vec<Item> = Vec::new();
            let mut later: Vec<(u64, u32)> = Vec::new();
            for (ep, slot) in candidates {
                let tag = st.slots.tag(slot);
                if tag == FREE {
                    continue;
                }
                let sh = st.map.shard(tag).read();
                let r = st.slots.get(slot);
                if r.tag != tag || !r.is_dirty() || r.epoch != ep {
                    continue;
                }
                if items.len() >= step_lines {
                    later.push((ep, slot));
                    continue;
                }
                items.push(Item {
                    tag,
                    slot,
                    gen: st.slots.gen(slot),
                    epoch: ep,
                    dirty: r.dirty,
                });
                drop(sh);
            }
            if !later.is_empty() {
                let mut e = st.epochs.lock();
                for (ep, s) in later {
                    e.pending.entry(ep).or_default().push(s);
                }
            }
            items.sort_by_key(|it| it.tag);
            items.dedup_by_key(|it| it.slot);
            if !items.is_empty() {
                return Step::Items(items);
            }
            st.epochs.lock().writing = hold;
            if took_epoch {
                continue;
            }
            if !block {
                return Step::Idle;
            }
            // Nothing to take now: idle is not stalled. Format v2: look again
            // when the open epoch, if it has dirty data, may be closed.
            self.note_writeback_progress();
            c.ev.progress.notify(usize::MAX);
            let idle = {
                let e = st.epochs.lock();
                match e.oldest_pending() {
                    Some(p) if active && st.version == FormatVersion::V2 && p >= e.cur => {
                        OPEN_EPOCH_MAX.saturating_sub(e.opened.elapsed())
                    }
                    _ => Duration::from_millis(200),
                }
            };
            wait_for(&c.ev.flusher, idle.max(Duration::from_millis(1)), || {
                st.stopping.load(Ordering::Acquire)
            })
            .await;
        }
    }

    /// Write a step's dirty sectors to the backend, then flush the backend.
    async fn write_back(&self, c: &Cache, items: &[Item]) -> EngineResult<u64> {
        let ls = c.layout.line_size as u64;
        let spl = c.layout.spl();
        // Several versions of one line in a step (relaxed order, v2): each
        // sector goes once, from its newest version.
        let mut dirty: Vec<crate::format::entry::SectorBits> =
            items.iter().map(|it| it.dirty).collect();
        let mut newest: std::collections::HashMap<u64, (u64, crate::format::entry::SectorBits)> =
            std::collections::HashMap::new();
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (items[i].tag, std::cmp::Reverse(items[i].epoch)));
        for i in order {
            let it = &items[i];
            let covered = newest.entry(it.tag).or_insert((it.epoch, bits::none()));
            dirty[i] = bits::and_not(&it.dirty, &covered.1);
            covered.1 = bits::or(&covered.1, &it.dirty);
        }
        // Paced, extents are planned one burst long at the rate (so that few
        // bytes wait in buffers); a write is cut again if the rate is lower
        // when it goes (`pace`). Drains go in whole extents.
        let max_extent = if Self::drain_asked(c) {
            MAX_EXTENT
        } else {
            self.pacer.lock().effective().max_write(MAX_EXTENT)
        };
        let mut extents: Vec<Extent> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            for (s, e, dirty) in bits::runs(&dirty[i], 0, spl) {
                if !dirty {
                    continue;
                }
                let (a, n) = (s as u64 * SECTOR, (e - s) as u64 * SECTOR);
                let off = it.tag * ls + a;
                match extents.last_mut() {
                    Some(x) if x.off + x.len == off && x.len + n <= max_extent => {
                        x.pieces.push((i, it.slot, a, n));
                        x.len += n;
                    }
                    _ => extents.push(Extent {
                        off,
                        len: n,
                        pieces: vec![(i, it.slot, a, n)],
                    }),
                }
            }
        }
        let bytes: u64 = extents.iter().map(|x| x.len).sum();
        let pieces = extents
            .iter()
            .map(|x| -> Piece<'_, EngineResult<()>> { Box::pin(self.write_extent(c, items, x)) });
        run_window(WINDOW, pieces).await.inspect_err(|e| {
            if e.kind() == EngineErrorKind::CacheIo {
                Stats::add(&self.stats.cache_errors, 1);
            }
        })?;
        // Extents of one step belong to one epoch (or, relaxed, to no order at
        // all), so their order does not matter; the flush ends the step.
        self.backend_flush().await?;
        Ok(bytes)
    }

    /// Wait until the write-back limit lets the next backend write go, and
    /// say how many of the `left` bytes it may carry: all of them unpaced (no
    /// limit, or a drain asked for: stop, `ctl flush`, a mode switch,
    /// migration, and the rest of a wait once one is asked for), else at most
    /// one burst's worth at the rate in effect when it is admitted
    /// (`WritebackLimit::max_write`). Sizing each write at its admission keeps
    /// every paced write short whatever the rate did since the step was
    /// planned (the controller changes it every quarter second): write-back
    /// finishes a write every fraction of a second, so a paced write-back never
    /// looks stalled (after 2 s of no progress, ordered overwrites stop
    /// waiting for it). The dirty-level controller, if any, lowers the byte
    /// rate while little is dirty (see `steer`).
    async fn pace(&self, c: &Cache, left: u64) -> u64 {
        let unpaced = || Self::drain_asked(c);
        let t0 = Instant::now();
        let mut waited = false;
        let n = loop {
            if unpaced() {
                break left;
            }
            let now = Instant::now();
            self.steer(c, now);
            let wait = {
                let mut p = self.pacer.lock();
                let limit = p.effective();
                if limit.is_unlimited() {
                    break left;
                }
                // Whole sectors, at least one (and never more than is left).
                let n = (limit.max_write(MAX_EXTENT) / SECTOR * SECTOR)
                    .max(SECTOR)
                    .min(left);
                match p.try_admit(now, n) {
                    Ok(()) => break n,
                    Err(wait) => {
                        // Only when the controller's rate is what holds this
                        // write back does more of it help (anti-windup).
                        if p.controller_binds(n) {
                            self.held_back.store(true, Ordering::Release);
                        }
                        wait
                    }
                }
            };
            waited = true;
            // Drains and new limits notify the flusher's event; the slice
            // bounds the check (and lets the controller look again).
            wait_for(&c.ev.flusher, wait.min(Duration::from_millis(100)), unpaced).await;
        };
        // Wall time held back: the part of this wait no other wait counted.
        let ms = |t: Instant| t.duration_since(self.born).as_millis() as u64;
        let (start, end) = (ms(t0), ms(Instant::now()));
        if waited {
            let before = self.paced_until_ms.fetch_max(end, Ordering::AcqRel);
            Stats::add(
                &self.stats.writeback_paced_ms,
                end.saturating_sub(start.max(before)),
            );
        }
        n
    }

    /// Wait for a turn at the backend for one write-back write: at once,
    /// unless the guest reads from the backend (a read is there, or one
    /// ended within `READS_LINGER`), no one waits for write-back and the
    /// cache is not at its high watermark; then write-back keeps
    /// `READS_FIRST_WINDOW` writes in flight. The turn ends when the returned
    /// guard drops.
    async fn writeback_slot<'a>(&'a self, c: &'a Cache) -> WritebackTurn<'a> {
        let reading = || {
            if self.guest_backend_reads.load(Ordering::Acquire) > 0 {
                return true;
            }
            let now = self.born.elapsed().as_micros() as u64;
            let end = self.guest_read_end_us.load(Ordering::Acquire);
            end > 0 && now.saturating_sub(end) < READS_LINGER.as_micros() as u64
        };
        let above_high = || {
            self.control
                .lock()
                .as_ref()
                .is_some_and(|ctl| ctl.decision().regime == Regime::AboveHigh)
        };
        let yields = || {
            self.backend_priority == BackendPriority::GuestReads
                && reading()
                && !self.writeback_is_awaited()
                && !above_high()
        };
        loop {
            let n = self.writeback_writes.load(Ordering::Acquire);
            if n < READS_FIRST_WINDOW || !yields() {
                if self
                    .writeback_writes
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return WritebackTurn { e: self, c };
                }
                continue;
            }
            // Woken, one waiter at a time, when a write-back write ends; the
            // guest's reads end unannounced, so look again after the linger.
            wait_for(&c.ev.backend_turn, READS_LINGER, || {
                self.writeback_writes.load(Ordering::Acquire) < READS_FIRST_WINDOW || !yields()
            })
            .await;
        }
    }

    /// How many lines the next step may take: `STEP_LINES`, or paced (and
    /// not draining) about `PACED_STEP`'s worth at the byte rate.
    fn step_lines(&self, c: &Cache) -> usize {
        match self.pacer.lock().effective().bytes_per_sec {
            Some(r) if !Self::drain_asked(c) => {
                let lines = r as f64 * PACED_STEP.as_secs_f64() / c.layout.line_size as f64;
                (lines as usize).clamp(MIN_PACED_STEP_LINES, STEP_LINES)
            }
            _ => STEP_LINES,
        }
    }

    /// Let the dirty-level controller (if configured) work out the pacer's
    /// byte rate again when an update is due, or at once when a guest write
    /// has begun waiting for room (it must not wait for the next update).
    fn steer(&self, c: &Cache, now: Instant) {
        let mut ctl = self.control.lock();
        let Some(ctl) = ctl.as_mut() else {
            return;
        };
        let guest_waits = c.st.space_waiters.load(Ordering::Acquire) > 0;
        let newly_waiting = guest_waits && ctl.decision().regime != Regime::GuestWaits;
        if !ctl.due(now) && !newly_waiting {
            return;
        }
        let ls = c.layout.line_size as u64;
        let d = ctl.update(
            now,
            Sample {
                dirty: c.st.dirty_lines() * ls,
                guest_writes: self.stats.write_bytes.load(Ordering::Relaxed),
                guest_waits,
                held_back: self.held_back.swap(false, Ordering::AcqRel),
            },
        );
        self.pacer.lock().set_controlled_rate(d.rate);
    }

    /// Read one extent's pieces from the cache (holding their lines' locks, so
    /// no overwrite of the same epoch interleaves with the read), then write it.
    async fn write_extent(&self, c: &Cache, items: &[Item], x: &Extent) -> EngineResult<()> {
        let st = &c.st;
        // Before any line lock: a paced wait must not hold up the guest. (And
        // no buffer is held while the first write waits.)
        let mut n = self.pace(c, x.len).await;
        let buf = DmaBuf::new(x.len as usize);
        {
            let mut guards = Vec::new();
            for &(i, _, _, _) in &x.pieces {
                let tag = items[i].tag;
                if guards
                    .last()
                    .is_none_or(|g: &super::map::LineGuard| g.tag() != tag)
                {
                    guards.push(st.map.lock(tag).await);
                }
            }
            // Where each piece's data is now. Normally in the planned version.
            // Relaxed order (or ordering given up) may have dropped that version
            // since the plan (superseded, see `State::drop_superseded`) or moved
            // it to a newer epoch in place: the line's newest data goes instead,
            // which such write-back may always write. Anything else (a slot
            // reused by another line or a later epoch) would write data this
            // step must not: the step fails and is planned again.
            let newest_allowed = st.version == FormatVersion::V2
                && (self.order == WritebackOrder::Relaxed
                    || st.order_broken_since.load(Ordering::Acquire) != 0);
            let mut sources: Vec<(u32, u64, u64)> = Vec::new(); // (slot, in line, len)
            let mut pins = Vec::new();
            for &(i, slot, a, n) in &x.pieces {
                let it = &items[i];
                let r = st.slots.get(slot);
                let planned =
                    r.tag == it.tag && (st.version == FormatVersion::V1 || r.epoch == it.epoch);
                if planned {
                    sources.push((slot, a, n));
                    continue;
                }
                let sh = st.map.shard(it.tag).read();
                let (s0, s1) = super::read::sectors(a, a + n);
                let runs = st.resolve(&sh, it.tag, s0, s1);
                if !newest_allowed || runs.iter().any(|r| r.2.is_none()) {
                    debug_assert!(newest_allowed, "slot {slot} changed under write-back");
                    return Err(EngineError::new(
                        EngineErrorKind::CacheIo,
                        format!(
                            "write-back: slot {slot} no longer holds the planned data of line {}; step planned again",
                            it.tag
                        ),
                    ));
                }
                for (rs, re, src) in runs {
                    let src = src.expect("checked above");
                    // A slot found under the shard lock stays this line's while
                    // pinned (a released slot is not handed out while pinned).
                    pins.push(Pin::new(&st.slots, src));
                    sources.push((src, rs as u64 * SECTOR, (re - rs) as u64 * SECTOR));
                }
            }
            let mut at = 0usize;
            let mut reads: Vec<Piece<'_, EngineResult<()>>> = Vec::new();
            for &(slot, a, n) in &sources {
                let d = buf.slice(at, n as usize);
                at += n as usize;
                reads.push(Box::pin(c.store.read_async(slot, a, d)));
            }
            for r in join_all(reads).await {
                r?;
            }
            drop(pins);
        }
        // One write, or, paced, several when the extent is longer than one
        // burst at the rate in effect as each goes (the rate fell since the
        // step was planned, or one line's dirty run alone is longer).
        let mut at = 0u64;
        loop {
            let turn = self.writeback_slot(c).await;
            let off = x.off + at;
            self.backend
                .write_async(off, buf.slice(at as usize, n as usize), WriteMode::Normal)
                .await
                .map_err(|e| {
                    Stats::add(&self.stats.backend_errors, 1);
                    EngineError::backend(&format!("write-back at {off}+{n}"), e)
                })?;
            drop(turn);
            // Progress within a step: a paced step can take longer than the
            // time after which a stalled write-back counts as an outage (and
            // ordered overwrites would give up waiting).
            self.note_writeback_progress();
            at += n;
            if at >= x.len {
                return Ok(());
            }
            n = self.pace(c, x.len - at).await;
        }
    }

    /// Format v2, after a step whose watermark is durable: versions it covers
    /// are clean. An older version whose every sector a newer version holds is
    /// stale and freed (the free entries and the watermark that makes them
    /// stale are on disk together). One that holds sectors no newer version
    /// holds (a 4 KiB rewrite of a 64 KiB line leaves 60 KiB only there) stays,
    /// clean, and `carry_up` merges the clean oldest end of the chain into the
    /// oldest slot, so that write-back does not cost the cache what it held.
    /// Freeing such a version would also have to free every version below it,
    /// whose copies of its sectors are stale (a line rewritten in three epochs
    /// before its write-back kept only its newest 4 KiB that way). Returns the
    /// items whose epoch the watermark does not cover yet (a step that left
    /// lines of its epoch pending; a later step cleans them) and the lines to
    /// merge.
    fn clean_v2(&self, c: &Cache, items: &[Item]) -> (Vec<Item>, Vec<u64>) {
        let st = &c.st;
        let w = st.flushed_durable.load(Ordering::Acquire);
        let uncovered: Vec<Item> = items.iter().filter(|it| it.epoch > w).cloned().collect();
        let mut tags: Vec<u64> = items
            .iter()
            .filter(|it| it.epoch <= w)
            .map(|it| it.tag)
            .collect();
        tags.sort_unstable();
        tags.dedup();
        let mut merge = Vec::new();
        for tag in tags {
            let mut sh = st.map.shard(tag).write();
            // Sectors the versions newer than this one hold. Every version
            // stays unless these cover it, so a sector always resolves to the
            // newest version holding it, as before.
            let mut newer = bits::none();
            for slot in st.chain(&sh, tag) {
                let r = st.slots.get(slot);
                let covered_before = newer;
                newer = bits::or(&newer, &r.valid);
                if r.epoch > w {
                    continue;
                }
                let is_head = sh.head(&st.slots, tag) == Some(slot);
                if is_head || !bits::is_empty(&bits::and_not(&r.valid, &covered_before)) {
                    // The head, or sectors only it holds: kept, clean.
                    if r.is_dirty() {
                        st.clean_silently(&mut sh, slot);
                    }
                } else {
                    st.remove_version(&mut sh, slot);
                }
            }
            if mergeable(st, &sh, tag, w).is_some() {
                merge.push(tag);
            }
        }
        // A full write-back makes the backend a flush-point state again. Not
        // while a write still goes in place over a closed version: its data
        // may be landing in a slot this step read; it registered, under the
        // epochs lock, after checking that ordering is given up, so clearing
        // the flags under that lock leaves no writer between the two.
        if st.order_broken_since.load(Ordering::Acquire) != 0 && st.dirty_lines() == 0 {
            let mut e = st.epochs.lock();
            if e.pending.is_empty() && e.over_closed_in_place == 0 {
                st.order_broken_durable.store(false, Ordering::Release);
                st.order_broken_since.store(0, Ordering::Release);
                e.order_changes += 1;
                drop(e);
                tracing::info!(
                    "write-back caught up: the backend alone is a flush-point state again"
                );
            }
        }
        (uncovered, merge)
    }

    /// Merge each line's clean versions into its oldest one (`clean_v2` kept
    /// the older ones for the sectors only they hold): the oldest end of the
    /// chain that is all clean (the whole chain, or what lies below versions
    /// not written back yet) becomes one version in the oldest slot, which
    /// takes each sector from the newest version of that run holding it; the
    /// other slots are freed. The copy is as large as the newer data (usually
    /// a few KiB), not the line. Safe at every point (see `merge_into_oldest`
    /// for the order of the frees): until the merged entry is recorded the
    /// newer versions shadow the sectors being overwritten; the
    /// merged data is clean (on the backend), and clean data is not trusted
    /// after a power cut anyway (see attach). When the line changed meanwhile
    /// nothing is done (a later step sees it again); when the copy fails, the
    /// oldest version is freed (its sectors only leave the cache).
    async fn carry_up(&self, c: &Cache, tags: &[u64]) {
        let st = &c.st;
        let spl = c.layout.spl();
        for &tag in tags {
            let _line = st.map.lock(tag).await;
            let w = st.flushed_durable.load(Ordering::Acquire);
            let found = {
                let sh = st.map.shard(tag).read();
                mergeable(st, &sh, tag, w).map(|m| {
                    let copies = newest_in_run(st, &m.run, spl);
                    // No slot of the run is handed out again while the copy runs.
                    let pins: Vec<Pin<'_>> =
                        m.run.iter().map(|&v| Pin::new(&st.slots, v)).collect();
                    (m, copies, pins)
                })
            };
            let Some((m, copies, _pins)) = found else {
                continue;
            };
            let oldest = *m.run.last().expect("a run has two versions or more");
            let copied = self.copy_runs(c, oldest, &copies).await;
            let mut sh = st.map.shard(tag).write();
            let still = mergeable(st, &sh, tag, w).as_ref() == Some(&m);
            match copied {
                Ok(crcs) if still => {
                    st.merge_into_oldest(&mut sh, tag, &m.run, m.above, &crcs);
                    Stats::add(&self.stats.versions_merged, (m.run.len() - 1) as u64);
                }
                Ok(_) => {}
                Err(e) => {
                    Stats::add(&self.stats.cache_errors, 1);
                    warn!(
                        "merging the versions of line {tag} after write-back failed; its older data leaves the cache: {e}"
                    );
                    if still {
                        st.remove_version(&mut sh, oldest);
                    }
                }
            }
        }
    }

    /// Copy each run `(start, end, from)` of sectors into slot `to` (same
    /// offsets in the line). Returns the crc32c of every sector copied.
    async fn copy_runs(
        &self,
        c: &Cache,
        to: u32,
        runs: &[(u32, u32, u32)],
    ) -> EngineResult<Vec<(u16, u32)>> {
        let mut crcs = Vec::new();
        for &(s, e, from) in runs {
            let (a, n) = (s as u64 * SECTOR, (e - s) as u64 * SECTOR);
            let buf = DmaBuf::new(n as usize);
            c.store.read_async(from, a, buf.slice_all()).await?;
            crcs.extend(super::write::sector_crcs(
                buf.bytes().expect("read finished"),
                a,
            ));
            c.store
                .write_async(to, a, buf.slice_all(), WriteMode::Normal)
                .await?;
        }
        Ok(crcs)
    }

    /// After a successful step: lines still holding what was written back are
    /// clean now (on disk at the next persist).
    fn mark_clean(&self, c: &Cache, items: &[Item]) {
        let st = &c.st;
        let mut requeue = Vec::new();
        for it in items {
            let mut sh = st.map.shard(it.tag).write();
            let r = st.slots.get(it.slot);
            if r.tag != it.tag {
                continue;
            }
            if st.slots.gen(it.slot) == it.gen && r.epoch == it.epoch {
                let new = super::slots::Rec {
                    dirty: bits::none(),
                    ..r
                };
                st.set_rec_cleaned(&mut sh, it.slot, new);
            } else if r.is_dirty() && r.epoch == it.epoch {
                // Rewritten in the same epoch meanwhile: it stays pending.
                requeue.push((it.epoch, it.slot));
            }
        }
        if !requeue.is_empty() {
            let mut e = st.epochs.lock();
            for (ep, s) in requeue {
                e.pending.entry(ep).or_default().push(s);
            }
        }
    }
}

/// What `carry_up` merges in one line: `run`, the oldest end of its chain
/// (newest first, two versions or more) whose versions are all clean under the
/// watermark, and `above`, the version just newer than the run, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mergeable {
    run: Vec<u32>,
    above: Option<u32>,
}

/// The clean run at the oldest end of `tag`'s chain under the watermark `w`,
/// when it has two versions or more. The caller holds its shard lock.
fn mergeable(
    st: &super::state::State,
    sh: &super::map::Shard,
    tag: u64,
    w: u64,
) -> Option<Mergeable> {
    let chain = st.chain(sh, tag);
    let clean = |v: &u32| {
        let r = st.slots.get(*v);
        r.epoch <= w && !r.is_dirty()
    };
    let n = chain.iter().rev().take_while(|v| clean(v)).count();
    (n >= 2).then(|| {
        let first = chain.len() - n;
        Mergeable {
            run: chain[first..].to_vec(),
            above: first.checked_sub(1).map(|i| chain[i]),
        }
    })
}

/// The sectors a merge copies into the run's oldest slot: runs `(start, end,
/// from)` where the newest version of `run` holding a sector is not the oldest.
/// The caller holds the line's shard lock.
fn newest_in_run(st: &super::state::State, run: &[u32], spl: u32) -> Vec<(u32, u32, u32)> {
    let Some(&oldest) = run.last() else {
        return Vec::new();
    };
    let valids: Vec<_> = run.iter().map(|&v| st.slots.valid(v)).collect();
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for s in 0..spl {
        let Some(from) = run
            .iter()
            .zip(&valids)
            .find(|(_, v)| bits::test(v, s))
            .map(|(&slot, _)| slot)
            .filter(|&slot| slot != oldest)
        else {
            continue;
        };
        match out.last_mut() {
            Some(r) if r.2 == from && r.1 == s => r.1 = s + 1,
            _ => out.push((s, s + 1, from)),
        }
    }
    out
}

/// One write-back write's turn at the backend (see `Engine::writeback_slot`).
struct WritebackTurn<'a> {
    e: &'a Engine,
    c: &'a Cache,
}

impl Drop for WritebackTurn<'_> {
    fn drop(&mut self) {
        self.e.writeback_writes.fetch_sub(1, Ordering::AcqRel);
        self.c.ev.backend_turn.notify(1);
    }
}
