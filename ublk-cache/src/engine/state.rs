//! The engine's in-memory view of the cache, guarded by one mutex: the line table,
//! the backend-line → slot map, eviction order, free slots, dirty lines by epoch,
//! per-line request locks, and the metadata blocks that need writing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use policies::EvictionPolicy;

use super::bits;
use super::shadow::Shadow;
use crate::format::entry::SectorBits;
use crate::format::LineEntry;

/// One cache slot.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub tag: Option<u64>,
    /// Epoch of the dirty sectors (meaningless while clean).
    pub epoch: u64,
    /// Bumped on every change of data, so the flusher can tell whether what it
    /// wrote back is still what the line holds.
    pub gen: u64,
    pub valid: SectorBits,
    pub dirty: SectorBits,
}

impl Line {
    pub const FREE: Line = Line {
        tag: None,
        epoch: 0,
        gen: 0,
        valid: [0; 4],
        dirty: [0; 4],
    };

    pub fn is_dirty(&self) -> bool {
        !bits::is_empty(&self.dirty)
    }

    pub fn entry(&self) -> LineEntry {
        LineEntry {
            tag: self.tag,
            epoch: if self.is_dirty() { self.epoch } else { 0 },
            valid: self.valid,
            dirty: self.dirty,
        }
    }
}

pub struct State {
    pub lines: Vec<Line>,
    pub map: HashMap<u64, u32>,
    pub evict: Box<dyn EvictionPolicy>,
    /// Slots whose on-disk entry says free: safe to fill with new data.
    pub free: Vec<u32>,
    /// Slots freed in memory whose on-disk entry may still name the old line.
    /// They join `free` only once that entry is durably gone, so a reused slot can
    /// never make the old line read the new line's data after a crash.
    pub pending_free: Vec<(u32, Option<u64>)>,
    /// Backend lines whose old slot is in `pending_free`. Such a line is not mapped
    /// again until that release is durable, so two on-disk entries never name the
    /// same line (a multi-block metadata write is not atomic).
    pub releasing: HashSet<u64>,
    /// Dirty lines by epoch, by tag (so write-back goes in backend order).
    pub dirty: BTreeMap<u64, BTreeSet<u64>>,
    pub dirty_lines: usize,
    /// 4 KiB sectors that are valid / dirty, over all lines (for stats).
    pub valid_sectors: u64,
    pub dirty_sectors: u64,
    /// Backend lines a request or the flusher is working on.
    pub locked: HashSet<u64>,
    /// Epoch that new writes join. A guest FLUSH closes it.
    pub cur_epoch: u64,
    /// Writes being applied, by epoch: an epoch can gain data until this drops to 0.
    pub applying: BTreeMap<u64, u32>,
    /// Metadata blocks whose on-disk copy is out of date.
    pub meta_dirty: BTreeSet<u32>,
    /// Requests to write back everything, regardless of mode (stop, barrier).
    pub drain_requests: u32,
    pub stopping: bool,
    pub entries_per_block: u32,
    /// The crash shadow, mirrored on every entry change (see `shadow`).
    pub shadow: Option<Shadow>,
}

impl State {
    /// An entry changed: mirror it to the shadow now, write it to disk at the
    /// next persist.
    pub fn mark_meta(&mut self, slot: u32) {
        self.meta_dirty.insert(slot / self.entries_per_block);
        if let Some(sh) = self.shadow.as_mut() {
            sh.write(slot, &self.lines[slot as usize].entry());
        }
    }

    pub fn oldest_dirty_epoch(&self) -> Option<u64> {
        self.dirty.keys().next().copied()
    }

    pub fn oldest_applying_epoch(&self) -> Option<u64> {
        self.applying.keys().next().copied()
    }

    pub fn begin_apply(&mut self) -> u64 {
        let e = self.cur_epoch;
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

    /// Keep the sector counters right around a change of one line's bits.
    fn count_out(&mut self, slot: u32) {
        let l = &self.lines[slot as usize];
        self.valid_sectors -= bits::count(&l.valid) as u64;
        self.dirty_sectors -= bits::count(&l.dirty) as u64;
    }

    fn count_in(&mut self, slot: u32) {
        let l = &self.lines[slot as usize];
        self.valid_sectors += bits::count(&l.valid) as u64;
        self.dirty_sectors += bits::count(&l.dirty) as u64;
    }

    /// Recount the sector counters from the line table (after loading it).
    pub fn recount(&mut self) {
        self.valid_sectors = 0;
        self.dirty_sectors = 0;
        for slot in 0..self.lines.len() as u32 {
            self.count_in(slot);
        }
    }

    fn unindex_dirty(&mut self, slot: u32) {
        let l = self.lines[slot as usize];
        if let (true, Some(tag)) = (l.is_dirty(), l.tag) {
            if let Some(set) = self.dirty.get_mut(&l.epoch) {
                set.remove(&tag);
                if set.is_empty() {
                    self.dirty.remove(&l.epoch);
                }
            }
            self.dirty_lines -= 1;
        }
    }

    /// Replace a mapped line's bits, keeping the dirty index and eviction order
    /// right. `data_changed` bumps the generation the flusher checks.
    pub fn set_bits(
        &mut self,
        slot: u32,
        valid: SectorBits,
        dirty: SectorBits,
        epoch: u64,
        data_changed: bool,
    ) {
        self.unindex_dirty(slot);
        self.count_out(slot);
        let tag = self.lines[slot as usize]
            .tag
            .expect("set_bits on a mapped slot");
        let l = &mut self.lines[slot as usize];
        l.valid = valid;
        l.dirty = dirty;
        l.epoch = epoch;
        if data_changed {
            l.gen += 1;
        }
        let now_dirty = l.is_dirty();
        self.count_in(slot);
        if now_dirty {
            self.dirty.entry(epoch).or_default().insert(tag);
            self.dirty_lines += 1;
            self.evict.remove(slot);
        } else {
            self.evict.insert(slot);
        }
        self.mark_meta(slot);
    }

    /// Map a durably free slot to `tag`, with nothing valid yet.
    pub fn map_free_slot(&mut self, tag: u64) -> Alloc {
        if self.releasing.contains(&tag) {
            return Alloc::Releasing;
        }
        let Some(slot) = self.free.pop() else {
            return Alloc::NoFree;
        };
        self.lines[slot as usize] = Line {
            tag: Some(tag),
            ..Line::FREE
        };
        self.map.insert(tag, slot);
        // Not evictable until it holds something; not worth persisting until then.
        Alloc::Slot(slot)
    }

    /// Undo `map_free_slot` for a slot that never received data: its on-disk
    /// entry still says free, so it goes straight back to `free`.
    pub fn unmap_unused(&mut self, slot: u32) {
        let l = self.lines[slot as usize];
        debug_assert!(bits::is_empty(&l.valid));
        self.count_out(slot);
        if let Some(tag) = l.tag {
            self.map.remove(&tag);
        }
        self.evict.remove(slot);
        self.lines[slot as usize] = Line::FREE;
        if let Some(sh) = self.shadow.as_mut() {
            sh.write(slot, &Line::FREE.entry());
        }
        self.free.push(slot);
    }

    /// Forget a clean line; the slot becomes reusable once that is persisted.
    pub fn release(&mut self, slot: u32) {
        self.unindex_dirty(slot);
        self.count_out(slot);
        let tag = self.lines[slot as usize].tag;
        if let Some(tag) = tag {
            self.map.remove(&tag);
            self.releasing.insert(tag);
        }
        self.evict.remove(slot);
        self.lines[slot as usize] = Line::FREE;
        self.mark_meta(slot);
        self.pending_free.push((slot, tag));
    }
}

/// Result of trying to give a backend line a slot.
pub enum Alloc {
    Slot(u32),
    /// No durably free slot: evict or wait.
    NoFree,
    /// The line's previous slot is being released: persist first.
    Releasing,
}
