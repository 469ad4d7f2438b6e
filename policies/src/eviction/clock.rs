//! CLOCK (second chance): a hit only sets the slot's reference bit, lock-free,
//! and eviction sweeps the slots from a hand, clearing set bits and taking the
//! first usable slot whose bit was clear. Unlike LRU, a hit writes no shared list.

use std::sync::atomic::{AtomicBool, Ordering};

use super::EvictionPolicy;

pub struct ClockPolicy {
    tracked: Vec<bool>,
    referenced: Vec<AtomicBool>,
    hand: usize,
    len: usize,
}

impl ClockPolicy {
    /// A policy over slots `0..slots` (it grows if given higher ones).
    pub fn with_capacity(slots: usize) -> Self {
        Self {
            tracked: vec![false; slots],
            referenced: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            hand: 0,
            len: 0,
        }
    }

    fn grow(&mut self, slot: u32) {
        let need = slot as usize + 1;
        if need > self.tracked.len() {
            self.tracked.resize(need, false);
            self.referenced.resize_with(need, || AtomicBool::new(false));
        }
    }
}

impl EvictionPolicy for ClockPolicy {
    fn insert(&mut self, slot: u32) {
        self.grow(slot);
        let i = slot as usize;
        if !self.tracked[i] {
            self.tracked[i] = true;
            self.len += 1;
        }
        // A newly cached line starts without a second chance (scan resistance).
        self.referenced[i].store(false, Ordering::Relaxed);
    }

    fn touch(&mut self, slot: u32) {
        self.hit(slot);
    }

    fn hit(&self, slot: u32) -> bool {
        if let Some(r) = self.referenced.get(slot as usize) {
            // Only write when it changes: keeps hot slots' cache lines shared.
            if !r.load(Ordering::Relaxed) {
                r.store(true, Ordering::Relaxed);
            }
        }
        true
    }

    fn remove(&mut self, slot: u32) {
        let i = slot as usize;
        if self.tracked.get(i).copied().unwrap_or(false) {
            self.tracked[i] = false;
            self.len -= 1;
        }
    }

    fn pop_victim(&mut self, usable: &mut dyn FnMut(u32) -> bool) -> Option<u32> {
        let n = self.tracked.len();
        if self.len == 0 || n == 0 {
            return None;
        }
        // Two full turns: the first may only clear reference bits.
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            if !self.tracked[i] {
                continue;
            }
            if self.referenced[i].swap(false, Ordering::Relaxed) {
                continue;
            }
            if usable(i as u32) {
                self.tracked[i] = false;
                self.len -= 1;
                return Some(i as u32);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referenced_slots_get_a_second_chance() {
        let mut p = ClockPolicy::with_capacity(4);
        for s in 0..4 {
            p.insert(s);
        }
        assert!(p.hit(0));
        p.hit(1);
        assert_eq!(p.pop_victim(&mut |_| true), Some(2));
        assert_eq!(p.pop_victim(&mut |_| true), Some(3));
        // 0 and 1 lost their bits on the way round; now they go, oldest hand first.
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        assert_eq!(p.pop_victim(&mut |_| true), Some(1));
        assert_eq!(p.pop_victim(&mut |_| true), None);
    }

    #[test]
    fn busy_and_removed_slots_are_skipped_and_kept() {
        let mut p = ClockPolicy::with_capacity(2);
        p.insert(0);
        p.insert(1);
        p.insert(9); // grows
        p.remove(1);
        assert_eq!(p.pop_victim(&mut |s| s != 0), Some(9));
        assert_eq!(p.len(), 1);
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        assert!(p.is_empty());
    }
}
