//! One line entry: which backend line a cache slot holds, which 4 KiB sectors of
//! it are valid and which are dirty, and the write-back epoch of the dirty ones.
//!
//! ```text
//! 0      8       16      20     24          24+B        24+2B .. entry_size
//! | tag+1 | epoch | flags | crc | valid bits | dirty bits | zero padding |
//! ```
//! `tag+1 == 0` marks a free slot. The checksum is seeded with the cache's uuid
//! and the slot number, so an entry written to the wrong slot, or left over from
//! an earlier format of the same device, is detected.

use super::codec::{Decoder, Encoder};
use super::FormatError;

/// Per-line sector bitmap; 4 words cover the 256 sectors of a 1 MiB line.
pub type SectorBits = [u64; 4];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineEntry {
    /// Backend line index, or `None` for a free slot.
    pub tag: Option<u64>,
    pub epoch: u64,
    pub valid: SectorBits,
    pub dirty: SectorBits,
}

#[derive(Debug, Clone, Copy)]
pub struct EntryCodec {
    entry_size: usize,
    spl: u32,
    seed: u32,
}

impl EntryCodec {
    pub fn new(entry_size: u32, sectors_per_line: u32, uuid: &[u8; 16]) -> Self {
        Self {
            entry_size: entry_size as usize,
            spl: sectors_per_line,
            seed: crc32c::crc32c(uuid),
        }
    }

    fn bitmap_bytes(&self) -> usize {
        self.spl.div_ceil(8) as usize
    }

    fn crc(&self, slot: u32, bytes: &[u8]) -> u32 {
        let c = crc32c::crc32c_append(self.seed, &slot.to_le_bytes());
        let c = crc32c::crc32c_append(c, &bytes[..20]);
        crc32c::crc32c_append(c, &bytes[24..])
    }

    pub fn encode(&self, slot: u32, e: &LineEntry, out: &mut [u8]) {
        let out = &mut out[..self.entry_size];
        out.fill(0);
        let n = self.bitmap_bytes();
        let mut enc = Encoder::new(out);
        enc.u64(e.tag.map_or(0, |t| t + 1));
        enc.u64(e.epoch);
        enc.u32(0);
        enc.u32(0);
        enc.bytes(&bits_to_bytes(&e.valid)[..n]);
        enc.bytes(&bits_to_bytes(&e.dirty)[..n]);
        let crc = self.crc(slot, out);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(&self, slot: u32, buf: &[u8]) -> Result<LineEntry, FormatError> {
        let buf = buf.get(..self.entry_size).ok_or(FormatError::Truncated)?;
        let mut d = Decoder::new(buf);
        let tag1 = d.u64()?;
        let epoch = d.u64()?;
        let flags = d.u32()?;
        let stored = d.u32()?;
        if self.crc(slot, buf) != stored {
            return Err(FormatError::Checksum {
                what: format!("line entry {slot}"),
            });
        }
        let n = self.bitmap_bytes();
        let valid = bytes_to_bits(d.bytes(n)?);
        let dirty = bytes_to_bits(d.bytes(n)?);
        let bad = |problem: String| FormatError::Field {
            field: "line entry",
            problem: format!("slot {slot}: {problem}"),
        };
        if flags != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        if buf[24 + 2 * n..].iter().any(|&b| b != 0) {
            return Err(bad("non-zero padding".into()));
        }
        let mask = line_mask(self.spl);
        if (0..4).any(|w| valid[w] & !mask[w] != 0 || dirty[w] & !valid[w] != 0) {
            return Err(bad(
                "dirty sectors that are not valid, or bits past the line".into(),
            ));
        }
        let tag = tag1.checked_sub(1);
        if tag.is_none() && (epoch != 0 || valid != [0; 4]) {
            return Err(bad("a free slot with sector bits".into()));
        }
        Ok(LineEntry {
            tag,
            epoch,
            valid,
            dirty,
        })
    }
}

/// Bits for every sector of a line of `spl` sectors.
pub fn line_mask(spl: u32) -> SectorBits {
    let mut m = [0u64; 4];
    for (w, word) in m.iter_mut().enumerate() {
        let lo = w as u32 * 64;
        if spl >= lo + 64 {
            *word = u64::MAX;
        } else if spl > lo {
            *word = (1u64 << (spl - lo)) - 1;
        }
    }
    m
}

fn bits_to_bytes(b: &SectorBits) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in b.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn bytes_to_bits(b: &[u8]) -> SectorBits {
    let mut full = [0u8; 32];
    full[..b.len()].copy_from_slice(b);
    let mut out = [0u64; 4];
    for (i, w) in out.iter_mut().enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(&full[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Layout;
    use proptest::prelude::*;

    fn codec(line: u32) -> EntryCodec {
        EntryCodec::new(Layout::entry_size_for(line), line / 4096, &[3; 16])
    }

    #[test]
    fn round_trips_free_and_mapped() {
        let c = codec(65536);
        let mut buf = [0u8; 32];
        for e in [
            LineEntry::default(),
            LineEntry {
                tag: Some(77),
                epoch: 5,
                valid: [0xffff, 0, 0, 0],
                dirty: [0x00f0, 0, 0, 0],
            },
        ] {
            c.encode(11, &e, &mut buf);
            assert_eq!(c.decode(11, &buf).unwrap(), e);
            assert!(c.decode(12, &buf).is_err(), "misdirected entry accepted");
        }
    }

    #[test]
    fn all_zero_bytes_are_not_a_free_entry() {
        // A zeroed metadata block (lost write, wrong device) must not read as
        // "all free": that would silently drop dirty data.
        assert!(codec(65536).decode(0, &[0u8; 32]).is_err());
    }

    #[test]
    fn rejects_dirty_without_valid_and_bits_past_the_line() {
        let c = codec(65536);
        let mut buf = [0u8; 32];
        c.encode(
            1,
            &LineEntry {
                tag: Some(1),
                epoch: 0,
                valid: [1, 0, 0, 0],
                dirty: [2, 0, 0, 0],
            },
            &mut buf,
        );
        assert!(c.decode(1, &buf).is_err());
        // A 4 KiB line has one sector, but its bitmap byte has room for eight.
        let c = codec(4096);
        c.encode(
            1,
            &LineEntry {
                tag: Some(1),
                epoch: 0,
                valid: [0b100, 0, 0, 0],
                dirty: [0; 4],
            },
            &mut buf,
        );
        assert!(c.decode(1, &buf).is_err());
    }

    proptest! {
        #[test]
        fn mutated_entries_decode_or_refuse_without_panic(
            line_shift in 12u32..=20,
            slot in 0u32..1000,
            tag in proptest::option::of(0u64..1 << 40),
            valid in any::<[u64; 4]>(),
            flips in proptest::collection::vec((0usize..128, any::<u8>()), 0..6),
        ) {
            let line = 1u32 << line_shift;
            let c = codec(line);
            let mask = line_mask(line / 4096);
            let v: SectorBits = std::array::from_fn(|i| if tag.is_some() { valid[i] & mask[i] } else { 0 });
            let d: SectorBits = std::array::from_fn(|i| v[i] & 0x5555_5555_5555_5555);
            let e = LineEntry { tag, epoch: if tag.is_some() { 9 } else { 0 }, valid: v, dirty: d };
            let size = Layout::entry_size_for(line) as usize;
            let mut buf = vec![0u8; size];
            c.encode(slot, &e, &mut buf);
            prop_assert_eq!(c.decode(slot, &buf).unwrap(), e);
            let mut changed = false;
            for (i, x) in &flips {
                let i = i % size;
                if *x != 0 { buf[i] ^= x; changed = true; }
            }
            let r = c.decode(slot, &buf);
            if changed {
                // crc32c detects every burst this short, so a mutation is refused
                // unless the flips cancelled out.
                prop_assert!(r.is_err() || r.unwrap() == e);
            }
        }
    }
}
