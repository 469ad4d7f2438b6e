//! Operations on a serving engine, for the control socket: a live mode switch
//! (draining first where the new mode holds no dirty data), preload and
//! hydration, invalidation of clean data, and the migration handover.
//!
//! None of these fail a guest request: they wait for requests to finish where
//! they must (the I/O gate) and otherwise run beside them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use policies::CacheMode;
use tracing::{info, warn};

use super::{bits, Engine, SECTOR};
use crate::error::{EngineError, EngineErrorKind, EngineResult, Remedy};

/// How far a long operation has come, in bytes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// "write-back", "preload" or "hydrate".
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// Called with progress from the thread doing the work.
pub type ProgressFn<'a> = &'a (dyn Fn(&Progress) + Sync);

/// How a preload runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreloadOptions {
    /// Backend bytes per second at most; `None` is unlimited.
    pub rate: Option<u64>,
}

/// What a preload did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PreloadReport {
    /// Bytes of the requested ranges (clipped to the device).
    pub total: u64,
    /// Bytes fetched from the backend (the rest was cached already).
    pub fetched: u64,
    /// Whether it stopped early (the engine stopped or it was cancelled).
    pub interrupted: bool,
}

fn refuse(kind: EngineErrorKind, msg: impl Into<String>) -> EngineError {
    EngineError::new(kind, msg)
}

impl Engine {
    /// Switch to `new` while serving. Leaving a mode that holds dirty data for
    /// one that does not first writes everything back (reporting progress),
    /// with guest I/O going on; then, with requests held for a moment, writes
    /// back what arrived meanwhile and switches. No request fails. Returns the
    /// previous mode.
    pub fn set_mode(
        &self,
        new: CacheMode,
        progress: Option<ProgressFn<'_>>,
    ) -> EngineResult<CacheMode> {
        let _one = self.switch_lock.lock();
        self.check_open()?;
        let old = self.mode();
        if old == new {
            return Ok(old);
        }
        if new.uses_cache() && self.cache.is_none() {
            return Err(refuse(
                EngineErrorKind::Config,
                format!("mode '{new}' needs a cache device, and this server runs without one"),
            ));
        }
        if new == CacheMode::Offline {
            let capacity = self
                .cache
                .as_ref()
                .map_or(0, |c| c.layout.nr_lines * c.layout.line_size as u64);
            if capacity < self.size {
                return Err(EngineError::offline_capacity(capacity, self.size));
            }
            if !self.started_offline {
                // The copy-in runs only for a server started offline.
                return Err(refuse(
                    EngineErrorKind::Config,
                    "offline mode needs the whole image in the cache, which only a server started in \
                     offline mode copies in",
                )
                .with_remedies(&[Remedy::StartOffline]));
            }
        }
        let leaving_dirty = old.holds_dirty() && !new.holds_dirty();
        if leaving_dirty {
            info!(from = %old, to = %new, "mode switch: writing back dirty data first");
            self.drain_with_progress(progress)?;
        }
        {
            let _held = self.gate.close();
            // A stop may have come in during the drain: change nothing then.
            self.check_open()?;
            if leaving_dirty {
                // Only what arrived during the drain above is left.
                super::blocking(self.writeback_barrier())?;
            }
            if !new.uses_cache() {
                // Pass-through writes would leave cached copies stale.
                self.drop_clean_lines();
            }
            self.mode.store(new.code(), Ordering::Release);
            if let Some(c) = self.cache.as_ref() {
                c.sb.lock().mode = new.code();
                c.ev.flusher.notify(usize::MAX);
            }
            self.persist_blocking()?;
        }
        info!(from = %old, to = %new, "cache mode switched");
        Ok(old)
    }

    /// `ctl flush`: write back all dirty data (with progress) and flush the
    /// backend, so everything acknowledged so far is durable there.
    pub fn flush_to_backend(&self, progress: Option<ProgressFn<'_>>) -> EngineResult<()> {
        self.check_open()?;
        self.drain_with_progress(progress)?;
        super::blocking(self.backend_flush())
    }

    /// Drop all clean cached data. Refuses while dirty data remains: that must
    /// reach the backend first (`ctl flush`), or it would be lost.
    pub fn invalidate_clean(&self) -> EngineResult<u64> {
        let _one = self.switch_lock.lock();
        self.check_open()?;
        let Some(c) = self.cache.as_ref() else {
            return Ok(0);
        };
        let _held = self.gate.close();
        let dropped = {
            let st = &c.st;
            if st.dirty_lines() > 0 {
                return Err(refuse(
                    EngineErrorKind::DirtyData,
                    format!(
                        "{} lines hold dirty data that is not on the backend yet",
                        st.dirty_lines()
                    ),
                )
                .with_remedies(&[Remedy::WriteBackFirst]));
            }
            let before = st.valid_sectors.load(Ordering::Relaxed).max(0) as u64 * SECTOR;
            Self::drop_clean_in(st);
            before
        };
        self.persist_blocking()?;
        info!(bytes = dropped, "clean cached data invalidated");
        Ok(dropped)
    }

    /// Read `[offset, offset+len)` into the cache, fetching only what is not
    /// cached yet. Runs beside guest I/O: a guest read of a line being fetched
    /// waits for that fetch (the line lock) instead of fetching it again.
    pub fn preload(
        &self,
        offset: u64,
        len: u64,
        opts: PreloadOptions,
        cancel: Option<&AtomicBool>,
        progress: Option<ProgressFn<'_>>,
    ) -> EngineResult<PreloadReport> {
        self.preload_as("preload", offset, len, opts, cancel, progress)
    }

    /// Boot prefetch (`--boot-trace replay`) of the lines `offset..+len`
    /// covers (a few adjacent lines): one fetch per group of adjacent lines
    /// with something missing, so that their missing sectors come in one
    /// backend read, which a guest read of any of them waits for (the line
    /// locks) instead of reading again. Returns the bytes read from the
    /// backend for each line, as the fetch counted them under the locks.
    pub fn prefetch_lines(&self, offset: u64, len: u64) -> EngineResult<Vec<u64>> {
        self.check_open()?;
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        super::blocking(async {
            let _g = self.gate.enter().await;
            // The mode may have changed since prefetch started.
            let Some(c) = self.cache() else {
                return Err(refuse(
                    EngineErrorKind::Config,
                    format!(
                        "mode '{}' caches nothing, so there is nothing to prefetch into",
                        self.mode()
                    ),
                ));
            };
            let ls = self.line_size();
            let lines: Vec<(u64, u64, u64)> = self.split(offset, end - offset).collect();
            let mut fetched = vec![0u64; lines.len()];
            // Lines cached whole already are skipped (no cache read for them);
            // what a fetch finds cached under its locks is not read again.
            let mut i = 0;
            while i < lines.len() {
                let missing = |k: usize| {
                    let (tag, a, n) = lines[k];
                    !self.line_range_valid(c, tag, a, a + n)
                };
                if !missing(i) {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < lines.len() && missing(j) {
                    j += 1;
                }
                let lo = lines[i].0 * ls + lines[i].1;
                let hi = lines[j - 1].0 * ls + lines[j - 1].1 + lines[j - 1].2;
                let buf = rbd_backend::aio::DmaBuf::new((hi - lo) as usize);
                self.fetch_for_preload(
                    c,
                    lo,
                    hi,
                    buf.slice(0, (hi - lo) as usize),
                    Some(&mut fetched[i..j]),
                )
                .await?;
                i = j;
            }
            Ok(fetched)
        })
    }

    pub(super) fn preload_as(
        &self,
        phase: &'static str,
        offset: u64,
        len: u64,
        opts: PreloadOptions,
        cancel: Option<&AtomicBool>,
        progress: Option<ProgressFn<'_>>,
    ) -> EngineResult<PreloadReport> {
        let end = offset.saturating_add(len).min(self.size);
        let mut rep = PreloadReport {
            total: end.saturating_sub(offset),
            ..Default::default()
        };
        if rep.total == 0 {
            return Ok(rep);
        }
        if self.cache.is_none() || !self.mode().uses_cache() {
            return Err(refuse(
                EngineErrorKind::Config,
                format!(
                    "mode '{}' caches nothing, so there is nothing to preload into",
                    self.mode()
                ),
            ));
        }
        let ls = self.line_size();
        let start = Instant::now();
        let mut last_report = Instant::now();
        let mut done = 0u64;
        let report = |done: u64| {
            if let Some(p) = progress {
                p(&Progress {
                    phase: phase.into(),
                    done,
                    total: rep.total,
                });
            }
        };
        super::blocking(async {
            let buf = rbd_backend::aio::DmaBuf::new(ls as usize);
            for (tag, a, n) in self.split(offset, rep.total) {
                if self.closed.load(Ordering::Acquire)
                    || cancel.is_some_and(|c| c.load(Ordering::Acquire))
                {
                    rep.interrupted = true;
                    break;
                }
                let fetched = {
                    let _g = self.gate.enter().await;
                    // The mode may have changed since the last line.
                    let Some(c) = self.cache() else {
                        rep.interrupted = true;
                        break;
                    };
                    if self.line_range_valid(c, tag, a, a + n) {
                        0
                    } else {
                        let lo = tag * ls + a;
                        self.fetch_for_preload(c, lo, lo + n, buf.slice(0, n as usize), None)
                            .await?
                    }
                };
                rep.fetched += fetched;
                done += n;
                if let Some(rate) = opts.rate.filter(|&r| r > 0) {
                    // Sleep until the bytes fetched so far fit the rate.
                    let due = Duration::from_secs_f64(rep.fetched as f64 / rate as f64);
                    if let Some(ahead) = due.checked_sub(start.elapsed()) {
                        rbd_backend::aio::sleep(ahead.min(Duration::from_secs(5))).await;
                    }
                }
                if last_report.elapsed() >= Duration::from_millis(500) {
                    report(done);
                    last_report = Instant::now();
                }
            }
            Ok(())
        })?;
        report(done);
        info!(
            phase,
            total = rep.total,
            fetched = rep.fetched,
            interrupted = rep.interrupted,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "{phase} finished"
        );
        Ok(rep)
    }

    /// Offline mode: copy the whole image into the cache. Lines already valid
    /// (from before a restart) are skipped, so a restarted hydration continues
    /// where it stopped and never skips what is missing.
    pub fn hydrate(
        &self,
        opts: PreloadOptions,
        cancel: Option<&AtomicBool>,
        progress: Option<ProgressFn<'_>>,
    ) -> EngineResult<PreloadReport> {
        let rep = self.preload_as("hydrate", 0, self.size, opts, cancel, progress)?;
        if !rep.interrupted {
            // Make the copy durable, so a restart after a power cut finds it.
            self.persist_blocking()?;
            self.hydrated.store(true, Ordering::Release);
        }
        Ok(rep)
    }

    /// Whether bytes `a..b` of line `tag` are all in the cache.
    fn line_range_valid(&self, c: &super::Cache, tag: u64, a: u64, b: u64) -> bool {
        let Some(slot) = c.st.head(tag) else {
            return false;
        };
        let valid = c.st.slots.valid(slot);
        let (s0, s1) = ((a / SECTOR) as u32, b.div_ceil(SECTOR) as u32);
        (s0..s1).all(|s| bits::test(&valid, s))
    }

    /// Source side of a live migration: switch to write-through (writing all
    /// dirty data back), flush the backend, and release the backend's exclusive
    /// lock (if it has one) so the destination can take it. Keeps serving; from
    /// here on every write reaches the backend before it is acknowledged.
    /// Returns the mode to go back to on abort.
    pub fn migrate_out(&self, progress: Option<ProgressFn<'_>>) -> EngineResult<CacheMode> {
        let old = self.mode();
        let target = if self.cache.is_some() {
            CacheMode::Through
        } else {
            CacheMode::None
        };
        let prev = if old.holds_dirty() || old == target {
            self.set_mode(target, progress)?
        } else {
            // around/none already write every request to the backend.
            old
        };
        let released = super::blocking(self.backend_flush()).and_then(|()| {
            match self.backend.exclusive_lock() {
                Some(lock) => lock.release_lock().map_err(|e| {
                    EngineError::backend("releasing the exclusive lock for migration", e)
                }),
                // Nothing keeps the destination off this backend: nothing to hand over.
                None => Ok(()),
            }
        });
        if let Err(e) = released {
            // Not migrated out: go back to where we were, so nothing changes for the guest.
            if prev != self.mode() {
                if let Err(e2) = self.set_mode(prev, None) {
                    warn!("migrate-out failed, and returning to mode '{prev}' failed too: {e2}");
                }
            }
            return Err(e);
        }
        info!(previous_mode = %prev, "migrate-out: nothing dirty, backend flushed, lock released; serving write-through");
        Ok(prev)
    }

    /// Undo `migrate_out`: take the backend's lock back and return to `prev`.
    pub fn migrate_abort(&self, prev: CacheMode) -> EngineResult<()> {
        if let Some(lock) = self.backend.exclusive_lock() {
            lock.acquire_lock().map_err(|e| {
                EngineError::backend(
                    "taking the exclusive lock back after an aborted migration",
                    e,
                )
            })?;
        }
        if prev != self.mode() {
            if let Err(e) = self.set_mode(prev, None) {
                warn!("migrate-abort: lock taken back, but returning to mode '{prev}' failed: {e}");
                return Err(e);
            }
        }
        info!(mode = %prev, "migrate-abort: lock taken back, previous mode restored");
        Ok(())
    }

    /// Whether offline mode's hydration has copied the whole image in.
    pub fn hydration_done(&self) -> bool {
        self.hydrated.load(Ordering::Acquire)
    }
}
