//! Which clean cache line to give up when space is needed.
//!
//! Only lines that may be evicted are tracked: the engine removes a line when it
//! becomes dirty and adds it back once it is clean again, so a victim never needs
//! to be searched for among dirty lines.

use lru::LruCache;

/// A replacement policy over cache slots (indices into the line table).
pub trait EvictionPolicy: Send + Sync {
    /// A slot became evictable (clean and mapped).
    fn insert(&mut self, slot: u32);
    /// A slot was used; it becomes the least likely victim.
    fn touch(&mut self, slot: u32);
    /// A hit, recorded without exclusive access where the policy can (CLOCK sets
    /// a bit). Returns false if the policy needs [`EvictionPolicy::touch`] instead.
    fn hit(&self, _slot: u32) -> bool {
        false
    }
    /// The slot is no longer evictable (it became dirty, or was freed).
    fn remove(&mut self, slot: u32);
    /// Take the best victim for which `usable` is true, and stop tracking it.
    /// Slots for which `usable` is false stay tracked in place.
    fn pop_victim(&mut self, usable: &mut dyn FnMut(u32) -> bool) -> Option<u32>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Least recently used, on the `lru` crate.
pub struct LruPolicy {
    lru: LruCache<u32, ()>,
}

impl LruPolicy {
    pub fn new() -> Self {
        Self {
            lru: LruCache::unbounded(),
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

    #[test]
    fn skips_busy_slots_without_losing_them() {
        let mut p = LruPolicy::new();
        for s in 0..3 {
            p.insert(s);
        }
        assert_eq!(p.pop_victim(&mut |s| s != 0), Some(1));
        assert_eq!(p.len(), 2);
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
    }

    #[test]
    fn removed_slots_are_never_victims_and_touch_ignores_them() {
        let mut p = LruPolicy::new();
        p.insert(7);
        p.insert(8);
        p.remove(7);
        p.touch(7);
        assert_eq!(p.len(), 1);
        assert_eq!(p.pop_victim(&mut |_| true), Some(8));
        assert!(p.is_empty());
    }
}
