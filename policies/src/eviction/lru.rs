//! Least recently used, on the `lru` crate.

use lru::LruCache;

use super::EvictionPolicy;

/// Least recently used, on the `lru` crate.
pub struct LruPolicy {
    lru: LruCache<u32, ()>,
    /// Slots are below this (0: not known); checked in debug builds.
    slots: usize,
}

impl LruPolicy {
    pub fn new() -> Self {
        Self::with_slots(0)
    }

    /// An LRU for a cache of `slots` slots (0: any number). It grows as
    /// needed; the bound only checks the caller in debug builds.
    pub fn with_slots(slots: usize) -> Self {
        Self {
            lru: LruCache::unbounded(),
            slots,
        }
    }
}

impl Default for LruPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl EvictionPolicy for LruPolicy {
    fn insert(&mut self, slot: u32) {
        debug_assert!(
            self.slots == 0 || (slot as usize) < self.slots,
            "slot {slot} of a {}-slot cache",
            self.slots
        );
        self.lru.put(slot, ());
    }

    fn touch(&mut self, slot: u32) {
        // `promote` is a no-op for slots that are not tracked (dirty ones).
        self.lru.promote(&slot);
    }

    fn remove(&mut self, slot: u32) {
        self.lru.pop(&slot);
    }

    fn pop_victim(&mut self, usable: &mut dyn FnMut(u32) -> bool) -> Option<u32> {
        // Walk from the least recently used end; unusable (busy) slots are rare,
        // so the scan is short in practice.
        let victim = self
            .lru
            .iter()
            .rev()
            .map(|(slot, _)| *slot)
            .find(|slot| usable(*slot))?;
        self.lru.pop(&victim);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.lru.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What makes it LRU (the contract all policies keep is in `../tests.rs`).
    #[test]
    fn evicts_least_recently_used_first() {
        let mut p = LruPolicy::new();
        for s in 0..4 {
            p.insert(s);
        }
        p.touch(0);
        assert_eq!(p.pop_victim(&mut |_| true), Some(1));
        assert_eq!(p.pop_victim(&mut |_| true), Some(2));
        assert_eq!(p.pop_victim(&mut |_| true), Some(3));
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        assert_eq!(p.pop_victim(&mut |_| true), None);
    }
}
