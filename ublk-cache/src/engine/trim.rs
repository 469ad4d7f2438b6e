//! Discard and write-zeroes.

use super::read::sectors;
use super::{Cache, Engine, Stats};
use crate::error::{EngineError, EngineResult};

impl Engine {
    /// Discard (`zero` false) or write-zeroes. In the dirty-holding modes the
    /// backend must first hold everything written before, or the flusher could
    /// later write older data over the zeroes (and, in ordered mode, the backend
    /// would see this request ahead of older epochs).
    pub(super) async fn discard_impl(&self, offset: u64, len: u64, zero: bool) -> EngineResult<()> {
        if len == 0 {
            return Ok(());
        }
        if let Some(c) = self.cache.as_ref() {
            if self.mode().holds_dirty() || c.st.dirty_lines() > 0 {
                self.writeback_barrier().await?;
            }
        }
        let r = if zero {
            self.backend.write_zeroes_async(offset, len).await
        } else {
            self.backend.discard_async(offset, len).await
        };
        r.map_err(|e| {
            Stats::add(&self.stats.backend_errors, 1);
            EngineError::backend(
                &format!(
                    "{} at {offset}+{len}",
                    if zero { "write-zeroes" } else { "discard" }
                ),
                e,
            )
        })?;
        if let Some(c) = self.cache.as_ref() {
            self.invalidate_range(c, offset, len).await;
            // In the dirty-holding modes a guest FLUSH does not reach the backend,
            // so the backend must hold the zeroes durably before we forget the
            // range: otherwise a power cut brings back the data written back before.
            if self.mode().holds_dirty() {
                self.backend_flush().await?;
            }
        }
        Ok(())
    }

    /// Drop a byte range from the cache, visiting only mapped lines when the
    /// range is larger than what is cached (a whole-device discard).
    pub(super) async fn invalidate_range(&self, c: &Cache, offset: u64, len: u64) {
        let st = &c.st;
        let ls = c.layout.line_size as u64;
        let end = offset + len;
        let (first, last) = (offset / ls, (end - 1) / ls);
        let tags: Vec<u64> = if last - first < st.map.len() as u64 {
            (first..=last).collect()
        } else {
            let mut t: Vec<u64> = st
                .mapped_slots()
                .into_iter()
                .map(|s| st.slots.tag(s))
                .filter(|t| (first..=last).contains(t))
                .collect();
            t.sort_unstable();
            t.dedup();
            t
        };
        for tag in tags {
            let a = offset.max(tag * ls) - tag * ls;
            let b = end.min((tag + 1) * ls) - tag * ls;
            let (s0, s1) = sectors(a, b);
            let _g = st.map.lock(tag).await;
            self.invalidate_locked(c, tag, s0, s1);
        }
    }
}
