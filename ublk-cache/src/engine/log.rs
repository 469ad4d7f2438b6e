//! Format-v2 persist rounds: one log record per round, under one device flush;
//! a checkpoint into the other table copy when the log is half full.
//!
//! A record carries every entry that changed since the last one, the crc32c of
//! the dirty sectors written since each was last logged, the free entries of
//! released slots and the write-back watermark. Its data and the record reach
//! the device under the same flush, which is safe because (see
//! `format::log`) recovery checks the last record's data against those
//! checksums, and because no sector that a record described is ever written
//! again in place while that record can be the last one: a version is written
//! only while its epoch is open, and every round closes the epochs it logs
//! (a guest FLUSH or FUA does; rounds for eviction log the versions of the open
//! epoch, whose data no completed flush covers yet, so dropping it is allowed).
//! While ordering is given up (`order_broken_since`), writes may go in place over
//! logged data, so every round then makes the data durable first (two flushes).
//!
//! A round for a FUA write (`fua`) flushes nothing: the FUA data was written
//! durable already, and the record is written durable too (`WriteMode::Durable`,
//! `FLAG_UNFLUSHED`). The other data it describes is durable only after a later
//! round's flush, so recovery checks every record since the last completed
//! flush (`recover::load_v2`), and the round does not count as one that made
//! data durable (`durable_below`, a guest FLUSH).
//!
//! A checkpoint writes the changed blocks of the inactive table copy from the
//! live state (after a flush, so every entry it writes describes durable data),
//! flushes, then switches the superblock to it; the records after it start
//! where the log's head is then.

use std::sync::atomic::Ordering;

use rbd_backend::aio::DmaBuf;
use rbd_backend::WriteMode;

use super::persist::encode_blocks;
use super::state::{LogState, UnsureCheckpoint};
use super::sync::{join_all, Piece};
use super::{Cache, Engine};
use crate::error::EngineResult;
use crate::format::log::{LogEntry, Record, FLAG_DATA_DURABLE, FLAG_UNFLUSHED};
use crate::format::{Superblock, META_BLOCK};

/// What the snapshot of a round decided.
enum Plan {
    Record {
        bytes: DmaBuf,
        at: u32,
        blocks: u32,
        wasted: u32,
        seq: u64,
        durable_first: bool,
        /// Written durable on its own; no device flush (a FUA write's round).
        unflushed: bool,
        flushed: u64,
    },
    Checkpoint {
        blocks: Vec<(u32, DmaBuf)>,
        table: u32,
        seq: u64,
        flushed: u64,
        broken: u64,
    },
}

/// What to put back if the round fails (nothing is lost).
struct Taken {
    changed: Vec<u32>,
    fresh: Vec<(u32, Vec<(u16, u32)>)>,
    freed: Vec<(u32, u64)>,
    stale: Vec<u32>,
}

impl Engine {
    /// One round; `fua`: for a FUA write whose data is durable already (see
    /// the module comment). Returns whether the round flushed the cache
    /// device (a FUA round still does when it must checkpoint, or while
    /// ordering is given up).
    pub(super) async fn persist_round_v2(
        &self,
        c: &Cache,
        force_checkpoint: bool,
        fua: bool,
    ) -> EngineResult<bool> {
        let st = &c.st;
        let log_blocks = c.layout.log_blocks();
        let unsure = st.log.lock().unsure.clone();
        if let Some(u) = unsure {
            // Settle it first: written again, it is the superblock on the
            // device for sure, and its table the active one.
            c.store.write_superblock_async(&u.sb).await?;
            adopt_checkpoint(&mut c.sb.lock(), &u.sb);
            let mut log = st.log.lock();
            checkpoint_taken(st, &mut log, u.table, u.seq, u.flushed);
            log.unsure = None;
        }
        let (plan, taken, stable) = {
            let _s = st.snap.write();
            let log = st.log.lock();
            let flushed = st.flushed.load(Ordering::Acquire);
            let broken = st.order_broken_since.load(Ordering::Acquire);
            let freed = std::mem::take(&mut st.alloc.lock().pending_free);
            let seq = log.seq + 1;
            // Epochs below this have every write applied, so this round takes
            // all of their versions (see `State::durable_below`).
            let stable = {
                let e = st.epochs.lock();
                e.oldest_applying().map_or(e.cur, |a| a.min(e.cur))
            };
            let checkpoint = force_checkpoint || log.must_checkpoint || log.used > log_blocks / 2;
            let mut plan = None;
            let mut taken = Taken {
                changed: Vec::new(),
                fresh: Vec::new(),
                freed,
                stale: Vec::new(),
            };
            if !checkpoint {
                let changed = st.slot_changed.take();
                let mut fresh = st.fresh.lock();
                let mut entries = Vec::with_capacity(changed.len());
                for &slot in &changed {
                    let r = st.slots.get(slot);
                    let f = fresh.remove(&slot).unwrap_or_default();
                    taken.fresh.push((slot, f.clone()));
                    // Only sectors the entry still calls dirty need checking.
                    let f: Vec<(u16, u32)> = f
                        .into_iter()
                        .filter(|&(s, _)| super::bits::test(&r.dirty, s as u32))
                        .collect();
                    entries.push(LogEntry {
                        slot,
                        entry: r.entry_v2(),
                        fresh: f,
                    });
                }
                drop(fresh);
                taken.changed = changed;
                let durable_first = broken != 0;
                let unflushed = fua && !durable_first;
                let rec = Record {
                    flags: if durable_first {
                        FLAG_DATA_DURABLE
                    } else if unflushed {
                        FLAG_UNFLUSHED
                    } else {
                        0
                    },
                    seq,
                    ckpt_seq: log.ckpt_seq,
                    flushed_epoch: flushed,
                    cur_epoch: st.epochs.lock().cur,
                    order_broken_since: broken,
                    entries,
                };
                let entry_size = c.layout.entry_size as usize;
                let blocks = (rec.encoded_len(entry_size) / META_BLOCK as usize) as u32;
                if let Some((at, wasted)) = place(&log, blocks, log_blocks) {
                    plan = Some(Plan::Record {
                        bytes: DmaBuf::copy_of(&rec.encode(&c.codec, entry_size)),
                        at,
                        blocks,
                        wasted,
                        seq,
                        durable_first,
                        unflushed,
                        flushed,
                    });
                }
            }
            let plan = match plan {
                Some(p) => p,
                None => {
                    // A checkpoint takes everything: the live entries of every
                    // block changed since the other copy was written.
                    let table = 1 - log.active_table;
                    let stale = st.table_stale[table as usize].take();
                    let blocks = encode_blocks(
                        &c.codec,
                        &c.layout,
                        |slot| st.slots.get(slot).entry_v2(),
                        &stale,
                    );
                    taken.stale = stale;
                    // Entries and checksums taken above (if any) are in the
                    // checkpoint (its flush makes their data durable); what
                    // changes from here on goes to later records.
                    taken.fresh.clear();
                    taken.changed.clear();
                    st.slot_changed.take();
                    st.fresh.lock().clear();
                    Plan::Checkpoint {
                        blocks,
                        table,
                        seq,
                        flushed,
                        broken,
                    }
                }
            };
            (plan, taken, stable)
        };
        let res = match &plan {
            Plan::Record {
                bytes,
                at,
                durable_first,
                unflushed: true,
                ..
            } => {
                debug_assert!(!durable_first);
                c.store
                    .write_log_async(*at, bytes.slice_all(), WriteMode::Durable)
                    .await
            }
            Plan::Record {
                bytes,
                at,
                durable_first,
                ..
            } => {
                async {
                    if *durable_first {
                        c.store.sync_async().await?;
                    }
                    c.store
                        .write_log_async(*at, bytes.slice_all(), WriteMode::Normal)
                        .await?;
                    c.store.sync_async().await
                }
                .await
            }
            Plan::Checkpoint {
                blocks,
                table,
                seq,
                flushed,
                broken,
            } => {
                async {
                    c.store.sync_async().await?;
                    let pieces: Vec<Piece<'_, EngineResult<()>>> = blocks
                        .iter()
                        .map(|(b, buf)| -> Piece<'_, EngineResult<()>> {
                            Box::pin(c.store.write_table_async(*table, *b, buf.slice_all()))
                        })
                        .collect();
                    for r in join_all(pieces).await {
                        r?;
                    }
                    c.store.sync_async().await?;
                    // The live superblock changes only once this one is
                    // written: a failed write must not move its sequence
                    // (the next write would go to the other copy, the last
                    // good one) nor name a table a retry would rewrite.
                    let mut sb = c.sb.lock().clone();
                    sb.seq += 1;
                    sb.active_table = *table;
                    sb.ckpt_seq = *seq;
                    sb.log_start = st.log.lock().head;
                    sb.flushed_epoch = *flushed;
                    sb.order_broken_since = *broken;
                    sb.epoch = st.epochs.lock().cur;
                    match c.store.write_superblock_async(&sb).await {
                        Ok(()) => {
                            adopt_checkpoint(&mut c.sb.lock(), &sb);
                            Ok(())
                        }
                        Err(e) => {
                            st.log.lock().unsure = Some(UnsureCheckpoint {
                                sb,
                                table: *table,
                                seq: *seq,
                                flushed: *flushed,
                            });
                            Err(e)
                        }
                    }
                }
                .await
            }
        };
        match res {
            Ok(()) => {
                {
                    let mut log = st.log.lock();
                    match &plan {
                        Plan::Record {
                            at,
                            blocks,
                            wasted,
                            seq,
                            flushed,
                            ..
                        } => {
                            log.seq = *seq;
                            log.head = (at + blocks) % log_blocks;
                            log.used += blocks + wasted;
                            st.flushed_durable.fetch_max(*flushed, Ordering::AcqRel);
                        }
                        Plan::Checkpoint {
                            table,
                            seq,
                            flushed,
                            ..
                        } => {
                            checkpoint_taken(st, &mut log, *table, *seq, *flushed);
                            log.must_checkpoint = false;
                        }
                    }
                }
                let flushed_device = !matches!(
                    plan,
                    Plan::Record {
                        unflushed: true,
                        ..
                    }
                );
                if flushed_device {
                    st.durable_below.fetch_max(stable, Ordering::AcqRel);
                }
                let mut a = st.alloc.lock();
                for (slot, tag) in taken.freed {
                    a.releasing.remove(&tag);
                    a.free.push(slot);
                }
                drop(a);
                c.ev.space.notify(usize::MAX);
                Ok(flushed_device)
            }
            Err(e) => {
                for s in taken.changed {
                    st.slot_changed.set(s);
                }
                {
                    let mut f = st.fresh.lock();
                    for (slot, v) in taken.fresh {
                        let e = f.entry(slot).or_default();
                        for (s, c) in v {
                            if !e.iter().any(|(x, _)| *x == s) {
                                e.push((s, c));
                            }
                        }
                    }
                }
                if let Plan::Checkpoint { table, .. } = plan {
                    for b in taken.stale {
                        st.table_stale[table as usize].set(b);
                    }
                }
                // A checkpoint's changes are in no record now: only a
                // checkpoint (from the live entries) can carry them. A
                // record may be on the device, intact, whatever failed
                // after its write; a retry under its sequence number that
                // no longer fits at the end of the log goes to the log's
                // first block, and recovery would take the failed record
                // for it and end the log there. A checkpoint starts a log
                // of its own, which no record of this one can pass for.
                st.log.lock().must_checkpoint = true;
                st.alloc.lock().pending_free.extend(taken.freed);
                Err(e)
            }
        }
    }
}

/// The log after checkpoint `seq` into `table` is on the device.
fn checkpoint_taken(
    st: &super::state::State,
    log: &mut LogState,
    table: u32,
    seq: u64,
    flushed: u64,
) {
    log.seq = seq;
    log.ckpt_seq = seq;
    log.active_table = table;
    log.start = log.head;
    log.used = 0;
    st.flushed_durable.fetch_max(flushed, Ordering::AcqRel);
}

/// The fields a checkpoint wrote into the live superblock (others, the
/// mode for one, may have changed meanwhile).
fn adopt_checkpoint(live: &mut Superblock, written: &Superblock) {
    live.seq = written.seq;
    live.active_table = written.active_table;
    live.ckpt_seq = written.ckpt_seq;
    live.log_start = written.log_start;
    live.flushed_epoch = written.flushed_epoch;
    live.order_broken_since = written.order_broken_since;
    live.epoch = written.epoch;
}

/// Where a record of `blocks` goes: `(first block, blocks skipped at the end
/// of the log to wrap)`, or `None` if it does not fit without overwriting
/// records the checkpoint does not cover yet.
fn place(log: &super::state::LogState, blocks: u32, log_blocks: u32) -> Option<(u32, u32)> {
    let (start, head) = (log.start, log.head);
    if log.used == 0 || head >= start {
        if head + blocks <= log_blocks {
            return Some((head, 0));
        }
        if blocks < start || (log.used == 0 && blocks <= log_blocks) {
            return Some((0, log_blocks - head));
        }
        return None;
    }
    (head + blocks < start).then_some((head, 0))
}
