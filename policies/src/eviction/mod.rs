//! Which clean cache line to give up when space is needed: the
//! [`EvictionPolicy`] trait, the policies, and [`EvictionKind`], which names
//! one and builds it.
//!
//! Only lines that may be evicted are tracked: the engine removes a line when it
//! becomes dirty and adds it back once it is clean again, so a victim never needs
//! to be searched for among dirty lines.
//!
//! A new policy is a file here, a variant of [`EvictionKind`] and an arm of
//! [`EvictionBuilder::build`]; it then runs through the shared test body in
//! `tests.rs`, which every kind must pass.

mod clock;
mod lru;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use self::clock::ClockPolicy;
pub use self::lru::LruPolicy;

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

/// The eviction policies there are, by name (`clock`, `lru`). CLOCK is the
/// default: a hit only sets a bit, so readers never write a shared list.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionKind {
    /// CLOCK (second chance).
    #[default]
    Clock,
    /// Least recently used.
    Lru,
}

impl EvictionKind {
    /// Every kind, for tests and help texts.
    pub const ALL: &'static [EvictionKind] = &[EvictionKind::Clock, EvictionKind::Lru];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictionKind::Clock => "clock",
            EvictionKind::Lru => "lru",
        }
    }

    /// A builder for a policy of this kind.
    pub fn builder(self) -> EvictionBuilder {
        EvictionBuilder {
            kind: self,
            slots: 0,
        }
    }
}

impl fmt::Display for EvictionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy '{0}' (expected {list})", list = EvictionKind::names())]
pub struct ParseEvictionError(String);

impl EvictionKind {
    fn names() -> String {
        EvictionKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl FromStr for EvictionKind {
    type Err = ParseEvictionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        EvictionKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == t)
            .ok_or_else(|| ParseEvictionError(s.to_string()))
    }
}

/// Builds the policy of an [`EvictionKind`] for a cache.
#[derive(Debug, Clone)]
pub struct EvictionBuilder {
    kind: EvictionKind,
    slots: usize,
}

impl EvictionBuilder {
    /// How many slots the cache has. Policies that keep state per slot
    /// (a CLOCK ring, ghost queues) size themselves by it; LRU grows as needed.
    pub fn slots(mut self, slots: usize) -> Self {
        self.slots = slots;
        self
    }

    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self.kind {
            EvictionKind::Clock => Box::new(ClockPolicy::with_capacity(self.slots)),
            EvictionKind::Lru => Box::new(LruPolicy::with_slots(self.slots)),
        }
    }
}
