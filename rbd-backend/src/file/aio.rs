//! The file backend's asynchronous path: reads, writes and syncs as SQEs on the
//! calling thread's event loop (when the file's engine is io_uring and the request
//! is aligned for O_DIRECT); otherwise the blocking path, on the loop thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use io_uring::{opcode, types};

use super::FileBackend;
use crate::aio::{self, BufSlice};
use crate::error::Result;
use crate::io::WriteMode;
use crate::io_engine::EngineKind;

/// EAGAIN / EINTR completions are retried, but not forever.
const MAX_RETRIES: u32 = 100;

fn transient(res: i32) -> bool {
    res == -libc::EAGAIN || res == -libc::EINTR
}

impl FileBackend {
    fn on_ring(&self, offset: u64, s: &BufSlice) -> bool {
        self.engine.kind() == EngineKind::Uring
            && aio::in_loop()
            && (offset | s.len() as u64).is_multiple_of(self.align.offset)
            && s.aligned_to(self.align.mem)
    }

    pub(super) async fn read_async_impl(&self, offset: u64, dst: BufSlice) -> Result<()> {
        let len = dst.len() as u64;
        self.check_range("read", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.on_ring(offset, &dst) {
            // SAFETY: the request owns `dst` while it runs (the data-path contract).
            let buf = unsafe { dst.request_bytes_mut() };
            return self
                .read_io(offset, buf)
                .map_err(|e| self.io_error("read", offset, len, e));
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let (mut done, mut retries) = (0usize, 0u32);
        while done < dst.len() {
            let piece = dst.sub(done, dst.len() - done);
            let sqe = opcode::Read::new(fd, piece.as_mut_ptr(), piece.len() as u32)
                .offset(offset + done as u64)
                .build();
            // SAFETY: the SQE names `piece`, which the request owns until it completes.
            let op = unsafe { aio::submit(sqe, piece) }
                .map_err(|e| self.io_error("read", offset, len, e))?;
            let (res, _) = op.await;
            match res {
                r if r > 0 => done += r as usize,
                0 => {
                    return Err(self.io_error(
                        "read",
                        offset,
                        len,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("short read: end of file after {done} bytes"),
                        ),
                    ))
                }
                r if transient(r) && retries < MAX_RETRIES => retries += 1,
                r => {
                    return Err(self.io_error(
                        "read",
                        offset,
                        len,
                        io::Error::from_raw_os_error(-r),
                    ))
                }
            }
        }
        Ok(())
    }

    pub(super) async fn write_async_impl(
        &self,
        offset: u64,
        src: BufSlice,
        mode: WriteMode,
    ) -> Result<()> {
        let len = src.len() as u64;
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        if len == 0 {
            return self.durable_after(mode).await;
        }
        self.meta_dirty.store(true, Ordering::Release);
        if !self.on_ring(offset, &src) {
            // SAFETY: the request owns `src` while it runs.
            let buf = unsafe { src.request_bytes() };
            self.write_io(offset, buf)
                .map_err(|e| self.io_error("write", offset, len, e))?;
            return self.durable_after(mode).await;
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let flags = match mode {
            WriteMode::Normal => 0,
            WriteMode::Durable => libc::RWF_DSYNC,
        };
        let (mut done, mut retries) = (0usize, 0u32);
        while done < src.len() {
            let piece = src.sub(done, src.len() - done);
            let sqe = opcode::Write::new(fd, piece.as_ptr(), piece.len() as u32)
                .offset(offset + done as u64)
                .rw_flags(flags)
                .build();
            // SAFETY: the SQE names `piece`, which the request owns until it completes.
            let op = unsafe { aio::submit(sqe, piece) }
                .map_err(|e| self.io_error("write", offset, len, e))?;
            let (res, _) = op.await;
            match res {
                r if r > 0 => done += r as usize,
                r if (r == 0 || transient(r)) && retries < MAX_RETRIES => retries += 1,
                r => {
                    let e = if r == 0 {
                        io::Error::new(io::ErrorKind::WriteZero, "write made no progress")
                    } else {
                        io::Error::from_raw_os_error(-r)
                    };
                    return Err(self.io_error("write", offset, len, e));
                }
            }
        }
        Ok(())
    }

    async fn durable_after(&self, mode: WriteMode) -> Result<()> {
        match mode {
            WriteMode::Normal => Ok(()),
            WriteMode::Durable => self.flush_async_impl().await,
        }
    }

    pub(super) async fn flush_async_impl(&self) -> Result<()> {
        if self.engine.kind() != EngineKind::Uring || !aio::in_loop() {
            return self
                .engine
                .fdatasync(&self.file)
                .map_err(|e| self.io_error("fdatasync", 0, 0, e));
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let mut retries = 0u32;
        loop {
            let sqe = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: an fsync names no memory.
            let op =
                unsafe { aio::submit(sqe, ()) }.map_err(|e| self.io_error("fdatasync", 0, 0, e))?;
            match op.await.0 {
                0 => return Ok(()),
                r if transient(r) && retries < MAX_RETRIES => retries += 1,
                r => {
                    return Err(self.io_error("fdatasync", 0, 0, io::Error::from_raw_os_error(-r)))
                }
            }
        }
    }
}
