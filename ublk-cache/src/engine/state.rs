//! The engine's in-memory view of the cache and the rules for changing it.
//!
//! Pieces, each with its own short lock (none is ever held across I/O):
//! - [`SlotTable`]: one record per slot (atomics);
//! - [`LineMap`]: line → newest version, in shards, plus the per-line locks;
//! - `snap`: taken shared by every record change and exclusively by the metadata
//!   snapshot, so that the snapshot sees whole records;
//! - [`Alloc`]: free slots and slots waiting until their release is durable;
//! - [`Epochs`]: the open epoch, writes being applied per epoch, and the dirty
//!   versions per epoch (what write-back works through);
//! - the eviction policy (CLOCK by default; a hit only sets a bit).
//!
//! Lock order where nested: line lock → shard → snap → {evict, epochs, alloc}.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use policies::EvictionPolicy;

use super::bits;
use super::map::{LineMap, Shard};
use super::shadow::Shadow;
use super::slots::{Rec, SlotTable, FREE, NO_SLOT};
use crate::format::{FormatVersion, LineEntry};

/// Versions of one line at most; a write that would make more waits for the
/// write-back (reads walk the chain, and every version holds a slot).
pub const MAX_CHAIN: usize = 16;

/// Where the format-v2 metadata log stands.
#[derive(Debug, Default)]
pub struct LogState {
    /// Sequence number of the last record written (or of the checkpoint).
    pub seq: u64,
    /// The last record the active checkpoint includes.
    pub ckpt_seq: u64,
    pub active_table: u32,
    /// First block of the records after the checkpoint, and the next free one.
    pub start: u32,
    pub head: u32,
    /// Blocks in use since the checkpoint.
    pub used: u32,
    /// A round failed (a checkpoint's changes are in no record; a record may
    /// be on the device under a sequence number its retry reuses): the next
    /// round must be a checkpoint.
    pub must_checkpoint: bool,
    /// A checkpoint whose superblock write failed: it may be on the device
    /// or not, so its table is neither written again nor given up until the
    /// same superblock (same sequence, same copy) is written again.
    pub unsure: Option<UnsureCheckpoint>,
}

/// See [`LogState::unsure`].
#[derive(Debug, Clone)]
pub struct UnsureCheckpoint {
    pub sb: crate::format::Superblock,
    pub table: u32,
    pub seq: u64,
    pub flushed: u64,
}

/// Free slots and releases in progress.
#[derive(Default)]
pub struct Alloc {
    /// Slots whose on-disk entry says free: safe to fill with new data.
    pub free: Vec<u32>,
    /// Slots freed in memory whose on-disk entry may still name the old line.
    /// They join `free` only once that entry is durably gone, so a reused slot can
    /// never make the old line read the new line's data after a crash.
    pub pending_free: Vec<(u32, u64)>,
    /// Lines whose old slot is in `pending_free`. Such a line is not mapped again
    /// until that release is durable, so two on-disk entries never name the same
    /// line (a multi-block metadata write is not atomic).
    pub releasing: HashSet<u64>,
}

/// Write-back epochs.
pub struct Epochs {
    /// The epoch new writes join. A guest FLUSH closes it.
    pub cur: u64,
    /// Writes being applied, by epoch: an epoch can gain data until this drops to 0.
    pub applying: BTreeMap<u64, u32>,
    /// The part of `applying` that goes in place over data of its epoch's
    /// version (whose sectors a round may have logged with their checksums;
    /// see `Engine::close_epoch_for_durability`).
    pub applying_in_place: BTreeMap<u64, u32>,
    /// In-place writes ever begun (see `Engine::fua_one_pass`).
    pub in_place_begun: u64,
    /// In-place writes over a closed epoch's version (ordering given up)
    /// still being applied: ordering is restored only when there are none
    /// (see `Engine::clean_v2`), counted under this lock together with the
    /// writer's check that ordering is still given up.
    pub over_closed_in_place: u32,
    /// Times ordering was given up or restored (`order_broken_since` set or
    /// cleared, always under this lock): a writer that gave it up marks it
    /// durable only if nothing changed while its round ran.
    pub order_changes: u64,
    /// Slots that became dirty in each epoch (possibly stale: a slot may have
    /// been written back, rewritten in a later epoch or freed since; readers
    /// check the slot's record).
    pub pending: BTreeMap<u64, Vec<u32>>,
    /// The oldest epoch of the step the flusher is writing back (its lines are
    /// out of `pending` meanwhile, but not on the backend yet).
    pub writing: Option<u64>,
    /// When the open epoch got its first dirty line (the flusher closes an
    /// epoch that has held dirty data long enough without a guest FLUSH).
    pub opened: Instant,
}

impl Epochs {
    pub fn new(cur: u64) -> Self {
        Epochs {
            cur,
            applying: BTreeMap::new(),
            applying_in_place: BTreeMap::new(),
            in_place_begun: 0,
            over_closed_in_place: 0,
            order_changes: 0,
            pending: BTreeMap::new(),
            writing: None,
            opened: Instant::now(),
        }
    }

    /// Close the open epoch: new writes join the next one. Returns the closed one.
    pub fn close(&mut self) -> u64 {
        self.open(self.cur + 1);
        self.cur - 1
    }

    /// Make `epoch` the open one (at attach, or to skip past a pending one).
    pub fn open(&mut self, epoch: u64) {
        self.cur = epoch;
        self.opened = Instant::now();
    }

    pub fn begin_apply(&mut self) -> u64 {
        let e = self.cur;
        *self.applying.entry(e).or_insert(0) += 1;
        e
    }

    pub fn end_apply(&mut self, epoch: u64) {
        if let Some(n) = self.applying.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.applying.remove(&epoch);
            }
        }
    }

    /// A write of `epoch` (begun with `begin_apply`) goes in place.
    pub fn begin_in_place(&mut self, epoch: u64) {
        *self.applying_in_place.entry(epoch).or_insert(0) += 1;
        self.in_place_begun += 1;
    }

    /// The in-place write of `epoch` is applied (before its `end_apply`).
    pub fn end_in_place(&mut self, epoch: u64) {
        if let Some(n) = self.applying_in_place.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.applying_in_place.remove(&epoch);
            }
        }
    }

    pub fn oldest_pending(&self) -> Option<u64> {
        self.pending.keys().next().copied()
    }

    pub fn oldest_applying(&self) -> Option<u64> {
        self.applying.keys().next().copied()
    }

    /// Whether the oldest epoch with dirty data is closed and fully applied
    /// (the flusher can take a step from it).
    pub fn has_closed_pending(&self) -> bool {
        self.oldest_pending().is_some_and(|p| self.is_closed(p))
    }

    /// Whether epoch `ep` is closed with no write of it still being applied:
    /// its versions are frozen, and write-back may take it.
    pub fn is_closed(&self, ep: u64) -> bool {
        ep < self.cur && self.oldest_applying().is_none_or(|a| a > ep)
    }
}

/// A set of small integers as atomic bits (metadata blocks to write, slots
/// cleaned since the last persist).
pub struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    pub fn new(n: usize) -> Self {
        AtomicBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn set(&self, i: u32) {
        let w = &self.0[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        if w.load(Ordering::Relaxed) & m == 0 {
            w.fetch_or(m, Ordering::AcqRel);
        }
    }

    pub fn test(&self, i: u32) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Take every set bit (clearing them).
    pub fn take(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (wi, w) in self.0.iter().enumerate() {
            let mut v = w.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros();
                out.push(wi as u32 * 64 + b);
                v &= v - 1;
            }
        }
        out
    }

    pub fn clear_all(&self) {
        for w in &self.0 {
            w.store(0, Ordering::Release);
        }
    }
}

pub struct State {
    pub slots: SlotTable,
    pub map: Arc<LineMap>,
    pub snap: RwLock<()>,
    pub alloc: Mutex<Alloc>,
    pub epochs: Mutex<Epochs>,
    /// Shared for hits (CLOCK sets a bit under it), exclusive for the rest.
    pub evict: RwLock<Box<dyn EvictionPolicy>>,
    /// Metadata blocks whose on-disk copy is out of date.
    pub meta_dirty: AtomicBits,
    /// Slots whose dirty data the flusher wrote back since the last persist
    /// (their on-disk entry may still say dirty, in an older epoch).
    pub cleaned: AtomicBits,
    pub entries_per_block: u32,
    /// Read-locked by every entry change (shared: the shadow's own records
    /// keep writers apart); write-locked only to install or remove it.
    pub shadow: RwLock<Option<Shadow>>,
    pub valid_sectors: AtomicI64,
    pub dirty_sectors: AtomicI64,
    pub dirty_lines: AtomicI64,
    pub stopping: AtomicBool,
    /// Requests to write back everything, regardless of mode (stop, barrier).
    pub drain_requests: AtomicU32,
    /// Guest writes waiting for a free slot or for write-back of an older
    /// version: the flusher then neither waits for a guest FLUSH to close the
    /// open epoch nor for a guest round to carry its watermark.
    pub space_waiters: AtomicU32,
    pub version: FormatVersion,
    /// Format v2: every version of an epoch up to this is on the backend (in
    /// memory, and on the cache device).
    pub flushed: AtomicU64,
    pub flushed_durable: AtomicU64,
    /// Format v2: every version of an epoch below this is on the cache device,
    /// data and entry: the last completed metadata round began when all writes
    /// of those epochs had been applied.
    pub durable_below: AtomicU64,
    /// Since which epoch the backend alone is not a flush-point state (0: it
    /// is); set durably before any write goes in place over a closed version.
    pub order_broken_since: AtomicU64,
    /// `order_broken_since` is on the cache device (the round after it was
    /// set ended well): only from then on may writes go in place over closed
    /// versions. Before, a write in place could rewrite a sector that the
    /// newest record (a FLUSH's) names, and recovery would drop the sector
    /// the FLUSH promised.
    pub order_broken_durable: AtomicBool,
    /// Format v2: slots whose entry changed since the last log record.
    pub slot_changed: AtomicBits,
    /// Format v2: per slot, (sector, crc32c) of dirty sectors written since the
    /// slot's entry was last logged.
    pub fresh: Mutex<HashMap<u32, Vec<(u16, u32)>>>,
    /// Format v2: per table copy, the metadata blocks changed since it was
    /// last written.
    pub table_stale: [AtomicBits; 2],
    pub log: Mutex<LogState>,
}

/// A guest write counted in `State::space_waiters` while this lives.
pub struct SpaceWaiter<'a>(&'a AtomicU32);

impl Drop for SpaceWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl State {
    /// Count the caller as waiting for space until the result is dropped.
    pub fn waiting_for_space(&self) -> SpaceWaiter<'_> {
        self.space_waiters.fetch_add(1, Ordering::AcqRel);
        SpaceWaiter(&self.space_waiters)
    }

    /// Count one record going away and another taking its place.
    fn account(&self, old: &Rec, new: &Rec) {
        let dv = bits::count(&new.valid) as i64 - bits::count(&old.valid) as i64;
        let dd = bits::count(&new.dirty) as i64 - bits::count(&old.dirty) as i64;
        if dv != 0 {
            self.valid_sectors.fetch_add(dv, Ordering::Relaxed);
        }
        if dd != 0 {
            self.dirty_sectors.fetch_add(dd, Ordering::Relaxed);
        }
        let dl = new.is_dirty() as i64 - old.is_dirty() as i64;
        if dl != 0 {
            self.dirty_lines.fetch_add(dl, Ordering::Relaxed);
        }
    }

    /// The on-disk entry of a record in this cache's format.
    pub fn entry_of(&self, r: &Rec) -> LineEntry {
        match self.version {
            FormatVersion::V1 => r.entry(),
            FormatVersion::V2 => r.entry_v2(),
        }
    }

    fn mirror(&self, shard: &mut Shard, slot: u32, r: &Rec) {
        let block = slot / self.entries_per_block;
        match self.version {
            FormatVersion::V1 => self.meta_dirty.set(block),
            FormatVersion::V2 => {
                self.slot_changed.set(slot);
                self.table_stale[0].set(block);
                self.table_stale[1].set(block);
            }
        }
        self.shadow_write(shard, slot, &self.entry_of(r));
    }

    /// Mirror `slot`'s entry into the crash shadow; the caller holds the
    /// line's shard write-locked (`shard`, taken `&mut` so that only a write
    /// guard gives one), which the shadow's staging record of that shard
    /// needs to itself.
    fn shadow_write(&self, shard: &mut Shard, slot: u32, e: &LineEntry) {
        if let Some(s) = self.shadow.read().as_ref() {
            s.write(shard.index(), slot, e);
        }
    }

    /// Replace a mapped slot's record. The caller holds the line's shard write
    /// lock (`_sh`) and, for a change of data, the line lock.
    pub fn set_rec(&self, sh: &mut Shard, slot: u32, new: Rec, data_changed: bool) {
        self.apply(sh, slot, new, data_changed, false);
    }

    /// One record change, and everything that follows from it, inside one
    /// section of the snapshot lock (so a persist sees all of it or none).
    fn apply(&self, sh: &mut Shard, slot: u32, new: Rec, data_changed: bool, cleaned: bool) {
        self.apply_with(sh, slot, new, data_changed, cleaned, &[]);
    }

    fn apply_with(
        &self,
        sh: &mut Shard,
        slot: u32,
        new: Rec,
        data_changed: bool,
        cleaned: bool,
        crcs: &[(u16, u32)],
    ) {
        let _s = self.snap.read();
        if self.version == FormatVersion::V2 && !crcs.is_empty() {
            let mut f = self.fresh.lock();
            let v = f.entry(slot).or_default();
            for &(s, c) in crcs {
                match v.iter_mut().find(|(x, _)| *x == s) {
                    Some(e) => e.1 = c,
                    None => v.push((s, c)),
                }
            }
        }
        if cleaned {
            self.cleaned.set(slot);
        }
        if data_changed {
            self.slots.bump_gen(slot);
        }
        let old = self.slots.get(slot);
        debug_assert_eq!(old.tag, new.tag);
        self.account(&old, &new);
        if new.is_dirty() && (!old.is_dirty() || old.epoch != new.epoch) {
            let mut e = self.epochs.lock();
            if new.epoch == e.cur && !e.pending.contains_key(&new.epoch) {
                e.opened = Instant::now();
            }
            e.pending.entry(new.epoch).or_default().push(slot);
        }
        self.slots.put(slot, &new);
        let is_head = sh.head(&self.slots, new.tag) == Some(slot);
        self.track_eviction(slot, &new, is_head);
        self.mirror(sh, slot, &new);
    }

    /// `set_rec` for a line the flusher wrote back: until the next persist, its
    /// on-disk entry may still call it dirty (see `cleaned`).
    pub fn set_rec_cleaned(&self, sh: &mut Shard, slot: u32, new: Rec) {
        self.apply(sh, slot, new, false, true);
    }

    /// `set_rec` for a write that put new data into `crcs`' sectors (format v2
    /// logs their checksums with the entry, see `format::log`).
    pub fn set_rec_written(&self, sh: &mut Shard, slot: u32, new: Rec, crcs: &[(u16, u32)]) {
        self.apply_with(sh, slot, new, true, false, crcs);
    }

    /// Format v2: the write-back of this version's epoch is durable (the
    /// watermark on disk covers it), so it is clean. Nothing on disk changes:
    /// cleanliness is derived from the watermark there.
    pub fn clean_silently(&self, sh: &mut Shard, slot: u32) {
        let _s = self.snap.read();
        let old = self.slots.get(slot);
        let new = Rec {
            dirty: bits::none(),
            ..old
        };
        self.account(&old, &new);
        self.slots.put(slot, &new);
        let is_head = sh.head(&self.slots, new.tag) == Some(slot);
        self.track_eviction(slot, &new, is_head);
    }

    /// Only clean heads without older versions may be evicted.
    fn track_eviction(&self, slot: u32, r: &Rec, is_head: bool) {
        let mut ev = self.evict.write();
        if is_head && !r.is_free() && !r.is_dirty() && r.next == NO_SLOT {
            ev.insert(slot);
        } else {
            ev.remove(slot);
        }
    }

    /// Record a cache hit for eviction.
    pub fn hit(&self, slot: u32) {
        if !self.evict.read().hit(slot) {
            self.evict.write().touch(slot);
        }
    }

    /// Give `tag` a durably free slot with nothing valid yet (it is not
    /// persisted until it holds something).
    pub fn map_free_slot(&self, sh: &mut Shard, tag: u64) -> Allocation {
        self.map_version(sh, tag, NO_SLOT)
    }

    /// Give `tag` a new newest version in a durably free slot, in front of
    /// `older` (copy-on-write; format v2), or as its only one (`NO_SLOT`).
    pub fn map_version(&self, sh: &mut Shard, tag: u64, older: u32) -> Allocation {
        let slot = {
            let mut a = self.alloc.lock();
            // Format v1 keeps one entry per line on disk; v2 orders versions by
            // epoch, so an old entry still on disk is harmless there.
            if self.version == FormatVersion::V1 && a.releasing.contains(&tag) {
                return Allocation::Releasing;
            }
            // A slot still read by a request that found it before its release
            // (pinned) waits until that read is done.
            let Some(i) = a.free.iter().rposition(|&s| !self.slots.pinned(s)) else {
                return Allocation::NoFree;
            };
            a.free.swap_remove(i)
        };
        let _s = self.snap.read();
        self.slots.put(
            slot,
            &Rec {
                tag,
                next: older,
                ..Rec::FREE
            },
        );
        sh.set_head(&self.slots, tag, slot);
        if older != NO_SLOT {
            // The older version may no longer be evicted on its own.
            self.evict.write().remove(older);
        }
        Allocation::Slot(slot)
    }

    /// Undo `map_free_slot` for a slot that never received data: its on-disk
    /// entry still says free, so it goes straight back to `free`.
    pub fn unmap_unused(&self, sh: &mut Shard, slot: u32) {
        let r = self.slots.get(slot);
        debug_assert!(bits::is_empty(&r.valid));
        {
            let _s = self.snap.read();
            sh.remove(&self.slots, r.tag);
            if r.next != NO_SLOT {
                // A copy-on-write version that got no data: the older one is
                // the newest again.
                sh.set_head(&self.slots, r.tag, r.next);
                let older = self.slots.get(r.next);
                self.track_eviction(r.next, &older, true);
            }
            self.slots.put(slot, &Rec::FREE);
            self.fresh.lock().remove(&slot);
            self.evict.write().remove(slot);
            self.shadow_write(sh, slot, &Rec::FREE.entry());
        }
        self.alloc.lock().free.push(slot);
    }

    /// Forget a line's (only) version; the slot becomes reusable once that is
    /// persisted.
    pub fn release(&self, sh: &mut Shard, slot: u32) {
        let _s = self.snap.read();
        let old = self.slots.get(slot);
        if old.is_free() {
            return;
        }
        if sh.head(&self.slots, old.tag) == Some(slot) {
            sh.remove(&self.slots, old.tag);
        }
        self.account(&old, &Rec::FREE);
        self.slots.put(slot, &Rec::FREE);
        self.evict.write().remove(slot);
        self.mirror(sh, slot, &Rec::FREE);
        self.fresh.lock().remove(&slot);
        let mut a = self.alloc.lock();
        a.pending_free.push((slot, old.tag));
        if self.version == FormatVersion::V1 {
            a.releasing.insert(old.tag);
        }
    }

    /// Free `slot`, a version older than `newer` (format v2: written back and
    /// superseded). Durable with the next log record, in which the free entry
    /// and the watermark that makes it stale arrive together.
    pub fn release_older(&self, sh: &mut Shard, newer: u32, slot: u32) {
        debug_assert_eq!(self.slots.next(newer), slot);
        let after = self.slots.next(slot);
        {
            let _s = self.snap.read();
            self.slots.set_next(newer, after);
        }
        // `release` sees a version the map does not name, so it only frees it.
        self.release(sh, slot);
        let r = self.slots.get(newer);
        let is_head = sh.head(&self.slots, r.tag) == Some(newer);
        self.track_eviction(newer, &r, is_head);
    }

    /// Forget one version of a line (clean data, or data a discard or an
    /// operator's flag drops), keeping the line's chain intact.
    pub fn remove_version(&self, sh: &mut Shard, slot: u32) {
        let r = self.slots.get(slot);
        if r.is_free() {
            return;
        }
        if sh.head(&self.slots, r.tag) == Some(slot) {
            self.release(sh, slot);
            if r.next != NO_SLOT {
                let _s = self.snap.read();
                sh.set_head(&self.slots, r.tag, r.next);
                let older = self.slots.get(r.next);
                self.track_eviction(r.next, &older, true);
            }
            return;
        }
        let chain = self.chain(sh, r.tag);
        match chain.iter().position(|&v| v == slot) {
            Some(i) if i > 0 => self.release_older(sh, chain[i - 1], slot),
            _ => tracing::error!(
                slot,
                tag = r.tag,
                "a version not in its line's chain; left alone"
            ),
        }
    }

    /// Format v2, relaxed order: forget the older versions of `tag` whose every
    /// valid sector a newer version durably on the cache device holds too.
    /// Relaxed write-back owes the backend no epoch's state, only the newest
    /// data, so such a version is never needed again; without this, a line
    /// rewritten between FLUSHes (a journal) would gain a version per FLUSH
    /// and wait for the backend once it had `MAX_CHAIN`. The newer version's
    /// record is durable, so whether or not the free entry that drops the older
    /// one survives a crash, every sector resolves to the newer data. Returns
    /// how many versions were dropped. The caller holds the line lock and its
    /// shard write lock.
    pub fn drop_superseded(&self, sh: &mut Shard, tag: u64) -> usize {
        let durable_below = self.durable_below.load(Ordering::Acquire);
        let mut covered = bits::none();
        let mut dropped = 0;
        for slot in self.chain(sh, tag) {
            let r = self.slots.get(slot);
            let is_head = sh.head(&self.slots, tag) == Some(slot);
            if !is_head && bits::is_empty(&bits::and_not(&r.valid, &covered)) {
                self.remove_version(sh, slot);
                dropped += 1;
                continue;
            }
            if r.epoch < durable_below {
                covered = bits::or(&covered, &r.valid);
            }
        }
        dropped
    }

    /// Format v2: `run` (newest first) is the oldest end of `tag`'s chain, two
    /// or more versions, all clean, and the sectors each holds newest within
    /// the run have been copied into its oldest version's slot (checksums
    /// `crcs`): the oldest takes them, and the run's newest epoch, and replaces
    /// the whole run; the others are freed. `above` is the version just newer
    /// than the run (dirty, not yet written back), or None when the run is the
    /// whole chain. The caller holds the line lock and its shard write lock.
    pub fn merge_into_oldest(
        &self,
        sh: &mut Shard,
        tag: u64,
        run: &[u32],
        above: Option<u32>,
        crcs: &[(u16, u32)],
    ) {
        let (Some(&oldest), Some(&newest)) = (run.last(), run.first()) else {
            return;
        };
        debug_assert!(run.len() >= 2);
        let o = self.slots.get(oldest);
        let epoch = self.slots.get(newest).epoch;
        let valid = run
            .iter()
            .fold(bits::none(), |acc, &v| bits::or(&acc, &self.slots.valid(v)));
        {
            let _s = self.snap.read();
            match above {
                Some(a) => self.slots.set_next(a, oldest),
                None => sh.set_head(&self.slots, tag, oldest),
            }
        }
        // None of these is the head any more, so this only frees them. From
        // the one just above the oldest upwards: each free reaches the crash
        // shadow at once, and at every point between, each sector a freed
        // version held resolves to a version still there that holds its newest
        // data (a newer one of the run, or the oldest, which has it copied).
        // Newest first, a crash could leave a middle version's older copy
        // under a freed newer one.
        for &v in run[..run.len() - 1].iter().rev() {
            self.release(sh, v);
        }
        let merged = Rec {
            valid,
            dirty: bits::none(),
            epoch,
            next: NO_SLOT,
            ..o
        };
        self.set_rec_written(sh, oldest, merged, crcs);
    }

    /// The versions of `tag`, newest first. The caller holds its shard lock.
    pub fn chain(&self, sh: &Shard, tag: u64) -> Vec<u32> {
        let mut out = Vec::new();
        let mut s = sh.head(&self.slots, tag);
        while let Some(slot) = s {
            out.push(slot);
            if out.len() > MAX_CHAIN * 4 {
                tracing::error!(tag, "version chain loops or is far too long; cut short");
                break;
            }
            let n = self.slots.next(slot);
            s = (n != NO_SLOT).then_some(n);
        }
        out
    }

    /// Where each sector `s0..s1` of `tag` is: runs `(start, end, slot)` of
    /// equal source, `slot` being the newest version holding the sector valid,
    /// or `None` (not cached). The caller holds the line's shard lock.
    pub fn resolve(&self, sh: &Shard, tag: u64, s0: u32, s1: u32) -> Vec<(u32, u32, Option<u32>)> {
        let chain = self.chain(sh, tag);
        let mut out: Vec<(u32, u32, Option<u32>)> = Vec::new();
        let valids: Vec<_> = chain.iter().map(|&v| self.slots.valid(v)).collect();
        for s in s0..s1 {
            let src = chain
                .iter()
                .zip(&valids)
                .find(|(_, v)| bits::test(v, s))
                .map(|(&slot, _)| slot);
            match out.last_mut() {
                Some(r) if r.2 == src && r.1 == s => r.1 = s + 1,
                _ => out.push((s, s + 1, src)),
            }
        }
        out
    }

    /// Sectors of `tag` valid in any version. The caller holds its shard lock.
    pub fn valid_any(&self, sh: &Shard, tag: u64) -> crate::format::entry::SectorBits {
        self.chain(sh, tag)
            .iter()
            .fold(bits::none(), |acc, &v| bits::or(&acc, &self.slots.valid(v)))
    }

    /// The head slot of `tag`, if mapped.
    pub fn head(&self, tag: u64) -> Option<u32> {
        self.map.shard(tag).read().head(&self.slots, tag)
    }

    /// Mapped slots (heads), in slot order.
    pub fn mapped_slots(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|&s| self.slots.tag(s) != FREE)
            .collect()
    }

    pub fn cur_epoch(&self) -> u64 {
        self.epochs.lock().cur
    }

    pub fn dirty_lines(&self) -> u64 {
        self.dirty_lines.load(Ordering::Relaxed).max(0) as u64
    }
}

/// Result of trying to give a line a slot.
pub enum Allocation {
    Slot(u32),
    /// No durably free slot: evict or wait.
    NoFree,
    /// The line's previous slot is being released: persist first.
    Releasing,
}

impl State {
    /// Check the invariants that tie the map, the slot table and the allocator
    /// together (tests and debugging). Returns every cached 4 KiB sector as
    /// (line, sector in line, slot of the newest version holding it), for
    /// callers that compare data.
    pub fn check_invariants(&self) -> Result<Vec<(u64, u32, u32)>, String> {
        // Shards before the snapshot lock, as every writer takes them: with both
        // held, nothing changes under the check.
        let locked = self.map.lock_all();
        let _s = self.snap.write();
        let n = self.slots.len() as u32;
        let mut heads = 0usize;
        let mut out = Vec::new();
        let (mut valid, mut dirty, mut dlines) = (0i64, 0i64, 0i64);
        let mut in_chain = vec![false; n as usize];
        for s in 0..n {
            let r = self.slots.get(s);
            if r.is_free() {
                continue;
            }
            let head = LineMap::head_in(&locked, &self.slots, r.tag);
            if head == Some(s) {
                heads += 1;
                // Walk the chain: same line, epochs strictly falling, no loops;
                // each sector is read from the newest version holding it.
                let mut v = s;
                let mut epoch = u64::MAX;
                let mut len = 0;
                let mut covered = bits::none();
                loop {
                    let rv = self.slots.get(v);
                    for sec in 0..256u32 {
                        if bits::test(&rv.valid, sec) && !bits::test(&covered, sec) {
                            out.push((r.tag, sec, v));
                        }
                    }
                    covered = bits::or(&covered, &rv.valid);
                    if rv.tag != r.tag || rv.epoch >= epoch && len > 0 {
                        return Err(format!(
                            "line {}: version slot {v} (line {}, epoch {}) breaks the chain",
                            r.tag, rv.tag, rv.epoch
                        ));
                    }
                    if in_chain[v as usize] || len > 4 * MAX_CHAIN {
                        return Err(format!("line {}: its chain loops at slot {v}", r.tag));
                    }
                    in_chain[v as usize] = true;
                    epoch = rv.epoch;
                    len += 1;
                    if rv.next == NO_SLOT {
                        break;
                    }
                    v = rv.next;
                }
            }
        }
        for s in 0..n {
            let r = self.slots.get(s);
            if r.is_free() {
                continue;
            }
            if !in_chain[s as usize] {
                return Err(format!(
                    "slot {s} holds line {} but is in no chain of it (the map names {:?})",
                    r.tag,
                    LineMap::head_in(&locked, &self.slots, r.tag)
                ));
            }
            if !bits::is_empty(&bits::and_not(&r.dirty, &r.valid)) {
                return Err(format!("slot {s}: dirty sectors that are not valid"));
            }
            valid += bits::count(&r.valid) as i64;
            dirty += bits::count(&r.dirty) as i64;
            dlines += r.is_dirty() as i64;
        }
        let mapped: usize = locked.iter().map(|s| s.len()).sum();
        if mapped != heads {
            return Err(format!(
                "the map holds {mapped} lines, the slot table {heads} heads"
            ));
        }
        let a = self.alloc.lock();
        let mut seen = HashSet::new();
        for &s in a.free.iter().chain(a.pending_free.iter().map(|(s, _)| s)) {
            if !seen.insert(s) {
                return Err(format!("slot {s} is listed free twice"));
            }
            if !self.slots.get(s).is_free() {
                return Err(format!(
                    "slot {s} is listed free but holds line {}",
                    self.slots.tag(s)
                ));
            }
        }
        let counts = (
            self.valid_sectors.load(Ordering::Relaxed),
            self.dirty_sectors.load(Ordering::Relaxed),
            self.dirty_lines.load(Ordering::Relaxed),
        );
        if counts != (valid, dirty, dlines) {
            return Err(format!(
                "counters {counts:?} differ from the table's (valid, dirty, dirty lines) {:?}",
                (valid, dirty, dlines)
            ));
        }
        Ok(out)
    }
}
