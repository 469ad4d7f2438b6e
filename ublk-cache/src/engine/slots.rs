//! The in-memory line table: one record per cache slot, kept in flat arrays of
//! atomics so that a cache hit can read it under a shared lock.
//!
//! Who may change a slot's record (the rule every writer follows, and what lets
//! readers trust what they read):
//! - a mapped slot: only while holding the write lock of the map shard of its tag
//!   *and* the shared side of the snapshot lock (`State::snap`), so that a reader
//!   under the shard's read lock, and the metadata snapshot under the exclusive
//!   side, each see whole records;
//! - a free slot: only its owner, the allocator, which hands it out by mapping it.
//!
//! Per slot, at 64 KiB lines: tag 8, epoch 8, two 64-bit bitmap words, pins 2, a
//! data generation 4 and the next-version link 4 bytes (46 bytes); bitmaps take one word per 64 sectors,
//! so a 1 MiB line takes four.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::format::entry::SectorBits;
use crate::format::LineEntry;

/// `tag` of a free slot.
pub const FREE: u64 = u64::MAX;
/// `next` of a version with no older one.
pub const NO_SLOT: u32 = u32::MAX;

/// A copy of one slot's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    pub tag: u64,
    /// The write-back epoch of the dirty sectors (kept, but meaningless, when clean).
    pub epoch: u64,
    pub valid: SectorBits,
    pub dirty: SectorBits,
    /// An older version of the same line (copy-on-write), or `NO_SLOT`.
    pub next: u32,
}

impl Rec {
    pub const FREE: Rec = Rec {
        tag: FREE,
        epoch: 0,
        valid: [0; 4],
        dirty: [0; 4],
        next: NO_SLOT,
    };

    pub fn is_free(&self) -> bool {
        self.tag == FREE
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.iter().any(|w| *w != 0)
    }

    /// The on-disk entry (a clean entry stores epoch 0, as format v1 does).
    pub fn entry(&self) -> LineEntry {
        if self.is_free() {
            return LineEntry::default();
        }
        LineEntry {
            tag: Some(self.tag),
            epoch: if self.is_dirty() { self.epoch } else { 0 },
            valid: self.valid,
            dirty: self.dirty,
        }
    }

    /// The on-disk entry in format v2: the epoch is kept when clean, because
    /// versions of one line are ordered by it.
    pub fn entry_v2(&self) -> LineEntry {
        if self.is_free() {
            return LineEntry::default();
        }
        LineEntry {
            tag: Some(self.tag),
            epoch: self.epoch,
            valid: self.valid,
            dirty: self.dirty,
        }
    }

    pub fn from_entry(e: &LineEntry) -> Rec {
        match e.tag {
            None => Rec::FREE,
            Some(tag) => Rec {
                tag,
                epoch: e.epoch,
                valid: e.valid,
                dirty: e.dirty,
                next: NO_SLOT,
            },
        }
    }
}

pub struct SlotTable {
    words: usize,
    tag: Vec<AtomicU64>,
    epoch: Vec<AtomicU64>,
    next: Vec<AtomicU32>,
    valid: Vec<AtomicU64>,
    dirty: Vec<AtomicU64>,
    /// Reads in flight from the slot: it is not reused while any is.
    pins: Vec<AtomicU16>,
    /// Bumped on every change of the slot's data, so the write-back can tell
    /// whether what it wrote is still what the slot holds.
    gen: Vec<AtomicU32>,
}

impl SlotTable {
    /// A table of `n` free slots for lines of `spl` 4 KiB sectors.
    pub fn new(n: usize, spl: u32) -> SlotTable {
        let words = spl.div_ceil(64).max(1) as usize;
        let mk64 = |n: usize, v: u64| (0..n).map(|_| AtomicU64::new(v)).collect::<Vec<_>>();
        SlotTable {
            words,
            tag: mk64(n, FREE),
            epoch: mk64(n, 0),
            next: (0..n).map(|_| AtomicU32::new(NO_SLOT)).collect(),
            valid: mk64(n * words, 0),
            dirty: mk64(n * words, 0),
            pins: (0..n).map(|_| AtomicU16::new(0)).collect(),
            gen: (0..n).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.tag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tag.is_empty()
    }

    pub fn tag(&self, slot: u32) -> u64 {
        self.tag[slot as usize].load(Relaxed)
    }

    pub fn epoch(&self, slot: u32) -> u64 {
        self.epoch[slot as usize].load(Relaxed)
    }

    pub fn next(&self, slot: u32) -> u32 {
        self.next[slot as usize].load(Relaxed)
    }

    fn bits(&self, v: &[AtomicU64], slot: u32) -> SectorBits {
        let mut b = [0u64; 4];
        let base = slot as usize * self.words;
        for (i, w) in b.iter_mut().enumerate().take(self.words) {
            *w = v[base + i].load(Relaxed);
        }
        b
    }

    fn set_bits(&self, v: &[AtomicU64], slot: u32, b: &SectorBits) {
        let base = slot as usize * self.words;
        for (i, w) in b.iter().enumerate().take(self.words) {
            v[base + i].store(*w, Relaxed);
        }
    }

    pub fn valid(&self, slot: u32) -> SectorBits {
        self.bits(&self.valid, slot)
    }

    pub fn dirty(&self, slot: u32) -> SectorBits {
        self.bits(&self.dirty, slot)
    }

    pub fn get(&self, slot: u32) -> Rec {
        Rec {
            tag: self.tag(slot),
            epoch: self.epoch(slot),
            valid: self.valid(slot),
            dirty: self.dirty(slot),
            next: self.next(slot),
        }
    }

    /// Replace a slot's record (see the module docs for who may).
    pub fn put(&self, slot: u32, r: &Rec) {
        let i = slot as usize;
        self.tag[i].store(r.tag, Relaxed);
        self.epoch[i].store(r.epoch, Relaxed);
        self.next[i].store(r.next, Relaxed);
        self.set_bits(&self.valid, slot, &r.valid);
        self.set_bits(&self.dirty, slot, &r.dirty);
    }

    /// Relink a version (in memory only: chains are rebuilt from epochs at attach).
    /// The caller holds the line's shard lock.
    pub fn set_next(&self, slot: u32, next: u32) {
        self.next[slot as usize].store(next, Relaxed);
    }

    pub fn gen(&self, slot: u32) -> u32 {
        self.gen[slot as usize].load(Relaxed)
    }

    pub fn bump_gen(&self, slot: u32) {
        self.gen[slot as usize].fetch_add(1, Relaxed);
    }

    pub fn pin(&self, slot: u32) {
        self.pins[slot as usize].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn unpin(&self, slot: u32) {
        self.pins[slot as usize].fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn pinned(&self, slot: u32) -> bool {
        self.pins[slot as usize].load(std::sync::atomic::Ordering::Acquire) != 0
    }

    /// Bytes of memory per slot (for the metadata-RAM report).
    pub fn bytes_per_slot(&self) -> usize {
        8 + 8 + 4 + 4 + 2 + 2 * 8 * self.words
    }
}

/// Unpins a slot when dropped (a read finished, or its future was dropped).
pub struct Pin<'a> {
    table: &'a SlotTable,
    slot: u32,
}

impl<'a> Pin<'a> {
    /// Pins `slot`; the caller holds the shard lock under which it found it.
    pub fn new(table: &'a SlotTable, slot: u32) -> Pin<'a> {
        table.pin(slot);
        Pin { table, slot }
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.table.unpin(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_for_every_line_size() {
        for spl in [1u32, 16, 64, 128, 256] {
            let t = SlotTable::new(4, spl);
            let mask = crate::format::entry::line_mask(spl);
            let r = Rec {
                tag: 9,
                epoch: 3,
                valid: mask,
                dirty: std::array::from_fn(|i| mask[i] & 0x0f0f),
                next: 2,
            };
            t.put(1, &r);
            assert_eq!(t.get(1), r, "spl {spl}");
            assert_eq!(t.get(0), Rec::FREE);
            assert_eq!(Rec::from_entry(&r.entry()).valid, r.valid);
        }
        let t = SlotTable::new(1, 16);
        {
            let _p = Pin::new(&t, 0);
            assert!(t.pinned(0));
        }
        assert!(!t.pinned(0));
    }
}
