//! The backend-line → slot map, in shards, and the per-line request locks.
//!
//! A shard maps each of its lines to the slot of the line's newest version (older
//! versions hang off it through `SlotTable::next`). The table stores only slot
//! numbers: the line a slot holds is read from the slot table, so an entry costs a
//! few bytes. A cache hit takes its shard's lock shared; only requests that change
//! a line take it exclusively, for a few hundred nanoseconds, never across I/O.
//!
//! Line locks serialise the requests that change one line (writes, promotions,
//! invalidations) and make concurrent misses of one line fetch it once. Waiting
//! for one is asynchronous: the waiter's task is woken (on its own loop) when the
//! holder lets go. A task never holds a line lock while it waits for another one
//! with a lower or equal line number, so they cannot deadlock.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hashbrown::HashTable;
use parking_lot::RwLock;

use super::slots::SlotTable;

/// Shards of the map (also the crash shadow's staging records: one a shard).
pub(super) const SHARDS: usize = 64;

fn hash(tag: u64) -> u64 {
    // A multiplicative mix: lines are dense small integers.
    let h = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

#[derive(Default)]
pub struct Shard {
    heads: HashTable<u32>,
    locked: HashMap<u64, Vec<Waker>>,
    /// Which shard of the map this is.
    index: usize,
}

impl Shard {
    /// Which shard of the map this is (`0..SHARDS`): whoever holds it locked
    /// for writing may use what is kept per shard (the crash shadow's
    /// staging record).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The slot of `tag`'s newest version.
    pub fn head(&self, slots: &SlotTable, tag: u64) -> Option<u32> {
        self.heads
            .find(hash(tag), |&s| slots.tag(s) == tag)
            .copied()
    }

    /// Make `slot` the newest version of its line (the slot's tag is already set).
    pub fn set_head(&mut self, slots: &SlotTable, tag: u64, slot: u32) {
        debug_assert_eq!(slots.tag(slot), tag);
        match self
            .heads
            .entry(hash(tag), |&s| slots.tag(s) == tag, |&s| hash(slots.tag(s)))
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = slot,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(slot);
            }
        }
    }

    /// Forget `tag` (before its slot's tag is cleared).
    pub fn remove(&mut self, slots: &SlotTable, tag: u64) -> Option<u32> {
        match self.heads.find_entry(hash(tag), |&s| slots.tag(s) == tag) {
            Ok(e) => Some(e.remove().0),
            Err(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_locked(&self, tag: u64) -> bool {
        self.locked.contains_key(&tag)
    }
}

pub struct LineMap {
    shards: Box<[RwLock<Shard>]>,
}

impl Default for LineMap {
    fn default() -> Self {
        Self::new()
    }
}

impl LineMap {
    pub fn new() -> LineMap {
        LineMap {
            shards: (0..SHARDS)
                .map(|index| {
                    RwLock::new(Shard {
                        index,
                        ..Shard::default()
                    })
                })
                .collect(),
        }
    }

    pub fn shard(&self, tag: u64) -> &RwLock<Shard> {
        &self.shards[Self::shard_index(tag)]
    }

    fn shard_index(tag: u64) -> usize {
        (hash(tag) >> 58) as usize % SHARDS
    }

    /// Every shard, write-locked in order (consistency checks only: it stops
    /// every request that changes a line).
    pub fn lock_all(&self) -> Vec<parking_lot::RwLockWriteGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.write()).collect()
    }

    /// The head of `tag` in shards locked by [`LineMap::lock_all`].
    pub fn head_in(
        locked: &[parking_lot::RwLockWriteGuard<'_, Shard>],
        slots: &SlotTable,
        tag: u64,
    ) -> Option<u32> {
        locked[Self::shard_index(tag)].head(slots, tag)
    }

    /// Lines mapped (newest versions).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request or the write-back holds `tag`'s lock now.
    pub fn is_locked(&self, tag: u64) -> bool {
        self.shard(tag).read().is_locked(tag)
    }

    /// Take `tag`'s line lock without waiting, if it is free.
    pub fn try_lock(self: &Arc<Self>, tag: u64) -> Option<LineGuard> {
        let mut sh = self.shard(tag).write();
        if sh.locked.contains_key(&tag) {
            return None;
        }
        sh.locked.insert(tag, Vec::new());
        Some(LineGuard {
            map: Arc::clone(self),
            tag,
        })
    }

    /// Wait for and take `tag`'s line lock.
    pub fn lock(self: &Arc<Self>, tag: u64) -> LockLine {
        LockLine {
            map: Arc::clone(self),
            tag,
        }
    }
}

/// The future of [`LineMap::lock`].
pub struct LockLine {
    map: Arc<LineMap>,
    tag: u64,
}

impl Future for LockLine {
    type Output = LineGuard;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LineGuard> {
        let mut sh = self.map.shard(self.tag).write();
        match sh.locked.get_mut(&self.tag) {
            Some(waiters) => {
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            None => {
                sh.locked.insert(self.tag, Vec::new());
                Poll::Ready(LineGuard {
                    map: Arc::clone(&self.map),
                    tag: self.tag,
                })
            }
        }
    }
}

/// One held line lock; released (and its waiters woken) on drop.
pub struct LineGuard {
    map: Arc<LineMap>,
    tag: u64,
}

impl LineGuard {
    pub fn tag(&self) -> u64 {
        self.tag
    }
}

impl Drop for LineGuard {
    fn drop(&mut self) {
        let waiters = self.map.shard(self.tag).write().locked.remove(&self.tag);
        // Woken tasks retry; one of them gets the lock.
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }
}

impl std::fmt::Debug for LineGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LineGuard({})", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::slots::Rec;

    #[test]
    fn heads_follow_the_slot_table() {
        let slots = SlotTable::new(8, 16);
        let map = LineMap::new();
        for (slot, tag) in [(0u32, 5u64), (1, 700), (2, 5 + 64)] {
            slots.put(slot, &Rec { tag, ..Rec::FREE });
            map.shard(tag).write().set_head(&slots, tag, slot);
        }
        assert_eq!(map.shard(5).read().head(&slots, 5), Some(0));
        assert_eq!(map.shard(700).read().head(&slots, 700), Some(1));
        assert_eq!(map.len(), 3);
        // A new version replaces the head.
        slots.put(
            3,
            &Rec {
                tag: 5,
                ..Rec::FREE
            },
        );
        map.shard(5).write().set_head(&slots, 5, 3);
        assert_eq!(map.shard(5).read().head(&slots, 5), Some(3));
        assert_eq!(map.shard(5).write().remove(&slots, 5), Some(3));
        assert_eq!(map.shard(5).read().head(&slots, 5), None);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn line_locks_exclude_and_wake_the_next_holder() {
        let map = Arc::new(LineMap::new());
        let g = map.try_lock(9).unwrap();
        assert!(map.try_lock(9).is_none());
        assert!(map.try_lock(10).is_some());
        let m2 = Arc::clone(&map);
        let th = std::thread::spawn(move || {
            rbd_backend::aio::block_on(async move { m2.lock(9).await.tag() }).unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!th.is_finished());
        drop(g);
        assert_eq!(th.join().unwrap(), 9);
        assert!(!map.is_locked(9));
    }
}
