//! Where things are on the cache device, derived from line size and device size.

use super::{FormatError, META_BLOCK, SECTOR_SIZE};

pub const SB_COPY_OFFSETS: [u64; 2] = [0, 4096];
pub const META_OFFSET: u64 = 64 * 1024;
const DATA_ALIGN: u64 = 1024 * 1024;
pub const MIN_LINE: u32 = 4096;
pub const MAX_LINE: u32 = 1024 * 1024;
/// Fewer lines than this cannot hold a request's worth of data while others are
/// being written back.
pub const MIN_LINES: u64 = 16;

/// Which on-disk format a cache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatVersion {
    /// One table of line entries, rewritten in place at every persist (two
    /// device flushes each); one entry per line.
    V1,
    /// Two table copies written alternately at checkpoints, and a metadata log
    /// between them: a persist appends one record and costs one device flush.
    /// Several entries may name one line (copy-on-write versions).
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub line_size: u32,
    pub nr_lines: u64,
    pub entry_size: u32,
    pub meta_offset: u64,
    /// Bytes of one table of entries.
    pub meta_len: u64,
    /// Table copies: 1 (v1) or 2 (v2).
    pub tables: u32,
    /// Bytes of the metadata log (v2), after the tables; 0 in v1.
    pub log_len: u64,
    pub data_offset: u64,
}

impl Layout {
    /// Check a line size given by the operator.
    pub fn check_line_size(line_size: u32) -> Result<(), FormatError> {
        if !(MIN_LINE..=MAX_LINE).contains(&line_size) || !line_size.is_power_of_two() {
            return Err(FormatError::Field {
                field: "line size",
                problem: format!(
                    "{line_size} bytes; it must be a power of two from 4 KiB to 1 MiB"
                ),
            });
        }
        Ok(())
    }

    pub fn sectors_per_line(line_size: u32) -> u32 {
        line_size / SECTOR_SIZE
    }

    /// Entry size for a line size: a 24-byte header and two bitmaps, rounded up to
    /// a power of two so that no entry straddles a 512-byte device sector (a torn
    /// metadata write then never tears an entry).
    pub fn entry_size_for(line_size: u32) -> u32 {
        let bitmap = Self::sectors_per_line(line_size).div_ceil(8);
        (24 + 2 * bitmap).next_power_of_two().max(32)
    }

    /// The largest format-v1 layout that fits `cache_bytes`.
    pub fn for_cache(line_size: u32, cache_bytes: u64) -> Result<Self, FormatError> {
        Self::for_cache_as(FormatVersion::V1, line_size, cache_bytes)
    }

    /// The largest layout of `version` that fits `cache_bytes`.
    pub fn for_cache_as(
        version: FormatVersion,
        line_size: u32,
        cache_bytes: u64,
    ) -> Result<Self, FormatError> {
        Self::check_line_size(line_size)?;
        let entry_size = Self::entry_size_for(line_size);
        let per_line = line_size as u64;
        let (tables, log_len) = match version {
            FormatVersion::V1 => (1, 0),
            FormatVersion::V2 => (2, Self::log_len_for(cache_bytes)),
        };
        // Start from the upper bound and shrink until the metadata fits beside it.
        let mut n = cache_bytes.saturating_sub(META_OFFSET + log_len) / per_line;
        loop {
            let l = Self::with_lines(line_size, entry_size, n, tables, log_len);
            if l.data_offset + n * per_line <= cache_bytes || n == 0 {
                break;
            }
            n -= 1;
        }
        if n < MIN_LINES {
            return Err(FormatError::Field {
                field: "cache size",
                problem: format!(
                    "{cache_bytes} bytes holds only {n} lines of {line_size} bytes; at least {MIN_LINES} are needed"
                ),
            });
        }
        if n > u32::MAX as u64 {
            return Err(FormatError::Field {
                field: "cache size",
                problem: format!("{n} lines is more than this format addresses"),
            });
        }
        Ok(Self::with_lines(line_size, entry_size, n, tables, log_len))
    }

    /// The metadata log of a v2 cache: 1/32 of the cache, 256 KiB to 64 MiB. It holds
    /// the records since the last checkpoint; a checkpoint is written when half
    /// of it is in use, so a larger log means rarer checkpoints.
    fn log_len_for(cache_bytes: u64) -> u64 {
        (cache_bytes / 32).clamp(256 << 10, 64 << 20) / META_BLOCK as u64 * META_BLOCK as u64
    }

    fn with_lines(
        line_size: u32,
        entry_size: u32,
        nr_lines: u64,
        tables: u32,
        log_len: u64,
    ) -> Self {
        let per_block = (META_BLOCK / entry_size) as u64;
        let meta_len = nr_lines.div_ceil(per_block) * META_BLOCK as u64;
        let meta_end = META_OFFSET + tables as u64 * meta_len + log_len;
        let data_offset = meta_end.div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Self {
            line_size,
            nr_lines,
            entry_size,
            meta_offset: META_OFFSET,
            meta_len,
            tables,
            log_len,
            data_offset,
        }
    }

    pub fn version(&self) -> FormatVersion {
        if self.tables == 2 {
            FormatVersion::V2
        } else {
            FormatVersion::V1
        }
    }

    /// Offset of metadata block `block` of table copy `table`.
    pub fn table_block_offset(&self, table: u32, block: u32) -> u64 {
        self.meta_offset + table as u64 * self.meta_len + block as u64 * META_BLOCK as u64
    }

    /// Where the metadata log starts, and its length in 4 KiB blocks.
    pub fn log_offset(&self) -> u64 {
        self.meta_offset + self.tables as u64 * self.meta_len
    }

    pub fn log_blocks(&self) -> u32 {
        (self.log_len / META_BLOCK as u64) as u32
    }

    pub fn entries_per_block(&self) -> u32 {
        META_BLOCK / self.entry_size
    }

    pub fn meta_blocks(&self) -> u64 {
        self.meta_len / META_BLOCK as u64
    }

    pub fn meta_block_of(&self, slot: u32) -> u32 {
        slot / self.entries_per_block()
    }

    pub fn meta_block_offset(&self, block: u32) -> u64 {
        self.meta_offset + block as u64 * META_BLOCK as u64
    }

    pub fn line_offset(&self, slot: u32) -> u64 {
        self.data_offset + slot as u64 * self.line_size as u64
    }

    pub fn spl(&self) -> u32 {
        Self::sectors_per_line(self.line_size)
    }

    /// Bytes of the cache device that the layout uses.
    pub fn used_bytes(&self) -> u64 {
        self.data_offset + self.nr_lines * self.line_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_never_straddle_a_512_byte_sector() {
        let mut ls = MIN_LINE;
        while ls <= MAX_LINE {
            let e = Layout::entry_size_for(ls);
            assert!(e.is_power_of_two() && e <= 512, "line {ls} entry {e}");
            let bitmap = Layout::sectors_per_line(ls).div_ceil(8);
            assert!(24 + 2 * bitmap <= e);
            ls *= 2;
        }
    }

    #[test]
    fn layout_fits_and_is_maximal() {
        for &(ls, size) in &[
            (65536u32, 512u64 << 20),
            (4096, 8 << 20),
            (1 << 20, 64 << 20),
        ] {
            let l = Layout::for_cache(ls, size).unwrap();
            assert!(l.used_bytes() <= size);
            assert!(l.data_offset >= l.meta_offset + l.meta_len);
            assert!(l.meta_blocks() * l.entries_per_block() as u64 >= l.nr_lines);
            let bigger = Layout::with_lines(ls, l.entry_size, l.nr_lines + 1, 1, 0);
            assert!(bigger.used_bytes() > size, "not maximal for {ls}/{size}");
            let v2 = Layout::for_cache_as(FormatVersion::V2, ls, size).unwrap();
            assert!(v2.used_bytes() <= size);
            assert!(v2.log_offset() >= v2.meta_offset + 2 * v2.meta_len);
            assert!(v2.data_offset >= v2.log_offset() + v2.log_len);
            assert!(v2.log_blocks() >= 64);
            assert_eq!(v2.version(), FormatVersion::V2);
        }
    }

    #[test]
    fn refuses_bad_line_sizes_and_tiny_caches() {
        assert!(Layout::check_line_size(3000).is_err());
        assert!(Layout::check_line_size(2048).is_err());
        assert!(Layout::check_line_size(2 << 20).is_err());
        let err = Layout::for_cache(65536, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("cache size"), "{err}");
    }
}
