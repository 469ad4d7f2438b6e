//! The device traits, by role: [`BlockIo`] is the data path (all a cache device
//! is), [`Backend`] the slow, shared disk that the cache sits in front of, with
//! its optional capabilities ([`ChangeTracking`], [`ExclusiveLock`],
//! [`ResizeWatch`], [`AllocationMap`]).
//!
//! The engine calls them from many threads at once, so every method takes `&self`;
//! the blocking methods block the calling thread until the operation has
//! completed. Implementations are free to run the I/O asynchronously underneath
//! (io_uring, librbd AIO): only the completion is waited for.

use std::sync::Arc;

use crate::aio::BufSlice;
use crate::allocation::AllocationMap;
use crate::error::Result;
use crate::io::{ready, IoFut, WriteMode};

/// What a backend is, recorded in the cache superblock so that a cache is never
/// attached to another disk, and never serves data the backend changed behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendIdentity {
    /// "file", "dev" or "rbd".
    pub kind: String,
    /// A stable name: canonical path, or pool/image.
    pub name: String,
    /// Size in bytes at open.
    pub size: u64,
    /// Change detector: for files (dev, ino, mtime_ns); for devices (rdev);
    /// for rbd the image id and generation. Compared as an opaque string.
    pub fingerprint: String,
}

/// The answer to "what changed on the backend since the cache detached?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChanges {
    Unchanged,
    /// These byte ranges (offset, length) may have changed.
    Ranges(Vec<(u64, u64)>),
    /// Something may have changed anywhere.
    Unknown,
}

/// The data path: what a cache device needs, and what every backend is. Reads,
/// writes, flushes, discards and zeroes at byte offsets, blocking or on the calling
/// thread's event loop.
pub trait BlockIo: Send + Sync {
    /// Size in bytes. Requests never reach past it.
    fn size(&self) -> u64;

    /// Logical block size the device requires for offsets and lengths (512 or 4096).
    fn block_size(&self) -> u32 {
        512
    }

    /// Read `buf.len()` bytes at `offset`. Short reads are errors, not partial data.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write all of `buf` at `offset`. Returns when the device has acknowledged the
    /// write; it is durable only after [`BlockIo::flush`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Make every write acknowledged before this call durable.
    fn flush(&self) -> Result<()>;

    /// Tell the device the range is unused. Contents afterwards are unspecified.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make the range read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    // --- The asynchronous data path, on the calling thread's event loop ---
    //
    // The defaults carry the request out with the blocking method above, on the
    // loop thread (correct, but it holds up the loop): the file, RBD, in-memory
    // and fault-injecting backends implement them natively.

    /// Read `dst.len()` bytes at `offset`.
    fn read_async(&self, offset: u64, dst: BufSlice) -> IoFut<'_> {
        // SAFETY: the request owns `dst` while it runs (the data-path contract).
        ready(self.read_at(offset, unsafe { dst.request_bytes_mut() }))
    }

    /// Write `src` at `offset`.
    fn write_async(&self, offset: u64, src: BufSlice, mode: WriteMode) -> IoFut<'_> {
        // SAFETY: the request owns `src` while it runs.
        let r = self.write_at(offset, unsafe { src.request_bytes() });
        ready(r.and_then(|()| match mode {
            WriteMode::Normal => Ok(()),
            WriteMode::Durable => self.flush(),
        }))
    }

    fn flush_async(&self) -> IoFut<'_> {
        ready(self.flush())
    }

    fn discard_async(&self, offset: u64, len: u64) -> IoFut<'_> {
        ready(self.discard(offset, len))
    }

    fn write_zeroes_async(&self, offset: u64, len: u64) -> IoFut<'_> {
        ready(self.write_zeroes(offset, len))
    }

    /// Whether a `WriteMode::Durable` write is one durable write (FUA,
    /// `RWF_DSYNC` on io_uring), not a write and then a flush of the whole
    /// device, which is what the default does. The engine writes a FUA
    /// write's data and record durable only where it is.
    fn durable_writes_are_native(&self) -> bool {
        false
    }
}

/// The slow, shared disk the cache sits in front of: a [`BlockIo`] with an
/// identity, and capabilities that only some backends have. A capability a
/// backend lacks is `None`, so that the caller decides, and says, what it does
/// without it, instead of a default that pretends.
pub trait Backend: BlockIo {
    fn identity(&self) -> BackendIdentity;

    /// Can the backend tell what changed while the cache was detached?
    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        None
    }

    /// Does the backend have an exclusive lock that a live migration hands over?
    fn exclusive_lock(&self) -> Option<&dyn ExclusiveLock> {
        None
    }

    /// Can the backend's size change under a running server (an RBD image
    /// resized by someone else)?
    fn resize_watch(&self) -> Option<&dyn ResizeWatch> {
        None
    }

    /// Where the backend's data is, if it can tell (see `allocation.rs`);
    /// `None` means all data.
    fn allocation_map(&self) -> Option<&dyn AllocationMap> {
        None
    }
}

/// Writes made behind a detached cache: a marker recorded at clean detach (after
/// the cache's last flush), compared at the next attach.
pub trait ChangeTracking: Send + Sync {
    /// A token that identifies the backend's current content, recorded at clean
    /// detach. `None`: it cannot tell right now (the file's mtime could not be
    /// read); then no marker is recorded, and writes made behind the detached
    /// cache go unnoticed at the next attach.
    fn change_marker(&self) -> Result<Option<String>>;

    /// What changed since `marker` was taken. Backends that can name the changed
    /// ranges (an RBD snapshot diff) return them; the default compares markers.
    fn changes_since(&self, marker: &str) -> Result<BackendChanges> {
        Ok(match self.change_marker()? {
            Some(m) if m == marker => BackendChanges::Unchanged,
            _ => BackendChanges::Unknown,
        })
    }
}

/// The change marker of a backend that keeps a modification time (or counter):
/// equal values mean no write happened in between.
pub(crate) fn mtime_marker(ns: u64) -> String {
    format!("mtime:{ns}")
}

/// An exclusive lock (RBD's exclusive-lock feature, a file's flock) that keeps a
/// second server off the backend.
pub trait ExclusiveLock: Send + Sync {
    /// Live-migration handover, source side: stop holding the lock between
    /// requests, so that the destination can take it, while this side keeps
    /// writing (each write holds the lock only while it is in flight).
    fn release_lock(&self) -> Result<()>;

    /// Hold the lock again for good (an aborted migration). Fails, naming the
    /// holder, if another client holds it.
    fn acquire_lock(&self) -> Result<()>;
}

/// A backend whose size can change under a running server.
pub trait ResizeWatch: Send + Sync {
    /// The size now; [`BlockIo::size`] stays what it was at open. When it is
    /// smaller (a shrink), requests beyond it fail with EIO, and the engine
    /// refuses guest requests there even when they are cached.
    fn current_size(&self) -> u64;
}

/// Lets shared or boxed devices (e.g. `Arc<dyn Backend>`, or an `Arc<MemBackend>` a
/// test keeps a handle to) be used wherever a `BlockIo` or `Backend` is expected.
macro_rules! forward {
    ($ptr:ident) => {
        impl<T: BlockIo + ?Sized> BlockIo for $ptr<T> {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn block_size(&self) -> u32 {
                (**self).block_size()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
                (**self).read_at(offset, buf)
            }
            fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
                (**self).write_at(offset, buf)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn discard(&self, offset: u64, len: u64) -> Result<()> {
                (**self).discard(offset, len)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn read_async(&self, offset: u64, dst: BufSlice) -> IoFut<'_> {
                (**self).read_async(offset, dst)
            }
            fn write_async(&self, offset: u64, src: BufSlice, mode: WriteMode) -> IoFut<'_> {
                (**self).write_async(offset, src, mode)
            }
            fn flush_async(&self) -> IoFut<'_> {
                (**self).flush_async()
            }
            fn discard_async(&self, offset: u64, len: u64) -> IoFut<'_> {
                (**self).discard_async(offset, len)
            }
            fn write_zeroes_async(&self, offset: u64, len: u64) -> IoFut<'_> {
                (**self).write_zeroes_async(offset, len)
            }
            fn durable_writes_are_native(&self) -> bool {
                (**self).durable_writes_are_native()
            }
        }

        impl<T: Backend + ?Sized> Backend for $ptr<T> {
            fn identity(&self) -> BackendIdentity {
                (**self).identity()
            }
            fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
                (**self).change_tracking()
            }
            fn exclusive_lock(&self) -> Option<&dyn ExclusiveLock> {
                (**self).exclusive_lock()
            }
            fn resize_watch(&self) -> Option<&dyn ResizeWatch> {
                (**self).resize_watch()
            }
            fn allocation_map(&self) -> Option<&dyn AllocationMap> {
                (**self).allocation_map()
            }
        }
    };
}

forward!(Arc);
forward!(Box);
