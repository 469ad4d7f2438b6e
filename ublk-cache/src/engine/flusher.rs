//! The background flusher: writes dirty lines back to the backend, oldest epoch
//! first, each batch followed by a backend flush before the lines count as clean.
//! A backend that fails is retried with backoff; dirty data is never dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, warn};

use super::bits;
use super::{lock, wait, Engine, Stats, SECTOR};
use crate::error::EngineResult;
use crate::format::entry::SectorBits;

/// Lines written back per batch (one backend flush per batch).
const BATCH_LINES: usize = 64;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Backend writes in flight per batch.
const WRITEBACK_THREADS: usize = 8;

struct Item {
    tag: u64,
    slot: u32,
    gen: u64,
    dirty: SectorBits,
}

impl Engine {
    pub(super) fn start_flusher(self: &Arc<Self>) -> EngineResult<()> {
        if self.cache.is_none() {
            return Ok(());
        }
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("ublk-cache-flusher".into())
            .spawn(move || me.flusher_loop())
            .map_err(|e| {
                crate::error::EngineError::new(
                    crate::error::EngineErrorKind::Config,
                    format!("cannot start the flusher thread: {e}"),
                )
            })?;
        *lock(&self.flusher) = Some(h);
        Ok(())
    }

    pub(super) fn stop_flusher(&self) {
        if let Some(c) = self.cache.as_ref() {
            lock(&c.st).stopping = true;
            c.cv_flusher.notify_all();
        }
        let h = lock(&self.flusher).take();
        if let Some(h) = h {
            if h.join().is_err() {
                error!("the flusher thread panicked");
            }
        }
    }

    fn flusher_loop(self: Arc<Self>) {
        let c = self.cache.as_ref().expect("flusher with a cache");
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(items) = self.next_batch() else {
                return;
            };
            match self.write_back(&items) {
                Ok(bytes) => {
                    backoff = Duration::from_millis(50);
                    self.note_writeback_progress();
                    if self.writeback_failing.swap(false, Ordering::AcqRel) {
                        self.warned_ordering.store(false, Ordering::Release);
                        tracing::info!("write-back works again");
                    }
                    Stats::add(&self.stats.writeback_bytes, bytes);
                    Stats::add(&self.stats.backend_write_bytes, bytes);
                    let mut st = lock(&c.st);
                    for it in &items {
                        let l = st.lines[it.slot as usize];
                        // Rewritten meanwhile (same epoch): leave it dirty for the next pass.
                        if l.tag == Some(it.tag) && l.gen == it.gen {
                            st.set_bits(it.slot, l.valid, bits::none(), 0, false);
                        }
                    }
                    c.cv_progress.notify_all();
                    c.cv_space.notify_all();
                }
                Err(e) => {
                    Stats::add(&self.stats.writeback_retries, 1);
                    self.writeback_failing.store(true, Ordering::Release);
                    warn!(
                        "write-back of {} lines failed, data stays dirty in the cache; retrying in {:?}: {e}",
                        items.len(),
                        backoff
                    );
                    let st = lock(&c.st);
                    if st.stopping {
                        return;
                    }
                    drop(wait(&c.cv_flusher, st, backoff.as_millis() as u64));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Wait for and lock the next batch: dirty lines of the epoch that may go
    /// next. Returns None when the engine stops.
    fn next_batch(&self) -> Option<Vec<Item>> {
        let c = self.cache.as_ref()?;
        let mut st = lock(&c.st);
        loop {
            if st.stopping {
                return None;
            }
            let active = self.mode().writes_back_continuously() || st.drain_requests > 0;
            let epoch = if !active {
                None
            } else if self.reverse_writeback_for_tests.load(Ordering::Relaxed) {
                st.dirty.keys().next_back().copied()
            } else {
                self.order
                    .next_epoch(st.oldest_dirty_epoch(), st.oldest_applying_epoch())
            };
            if let Some(set) = epoch.and_then(|e| st.dirty.get(&e)) {
                let tags: Vec<u64> = set
                    .iter()
                    .filter(|t| !st.locked.contains(t))
                    .take(BATCH_LINES)
                    .copied()
                    .collect();
                if !tags.is_empty() {
                    let mut items = Vec::with_capacity(tags.len());
                    for tag in tags {
                        let Some(&slot) = st.map.get(&tag) else {
                            // Cannot happen (dirty lines stay mapped); never take the
                            // flusher down over it.
                            tracing::error!(tag, "dirty line without a slot; skipped");
                            continue;
                        };
                        let l = st.lines[slot as usize];
                        st.locked.insert(tag);
                        items.push(Item {
                            tag,
                            slot,
                            gen: l.gen,
                            dirty: l.dirty,
                        });
                    }
                    if !items.is_empty() {
                        return Some(items);
                    }
                }
            }
            // Nothing to take now: idle is not stalled.
            self.note_writeback_progress();
            st = wait(&c.cv_flusher, st, 200);
        }
    }

    /// Copy the batch's dirty sectors out of the cache (under the line locks),
    /// write them to the backend in extents, then flush the backend.
    fn write_back(&self, items: &[Item]) -> EngineResult<u64> {
        let c = self.cache.as_ref().expect("flusher with a cache");
        let ls = c.layout.line_size as u64;
        let spl = c.layout.spl();
        let mut extents: Vec<(u64, Vec<u8>)> = Vec::new();
        let read = (|| {
            for it in items {
                for (s, e, dirty) in bits::runs(&it.dirty, 0, spl) {
                    if !dirty {
                        continue;
                    }
                    let mut buf = vec![0u8; ((e - s) as u64 * SECTOR) as usize];
                    c.store.read(it.slot, s as u64 * SECTOR, &mut buf)?;
                    let off = it.tag * ls + s as u64 * SECTOR;
                    // Merge with the previous extent when contiguous on the backend.
                    match extents.last_mut() {
                        Some((o, b)) if *o + b.len() as u64 == off && b.len() < (4 << 20) => {
                            b.extend_from_slice(&buf)
                        }
                        _ => extents.push((off, buf)),
                    }
                }
            }
            Ok(())
        })();
        {
            let mut st = lock(&c.st);
            for it in items {
                st.locked.remove(&it.tag);
            }
            c.cv_locks.notify_all();
        }
        read.inspect_err(|_| Stats::add(&self.stats.cache_errors, 1))?;
        // Extents of one batch belong to one epoch, so their order does not
        // matter; writing them concurrently is what lets a networked backend
        // (RBD) drain at its bandwidth rather than at one request's latency.
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<crate::error::EngineError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..WRITEBACK_THREADS.min(extents.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((off, buf)) = extents.get(i) else {
                        break;
                    };
                    if let Err(e) = self.backend.write_at(*off, buf) {
                        Stats::add(&self.stats.backend_errors, 1);
                        let e = crate::error::EngineError::backend(
                            &format!("write-back at {off}+{}", buf.len()),
                            e,
                        );
                        lock(&first_err).get_or_insert(e);
                        break;
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let bytes = extents.iter().map(|(_, b)| b.len() as u64).sum();
        self.backend_flush()?;
        Ok(bytes)
    }
}
