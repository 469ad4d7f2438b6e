//! Counters the engine keeps for logs, `ctl stats` and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    pub read_hit_bytes: AtomicU64,
    pub read_miss_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub backend_read_bytes: AtomicU64,
    pub backend_write_bytes: AtomicU64,
    pub writeback_bytes: AtomicU64,
    pub backend_errors: AtomicU64,
    pub cache_errors: AtomicU64,
    pub flushes: AtomicU64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub read_hit_bytes: u64,
    pub read_miss_bytes: u64,
    pub write_bytes: u64,
    pub backend_read_bytes: u64,
    pub backend_write_bytes: u64,
    pub writeback_bytes: u64,
    pub backend_errors: u64,
    pub cache_errors: u64,
    pub flushes: u64,
    pub dirty_lines: u64,
    pub cached_lines: u64,
    pub cache_lines: u64,
    pub line_size: u64,
    pub epoch: u64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hit_bytes: g(&self.read_hit_bytes),
            read_miss_bytes: g(&self.read_miss_bytes),
            write_bytes: g(&self.write_bytes),
            backend_read_bytes: g(&self.backend_read_bytes),
            backend_write_bytes: g(&self.backend_write_bytes),
            writeback_bytes: g(&self.writeback_bytes),
            backend_errors: g(&self.backend_errors),
            cache_errors: g(&self.cache_errors),
            flushes: g(&self.flushes),
            ..Default::default()
        }
    }
}
