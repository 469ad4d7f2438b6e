//! The read path: hits straight from the cache device, misses from the backend
//! in as few reads as the request allows, and the promotion of what was fetched
//! after the guest has its data.
//!
//! A hit takes its line's shard lock shared for the lookup, pins the slot (it is
//! not reused while the read runs) and reads the cache device on the calling
//! loop's ring. Misses of a request are coalesced across lines into one backend
//! read per contiguous run; the run's line locks are held from the fetch until
//! the promotion has written the cache, so a concurrent reader of the same line
//! waits for this fetch instead of fetching again. The promotion runs as its own
//! task: the guest's request completes as soon as its data has arrived.

use rbd_backend::aio::{self, BufSlice, DmaBuf};
use rbd_backend::WriteMode;
use tracing::warn;

use super::map::LineGuard;
use super::slots::Pin;
use super::state::Allocation;
use super::sync::{join_all, Piece};
use super::{bits, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineResult};

/// Sector range `s0..s1` touched by bytes `a..b` of a line.
pub(super) fn sectors(a: u64, b: u64) -> (u32, u32) {
    ((a / SECTOR) as u32, b.div_ceil(SECTOR) as u32)
}

/// One step of a read plan.
enum Step<'a> {
    /// Cached bytes from `in_line` of `slot` on, for `dst`; past the line's end
    /// they continue in the slots after it (one read for a run of lines that
    /// lie side by side on the cache device, as a sequential fill leaves them).
    Hit {
        slot: u32,
        in_line: u64,
        dst: BufSlice,
        _pin: Pin<'a>,
        /// The pins of the slots after `slot` that the read runs into.
        more_pins: Vec<Pin<'a>>,
    },
    /// Backend bytes `lo..hi` (contiguous), for `dst`.
    Miss { lo: u64, hi: u64, dst: BufSlice },
}

/// Who a fetch is for (whose counters it moves).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    Guest,
    Preload,
}

impl Engine {
    pub(super) fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref().filter(|_| self.mode().uses_cache())
    }

    pub(super) async fn backend_read(&self, offset: u64, dst: BufSlice) -> EngineResult<()> {
        let len = dst.len();
        Stats::add(&self.stats.backend_read_bytes, len as u64);
        self.backend.read_async(offset, dst).await.map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend(&format!("read at {offset}+{len}"), e)
        })
    }

    /// A backend read for the guest (a miss): counted while at the backend,
    /// so that write-back makes way for it (`Engine::writeback_slot`).
    pub(super) async fn guest_backend_read(&self, offset: u64, dst: BufSlice) -> EngineResult<()> {
        let _at_backend = GuestBackendRead::new(self);
        self.backend_read(offset, dst).await
    }

    pub(super) async fn read_impl(&self, offset: u64, dst: BufSlice) -> EngineResult<()> {
        let Some(c) = self.cache() else {
            Stats::add(&self.stats.read_misses, 1);
            return self.backend_read(offset, dst).await;
        };
        if let Some((slot, in_line, pin)) = self.whole_hit(c, offset, dst.len()) {
            let n = dst.len() as u64;
            c.store
                .read_async(slot, in_line, dst)
                .await
                .inspect_err(|_| Stats::add(&self.stats.cache_errors, 1))?;
            drop(pin);
            let s = &self.stats;
            Stats::add(&s.read_hit_bytes, n);
            Stats::classify(&s.read_hits, &s.read_misses, &s.read_partial, n, 0);
            return Ok(());
        }
        let steps = self.plan(c, offset, &dst);
        let (hit, miss) = self.run_plan(c, steps, Reader::Guest).await?;
        let s = &self.stats;
        Stats::classify(&s.read_hits, &s.read_misses, &s.read_partial, hit, miss);
        Ok(())
    }

    /// The common hit, served without a plan: a request inside one line whose
    /// newest version holds every sector of it. Returns the slot, the offset in
    /// the line and the slot's pin (taken under the shard lock, as `plan` does),
    /// or None for everything else (misses, partial hits, older versions,
    /// requests across lines), which `plan` handles. Allocates nothing.
    fn whole_hit<'a>(&self, c: &'a Cache, offset: u64, len: usize) -> Option<(u32, u64, Pin<'a>)> {
        let ls = c.layout.line_size as u64;
        let tag = offset / ls;
        if len == 0 || (offset + len as u64 - 1) / ls != tag {
            return None;
        }
        let a = offset - tag * ls;
        let (s0, s1) = sectors(a, a + len as u64);
        let st = &c.st;
        let sh = st.map.shard(tag).read();
        let slot = sh.head(&st.slots, tag)?;
        if !bits::is_empty(&bits::and_not(&bits::range(s0, s1), &st.slots.valid(slot))) {
            return None;
        }
        let pin = Pin::new(&st.slots, slot);
        st.hit(slot);
        Some((slot, a, pin))
    }

    /// Which bytes of `[offset, offset+dst.len())` come from which slot, and
    /// which from the backend (adjacent misses merged).
    fn plan<'a>(&self, c: &'a Cache, offset: u64, dst: &BufSlice) -> Vec<Step<'a>> {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let mut steps: Vec<Step<'a>> = Vec::new();
        let mut done = 0u64;
        for (tag, a, n) in self.split(offset, dst.len() as u64) {
            let b = a + n;
            let (s0, s1) = sectors(a, b);
            let sh = st.map.shard(tag).read();
            let runs = st.resolve(&sh, tag, s0, s1);
            let mut any_hit = false;
            for (rs, re, src) in runs {
                let ra = a.max(rs as u64 * SECTOR);
                let rb = b.min(re as u64 * SECTOR);
                let d = dst.sub((done + ra - a) as usize, (rb - ra) as usize);
                match src {
                    Some(slot) => {
                        any_hit = true;
                        let pin = Pin::new(&st.slots, slot);
                        if let Some(Step::Hit {
                            slot: first,
                            in_line,
                            dst: pd,
                            more_pins,
                            ..
                        }) = steps.last_mut()
                        {
                            // The previous line's hit reaches its line's end,
                            // in the slot just before this one: read on. Only
                            // whole 4 KiB sectors, in offset and memory: an
                            // unaligned piece takes the cache device's bounce
                            // path, which should stay as small as it is alone.
                            let lines = 1 + more_pins.len() as u64;
                            if ra == 0
                                && *first as u64 + lines == slot as u64
                                && *in_line + pd.len() as u64 == lines * ls
                                && in_line.is_multiple_of(SECTOR)
                                && (pd.offset() as u64).is_multiple_of(SECTOR)
                                && (d.len() as u64).is_multiple_of(SECTOR)
                            {
                                *pd = pd.buf().slice(pd.offset(), pd.len() + d.len());
                                more_pins.push(pin);
                                continue;
                            }
                        }
                        steps.push(Step::Hit {
                            slot,
                            in_line: ra,
                            dst: d,
                            _pin: pin,
                            more_pins: Vec::new(),
                        })
                    }
                    None => {
                        let (lo, hi) = (tag * ls + ra, tag * ls + rb);
                        match steps.last_mut() {
                            Some(Step::Miss { hi: h, dst: pd, .. }) if *h == lo => {
                                // Contiguous on the backend and in the request.
                                *h = hi;
                                *pd = pd.buf().slice(pd.offset(), pd.len() + d.len());
                            }
                            _ => steps.push(Step::Miss { lo, hi, dst: d }),
                        }
                    }
                }
            }
            if let Some(h) = sh.head(&st.slots, tag).filter(|_| any_hit) {
                st.hit(h);
            }
            drop(sh);
            done += n;
        }
        steps
    }

    /// Run a plan's steps concurrently. Returns (hit bytes, miss bytes).
    async fn run_plan(
        &self,
        c: &Cache,
        steps: Vec<Step<'_>>,
        who: Reader,
    ) -> EngineResult<(u64, u64)> {
        let pieces: Vec<Piece<'_, EngineResult<(u64, u64)>>> = steps
            .into_iter()
            .map(|s| -> Piece<'_, EngineResult<(u64, u64)>> {
                match s {
                    Step::Hit {
                        slot,
                        in_line,
                        dst,
                        _pin,
                        more_pins,
                    } => Box::pin(async move {
                        let n = dst.len() as u64;
                        c.store
                            .read_lines_async(slot, in_line, dst)
                            .await
                            .inspect_err(|_| {
                                Stats::add(&self.stats.cache_errors, 1);
                            })?;
                        drop((_pin, more_pins));
                        if who == Reader::Guest {
                            Stats::add(&self.stats.read_hit_bytes, n);
                        }
                        Ok((n, 0))
                    }),
                    Step::Miss { lo, hi, dst } => Box::pin(self.fetch(c, lo, hi, dst, who, None)),
                }
            })
            .collect();
        if pieces.is_empty() {
            return Ok((0, 0));
        }
        let mut hit = 0;
        let mut miss = 0;
        let mut first_err = None;
        for r in join_all(pieces).await {
            match r {
                Ok((h, m)) => {
                    hit += h;
                    miss += m;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((hit, miss)),
        }
    }

    /// Backend bytes `lo..hi`, which were not cached when planned, into `dst`:
    /// under the lines' locks, what has become cached meanwhile is read from the
    /// cache, the rest from the backend in one read per contiguous run of whole
    /// 4 KiB sectors, which is then promoted. Returns (hit, miss) bytes, and
    /// adds each line's miss bytes to `per_line` (from `lo`'s line on) if given.
    async fn fetch(
        &self,
        c: &Cache,
        lo: u64,
        hi: u64,
        dst: BufSlice,
        who: Reader,
        mut per_line: Option<&mut [u64]>,
    ) -> EngineResult<(u64, u64)> {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let (t0, t1) = (lo / ls, (hi - 1) / ls);
        let mut guards = Vec::with_capacity((t1 - t0 + 1) as usize);
        for t in t0..=t1 {
            // Ascending, one line at a time: see `map` for why this cannot deadlock.
            guards.push(st.map.lock(t).await);
        }
        // What is cached now (another request may have fetched it meanwhile), and
        // the backend runs of whole sectors that are not.
        let mut hits: Vec<(u32, u64, u64)> = Vec::new(); // (slot, backend lo, hi)
        let mut runs: Vec<(u64, u64)> = Vec::new(); // backend, 4 KiB aligned
        for t in t0..=t1 {
            let (a, b) = (lo.max(t * ls) - t * ls, hi.min((t + 1) * ls) - t * ls);
            let (s0, s1) = sectors(a, b);
            let resolved = {
                let sh = st.map.shard(t).read();
                st.resolve(&sh, t, s0, s1)
            };
            for (rs, re, src) in resolved {
                match src {
                    Some(slot) => {
                        let (ra, rb) = (a.max(rs as u64 * SECTOR), b.min(re as u64 * SECTOR));
                        hits.push((slot, t * ls + ra, t * ls + rb));
                    }
                    None => {
                        let (ra, rb) = (t * ls + rs as u64 * SECTOR, t * ls + re as u64 * SECTOR);
                        match runs.last_mut() {
                            Some((_, h)) if *h == ra => *h = rb,
                            _ => runs.push((ra, rb)),
                        }
                    }
                }
            }
        }
        let mut fetched: Vec<(u64, DmaBuf)> = runs
            .iter()
            .map(|&(a, b)| (a, DmaBuf::new((b - a) as usize)))
            .collect();
        {
            let mut pieces: Vec<Piece<'_, EngineResult<()>>> = Vec::new();
            for &(slot, a, b) in &hits {
                let d = dst.sub((a - lo) as usize, (b - a) as usize);
                let in_line = a % ls;
                pieces.push(Box::pin(async move {
                    c.store.read_async(slot, in_line, d).await.inspect_err(|_| {
                        Stats::add(&self.stats.cache_errors, 1);
                    })
                }));
            }
            for (a, buf) in &fetched {
                let s = buf.slice_all();
                let a = *a;
                pieces.push(match who {
                    Reader::Guest => Box::pin(self.guest_backend_read(a, s)),
                    Reader::Preload => Box::pin(self.backend_read(a, s)),
                });
            }
            for r in join_all(pieces).await {
                r?;
            }
        }
        // Hand the guest its bytes from the fetched sectors.
        let mut miss = 0;
        for (a, buf) in fetched.iter_mut() {
            let b = *a + buf.len() as u64;
            let (x, y) = (lo.max(*a), hi.min(b));
            if x >= y {
                continue;
            }
            let part = dst.sub((x - lo) as usize, (y - x) as usize);
            let src = buf.bytes().expect("fetch finished");
            // SAFETY: this request owns `dst` (and so `part`) until it completes,
            // and no other step of it writes this range.
            unsafe { part.request_bytes_mut() }
                .copy_from_slice(&src[(x - *a) as usize..(y - *a) as usize]);
            miss += y - x;
            if let Some(v) = per_line.as_deref_mut() {
                let mut p = x;
                while p < y {
                    let e = y.min((p / ls + 1) * ls);
                    if let Some(n) = v.get_mut((p / ls - t0) as usize) {
                        *n += e - p;
                    }
                    p = e;
                }
            }
        }
        let hit: u64 = hits.iter().map(|&(_, a, b)| b - a).sum();
        match who {
            Reader::Guest => {
                Stats::add(&self.stats.read_hit_bytes, hit);
                Stats::add(&self.stats.read_miss_bytes, miss);
            }
            Reader::Preload => Stats::add(&self.stats.preload_bytes, miss),
        }
        if !fetched.is_empty() && self.mode().promotes_reads() {
            let me = self.arc();
            let promote = async move { me.promote(fetched, guards).await };
            match aio::spawn(promote) {
                Ok(t) => t.detach(),
                Err(e) => warn!("cache promotion skipped: {e}"),
            }
        }
        Ok((hit, miss))
    }

    /// Preload and boot prefetch: fetch `lo..hi` as a non-guest reader;
    /// returns the bytes read from the backend, and adds each line's to
    /// `per_line` (from `lo`'s line on) if given.
    pub(super) async fn fetch_for_preload(
        &self,
        c: &Cache,
        lo: u64,
        hi: u64,
        dst: BufSlice,
        per_line: Option<&mut [u64]>,
    ) -> EngineResult<u64> {
        Ok(self
            .fetch(c, lo, hi, dst, Reader::Preload, per_line)
            .await?
            .1)
    }

    /// Put sectors read from the backend into the cache, then let go of their
    /// lines. Best effort: no free slot, or a cache write error, only costs a
    /// future miss; nothing here waits for space.
    async fn promote(
        self: std::sync::Arc<Self>,
        fetched: Vec<(u64, DmaBuf)>,
        guards: Vec<LineGuard>,
    ) {
        let Some(c) = self.cache() else { return };
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let mut writes: Vec<(u64, u32, u32, u32, bool, BufSlice)> = Vec::new(); // tag, slot, s0, s1, fresh, data
        for (a, buf) in &fetched {
            let b = *a + buf.len() as u64;
            let mut pos = *a;
            while pos < b {
                let t = pos / ls;
                let end = b.min((t + 1) * ls);
                let (s0, s1) = ((pos % ls / SECTOR) as u32, ((end - t * ls) / SECTOR) as u32);
                let data = buf.slice((pos - *a) as usize, (end - pos) as usize);
                pos = end;
                let mut sh = st.map.shard(t).write();
                // The fetch read only sectors no version held, and the line lock
                // kept it so; never let backend data cover cached data anyway.
                let have = st.valid_any(&sh, t);
                if !bits::is_empty(&bits::and(&bits::range(s0, s1), &have)) {
                    continue;
                }
                let (slot, fresh) = match sh.head(&st.slots, t) {
                    Some(s) => (s, false),
                    None => match st.map_free_slot(&mut sh, t) {
                        Allocation::Slot(s) => (s, true),
                        Allocation::NoFree => {
                            drop(sh);
                            self.kick_refill();
                            continue;
                        }
                        Allocation::Releasing => continue,
                    },
                };
                writes.push((t, slot, s0, s1, fresh, data));
            }
        }
        let pieces: Vec<Piece<'_, EngineResult<()>>> = writes
            .iter()
            .map(|(_, slot, s0, _, _, data)| -> Piece<'_, EngineResult<()>> {
                let (slot, off, data) = (*slot, *s0 as u64 * SECTOR, data.clone());
                Box::pin(async move {
                    c.store
                        .write_async(slot, off, data, WriteMode::Normal)
                        .await
                })
            })
            .collect();
        let results = if pieces.is_empty() {
            Vec::new()
        } else {
            join_all(pieces).await
        };
        for ((t, slot, s0, s1, fresh, _), r) in writes.into_iter().zip(results) {
            let mut sh = st.map.shard(t).write();
            let rec = st.slots.get(slot);
            if rec.tag != t {
                continue;
            }
            match r {
                Ok(()) => {
                    let mut new = rec;
                    new.valid = bits::or(&rec.valid, &bits::range(s0, s1));
                    st.set_rec(&mut sh, slot, new, false);
                }
                Err(e) => {
                    Stats::add(&self.stats.cache_errors, 1);
                    warn!("cache promotion write failed: {e}");
                    if fresh && bits::is_empty(&rec.valid) {
                        st.unmap_unused(&mut sh, slot);
                    }
                }
            }
        }
        drop(guards);
    }
}

/// One guest read at the backend, counted in `Engine::guest_backend_reads`
/// while this lives.
struct GuestBackendRead<'a>(&'a Engine);

impl<'a> GuestBackendRead<'a> {
    fn new(e: &'a Engine) -> Self {
        e.guest_backend_reads
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        GuestBackendRead(e)
    }
}

impl Drop for GuestBackendRead<'_> {
    fn drop(&mut self) {
        // Write-back looks at the time of the last end (`READS_LINGER`), so
        // the end wakes nothing.
        let e = self.0;
        e.guest_read_end_us.store(
            e.born.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Release,
        );
        e.guest_backend_reads
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
