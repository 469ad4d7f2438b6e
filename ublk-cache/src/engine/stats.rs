//! Counters the engine keeps for logs, `ctl stats` and metrics. Plain relaxed
//! atomics: they are read for display, never to decide anything.

use std::sync::atomic::{AtomicU64, Ordering};

use super::latency::{Latencies, LatencySnapshot};

#[derive(Default)]
pub struct Stats {
    pub read_hit_bytes: AtomicU64,
    pub read_miss_bytes: AtomicU64,
    /// Read requests served wholly from the cache, wholly from the backend, or both.
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub read_partial: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Write requests whose lines were all already cached, none, or some.
    pub write_hits: AtomicU64,
    pub write_misses: AtomicU64,
    pub write_partial: AtomicU64,
    /// All bytes read from / written to the backend (guest misses, preload,
    /// write-through and write-back).
    pub backend_read_bytes: AtomicU64,
    pub backend_write_bytes: AtomicU64,
    /// The part of `backend_write_bytes` that the flusher wrote back.
    pub writeback_bytes: AtomicU64,
    pub writeback_retries: AtomicU64,
    /// Ordered overwrites that went in place because write-back was failing.
    pub ordered_overwrites_in_place: AtomicU64,
    /// Format v2, relaxed order: older versions dropped unwritten because a
    /// durable newer version holds all their data.
    pub versions_superseded: AtomicU64,
    /// Format v2: lines whose newer clean version was merged into the older
    /// one after write-back (so the older one's data stays cached).
    pub versions_merged: AtomicU64,
    /// Offline mode: write-backs before stop, because a line not cached yet
    /// needed a slot that only older versions held.
    pub offline_writebacks_for_space: AtomicU64,
    /// Milliseconds during which write-back waited for its rate or write
    /// limit (wall time: writes that wait together count once).
    pub writeback_paced_ms: AtomicU64,
    /// Format v2: write-back watermarks made durable by a round someone else
    /// ran (no device flush of their own), and by a round of their own.
    pub watermark_shared_rounds: AtomicU64,
    pub watermark_own_rounds: AtomicU64,
    pub backend_errors: AtomicU64,
    pub cache_errors: AtomicU64,
    pub flushes: AtomicU64,
    /// Guest FLUSHes that found everything durable already (format v2): no
    /// device flush.
    pub flushes_with_nothing_new: AtomicU64,
    /// FUA writes made durable in one pass: the data written durable, then
    /// one record written durable, no device flush (but in one round of 65,
    /// see `persist::MAX_UNFLUSHED_ROUNDS`).
    pub fua_one_pass: AtomicU64,
    pub preload_bytes: AtomicU64,
    pub latency: Latencies,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub mode: String,
    pub order: String,
    /// Device size in bytes.
    pub size: u64,
    pub read_hit_bytes: u64,
    pub read_miss_bytes: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    pub read_partial: u64,
    pub write_bytes: u64,
    pub write_hits: u64,
    pub write_misses: u64,
    pub write_partial: u64,
    pub backend_read_bytes: u64,
    pub backend_write_bytes: u64,
    pub cache_read_bytes: u64,
    pub cache_write_bytes: u64,
    /// Flushes of the cache device, and metadata bytes written to it: what the
    /// guest's FLUSHes (and evictions) cost the cache device.
    #[serde(default)]
    pub cache_flushes: u64,
    #[serde(default)]
    pub meta_write_bytes: u64,
    pub writeback_bytes: u64,
    pub writeback_retries: u64,
    pub ordered_overwrites_in_place: u64,
    #[serde(default)]
    pub versions_superseded: u64,
    #[serde(default)]
    pub versions_merged: u64,
    #[serde(default)]
    pub offline_writebacks_for_space: u64,
    #[serde(default)]
    pub writeback_paced_ms: u64,
    #[serde(default)]
    pub watermark_shared_rounds: u64,
    #[serde(default)]
    pub watermark_own_rounds: u64,
    /// The write-back limit in effect: backend bytes and writes per second
    /// (0: no limit).
    #[serde(default)]
    pub writeback_rate_limit: u64,
    #[serde(default)]
    pub writeback_iops_limit: u64,
    /// The dirty-level controller (`--writeback-low`/`--writeback-high`):
    /// `off`, or what it does now (`paced`, `above-high`, `guest-idle`,
    /// `guest-waits`), the byte rate it paces to (0: unpaced), the part of
    /// that rate its integral term gives, the low watermark it used last in
    /// bytes (0 while the guest is idle), and its settings.
    #[serde(default)]
    pub writeback_control: String,
    #[serde(default)]
    pub writeback_control_rate: u64,
    #[serde(default)]
    pub writeback_control_integral_rate: u64,
    #[serde(default)]
    pub writeback_control_low_bytes: u64,
    #[serde(default)]
    pub writeback_low_pct: u64,
    #[serde(default)]
    pub writeback_high_pct: u64,
    #[serde(default)]
    pub writeback_min_rate: u64,
    pub backend_errors: u64,
    pub cache_errors: u64,
    pub flushes: u64,
    #[serde(default)]
    pub flushes_with_nothing_new: u64,
    #[serde(default)]
    pub fua_one_pass: u64,
    pub preload_bytes: u64,
    pub dirty_lines: u64,
    pub cached_lines: u64,
    pub cache_lines: u64,
    pub line_size: u64,
    /// Bytes of valid (clean or dirty) and of dirty data in the cache.
    pub valid_bytes: u64,
    pub clean_bytes: u64,
    pub dirty_bytes: u64,
    /// The write-back epoch new writes join.
    pub epoch: u64,
    /// Format v2: every write of an epoch up to this is on the backend (and
    /// that is durable on the cache device).
    #[serde(default)]
    pub flushed_epoch: u64,
    /// Non-zero: since this epoch the backend alone is not a flush-point state
    /// (writes went in place when no room was left for versions), until a full
    /// write-back.
    #[serde(default)]
    pub order_broken_since: u64,
    /// The cache's on-disk format version.
    #[serde(default)]
    pub format_version: u32,
    /// `--boot-trace`: recording and prefetch of this start.
    #[serde(default)]
    pub boot_trace: BootTraceStats,
    pub latency: Vec<LatencySnapshot>,
}

/// Where a boot recording or a boot prefetch is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootPhase {
    /// Not asked for (or no trace to replay).
    #[default]
    Off,
    Running,
    /// The window passed: the counts are final.
    Done,
}

impl BootPhase {
    pub const ALL: [BootPhase; 3] = [BootPhase::Off, BootPhase::Running, BootPhase::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            BootPhase::Off => "off",
            BootPhase::Running => "running",
            BootPhase::Done => "done",
        }
    }
}

/// What `--boot-trace` did in this start (see `boot_trace::ReplayReport`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BootTraceStats {
    pub record: BootPhase,
    /// Lines the guest read first in its boot window so far.
    pub recorded_lines: u64,
    pub replay: BootPhase,
    /// Lines of the replay set; those prefetch read from the backend; those
    /// of them the guest then read (hits); replay-set lines the guest read.
    pub planned_lines: u64,
    pub fetched_lines: u64,
    pub used_lines: u64,
    pub read_lines: u64,
    /// Bytes prefetch read: all, of lines the guest then read, of the rest.
    pub fetched_bytes: u64,
    pub used_bytes: u64,
    pub unused_bytes: u64,
    /// used / fetched lines, and used / read lines (0 when nothing to count).
    pub precision: f64,
    pub recall: f64,
    /// How far ahead of the guest prefetch ran at most, in trace ms.
    pub max_lead_ms: u64,
}

impl StatsSnapshot {
    /// Whether the dirty-level controller is on (`writeback_control` is
    /// neither `off` nor empty, as from a server older than it).
    pub fn writeback_controlled(&self) -> bool {
        !self.writeback_control.is_empty() && self.writeback_control != "off"
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one request as a hit, miss or partial hit from its cached and
    /// uncached byte counts.
    pub fn classify(
        hits: &AtomicU64,
        misses: &AtomicU64,
        partial: &AtomicU64,
        hit: u64,
        miss: u64,
    ) {
        let c = match (hit > 0, miss > 0) {
            (true, false) => hits,
            (false, _) => misses,
            (true, true) => partial,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hit_bytes: g(&self.read_hit_bytes),
            read_miss_bytes: g(&self.read_miss_bytes),
            read_hits: g(&self.read_hits),
            read_misses: g(&self.read_misses),
            read_partial: g(&self.read_partial),
            write_bytes: g(&self.write_bytes),
            write_hits: g(&self.write_hits),
            write_misses: g(&self.write_misses),
            write_partial: g(&self.write_partial),
            backend_read_bytes: g(&self.backend_read_bytes),
            backend_write_bytes: g(&self.backend_write_bytes),
            writeback_bytes: g(&self.writeback_bytes),
            writeback_retries: g(&self.writeback_retries),
            ordered_overwrites_in_place: g(&self.ordered_overwrites_in_place),
            versions_superseded: g(&self.versions_superseded),
            versions_merged: g(&self.versions_merged),
            offline_writebacks_for_space: g(&self.offline_writebacks_for_space),
            writeback_paced_ms: g(&self.writeback_paced_ms),
            watermark_shared_rounds: g(&self.watermark_shared_rounds),
            watermark_own_rounds: g(&self.watermark_own_rounds),
            backend_errors: g(&self.backend_errors),
            cache_errors: g(&self.cache_errors),
            flushes: g(&self.flushes),
            flushes_with_nothing_new: g(&self.flushes_with_nothing_new),
            fua_one_pass: g(&self.fua_one_pass),
            preload_bytes: g(&self.preload_bytes),
            latency: self.latency.snapshot(),
            ..Default::default()
        }
    }
}
