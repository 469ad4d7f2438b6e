//! The boot-trace file (v1, little-endian): a 4 KiB header, then the extents.
//!
//! ```text
//! header (4096 bytes; crc32c of bytes 0..4092 at 4092):
//!   magic "UBCBOOT\0" | version u16 = 1 | flags u16 = 0 | sector_shift u8 = 9 | 0 [3]
//!   disk_size u64 | key_len u16 | key [256] | boots u16 | window_ms u32
//!   created_s u64 | updated_s u64 | n_extents u32 | body_crc32c u32
//!   poor_boots u8 (0 in files from before it: the same as "none")
//! body: n_extents x 24 bytes, sorted by t_ms:
//!   sector u64 | sectors u32 | t_ms u32 | seen u8 | flags u8 | 0 [6]
//! ```
//! `seen`: bit i = read in the i-th most recent recorded boot. A file that
//! fails any check is never trusted (the caller ignores it and says why).

use super::BootTraceError;
use crate::format::codec::{Decoder, Encoder};
use crate::format::FormatError;

const MAGIC: &[u8; 8] = b"UBCBOOT\0";
const VERSION: u16 = 1;
const SECTOR_SHIFT: u8 = 9;
pub const HEADER: usize = 4096;
const HEADER_CRC_AT: usize = 4092;
/// The longest key (bytes); its field is a u16 length and this many bytes.
pub const KEY_MAX: usize = 256;
const KEY_FIELD: usize = KEY_MAX + 2;
const EXTENT: usize = 24;
/// More extents than any disk's boot could give (a corrupt count is refused
/// before anything is allocated for it).
const MAX_EXTENTS: u32 = 1 << 24;
/// The longest extent a merge makes; a longer one is not of this format.
pub const MAX_EXTENT_BYTES: u64 = 4 << 20;

/// One extent of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First 512-byte sector.
    pub sector: u64,
    pub sectors: u32,
    /// First read, in ms after the guest's first request (smoothed over the
    /// boots that read it; see `merge`).
    pub t_ms: u32,
    /// Bit i: read in the i-th most recent boot.
    pub seen: u8,
    pub flags: u8,
}

impl Extent {
    /// Saturating: a decoded extent is checked to lie inside its disk.
    pub fn offset(&self) -> u64 {
        self.sector.saturating_mul(1 << SECTOR_SHIFT)
    }

    pub fn len(&self) -> u64 {
        (self.sectors as u64) << SECTOR_SHIFT
    }

    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }
}

/// A whole trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTrace {
    pub key: String,
    pub disk_size: u64,
    /// Boots merged into it (saturating).
    pub boots: u16,
    /// The recording window of the last boot.
    pub window_ms: u32,
    /// Replays in a row whose prefetch was mostly wasted (the quality gate,
    /// `replay::judge`).
    pub poor_boots: u8,
    pub created_s: u64,
    pub updated_s: u64,
    /// Sorted by `t_ms`, not overlapping.
    pub extents: Vec<Extent>,
}

impl BootTrace {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER + self.extents.len() * EXTENT];
        let (head, body) = out.split_at_mut(HEADER);
        for (e, b) in self.extents.iter().zip(body.chunks_exact_mut(EXTENT)) {
            let mut w = Encoder::new(b);
            w.u64(e.sector);
            w.u32(e.sectors);
            w.u32(e.t_ms);
            w.bytes(&[e.seen, e.flags]);
        }
        let body_crc = crc32c::crc32c(body);
        let mut w = Encoder::new(head);
        w.bytes(MAGIC);
        w.u16(VERSION);
        w.u16(0);
        w.bytes(&[SECTOR_SHIFT, 0, 0, 0]);
        w.u64(self.disk_size);
        w.fixed_str(&self.key, KEY_FIELD);
        w.u16(self.boots);
        w.u32(self.window_ms);
        w.u64(self.created_s);
        w.u64(self.updated_s);
        w.u32(self.extents.len() as u32);
        w.u32(body_crc);
        w.bytes(&[self.poor_boots]);
        let crc = crc32c::crc32c(&head[..HEADER_CRC_AT]);
        head[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a whole file. Refused: a damaged or truncated file, another
    /// version, or one whose extents are out of order, overlap or lie past
    /// `disk_size`.
    pub fn decode(buf: &[u8]) -> Result<BootTrace, BootTraceError> {
        let bad = |problem: &str| BootTraceError::Corrupt(problem.to_string());
        let field = |e: FormatError| BootTraceError::Corrupt(e.to_string());
        if buf.len() < HEADER {
            return Err(bad("shorter than its header"));
        }
        let (head, body) = buf.split_at(HEADER);
        let stored_crc = Decoder::new(&head[HEADER_CRC_AT..]).u32().map_err(field)?;
        let mut r = Decoder::new(head);
        if r.bytes(MAGIC.len()).map_err(field)? != MAGIC {
            return Err(bad("no boot-trace magic"));
        }
        if stored_crc != crc32c::crc32c(&head[..HEADER_CRC_AT]) {
            return Err(bad("header checksum mismatch"));
        }
        let version = r.u16().map_err(field)?;
        if version != VERSION {
            return Err(BootTraceError::Corrupt(format!(
                "version {version}; this build reads version {VERSION}"
            )));
        }
        let _flags = r.u16().map_err(field)?;
        if r.bytes(4).map_err(field)?[0] != SECTOR_SHIFT {
            return Err(bad("sector size is not 512 bytes"));
        }
        let disk_size = r.u64().map_err(field)?;
        let key = r.fixed_str(KEY_FIELD, "boot trace key").map_err(field)?;
        let boots = r.u16().map_err(field)?;
        let window_ms = r.u32().map_err(field)?;
        let created_s = r.u64().map_err(field)?;
        let updated_s = r.u64().map_err(field)?;
        let n = r.u32().map_err(field)?;
        let body_crc = r.u32().map_err(field)?;
        let poor_boots = r.bytes(1).map_err(field)?[0];
        if n > MAX_EXTENTS || body.len() != n as usize * EXTENT {
            return Err(BootTraceError::Corrupt(format!(
                "says {n} extents, holds {} bytes of them",
                body.len()
            )));
        }
        if body_crc != crc32c::crc32c(body) {
            return Err(bad("extent checksum mismatch"));
        }
        let extents = body
            .chunks_exact(EXTENT)
            .map(|b| {
                let mut r = Decoder::new(b);
                let (sector, sectors, t_ms) = (r.u64()?, r.u32()?, r.u32()?);
                let sf = r.bytes(2)?;
                Ok(Extent {
                    sector,
                    sectors,
                    t_ms,
                    seen: sf[0],
                    flags: sf[1],
                })
            })
            .collect::<Result<Vec<Extent>, FormatError>>()
            .map_err(field)?;
        check_extents(&extents, disk_size).map_err(BootTraceError::Corrupt)?;
        Ok(BootTrace {
            key,
            disk_size,
            boots,
            window_ms,
            poor_boots,
            created_s,
            updated_s,
            extents,
        })
    }
}

/// The invariants of a trace's extents: sorted by time, none empty, none
/// overlapping another, all inside the disk.
pub fn check_extents(extents: &[Extent], disk_size: u64) -> Result<(), String> {
    if extents.windows(2).any(|w| w[0].t_ms > w[1].t_ms) {
        return Err("extents not sorted by time".into());
    }
    let mut by_pos: Vec<&Extent> = extents.iter().collect();
    by_pos.sort_by_key(|e| e.sector);
    for e in &by_pos {
        if e.is_empty()
            || e.len() > MAX_EXTENT_BYTES
            || e.offset().saturating_add(e.len()) > disk_size
        {
            return Err(format!(
                "extent {}+{} is empty, longer than {MAX_EXTENT_BYTES} bytes or past the disk's {disk_size} bytes",
                e.offset(),
                e.len()
            ));
        }
    }
    if by_pos
        .windows(2)
        .any(|w| w[0].sector + w[0].sectors as u64 > w[1].sector)
    {
        return Err("extents overlap".into());
    }
    Ok(())
}
