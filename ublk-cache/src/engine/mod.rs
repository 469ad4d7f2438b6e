//! The cache engine: mode policy, cache map, metadata persistence and the
//! background flusher.
//!
//! Requests run as futures on the event loop of the thread that serves them (a
//! ublk queue, an NBD connection; see `rbd_backend::aio`): a cache hit is one read
//! of the cache device on that loop's ring, a miss one backend read, with no
//! thread hand-off. [`crate::target::AsyncTarget`] is that interface;
//! [`crate::target::BlockTarget`] is a blocking wrapper for tools and tests.
//!
//! Locking (see `state`): short locks only, never held across I/O; per-line async
//! locks for requests that change a line. Lock order where nested: line lock →
//! shard → snapshot lock → {eviction, epochs, allocator}; persist rounds are
//! serialised by a group commit.

mod attach;
pub mod bits;
mod flusher;
pub mod latency;
mod live;
mod log;
mod map;
mod persist;
mod read;
mod recover;
pub mod shadow;
mod slots;
pub mod state;
mod stats;
mod status;
pub mod store;
mod sync;
mod trim;
mod write;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_listener::Event;
use parking_lot::Mutex;
use policies::{
    BackendPriority, CacheMode, DirtyController, Pacer, WritebackLimit, WritebackOrder,
};
use rbd_backend::aio::{self, BufSlice, DmaBuf};
use rbd_backend::{Backend, BlockIo, WriteMode};

pub use attach::EngineConfig;
pub use latency::{bucket_upper_us, LatencySnapshot, Op};
pub use live::{PreloadOptions, PreloadReport, Progress, ProgressFn};
pub use stats::{BootPhase, BootTraceStats, Stats, StatsSnapshot};

use crate::boot_trace::{BootRecorder, BootReplay};
use crate::error::{EngineError, EngineErrorKind, EngineResult};
use crate::format::{EntryCodec, Layout, Superblock, SECTOR_SIZE};
use crate::io_trace::{IoTrace, TraceOp};
use crate::target::{AsyncTarget, BlockTarget, TargetError, TargetResult};
use persist::PersistCtl;
use state::State;
use store::CacheStore;
use sync::Gate;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// Wake-ups between requests, the flusher and space-makers.
#[derive(Default)]
struct Events {
    /// A slot became free or clean.
    space: Event,
    /// The flusher finished a step (lines became clean, epochs completed).
    progress: Event,
    /// Work for the flusher.
    flusher: Event,
    /// A write-back write finished (see `Engine::writeback_slot`).
    backend_turn: Event,
    /// A guest write stopped applying to its epoch (see
    /// `Engine::close_epoch_for_durability`).
    applied: Event,
}

/// The part of the engine that exists only when a cache device is attached.
struct Cache {
    store: CacheStore,
    layout: Layout,
    codec: EntryCodec,
    st: State,
    ev: Events,
    persist: PersistCtl,
    /// A background eviction is running (only one at a time).
    refilling: AtomicBool,
    sb: Mutex<Superblock>,
}

pub struct Engine {
    me: Weak<Engine>,
    /// The cache mode's code (`CacheMode::code`); changed only by `set_mode`.
    mode: AtomicU32,
    /// Every request passes it; a mode switch closes it for its last step, so no
    /// request sees half of one mode and half of another.
    gate: Gate,
    /// One mode switch (or invalidation) at a time.
    switch_lock: Mutex<()>,
    /// Offline mode: the whole image has been copied into the cache.
    hydrated: AtomicBool,
    /// Opened in offline mode (its hydration runs), so it may return to it.
    started_offline: bool,
    /// The last write-back step failed (the backend is down or refusing).
    writeback_failing: AtomicBool,
    /// Ordered overwrites go in place until write-back works again (logged once).
    warned_ordering: AtomicBool,
    /// When the engine started, and when (ms after that) write-back last
    /// finished a step or found nothing to do.
    born: Instant,
    writeback_progress_ms: AtomicU64,
    /// When (µs after `born`) the guest last asked for durability (a FLUSH or
    /// FUA write): write-back waits for its next round only while it does so
    /// often.
    guest_durability_us: AtomicU64,
    order: WritebackOrder,
    /// Paces background write-back to the configured limit.
    pacer: Mutex<Pacer>,
    /// Until when (ms after `born`) paced time is counted already: writes that
    /// wait together count once.
    paced_until_ms: AtomicU64,
    /// Format v1 and v2: the dirty-level controller that lowers the pacer's
    /// byte rate while little is dirty (`None`: not configured).
    control: Mutex<Option<DirtyController>>,
    /// The pacer made a write-back write wait since the controller's last
    /// update (the controller's anti-windup).
    held_back: AtomicBool,
    backend_priority: BackendPriority,
    /// The guest's reads at the backend now (misses), and write-back's
    /// writes: while there are the former, the latter stay few.
    guest_backend_reads: AtomicU32,
    writeback_writes: AtomicU32,
    /// When (µs after `born`) the guest's last backend read ended.
    guest_read_end_us: AtomicU64,
    backend: Arc<dyn Backend>,
    size: u64,
    cache: Option<Cache>,
    stats: Stats,
    flusher: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    /// `--io-trace`: every guest request is recorded here (see `io_trace`).
    io_trace: OnceLock<Arc<IoTrace>>,
    /// `--boot-trace record`: guest reads while the guest boots.
    boot_recorder: OnceLock<Arc<BootRecorder>>,
    /// `--boot-trace replay`: the guest's reads move the prefetch cursor.
    boot_replay: OnceLock<Arc<BootReplay>>,
    /// Test-only fault: write dirty lines back newest epoch first. Exists so the
    /// crash harness can prove it catches ordering bugs.
    #[cfg(feature = "testing")]
    pub reverse_writeback_for_tests: AtomicBool,
}

impl Engine {
    /// How long ago write-back last made progress (or was idle).
    fn since_writeback_progress(&self) -> Duration {
        let now = self.born.elapsed().as_millis() as u64;
        Duration::from_millis(
            now.saturating_sub(self.writeback_progress_ms.load(Ordering::Acquire)),
        )
    }

    fn since_guest_durability(&self) -> Duration {
        let now = self.born.elapsed().as_micros() as u64;
        Duration::from_micros(now.saturating_sub(self.guest_durability_us.load(Ordering::Acquire)))
    }

    fn note_guest_durability(&self) {
        self.guest_durability_us
            .store(self.born.elapsed().as_micros() as u64, Ordering::Release);
    }

    fn note_writeback_progress(&self) {
        self.writeback_progress_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub fn mode(&self) -> CacheMode {
        CacheMode::from_code(self.mode.load(Ordering::Acquire)).unwrap_or(CacheMode::None)
    }

    pub fn order(&self) -> WritebackOrder {
        self.order
    }

    /// The limit background write-back is paced to.
    pub fn writeback_limit(&self) -> WritebackLimit {
        self.pacer.lock().limit()
    }

    /// Change the write-back limit while serving (from the next backend write).
    pub fn set_writeback_limit(&self, limit: WritebackLimit) {
        self.pacer.lock().set_limit(limit);
        if let Some(c) = self.cache.as_ref() {
            // A flusher waiting out the old limit looks again.
            c.ev.flusher.notify(usize::MAX);
        }
    }

    fn arc(&self) -> Arc<Engine> {
        self.me
            .upgrade()
            .expect("engine used after its last handle")
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.mode = self.mode().to_string();
        s.order = self.order.to_string();
        s.size = self.size;
        let limit = self.writeback_limit();
        s.writeback_rate_limit = limit.bytes_per_sec.unwrap_or(0);
        s.writeback_iops_limit = limit.writes_per_sec.unwrap_or(0);
        if let Some(ctl) = self.control.lock().as_ref() {
            let d = ctl.decision();
            let l = ctl.level();
            s.writeback_control = d.regime.as_str().to_string();
            s.writeback_control_rate = d.rate.unwrap_or(0);
            s.writeback_control_integral_rate = d.integral_rate;
            s.writeback_control_low_bytes = d.low_bytes;
            s.writeback_low_pct = l.low_pct as u64;
            s.writeback_high_pct = l.high_pct as u64;
            s.writeback_min_rate = l.min_rate;
        } else {
            s.writeback_control = "off".into();
        }
        if let Some(c) = &self.cache {
            let (r, w) = c.store.io_bytes();
            s.cache_read_bytes = r;
            s.cache_write_bytes = w;
            let (f, m) = c.store.meta_io();
            s.cache_flushes = f;
            s.meta_write_bytes = m;
            let st = &c.st;
            s.dirty_lines = st.dirty_lines();
            s.valid_bytes = st.valid_sectors.load(Ordering::Relaxed).max(0) as u64 * SECTOR;
            s.dirty_bytes = st.dirty_sectors.load(Ordering::Relaxed).max(0) as u64 * SECTOR;
            s.clean_bytes = s.valid_bytes.saturating_sub(s.dirty_bytes);
            s.cached_lines = st.map.len() as u64;
            s.cache_lines = c.layout.nr_lines;
            s.line_size = c.layout.line_size as u64;
            s.epoch = st.cur_epoch();
            s.flushed_epoch = st.flushed_durable.load(Ordering::Acquire);
            s.order_broken_since = st.order_broken_since.load(Ordering::Acquire);
            s.format_version = match st.version {
                crate::format::FormatVersion::V1 => 1,
                crate::format::FormatVersion::V2 => 2,
            };
        }
        s.boot_trace = self.boot_trace_stats();
        s
    }

    fn boot_trace_stats(&self) -> BootTraceStats {
        let phase = |done: bool| {
            if done {
                BootPhase::Done
            } else {
                BootPhase::Running
            }
        };
        let mut b = BootTraceStats::default();
        if let Some(rec) = self.boot_recorder.get() {
            b.record = phase(rec.ended());
            b.recorded_lines = rec.recorded_lines();
        }
        if let Some(r) = self.boot_replay.get() {
            let rep = r.report();
            b.replay = phase(rep.done);
            b.planned_lines = rep.planned_lines;
            b.fetched_lines = rep.fetched_lines;
            b.used_lines = rep.used_lines;
            b.read_lines = rep.read_lines;
            b.fetched_bytes = rep.fetched_bytes;
            b.used_bytes = rep.used_bytes;
            b.unused_bytes = rep.unused_bytes;
            b.precision = rep.precision();
            b.recall = rep.recall();
            b.max_lead_ms = rep.max_lead_ms as u64;
        }
        b
    }

    /// Who the backend is (what a boot trace is keyed by, unless told).
    pub fn backend_identity(&self) -> rbd_backend::BackendIdentity {
        self.backend.identity()
    }

    pub fn line_size(&self) -> u64 {
        self.cache
            .as_ref()
            .map_or(64 * 1024, |c| c.layout.line_size as u64)
    }

    /// The backend's size now: what it was at open, unless it can be resized
    /// under a running server.
    fn backend_size_now(&self) -> u64 {
        match self.backend.resize_watch() {
            Some(w) => w.current_size(),
            None => self.backend.size(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> EngineResult<()> {
        match offset.checked_add(len) {
            // A backend shrunk under us (RBD): cached or not, the range is gone.
            Some(end) if end > self.backend_size_now() && end <= self.size => Err(EngineError::new(
                EngineErrorKind::BackendIo,
                format!(
                    "request at {offset}+{len} reaches past the backend's end at {} (shrunk while served)",
                    self.backend_size_now()
                ),
            )),
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

    /// One guest request: checks, the gate, the work, its latency.
    async fn request<F: Future<Output = EngineResult<()>>>(
        &self,
        op: Op,
        range: Option<(u64, u64)>,
        work: impl FnOnce() -> F,
    ) -> EngineResult<()> {
        let t = Instant::now();
        self.check_open()?;
        if let Some((off, len)) = range {
            self.check_range(off, len)?;
        }
        let r = {
            let _g = self.gate.enter().await;
            work().await
        };
        self.stats.latency.record(op, t.elapsed());
        r
    }

    /// Read `dst.len()` bytes at `offset` (asynchronous, on this thread's loop).
    pub async fn read_async(&self, offset: u64, dst: BufSlice) -> EngineResult<()> {
        let len = dst.len() as u64;
        self.request(Op::Read, Some((offset, len)), || {
            self.read_impl(offset, dst)
        })
        .await
    }

    pub async fn write_async(&self, offset: u64, src: BufSlice, fua: bool) -> EngineResult<()> {
        let len = src.len() as u64;
        self.request(Op::Write, Some((offset, len)), || async move {
            if fua && self.fua_in_one_pass() {
                // Its data durable as it is written, then only its record.
                let mark = self.in_place_mark();
                let own = self.write_impl(offset, src, WriteMode::Durable).await?;
                return self.fua_one_pass(mark, own).await;
            }
            self.write_impl(offset, src, WriteMode::Normal).await?;
            if fua {
                self.flush_impl(false).await?;
            }
            Ok(())
        })
        .await
    }

    pub async fn flush_async(&self) -> EngineResult<()> {
        self.request(Op::Flush, None, || self.flush_impl(true))
            .await
    }

    pub async fn discard_async(&self, offset: u64, len: u64) -> EngineResult<()> {
        self.request(Op::Discard, Some((offset, len)), || {
            self.discard_impl(offset, len, false)
        })
        .await
    }

    pub async fn write_zeroes_async(&self, offset: u64, len: u64) -> EngineResult<()> {
        self.request(Op::Discard, Some((offset, len)), || {
            self.discard_impl(offset, len, true)
        })
        .await
    }
}

impl Engine {
    /// Test hook: check the engine's internal invariants and return where each
    /// cached 4 KiB sector lives, as (backend byte offset, cache device byte offset).
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<Vec<(u64, u64)>, String> {
        let Some(c) = self.cache.as_ref() else {
            return Ok(Vec::new());
        };
        let ls = c.layout.line_size as u64;
        Ok(c.st
            .check_invariants()?
            .into_iter()
            .map(|(tag, sec, slot)| {
                (
                    tag * ls + sec as u64 * SECTOR,
                    c.layout.line_offset(slot) + sec as u64 * SECTOR,
                )
            })
            .collect())
    }
}

/// Bytes of the in-memory record of one cache slot at `line_size` (the line
/// table; the map and the eviction policy add a few bytes per mapped line).
pub fn slot_record_bytes(line_size: u32) -> usize {
    slots::SlotTable::new(1, line_size / SECTOR_SIZE).bytes_per_slot()
}

/// Run engine work from a plain thread (the blocking interface).
fn blocking<T>(f: impl Future<Output = EngineResult<T>>) -> EngineResult<T> {
    aio::block_on(f).map_err(|e| {
        EngineError::new(
            EngineErrorKind::Config,
            format!("cannot run the request on this thread's event loop: {e}"),
        )
    })?
}

impl Engine {
    /// Record every guest request from now on in `trace` (`--io-trace`).
    /// Returns false, and changes nothing, if a trace is set already.
    pub fn trace_requests(&self, trace: Arc<IoTrace>) -> bool {
        self.io_trace.set(trace).is_ok()
    }

    /// Record what the guest reads while it boots in `rec` (`--boot-trace`).
    /// Returns false, and changes nothing, if a recorder is set already.
    pub fn record_boot(&self, rec: Arc<BootRecorder>) -> bool {
        self.boot_recorder.set(rec).is_ok()
    }

    /// Let the guest's reads lead the boot prefetch of `r`. Returns false,
    /// and changes nothing, if one is set already.
    pub fn follow_boot(&self, r: Arc<BootReplay>) -> bool {
        self.boot_replay.set(r).is_ok()
    }

    /// Run a guest request, recorded in the io-trace if there is one.
    async fn traced(
        &self,
        op: TraceOp,
        offset: u64,
        len: u64,
        req: impl Future<Output = EngineResult<()>>,
    ) -> EngineResult<()> {
        if let (Some(r), TraceOp::Read) = (self.boot_replay.get(), op) {
            r.note_read(offset, len);
        }
        if let Some(b) = self.boot_recorder.get() {
            match op {
                TraceOp::Read => b.note(true, offset, len),
                TraceOp::Write | TraceOp::WriteFua | TraceOp::WriteZeroes | TraceOp::Discard => {
                    b.note(false, offset, len)
                }
                TraceOp::Flush => {}
            }
        }
        let Some(t) = self.io_trace.get() else {
            return req.await;
        };
        let submit = t.now_us();
        let r = req.await;
        let result = r.as_ref().map_or_else(|e| -e.errno(), |_| 0);
        t.record(submit, op, offset, len, result);
        r
    }
}

fn write_op(fua: bool) -> TraceOp {
    if fua {
        TraceOp::WriteFua
    } else {
        TraceOp::Write
    }
}

impl AsyncTarget for Engine {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, dst: BufSlice) -> TargetResult<()> {
        let len = dst.len() as u64;
        let req = self.read_async(offset, dst);
        Ok(self.traced(TraceOp::Read, offset, len, req).await?)
    }

    async fn write(&self, offset: u64, src: BufSlice, fua: bool) -> TargetResult<()> {
        let len = src.len() as u64;
        let req = self.write_async(offset, src, fua);
        Ok(self.traced(write_op(fua), offset, len, req).await?)
    }

    async fn flush(&self) -> TargetResult<()> {
        Ok(self
            .traced(TraceOp::Flush, 0, 0, self.flush_async())
            .await?)
    }

    async fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        let req = self.discard_async(offset, len);
        Ok(self.traced(TraceOp::Discard, offset, len, req).await?)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        let req = self.write_zeroes_async(offset, len);
        Ok(self.traced(TraceOp::WriteZeroes, offset, len, req).await?)
    }

    fn block_status(&self, offset: u64, len: u64) -> TargetResult<Vec<crate::target::Extent>> {
        Ok(Engine::block_status(self, offset, len)?)
    }
}

impl BlockTarget for Engine {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> TargetResult<()> {
        let mut d = DmaBuf::new(buf.len());
        let len = buf.len() as u64;
        blocking(self.traced(
            TraceOp::Read,
            offset,
            len,
            self.read_async(offset, d.slice_all()),
        ))?;
        buf.copy_from_slice(d.bytes_mut().ok_or_else(still_in_use)?);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> TargetResult<()> {
        let s = DmaBuf::copy_of(buf);
        let req = self.write_async(offset, s.slice_all(), fua);
        Ok(blocking(self.traced(
            write_op(fua),
            offset,
            buf.len() as u64,
            req,
        ))?)
    }

    fn flush(&self) -> TargetResult<()> {
        Ok(blocking(self.traced(
            TraceOp::Flush,
            0,
            0,
            self.flush_async(),
        ))?)
    }

    fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        let req = self.discard_async(offset, len);
        Ok(blocking(self.traced(TraceOp::Discard, offset, len, req))?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        let req = self.write_zeroes_async(offset, len);
        Ok(blocking(self.traced(
            TraceOp::WriteZeroes,
            offset,
            len,
            req,
        ))?)
    }
    fn block_status(&self, offset: u64, len: u64) -> TargetResult<Vec<crate::target::Extent>> {
        Ok(Engine::block_status(self, offset, len)?)
    }
}

fn still_in_use() -> TargetError {
    TargetError::new(
        libc::EIO,
        "read buffer still in use after the request completed",
    )
}
