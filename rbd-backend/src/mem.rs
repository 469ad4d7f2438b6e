//! `MemBackend`: a backend held in memory, for fast engine tests and benchmarks.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::allocation::{Allocation, AllocationMap};
use crate::backend::{mtime_marker, Backend, BackendIdentity, BlockIo, ChangeTracking};
use crate::error::{BackendError, ErrorKind, Result};

pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    /// Bumped by every change; stands in for an mtime in `modified_ns`.
    generation: AtomicU64,
    block_size: u32,
    strict_alignment: bool,
    name: String,
    fingerprint: String,
}

/// Builds a [`MemBackend`]; see [`MemBackend::builder`].
#[derive(Debug, Clone)]
pub struct MemBackendBuilder {
    size: usize,
    data: Option<Vec<u8>>,
    block_size: u32,
    strict_alignment: bool,
    name: String,
    fingerprint: String,
}

impl MemBackendBuilder {
    /// Size in bytes of a zero-filled backend (ignored when `data` is given).
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }

    /// Initial contents; the size is its length.
    pub fn data(mut self, data: Vec<u8>) -> Self {
        self.data = Some(data);
        self
    }

    pub fn block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }

    /// Refuse (InvalidRequest) requests not aligned to the block size, so tests catch
    /// a caller that ignores `block_size()`.
    pub fn strict_alignment(mut self, strict: bool) -> Self {
        self.strict_alignment = strict;
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = fingerprint.into();
        self
    }

    pub fn build(self) -> MemBackend {
        MemBackend {
            data: RwLock::new(self.data.unwrap_or_else(|| vec![0; self.size])),
            generation: AtomicU64::new(0),
            block_size: self.block_size.max(1),
            strict_alignment: self.strict_alignment,
            name: self.name,
            fingerprint: self.fingerprint,
        }
    }
}

impl MemBackend {
    /// A change counter, not a time: equal values mean no write happened in between,
    /// which is all a cache compares it for.
    pub fn modified_ns(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// A zero-filled backend of `size` bytes with 512-byte blocks.
    pub fn new(size: usize) -> Self {
        Self::builder().size(size).build()
    }

    pub fn builder() -> MemBackendBuilder {
        MemBackendBuilder {
            size: 0,
            data: None,
            block_size: 512,
            strict_alignment: false,
            name: "mem".into(),
            fingerprint: "mem".into(),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read_lock().clone()
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock for a change; counts the change for `modified_ns`.
    fn write_lock(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.data.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The byte range of a request, or an InvalidRequest error.
    fn range(
        &self,
        op: &str,
        offset: u64,
        len: u64,
        size: usize,
    ) -> Result<std::ops::Range<usize>> {
        let bs = u64::from(self.block_size);
        let misaligned =
            self.strict_alignment && (!offset.is_multiple_of(bs) || !len.is_multiple_of(bs));
        let range = offset
            .checked_add(len)
            .filter(|&end| end <= size as u64)
            .and_then(|end| Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?));
        match range {
            Some(r) if !misaligned => Ok(r),
            _ => Err(BackendError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "mem {}: {op} offset={offset} len={len} (size={size}, block size={bs}{})",
                    self.name,
                    if misaligned { ", misaligned" } else { "" }
                ),
                io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
}

impl BlockIo for MemBackend {
    fn size(&self) -> u64 {
        self.read_lock().len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.read_lock();
        let r = self.range("read", offset, buf.len() as u64, data.len())?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut data = self.write_lock();
        let r = self.range("write", offset, buf.len() as u64, data.len())?;
        data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Nothing is volatile: every write is as durable as it gets.
    fn durable_writes_are_native(&self) -> bool {
        true
    }

    /// Discarded ranges read back as zeroes, like a punched hole.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.write_lock();
        let r = self.range("discard", offset, len, data.len())?;
        data[r].fill(0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.write_lock();
        let r = self.range("write_zeroes", offset, len, data.len())?;
        data[r].fill(0);
        Ok(())
    }
}

impl Backend for MemBackend {
    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: "mem".into(),
            name: self.name.clone(),
            size: self.size(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    fn allocation_map(&self) -> Option<&dyn AllocationMap> {
        Some(self)
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        Some(self)
    }
}

impl ChangeTracking for MemBackend {
    fn change_marker(&self) -> Result<Option<String>> {
        Ok(Some(mtime_marker(self.modified_ns())))
    }
}

/// Blocks of this size that read as all zeroes are reported as holes.
const HOLE_GRAIN: u64 = 4096;

/// A memory disk has no allocation of its own: all-zero 4 KiB blocks count as
/// holes (they read as zeroes, which is what a hole promises).
impl AllocationMap for MemBackend {
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation> {
        let data = self.read_lock();
        let r = self.range("allocation query", offset, len, data.len())?;
        let mut extents = Vec::new();
        let mut pos = r.start as u64;
        while pos < r.end as u64 {
            let next = ((pos / HOLE_GRAIN + 1) * HOLE_GRAIN).min(r.end as u64);
            if data[pos as usize..next as usize].iter().any(|&b| b != 0) {
                extents.push((pos, next - pos));
            }
            pos = next;
        }
        Ok(Allocation::from_extents(offset, offset + len, extents))
    }
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBackend")
            .field("name", &self.name)
            .field("size", &self.size())
            .field("block_size", &self.block_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_range_and_alignment() {
        let m = MemBackend::builder()
            .size(8192)
            .block_size(4096)
            .strict_alignment(true)
            .build();
        assert_eq!(m.size(), 8192);
        assert_eq!(m.block_size(), 4096);
        m.write_at(4096, &[7u8; 4096]).expect("write");
        let mut b = vec![0u8; 8192];
        m.read_at(0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 7));
        let e = m.write_at(1, &[1u8; 4096]).expect_err("misaligned");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        let e = m.read_at(4096, &mut [0u8; 8192]).expect_err("past end");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(m.read_at(u64::MAX, &mut [0u8; 1]).is_err());
        m.write_zeroes(4096, 4096).expect("zero");
        assert!(m.snapshot().iter().all(|&x| x == 0));
    }

    #[test]
    fn lenient_by_default() {
        let m = MemBackend::builder().data(vec![1, 2, 3, 4, 5]).build();
        let mut b = [0u8; 3];
        m.read_at(1, &mut b).expect("read");
        assert_eq!(b, [2, 3, 4]);
        m.discard(0, 2).expect("discard");
        assert_eq!(m.snapshot(), vec![0, 0, 3, 4, 5]);
        assert_eq!(m.identity().kind, "mem");
        let g = m.modified_ns();
        m.read_at(0, &mut b).expect("read");
        assert_eq!(m.modified_ns(), g, "reads do not count as changes");
        m.write_at(4, &[9]).expect("write");
        assert_ne!(m.modified_ns(), g);
    }
}
