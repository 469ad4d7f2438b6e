//! The few Linux calls std does not offer (block-device ioctls, fallocate,
//! statx, flock), through `rustix`: its opcode helpers encode the ioctls for
//! every architecture, so there is no table of our own. The three ioctls
//! rustix has no wrapper for are the only `unsafe` here.

use std::fs::File;
use std::io;

use rustix::fs::{FallocateFlags, FlockOperation, StatxFlags};
use rustix::ioctl::{self, opcode, Getter, Setter};

pub use rustix::fs::FallocateFlags as Fallocate;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: ioctl::Opcode = opcode::read::<usize>(0x12, 114);
/// `BLKDISCARD` and `BLKZEROOUT`: `_IO(0x12, 119)` and `_IO(0x12, 127)`, with a
/// pointer to `[start, length]` as their argument.
const BLKDISCARD: ioctl::Opcode = opcode::none(0x12, 119);
const BLKZEROOUT: ioctl::Opcode = opcode::none(0x12, 127);

fn retry_eintr(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Size in bytes of a block device.
pub fn blk_getsize64(file: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a read opcode whose kernel argument is a u64
    // (size_t on 64-bit, and the kernel writes 8 bytes on every architecture).
    let size = unsafe { ioctl::ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size)
}

/// Logical sector size of a block device.
pub fn blk_sszget(file: &File) -> io::Result<u32> {
    let ssz = rustix::fs::ioctl_blksszget(file)?;
    Some(ssz)
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::other(format!("device reports logical block size {ssz}")))
}

fn blk_range_ioctl<const OPCODE: ioctl::Opcode>(
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    retry_eintr(|| {
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) from
        // their pointer argument, which Setter points at its `[u64; 2]`.
        unsafe { ioctl::ioctl(file, Setter::<OPCODE, [u64; 2]>::new([offset, len])) }?;
        Ok(())
    })
}

pub fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl::<BLKDISCARD>(file, offset, len)
}

pub fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl::<BLKZEROOUT>(file, offset, len)
}

pub fn fallocate(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    retry_eintr(|| Ok(rustix::fs::fallocate(file, mode, offset, len)?))
}

/// An exclusive flock without waiting; `EWOULDBLOCK` when someone else holds it.
pub fn flock_exclusive(file: &File) -> io::Result<()> {
    Ok(rustix::fs::flock(
        file,
        FlockOperation::NonBlockingLockExclusive,
    )?)
}

/// A shared flock without waiting (read-only openers share a file with each
/// other, never with a writer); `EWOULDBLOCK` when a writer holds it.
pub fn flock_shared(file: &File) -> io::Result<()> {
    Ok(rustix::fs::flock(
        file,
        FlockOperation::NonBlockingLockShared,
    )?)
}

pub fn flock_release(file: &File) -> io::Result<()> {
    Ok(rustix::fs::flock(file, FlockOperation::Unlock)?)
}

/// O_DIRECT alignment requirements as reported by statx(STATX_DIOALIGN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// Required alignment of the user buffer address.
    pub mem: u32,
    /// Required alignment of file offsets and lengths; 0 means O_DIRECT is unsupported.
    pub offset: u32,
}

/// `Ok(None)` when the kernel or filesystem does not report DIO alignment (before
/// Linux 6.1, or a filesystem that does not fill it in).
pub fn dio_alignment(file: &File) -> io::Result<Option<DioAlign>> {
    let stx = match rustix::fs::statx(
        file,
        c"",
        rustix::fs::AtFlags::EMPTY_PATH,
        StatxFlags::DIOALIGN,
    ) {
        Ok(s) => s,
        // An old kernel without statx: same as "not reported".
        Err(e) if e == rustix::io::Errno::NOSYS => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
        return Ok(None);
    }
    Ok(Some(DioAlign {
        mem: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    }))
}

/// `lseek(fd, offset, SEEK_DATA)` or `SEEK_HOLE` (`data`): the next data (or hole)
/// at or after `offset`; `None` where there is none before the end (ENXIO). Leaves
/// the file position alone in any way that matters: every other I/O here is
/// positional (pread/pwrite, io_uring with offsets).
pub fn seek_data_or_hole(file: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        rustix::fs::SeekFrom::Data(offset)
    } else {
        rustix::fs::SeekFrom::Hole(offset)
    };
    match rustix::fs::seek(file, whence) {
        Ok(pos) => Ok(Some(pos)),
        Err(e) if e == rustix::io::Errno::NXIO => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
        assert_eq!(BLKDISCARD as u64, 0x1277);
        assert_eq!(BLKZEROOUT as u64, 0x127f);
    }
}
