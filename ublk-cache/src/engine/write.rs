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
use super::slots::{Rec, NO_SLOT};
use super::state::{Allocation, MAX_CHAIN};
use super::sync::{join_all, wait_for, Piece};
use super::{bits, Cache, Engine, Stats, SECTOR};
use crate::error::{EngineError, EngineResult};
use crate::format::FormatVersion;

/// How long an ordered overwrite waits for write-back of the older epoch
/// while write-back is failing, before it goes in place.
const ORDERED_WAIT_DURING_OUTAGE: Duration = Duration::from_secs(2);
/// Format v2, relaxed order: how long a write waits for the flusher to free a
/// slot for a new version before it goes in place.
const RELAXED_WAIT_FOR_VERSION: Duration = Duration::from_millis(200);

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

    /// Write `src` at `offset` as the mode routes it. `mode` is how the cache
    /// copy of a write-back write goes (`Durable` for a FUA write taking the
    /// one-pass path; see `fua_in_one_pass`). Returns how many of its lines
    /// went in place over data of their epoch's version.
    pub(super) async fn write_impl(
        &self,
        offset: u64,
        src: BufSlice,
        mode: WriteMode,
    ) -> EngineResult<u64> {
        Stats::add(&self.stats.write_bytes, src.len() as u64);
        let Some(c) = self.cache() else {
            Stats::add(&self.stats.write_misses, 1);
            return self.backend_write(offset, src).await.map(|()| 0);
        };
        let route = self.mode().write_route();
        let mut done = 0usize;
        let mut pieces: Vec<Piece<'_, EngineResult<(LineWrite, u64)>>> = Vec::new();
        for (tag, a, n) in self.split(offset, src.len() as u64) {
            let piece = src.sub(done, n as usize);
            done += n as usize;
            pieces.push(Box::pin(async move {
                let through = |cached| LineWrite {
                    cached,
                    in_place: false,
                };
                let w = match route {
                    WriteRoute::CacheDirty => self.write_line_dirty(c, tag, a, piece, mode).await?,
                    WriteRoute::BackendThenCache => {
                        through(self.write_line_through(c, tag, a, piece, true).await?)
                    }
                    WriteRoute::BackendInvalidate => {
                        through(self.write_line_through(c, tag, a, piece, false).await?)
                    }
                };
                Ok((w, n))
            }));
        }
        let (mut hit, mut miss, mut in_place) = (0, 0, 0);
        let mut first_err = None;
        for r in join_all(pieces).await {
            match r {
                Ok((w, n)) => {
                    if w.cached {
                        hit += n;
                    } else {
                        miss += n;
                    }
                    in_place += u64::from(w.in_place);
                }
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
        Ok(in_place)
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

    /// Drop sectors `s0..s1` of `tag` from the cache (every version). The caller
    /// holds the line lock.
    pub(super) fn invalidate_locked(&self, c: &Cache, tag: u64, s0: u32, s1: u32) {
        let st = &c.st;
        let mut sh = st.map.shard(tag).write();
        let rng = bits::range(s0, s1);
        for slot in st.chain(&sh, tag) {
            let r = st.slots.get(slot);
            let valid = bits::and_not(&r.valid, &rng);
            if valid == r.valid {
                continue;
            }
            let is_head = sh.head(&st.slots, tag) == Some(slot);
            if bits::is_empty(&valid) && !is_head {
                st.remove_version(&mut sh, slot);
                continue;
            }
            let new = Rec {
                valid,
                dirty: bits::and_not(&r.dirty, &rng),
                ..r
            };
            st.set_rec(&mut sh, slot, new, true);
        }
    }

    /// Write-back: the data goes to the cache, marked dirty in the current epoch.
    /// Returns whether the line was cached already, and whether the write went
    /// in place.
    ///
    /// Format v2 keeps a version per epoch: a write into a line whose newest
    /// version belongs to a closed epoch (not yet durably written back) goes to
    /// a new version in another slot (copy-on-write), so the older epoch's data
    /// stays frozen until it is on the backend, and the write never waits for
    /// the write-back while a slot is free. Format v1 has one slot per line: an
    /// ordered overwrite of an older epoch's data waits for its write-back.
    async fn write_line_dirty(
        &self,
        c: &Cache,
        tag: u64,
        a: u64,
        data: BufSlice,
        mode: WriteMode,
    ) -> EngineResult<LineWrite> {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let b = a + data.len() as u64;
        let (s0, s1) = sectors(a, b);
        let v2 = st.version == FormatVersion::V2;
        let started = Instant::now();
        // Offline mode: whether the last wait for space was a reclaiming
        // write-back (the next one waits for space instead, see below).
        let mut reclaimed = false;
        loop {
            let guard = st.map.lock(tag).await;
            enum Next {
                /// Write into `slot`; `fresh`: mapped for this write; `reset`: a
                /// clean version that becomes the open epoch's.
                Go {
                    slot: u32,
                    fresh: bool,
                    reset: bool,
                },
                /// v1: make the line's clean state durable first.
                PersistFirst,
                WaitFlusher,
                Persist,
                Space,
                /// v2: no slot for a new version and none will come: give up
                /// ordering (durably) and write in place.
                GiveUpOrdering,
                /// v2: the epoch was closed between taking it and deciding to
                /// go in place: decide again (in the next epoch).
                Retry,
            }
            // The epoch is taken under the shard lock, together with the decision
            // it governs: a FLUSH between the two would let this write go in
            // place over the older epoch's data.
            let mut over_closed = false;
            let (epoch, next) = {
                let mut sh = st.map.shard(tag).write();
                let epoch = st.epochs.lock().begin_apply();
                let next = match sh.head(&st.slots, tag) {
                    None => match st.map_free_slot(&mut sh, tag) {
                        Allocation::Slot(s) => Next::Go {
                            slot: s,
                            fresh: true,
                            reset: false,
                        },
                        Allocation::Releasing => Next::Persist,
                        Allocation::NoFree => Next::Space,
                    },
                    Some(s) if v2 => {
                        if !self.order.overwrite_waits_for_older_epoch()
                            && st.slots.epoch(s) != epoch
                        {
                            let n = st.drop_superseded(&mut sh, tag);
                            Stats::add(&self.stats.versions_superseded, n as u64);
                        }
                        let r = st.slots.get(s);
                        let broken = st.order_broken_durable.load(Ordering::Acquire);
                        if r.epoch == epoch {
                            Next::Go {
                                slot: s,
                                fresh: false,
                                reset: false,
                            }
                        } else if r.next == NO_SLOT
                            && !r.is_dirty()
                            && r.epoch <= st.flushed_durable.load(Ordering::Acquire)
                        {
                            // Clean, and durably so: its old data is on the backend.
                            Next::Go {
                                slot: s,
                                fresh: false,
                                reset: true,
                            }
                        } else if broken {
                            // Ordering is given up already: in place, as in v1.
                            over_closed = true;
                            Next::Go {
                                slot: s,
                                fresh: false,
                                reset: false,
                            }
                        } else if st.chain(&sh, tag).len() >= MAX_CHAIN {
                            // The line has as many versions as it may; during an
                            // outage no write-back will shorten the chain.
                            if self.cannot_wait_for_space(started) {
                                Next::GiveUpOrdering
                            } else {
                                Next::WaitFlusher
                            }
                        } else {
                            match st.map_version(&mut sh, tag, s) {
                                Allocation::Slot(n) => Next::Go {
                                    slot: n,
                                    fresh: true,
                                    reset: false,
                                },
                                Allocation::Releasing => Next::Persist,
                                Allocation::NoFree if self.cannot_wait_for_space(started) => {
                                    Next::GiveUpOrdering
                                }
                                Allocation::NoFree => Next::Space,
                            }
                        }
                    }
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
                        } else if self.order.overwrite_waits_for_older_epoch() && st.cleaned.test(s)
                        {
                            // In place over a line the flusher cleaned since the last
                            // persist: its durable entry may still call the line dirty
                            // in an older epoch, and after a power cut recovery would
                            // write this newer data back as that epoch. Make the clean
                            // state durable first.
                            Next::PersistFirst
                        } else {
                            Next::Go {
                                slot: s,
                                fresh: false,
                                reset: false,
                            }
                        }
                    }
                };
                // A write that goes in place over data of its epoch registers
                // as such together with a check that its epoch is still open,
                // under one hold of the epochs lock: a FLUSH or FUA that closes
                // the epoch then either sees it (and waits for it) or comes
                // first (and the write takes a new version). Only the first
                // epoch take and this check are apart; a close between them is
                // what `Retry` is for. A clean version becoming the epoch's
                // (`reset`) holds no data a round promised: not counted.
                // A write over a closed epoch's version checks, in the same
                // hold, that ordering is still given up: the flusher restores
                // it under this lock only while no such write applies.
                let next = match next {
                    Next::Go {
                        fresh: false,
                        reset: false,
                        ..
                    } => {
                        let mut e = st.epochs.lock();
                        let restored =
                            over_closed && !st.order_broken_durable.load(Ordering::Acquire);
                        if v2 && (e.cur != epoch || restored) {
                            e.end_apply(epoch);
                            Next::Retry
                        } else {
                            e.begin_in_place(epoch);
                            if over_closed {
                                e.over_closed_in_place += 1;
                            }
                            next
                        }
                    }
                    n @ Next::Go { .. } => n,
                    n => {
                        st.epochs.lock().end_apply(epoch);
                        n
                    }
                };
                if !matches!(next, Next::Go { .. }) {
                    c.ev.applied.notify(usize::MAX);
                }
                (epoch, next)
            };
            let (slot, fresh, reset) = match next {
                Next::Go { slot, fresh, reset } => (slot, fresh, reset),
                Next::PersistFirst | Next::Persist => {
                    drop(guard);
                    self.persist().await?;
                    continue;
                }
                Next::WaitFlusher => {
                    // The older epoch's data must reach the backend first (v1), or the
                    // line has as many versions as it may (v2). Let the flusher work.
                    drop(guard);
                    let _waiting = st.waiting_for_space();
                    c.ev.flusher.notify(usize::MAX);
                    wait_for(&c.ev.progress, Duration::from_millis(50), || false).await;
                    continue;
                }
                Next::Space => {
                    drop(guard);
                    // Holding no line lock, waiting for space cannot block the
                    // flusher. The wait is short so that the decision above is
                    // taken again (an outage may end it with GiveUpOrdering).
                    if !self.make_space().await? {
                        // Only dirty lines left: write-back must not wait for
                        // a guest FLUSH now.
                        let _waiting = st.waiting_for_space();
                        if !self.mode().writes_back_continuously() && !reclaimed {
                            reclaimed = true;
                            self.reclaim_versions_by_write_back().await?;
                        } else {
                            // A reclaim that freed nothing this write can take
                            // (slots pinned by reads, or busy) must not spin:
                            // wait as in `back`, then it may reclaim again.
                            reclaimed = false;
                            c.ev.flusher.notify(usize::MAX);
                            wait_for(&c.ev.space, Duration::from_millis(100), || {
                                !st.alloc.lock().free.is_empty()
                            })
                            .await;
                        }
                    }
                    continue;
                }
                Next::GiveUpOrdering => {
                    drop(guard);
                    self.give_up_ordering_durably().await?;
                    continue;
                }
                Next::Retry => {
                    drop(guard);
                    continue;
                }
            };
            let applying = Applying {
                c,
                epoch,
                in_place: !fresh && !reset,
                over_closed,
            };
            // Partly covered sectors are completed from the newest version that
            // holds them, else from the backend.
            let edges = {
                let sh = st.map.shard(tag).read();
                st.resolve(&sh, tag, s0, s1)
            };
            let res = self
                .fill_and_write(c, tag * ls, SlotWrite { slot, at: a, mode }, &data, &edges)
                .await;
            let mut sh = st.map.shard(tag).write();
            // The write leaves its epoch only once its record is in (and, when
            // newly dirty, its slot in the epoch's pending list): the flusher
            // takes an epoch once nothing applies to it, and a slot listed after
            // that would be written back in a later step, one its watermark no
            // longer covers the first step's versions in.
            let res = res.map(|crcs| {
                let r = st.slots.get(slot);
                let rng = bits::range(s0, s1);
                let dirty = if reset { rng } else { bits::or(&r.dirty, &rng) };
                let new = Rec {
                    valid: bits::or(&r.valid, &rng),
                    dirty,
                    epoch,
                    ..r
                };
                st.set_rec_written(&mut sh, slot, new, &crcs);
            });
            let in_place = applying.in_place;
            applying.end();
            match res {
                Ok(()) => {
                    drop(sh);
                    drop(guard);
                    c.ev.flusher.notify(1);
                    return Ok(LineWrite {
                        cached: !fresh || st.slots.next(slot) != NO_SLOT,
                        in_place,
                    });
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

    /// Format v2: whether a write that needs a slot for a new version must
    /// not wait for one: in offline mode nothing writes back while serving,
    /// relaxed order has no order to keep, and while write-back fails (an
    /// outage) a guest write must not hang behind it.
    fn cannot_wait_for_space(&self, started: Instant) -> bool {
        if !self.mode().writes_back_continuously() {
            return true;
        }
        // Relaxed order keeps no order worth a long wait (v1 writes such data
        // in place at once): a short one lets a working flusher free a slot.
        if !self.order.overwrite_waits_for_older_epoch() {
            return started.elapsed() >= RELAXED_WAIT_FOR_VERSION;
        }
        let stalled = self.since_writeback_progress() >= ORDERED_WAIT_DURING_OUTAGE;
        let failing = self.writeback_failing.load(Ordering::Acquire);
        started.elapsed() >= ORDERED_WAIT_DURING_OUTAGE && (failing || stalled)
    }

    /// A line not cached yet needs a slot and none can be freed: every slot
    /// holds dirty data or a line's older version. Offline mode writes back
    /// only at stop, so nothing would ever free one and the write would wait
    /// forever: write back every closed epoch now, in order, which lets the
    /// older versions go (and their slots free) while the cache keeps every
    /// line, clean.
    async fn reclaim_versions_by_write_back(&self) -> EngineResult<()> {
        // Logged once; `offline_writebacks_for_space` counts them all.
        let before = self
            .stats
            .offline_writebacks_for_space
            .fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            warn!(
                "offline mode: no cache slot is left for a line not copied in yet (versions of lines \
                 rewritten after a FLUSH fill the room beside the image), so dirty data is written back \
                 now to reclaim them (again whenever this recurs; counted in \
                 offline_writebacks_for_space)"
            );
        }
        self.writeback_barrier().await
    }

    /// Format v2: from now on writes may go in place over older epochs' data,
    /// so the backend alone is not a flush-point state until a full drain. That
    /// is recorded durably (the round also makes its data durable first, as
    /// every round does while ordering is given up) before the first such write.
    async fn give_up_ordering_durably(&self) -> EngineResult<()> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(());
        };
        // Under the epochs lock, as the flusher restores ordering: the
        // generation tells whether the flag this round carries is still the
        // one in force when the round has ended.
        let (newly, generation) = {
            let mut e = c.st.epochs.lock();
            let newly =
                c.st.order_broken_since
                    .compare_exchange(0, e.cur, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if newly {
                e.order_changes += 1;
            }
            (newly, e.order_changes)
        };
        if newly {
            if !self.order.overwrite_waits_for_older_epoch()
                && self.mode().writes_back_continuously()
            {
                // Relaxed order never promised a crash-consistent backend.
                tracing::info!(
                    "relaxed write-back: no cache space for a new version of a line, so overwrites go in \
                     place (each metadata round flushes the data first) until write-back catches up"
                );
            } else {
                Stats::add(&self.stats.ordered_overwrites_in_place, 1);
                warn!(
                    "no cache space is left for a new version of data the backend does not have yet ({}): writes \
                     now go in place over older epochs' data, so until a full write-back completes the backend \
                     alone is not crash-consistent (the cache holds every acknowledged write)",
                    if self.mode().writes_back_continuously() {
                        "write-back is failing"
                    } else {
                        "offline mode writes back only at stop"
                    }
                );
            }
        }
        // The round starts after the flag was set, so it carries it (and
        // writes data durable first); only once it ended well may writes go
        // in place (`order_broken_durable`). Unless ordering was restored
        // meanwhile (and perhaps given up again, by a round not ended yet):
        // then the writer decides again.
        self.persist().await?;
        let e = c.st.epochs.lock();
        if e.order_changes == generation {
            c.st.order_broken_durable.store(true, Ordering::Release);
        }
        Ok(())
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

    /// Write `data` at byte `to.at` of slot `to.slot`, which holds the line at
    /// backend byte `line_base`, completing partly covered 4 KiB sectors from
    /// where `edges` (the line's resolved sectors) says they are: the cache,
    /// or the backend. Returns the crc32c of every whole sector written
    /// (format v2 logs them).
    async fn fill_and_write(
        &self,
        c: &Cache,
        line_base: u64,
        to: SlotWrite,
        data: &BufSlice,
        edges: &[(u32, u32, Option<u32>)],
    ) -> EngineResult<Vec<(u16, u32)>> {
        let SlotWrite { slot, at: a, mode } = to;
        let b = a + data.len() as u64;
        let want_crcs = c.st.version == FormatVersion::V2;
        let crcs_of = |bytes: &[u8], first: u64| -> Vec<(u16, u32)> {
            if !want_crcs {
                return Vec::new();
            }
            sector_crcs(bytes, first)
        };
        if a.is_multiple_of(SECTOR) && b.is_multiple_of(SECTOR) {
            // SAFETY: this request owns `data` while it runs; nothing writes it.
            let crcs = crcs_of(unsafe { data.request_bytes() }, a);
            c.store.write_async(slot, a, data.clone(), mode).await?;
            return Ok(crcs);
        }
        let (s0, s1) = sectors(a, b);
        let start = s0 as u64 * SECTOR;
        let mut buf = DmaBuf::new(((s1 - s0) as u64 * SECTOR) as usize);
        let mut edge = vec![s0];
        if s1 - 1 != s0 {
            edge.push(s1 - 1);
        }
        for s in edge {
            let off = s as u64 * SECTOR;
            if a <= off && off + SECTOR <= b {
                continue;
            }
            let part = buf.slice((off - start) as usize, SECTOR as usize);
            let src = edges
                .iter()
                .find(|(x, y, _)| (*x..*y).contains(&s))
                .and_then(|e| e.2);
            match src {
                Some(from) => c.store.read_async(from, off, part).await?,
                None => self.guest_backend_read(line_base + off, part).await?,
            }
        }
        let crcs = {
            let bytes = buf.bytes_mut().expect("edge reads finished");
            // SAFETY: this request owns `data` while it runs; nothing writes it.
            let src = unsafe { data.request_bytes() };
            bytes[(a - start) as usize..(b - start) as usize].copy_from_slice(src);
            crcs_of(bytes, start)
        };
        c.store
            .write_async(slot, start, buf.slice_all(), mode)
            .await?;
        Ok(crcs)
    }
}

/// What writing one line of a request did.
struct LineWrite {
    /// The line was cached already (for the hit/miss counts).
    cached: bool,
    /// It went in place over data of a version of its epoch (not a clean
    /// version becoming the epoch's).
    in_place: bool,
}

/// Where a guest write goes in the cache, and how.
#[derive(Clone, Copy)]
struct SlotWrite {
    slot: u32,
    /// Byte within the line.
    at: u64,
    /// `Durable` for a FUA write taking the one-pass path.
    mode: WriteMode,
}

/// (sector in its line, crc32c) of each whole 4 KiB sector of `bytes`, which
/// start at byte `first` of the line (format v2 logs them with the entry).
pub(super) fn sector_crcs(bytes: &[u8], first: u64) -> Vec<(u16, u32)> {
    bytes
        .chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, ch)| ((first / SECTOR) as u16 + i as u16, crc32c::crc32c(ch)))
        .collect()
}

/// A guest write's hold on its epoch from its decision until its entry is
/// set ([`Applying::end`]). Deliberately not ended on drop: a write whose
/// future is dropped half way may still land (a request the event loop has
/// submitted runs to its end), so its counts stay and a FLUSH waits for ever,
/// visibly, rather than log a checksum the data is about to change. No path
/// drops these futures today.
struct Applying<'a> {
    c: &'a Cache,
    epoch: u64,
    /// Goes in place over data a round may have logged (see
    /// `Engine::close_epoch_for_durability`).
    in_place: bool,
    /// Goes in place over a closed epoch's version (ordering given up).
    over_closed: bool,
}

impl Applying<'_> {
    /// The write is applied: it leaves its epoch and the in-place counts.
    fn end(self) {
        {
            let mut e = self.c.st.epochs.lock();
            if self.in_place {
                e.end_in_place(self.epoch);
            }
            if self.over_closed {
                e.over_closed_in_place -= 1;
            }
            e.end_apply(self.epoch);
        }
        self.c.ev.applied.notify(usize::MAX);
    }
}
