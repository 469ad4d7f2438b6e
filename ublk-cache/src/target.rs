//! What a frontend (ublk, NBD) sees of the engine: a block device with byte offsets.
//!
//! Every method blocks the calling thread until the request is complete, and may be
//! called from many threads at once. Frontends run requests on worker threads and
//! turn a [`TargetError`] into `-errno` at their edge with [`TargetError::errno`].
//! Nothing behind this trait knows which frontend called.

use std::fmt;

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

/// One extent of a block-status answer (NBD's `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// A hole: unallocated, and it reads as zeroes. `false` means data (or unknown),
    /// which is always a safe answer.
    pub hole: bool,
}

/// The block device a frontend serves.
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
