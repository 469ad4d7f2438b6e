//! Records of the format-v2 metadata log.
//!
//! A persist appends one record: the line entries that changed since the
//! previous one, the write-back watermark, and for the dirty sectors written
//! since each entry was last logged a crc32c of their data. The record and the
//! data it describes reach the device under one flush, so a power cut can leave
//! a record whose data did not (all) arrive: recovery checks the data of the
//! last intact record against its checksums and drops what does not match (it
//! was never covered by a completed flush). Every earlier record is confirmed by
//! the one after it: rounds are sequential, each starting after the previous
//! one's flush completed. A round for a FUA write flushes nothing
//! ([`FLAG_UNFLUSHED`]): it writes the FUA data and then its record, each
//! durable on its own, so the other data such a record describes is covered
//! only by the flush of a later round, and recovery checks every record
//! since the last completed flush.
//!
//! ```text
//! header (64 bytes): magic | flags | seq | ckpt_seq | blocks | entries |
//!                    flushed_epoch | cur_epoch | order_broken_since | crc | 0…
//! entries:           slot u32 | fresh u16 | 0 u16 | entry (entry_size) | fresh × (sector u16, crc u32)
//! ```
//! The record is padded to whole 4 KiB blocks; its crc32c covers all of it
//! (with the crc field zero). `seq` numbers are consecutive across the log;
//! `ckpt_seq` ties the record to the checkpoint it follows.

use super::codec::{Decoder, Encoder};
use super::entry::{EntryCodec, LineEntry};
use super::{FormatError, META_BLOCK};

pub const LOG_MAGIC: u32 = 0x554c_4f47; // "ULOG"
const HEADER: usize = 64;
const CRC_AT: usize = 56;

/// The data the record describes was made durable before the record was
/// written (a two-flush round): nothing needs checking at recovery.
pub const FLAG_DATA_DURABLE: u32 = 1;
/// The round flushed nothing: the record was written durable on its own
/// (FUA), after the FUA write it is for. The data of the other writes it
/// describes is durable only once a later round's flush completes (the
/// round after that one shows it did), so until then recovery checks it.
/// Only with `superblock::INCOMPAT_UNFLUSHED_RECORDS` set.
pub const FLAG_UNFLUSHED: u32 = 2;

/// One entry of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub slot: u32,
    pub entry: LineEntry,
    /// (4 KiB sector within the line, crc32c of its data) for dirty sectors
    /// written since the entry was last logged.
    pub fresh: Vec<(u16, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub flags: u32,
    pub seq: u64,
    pub ckpt_seq: u64,
    pub flushed_epoch: u64,
    pub cur_epoch: u64,
    pub order_broken_since: u64,
    pub entries: Vec<LogEntry>,
}

impl Record {
    /// Bytes the record takes, in whole blocks.
    pub fn encoded_len(&self, entry_size: usize) -> usize {
        let body: usize = self
            .entries
            .iter()
            .map(|e| 8 + entry_size + 6 * e.fresh.len())
            .sum();
        (HEADER + body).div_ceil(META_BLOCK as usize) * META_BLOCK as usize
    }

    pub fn encode(&self, codec: &EntryCodec, entry_size: usize) -> Vec<u8> {
        let mut buf = vec![0u8; self.encoded_len(entry_size)];
        let blocks = (buf.len() / META_BLOCK as usize) as u32;
        {
            let mut e = Encoder::new(&mut buf);
            e.u32(LOG_MAGIC);
            e.u32(self.flags);
            e.u64(self.seq);
            e.u64(self.ckpt_seq);
            e.u32(blocks);
            e.u32(self.entries.len() as u32);
            e.u64(self.flushed_epoch);
            e.u64(self.cur_epoch);
            e.u64(self.order_broken_since);
        }
        let mut at = HEADER;
        for le in &self.entries {
            let mut e = Encoder::new(&mut buf[at..]);
            e.u32(le.slot);
            e.u16(le.fresh.len() as u16);
            e.u16(0);
            at += 8;
            codec.encode(le.slot, &le.entry, &mut buf[at..at + entry_size]);
            at += entry_size;
            let mut e = Encoder::new(&mut buf[at..]);
            for &(s, c) in &le.fresh {
                e.u16(s);
                e.u32(c);
            }
            at += 6 * le.fresh.len();
        }
        let crc = crc32c::crc32c(&buf);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Blocks the record at the start of `head` takes, if it looks like a
    /// record at all (magic and a plausible length); its integrity is checked by
    /// [`Record::decode`] on the whole record.
    pub fn peek_blocks(head: &[u8]) -> Option<u32> {
        let mut d = Decoder::new(head);
        if d.u32().ok()? != LOG_MAGIC {
            return None;
        }
        let mut d = Decoder::new(head.get(24..)?);
        let blocks = d.u32().ok()?;
        (blocks > 0).then_some(blocks)
    }

    /// Decode a whole record (`buf` is exactly its blocks). Every entry is
    /// checked by its own checksum too, against the slot it names.
    pub fn decode(
        buf: &[u8],
        codec: &EntryCodec,
        entry_size: usize,
        nr_slots: u64,
        spl: u32,
    ) -> Result<Record, FormatError> {
        if buf.len() < HEADER || !buf.len().is_multiple_of(META_BLOCK as usize) {
            return Err(FormatError::Truncated);
        }
        let mut tmp = buf.to_vec();
        tmp[CRC_AT..CRC_AT + 4].fill(0);
        let stored = u32::from_le_bytes(buf[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        if crc32c::crc32c(&tmp) != stored {
            return Err(FormatError::Checksum {
                what: "log record".into(),
            });
        }
        let mut d = Decoder::new(buf);
        if d.u32()? != LOG_MAGIC {
            return Err(FormatError::NoMagic);
        }
        let flags = d.u32()?;
        let seq = d.u64()?;
        let ckpt_seq = d.u64()?;
        let blocks = d.u32()?;
        let n = d.u32()?;
        let flushed_epoch = d.u64()?;
        let cur_epoch = d.u64()?;
        let order_broken_since = d.u64()?;
        let bad = |problem: String| FormatError::Field {
            field: "log record",
            problem,
        };
        if blocks as usize * META_BLOCK as usize != buf.len() {
            return Err(bad(format!(
                "says {blocks} blocks, holds {}",
                buf.len() / META_BLOCK as usize
            )));
        }
        if flags & !(FLAG_DATA_DURABLE | FLAG_UNFLUSHED) != 0
            || flags == FLAG_DATA_DURABLE | FLAG_UNFLUSHED
        {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let mut entries = Vec::with_capacity((n as usize).min(1 << 20));
        let mut at = HEADER;
        for _ in 0..n {
            let mut d = Decoder::new(buf.get(at..).ok_or(FormatError::Truncated)?);
            let slot = d.u32()?;
            let nfresh = d.u16()? as usize;
            at += 8;
            if slot as u64 >= nr_slots {
                return Err(bad(format!(
                    "entry for slot {slot}, past the {nr_slots} slots"
                )));
            }
            let ebytes = buf.get(at..at + entry_size).ok_or(FormatError::Truncated)?;
            let entry = codec.decode(slot, ebytes)?;
            at += entry_size;
            let mut d = Decoder::new(buf.get(at..at + 6 * nfresh).ok_or(FormatError::Truncated)?);
            let mut fresh = Vec::with_capacity(nfresh);
            for _ in 0..nfresh {
                let s = d.u16()?;
                let c = d.u32()?;
                if u32::from(s) >= spl {
                    return Err(bad(format!("slot {slot}: sector {s} past the line")));
                }
                fresh.push((s, c));
            }
            at += 6 * nfresh;
            entries.push(LogEntry { slot, entry, fresh });
        }
        Ok(Record {
            flags,
            seq,
            ckpt_seq,
            flushed_epoch,
            cur_epoch,
            order_broken_since,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Layout;
    use proptest::prelude::*;

    fn codec() -> EntryCodec {
        EntryCodec::new(Layout::entry_size_for(65536), 16, &[5; 16])
    }

    fn sample(n: usize) -> Record {
        Record {
            flags: FLAG_DATA_DURABLE,
            seq: 9,
            ckpt_seq: 3,
            flushed_epoch: 4,
            cur_epoch: 7,
            order_broken_since: 0,
            entries: (0..n)
                .map(|i| LogEntry {
                    slot: i as u32 * 3,
                    entry: LineEntry {
                        tag: Some(100 + i as u64),
                        epoch: 6,
                        valid: [0xff, 0, 0, 0],
                        dirty: [0x0f, 0, 0, 0],
                    },
                    fresh: vec![(1, 0xdead_beef), (3, i as u32)],
                })
                .collect(),
        }
    }

    #[test]
    fn records_round_trip_across_blocks() {
        let c = codec();
        for n in [0usize, 1, 40, 300] {
            let r = sample(n);
            let b = r.encode(&c, 32);
            assert_eq!(b.len() % 4096, 0);
            assert_eq!(Record::peek_blocks(&b), Some((b.len() / 4096) as u32));
            assert_eq!(Record::decode(&b, &c, 32, 1 << 20, 16).unwrap(), r);
        }
    }

    #[test]
    fn zeroed_or_foreign_blocks_are_no_record() {
        assert_eq!(Record::peek_blocks(&[0u8; 4096]), None);
        let c = codec();
        let b = sample(2).encode(&c, 32);
        let other = EntryCodec::new(32, 16, &[6; 16]);
        assert!(
            Record::decode(&b, &other, 32, 1 << 20, 16).is_err(),
            "entries of another cache"
        );
        assert!(
            Record::decode(&b, &c, 32, 3, 16).is_err(),
            "slot past the table"
        );
    }

    proptest! {
        #[test]
        fn any_damage_is_refused(n in 0usize..60, flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4)) {
            let c = codec();
            let r = sample(n);
            let mut b = r.encode(&c, 32);
            for (i, x) in flips {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            if let Ok(got) = Record::decode(&b, &c, 32, 1 << 20, 16) {
                prop_assert_eq!(got, r, "damage accepted as a different record");
            }
        }
    }
}
