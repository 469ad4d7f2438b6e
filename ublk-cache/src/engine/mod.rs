//! The cache engine: mode policy, cache map, metadata persistence and the
//! background flusher. Frontends reach it through [`crate::target::BlockTarget`];
//! it reaches storage through the `Backend` trait (the slow disk) and
//! [`store::CacheStore`] (the local cache device).
//!
//! Locking: one mutex guards the in-memory [`state::State`]. Requests take a
//! per-backend-line lock (one at a time, so they cannot deadlock) for the I/O of
//! that line, and never hold the state mutex across I/O. Lock order where nested:
//! refill lock → persist lock → state.
// TODO(lead): the lead is rewriting the engine; document its `unsafe` blocks
// with `// SAFETY:` comments and drop this allow.
#![allow(clippy::undocumented_unsafe_blocks)]

mod attach;
pub mod bits;
mod flusher;
mod io;
pub mod latency;
mod live;
mod persist;
pub mod shadow;
pub mod state;
mod stats;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::Backend;

pub use attach::EngineConfig;
pub use latency::{bucket_upper_us, LatencySnapshot, Op};
pub use live::{PreloadOptions, PreloadReport, Progress, ProgressFn};
pub use stats::{Stats, StatsSnapshot};

use crate::error::{EngineError, EngineErrorKind, EngineResult};
use crate::format::{EntryCodec, Layout, Superblock, SECTOR_SIZE};
use crate::target::{BlockTarget, TargetResult};
use state::State;
use store::CacheStore;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// The part of the engine that exists only when a cache device is attached.
struct Cache {
    store: CacheStore,
    dev: Arc<dyn Backend>,
    layout: Layout,
    codec: EntryCodec,
    st: Mutex<State>,
    /// A per-line lock was released.
    cv_locks: Condvar,
    /// A slot became free or clean.
    cv_space: Condvar,
    /// The flusher finished a batch (lines became clean, epochs completed).
    cv_progress: Condvar,
    /// Work for the flusher.
    cv_flusher: Condvar,
    persist_lock: Mutex<()>,
    refill_lock: Mutex<()>,
    sb: Mutex<Superblock>,
}

pub struct Engine {
    /// The cache mode's code (`CacheMode::code`); changed only by `set_mode`.
    mode: AtomicU32,
    /// Every request holds this shared; a mode switch holds it exclusively for
    /// its last step, so no request sees half of one mode and half of another.
    io_gate: RwLock<()>,
    /// One mode switch (or invalidation) at a time.
    switch_lock: Mutex<()>,
    /// Offline mode: the whole image has been copied into the cache.
    hydrated: AtomicBool,
    /// Opened in offline mode (its hydration runs), so it may return to it.
    started_offline: bool,
    /// The last write-back batch failed (the backend is down or refusing).
    writeback_failing: AtomicBool,
    /// Ordered overwrites go in place until write-back works again (logged once).
    warned_ordering: AtomicBool,
    /// When the engine started, and when (ms after that) write-back last
    /// finished a batch or found nothing to do.
    born: Instant,
    writeback_progress_ms: std::sync::atomic::AtomicU64,
    order: WritebackOrder,
    backend: Arc<dyn Backend>,
    size: u64,
    cache: Option<Cache>,
    stats: Stats,
    flusher: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    /// Test-only fault: write dirty lines back newest epoch first. Exists so the
    /// crash harness can prove it catches ordering bugs.
    #[doc(hidden)]
    pub reverse_writeback_for_tests: AtomicBool,
}

/// Lock a mutex, recovering the data if another thread panicked while holding
/// it: the state is kept consistent at every unlock point, and a storage daemon
/// that stops serving because of a poisoned lock loses the guest's disk.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>, ms: u64) -> MutexGuard<'a, T> {
    cv.wait_timeout(g, std::time::Duration::from_millis(ms))
        .unwrap_or_else(|p| p.into_inner())
        .0
}

/// Holds the per-line lock of one backend line; released on drop.
struct LineGuard<'a> {
    cache: &'a Cache,
    tag: u64,
}

impl Drop for LineGuard<'_> {
    fn drop(&mut self) {
        lock(&self.cache.st).locked.remove(&self.tag);
        self.cache.cv_locks.notify_all();
    }
}

impl Cache {
    fn lock_line(&self, tag: u64) -> LineGuard<'_> {
        let mut st = lock(&self.st);
        while st.locked.contains(&tag) {
            st = wait(&self.cv_locks, st, 1000);
        }
        st.locked.insert(tag);
        LineGuard { cache: self, tag }
    }
}

impl Engine {
    /// How long ago write-back last made progress (or was idle).
    fn since_writeback_progress(&self) -> std::time::Duration {
        let now = self.born.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.writeback_progress_ms.load(Ordering::Acquire)),
        )
    }

    fn note_writeback_progress(&self) {
        self.writeback_progress_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub fn mode(&self) -> CacheMode {
        CacheMode::from_code(self.mode.load(Ordering::Acquire)).unwrap_or(CacheMode::None)
    }

    fn io_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.io_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn io_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.io_gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn order(&self) -> WritebackOrder {
        self.order
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.mode = self.mode().to_string();
        s.order = self.order.to_string();
        s.size = self.size;
        if let Some(c) = &self.cache {
            let (r, w) = c.store.io_bytes();
            s.cache_read_bytes = r;
            s.cache_write_bytes = w;
            let st = lock(&c.st);
            s.dirty_lines = st.dirty_lines as u64;
            s.valid_bytes = st.valid_sectors * SECTOR;
            s.dirty_bytes = st.dirty_sectors * SECTOR;
            s.clean_bytes = s.valid_bytes - s.dirty_bytes;
            s.cached_lines = st.map.len() as u64;
            s.cache_lines = c.layout.nr_lines;
            s.line_size = c.layout.line_size as u64;
            s.epoch = st.cur_epoch;
        }
        s
    }

    pub fn line_size(&self) -> u64 {
        self.cache
            .as_ref()
            .map_or(64 * 1024, |c| c.layout.line_size as u64)
    }

    fn check_range(&self, offset: u64, len: u64) -> EngineResult<()> {
        match offset.checked_add(len) {
            // A backend shrunk under us (RBD): cached or not, the range is gone.
            Some(end) if end > self.backend.current_size() && end <= self.size => {
                Err(EngineError::new(
                    EngineErrorKind::BackendIo,
                    format!(
                        "request at {offset}+{len} reaches past the backend's end at {} (shrunk while served)",
                        self.backend.current_size()
                    ),
                ))
            }
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::new(
                EngineErrorKind::InvalidRequest,
                format!(
                    "request at {offset}+{len} reaches past the end of the {}-byte device",
                    self.size
                ),
            )),
        }
    }

    fn check_open(&self) -> EngineResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::new(
                EngineErrorKind::Stopped,
                "the engine has been shut down",
            ));
        }
        Ok(())
    }

    /// Split `[offset, offset+len)` into per-line pieces: (line, offset in line, len).
    fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let ls = self.line_size();
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let tag = pos / ls;
            let a = pos % ls;
            let n = (ls - a).min(end - pos);
            pos += n;
            Some((tag, a, n))
        })
    }
}

impl BlockTarget for Engine {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> TargetResult<()> {
        let t = Instant::now();
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        let r = {
            let _g = self.io_shared();
            self.read_impl(offset, buf)
        };
        self.stats.latency.record(Op::Read, t.elapsed());
        Ok(r?)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> TargetResult<()> {
        let t = Instant::now();
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        let r = {
            let _g = self.io_shared();
            self.write_impl(offset, buf)
                .and_then(|()| if fua { self.flush_impl(false) } else { Ok(()) })
        };
        self.stats.latency.record(Op::Write, t.elapsed());
        Ok(r?)
    }

    fn flush(&self) -> TargetResult<()> {
        let t = Instant::now();
        self.check_open()?;
        let r = {
            let _g = self.io_shared();
            self.flush_impl(true)
        };
        self.stats.latency.record(Op::Flush, t.elapsed());
        Ok(r?)
    }

    fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        let t = Instant::now();
        self.check_open()?;
        self.check_range(offset, len)?;
        let r = {
            let _g = self.io_shared();
            self.discard_impl(offset, len, false)
        };
        self.stats.latency.record(Op::Discard, t.elapsed());
        Ok(r?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        let t = Instant::now();
        self.check_open()?;
        self.check_range(offset, len)?;
        let r = {
            let _g = self.io_shared();
            self.discard_impl(offset, len, true)
        };
        self.stats.latency.record(Op::Discard, t.elapsed());
        Ok(r?)
    }
}
