//! Discard and write-zeroes: ask the filesystem or device to do it without moving
//! data, and fall back step by step to writing zeroes ourselves.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::direct::{align_down, align_up, shared, BOUNCE_MAX};
use super::{FileBackend, FileKind};
use crate::aligned::AlignedBuf;
use crate::sys;

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// Records that `flag`'s operation is unsupported; true the first time.
fn mark(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

impl FileBackend {
    pub(super) fn discard_io(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.quirks.no_discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        let res = match self.kind {
            FileKind::File => {
                let _g = shared(&self.rmw);
                sys::fallocate(
                    &self.file,
                    sys::Fallocate::PUNCH_HOLE | sys::Fallocate::KEEP_SIZE,
                    offset,
                    len,
                )
            }
            FileKind::Device => {
                // The device only discards whole logical blocks; discard is advisory,
                // so shrinking the range to them is allowed.
                let bs = u64::from(self.block_size);
                let (s, e) = (align_up(offset, bs)?, align_down(offset + len, bs));
                if s >= e {
                    return Ok(());
                }
                let _g = shared(&self.rmw);
                sys::blk_discard(&self.file, s, e - s)
            }
        };
        match res {
            Err(e) if unsupported(&e) => {
                if mark(&self.quirks.no_discard) {
                    tracing::debug!(path = %self.path.display(), error = %e,
                        "discard unsupported; ignoring discards from now on");
                }
                Ok(())
            }
            other => other,
        }
    }

    pub(super) fn zero_io(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            FileKind::File => self.zero_file(offset, len),
            FileKind::Device => self.zero_device(offset, len),
        }
    }

    fn zero_file(&self, offset: u64, len: u64) -> io::Result<()> {
        let keep = sys::Fallocate::KEEP_SIZE;
        for (mode, flag, name) in [
            (
                sys::Fallocate::ZERO_RANGE | keep,
                &self.quirks.no_zero_range,
                "FALLOC_FL_ZERO_RANGE",
            ),
            (
                sys::Fallocate::PUNCH_HOLE | keep,
                &self.quirks.no_punch_hole,
                "FALLOC_FL_PUNCH_HOLE",
            ),
        ] {
            if flag.load(Ordering::Relaxed) {
                continue;
            }
            let res = {
                let _g = shared(&self.rmw);
                sys::fallocate(&self.file, mode, offset, len)
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {
                    if mark(flag) {
                        tracing::debug!(path = %self.path.display(), "{name} unsupported");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zero_chunks(offset, len)
    }

    fn zero_device(&self, offset: u64, len: u64) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let (s, e) = (align_up(offset, bs)?, align_down(end, bs));
        if s >= e || self.quirks.no_zeroout.load(Ordering::Relaxed) {
            return self.write_zero_chunks(offset, len);
        }
        let res = {
            let _g = shared(&self.rmw);
            sys::blk_zeroout(&self.file, s, e - s)
        };
        match res {
            Ok(()) => {}
            Err(err) if unsupported(&err) => {
                if mark(&self.quirks.no_zeroout) {
                    tracing::debug!(path = %self.path.display(), "BLKZEROOUT unsupported");
                }
                self.write_zero_chunks(s, e - s)?;
            }
            Err(err) => return Err(err),
        }
        // Partial blocks at either end: written through the read-modify-write path.
        self.write_zero_chunks(offset, s - offset)?;
        self.write_zero_chunks(e, end - e)
    }

    /// The last resort: write zero buffers, at most 1 MiB at a time.
    pub(super) fn write_zero_chunks(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let a = self.align.offset;
        let zeros = AlignedBuf::with_align(
            usize::try_from(len.min(BOUNCE_MAX)).unwrap_or(1 << 20),
            self.align.mem,
        )?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // An unaligned start gets a short first piece, so the rest are aligned.
            let room = match pos % a {
                0 => BOUNCE_MAX.max(a),
                r => a - r,
            };
            let n = room.min(end - pos).min(zeros.len() as u64);
            let n_usize = usize::try_from(n).unwrap_or(zeros.len());
            self.write_io(pos, &zeros.as_slice()[..n_usize])?;
            pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::BlockIo;
    use crate::file::{FileBackend, OpenOptions};
    use crate::io_engine::SyncEngine;
    use std::sync::Arc;

    /// The write-zeroes last resort is unreachable on filesystems with fallocate,
    /// so exercise it directly, at awkward offsets, in direct and buffered mode.
    #[test]
    fn write_zero_chunks_zeroes_exactly_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.img");
        let size = 3 << 20;
        std::fs::write(&path, vec![0xeeu8; size]).expect("create");
        for direct in [true, false] {
            let b = FileBackend::open_with_engine(
                &path,
                OpenOptions {
                    direct,
                    ..OpenOptions::default()
                },
                Arc::new(SyncEngine::new()),
            )
            .expect("open");
            b.write_at(0, &vec![0xeeu8; size]).expect("refill");
            let (off, len) = (4095u64, (1u64 << 20) + 8195);
            b.write_zero_chunks(off, len).expect("zero");
            let mut all = vec![0u8; size];
            b.read_at(0, &mut all).expect("read");
            for (i, &byte) in all.iter().enumerate() {
                let inside = (off..off + len).contains(&(i as u64));
                assert_eq!(
                    byte,
                    if inside { 0 } else { 0xee },
                    "byte {i} direct={direct}"
                );
            }
        }
    }
}
