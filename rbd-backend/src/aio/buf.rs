//! Memory that the kernel (io_uring) or librbd reads or writes while a request is
//! in flight.
//!
//! The rule that makes handing raw pointers to the kernel sound: memory named by an
//! in-flight request is owned by that request (an `Arc` clone of the buffer sits in
//! the request's [`BufSlice`]), so it cannot be freed before the request completes,
//! even if the future that started it is dropped; and Rust code touches the bytes
//! only through [`DmaBuf::bytes_mut`] / [`DmaBuf::bytes`], which need the buffer to
//! be uniquely owned (no request holds a clone). Several requests may name
//! disjoint ranges of one buffer at once (the pieces of one guest request).

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Page alignment satisfies every DMA alignment Linux block devices ask for.
pub const DMA_ALIGN: usize = 4096;

/// Pooled size classes: 4 KiB .. 32 MiB, powers of two.
const MIN_CLASS: u32 = 12;
const MAX_CLASS: u32 = 25;
/// Free buffers kept per size class and thread.
const POOL_DEPTH: usize = 64;

struct Raw {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `Raw` owns a plain heap allocation; which thread frees it does not matter.
unsafe impl Send for Raw {}
// SAFETY: `Raw` hands out no references itself; its bytes are reached only
// through `DmaBuf`, whose rules keep Rust access and in-flight requests apart.
unsafe impl Sync for Raw {}

impl Raw {
    fn alloc(cap: usize) -> Raw {
        let layout = Layout::from_size_align(cap.max(1), DMA_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size and a power-of-two alignment.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Raw { ptr, cap }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap.max(1), DMA_ALIGN).expect("buffer layout");
        // SAFETY: allocated in `Raw::alloc` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

thread_local! {
    static POOL: RefCell<Vec<Vec<Raw>>> =
        RefCell::new((MIN_CLASS..=MAX_CLASS).map(|_| Vec::new()).collect());
}

fn class_of(len: usize) -> Option<usize> {
    let bits = (len.max(1) as u64)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    (bits <= MAX_CLASS).then(|| (bits - MIN_CLASS) as usize)
}

/// Memory owned elsewhere that requests may use as a [`DmaBuf`] (a ublk tag
/// buffer, which the driver copies request data into and out of).
///
/// # Safety
/// `as_ptr()` must point to `len()` bytes, aligned to [`DMA_ALIGN`], valid for as
/// long as the object lives, that nothing accesses except through the `DmaBuf`
/// rules (or at moments when no `DmaBuf` request is in flight on it).
pub unsafe trait ForeignMem: Send + Sync + 'static {
    fn as_ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Inner {
    raw: Option<Raw>,
    foreign: Option<std::sync::Arc<dyn ForeignMem>>,
    len: usize,
}

impl Inner {
    fn base(&self) -> *mut u8 {
        match (&self.raw, &self.foreign) {
            (Some(r), _) => r.ptr.as_ptr(),
            (None, Some(f)) => f.as_ptr(),
            (None, None) => NonNull::dangling().as_ptr(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        if let Some(c) = class_of(raw.cap).filter(|&c| raw.cap == 1 << (c as u32 + MIN_CLASS)) {
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p[c].len() < POOL_DEPTH {
                    p[c].push(Raw {
                        ptr: raw.ptr,
                        cap: raw.cap,
                    });
                    std::mem::forget(raw);
                }
            });
            // (Dropped here when the pool was full or is gone.)
        }
    }
}

/// A 4096-aligned byte buffer that requests can share (see the module docs).
#[derive(Clone)]
pub struct DmaBuf(Arc<Inner>);

impl DmaBuf {
    /// A buffer of `len` bytes, from this thread's pool when one of its size class
    /// is free. Its contents are unspecified (zero when newly allocated).
    pub fn new(len: usize) -> DmaBuf {
        let raw = match class_of(len) {
            Some(c) => POOL
                .try_with(|p| p.borrow_mut()[c].pop())
                .ok()
                .flatten()
                .unwrap_or_else(|| Raw::alloc(1 << (c as u32 + MIN_CLASS))),
            None => Raw::alloc(len),
        };
        DmaBuf(Arc::new(Inner {
            raw: Some(raw),
            foreign: None,
            len,
        }))
    }

    /// A buffer over memory owned elsewhere (see [`ForeignMem`]).
    pub fn foreign(mem: Arc<dyn ForeignMem>) -> DmaBuf {
        let len = mem.len();
        assert!(
            (mem.as_ptr() as usize).is_multiple_of(DMA_ALIGN),
            "foreign buffer is not {DMA_ALIGN}-aligned"
        );
        DmaBuf(Arc::new(Inner {
            raw: None,
            foreign: Some(mem),
            len,
        }))
    }

    /// A zero-filled buffer.
    pub fn zeroed(len: usize) -> DmaBuf {
        let mut b = Self::new(len);
        b.bytes_mut().expect("fresh buffer").fill(0);
        b
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> DmaBuf {
        let mut b = Self::new(data.len());
        b.bytes_mut().expect("fresh buffer").copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The bytes, if no request (nor any other clone) holds this buffer.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        let inner = Arc::get_mut(&mut self.0)?;
        let (p, len) = (inner.base(), inner.len);
        // SAFETY: unique ownership (Arc::get_mut) means no request names this memory
        // and no other reference to it exists; `len` is within the allocation.
        Some(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// The bytes for reading, if no request holds this buffer.
    pub fn bytes(&self) -> Option<&[u8]> {
        if Arc::strong_count(&self.0) != 1 {
            return None;
        }
        // SAFETY: only this handle exists and it is borrowed shared for the
        // slice's lifetime, so nothing can hand it to a request meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.0.base(), self.0.len) })
    }

    /// The whole buffer as a slice for one request.
    pub fn slice_all(&self) -> BufSlice {
        self.slice(0, self.len())
    }

    /// Bytes `off..off+len` for one request.
    pub fn slice(&self, off: usize, len: usize) -> BufSlice {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len()),
            "slice {off}+{len} of a {}-byte buffer",
            self.len()
        );
        BufSlice {
            buf: self.clone(),
            off,
            len,
        }
    }

    fn base(&self) -> *mut u8 {
        self.0.base()
    }

    /// Whether two handles are the same buffer.
    pub fn same(&self, other: &DmaBuf) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaBuf({} bytes)", self.len())
    }
}

/// A range of a [`DmaBuf`] named by one request. Holding it keeps the memory alive.
#[derive(Clone)]
pub struct BufSlice {
    buf: DmaBuf,
    off: usize,
    len: usize,
}

impl BufSlice {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn offset(&self) -> usize {
        self.off
    }

    pub fn buf(&self) -> &DmaBuf {
        &self.buf
    }

    /// A sub-range of this slice.
    pub fn sub(&self, off: usize, len: usize) -> BufSlice {
        assert!(
            off + len <= self.len,
            "sub-slice {off}+{len} of {}",
            self.len
        );
        self.buf.slice(self.off + off, len)
    }

    /// Start address, for an SQE or a librbd call. The memory stays valid while
    /// this slice (or a clone) lives.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        // SAFETY: `off + len <= buf.len() <= cap`, so the result stays inside the allocation.
        unsafe { self.buf.base().add(self.off) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.as_mut_ptr()
    }

    /// Whether the address is aligned to `a` (a power of two).
    pub fn aligned_to(&self, a: usize) -> bool {
        (self.as_ptr() as usize).is_multiple_of(a)
    }

    /// The bytes, for a backend that carries out a request itself (in memory, or
    /// with a blocking call on the loop thread).
    ///
    /// # Safety
    /// Only the request that owns this slice may call it, while it runs: the
    /// engine's data-path contract is that nothing else reads or writes the range
    /// of an in-flight request, and no other reference from this call may live on.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn request_bytes_mut(&self) -> &mut [u8] {
        // SAFETY: the caller upholds the contract above; `off + len` is inside the
        // allocation, which this slice keeps alive.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// The bytes a write request carries (see [`BufSlice::request_bytes_mut`]).
    ///
    /// # Safety
    /// As for `request_bytes_mut`: only the owning request, while nothing writes
    /// the range.
    pub unsafe fn request_bytes(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// Give up the slice, returning the buffer handle it kept.
    pub fn into_buf(self) -> DmaBuf {
        self.buf
    }

    /// Copy of the bytes (tests and slow paths), if no request holds the buffer
    /// besides this slice.
    pub fn to_vec(self) -> Option<Vec<u8>> {
        let (off, len) = (self.off, self.len);
        let b = self.buf;
        b.bytes().map(|s| s[off..off + len].to_vec())
    }
}

impl fmt::Debug for BufSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BufSlice({}+{} of {})",
            self.off,
            self.len,
            self.buf.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_needs_unique_ownership_and_buffers_are_aligned() {
        let mut b = DmaBuf::zeroed(10_000);
        assert_eq!(b.len(), 10_000);
        b.bytes_mut().unwrap()[5] = 7;
        let s = b.slice(4096, 4096);
        assert!(s.aligned_to(4096));
        assert!(b.bytes_mut().is_none(), "a request holds it");
        assert!(b.bytes().is_none());
        drop(s);
        assert_eq!(b.bytes().unwrap()[5], 7);
    }

    #[test]
    fn pooled_buffers_are_reused_on_the_same_thread() {
        let a = DmaBuf::new(64 * 1024);
        let p = a.slice_all().as_ptr();
        drop(a);
        let b = DmaBuf::new(60 * 1024);
        assert_eq!(b.slice_all().as_ptr(), p);
        let big = DmaBuf::new(64 << 20);
        assert_eq!(big.len(), 64 << 20);
    }

    #[test]
    #[should_panic(expected = "slice")]
    fn slices_stay_inside_the_buffer() {
        let b = DmaBuf::new(4096);
        let _ = b.slice(4000, 200);
    }
}
