//! The boot-trace file (v1, little-endian): a 4 KiB header, then the extents.
//!
//! ```text
//! header (4096 bytes; crc32c of bytes 0..4092 at 4092):
//!   magic "UBCBOOT\0" | version u16 = 1 | flags u16 = 0 | sector_shift u8 = 9 | 0 [3]
//!   disk_size u64 | key_len u16 | key [256] | boots u16 | window_ms u32
//!   created_s u64 | updated_s u64 | n_extents u32 | body_crc32c u32
//! body: n_extents x 24 bytes, sorted by t_ms:
//!   sector u64 | sectors u32 | t_ms u32 | seen u8 | flags u8 | 0 [6]
//! ```
//! `seen`: bit i = read in the i-th most recent recorded boot. A file that
//! fails any check is never trusted (the caller ignores it and says why).

use super::BootTraceError;

const MAGIC: &[u8; 8] = b"UBCBOOT\0";
const VERSION: u16 = 1;
const SECTOR_SHIFT: u8 = 9;
pub const HEADER: usize = 4096;
const HEADER_CRC_AT: usize = 4092;
const KEY_MAX: usize = 256;
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
    pub created_s: u64,
    pub updated_s: u64,
    /// Sorted by `t_ms`, not overlapping.
    pub extents: Vec<Extent>,
}

impl BootTrace {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER + self.extents.len() * EXTENT];
        let (head, body) = out.split_at_mut(HEADER);
        for (i, e) in self.extents.iter().enumerate() {
            let b = &mut body[i * EXTENT..(i + 1) * EXTENT];
            b[0..8].copy_from_slice(&e.sector.to_le_bytes());
            b[8..12].copy_from_slice(&e.sectors.to_le_bytes());
            b[12..16].copy_from_slice(&e.t_ms.to_le_bytes());
            b[16] = e.seen;
            b[17] = e.flags;
        }
        let body_crc = crc32c::crc32c(body);
        let key = self.key.as_bytes();
        let key = &key[..key.len().min(KEY_MAX)];
        head[0..8].copy_from_slice(MAGIC);
        head[8..10].copy_from_slice(&VERSION.to_le_bytes());
        head[12] = SECTOR_SHIFT;
        head[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        head[24..26].copy_from_slice(&(key.len() as u16).to_le_bytes());
        head[26..26 + key.len()].copy_from_slice(key);
        let at = 26 + KEY_MAX;
        head[at..at + 2].copy_from_slice(&self.boots.to_le_bytes());
        head[at + 2..at + 6].copy_from_slice(&self.window_ms.to_le_bytes());
        head[at + 6..at + 14].copy_from_slice(&self.created_s.to_le_bytes());
        head[at + 14..at + 22].copy_from_slice(&self.updated_s.to_le_bytes());
        head[at + 22..at + 26].copy_from_slice(&(self.extents.len() as u32).to_le_bytes());
        head[at + 26..at + 30].copy_from_slice(&body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&head[..HEADER_CRC_AT]);
        head[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a whole file. Refused: a damaged or truncated file, another
    /// version, or one whose extents are out of order, overlap or lie past
    /// `disk_size`.
    pub fn decode(buf: &[u8]) -> Result<BootTrace, BootTraceError> {
        let bad = |problem: &str| BootTraceError::Corrupt(problem.to_string());
        if buf.len() < HEADER {
            return Err(bad("shorter than its header"));
        }
        let (head, body) = buf.split_at(HEADER);
        if &head[0..8] != MAGIC {
            return Err(bad("no boot-trace magic"));
        }
        let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        if u32_at(head, HEADER_CRC_AT) != crc32c::crc32c(&head[..HEADER_CRC_AT]) {
            return Err(bad("header checksum mismatch"));
        }
        let version = u16_at(8);
        if version != VERSION {
            return Err(BootTraceError::Corrupt(format!(
                "version {version}; this build reads version {VERSION}"
            )));
        }
        if head[12] != SECTOR_SHIFT {
            return Err(bad("sector size is not 512 bytes"));
        }
        let key_len = u16_at(24) as usize;
        if key_len > KEY_MAX {
            return Err(bad("key longer than 256 bytes"));
        }
        let key = std::str::from_utf8(&head[26..26 + key_len])
            .map_err(|_| bad("key is not UTF-8"))?
            .to_string();
        let at = 26 + KEY_MAX;
        let n = u32_at(head, at + 22);
        if n > MAX_EXTENTS || body.len() != n as usize * EXTENT {
            return Err(BootTraceError::Corrupt(format!(
                "says {n} extents, holds {} bytes of them",
                body.len()
            )));
        }
        if u32_at(head, at + 26) != crc32c::crc32c(body) {
            return Err(bad("extent checksum mismatch"));
        }
        let disk_size = u64_at(head, 16);
        let extents: Vec<Extent> = body
            .chunks_exact(EXTENT)
            .map(|b| Extent {
                sector: u64_at(b, 0),
                sectors: u32_at(b, 8),
                t_ms: u32_at(b, 12),
                seen: b[16],
                flags: b[17],
            })
            .collect();
        check_extents(&extents, disk_size).map_err(BootTraceError::Corrupt)?;
        Ok(BootTrace {
            key,
            disk_size,
            boots: u16_at(at),
            window_ms: u32_at(head, at + 2),
            created_s: u64_at(head, at + 6),
            updated_s: u64_at(head, at + 14),
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
