//! Format v2 at attach: formatting the metadata area, and reading back the
//! checkpoint table plus the log records written after it.
//!
//! Records are read from the superblock's `log_start`, in sequence order (the
//! log wraps to its first block when a record did not fit at its end); the
//! first one missing, damaged, or of another checkpoint ends the log. The
//! records after the last completed flush may describe data that never
//! arrived (a power cut in the newest round, before its flush completed; or
//! any time after rounds for FUA writes, which flush nothing): the dirty
//! sectors they list with checksums are read back and every one that does not
//! match is dropped from its entry. Such a sector was never covered by a
//! completed flush, so dropping it is allowed; its older version, or the
//! backend, holds what was flushed before. A FUA write's own data was written
//! durable before its record, so it always matches.

use super::store::CacheStore;
use crate::error::{EngineError, EngineResult};
use crate::format::log::{Record, FLAG_DATA_DURABLE, FLAG_UNFLUSHED};
use crate::format::{EntryCodec, Layout, LineEntry, Superblock, META_BLOCK, SECTOR_SIZE};

/// What the log said, besides the entries.
#[derive(Debug, Default)]
pub(super) struct LogReplay {
    /// Sequence of the last record (or of the checkpoint when none follows).
    pub seq: u64,
    /// Next free block, and blocks used since the checkpoint.
    pub head: u32,
    pub used: u32,
    pub flushed_epoch: u64,
    pub cur_epoch: u64,
    pub order_broken_since: u64,
    /// Records applied.
    pub records: u64,
    /// The records whose data must be checked (no completed flush is known
    /// to cover it), oldest first.
    pub unconfirmed: Vec<Record>,
}

/// Write both table copies as free entries and clear the log's first block.
pub(super) fn format_v2_meta(
    store: &CacheStore,
    codec: &EntryCodec,
    layout: &Layout,
) -> EngineResult<()> {
    let free = LineEntry::default();
    let epb = layout.entries_per_block();
    let total = layout.meta_blocks() as u32;
    for table in 0..2u32 {
        let mut b = 0u32;
        while b < total {
            let n = 256u32.min(total - b);
            let mut buf = vec![0u8; (n * META_BLOCK) as usize];
            for i in 0..n * epb {
                let slot = b * epb + i;
                if (slot as u64) < layout.nr_lines {
                    let at = (i * layout.entry_size) as usize;
                    codec.encode(slot, &free, &mut buf[at..]);
                }
            }
            store.write_raw(layout.table_block_offset(table, b), &buf)?;
            b += n;
        }
    }
    // No record of an earlier format on this device can pass for ours (entries
    // are checked against this cache's uuid), but an empty log reads cleaner.
    store.write_raw(layout.log_offset(), &vec![0u8; META_BLOCK as usize])?;
    store.sync()
}

/// Read and decode every entry of table copy `table` (format v1 has one table,
/// at the offsets of copy 0). Any bad entry refuses the whole cache: a partly
/// trusted map could serve stale data or lose dirty data.
pub(super) fn load_table(
    store: &CacheStore,
    codec: &EntryCodec,
    layout: &Layout,
    table: u32,
) -> EngineResult<Vec<LineEntry>> {
    let mut out = Vec::with_capacity(layout.nr_lines as usize);
    let epb = layout.entries_per_block();
    let total = layout.meta_blocks() as u32;
    let mut b = 0u32;
    while b < total {
        let n = 256u32.min(total - b);
        let mut buf = vec![0u8; (n * META_BLOCK) as usize];
        store.read_raw(layout.table_block_offset(table, b), &mut buf)?;
        for i in 0..n * epb {
            let slot = b * epb + i;
            if slot as u64 >= layout.nr_lines {
                break;
            }
            let at = (i * layout.entry_size) as usize;
            out.push(codec.decode(slot, &buf[at..]).map_err(|e| {
                EngineError::corrupt(
                    &format!("cache metadata (table {table}) is corrupt; refusing to use it"),
                    e,
                )
            })?);
        }
        b += n;
    }
    Ok(out)
}

/// Read the record at `block` if it is the one expected.
fn read_record(
    store: &CacheStore,
    codec: &EntryCodec,
    layout: &Layout,
    block: u32,
    seq: u64,
    ckpt_seq: u64,
) -> EngineResult<Option<(Record, u32)>> {
    let log_blocks = layout.log_blocks();
    if block >= log_blocks {
        return Ok(None);
    }
    let base = layout.log_offset();
    let mut head = vec![0u8; META_BLOCK as usize];
    store.read_raw(base + block as u64 * META_BLOCK as u64, &mut head)?;
    let Some(n) = Record::peek_blocks(&head) else {
        return Ok(None);
    };
    if n > log_blocks - block {
        return Ok(None);
    }
    let mut buf = vec![0u8; n as usize * META_BLOCK as usize];
    store.read_raw(base + block as u64 * META_BLOCK as u64, &mut buf)?;
    match Record::decode(
        &buf,
        codec,
        layout.entry_size as usize,
        layout.nr_lines,
        layout.spl(),
    ) {
        Ok(r) if r.seq == seq && r.ckpt_seq == ckpt_seq => Ok(Some((r, n))),
        // Damaged (a torn last record), stale (an older round's), or another
        // checkpoint's: the log ends before it.
        _ => Ok(None),
    }
}

/// The checkpoint's entries with every record after it applied.
pub(super) fn load_v2(
    store: &CacheStore,
    codec: &EntryCodec,
    layout: &Layout,
    sb: &Superblock,
) -> EngineResult<(Vec<LineEntry>, LogReplay)> {
    let mut entries = load_table(store, codec, layout, sb.active_table)?;
    tracing::debug!(
        table = sb.active_table,
        ckpt_seq = sb.ckpt_seq,
        log_start = sb.log_start,
        flushed = sb.flushed_epoch,
        epoch = sb.epoch,
        used = ?entries.iter().enumerate().filter(|(_, e)| e.tag.is_some()).map(|(i, e)| (i, e.tag, e.epoch, e.valid[0], e.dirty[0])).collect::<Vec<_>>(),
        "log replay: checkpoint table"
    );
    let mut rep = LogReplay {
        seq: sb.ckpt_seq,
        head: sb.log_start,
        used: 0,
        flushed_epoch: sb.flushed_epoch,
        cur_epoch: sb.epoch,
        order_broken_since: sb.order_broken_since,
        ..LogReplay::default()
    };
    let log_blocks = layout.log_blocks();
    let mut pos = sb.log_start;
    // Whether the round of the record before flushed the cache device (the
    // checkpoint did): a record after it shows that the flush completed.
    let mut prev_flushed = true;
    loop {
        let want = rep.seq + 1;
        let mut found = read_record(store, codec, layout, pos, want, sb.ckpt_seq)?;
        let mut wasted = 0;
        if found.is_none() && pos != 0 {
            // A record that did not fit at the end of the log went to its start.
            found = read_record(store, codec, layout, 0, want, sb.ckpt_seq)?;
            wasted = log_blocks - pos;
            if found.is_some() {
                pos = 0;
            }
        }
        let Some((r, n)) = found else {
            tracing::debug!(pos, want, "log replay: no further record");
            break;
        };
        tracing::debug!(
            seq = r.seq,
            pos,
            blocks = n,
            flags = r.flags,
            flushed = r.flushed_epoch,
            cur = r.cur_epoch,
            entries = ?r.entries.iter().map(|e| (e.slot, e.entry.tag, e.entry.epoch, e.entry.valid[0], e.entry.dirty[0], e.fresh.len())).collect::<Vec<_>>(),
            "log replay: record"
        );
        for le in &r.entries {
            entries[le.slot as usize] = le.entry;
        }
        rep.seq = r.seq;
        rep.flushed_epoch = rep.flushed_epoch.max(r.flushed_epoch);
        rep.cur_epoch = rep.cur_epoch.max(r.cur_epoch);
        rep.order_broken_since = r.order_broken_since;
        rep.records += 1;
        rep.used += n + wasted;
        pos += n;
        rep.head = pos % log_blocks;
        // The round of this record started once the one before had ended: if
        // that one flushed, its flush completed, and so did the flush a
        // data-durable round runs before writing its record. Either covers
        // all data the records so far describe.
        if prev_flushed || r.flags & FLAG_DATA_DURABLE != 0 {
            rep.unconfirmed.clear();
        }
        prev_flushed = r.flags & FLAG_UNFLUSHED == 0;
        if r.flags & FLAG_DATA_DURABLE == 0 && r.entries.iter().any(|e| !e.fresh.is_empty()) {
            rep.unconfirmed.push(r);
        }
        if rep.used >= log_blocks {
            break;
        }
    }
    Ok((entries, rep))
}

/// Check the data of the unconfirmed records (`recs`, oldest first) against
/// their checksums and drop the sectors that do not match from their entries.
/// Each sector of a slot is checked once, against the newest checksum logged
/// for it: an older one may be of an earlier version that the slot held
/// before it was freed and reused. Returns how many were dropped.
pub(super) fn verify_unconfirmed(
    store: &CacheStore,
    layout: &Layout,
    recs: &[Record],
    entries: &mut [LineEntry],
) -> EngineResult<u64> {
    let mut dropped = 0;
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; SECTOR_SIZE as usize];
    for rec in recs.iter().rev() {
        for le in &rec.entries {
            let e = &mut entries[le.slot as usize];
            // `e` is the newest entry of the slot (the newest record naming it);
            // a shadow replaces all entries, and then nothing is checked.
            for &(s, crc) in &le.fresh {
                if !seen.insert((le.slot, s)) {
                    continue;
                }
                let (w, bit) = ((s / 64) as usize, 1u64 << (s % 64));
                if e.dirty[w] & bit == 0 {
                    continue;
                }
                let off = layout.line_offset(le.slot) + s as u64 * SECTOR_SIZE as u64;
                store.read_raw(off, &mut buf)?;
                if crc32c::crc32c(&buf) != crc {
                    tracing::debug!(
                        slot = le.slot,
                        sector = s,
                        seq = rec.seq,
                        "log replay: unconfirmed sector dropped"
                    );
                    e.valid[w] &= !bit;
                    e.dirty[w] &= !bit;
                    dropped += 1;
                }
            }
            if e.valid == [0; 4] {
                *e = LineEntry::default();
            }
        }
    }
    Ok(dropped)
}
