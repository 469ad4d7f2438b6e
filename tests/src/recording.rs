//! A backend wrapper that logs every write, flush, discard and write-zeroes in
//! completion order, stamped from a clock shared by all recorded devices (and the
//! workload), so crash points are comparable across devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rbd_backend::aio::BufSlice;
use rbd_backend::{Backend, BackendIdentity, BlockIo, IoFut, MemBackend, Result, WriteMode};

#[derive(Debug, Clone)]
pub enum DevOp {
    Write {
        off: u64,
        data: Vec<u8>,
        /// Written durable (FUA / `RWF_DSYNC`): on the media when it
        /// completed, whatever flush follows or not.
        durable: bool,
    },
    Flush,
    /// Discard: the range may read back as anything afterwards; modelled as zeroes
    /// applied or not.
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Stamped {
    pub seq: u64,
    pub op: DevOp,
}

/// The shared clock.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A backend wrapper that logs every write, flush, discard and write-zeroes
/// that reached `inner`, in completion order, each stamped from `clock`.
pub struct Logged<B> {
    inner: B,
    clock: Arc<Clock>,
    log: Mutex<Vec<Stamped>>,
}

/// A recorded in-memory device; it starts zeroed.
pub type Recording = Logged<MemBackend>;

impl Recording {
    pub fn new(size: usize, name: &str, clock: Arc<Clock>) -> Self {
        Logged::wrap(MemBackend::builder().size(size).name(name).build(), clock)
    }
}

impl<B: BlockIo> Logged<B> {
    /// Log what reaches `inner` (a recovered engine's drain over a crash
    /// image, for one: see the harness's double failure).
    pub fn wrap(inner: B, clock: Arc<Clock>) -> Self {
        Self {
            inner,
            clock,
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn log(&self) -> Vec<Stamped> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, op: DevOp) {
        // Stamp and append under one lock, so the log is in stamp order.
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.clock.tick();
        log.push(Stamped { seq, op });
    }
}

impl<B: BlockIo> BlockIo for Logged<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)?;
        self.record(DevOp::Write {
            off: offset,
            data: buf.to_vec(),
            durable: false,
        });
        Ok(())
    }

    fn durable_writes_are_native(&self) -> bool {
        true
    }

    /// A durable write is one durable write, not a write and a flush of the
    /// whole device (which the default would log): the harness must not
    /// make earlier writes durable that only a flush would.
    fn write_async(&self, offset: u64, src: BufSlice, mode: WriteMode) -> IoFut<'_> {
        // SAFETY: the request owns `src` while it runs (the data-path contract).
        let buf = unsafe { src.request_bytes() };
        let r = self.inner.write_at(offset, buf).map(|()| {
            self.record(DevOp::Write {
                off: offset,
                data: buf.to_vec(),
                durable: mode == WriteMode::Durable,
            })
        });
        Box::pin(std::future::ready(r))
    }

    /// Stamped when it starts: a flush covers the writes that completed
    /// before it was issued, not one that completes while it runs (stamping
    /// at its end would count such a write as durable). A crash between the
    /// stamp and the end only makes durable what the engine did not count on.
    fn flush(&self) -> Result<()> {
        let seq = self.clock.tick();
        self.inner.flush()?;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let at = log.partition_point(|s| s.seq < seq);
        log.insert(
            at,
            Stamped {
                seq,
                op: DevOp::Flush,
            },
        );
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)?;
        self.record(DevOp::Discard { off: offset, len });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)?;
        self.record(DevOp::Zero { off: offset, len });
        Ok(())
    }
}

impl<B: Backend> Backend for Logged<B> {
    fn identity(&self) -> BackendIdentity {
        self.inner.identity()
    }
}
