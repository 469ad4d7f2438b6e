//! Opening a file or block device and learning its geometry.
//!
//! Everything that can go wrong here is an operator mistake or an environment
//! limit, so errors name the path and say what is wrong with it.

use std::fs::{self, File, OpenOptions as StdOpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{FileKind, OpenOptions};
use crate::error::{BackendError, ErrorKind, Result};
use crate::sys;

/// Alignment O_DIRECT imposes; both are 1 for buffered I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Align {
    /// File offsets and lengths.
    pub offset: u64,
    /// Buffer addresses.
    pub mem: usize,
}

impl Align {
    pub const NONE: Align = Align { offset: 1, mem: 1 };
}

pub(crate) struct Opened {
    pub file: File,
    pub path: PathBuf,
    pub kind: FileKind,
    pub direct: bool,
    pub size: u64,
    pub block_size: u32,
    pub align: Align,
    pub fingerprint: String,
}

/// Without STATX_DIOALIGN we cannot know the filesystem's O_DIRECT alignment;
/// 4096 satisfies every sector size in common use, so it is the safe guess.
const GUESS_DIO_ALIGN: u32 = 4096;

pub(crate) fn open(path: &Path, expect: Option<FileKind>, opts: OpenOptions) -> Result<Opened> {
    let label = match expect {
        Some(FileKind::Device) => "backend device",
        _ => "backend file",
    };
    let shown = path.display();
    let unavailable = |what: String, source: io::Error| {
        BackendError::new(
            ErrorKind::Unavailable,
            format!("{label} {shown} {what}"),
            source,
        )
    };

    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => unavailable("does not exist".into(), e),
        io::ErrorKind::PermissionDenied => unavailable("is not accessible".into(), e),
        _ => unavailable("cannot be examined".into(), e),
    })?;
    check_kind(&meta, expect).map_err(|what| unavailable(what, einval()))?;
    let path = fs::canonicalize(path).map_err(|e| unavailable("cannot be resolved".into(), e))?;

    let (mut file, mut direct) = open_file(&path, opts).map_err(|e| {
        let what = match e.raw_os_error() {
            Some(libc::EROFS) => "is on a read-only filesystem (open it read-only?)",
            Some(libc::EACCES) | Some(libc::EPERM) => "cannot be opened: permission denied",
            Some(libc::EBUSY) => "cannot be opened: busy (in use exclusively elsewhere?)",
            _ => "cannot be opened",
        };
        unavailable(what.into(), e)
    })?;

    // Re-check through the fd: the path may have been swapped since `metadata`.
    let meta = file
        .metadata()
        .map_err(|e| unavailable("cannot be examined".into(), e))?;
    let kind = check_kind(&meta, expect).map_err(|what| unavailable(what, einval()))?;

    let (size, block_size, mut align) = match kind {
        FileKind::Device => {
            let size = sys::blk_getsize64(&file)
                .map_err(|e| unavailable("does not report its size".into(), e))?;
            let lbs = sys::blk_sszget(&file)
                .map_err(|e| unavailable("does not report its block size".into(), e))?;
            let mem = match sys::dio_alignment(&file) {
                Ok(Some(d)) if d.mem > 0 => d.mem,
                _ => lbs,
            };
            let align = Align {
                offset: u64::from(lbs),
                mem: usize::try_from(mem).unwrap_or(4096),
            };
            (size, lbs, align)
        }
        FileKind::File => {
            let size = meta.len();
            let align = if direct {
                match file_dio_align(&file, &meta, size) {
                    Ok(a) => a,
                    Err(reason) => {
                        tracing::warn!(path = %path.display(), %reason,
                            "O_DIRECT unusable; using buffered I/O (flushes still fdatasync)");
                        file = reopen_buffered(&path, opts)
                            .map_err(|e| unavailable("cannot be opened".into(), e))?;
                        direct = false;
                        Align::NONE
                    }
                }
            } else {
                Align::NONE
            };
            // Never report less than 512: sector-based frontends cannot use less.
            let bs = u32::try_from(align.offset)
                .unwrap_or(GUESS_DIO_ALIGN)
                .max(512);
            (size, bs, align)
        }
    };
    if !direct {
        align = Align::NONE;
    }

    let fingerprint = match kind {
        FileKind::File => format!("dev={},ino={}", meta.dev(), meta.ino()),
        FileKind::Device => format!(
            "rdev={}:{}",
            libc::major(meta.rdev()),
            libc::minor(meta.rdev())
        ),
    };
    Ok(Opened {
        file,
        path,
        kind,
        direct,
        size,
        block_size,
        align,
        fingerprint,
    })
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// The kind of `meta`, or a description of why it is not what was asked for.
fn check_kind(
    meta: &fs::Metadata,
    expect: Option<FileKind>,
) -> std::result::Result<FileKind, String> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        return Err("is a directory".into());
    } else if ft.is_block_device() {
        FileKind::Device
    } else if ft.is_file() {
        FileKind::File
    } else {
        return Err("is neither a regular file nor a block device".into());
    };
    match (expect, kind) {
        (Some(FileKind::Device), FileKind::File) => Err("is not a block device".into()),
        (Some(FileKind::File), FileKind::Device) => {
            Err("is a block device, not a regular file (use dev:)".into())
        }
        _ => Ok(kind),
    }
}

/// Opens with O_DIRECT when asked, falling back to buffered I/O when the filesystem
/// refuses O_DIRECT at open (EINVAL). Returns whether O_DIRECT is in effect.
fn open_file(path: &Path, opts: OpenOptions) -> io::Result<(File, bool)> {
    if !opts.direct {
        return reopen_buffered(path, opts).map(|f| (f, false));
    }
    match std_options(opts).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(),
                "filesystem refuses O_DIRECT; using buffered I/O (flushes still fdatasync)");
            reopen_buffered(path, opts).map(|f| (f, false))
        }
        Err(e) => Err(e),
    }
}

fn reopen_buffered(path: &Path, opts: OpenOptions) -> io::Result<File> {
    std_options(opts).open(path)
}

fn std_options(opts: OpenOptions) -> StdOpenOptions {
    let mut o = StdOpenOptions::new();
    o.read(true).write(!opts.read_only);
    o
}

/// O_DIRECT alignment for a regular file, or why O_DIRECT cannot be used on it.
fn file_dio_align(
    file: &File,
    meta: &fs::Metadata,
    size: u64,
) -> std::result::Result<Align, String> {
    let (offset, mem) = match sys::dio_alignment(file) {
        Ok(Some(d)) if d.offset == 0 => {
            return Err("the filesystem reports no O_DIRECT support".into())
        }
        Ok(Some(d)) => (d.offset, d.mem.max(1)),
        // Unknown: guess conservatively from st_blksize, within [512, 4096].
        Ok(None) | Err(_) => {
            let guess = u32::try_from(meta.blksize())
                .unwrap_or(GUESS_DIO_ALIGN)
                .clamp(512, GUESS_DIO_ALIGN)
                .next_power_of_two();
            (guess, guess)
        }
    };
    if !offset.is_power_of_two() || !mem.is_power_of_two() {
        return Err(format!(
            "odd O_DIRECT alignment (offset {offset}, memory {mem})"
        ));
    }
    // A partial last block could only be written by extending the file past its size.
    if !size.is_multiple_of(u64::from(offset)) {
        return Err(format!(
            "file size {size} is not a multiple of the O_DIRECT alignment {offset}"
        ));
    }
    Ok(Align {
        offset: u64::from(offset),
        mem: usize::try_from(mem).unwrap_or(4096),
    })
}
