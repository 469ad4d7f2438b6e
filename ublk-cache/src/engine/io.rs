//! The request paths: read (hit, miss, promotion), write per mode, flush, and
//! discard / write-zeroes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use policies::WriteRoute;
use tracing::warn;

use super::bits;
use super::state::Alloc;
use super::{lock, wait, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineResult};

/// How long an ordered overwrite waits for write-back of the older epoch
/// while write-back is failing, before it goes in place.
const ORDERED_WAIT_DURING_OUTAGE: Duration = Duration::from_secs(2);

/// Sector range `s0..s1` touched by bytes `a..b` of a line.
fn sectors(a: u64, b: u64) -> (u32, u32) {
    ((a / SECTOR) as u32, b.div_ceil(SECTOR) as u32)
}

impl Engine {
    pub(super) fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref().filter(|_| self.mode().uses_cache())
    }

    fn backend_read(&self, offset: u64, buf: &mut [u8]) -> EngineResult<()> {
        Stats::add(&self.stats.backend_read_bytes, buf.len() as u64);
        self.backend.read_at(offset, buf).map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend(&format!("read at {offset}+{}", buf.len()), e)
        })
    }

    fn backend_write(&self, offset: u64, buf: &[u8]) -> EngineResult<()> {
        Stats::add(&self.stats.backend_write_bytes, buf.len() as u64);
        self.backend.write_at(offset, buf).map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend(&format!("write at {offset}+{}", buf.len()), e)
        })
    }

    pub(super) fn backend_flush(&self) -> EngineResult<()> {
        self.backend.flush().map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend("flush", e)
        })
    }

    pub(super) fn read_impl(&self, offset: u64, buf: &mut [u8]) -> EngineResult<()> {
        let Some(c) = self.cache() else {
            Stats::add(&self.stats.read_misses, 1);
            return self.backend_read(offset, buf);
        };
        let mut done = 0usize;
        let (mut hit, mut miss) = (0, 0);
        for (tag, a, n) in self.split(offset, buf.len() as u64) {
            let piece = &mut buf[done..done + n as usize];
            let (h, m) = self.read_line(c, tag, a, piece, true)?;
            hit += h;
            miss += m;
            done += n as usize;
        }
        let s = &self.stats;
        Stats::classify(&s.read_hits, &s.read_misses, &s.read_partial, hit, miss);
        Ok(())
    }

    /// Read bytes `a..a+out.len()` of backend line `tag`: valid sectors from the
    /// cache, the rest from the backend, which is then promoted. Holding the line
    /// lock across the backend read means concurrent readers of the same line
    /// wait for one fetch instead of fetching twice. Returns the bytes that were
    /// hits and misses. `guest` false (preload) keeps the guest's counters clean.
    pub(super) fn read_line(
        &self,
        c: &Cache,
        tag: u64,
        a: u64,
        out: &mut [u8],
        guest: bool,
    ) -> EngineResult<(u64, u64)> {
        let ls = c.layout.line_size as u64;
        let b = a + out.len() as u64;
        let (s0, s1) = sectors(a, b);
        let _g = c.lock_line(tag);
        let (slot, valid) = {
            let mut st = lock(&c.st);
            match st.map.get(&tag).copied() {
                Some(s) => {
                    st.evict.touch(s);
                    (Some(s), st.lines[s as usize].valid)
                }
                None => (None, bits::none()),
            }
        };
        let mut fetched: Vec<(u32, u32, Vec<u8>)> = Vec::new();
        let (mut hit_bytes, mut miss_bytes) = (0, 0);
        for (rs, re, hit) in bits::runs(&valid, s0, s1) {
            let ra = a.max(rs as u64 * SECTOR);
            let rb = b.min(re as u64 * SECTOR);
            let dst = &mut out[(ra - a) as usize..(rb - a) as usize];
            if let (true, Some(slot)) = (hit, slot) {
                c.store.read(slot, ra, dst).inspect_err(|_| {
                    Stats::add(&self.stats.cache_errors, 1);
                })?;
                if guest {
                    Stats::add(&self.stats.read_hit_bytes, dst.len() as u64);
                }
                hit_bytes += dst.len() as u64;
            } else {
                let start = rs as u64 * SECTOR;
                let mut whole = vec![0u8; ((re - rs) as u64 * SECTOR) as usize];
                self.backend_read(tag * ls + start, &mut whole)?;
                dst.copy_from_slice(&whole[(ra - start) as usize..(rb - start) as usize]);
                let counter = if guest {
                    &self.stats.read_miss_bytes
                } else {
                    &self.stats.preload_bytes
                };
                Stats::add(counter, dst.len() as u64);
                miss_bytes += dst.len() as u64;
                fetched.push((rs, re, whole));
            }
        }
        if !fetched.is_empty() && self.mode().promotes_reads() {
            self.promote(c, tag, slot, &fetched);
        }
        Ok((hit_bytes, miss_bytes))
    }

    /// Put sectors read from the backend into the cache. Best effort: a full
    /// cache or a cache write error only costs a future miss.
    fn promote(&self, c: &Cache, tag: u64, slot: Option<u32>, fetched: &[(u32, u32, Vec<u8>)]) {
        let (slot, fresh) = match slot {
            Some(s) => (s, false),
            None => match self.alloc_line(c, tag, false) {
                Ok(Some(s)) => (s, true),
                Ok(None) => return,
                Err(e) => {
                    warn!("cache promotion skipped: {e}");
                    return;
                }
            },
        };
        let mut added = bits::none();
        for (rs, re, data) in fetched {
            match c.store.write(slot, *rs as u64 * SECTOR, data) {
                Ok(()) => added = bits::or(&added, &bits::range(*rs, *re)),
                Err(e) => {
                    Stats::add(&self.stats.cache_errors, 1);
                    warn!("cache promotion write failed: {e}");
                }
            }
        }
        let mut st = lock(&c.st);
        let l = st.lines[slot as usize];
        if fresh && bits::is_empty(&added) {
            st.unmap_unused(slot);
        } else if !bits::is_empty(&added) {
            st.set_bits(slot, bits::or(&l.valid, &added), l.dirty, l.epoch, false);
        }
    }

    /// Give `tag` a slot while its line lock is held. With `wait`, waits for the
    /// flusher when the cache is full of dirty data (write-back backpressure);
    /// otherwise returns `None` when no slot can be had at once.
    fn alloc_line(&self, c: &Cache, tag: u64, wait_for_space: bool) -> EngineResult<Option<u32>> {
        loop {
            let r = {
                let mut st = lock(&c.st);
                if let Some(&s) = st.map.get(&tag) {
                    return Ok(Some(s));
                }
                st.map_free_slot(tag)
            };
            match r {
                Alloc::Slot(s) => return Ok(Some(s)),
                Alloc::Releasing => self.persist()?,
                Alloc::NoFree => {
                    if !self.make_space(wait_for_space)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    pub(super) fn write_impl(&self, offset: u64, data: &[u8]) -> EngineResult<()> {
        Stats::add(&self.stats.write_bytes, data.len() as u64);
        let Some(c) = self.cache() else {
            Stats::add(&self.stats.write_misses, 1);
            return self.backend_write(offset, data);
        };
        let mut done = 0usize;
        let (mut hit, mut miss) = (0, 0);
        let route = self.mode().write_route();
        for (tag, a, n) in self.split(offset, data.len() as u64) {
            let piece = &data[done..done + n as usize];
            let was_cached = match route {
                WriteRoute::CacheDirty => self.write_line_dirty(c, tag, a, piece)?,
                WriteRoute::BackendThenCache => self.write_line_through(c, tag, a, piece, true)?,
                WriteRoute::BackendInvalidate => {
                    self.write_line_through(c, tag, a, piece, false)?
                }
            };
            if was_cached {
                hit += n;
            } else {
                miss += n;
            }
            done += n as usize;
        }
        let s = &self.stats;
        Stats::classify(&s.write_hits, &s.write_misses, &s.write_partial, hit, miss);
        Ok(())
    }

    /// Write-through (`fill`) or write-around: the backend first, so the cache
    /// never holds data the backend lacks; then the cache copy is updated or
    /// invalidated so no later read is stale. Returns whether the line was cached.
    fn write_line_through(
        &self,
        c: &Cache,
        tag: u64,
        a: u64,
        data: &[u8],
        fill: bool,
    ) -> EngineResult<bool> {
        let ls = c.layout.line_size as u64;
        let b = a + data.len() as u64;
        let (s0, s1) = sectors(a, b);
        let _g = c.lock_line(tag);
        let was_cached = lock(&c.st).map.contains_key(&tag);
        if let Err(e) = self.backend_write(tag * ls + a, data) {
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
        let slot = match self.alloc_line(c, tag, false) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.invalidate_locked(c, tag, s0, s1);
                return Ok(was_cached);
            }
            Err(e) => {
                warn!("write-through cache allocation failed: {e}");
                self.invalidate_locked(c, tag, s0, s1);
                return Ok(was_cached);
            }
        };
        let start = f0 as u64 * SECTOR;
        let body = &data[(start - a) as usize..(f1 as u64 * SECTOR - a) as usize];
        let wrote = c.store.write(slot, start, body);
        let mut st = lock(&c.st);
        let l = st.lines[slot as usize];
        let touched = bits::range(s0, s1);
        let mut valid = bits::and_not(&l.valid, &touched);
        match wrote {
            Ok(()) => valid = bits::or(&valid, &bits::range(f0, f1)),
            Err(e) => {
                Stats::add(&self.stats.cache_errors, 1);
                warn!("write-through cache write failed, range dropped from cache: {e}");
            }
        }
        if bits::is_empty(&valid) && bits::is_empty(&l.valid) {
            st.unmap_unused(slot);
        } else {
            let dirty = bits::and_not(&l.dirty, &touched);
            st.set_bits(slot, valid, dirty, l.epoch, true);
        }
        Ok(was_cached)
    }

    /// Drop sectors `s0..s1` of `tag` from the cache. The caller holds the line lock.
    fn invalidate_locked(&self, c: &Cache, tag: u64, s0: u32, s1: u32) {
        let mut st = lock(&c.st);
        if let Some(&slot) = st.map.get(&tag) {
            let l = st.lines[slot as usize];
            let r = bits::range(s0, s1);
            let valid = bits::and_not(&l.valid, &r);
            let dirty = bits::and_not(&l.dirty, &r);
            if valid != l.valid {
                st.set_bits(slot, valid, dirty, l.epoch, true);
            }
        }
    }

    /// Write-back: the data goes to the cache, marked dirty in the current epoch.
    /// Returns whether the line was cached already.
    fn write_line_dirty(&self, c: &Cache, tag: u64, a: u64, data: &[u8]) -> EngineResult<bool> {
        let ls = c.layout.line_size as u64;
        let b = a + data.len() as u64;
        let (s0, s1) = sectors(a, b);
        let started = Instant::now();
        loop {
            let g = c.lock_line(tag);
            let mut st = lock(&c.st);
            let (slot, fresh) = match st.map.get(&tag).copied() {
                Some(s) => {
                    let l = st.lines[s as usize];
                    // Offline mode writes back only at stop, so nothing would come
                    // to take the line: it overwrites in place (see README, offline).
                    // And while the backend refuses write-back, a guest write must
                    // not hang behind it: after a short wait it goes in place too.
                    if self.order.overwrite_waits_for_older_epoch()
                        && self.mode().writes_back_continuously()
                        && l.is_dirty()
                        && l.epoch < st.cur_epoch
                        && !self.give_up_ordering(started)
                    {
                        // The older epoch's data must reach the backend before this
                        // overwrite replaces it in place. Let the flusher have the line.
                        drop(st);
                        drop(g);
                        let st = lock(&c.st);
                        c.cv_flusher.notify_all();
                        drop(wait(&c.cv_progress, st, 50));
                        continue;
                    }
                    (s, false)
                }
                None => match st.map_free_slot(tag) {
                    Alloc::Slot(s) => (s, true),
                    Alloc::Releasing => {
                        drop(st);
                        self.persist()?;
                        continue;
                    }
                    Alloc::NoFree => {
                        drop(st);
                        // Holding only this (unmapped, hence clean) line's lock cannot
                        // block the flusher, so waiting for space here is safe.
                        self.make_space(true)?;
                        continue;
                    }
                },
            };
            let valid = st.lines[slot as usize].valid;
            let epoch = st.begin_apply();
            drop(st);
            let res = self.fill_and_write(c, tag * ls, slot, a, data, &valid);
            let mut st = lock(&c.st);
            st.end_apply(epoch);
            match res {
                Ok(()) => {
                    let l = st.lines[slot as usize];
                    let r = bits::range(s0, s1);
                    st.set_bits(
                        slot,
                        bits::or(&l.valid, &r),
                        bits::or(&l.dirty, &r),
                        epoch,
                        true,
                    );
                    c.cv_flusher.notify_one();
                }
                Err(e) => {
                    if fresh && bits::is_empty(&st.lines[slot as usize].valid) {
                        st.unmap_unused(slot);
                    }
                    c.cv_progress.notify_all();
                    return Err(e);
                }
            }
            c.cv_progress.notify_all();
            drop(st);
            drop(g);
            return Ok(!fresh);
        }
    }

    /// Whether an ordered overwrite that has waited since `started` should go in
    /// place after all: only while write-back is failing or has not finished a
    /// batch for a while (the backend is down, stalled or refusing), so that
    /// guest writes keep completing from the cache. The
    /// backend alone is then not crash-consistent until write-back catches up;
    /// the cache still holds every acknowledged write.
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
    fn fill_and_write(
        &self,
        c: &Cache,
        line_base: u64,
        slot: u32,
        a: u64,
        data: &[u8],
        valid: &crate::format::entry::SectorBits,
    ) -> EngineResult<()> {
        let b = a + data.len() as u64;
        if a.is_multiple_of(SECTOR) && b.is_multiple_of(SECTOR) {
            return c.store.write(slot, a, data);
        }
        let (s0, s1) = sectors(a, b);
        let start = s0 as u64 * SECTOR;
        let mut buf = vec![0u8; ((s1 - s0) as u64 * SECTOR) as usize];
        let mut edges = vec![s0];
        if s1 - 1 != s0 {
            edges.push(s1 - 1);
        }
        for s in edges {
            let off = s as u64 * SECTOR;
            let covered = a <= off && off + SECTOR <= b;
            if covered {
                continue;
            }
            let dst = &mut buf[(off - start) as usize..(off - start + SECTOR) as usize];
            if bits::test(valid, s) {
                c.store.read(slot, off, dst)?;
            } else {
                self.backend_read(line_base + off, dst)?;
            }
        }
        buf[(a - start) as usize..(b - start) as usize].copy_from_slice(data);
        c.store.write(slot, start, &buf)
    }

    /// FLUSH (`guest` true) or the durability step of a FUA write.
    pub(super) fn flush_impl(&self, guest: bool) -> EngineResult<()> {
        Stats::add(&self.stats.flushes, 1);
        let action = self.mode().flush_action();
        if let Some(c) = self.cache() {
            if action.close_epoch && guest {
                let mut st = lock(&c.st);
                st.cur_epoch += 1;
                c.cv_flusher.notify_all();
            }
            if action.persist_cache {
                self.persist()?;
            }
        }
        if action.flush_backend {
            self.backend_flush()?;
        }
        Ok(())
    }

    /// Discard (`zero` false) or write-zeroes. In the dirty-holding modes the
    /// backend must first hold everything written before, or the flusher could
    /// later write older data over the zeroes (and, in ordered mode, the backend
    /// would see this request ahead of older epochs).
    pub(super) fn discard_impl(&self, offset: u64, len: u64, zero: bool) -> EngineResult<()> {
        if len == 0 {
            return Ok(());
        }
        if let Some(c) = self.cache.as_ref() {
            if self.mode().holds_dirty() || lock(&c.st).dirty_lines > 0 {
                self.writeback_barrier()?;
            }
        }
        let r = if zero {
            self.backend.write_zeroes(offset, len)
        } else {
            self.backend.discard(offset, len)
        };
        r.map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend(
                &format!(
                    "{} at {offset}+{len}",
                    if zero { "write-zeroes" } else { "discard" }
                ),
                e,
            )
        })?;
        if let Some(c) = self.cache.as_ref() {
            self.invalidate_range(c, offset, len);
            // In the dirty-holding modes a guest FLUSH does not reach the backend,
            // so the backend must hold the zeroes durably before we forget the
            // range: otherwise a power cut brings back the data written back before.
            if self.mode().holds_dirty() {
                self.backend_flush()?;
            }
        }
        Ok(())
    }

    /// Drop a byte range from the cache, visiting only mapped lines when the
    /// range is larger than what is cached (a whole-device discard).
    fn invalidate_range(&self, c: &Cache, offset: u64, len: u64) {
        let ls = c.layout.line_size as u64;
        let end = offset + len;
        let (first, last) = (offset / ls, (end - 1) / ls);
        let tags: Vec<u64> = {
            let st = lock(&c.st);
            if last - first < st.map.len() as u64 {
                (first..=last).collect()
            } else {
                let mut t: Vec<u64> = st
                    .map
                    .keys()
                    .copied()
                    .filter(|t| (first..=last).contains(t))
                    .collect();
                t.sort_unstable();
                t
            }
        };
        for tag in tags {
            let a = offset.max(tag * ls) - tag * ls;
            let b = end.min((tag + 1) * ls) - tag * ls;
            let (s0, s1) = sectors(a, b);
            let _g = c.lock_line(tag);
            self.invalidate_locked(c, tag, s0, s1);
        }
    }
}
