//! Making the in-memory cache state durable (group commit), finding space, and
//! waiting for write-back.
//!
//! The one rule behind every metadata write: first make all cache data writes
//! that completed before the snapshot durable, then write the snapshot. An entry
//! on disk therefore never calls a sector valid whose data might not be there.
//!
//! Persist rounds are a group commit: a caller needs a round that *starts* after
//! its call (so that its changes are in the snapshot). If one is running, it waits
//! for it to end and then for the next one, which one of the waiters leads on its
//! own event loop while the others wait; so concurrent FLUSHes from several
//! queues or connections share one round.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rbd_backend::aio::DmaBuf;
use tracing::info;

use super::live::{Progress, ProgressFn};
use super::slots::NO_SLOT;
use super::sync::{join_all, wait_for, wait_for_either, Piece};
use super::{Cache, Engine, SECTOR};
use crate::error::{EngineError, EngineErrorKind, EngineResult};
use crate::format::{EntryCodec, Layout, LineEntry, META_BLOCK};

/// Clean lines evicted per refill: one metadata persist frees this many slots.
const EVICT_BATCH: usize = 64;

#[derive(Default)]
struct Rounds {
    started: u64,
    finished: u64,
    running: bool,
    /// The last round that failed, and why.
    failed: Option<(u64, String)>,
    /// The last round led to flush (`Need::Flush`) that failed, and why: kept
    /// apart so that a FUA round failing after it does not hide it from the
    /// FLUSHes that relied on it.
    failed_flush: Option<(u64, String)>,
    /// The last finished round that flushed the cache device (every round but
    /// a FUA write's, see `Need`).
    flushed: u64,
}

/// At most this many rounds in a row flush nothing (FUA rounds); the next one
/// flushes. Without a bound a guest that only ever writes FUA would leave
/// recovery every record since the last checkpoint to check, and never let a
/// round make data durable (`State::durable_below`).
const MAX_UNFLUSHED_ROUNDS: u64 = 64;

/// What a caller of `persist_until` needs of a round that starts after its
/// call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Every completed cache write durable and described: a round that
    /// flushes the cache device (a guest FLUSH, eviction, write-back).
    Flush,
    /// Format v2, a FUA write whose data was written durable: a record of
    /// the changes durable, nothing more. The round it leads writes its
    /// record durable and flushes nothing (`log::FLAG_UNFLUSHED`).
    Record,
}

#[derive(Default)]
pub(super) struct PersistCtl {
    rounds: Mutex<Rounds>,
    done: event_listener::Event,
}

/// Encode metadata block `b` from entries given by slot.
pub(super) fn encode_block(
    codec: &EntryCodec,
    layout: &Layout,
    entry: impl Fn(u32) -> LineEntry,
    b: u32,
    out: &mut [u8],
) {
    let epb = layout.entries_per_block();
    let first = b * epb;
    let last = (first + epb).min(layout.nr_lines as u32);
    out.fill(0);
    for slot in first..last {
        let at = ((slot - first) * layout.entry_size) as usize;
        codec.encode(slot, &entry(slot), &mut out[at..]);
    }
}

/// Each of `blocks`, encoded into a buffer of its own (for the async writes
/// of a metadata round).
pub(super) fn encode_blocks(
    codec: &EntryCodec,
    layout: &Layout,
    entry: impl Fn(u32) -> LineEntry,
    blocks: &[u32],
) -> Vec<(u32, DmaBuf)> {
    blocks
        .iter()
        .map(|&b| {
            let mut buf = DmaBuf::new(META_BLOCK as usize);
            encode_block(
                codec,
                layout,
                &entry,
                b,
                buf.bytes_mut().expect("new buffer"),
            );
            (b, buf)
        })
        .collect()
}

impl Engine {
    /// Write every changed metadata block, after syncing cache data. Slots that
    /// were released become reusable once this returns.
    pub(super) async fn persist(&self) -> EngineResult<()> {
        self.persist_as(false).await
    }

    /// `persist` whose round is a full checkpoint (format v2; in v1 every
    /// round is one): after recovery and at detach, so that the table alone
    /// describes the cache.
    pub(super) async fn persist_checkpoint(&self) -> EngineResult<()> {
        self.persist_as(true).await
    }

    async fn persist_as(&self, checkpoint: bool) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        if checkpoint {
            // The round that starts after this call (the one waited for) sees it.
            c.st.log.lock().must_checkpoint = true;
        }
        let target = c.persist.rounds.lock().started + 1;
        self.persist_until(c, target, Need::Flush).await.map(|_| ())
    }

    /// Format v2, after a FUA write whose data went durable: make its entry
    /// durable in a round that starts after this call, without a device
    /// flush (the round's record goes durable on its own).
    pub(super) async fn persist_record(&self) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        let target = c.persist.rounds.lock().started + 1;
        self.persist_until(c, target, Need::Record)
            .await
            .map(|_| ())
    }

    /// Format v2, after a write-back step raised the watermark (`flushed`) to
    /// `w`: make it durable. Its own round would cost a device flush on top
    /// of the guest's, and a guest FLUSH arriving meanwhile would wait for it;
    /// so it rides in a round someone else runs (a guest FLUSH or FUA write,
    /// eviction) if one ends within `patience`, and leads one only if none
    /// does, or as soon as someone waits for it (a drain, a write waiting for
    /// space, stop). Decided by what is durable, not by round numbers, so that
    /// a failed round is simply retried. Returns whether it rode (ran no round
    /// of its own), or `None` if `interrupt` said to stop waiting first
    /// (nothing done then).
    pub(super) async fn persist_watermark(
        &self,
        w: u64,
        patience: Duration,
        interrupt: impl Fn() -> bool,
    ) -> EngineResult<Option<bool>> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(Some(true));
        };
        let durable = || {
            c.st.flushed_durable
                .load(std::sync::atomic::Ordering::Acquire)
                >= w
        };
        let deadline = Instant::now() + patience;
        loop {
            if durable() {
                return Ok(Some(true));
            }
            if interrupt() {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.writeback_is_awaited() {
                break;
            }
            // A round ending notifies `done`; a closed epoch or someone
            // starting to wait for write-back notifies the flusher.
            wait_for_either(&c.persist.done, &c.ev.flusher, left, || {
                durable() || interrupt() || self.writeback_is_awaited()
            })
            .await;
        }
        // A round running now may have started after `flushed` was raised:
        // see whether it carries `w` before leading one of its own.
        let (running, started) = {
            let r = c.persist.rounds.lock();
            (r.running, r.started)
        };
        if running {
            // Its failure is not this caller's: a round of its own follows.
            let _ = self.persist_until(c, started, Need::Record).await;
            if durable() {
                return Ok(Some(true));
            }
        }
        // A round that starts from now on reads `flushed` >= w (it was raised
        // before this call).
        let target = c.persist.rounds.lock().started + 1;
        let led = self.persist_until(c, target, Need::Flush).await?;
        Ok(Some(!led))
    }

    /// Whether someone waits for write-back to progress (so that the flusher
    /// must not wait for a guest FLUSH): a drain, a guest write that needs a
    /// slot or an older version written back, or stop.
    pub(super) fn writeback_is_awaited(&self) -> bool {
        let Some(c) = self.cache.as_ref() else {
            return false;
        };
        let st = &c.st;
        st.drain_requests.load(std::sync::atomic::Ordering::Acquire) > 0
            || st.space_waiters.load(std::sync::atomic::Ordering::Acquire) > 0
            || st.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wait for, or lead, rounds until round `target` (or a later one) has
    /// finished and given what `need` asks; its failure is the caller's.
    /// Returns whether the caller led one. A caller that needs a flush and
    /// finds only FUA rounds since `target` leads a flushing one.
    async fn persist_until(&self, c: &Cache, target: u64, need: Need) -> EngineResult<bool> {
        let mut led = false;
        loop {
            let lead = {
                let mut r = c.persist.rounds.lock();
                let met = match need {
                    Need::Flush => r.flushed >= target,
                    Need::Record => r.finished >= target,
                };
                if met || r.finished >= target {
                    // The round this caller relied on failed.
                    let relied = match need {
                        Need::Flush => &r.failed_flush,
                        Need::Record => &r.failed,
                    };
                    match relied {
                        Some((n, why)) if *n >= target => {
                            return Err(EngineError::new(EngineErrorKind::CacheIo, why.clone()))
                        }
                        _ if met => return Ok(led),
                        // Only FUA rounds since `target`: lead a flushing one.
                        _ => {}
                    }
                }
                if r.running {
                    None
                } else {
                    r.running = true;
                    r.started += 1;
                    let fua = need == Need::Record && r.started - r.flushed <= MAX_UNFLUSHED_ROUNDS;
                    Some((r.started, fua))
                }
            };
            match lead {
                Some((round, fua)) => {
                    led = true;
                    let res = match c.st.version {
                        crate::format::FormatVersion::V1 => {
                            self.persist_round(c).await.map(|()| true)
                        }
                        crate::format::FormatVersion::V2 => {
                            self.persist_round_v2(c, false, fua).await
                        }
                    };
                    let mut r = c.persist.rounds.lock();
                    r.running = false;
                    r.finished = round;
                    match &res {
                        Ok(true) => r.flushed = round,
                        Ok(false) => {}
                        Err(e) => {
                            r.failed = Some((round, e.to_string()));
                            if !fua {
                                r.failed_flush = Some((round, e.to_string()));
                            }
                        }
                    }
                    drop(r);
                    c.persist.done.notify(usize::MAX);
                    res?;
                }
                None => {
                    // Until the running round ends, or gives what is needed
                    // (the same test as above: a FLUSH that only FUA rounds
                    // met must not spin while another one runs).
                    wait_for(&c.persist.done, Duration::from_secs(1), || {
                        let r = c.persist.rounds.lock();
                        !r.running
                            || match need {
                                Need::Flush => r.flushed >= target,
                                Need::Record => r.finished >= target,
                            }
                    })
                    .await
                }
            }
        }
    }

    /// Blocking `persist`, for control operations and attach/detach.
    pub fn persist_blocking(&self) -> EngineResult<()> {
        super::blocking(self.persist())
    }

    async fn persist_round(&self, c: &Cache) -> EngineResult<()> {
        let st = &c.st;
        let (blocks, freed, cleaned) = {
            let _s = st.snap.write();
            let ids = st.meta_dirty.take();
            let blocks =
                encode_blocks(&c.codec, &c.layout, |slot| st.slots.get(slot).entry(), &ids);
            let freed = std::mem::take(&mut st.alloc.lock().pending_free);
            (blocks, freed, st.cleaned.take())
        };
        let res = async {
            c.store.sync_async().await?;
            if !blocks.is_empty() {
                let pieces: Vec<Piece<'_, EngineResult<()>>> = blocks
                    .iter()
                    .map(|(b, buf)| -> Piece<'_, EngineResult<()>> {
                        Box::pin(c.store.write_meta_async(*b, buf.slice_all()))
                    })
                    .collect();
                for r in join_all(pieces).await {
                    r?;
                }
                c.store.sync_async().await?;
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                let mut a = st.alloc.lock();
                for (slot, tag) in freed {
                    a.releasing.remove(&tag);
                    a.free.push(slot);
                }
                drop(a);
                c.ev.space.notify(usize::MAX);
                Ok(())
            }
            Err(e) => {
                // Nothing is lost: everything stays marked for the next attempt.
                for (b, _) in &blocks {
                    st.meta_dirty.set(*b);
                }
                st.alloc.lock().pending_free.extend(freed);
                for s in cleaned {
                    st.cleaned.set(s);
                }
                Err(e)
            }
        }
    }

    /// Evict clean lines in the background (once at a time), so that a miss
    /// that found no free slot finds one next time without waiting itself.
    pub(super) fn kick_refill(&self) {
        let Some(c) = self.cache.as_ref() else { return };
        if c.refilling.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let me = self.arc();
        let job = async move {
            let r = me.make_space().await;
            if let Some(c) = me.cache.as_ref() {
                c.refilling
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            if let Err(e) = r {
                tracing::debug!("background eviction: {e}");
            }
        };
        match rbd_backend::aio::spawn(job) {
            Ok(t) => t.detach(),
            Err(_) => c
                .refilling
                .store(false, std::sync::atomic::Ordering::Release),
        }
    }

    /// Make at least one slot free. Evicts a batch of clean lines (the policy
    /// picks them). Returns false (without waiting: the caller decides whether
    /// to wait for the flusher) when only dirty lines remain.
    pub(super) async fn make_space(&self) -> EngineResult<bool> {
        let c = self.cache.as_ref().expect("make_space with a cache");
        let st = &c.st;
        loop {
            if !st.alloc.lock().free.is_empty() {
                return Ok(true);
            }
            let candidates: Vec<u32> = {
                let mut ev = st.evict.write();
                let mut out = Vec::new();
                while out.len() < EVICT_BATCH {
                    let slots = &st.slots;
                    let mut usable = |s: u32| {
                        !slots.pinned(s) && slots.next(s) == NO_SLOT && !slots.get(s).is_dirty()
                    };
                    match ev.pop_victim(&mut usable) {
                        Some(v) => out.push(v),
                        None => break,
                    }
                }
                out
            };
            let mut released = 0;
            for v in candidates {
                let tag = st.slots.tag(v);
                if tag == super::slots::FREE {
                    continue;
                }
                let mut sh = st.map.shard(tag).write();
                let r = st.slots.get(v);
                let ok = r.tag == tag
                    && sh.head(&st.slots, tag) == Some(v)
                    && !r.is_dirty()
                    && r.next == NO_SLOT
                    && !sh.is_locked(tag)
                    && !st.slots.pinned(v);
                if ok {
                    st.release(&mut sh, v);
                    released += 1;
                } else if !r.is_free() && !r.is_dirty() && r.next == NO_SLOT {
                    // Busy now; keep it a candidate for later.
                    st.evict.write().insert(v);
                }
            }
            let pending = !st.alloc.lock().pending_free.is_empty();
            if released > 0 || pending {
                self.persist().await?;
                continue;
            }
            if st.stopping.load(std::sync::atomic::Ordering::Acquire) {
                return Err(EngineError::new(
                    EngineErrorKind::Stopped,
                    "engine stopping",
                ));
            }
            return Ok(false);
        }
    }

    /// Close the current epoch and wait until it and everything before it is on
    /// the backend (and flushed there).
    pub(super) async fn writeback_barrier(&self) -> EngineResult<()> {
        self.drain_until(false, None).await
    }

    /// Write back all dirty data and wait for it, logging progress. Used at stop,
    /// at attach in a mode that holds no dirty data, and by `ctl flush`.
    pub fn drain(&self) -> EngineResult<()> {
        self.drain_with_progress(None)
    }

    /// `drain`, reporting progress (bytes of the dirty data found at the start
    /// that are written back) about twice a second when given a callback.
    pub fn drain_with_progress(&self, progress: Option<ProgressFn<'_>>) -> EngineResult<()> {
        super::blocking(async {
            self.drain_until(true, progress).await?;
            self.persist().await
        })
    }

    async fn drain_until(&self, log: bool, progress: Option<ProgressFn<'_>>) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        let st = &c.st;
        st.drain_requests
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _done = DrainRequest(st);
        let target = { st.epochs.lock().close() };
        c.ev.flusher.notify(usize::MAX);
        let start = Instant::now();
        let mut last_log = Instant::now();
        let mut last_progress = Instant::now();
        let dirty_bytes = || {
            st.dirty_sectors
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(0) as u64
                * SECTOR
        };
        let total = dirty_bytes();
        let report = || {
            if let Some(p) = progress {
                p(&Progress {
                    phase: "write-back".into(),
                    done: total.saturating_sub(dirty_bytes()),
                    total,
                });
            }
        };
        let done = || {
            let e = st.epochs.lock();
            e.oldest_pending().is_none_or(|p| p > target)
                && e.oldest_applying().is_none_or(|a| a > target)
                && e.writing.is_none_or(|w| w > target)
        };
        loop {
            if done() {
                report();
                break;
            }
            if last_progress.elapsed() >= Duration::from_millis(500) {
                report();
                last_progress = Instant::now();
            }
            if log && last_log.elapsed() >= Duration::from_secs(2) {
                info!(
                    dirty_lines = st.dirty_lines(),
                    elapsed_s = start.elapsed().as_secs(),
                    "write-back in progress"
                );
                last_log = Instant::now();
            }
            if self.flusher_gone() {
                return Err(EngineError::new(
                    EngineErrorKind::Stopped,
                    "the flusher is not running; dirty data stays in the cache",
                ));
            }
            wait_for(&c.ev.progress, Duration::from_millis(200), done).await;
        }
        if log {
            info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "write-back complete"
            );
        }
        Ok(())
    }

    /// Format v2: whether a guest FLUSH finds everything the cache holds
    /// durable already, so that it need not cost a device flush (a guest
    /// FLUSHes again and again with nothing written in between: an idle
    /// filesystem's timer, a database's second barrier). Every data write and
    /// every change of a line changes its slot's record, so no changed record,
    /// no checksum waiting to be logged and no slot waiting for release mean
    /// that the last round covered all of it; that round must have finished,
    /// and well, and flushed (a FUA write's round leaves the other data it
    /// logged unflushed). The state is read before the rounds: a round takes the
    /// changes only after it has been marked running, so a round that took
    /// them and is not done yet is seen running.
    fn nothing_to_persist(&self, c: &Cache) -> bool {
        let st = &c.st;
        if st.version != crate::format::FormatVersion::V2 {
            return false;
        }
        let unlogged = !st.slot_changed.is_empty()
            || !st.fresh.lock().is_empty()
            || !st.alloc.lock().pending_free.is_empty()
            || st.log.lock().must_checkpoint;
        if unlogged {
            return false;
        }
        let r = c.persist.rounds.lock();
        r.finished > 0
            && !r.running
            && r.started == r.finished
            && r.flushed == r.finished
            && r.failed.as_ref().is_none_or(|(n, _)| *n != r.finished)
    }

    fn flusher_gone(&self) -> bool {
        self.flusher.lock().as_ref().is_none_or(|h| h.is_finished())
    }

    /// Format v2: whether a FUA write may take the one-pass path: its data
    /// written durable (`WriteMode::Durable`), then a round that writes its
    /// record durable and flushes nothing. Only where a FUA write needs no
    /// more than the cache (`back`, `offline`: no backend flush), and while
    /// ordering holds (a round then writes data durable first anyway), on a
    /// cache device where a durable write is one (else two durable writes
    /// would cost two flushes, where the usual round costs one).
    pub(super) fn fua_in_one_pass(&self) -> bool {
        let Some(c) = self.cache.as_ref() else {
            return false;
        };
        let action = self.mode().flush_action();
        c.st.version == crate::format::FormatVersion::V2
            && c.store.durable_writes_are_native()
            && self.mode().write_route() == policies::WriteRoute::CacheDirty
            && action.persist_cache
            && !action.flush_backend
            && c.st
                .order_broken_since
                .load(std::sync::atomic::Ordering::Acquire)
                == 0
    }

    /// How many writes have gone in place so far: taken before a FUA write's
    /// data (see `fua_one_pass`).
    pub(super) fn in_place_mark(&self) -> u64 {
        self.cache()
            .map_or(0, |c| c.st.epochs.lock().in_place_begun)
    }

    /// The durability step of a FUA write whose data went durable already
    /// (`fua_in_one_pass`): close the epoch, as every FUA does in format v2,
    /// and make its entry durable with one record write. `mark` is
    /// `in_place_mark` from before its data, `own` how many of its lines went
    /// in place. If another write went in place since, it may have rewritten a
    /// sector of this one (a partial or overlapping write the guest had in
    /// flight): the record would carry that write's checksum over data that
    /// no flush made durable, and recovery would drop the sector with this
    /// write's bytes in it. Then the round flushes, as before.
    pub(super) async fn fua_one_pass(&self, mark: u64, own: u64) -> EngineResult<()> {
        super::Stats::add(&self.stats.flushes, 1);
        self.note_guest_durability();
        let Some(c) = self.cache() else {
            return Ok(());
        };
        self.close_epoch_for_durability(c).await;
        if self.in_place_mark() - mark > own {
            return self.persist().await;
        }
        super::Stats::add(&self.stats.fua_one_pass, 1);
        self.persist_record().await
    }

    /// Format v2: close the open epoch for a guest FLUSH or FUA write, and
    /// wait until no write that took the closed epoch is still going in place.
    /// Such a write (one the guest issued before this request completed) may
    /// be rewriting a version that the coming round logs, after the round took
    /// that version's checksums: recovery would then find the sector not
    /// matching and drop it, and with it the data this request promises. Once
    /// the write has applied, its own checksum is the one logged. A write into
    /// a new slot is not waited for (the round logs none of its data). The
    /// wait is one cache write, or the backend read that completes a partial
    /// sector (bounded by the backend's timeout).
    async fn close_epoch_for_durability(&self, c: &Cache) {
        let closed = c.st.epochs.lock().close();
        c.ev.flusher.notify(usize::MAX);
        let applied = || {
            c.st.epochs
                .lock()
                .applying_in_place
                .keys()
                .next()
                .is_none_or(|&a| a > closed)
        };
        while !applied() {
            wait_for(&c.ev.applied, Duration::from_millis(100), applied).await;
        }
    }

    /// FLUSH (`guest` true) or the durability step of a FUA write.
    pub(super) async fn flush_impl(&self, guest: bool) -> EngineResult<()> {
        super::Stats::add(&self.stats.flushes, 1);
        self.note_guest_durability();
        let action = self.mode().flush_action();
        if let Some(c) = self.cache() {
            // Format v2 closes the epoch at a FUA write too: its data must not be
            // overwritten in place once a round has logged it (see `log`).
            if action.close_epoch && c.st.version == crate::format::FormatVersion::V2 {
                self.close_epoch_for_durability(c).await;
            } else if action.close_epoch && guest {
                c.st.epochs.lock().close();
                c.ev.flusher.notify(usize::MAX);
            }
            if action.persist_cache {
                if guest && self.nothing_to_persist(c) {
                    super::Stats::add(&self.stats.flushes_with_nothing_new, 1);
                } else {
                    self.persist().await?;
                }
            }
        }
        if action.flush_backend {
            self.backend_flush().await?;
        }
        Ok(())
    }
}

struct DrainRequest<'a>(&'a super::state::State);

impl Drop for DrainRequest<'_> {
    fn drop(&mut self) {
        self.0
            .drain_requests
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
