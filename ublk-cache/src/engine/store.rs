//! Cache device I/O in terms of the layout: line data by slot and sector, metadata
//! blocks, superblock copies. Knows offsets, not policy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rbd_backend::Backend;

use crate::error::{EngineError, EngineResult};
use crate::format::layout::SB_COPY_OFFSETS;
use crate::format::superblock::SB_BYTES;
use crate::format::{FormatError, Layout, Superblock, META_BLOCK};

pub struct CacheStore {
    dev: Arc<dyn Backend>,
    layout: Layout,
    /// Line data bytes read from / written to the cache device (for stats).
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
}

impl CacheStore {
    pub fn new(dev: Arc<dyn Backend>, layout: Layout) -> Self {
        Self {
            dev,
            layout,
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
        }
    }

    /// Line data bytes read and written so far.
    pub fn io_bytes(&self) -> (u64, u64) {
        (
            self.read_bytes.load(Ordering::Relaxed),
            self.write_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
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

    /// Make every completed cache write durable.
    pub fn sync(&self) -> EngineResult<()> {
        self.dev.flush().map_err(|e| EngineError::cache("flush", e))
    }

    pub fn write_meta_block(&self, block: u32, buf: &[u8]) -> EngineResult<()> {
        debug_assert_eq!(buf.len(), META_BLOCK as usize);
        self.dev
            .write_at(self.layout.meta_block_offset(block), buf)
            .map_err(|e| EngineError::cache(&format!("write of metadata block {block}"), e))
    }

    /// Read `count` metadata blocks starting at `first` into one buffer.
    pub fn read_meta_blocks(&self, first: u32, count: u32) -> EngineResult<Vec<u8>> {
        let mut buf = vec![0u8; count as usize * META_BLOCK as usize];
        self.dev
            .read_at(self.layout.meta_block_offset(first), &mut buf)
            .map_err(|e| EngineError::cache("read of metadata", e))?;
        Ok(buf)
    }

    pub fn write_superblock(&self, sb: &Superblock) -> EngineResult<()> {
        write_superblock(self.dev.as_ref(), sb)
    }
}

pub fn write_superblock(dev: &dyn Backend, sb: &Superblock) -> EngineResult<()> {
    dev.write_at(sb.copy_offset(), &sb.encode())
        .map_err(|e| EngineError::cache("superblock write", e))?;
    dev.flush()
        .map_err(|e| EngineError::cache("flush after superblock write", e))
}

/// Read both superblock copies and pick the newest intact one.
pub fn read_superblock(dev: &dyn Backend) -> EngineResult<Result<Superblock, FormatError>> {
    let mut buf = vec![0u8; 2 * SB_BYTES];
    dev.read_at(SB_COPY_OFFSETS[0], &mut buf)
        .map_err(|e| EngineError::cache("superblock read", e))?;
    let (a, b) = buf.split_at(SB_BYTES);
    Ok(Superblock::choose(a, b))
}
