//! What a frontend (ublk, NBD) sees of the engine: a block device with byte offsets.
//!
//! [`AsyncTarget`] is the data path: each request is a future that runs on the
//! event loop of the calling thread (`rbd_backend::aio`), with its memory in a
//! [`BufSlice`] that the request owns until it completes. [`BlockTarget`] is the
//! same device for callers that block (tools, tests, the crash harness).
//! Frontends turn a [`TargetError`] into `-errno` at their edge with
//! [`TargetError::errno`]. Nothing behind these traits knows which frontend called.

use std::fmt;
use std::future::Future;

use rbd_backend::aio::BufSlice;

/// An I/O error as a frontend needs it: an errno plus a message for the log.
#[derive(Debug, Clone)]
pub struct TargetError {
    pub errno: i32,
    pub message: String,
}

impl TargetError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    /// Positive errno (EIO, EINVAL, ...). The ublk edge returns `-errno`.
    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for TargetError {}

pub type TargetResult<T> = Result<T, TargetError>;

/// The block device a frontend serves, asynchronously. Methods may be called from
/// many event loops at once.
pub trait AsyncTarget: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `dst.len()` bytes at `offset`.
    fn read(&self, offset: u64, dst: BufSlice) -> impl Future<Output = TargetResult<()>>;
    /// Write `src` at `offset`. With `fua`, it is durable when this completes.
    fn write(
        &self,
        offset: u64,
        src: BufSlice,
        fua: bool,
    ) -> impl Future<Output = TargetResult<()>>;
    /// Make every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = TargetResult<()>>;
    /// The range is unused; contents afterwards are unspecified.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = TargetResult<()>>;
    /// The range reads back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = TargetResult<()>>;
    /// Which parts of `[offset, offset + len)` hold data and which are holes
    /// (see [`BlockTarget::block_status`]). Blocking: it may ask the backend.
    fn block_status(&self, offset: u64, len: u64) -> TargetResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent { len, hole: false }])
    }
}

/// One extent of a block-status answer (NBD's `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// A hole: unallocated, and it reads as zeroes. `false` means data (or unknown),
    /// which is always a safe answer.
    pub hole: bool,
}

/// The block device a frontend serves, for callers that block.
pub trait BlockTarget: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> TargetResult<()>;
    /// Write `buf` at `offset`. With `fua`, it is durable when this returns.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> TargetResult<()>;
    /// Make every write completed before this call durable (see the README's
    /// durability contract for what "durable" means per cache mode).
    fn flush(&self) -> TargetResult<()>;
    /// The range is unused; contents afterwards are unspecified.
    fn discard(&self, offset: u64, len: u64) -> TargetResult<()>;
    /// The range reads back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()>;
    /// Which parts of `[offset, offset + len)` hold data and which are holes:
    /// consecutive extents from `offset`, at least one, possibly covering less
    /// than asked (the caller asks again for the rest). The default knows
    /// nothing, so everything is data.
    fn block_status(&self, offset: u64, len: u64) -> TargetResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent { len, hole: false }])
    }
}
