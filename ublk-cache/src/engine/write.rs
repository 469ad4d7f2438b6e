//! The write path per mode: write-back (into the cache, dirty), write-through
//! (backend first, then the cache) and write-around (backend, cached copy
//! dropped).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use policies::WriteRoute;
use rbd_backend::aio::{BufSlice, DmaBuf};
use rbd_backend::WriteMode;
use tracing::warn;

use super::read::sectors;
use super::slots::Rec;
use super::state::Allocation;
use super::sync::{join_all, wait_for, Piece};
use super::{bits, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineResult};

/// How long an ordered overwrite waits for write-back of the older epoch
/// while write-back is failing, before it goes in place.
const ORDERED_WAIT_DURING_OUTAGE: Duration = Duration::from_secs(2);

impl Engine {
    pub(super) async fn backend_write(&self, offset: u64, src: BufSlice) -> EngineResult<()> {
        let len = src.len();
        Stats::add(&self.stats.backend_write_bytes, len as u64);
        self.backend
            .write_async(offset, src, WriteMode::Normal)
            .await
            .map_err(|e| {
                Stats::add(&self.stats.backend_errors, 1);
                EngineError::backend(&format!("write at {offset}+{len}"), e)
            })
    }

    pub(super) async fn backend_flush(&self) -> EngineResult<()> {
        self.backend.flush_async().await.map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend("flush", e)
        })
    }

    pub(super) async fn write_impl(&self, offset: u64, src: BufSlice) -> EngineResult<()> {
        Stats::add(&self.stats.write_bytes, src.len() as u64);
        let Some(c) = self.cache() else {
            Stats::add(&self.stats.write_misses, 1);
            return self.backend_write(offset, src).await;
        };
        let route = self.mode().write_route();
        let mut done = 0usize;
        let mut pieces: Vec<Piece<'_, EngineResult<(bool, u64)>>> = Vec::new();
        for (tag, a, n) in self.split(offset, src.len() as u64) {
            let piece = src.sub(done, n as usize);
            done += n as usize;
            pieces.push(Box::pin(async move {
                let cached = match route {
                    WriteRoute::CacheDirty => self.write_line_dirty(c, tag, a, piece).await?,
                    WriteRoute::BackendThenCache => {
                        self.write_line_through(c, tag, a, piece, true).await?
                    }
                    WriteRoute::BackendInvalidate => {
                        self.write_line_through(c, tag, a, piece, false).await?
                    }
                };
                Ok((cached, n))
            }));
        }
        let (mut hit, mut miss) = (0, 0);
        let mut first_err = None;
        for r in join_all(pieces).await {
            match r {
                Ok((true, n)) => hit += n,
                Ok((false, n)) => miss += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let s = &self.stats;
        Stats::classify(&s.write_hits, &s.write_misses, &s.write_partial, hit, miss);
        Ok(())
    }

    /// Write-through (`fill`) or write-around: the backend first, so the cache
    /// never holds data the backend lacks (never both at once: a crash between
    /// them must not leave a valid cache entry the backend never got); then the
    /// cache copy is updated or invalidated so no later read is stale. Returns
    /// whether the line was cached.
    async fn write_line_through(
        &self,
        c: &Cache,
        tag: u64,
        a: u64,
        data: BufSlice,
        fill: bool,
    ) -> EngineResult<bool> {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let b = a + data.len() as u64;
        let (s0, s1) = sectors(a, b);
        let _g = st.map.lock(tag).await;
        let was_cached = st.head(tag).is_some();
        if let Err(e) = self.backend_write(tag * ls + a, data.clone()).await {
            // What the backend holds in the range is now unknown: drop our copy.
            self.invalidate_locked(c, tag, s0, s1);
            return Err(e);
        }
        // Whole sectors can be cached; partly written ones are dropped rather
        // than merged, which would need a read.
        let (f0, f1) = (a.div_ceil(SECTOR) as u32, (b / SECTOR) as u32);
        if !fill || f0 >= f1 {
            self.invalidate_locked(c, tag, s0, s1);
            return Ok(was_cached);
        }
        let slot = {
            let mut sh = st.map.shard(tag).write();
            match sh.head(&st.slots, tag) {
                Some(s) => Some(s),
                None => match st.map_free_slot(&mut sh, tag) {
                    Allocation::Slot(s) => Some(s),
                    Allocation::NoFree => {
                        drop(sh);
                        self.kick_refill();
                        None
                    }
                    Allocation::Releasing => None,
                },
            }
        };
        let Some(slot) = slot else {
            self.invalidate_locked(c, tag, s0, s1);
            return Ok(was_cached);
        };
        let start = f0 as u64 * SECTOR;
        let body = data.sub((start - a) as usize, ((f1 - f0) as u64 * SECTOR) as usize);
        let wrote = c
            .store
            .write_async(slot, start, body, WriteMode::Normal)
            .await;
        let mut sh = st.map.shard(tag).write();
        let r = st.slots.get(slot);
        let touched = bits::range(s0, s1);
        let mut valid = bits::and_not(&r.valid, &touched);
        match wrote {
            Ok(()) => valid = bits::or(&valid, &bits::range(f0, f1)),
            Err(e) => {
                Stats::add(&self.stats.cache_errors, 1);
                warn!("write-through cache write failed, range dropped from cache: {e}");
            }
        }
        if bits::is_empty(&valid) && bits::is_empty(&r.valid) {
            st.unmap_unused(&mut sh, slot);
        } else {
            let new = Rec {
                valid,
                dirty: bits::and_not(&r.dirty, &touched),
                ..r
            };
            st.set_rec(&mut sh, slot, new, true);
        }
        Ok(was_cached)
    }

    /// Drop sectors `s0..s1` of `tag` from the cache. The caller holds the line lock.
    pub(super) fn invalidate_locked(&self, c: &Cache, tag: u64, s0: u32, s1: u32) {
        let st = &c.st;
        let mut sh = st.map.shard(tag).write();
        if let Some(slot) = sh.head(&st.slots, tag) {
            let r = st.slots.get(slot);
            let rng = bits::range(s0, s1);
            let valid = bits::and_not(&r.valid, &rng);
            if valid != r.valid {
                let new = Rec {
                    valid,
                    dirty: bits::and_not(&r.dirty, &rng),
                    ..r
                };
                st.set_rec(&mut sh, slot, new, true);
            }
        }
    }

    /// Write-back: the data goes to the cache, marked dirty in the current epoch.
    /// Returns whether the line was cached already.
    async fn write_line_dirty(
        &self,
        c: &Cache,
        tag: u64,
        a: u64,
        data: BufSlice,
    ) -> EngineResult<bool> {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let b = a + data.len() as u64;
        let (s0, s1) = sectors(a, b);
        let started = Instant::now();
        loop {
            let guard = st.map.lock(tag).await;
            enum Next {
                Go(u32, bool, bool),
                WaitFlusher,
                Persist,
                Space,
            }
            // The epoch is taken under the shard lock, together with the decision
            // it governs: a FLUSH between the two would let this write go in
            // place over the older epoch's data.
            let (epoch, next) = {
                let mut sh = st.map.shard(tag).write();
                let epoch = st.epochs.lock().begin_apply();
                let next = match sh.head(&st.slots, tag) {
                    Some(s) => {
                        let r = st.slots.get(s);
                        // Offline mode writes back only at stop, so nothing would come
                        // to take the line: it overwrites in place (see README, offline).
                        // And while the backend refuses write-back, a guest write must
                        // not hang behind it: after a short wait it goes in place too.
                        if self.order.overwrite_waits_for_older_epoch()
                            && self.mode().writes_back_continuously()
                            && r.is_dirty()
                            && r.epoch < epoch
                            && !self.give_up_ordering(started)
                        {
                            Next::WaitFlusher
                        } else {
                            // In place over a line the flusher cleaned since the last
                            // persist: its durable entry may still call the line dirty
                            // in an older epoch, and after a power cut recovery would
                            // write this newer data back as that epoch. Make the clean
                            // state durable first.
                            let stale =
                                self.order.overwrite_waits_for_older_epoch() && st.cleaned.test(s);
                            Next::Go(s, false, stale)
                        }
                    }
                    None => match st.map_free_slot(&mut sh, tag) {
                        Allocation::Slot(s) => Next::Go(s, true, false),
                        Allocation::Releasing => Next::Persist,
                        Allocation::NoFree => Next::Space,
                    },
                };
                if !matches!(next, Next::Go(_, _, false)) {
                    st.epochs.lock().end_apply(epoch);
                }
                (epoch, next)
            };
            let (slot, fresh) = match next {
                Next::Go(s, fresh, false) => (s, fresh),
                Next::Go(_, _, true) | Next::Persist => {
                    drop(guard);
                    self.persist().await?;
                    continue;
                }
                Next::WaitFlusher => {
                    // The older epoch's data must reach the backend before this
                    // overwrite replaces it in place. Let the flusher have the line.
                    drop(guard);
                    c.ev.flusher.notify(usize::MAX);
                    wait_for(&c.ev.progress, Duration::from_millis(50), || false).await;
                    continue;
                }
                Next::Space => {
                    drop(guard);
                    // Holding no line lock, waiting for space cannot block the flusher.
                    self.make_space(true).await?;
                    continue;
                }
            };
            let valid = st.slots.valid(slot);
            let res = self
                .fill_and_write(c, tag * ls, slot, a, &data, &valid)
                .await;
            let mut sh = st.map.shard(tag).write();
            st.epochs.lock().end_apply(epoch);
            match res {
                Ok(()) => {
                    let r = st.slots.get(slot);
                    let rng = bits::range(s0, s1);
                    let new = Rec {
                        valid: bits::or(&r.valid, &rng),
                        dirty: bits::or(&r.dirty, &rng),
                        epoch,
                        ..r
                    };
                    st.set_rec(&mut sh, slot, new, true);
                    drop(sh);
                    drop(guard);
                    c.ev.flusher.notify(1);
                    return Ok(!fresh);
                }
                Err(e) => {
                    if fresh && bits::is_empty(&st.slots.valid(slot)) {
                        st.unmap_unused(&mut sh, slot);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Whether an ordered overwrite that has waited since `started` should go in
    /// place after all: only while write-back is failing or has not finished a
    /// step for a while (the backend is down, stalled or refusing), so that
    /// guest writes keep completing from the cache. The backend alone is then not
    /// crash-consistent until write-back catches up; the cache still holds every
    /// acknowledged write.
    fn give_up_ordering(&self, started: Instant) -> bool {
        // Once given up, it stays so until write-back works again.
        if !self.warned_ordering.load(Ordering::Acquire) {
            let stalled = self.since_writeback_progress() >= ORDERED_WAIT_DURING_OUTAGE;
            let failing = self.writeback_failing.load(Ordering::Acquire);
            if started.elapsed() < ORDERED_WAIT_DURING_OUTAGE || !(failing || stalled) {
                return false;
            }
        }
        Stats::add(&self.stats.ordered_overwrites_in_place, 1);
        if !self.warned_ordering.swap(true, Ordering::AcqRel) {
            warn!(
                "write-back is failing, so overwrites of data dirty since before a FLUSH now go in place instead \
                 of waiting: guest writes keep completing, but until write-back catches up the backend alone \
                 is not crash-consistent (the cache holds every acknowledged write)"
            );
        }
        true
    }

    /// Write `data` at byte `a` of a line's slot, completing partly covered 4 KiB
    /// sectors from the cache (if valid) or the backend.
    async fn fill_and_write(
        &self,
        c: &Cache,
        line_base: u64,
        slot: u32,
        a: u64,
        data: &BufSlice,
        valid: &crate::format::entry::SectorBits,
    ) -> EngineResult<()> {
        let b = a + data.len() as u64;
        if a.is_multiple_of(SECTOR) && b.is_multiple_of(SECTOR) {
            return c
                .store
                .write_async(slot, a, data.clone(), WriteMode::Normal)
                .await;
        }
        let (s0, s1) = sectors(a, b);
        let start = s0 as u64 * SECTOR;
        let mut buf = DmaBuf::new(((s1 - s0) as u64 * SECTOR) as usize);
        let mut edges = vec![s0];
        if s1 - 1 != s0 {
            edges.push(s1 - 1);
        }
        for s in edges {
            let off = s as u64 * SECTOR;
            if a <= off && off + SECTOR <= b {
                continue;
            }
            let part = buf.slice((off - start) as usize, SECTOR as usize);
            if bits::test(valid, s) {
                c.store.read_async(slot, off, part).await?;
            } else {
                self.backend_read(line_base + off, part).await?;
            }
        }
        {
            let bytes = buf.bytes_mut().expect("edge reads finished");
            // SAFETY: this request owns `data` while it runs; nothing writes it.
            let src = unsafe { data.request_bytes() };
            bytes[(a - start) as usize..(b - start) as usize].copy_from_slice(src);
        }
        c.store
            .write_async(slot, start, buf.slice_all(), WriteMode::Normal)
            .await
    }
}
