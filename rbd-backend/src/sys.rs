//! Thin, checked wrappers over the few Linux calls std does not offer (block-device
//! ioctls, fallocate, statx). All `unsafe` for them lives here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The `_IOC` encoding differs between architectures; libc does not export the
/// block-device ioctls we need (BLKGETSIZE64, BLKDISCARD, BLKZEROOUT), so we encode
/// them like <asm-generic/ioctl.h> and its powerpc/mips/sparc variants do.
mod ioc {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    mod arch {
        pub const NONE: u64 = 1;
        pub const READ: u64 = 2;
        pub const DIRSHIFT: u64 = 29;
    }
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    mod arch {
        pub const NONE: u64 = 0;
        pub const READ: u64 = 2;
        pub const DIRSHIFT: u64 = 30;
    }

    const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
        (dir << arch::DIRSHIFT) | (size << 16) | (ty << 8) | nr
    }

    pub const BLKSSZGET: u64 = ioc(arch::NONE, 0x12, 104, 0);
    pub const BLKGETSIZE64: u64 = ioc(arch::READ, 0x12, 114, std::mem::size_of::<usize>() as u64);
    pub const BLKDISCARD: u64 = ioc(arch::NONE, 0x12, 119, 0);
    pub const BLKZEROOUT: u64 = ioc(arch::NONE, 0x12, 127, 0);
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))
}

/// Size in bytes of a block device.
pub fn blk_getsize64(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            ioc::BLKGETSIZE64 as _,
            &mut size as *mut u64,
        )
    };
    cvt(ret).map(|()| size)
}

/// Logical sector size of a block device.
pub fn blk_sszget(file: &File) -> io::Result<u32> {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            ioc::BLKSSZGET as _,
            &mut ssz as *mut libc::c_int,
        )
    };
    cvt(ret)?;
    u32::try_from(ssz)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::other(format!("device reports logical block size {ssz}")))
}

fn blk_range_ioctl(file: &File, req: u64, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    retry_eintr(|| {
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 (start, length) from the pointer,
        // which points to a live local array of exactly that shape.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), req as _, range.as_ptr()) })
    })
}

pub fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(file, ioc::BLKDISCARD, offset, len)
}

pub fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(file, ioc::BLKZEROOUT, offset, len)
}

pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    retry_eintr(|| {
        // SAFETY: plain syscall on a borrowed, open fd; no memory is passed.
        cvt(unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) })
    })
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
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // the fd, and the kernel writes at most size_of::<statx>() bytes into `stx`.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    match cvt(ret) {
        Ok(()) => {}
        // An old kernel or libc without statx: same as "not reported".
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(None),
        Err(e) => return Err(e),
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
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
    let off = to_off(offset)?;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: plain syscall on a borrowed, open fd; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::ioc;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(ioc::BLKSSZGET, 0x1268);
        assert_eq!(ioc::BLKGETSIZE64, 0x8008_1272);
        assert_eq!(ioc::BLKDISCARD, 0x1277);
        assert_eq!(ioc::BLKZEROOUT, 0x127f);
    }
}
