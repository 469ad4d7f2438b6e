//! The cache engine: mode policy, cache map, metadata persistence and the
//! background flusher. Frontends reach it through [`crate::target::BlockTarget`];
//! it reaches storage through the `Backend` trait (the slow disk) and
//! [`store::CacheStore`] (the local cache device).
//!
//! Locking: one mutex guards the in-memory [`state::State`]. Requests take a
//! per-backend-line lock (one at a time, so they cannot deadlock) for the I/O of
//! that line, and never hold the state mutex across I/O. Lock order where nested:
//! refill lock → persist lock → state.

mod attach;
pub mod bits;
mod flusher;
mod io;
mod persist;
pub mod shadow;
pub mod state;
mod stats;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::Backend;

pub use attach::EngineConfig;
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
    mode: CacheMode,
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
    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    pub fn order(&self) -> WritebackOrder {
        self.order
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        if let Some(c) = &self.cache {
            let st = lock(&c.st);
            s.dirty_lines = st.dirty_lines as u64;
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
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        Ok(self.read_impl(offset, buf)?)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> TargetResult<()> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        self.write_impl(offset, buf)?;
        if fua {
            self.flush_impl(false)?;
        }
        Ok(())
    }

    fn flush(&self) -> TargetResult<()> {
        self.check_open()?;
        Ok(self.flush_impl(true)?)
    }

    fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        self.check_open()?;
        self.check_range(offset, len)?;
        Ok(self.discard_impl(offset, len, false)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        self.check_open()?;
        self.check_range(offset, len)?;
        Ok(self.discard_impl(offset, len, true)?)
    }
}
