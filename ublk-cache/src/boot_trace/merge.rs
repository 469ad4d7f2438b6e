//! Merging one recorded boot into a trace, per cache line, so that a trace
//! ages instead of being thrown away: every line's `seen` mask shifts by one
//! boot, the lines this boot read get bit 0, and a line no boot of the last
//! four read is dropped. A line read again keeps the midpoint of its old and
//! new first-read times (one number per extent fits the format; it moves
//! halfway towards each new boot, so one odd boot moves it only so far).

use std::collections::BTreeMap;

use super::format::{BootTrace, Extent};

/// Lines read in the last this many boots stay in the trace.
const KEEP_BOOTS: u8 = 0b1111;
/// An extent is at most this long, and covers lines first read within this
/// long of its first one: replay fetches an extent as one piece.
const MAX_EXTENT: u64 = super::format::MAX_EXTENT_BYTES;
const MAX_SPREAD_MS: u32 = 1000;

/// What one boot read: each line (of `line_size` bytes) first read before
/// any write covered it, with the time of that read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootSet {
    pub line_size: u64,
    /// (line, ms after the guest's first request), in first-read order.
    pub lines: Vec<(u64, u32)>,
    pub window_ms: u32,
}

#[derive(Clone, Copy)]
struct Line {
    t_ms: u32,
    seen: u8,
    /// Order among lines of one time (reads within one ms): this boot's
    /// first-read order, else the old trace's.
    rank: u32,
}

/// `old` (if any, of this key and disk) with `boot` merged in.
pub fn merge(
    old: Option<&BootTrace>,
    boot: &BootSet,
    key: &str,
    disk_size: u64,
    now_s: u64,
) -> BootTrace {
    let ls = boot.line_size.max(512);
    let mut lines: BTreeMap<u64, Line> = BTreeMap::new();
    if let Some(old) = old {
        for (i, e) in old.extents.iter().enumerate() {
            let end = (e.offset() + e.len()).min(disk_size);
            if e.offset() >= end {
                continue;
            }
            for l in e.offset() / ls..end.div_ceil(ls) {
                let x = lines.entry(l).or_insert(Line {
                    t_ms: e.t_ms,
                    seen: 0,
                    rank: i as u32,
                });
                x.t_ms = x.t_ms.min(e.t_ms);
                x.seen |= e.seen << 1;
            }
        }
    }
    let disk_lines = disk_size.div_ceil(ls);
    for (i, &(l, t)) in boot.lines.iter().enumerate() {
        if l >= disk_lines {
            continue;
        }
        let x = lines.entry(l).or_insert(Line {
            t_ms: t,
            seen: 0,
            rank: 0,
        });
        if x.seen & 1 == 0 {
            x.rank = i as u32;
            x.t_ms = if x.seen == 0 {
                t
            } else {
                ((x.t_ms as u64 + t as u64) / 2) as u32
            };
            x.seen |= 1;
        }
    }
    lines.retain(|_, x| x.seen & KEEP_BOOTS != 0);
    let mut extents: Vec<(Extent, u32)> = Vec::new();
    let mut run: Option<(u64, u64, Line)> = None; // (first line, lines, first line's)
    let flush = |run: Option<(u64, u64, Line)>, extents: &mut Vec<(Extent, u32)>| {
        if let Some((first, n, x)) = run {
            let off = first * ls;
            // Whole sectors inside the disk (a disk's size is one in practice).
            let sectors = ((((first + n) * ls).min(disk_size) - off) / 512) as u32;
            if sectors == 0 {
                return;
            }
            extents.push((
                Extent {
                    sector: off >> 9,
                    sectors,
                    t_ms: x.t_ms,
                    seen: x.seen,
                    flags: 0,
                },
                x.rank,
            ));
        }
    };
    for (&l, &x) in &lines {
        run = match run {
            Some((first, n, r))
                if first + n == l
                    && r.seen == x.seen
                    && x.t_ms.abs_diff(r.t_ms) <= MAX_SPREAD_MS
                    && (n + 1) * ls <= MAX_EXTENT =>
            {
                Some((
                    first,
                    n + 1,
                    Line {
                        t_ms: r.t_ms.min(x.t_ms),
                        seen: r.seen,
                        rank: r.rank.min(x.rank),
                    },
                ))
            }
            prev => {
                flush(prev, &mut extents);
                Some((l, 1, x))
            }
        };
    }
    flush(run, &mut extents);
    extents.sort_by_key(|(e, rank)| (e.t_ms, *rank, e.sector));
    let extents = extents.into_iter().map(|(e, _)| e).collect();
    BootTrace {
        key: key.to_string(),
        disk_size,
        boots: old.map_or(0, |o| o.boots).saturating_add(1),
        window_ms: boot.window_ms,
        poor_boots: old.map_or(0, |o| o.poor_boots),
        created_s: old.map_or(now_s, |o| o.created_s),
        updated_s: now_s,
        extents,
    }
}

/// What of `t` its latest boot read, as a trace of that one boot: what a
/// stale trace is replaced by when that boot is in it already.
pub fn latest_boot_only(t: &BootTrace) -> Option<BootTrace> {
    let extents: Vec<Extent> = t
        .extents
        .iter()
        .filter(|e| e.seen & 1 != 0)
        .map(|e| Extent { seen: 1, ..*e })
        .collect();
    (!extents.is_empty()).then(|| BootTrace {
        boots: 1,
        poor_boots: 0,
        extents,
        ..t.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::super::format::check_extents;
    use super::*;
    use proptest::prelude::*;

    const LS: u64 = 65536;

    fn boot(lines: &[(u64, u32)]) -> BootSet {
        BootSet {
            line_size: LS,
            lines: lines.to_vec(),
            window_ms: 1000,
        }
    }

    fn seen_of(t: &BootTrace, line: u64) -> u8 {
        t.extents
            .iter()
            .find(|e| e.offset() <= line * LS && line * LS < e.offset() + e.len())
            .map_or(0, |e| e.seen)
    }

    #[test]
    fn a_stale_trace_keeps_only_its_latest_boot() {
        let size = 64 * LS;
        let t1 = merge(None, &boot(&[(3, 10), (9, 500)]), "k", size, 1);
        let mut t2 = merge(Some(&t1), &boot(&[(4, 12), (9, 400)]), "k", size, 2);
        t2.poor_boots = 1;
        let fresh = latest_boot_only(&t2).unwrap();
        assert_eq!((fresh.boots, fresh.poor_boots), (1, 0));
        let lines: Vec<u64> = fresh.extents.iter().map(|e| e.offset() / LS).collect();
        assert_eq!(lines, [4, 9], "line 3 was read only by the boot before");
        assert!(fresh.extents.iter().all(|e| e.seen == 1));
        check_extents(&fresh.extents, size).unwrap();
    }

    #[test]
    fn boots_age_lines_and_drop_what_four_boots_did_not_read() {
        let size = 64 * LS;
        let t1 = merge(None, &boot(&[(3, 10), (4, 12), (9, 500)]), "k", size, 1);
        assert_eq!(
            t1.extents.len(),
            2,
            "lines 3 and 4 coalesce: {:?}",
            t1.extents
        );
        assert_eq!(
            (t1.extents[0].offset(), t1.extents[0].len()),
            (3 * LS, 2 * LS)
        );
        let t2 = merge(Some(&t1), &boot(&[(4, 30), (20, 40)]), "k", size, 2);
        assert_eq!(
            (seen_of(&t2, 3), seen_of(&t2, 4), seen_of(&t2, 20)),
            (0b10, 0b11, 0b01)
        );
        let line4 = t2.extents.iter().find(|e| e.offset() == 4 * LS).unwrap();
        assert_eq!(
            line4.t_ms, 20,
            "the midpoint of its extent's time (10, of its first line) and 30"
        );
        let mut t = t2;
        for n in 0..3 {
            t = merge(Some(&t), &boot(&[(20, 40)]), "k", size, 3 + n);
        }
        assert_eq!(seen_of(&t, 3), 0, "unread for four boots: dropped");
        assert_eq!(seen_of(&t, 4), 0b11000, "read in boots 1 and 2 of 5");
        assert_eq!(seen_of(&t, 20), 0b1111);
        assert_eq!((t.boots, t.created_s, t.updated_s), (5, 1, 5));
    }

    #[test]
    fn a_line_past_a_shrunk_disk_is_dropped_and_the_last_line_is_clipped() {
        let t = merge(None, &boot(&[(1, 0), (5, 0)]), "k", LS + 4096, 1);
        assert_eq!(t.extents.len(), 1);
        assert_eq!(t.extents[0].len(), 4096);
    }

    proptest! {
        #[test]
        fn merged_traces_keep_their_invariants_and_survive_encoding(
            boots in prop::collection::vec(
                prop::collection::vec((0u64..200, 0u32..5000), 0..60), 1..8),
        ) {
            let size = 200 * LS - 1000;
            let mut t: Option<BootTrace> = None;
            for (i, b) in boots.iter().enumerate() {
                let mut seen = std::collections::HashSet::new();
                let lines: Vec<_> = b.iter().copied().filter(|(l, _)| seen.insert(*l)).collect();
                let m = merge(t.as_ref(), &boot(&lines), "key", size, i as u64);
                prop_assert!(check_extents(&m.extents, size).is_ok(), "{:?}", check_extents(&m.extents, size));
                for &(l, _) in &lines {
                    prop_assert!(seen_of(&m, l) & 1 == 1, "line {} of this boot is missing", l);
                }
                if let Some(old) = &t {
                    for e in &old.extents {
                        let l = e.offset() / LS;
                        if !lines.iter().any(|x| x.0 == l) && (e.seen << 1) & KEEP_BOOTS != 0 {
                            prop_assert_eq!(seen_of(&m, l), e.seen << 1);
                        }
                    }
                }
                prop_assert_eq!(BootTrace::decode(&m.encode()).unwrap(), m.clone());
                t = Some(m);
            }
        }

        #[test]
        fn damage_is_refused_or_changes_nothing(
            lines in prop::collection::vec((0u64..100, 0u32..5000), 1..40),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4),
        ) {
            let mut seen = std::collections::HashSet::new();
            let lines: Vec<_> = lines.into_iter().filter(|(l, _)| seen.insert(*l)).collect();
            let t = merge(None, &boot(&lines), "rbd:pool/img", 100 * LS, 7);
            let mut b = t.encode();
            for (i, x) in flips {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            if let Ok(got) = BootTrace::decode(&b) {
                prop_assert_eq!(got, t);
            }
            prop_assert!(BootTrace::decode(&b[..b.len() - 1]).is_err());
        }
    }
}
