//! The per-disk cache modes and what each one does with reads, writes and flushes.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Pass-through: the cache is not touched.
    None,
    /// Reads are cached; writes go to the backend only.
    Around,
    /// Writes go to the backend and the cache.
    Through,
    /// Writes complete from the cache and are written back later, in order.
    /// The default.
    #[default]
    Back,
    /// Whole image local while running; dirty parts written back at stop.
    Offline,
}

/// Where a guest write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRoute {
    /// Backend only; any cached copy of the range is invalidated.
    BackendInvalidate,
    /// Backend first, then the cache (allocating lines).
    BackendThenCache,
    /// Cache only, marked dirty; the flusher writes it back.
    CacheDirty,
}

/// What a guest FLUSH must make durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushAction {
    /// Persist cache data and metadata (fdatasync, metadata, fdatasync).
    pub persist_cache: bool,
    /// Flush the backend.
    pub flush_backend: bool,
    /// Close the current write-back epoch (ordering barrier for the flusher).
    pub close_epoch: bool,
}

impl CacheMode {
    pub const ALL: [CacheMode; 5] = [
        CacheMode::None,
        CacheMode::Around,
        CacheMode::Through,
        CacheMode::Back,
        CacheMode::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Around => "around",
            CacheMode::Through => "through",
            CacheMode::Back => "back",
            CacheMode::Offline => "offline",
        }
    }

    /// Stable number stored in the superblock.
    pub fn code(self) -> u32 {
        match self {
            CacheMode::None => 0,
            CacheMode::Around => 1,
            CacheMode::Through => 2,
            CacheMode::Back => 3,
            CacheMode::Offline => 4,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.code() == code)
    }

    /// Whether the cache device is used at all.
    pub fn uses_cache(self) -> bool {
        self != CacheMode::None
    }

    /// Whether a read miss is promoted into the cache.
    pub fn promotes_reads(self) -> bool {
        self.uses_cache()
    }

    /// Whether the cache may hold data the backend does not have yet.
    pub fn holds_dirty(self) -> bool {
        matches!(self, CacheMode::Back | CacheMode::Offline)
    }

    /// Whether a server started in this mode copies the whole image into the
    /// cache in the background (offline mode's hydration).
    pub fn hydrates_at_start(self) -> bool {
        self == CacheMode::Offline
    }

    /// Whether the background flusher writes dirty data back while serving.
    /// Offline mode keeps writes local until stop or an explicit flush.
    pub fn writes_back_continuously(self) -> bool {
        self == CacheMode::Back
    }

    pub fn write_route(self) -> WriteRoute {
        match self {
            CacheMode::None | CacheMode::Around => WriteRoute::BackendInvalidate,
            CacheMode::Through => WriteRoute::BackendThenCache,
            CacheMode::Back | CacheMode::Offline => WriteRoute::CacheDirty,
        }
    }

    /// FLUSH semantics: in the dirty-holding modes a flush makes acknowledged writes
    /// durable in the cache; otherwise on the backend. The cache is persisted in the
    /// clean modes too, so that an invalidation made for a write cannot be lost and
    /// leave stale data valid after a crash.
    pub fn flush_action(self) -> FlushAction {
        match self {
            CacheMode::None => FlushAction {
                persist_cache: false,
                flush_backend: true,
                close_epoch: false,
            },
            CacheMode::Around | CacheMode::Through => FlushAction {
                persist_cache: true,
                flush_backend: true,
                close_epoch: false,
            },
            CacheMode::Back | CacheMode::Offline => FlushAction {
                persist_cache: true,
                flush_backend: false,
                close_epoch: true,
            },
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache mode '{0}' (expected one of: none, around, through, back, offline)")]
pub struct ParseModeError(pub String);

impl FromStr for CacheMode {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseModeError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects_unknown() {
        for m in CacheMode::ALL {
            assert_eq!(m.as_str().parse::<CacheMode>().unwrap(), m);
            assert_eq!(CacheMode::from_code(m.code()), Some(m));
        }
        let err = "writeback".parse::<CacheMode>().unwrap_err();
        assert!(err.to_string().contains("writeback"));
        assert_eq!(CacheMode::from_code(99), None);
    }

    #[test]
    fn only_back_and_offline_hold_dirty_data() {
        let dirty: Vec<_> = CacheMode::ALL
            .into_iter()
            .filter(|m| m.holds_dirty())
            .collect();
        assert_eq!(dirty, vec![CacheMode::Back, CacheMode::Offline]);
        for m in CacheMode::ALL {
            assert_eq!(m.holds_dirty(), m.write_route() == WriteRoute::CacheDirty);
        }
    }

    #[test]
    fn flush_reaches_the_backend_exactly_when_no_dirty_data_is_held() {
        for m in CacheMode::ALL {
            let a = m.flush_action();
            assert_eq!(a.flush_backend, !m.holds_dirty(), "{m}");
            assert_eq!(a.close_epoch, m.holds_dirty(), "{m}");
            assert_eq!(a.persist_cache, m.uses_cache(), "{m}");
        }
    }
}
