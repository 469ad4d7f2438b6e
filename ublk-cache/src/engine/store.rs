//! Cache device I/O in terms of the layout: line data by slot and sector, metadata
//! blocks, superblock copies. Knows offsets, not policy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rbd_backend::aio::BufSlice;
use rbd_backend::{BlockIo, WriteMode};

use crate::error::{EngineError, EngineResult};
use crate::format::layout::SB_COPY_OFFSETS;
use crate::format::superblock::SB_BYTES;
use crate::format::{FormatError, Layout, Superblock, META_BLOCK};

pub struct CacheStore {
    dev: Arc<dyn BlockIo>,
    layout: Layout,
    /// Line data bytes read from / written to the cache device (for stats).
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    /// Device flushes, and metadata bytes written (what a FLUSH costs).
    flushes: AtomicU64,
    meta_bytes: AtomicU64,
}

impl CacheStore {
    pub fn new(dev: Arc<dyn BlockIo>, layout: Layout) -> Self {
        Self {
            dev,
            layout,
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            meta_bytes: AtomicU64::new(0),
        }
    }

    /// Line data bytes read and written so far.
    pub fn io_bytes(&self) -> (u64, u64) {
        (
            self.read_bytes.load(Ordering::Relaxed),
            self.write_bytes.load(Ordering::Relaxed),
        )
    }

    fn data_offset(&self, slot: u32, in_line: u64, len: usize) -> u64 {
        debug_assert!(in_line + len as u64 <= self.layout.line_size as u64);
        self.layout.line_offset(slot) + in_line
    }

    /// Read bytes of a line; `in_line` is the byte offset within the line.
    pub fn read(&self, slot: u32, in_line: u64, buf: &mut [u8]) -> EngineResult<()> {
        let off = self.data_offset(slot, in_line, buf.len());
        self.read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.dev
            .read_at(off, buf)
            .map_err(|e| EngineError::cache(&format!("read of line slot {slot}"), e))
    }

    pub fn write(&self, slot: u32, in_line: u64, buf: &[u8]) -> EngineResult<()> {
        let off = self.data_offset(slot, in_line, buf.len());
        self.write_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.dev
            .write_at(off, buf)
            .map_err(|e| EngineError::cache(&format!("write of line slot {slot}"), e))
    }

    /// Read bytes of a line into memory a request owns, on the event loop.
    pub async fn read_async(&self, slot: u32, in_line: u64, dst: BufSlice) -> EngineResult<()> {
        debug_assert!(in_line + dst.len() as u64 <= self.layout.line_size as u64);
        self.read_lines_async(slot, in_line, dst).await
    }

    /// Read bytes from `in_line` of `slot` on, running on into the slots after
    /// it where `dst` is longer than the rest of the line: lines lie side by
    /// side on the device, slot after slot.
    pub async fn read_lines_async(
        &self,
        slot: u32,
        in_line: u64,
        dst: BufSlice,
    ) -> EngineResult<()> {
        let ls = self.layout.line_size as u64;
        debug_assert!(
            (in_line + dst.len() as u64).div_ceil(ls) + slot as u64 <= self.layout.nr_lines
        );
        let off = self.layout.line_offset(slot) + in_line;
        self.read_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        self.dev
            .read_async(off, dst)
            .await
            .map_err(|e| EngineError::cache(&format!("read of line slot {slot}"), e))
    }

    pub async fn write_async(
        &self,
        slot: u32,
        in_line: u64,
        src: BufSlice,
        mode: WriteMode,
    ) -> EngineResult<()> {
        let off = self.data_offset(slot, in_line, src.len());
        self.write_bytes
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        self.dev
            .write_async(off, src, mode)
            .await
            .map_err(|e| EngineError::cache(&format!("write of line slot {slot}"), e))
    }

    /// Whether a durable write costs the device one write, not a write and a
    /// flush (see `BlockIo::durable_writes_are_native`).
    pub fn durable_writes_are_native(&self) -> bool {
        self.dev.durable_writes_are_native()
    }

    /// Make every completed cache write durable, on the event loop.
    pub async fn sync_async(&self) -> EngineResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.dev
            .flush_async()
            .await
            .map_err(|e| EngineError::cache("flush", e))
    }

    pub async fn write_meta_async(&self, block: u32, src: BufSlice) -> EngineResult<()> {
        self.meta_bytes
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        self.dev
            .write_async(self.layout.meta_block_offset(block), src, WriteMode::Normal)
            .await
            .map_err(|e| EngineError::cache(&format!("write of metadata block {block}"), e))
    }

    /// Format v2: write `src` (whole blocks) into the metadata log at `block`.
    pub async fn write_log_async(
        &self,
        block: u32,
        src: BufSlice,
        mode: WriteMode,
    ) -> EngineResult<()> {
        let off = self.layout.log_offset() + block as u64 * META_BLOCK as u64;
        self.meta_bytes
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        self.dev
            .write_async(off, src, mode)
            .await
            .map_err(|e| EngineError::cache(&format!("write of log block {block}"), e))
    }

    /// Format v2: write metadata block `block` of table copy `table`.
    pub async fn write_table_async(
        &self,
        table: u32,
        block: u32,
        src: BufSlice,
    ) -> EngineResult<()> {
        self.meta_bytes
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        self.dev
            .write_async(
                self.layout.table_block_offset(table, block),
                src,
                WriteMode::Normal,
            )
            .await
            .map_err(|e| {
                EngineError::cache(
                    &format!("write of metadata block {block} (table {table})"),
                    e,
                )
            })
    }

    /// Write a superblock copy and flush, on the event loop.
    pub async fn write_superblock_async(&self, sb: &Superblock) -> EngineResult<()> {
        let b = rbd_backend::aio::DmaBuf::copy_of(&sb.encode());
        self.meta_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        self.dev
            .write_async(sb.copy_offset(), b.slice_all(), WriteMode::Normal)
            .await
            .map_err(|e| EngineError::cache("superblock write", e))?;
        self.sync_async().await
    }

    /// Read bytes anywhere on the device (recovery: log records, data checks).
    pub fn read_raw(&self, off: u64, buf: &mut [u8]) -> EngineResult<()> {
        self.dev
            .read_at(off, buf)
            .map_err(|e| EngineError::cache(&format!("read at {off}"), e))
    }

    /// Write bytes anywhere on the device (formatting).
    pub fn write_raw(&self, off: u64, buf: &[u8]) -> EngineResult<()> {
        self.dev
            .write_at(off, buf)
            .map_err(|e| EngineError::cache(&format!("write at {off}"), e))
    }

    /// Device flushes and metadata bytes written so far.
    pub fn meta_io(&self) -> (u64, u64) {
        (
            self.flushes.load(Ordering::Relaxed),
            self.meta_bytes.load(Ordering::Relaxed),
        )
    }

    /// Make every completed cache write durable.
    pub fn sync(&self) -> EngineResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.dev.flush().map_err(|e| EngineError::cache("flush", e))
    }

    pub fn write_meta_block(&self, block: u32, buf: &[u8]) -> EngineResult<()> {
        debug_assert_eq!(buf.len(), META_BLOCK as usize);
        self.dev
            .write_at(self.layout.meta_block_offset(block), buf)
            .map_err(|e| EngineError::cache(&format!("write of metadata block {block}"), e))
    }

    pub fn write_superblock(&self, sb: &Superblock) -> EngineResult<()> {
        write_superblock(self.dev.as_ref(), sb)
    }
}

pub fn write_superblock(dev: &dyn BlockIo, sb: &Superblock) -> EngineResult<()> {
    dev.write_at(sb.copy_offset(), &sb.encode())
        .map_err(|e| EngineError::cache("superblock write", e))?;
    dev.flush()
        .map_err(|e| EngineError::cache("flush after superblock write", e))
}

/// Read both superblock copies and pick the newest intact one.
pub fn read_superblock(dev: &dyn BlockIo) -> EngineResult<Result<Superblock, FormatError>> {
    let mut buf = vec![0u8; 2 * SB_BYTES];
    dev.read_at(SB_COPY_OFFSETS[0], &mut buf)
        .map_err(|e| EngineError::cache("superblock read", e))?;
    let (a, b) = buf.split_at(SB_BYTES);
    Ok(Superblock::choose(a, b))
}
