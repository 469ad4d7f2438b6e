//! Reads and writes that honour O_DIRECT alignment whatever the caller passes.
//!
//! Aligned requests go straight to the engine. Otherwise the request goes through
//! an aligned bounce buffer, in pieces so memory stays bounded; a write that covers
//! only part of a block reads that block first (read-modify-write) under the
//! exclusive `rmw` lock, so no concurrent change to the same block is lost.

use std::io;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::FileBackend;
use crate::aligned::AlignedBuf;

/// Largest bounce buffer; bigger requests are processed in pieces of this size.
pub(super) const BOUNCE_MAX: u64 = 1 << 20;

pub(super) fn align_down(v: u64, a: u64) -> u64 {
    v - v % a
}

pub(super) fn align_up(v: u64, a: u64) -> io::Result<u64> {
    match v % a {
        0 => Ok(v),
        r => v.checked_add(a - r).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "offset overflows when aligned")
        }),
    }
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))
}

pub(super) fn shared(l: &RwLock<()>) -> RwLockReadGuard<'_, ()> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn exclusive(l: &RwLock<()>) -> RwLockWriteGuard<'_, ()> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl FileBackend {
    fn offsets_aligned(&self, offset: u64, len: usize) -> bool {
        let a = self.align.offset;
        offset.is_multiple_of(a) && (len as u64).is_multiple_of(a)
    }

    fn mem_aligned(&self, ptr: *const u8) -> bool {
        (ptr as usize).is_multiple_of(self.align.mem)
    }

    fn bounce(&self, len: u64) -> io::Result<AlignedBuf> {
        AlignedBuf::with_align(to_usize(len.min(self.piece_len()))?, self.align.mem)
    }

    /// The bounce piece size: BOUNCE_MAX, kept a multiple of the alignment.
    fn piece_len(&self) -> u64 {
        align_down(BOUNCE_MAX, self.align.offset).max(self.align.offset)
    }

    pub(super) fn read_io(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.offsets_aligned(offset, buf.len()) && self.mem_aligned(buf.as_ptr()) {
            return self.engine.read_at(&self.file, offset, buf);
        }
        let a = self.align.offset;
        let lo = offset;
        let hi = offset + buf.len() as u64;
        let (start, end) = (align_down(lo, a), align_up(hi, a)?);
        let piece_max = self.piece_len();
        let mut bounce = self.bounce(end - start)?;
        let mut ps = start;
        while ps < end {
            let pe = (ps + piece_max).min(end);
            let piece = &mut bounce.as_mut_slice()[..to_usize(pe - ps)?];
            let n = self.engine.read_upto(&self.file, ps, piece)? as u64;
            // Bytes past EOF inside the last aligned block are not part of the request
            // (the range check keeps requests within the size), but must be present.
            let want_end = hi.min(pe);
            if ps + n < want_end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: end of file at {} before {want_end}", ps + n),
                ));
            }
            let (from, to) = (lo.max(ps), want_end);
            buf[to_usize(from - lo)?..to_usize(to - lo)?]
                .copy_from_slice(&piece[to_usize(from - ps)?..to_usize(to - ps)?]);
            ps = pe;
        }
        Ok(())
    }

    pub(super) fn write_io(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let offsets_ok = self.offsets_aligned(offset, buf.len());
        if offsets_ok && self.mem_aligned(buf.as_ptr()) {
            let _g = shared(&self.rmw);
            return self.engine.write_at(&self.file, offset, buf);
        }
        let a = self.align.offset;
        let lo = offset;
        let hi = offset + buf.len() as u64;
        let (start, end) = (align_down(lo, a), align_up(hi, a)?);
        // Only a partial block needs the exclusive lock; a merely misaligned buffer
        // is copied and written like any aligned write.
        let _exclusive = (!offsets_ok).then(|| exclusive(&self.rmw));
        let _shared = offsets_ok.then(|| shared(&self.rmw));
        let piece_max = self.piece_len();
        let mut bounce = self.bounce(end - start)?;
        let mut ps = start;
        while ps < end {
            let pe = (ps + piece_max).min(end);
            let piece = &mut bounce.as_mut_slice()[..to_usize(pe - ps)?];
            let head_partial = lo > ps;
            if head_partial {
                self.fill_block(ps, &mut piece[..to_usize(a)?])?;
            }
            let tail_block = pe - a;
            if hi < pe && !(head_partial && tail_block == ps) {
                self.fill_block(tail_block, &mut piece[to_usize(tail_block - ps)?..])?;
            }
            let (from, to) = (lo.max(ps), hi.min(pe));
            piece[to_usize(from - ps)?..to_usize(to - ps)?]
                .copy_from_slice(&buf[to_usize(from - lo)?..to_usize(to - lo)?]);
            self.engine.write_at(&self.file, ps, piece)?;
            ps = pe;
        }
        Ok(())
    }

    /// Reads one aligned block for read-modify-write; past EOF it reads as zeroes.
    fn fill_block(&self, offset: u64, block: &mut [u8]) -> io::Result<()> {
        let n = self.engine.read_upto(&self.file, offset, block)?;
        block[n..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096).ok(), Some(8192));
        assert_eq!(align_up(8192, 4096).ok(), Some(8192));
        assert_eq!(align_up(7, 1).ok(), Some(7));
        assert!(align_up(u64::MAX, 512).is_err());
    }
}
