//! Making the in-memory cache state durable, finding space, and waiting for
//! write-back.
//!
//! The one rule behind every metadata write: first make all cache data writes
//! that completed before the snapshot durable, then write the snapshot. An entry
//! on disk therefore never calls a sector valid whose data might not be there.

use std::time::{Duration, Instant};

use tracing::info;

use super::live::{Progress, ProgressFn};
use super::state::Line;
use super::store::CacheStore;
use super::{lock, wait, Engine, SECTOR};
use crate::error::{EngineError, EngineErrorKind, EngineResult};
use crate::format::{EntryCodec, Layout, META_BLOCK};

/// Encode metadata block `b` from the line table.
pub(super) fn encode_block(codec: &EntryCodec, layout: &Layout, lines: &[Line], b: u32) -> Vec<u8> {
    let epb = layout.entries_per_block();
    let mut buf = vec![0u8; META_BLOCK as usize];
    let first = b * epb;
    let last = (first + epb).min(layout.nr_lines as u32);
    for slot in first..last {
        let at = ((slot - first) * layout.entry_size) as usize;
        codec.encode(slot, &lines[slot as usize].entry(), &mut buf[at..]);
    }
    buf
}

/// The persist rule in one place: sync cache data, write the blocks, sync.
pub(super) fn write_blocks(store: &CacheStore, blocks: &[(u32, Vec<u8>)]) -> EngineResult<()> {
    store.sync()?;
    if !blocks.is_empty() {
        for (b, buf) in blocks {
            store.write_meta_block(*b, buf)?;
        }
        store.sync()?;
    }
    Ok(())
}

/// Clean lines evicted per refill: one metadata persist frees this many slots.
const EVICT_BATCH: usize = 64;

impl Engine {
    /// Write every changed metadata block, after syncing cache data. Slots that
    /// were released become reusable once this returns.
    pub fn persist(&self) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        let _p = lock(&c.persist_lock);
        let epb = c.layout.entries_per_block();
        let (blocks, freed) = {
            let mut st = lock(&c.st);
            let ids: Vec<u32> = std::mem::take(&mut st.meta_dirty).into_iter().collect();
            let mut blocks = Vec::with_capacity(ids.len());
            for b in ids {
                let mut buf = vec![0u8; META_BLOCK as usize];
                let first = b * epb;
                let last = (first + epb).min(c.layout.nr_lines as u32);
                for slot in first..last {
                    let at = ((slot - first) * c.layout.entry_size) as usize;
                    c.codec
                        .encode(slot, &st.lines[slot as usize].entry(), &mut buf[at..]);
                }
                blocks.push((b, buf));
            }
            (blocks, std::mem::take(&mut st.pending_free))
        };
        let res = (|| {
            c.store.sync()?;
            if !blocks.is_empty() {
                for (b, buf) in &blocks {
                    c.store.write_meta_block(*b, buf)?;
                }
                c.store.sync()?;
            }
            Ok(())
        })();
        let mut st = lock(&c.st);
        match res {
            Ok(()) => {
                for (slot, tag) in freed {
                    if let Some(t) = tag {
                        st.releasing.remove(&t);
                    }
                    st.free.push(slot);
                }
                c.cv_space.notify_all();
                Ok(())
            }
            Err(e) => {
                // Nothing is lost: the blocks stay marked for the next attempt.
                st.meta_dirty.extend(blocks.iter().map(|(b, _)| *b));
                st.pending_free.extend(freed);
                Err(e)
            }
        }
    }

    /// Make at least one slot free. Evicts a batch of clean least-recently-used
    /// lines; with `wait`, waits for the flusher while only dirty lines remain.
    /// Returns false (without `wait`) when nothing can be freed now.
    pub(super) fn make_space(&self, wait_for_space: bool) -> EngineResult<bool> {
        let c = self.cache.as_ref().expect("make_space with a cache");
        loop {
            {
                let _r = lock(&c.refill_lock);
                let mut st = lock(&c.st);
                if !st.free.is_empty() {
                    return Ok(true);
                }
                let mut victims = Vec::new();
                {
                    let st = &mut *st;
                    let (lines, locked) = (&st.lines, &st.locked);
                    while victims.len() < EVICT_BATCH {
                        let mut usable =
                            |s: u32| lines[s as usize].tag.is_some_and(|t| !locked.contains(&t));
                        match st.evict.pop_victim(&mut usable) {
                            Some(v) => victims.push(v),
                            None => break,
                        }
                    }
                }
                for &v in &victims {
                    st.release(v);
                }
                if !victims.is_empty() || !st.pending_free.is_empty() {
                    drop(st);
                    self.persist()?;
                    continue;
                }
                if st.stopping {
                    return Err(EngineError::new(
                        EngineErrorKind::Stopped,
                        "engine stopping",
                    ));
                }
                if !wait_for_space {
                    return Ok(false);
                }
            }
            let st = lock(&c.st);
            c.cv_flusher.notify_all();
            drop(wait(&c.cv_space, st, 100));
        }
    }

    /// Close the current epoch and wait until it and everything before it is on
    /// the backend (and flushed there).
    pub(super) fn writeback_barrier(&self) -> EngineResult<()> {
        self.drain_until(false, None)
    }

    /// Write back all dirty data and wait for it, logging progress. Used at stop,
    /// at attach in a mode that holds no dirty data, and by `ctl flush`.
    pub fn drain(&self) -> EngineResult<()> {
        self.drain_with_progress(None)
    }

    /// `drain`, reporting progress (bytes of the dirty data found at the start
    /// that are written back) about twice a second when given a callback.
    pub fn drain_with_progress(&self, progress: Option<ProgressFn<'_>>) -> EngineResult<()> {
        self.drain_until(true, progress)?;
        self.persist()
    }

    fn drain_until(&self, log: bool, progress: Option<ProgressFn<'_>>) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        let target = {
            let mut st = lock(&c.st);
            st.drain_requests += 1;
            let t = st.cur_epoch;
            st.cur_epoch += 1;
            c.cv_flusher.notify_all();
            t
        };
        let start = Instant::now();
        let mut last_log = Instant::now();
        let mut last_progress = Instant::now();
        let mut st = lock(&c.st);
        let total = st.dirty_sectors * SECTOR;
        let report = |st: &super::state::State| {
            if let Some(p) = progress {
                p(&Progress {
                    phase: "write-back".into(),
                    done: total.saturating_sub(st.dirty_sectors * SECTOR),
                    total,
                });
            }
        };
        loop {
            let dirty_done = st.oldest_dirty_epoch().is_none_or(|e| e > target);
            let applying_done = st.oldest_applying_epoch().is_none_or(|e| e > target);
            if dirty_done && applying_done {
                report(&st);
                break;
            }
            if last_progress.elapsed() >= Duration::from_millis(500) {
                report(&st);
                last_progress = Instant::now();
            }
            if log && last_log.elapsed() >= Duration::from_secs(2) {
                info!(
                    dirty_lines = st.dirty_lines,
                    elapsed_s = start.elapsed().as_secs(),
                    "write-back in progress"
                );
                last_log = Instant::now();
            }
            if self.flusher_gone() {
                st.drain_requests -= 1;
                return Err(EngineError::new(
                    EngineErrorKind::Stopped,
                    "the flusher is not running; dirty data stays in the cache",
                ));
            }
            st = wait(&c.cv_progress, st, 200);
        }
        st.drain_requests -= 1;
        if log {
            info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "write-back complete"
            );
        }
        Ok(())
    }

    fn flusher_gone(&self) -> bool {
        lock(&self.flusher).as_ref().is_none_or(|h| h.is_finished())
    }
}
