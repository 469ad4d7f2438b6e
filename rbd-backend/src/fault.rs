//! `FaultyBackend`: wraps any backend to make it slow (in latency or in
//! bandwidth), failing or stuck on demand, and counts what passes through. For
//! tests and benchmarks of the engine above.
//!
//! Every knob can be turned while I/O is running (all take `&self`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::backend::{
    Backend, BackendIdentity, BlockIo, ChangeTracking, ExclusiveLock, ResizeWatch,
};
use crate::error::{BackendError, Result};
use crate::link::Link;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the op changes the contents (and so fails under `set_read_only`).
    fn modifies(self) -> bool {
        matches!(self, OpKind::Write | OpKind::Discard | OpKind::WriteZeroes)
    }
}

/// Counters since creation or the last [`FaultyBackend::reset_stats`]. An op is
/// counted when the inner backend completed it successfully.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes covered by successful discard and write_zeroes calls.
    pub bytes_zeroed: u64,
    /// Calls failed on purpose (fail_next or read-only), not counted above.
    pub injected_failures: u64,
    /// The most writes in flight (issued, not yet completed) that a read
    /// found when it was issued: what a read may queue behind.
    pub max_writes_ahead_of_a_read: u64,
    /// Writes issued and not completed now (a gauge, not reset).
    pub writes_in_flight: u64,
}

#[derive(Default)]
struct Counters {
    ops: [AtomicU64; 5],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_zeroed: AtomicU64,
    injected: AtomicU64,
    /// Writes issued and not yet completed (whatever their outcome).
    writes_in_flight: AtomicU64,
    max_writes_ahead_of_a_read: AtomicU64,
}

/// A write in `Counters::writes_in_flight` while this lives.
struct WriteInFlight<'a>(&'a AtomicU64);

impl<'a> WriteInFlight<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        WriteInFlight(n)
    }
}

impl Drop for WriteInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy)]
struct FailNext {
    remaining: u64,
    errno: i32,
}

#[derive(Default)]
struct Stall {
    on: bool,
    waiting: usize,
}

pub struct FaultyBackend<B> {
    inner: B,
    delay_ns: [AtomicU64; 5],
    jitter_ns: [AtomicU64; 5],
    fail: Mutex<[Option<FailNext>; 5]>,
    read_only: AtomicBool,
    stall: Mutex<Stall>,
    stall_cv: Condvar,
    /// Wakes ops stalled on an event loop.
    stall_ev: event_listener::Event,
    counters: Counters,
    rng: AtomicU64,
    /// Reads and writes share it (see `set_bandwidth`), and so may other
    /// backends (`FaultyBackendBuilder::share_link_with`).
    link: Arc<Link>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<B: BlockIo> FaultyBackend<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            delay_ns: Default::default(),
            jitter_ns: Default::default(),
            fail: Mutex::new([None; 5]),
            read_only: AtomicBool::new(false),
            stall: Mutex::new(Stall::default()),
            stall_cv: Condvar::new(),
            stall_ev: event_listener::Event::new(),
            counters: Counters::default(),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            link: Arc::default(),
        }
    }

    pub fn builder(inner: B) -> FaultyBackendBuilder<B> {
        FaultyBackendBuilder {
            backend: Self::new(inner),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn into_inner(self) -> B {
        self.inner
    }

    /// Every `kind` op sleeps `delay` before reaching the inner backend.
    pub fn set_delay(&self, kind: OpKind, delay: Duration) {
        self.delay_ns[kind.index()].store(nanos(delay), Ordering::Relaxed);
    }

    /// Reads and writes share a link of `bytes_per_sec` (0: unlimited): besides
    /// its delay, each waits until its bytes have passed the link behind those
    /// of the ops before it (a backend of 80 MB/s, say, as Ceph under load).
    pub fn set_bandwidth(&self, bytes_per_sec: u64) {
        self.link.set_rate(bytes_per_sec);
    }

    /// The rate `set_bandwidth` set (0: unlimited).
    pub fn bandwidth(&self) -> u64 {
        self.link.rate()
    }

    /// Adds a uniformly random extra delay in `[0, jitter)` to every `kind` op.
    pub fn set_jitter(&self, kind: OpKind, jitter: Duration) {
        self.jitter_ns[kind.index()].store(nanos(jitter), Ordering::Relaxed);
    }

    /// The next `n` ops of `kind` fail with `errno` (replacing any earlier setting).
    pub fn fail_next(&self, kind: OpKind, n: u64, errno: i32) {
        lock(&self.fail)[kind.index()] = (n > 0).then_some(FailNext {
            remaining: n,
            errno,
        });
    }

    /// While on, writes, discards and write_zeroes fail with EROFS (a lost lock or a
    /// backend gone read-only); reads and flushes still work.
    pub fn set_read_only(&self, on: bool) {
        self.read_only.store(on, Ordering::Relaxed);
    }

    /// From now on every op blocks (before doing anything) until [`FaultyBackend::release`].
    pub fn stall(&self) {
        lock(&self.stall).on = true;
    }

    /// Lets stalled ops, and later ones, proceed.
    pub fn release(&self) {
        lock(&self.stall).on = false;
        self.stall_cv.notify_all();
        self.stall_ev.notify(usize::MAX);
    }

    /// How many ops are blocked in a stall right now.
    pub fn stalled_ops(&self) -> usize {
        lock(&self.stall).waiting
    }

    /// Waits until at least `n` ops are stalled; false on timeout.
    pub fn wait_for_stalled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.stall);
        while s.waiting < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .stall_cv
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        let op = |k: OpKind| c.ops[k.index()].load(Ordering::Relaxed);
        FaultStats {
            reads: op(OpKind::Read),
            writes: op(OpKind::Write),
            flushes: op(OpKind::Flush),
            discards: op(OpKind::Discard),
            write_zeroes: op(OpKind::WriteZeroes),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_zeroed: c.bytes_zeroed.load(Ordering::Relaxed),
            injected_failures: c.injected.load(Ordering::Relaxed),
            max_writes_ahead_of_a_read: c.max_writes_ahead_of_a_read.load(Ordering::Relaxed),
            writes_in_flight: c.writes_in_flight.load(Ordering::Acquire),
        }
    }

    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in c.ops.iter().chain([
            &c.bytes_read,
            &c.bytes_written,
            &c.bytes_zeroed,
            &c.injected,
            &c.max_writes_ahead_of_a_read,
        ]) {
            a.store(0, Ordering::Relaxed);
        }
    }

    fn note_read_issued(&self) {
        let c = &self.counters;
        c.max_writes_ahead_of_a_read.fetch_max(
            c.writes_in_flight.load(Ordering::Acquire),
            Ordering::Relaxed,
        );
    }

    /// Stall, delay, bandwidth and injected faults, in that order, before an op runs.
    fn before(&self, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        self.wait_while_stalled();
        let d = self.delay_for(kind) + self.link_wait(kind, len);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        self.injected(kind, offset, len)
    }

    /// How long an op waits for its bytes to pass the link (reads and writes).
    fn link_wait(&self, kind: OpKind, len: u64) -> Duration {
        if !matches!(kind, OpKind::Read | OpKind::Write) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        self.link.reserve(now, len).saturating_duration_since(now)
    }

    /// `before`, on an event loop: stalls and delays wait without blocking it.
    async fn before_async(&self, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        if !crate::aio::in_loop() {
            return self.before(kind, offset, len);
        }
        self.stalled_async().await;
        let d = self.delay_for(kind) + self.link_wait(kind, len);
        if !d.is_zero() {
            crate::aio::sleep(d).await;
        }
        self.injected(kind, offset, len)
    }

    async fn stalled_async(&self) {
        {
            let mut s = lock(&self.stall);
            if !s.on {
                return;
            }
            s.waiting += 1;
            self.stall_cv.notify_all();
        }
        loop {
            let l = self.stall_ev.listen();
            if !lock(&self.stall).on {
                break;
            }
            l.await;
        }
        lock(&self.stall).waiting -= 1;
    }

    fn injected(&self, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        let injected = {
            let mut fail = lock(&self.fail);
            match &mut fail[kind.index()] {
                Some(f) => {
                    let errno = f.errno;
                    f.remaining -= 1;
                    if f.remaining == 0 {
                        fail[kind.index()] = None;
                    }
                    Some(errno)
                }
                None => None,
            }
        };
        let errno = injected.or_else(|| {
            (kind.modifies() && self.read_only.load(Ordering::Relaxed)).then_some(libc::EROFS)
        });
        match errno {
            Some(errno) => {
                self.counters.injected.fetch_add(1, Ordering::Relaxed);
                Err(BackendError::from_io(
                    format!("injected fault: {kind:?} offset={offset} len={len}"),
                    io::Error::from_raw_os_error(errno),
                ))
            }
            None => Ok(()),
        }
    }

    fn wait_while_stalled(&self) {
        let mut s = lock(&self.stall);
        if !s.on {
            return;
        }
        s.waiting += 1;
        // Wake `wait_for_stalled` callers.
        self.stall_cv.notify_all();
        while s.on {
            s = self
                .stall_cv
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
        s.waiting -= 1;
    }

    fn delay_for(&self, kind: OpKind) -> Duration {
        let base = self.delay_ns[kind.index()].load(Ordering::Relaxed);
        let jitter = self.jitter_ns[kind.index()].load(Ordering::Relaxed);
        let extra = if jitter > 0 {
            self.next_random() % jitter
        } else {
            0
        };
        Duration::from_nanos(base.saturating_add(extra))
    }

    /// splitmix64 over a shared counter: cheap, lock-free, good enough for jitter.
    fn next_random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn count(&self, kind: OpKind, bytes: &AtomicU64, n: u64) {
        self.counters.ops[kind.index()].fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n, Ordering::Relaxed);
    }
}

impl<B: BlockIo> BlockIo for FaultyBackend<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.note_read_issued();
        self.before(OpKind::Read, offset, len)?;
        self.inner.read_at(offset, buf)?;
        self.count(OpKind::Read, &self.counters.bytes_read, len);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        let _w = WriteInFlight::new(&self.counters.writes_in_flight);
        self.before(OpKind::Write, offset, len)?;
        self.inner.write_at(offset, buf)?;
        self.count(OpKind::Write, &self.counters.bytes_written, len);
        Ok(())
    }

    fn durable_writes_are_native(&self) -> bool {
        self.inner.durable_writes_are_native()
    }

    fn flush(&self) -> Result<()> {
        self.before(OpKind::Flush, 0, 0)?;
        self.inner.flush()?;
        self.count(OpKind::Flush, &self.counters.bytes_written, 0);
        Ok(())
    }

    fn read_async(&self, offset: u64, dst: crate::aio::BufSlice) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            let len = dst.len() as u64;
            self.note_read_issued();
            self.before_async(OpKind::Read, offset, len).await?;
            self.inner.read_async(offset, dst).await?;
            self.count(OpKind::Read, &self.counters.bytes_read, len);
            Ok(())
        })
    }

    fn write_async(
        &self,
        offset: u64,
        src: crate::aio::BufSlice,
        mode: crate::io::WriteMode,
    ) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            let len = src.len() as u64;
            let _w = WriteInFlight::new(&self.counters.writes_in_flight);
            self.before_async(OpKind::Write, offset, len).await?;
            self.inner.write_async(offset, src, mode).await?;
            self.count(OpKind::Write, &self.counters.bytes_written, len);
            Ok(())
        })
    }

    fn flush_async(&self) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            self.before_async(OpKind::Flush, 0, 0).await?;
            self.inner.flush_async().await?;
            self.count(OpKind::Flush, &self.counters.bytes_written, 0);
            Ok(())
        })
    }

    fn discard_async(&self, offset: u64, len: u64) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            self.before_async(OpKind::Discard, offset, len).await?;
            self.inner.discard_async(offset, len).await?;
            self.count(OpKind::Discard, &self.counters.bytes_zeroed, len);
            Ok(())
        })
    }

    fn write_zeroes_async(&self, offset: u64, len: u64) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            self.before_async(OpKind::WriteZeroes, offset, len).await?;
            self.inner.write_zeroes_async(offset, len).await?;
            self.count(OpKind::WriteZeroes, &self.counters.bytes_zeroed, len);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.before(OpKind::Discard, offset, len)?;
        self.inner.discard(offset, len)?;
        self.count(OpKind::Discard, &self.counters.bytes_zeroed, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.before(OpKind::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len)?;
        self.count(OpKind::WriteZeroes, &self.counters.bytes_zeroed, len);
        Ok(())
    }
}

/// The inner backend's identity and capabilities: faults and delays apply to I/O only.
impl<B: Backend> Backend for FaultyBackend<B> {
    fn identity(&self) -> BackendIdentity {
        self.inner.identity()
    }

    fn allocation_map(&self) -> Option<&dyn crate::AllocationMap> {
        self.inner.allocation_map()
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        self.inner.change_tracking()
    }

    fn exclusive_lock(&self) -> Option<&dyn ExclusiveLock> {
        self.inner.exclusive_lock()
    }

    fn resize_watch(&self) -> Option<&dyn ResizeWatch> {
        self.inner.resize_watch()
    }
}

impl<B: Backend> std::fmt::Debug for FaultyBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBackend")
            .field("identity", &self.inner.identity())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Builds a [`FaultyBackend`] with its initial knobs set.
pub struct FaultyBackendBuilder<B> {
    backend: FaultyBackend<B>,
}

impl<B: BlockIo> FaultyBackendBuilder<B> {
    pub fn delay(self, kind: OpKind, delay: Duration) -> Self {
        self.backend.set_delay(kind, delay);
        self
    }

    pub fn read_delay(self, delay: Duration) -> Self {
        self.delay(OpKind::Read, delay)
    }

    pub fn write_delay(self, delay: Duration) -> Self {
        self.delay(OpKind::Write, delay)
    }

    pub fn flush_delay(self, delay: Duration) -> Self {
        self.delay(OpKind::Flush, delay)
    }

    /// The same delay for every kind of op.
    pub fn all_delay(mut self, delay: Duration) -> Self {
        for k in OpKind::ALL {
            self = self.delay(k, delay);
        }
        self
    }

    /// Reads and writes share a link of `bytes_per_sec` (see
    /// [`FaultyBackend::set_bandwidth`]).
    pub fn bandwidth(self, bytes_per_sec: u64) -> Self {
        self.backend.set_bandwidth(bytes_per_sec);
        self
    }

    /// Share `other`'s link (its bandwidth, and the queue of everything
    /// passing it): two backends on one saturated path, as two disks of one
    /// Ceph pool behind one network link. The rate is the link's: setting it
    /// on either sets it for both.
    pub fn share_link_with<C>(mut self, other: &FaultyBackend<C>) -> Self {
        self.backend.link = Arc::clone(&other.link);
        self
    }

    /// A random extra delay in `[0, jitter)` on every kind of op (e.g. 1 ms delay +
    /// 1 ms jitter for a 1–2 ms backend).
    pub fn all_jitter(self, jitter: Duration) -> Self {
        for k in OpKind::ALL {
            self.backend.set_jitter(k, jitter);
        }
        self
    }

    pub fn jitter(self, kind: OpKind, jitter: Duration) -> Self {
        self.backend.set_jitter(kind, jitter);
        self
    }

    pub fn fail_next(self, kind: OpKind, n: u64, errno: i32) -> Self {
        self.backend.fail_next(kind, n, errno);
        self
    }

    pub fn read_only(self, on: bool) -> Self {
        self.backend.set_read_only(on);
        self
    }

    pub fn build(self) -> FaultyBackend<B> {
        self.backend
    }
}
