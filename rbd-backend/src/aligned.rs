//! A heap buffer whose address is aligned for O_DIRECT.
//!
//! `Vec<u8>` only guarantees byte alignment, and O_DIRECT refuses (EINVAL) a buffer
//! that is not aligned to the device's DMA alignment, so bounce buffers need their
//! own allocation with an explicit `Layout`.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::ptr::NonNull;

/// Page alignment satisfies every DMA alignment Linux block devices ask for.
pub const DEFAULT_ALIGN: usize = 4096;

/// A zero-filled, fixed-size byte buffer aligned to at least [`DEFAULT_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no aliasing
// pointer escapes except through borrows that follow the usual &/&mut rules.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to 4096.
    pub fn new(len: usize) -> io::Result<Self> {
        Self::with_align(len, DEFAULT_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (rounded up to a power of two,
    /// and never below 4096).
    pub fn with_align(len: usize, align: usize) -> io::Result<Self> {
        let align = align
            .max(DEFAULT_ALIGN)
            .checked_next_power_of_two()
            .ok_or_else(|| invalid(format!("alignment {align} too large")))?;
        // A zero-size layout may not be passed to the allocator; one byte keeps the
        // code path uniform and costs nothing.
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| invalid(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: `layout` has a non-zero size (len.max(1)) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate an aligned buffer of {len} bytes"),
            )
        })?;
        Ok(Self { ptr, len, layout })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of at least `len` initialised (zeroed) bytes,
        // owned by self and borrowed immutably for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        for len in [0usize, 1, 511, 4096, 65536 + 3] {
            let mut b = AlignedBuf::new(len).expect("alloc");
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(0xab);
            assert!(b.as_slice().iter().all(|&x| x == 0xab));
        }
        let b = AlignedBuf::with_align(10, 65536).expect("alloc");
        assert_eq!(b.as_slice().as_ptr() as usize % 65536, 0);
    }

    #[test]
    fn absurd_sizes_are_errors_not_panics() {
        assert!(AlignedBuf::new(usize::MAX).is_err());
        assert!(AlignedBuf::with_align(8, usize::MAX).is_err());
    }
}
