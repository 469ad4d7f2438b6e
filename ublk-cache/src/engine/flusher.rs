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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rbd_backend::aio::{DmaBuf, EventLoop};
use rbd_backend::WriteMode;
use tracing::{error, warn};

use super::slots::FREE;
use super::sync::{join_all, run_window, wait_for, Piece};
use super::{bits, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineErrorKind, EngineResult};

/// Lines per step at most (one backend flush per step).
const STEP_LINES: usize = 4096;
/// Largest backend write of a step.
const MAX_EXTENT: u64 = 4 << 20;
/// Backend writes in flight.
const WINDOW: usize = 32;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(items) = self.next_step(c).await else {
                return;
            };
            match self.write_back(c, &items).await {
                Ok(bytes) => {
                    backoff = Duration::from_millis(50);
                    self.note_writeback_progress();
                    if self.writeback_failing.swap(false, Ordering::AcqRel) {
                        self.warned_ordering.store(false, Ordering::Release);
                        tracing::info!("write-back works again");
                    }
                    Stats::add(&self.stats.writeback_bytes, bytes);
                    Stats::add(&self.stats.backend_write_bytes, bytes);
                    self.mark_clean(c, &items);
                    c.st.epochs.lock().writing = None;
                    c.ev.progress.notify(usize::MAX);
                    c.ev.space.notify(usize::MAX);
                }
                Err(e) => {
                    Stats::add(&self.stats.writeback_retries, 1);
                    self.writeback_failing.store(true, Ordering::Release);
                    warn!(
                        "write-back of {} lines failed, data stays dirty in the cache; retrying in {:?}: {e}",
                        items.len(),
                        backoff
                    );
                    self.requeue(c, &items);
                    if c.st.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    wait_for(&c.ev.flusher, backoff, || {
                        c.st.stopping.load(Ordering::Acquire)
                    })
                    .await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Put items back into their epoch's pending list (a failed step).
    fn requeue(&self, c: &Cache, items: &[Item]) {
        let mut e = c.st.epochs.lock();
        for it in items {
            e.pending.entry(it.epoch).or_default().push(it.slot);
        }
        e.writing = None;
    }

    /// Wait for and take the next step: dirty lines of the epoch that may go
    /// next (of every closed epoch, in relaxed order). Returns None when the
    /// engine stops.
    async fn next_step(&self, c: &Cache) -> Option<Vec<Item>> {
        let st = &c.st;
        loop {
            if st.stopping.load(Ordering::Acquire) {
                return None;
            }
            let active = self.mode().writes_back_continuously()
                || st.drain_requests.load(Ordering::Acquire) > 0;
            let mut candidates: Vec<(u64, u32)> = Vec::new();
            if active {
                let mut e = st.epochs.lock();
                let epochs: Vec<u64> = if self.reverse_writeback_for_tests.load(Ordering::Relaxed) {
                    e.pending.keys().next_back().copied().into_iter().collect()
                } else {
                    self.order
                        .next_epoch(e.oldest_pending(), e.oldest_applying())
                        .into_iter()
                        .collect()
                };
                for ep in epochs {
                    if let Some(v) = e.pending.remove(&ep) {
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
                if items.len() >= STEP_LINES {
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
                return Some(items);
            }
            st.epochs.lock().writing = None;
            // Nothing to take now: idle is not stalled.
            self.note_writeback_progress();
            c.ev.progress.notify(usize::MAX);
            wait_for(&c.ev.flusher, Duration::from_millis(200), || {
                st.stopping.load(Ordering::Acquire)
            })
            .await;
        }
    }

    /// Write a step's dirty sectors to the backend, then flush the backend.
    async fn write_back(&self, c: &Cache, items: &[Item]) -> EngineResult<u64> {
        let ls = c.layout.line_size as u64;
        let spl = c.layout.spl();
        let mut extents: Vec<Extent> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            for (s, e, dirty) in bits::runs(&it.dirty, 0, spl) {
                if !dirty {
                    continue;
                }
                let (a, n) = (s as u64 * SECTOR, (e - s) as u64 * SECTOR);
                let off = it.tag * ls + a;
                match extents.last_mut() {
                    Some(x) if x.off + x.len == off && x.len + n <= MAX_EXTENT => {
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

    /// Read one extent's pieces from the cache (holding their lines' locks, so
    /// no overwrite of the same epoch interleaves with the read), then write it.
    async fn write_extent(&self, c: &Cache, items: &[Item], x: &Extent) -> EngineResult<()> {
        let st = &c.st;
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
            for &(i, slot, _, _) in &x.pieces {
                assert_eq!(
                    st.slots.tag(slot),
                    items[i].tag,
                    "DEBUG slot {slot} changed line under write-back"
                );
            }
            let mut at = 0usize;
            let mut reads: Vec<Piece<'_, EngineResult<()>>> = Vec::new();
            for &(_, slot, a, n) in &x.pieces {
                let d = buf.slice(at, n as usize);
                at += n as usize;
                reads.push(Box::pin(c.store.read_async(slot, a, d)));
            }
            for r in join_all(reads).await {
                r?;
            }
        }
        let len = x.len;
        self.backend
            .write_async(x.off, buf.slice_all(), WriteMode::Normal)
            .await
            .map_err(|e| {
                Stats::add(&self.stats.backend_errors, 1);
                EngineError::backend(&format!("write-back at {}+{len}", x.off), e)
            })
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
