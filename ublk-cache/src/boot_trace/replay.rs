//! Replaying a boot trace: prefetch follows the guest instead of racing to
//! the end of the list. The guest's position is the latest trace time of a
//! line it has read (a cursor that only moves forward); an extent is fetched
//! once its time is at most `ahead` past the cursor. A guest read of a line
//! whose prefetch is in flight waits for it under the line's lock (the
//! engine's misses are single-flight), so nothing is read twice.
//!
//! Which extents replay (`majority`): those read in at least two of the last
//! three boots, or in the last one while fewer than three are merged. One
//! odd boot neither adds its lines nor takes the usual ones away.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use hashbrown::HashMap;
use std::time::Duration;

use super::format::{BootTrace, Extent};

/// The extents of `t` to prefetch, in trace order.
pub fn replay_set(t: &BootTrace) -> Vec<Extent> {
    t.extents
        .iter()
        .copied()
        .filter(|e| {
            if t.boots < 3 {
                e.seen & 1 != 0
            } else {
                (e.seen & 0b111).count_ones() >= 2
            }
        })
        .collect()
}

/// What a replay measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Lines of the replay set, and those prefetch read from the backend.
    pub planned_lines: u64,
    pub fetched_lines: u64,
    pub fetched_bytes: u64,
    /// Fetched lines the guest then read (prefetch hits), and the bytes
    /// prefetch read for them and for the lines the guest did not read
    /// (wasted).
    pub used_lines: u64,
    pub used_bytes: u64,
    pub unused_bytes: u64,
    /// Lines of the replay set the guest read (whoever fetched them).
    pub read_lines: u64,
    /// How far ahead of the guest prefetch ran at most (trace ms).
    pub max_lead_ms: u32,
    /// The replay is over: these counts are final.
    pub done: bool,
}

impl ReplayReport {
    /// Share of the fetched lines the guest read.
    pub fn precision(&self) -> f64 {
        ratio(self.used_lines, self.fetched_lines)
    }

    /// Share of the trace lines the guest read that prefetch had fetched.
    pub fn recall(&self) -> f64 {
        ratio(self.used_lines, self.read_lines)
    }
}

/// The quality gate: a replay whose prefetch the guest mostly did not use
/// (precision under this) was poor.
pub const POOR_PRECISION: f64 = 0.3;
/// Poor replays in a row after which a trace is stale (put aside; the next
/// boot records afresh).
pub const STALE_AFTER: u8 = 2;
/// A replay that fetched fewer lines than this tells too little to judge.
pub const MIN_JUDGED_LINES: u64 = 8;

/// What one finished replay says about its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Too little fetched to tell: the trace's count of poor replays stays.
    NotJudged,
    /// Keep the trace, with this many poor replays in a row (0 after a good one).
    Keep { poor_boots: u8 },
    /// The trace predicts badly: put it aside.
    Stale,
}

/// Judge a finished replay of a trace that had `poor_boots` poor replays in
/// a row before it. Precision, not recall: a trace that fetches what the
/// guest then reads costs nothing even if the boot went further, but one
/// whose fetches are mostly wasted loads the backend for nothing.
pub fn judge(poor_boots: u8, rep: &ReplayReport) -> Verdict {
    if rep.fetched_lines < MIN_JUDGED_LINES {
        return Verdict::NotJudged;
    }
    if rep.precision() >= POOR_PRECISION {
        return Verdict::Keep { poor_boots: 0 };
    }
    let poor_boots = poor_boots.saturating_add(1);
    if poor_boots >= STALE_AFTER {
        Verdict::Stale
    } else {
        Verdict::Keep { poor_boots }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The shared state of one replay: the engine notes guest reads, the
/// prefetch job asks what is due and notes what it fetched.
pub struct BootReplay {
    line_size: u64,
    extents: Vec<Extent>,
    /// Each line of the replay set: its index in `extents`.
    line_extent: HashMap<u64, u32>,
    cursor_ms: AtomicU32,
    ahead_ms: u32,
    /// Per line of the replay set (by `line_index`): FETCHED, READ (by the
    /// guest), IN_FLIGHT.
    state: Vec<AtomicU8>,
    /// Per line of the replay set: the bytes prefetch read of it.
    bytes: Vec<AtomicU32>,
    line_index: HashMap<u64, u32>,
    fetched_bytes: AtomicU64,
    max_lead_ms: AtomicU32,
    /// While prefetch runs (and the boot window lasts): guest reads are noted.
    active: AtomicBool,
}

const FETCHED: u8 = 1;
const READ: u8 = 2;
const IN_FLIGHT: u8 = 4;

impl BootReplay {
    pub fn new(extents: Vec<Extent>, line_size: u64, ahead: Duration) -> Self {
        let ls = line_size.max(512);
        let mut line_extent = HashMap::new();
        let mut line_index = HashMap::new();
        for (i, e) in extents.iter().enumerate() {
            for l in e.offset() / ls..(e.offset() + e.len()).div_ceil(ls) {
                line_extent.entry(l).or_insert(i as u32);
                let n = line_index.len() as u32;
                line_index.entry(l).or_insert(n);
            }
        }
        let state = (0..line_index.len()).map(|_| AtomicU8::new(0)).collect();
        let bytes = (0..line_index.len()).map(|_| AtomicU32::new(0)).collect();
        Self {
            line_size: ls,
            extents,
            line_extent,
            cursor_ms: AtomicU32::new(0),
            ahead_ms: ahead.as_millis().min(u32::MAX as u128) as u32,
            state,
            bytes,
            line_index,
            fetched_bytes: AtomicU64::new(0),
            max_lead_ms: AtomicU32::new(0),
            active: AtomicBool::new(true),
        }
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn lines_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.line_size..offset.saturating_add(len).div_ceil(self.line_size)
    }

    /// A guest read: the cursor moves to the latest trace time it touched.
    pub fn note_read(&self, offset: u64, len: u64) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        for l in self.lines_of(offset, len) {
            if let Some(&i) = self.line_extent.get(&l) {
                self.cursor_ms
                    .fetch_max(self.extents[i as usize].t_ms, Ordering::AcqRel);
            }
            if let Some(&i) = self.line_index.get(&l) {
                self.state[i as usize].fetch_or(READ, Ordering::AcqRel);
            }
        }
    }

    /// Whether extent `i` may be fetched now (within `ahead` of the guest).
    pub fn due(&self, i: usize) -> bool {
        let cursor = self.cursor_ms.load(Ordering::Acquire);
        self.extents[i].t_ms <= cursor.saturating_add(self.ahead_ms)
    }

    fn state_of(&self, line: u64) -> Option<&AtomicU8> {
        self.line_index.get(&line).map(|&x| &self.state[x as usize])
    }

    /// Prefetch starts on extent `i` (for the lead it ran ahead by).
    pub fn starting(&self, i: usize) {
        let cursor = self.cursor_ms.load(Ordering::Acquire);
        self.max_lead_ms.fetch_max(
            self.extents[i].t_ms.saturating_sub(cursor),
            Ordering::AcqRel,
        );
    }

    /// Prefetch starts on `line`: a guest read of it from now on waits for
    /// it (or finds it done) and counts as a prefetch hit if prefetch
    /// fetches it; a line the guest read already stays the guest's own.
    pub fn fetching(&self, line: u64) {
        if let Some(s) = self.state_of(line) {
            let _ = s.compare_exchange(0, IN_FLIGHT, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Prefetch of `line` ended, `bytes` of it read from the backend (0: it
    /// was cached already, so prefetch fetched none of it).
    pub fn fetched(&self, line: u64, bytes: u64) {
        self.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(&x) = self.line_index.get(&line) {
            let mark = if bytes > 0 { FETCHED } else { 0 };
            // A line is at most a cache line (well under 4 GiB).
            let n = bytes.min(u32::MAX as u64) as u32;
            self.bytes[x as usize].fetch_add(n, Ordering::Relaxed);
            let _ = self.state[x as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & IN_FLIGHT != 0).then_some((v & !IN_FLIGHT) | mark)
            });
        }
    }

    /// Stop following the guest (prefetch is over): guest reads cost nothing
    /// from now on, and the report counts what happened until here.
    pub fn finish(&self) {
        self.active.store(false, Ordering::Release);
    }

    /// Bytes prefetch has read from the backend so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.load(Ordering::Relaxed)
    }

    pub fn line_size(&self) -> u64 {
        self.line_size
    }

    pub fn report(&self) -> ReplayReport {
        let mut r = ReplayReport {
            planned_lines: self.state.len() as u64,
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            max_lead_ms: self.max_lead_ms.load(Ordering::Relaxed),
            done: !self.active.load(Ordering::Acquire),
            ..ReplayReport::default()
        };
        for (s, b) in self.state.iter().zip(&self.bytes) {
            let (s, b) = (s.load(Ordering::Acquire), b.load(Ordering::Relaxed) as u64);
            r.fetched_lines += u64::from(s & FETCHED != 0);
            r.read_lines += u64::from(s & READ != 0);
            if s == FETCHED | READ {
                r.used_lines += 1;
                r.used_bytes += b;
            } else {
                r.unused_bytes += b;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LS: u64 = 65536;

    fn ext(line: u64, lines: u32, t_ms: u32, seen: u8) -> Extent {
        Extent {
            sector: line * LS / 512,
            sectors: lines * (LS / 512) as u32,
            t_ms,
            seen,
            flags: 0,
        }
    }

    fn trace(boots: u16, extents: Vec<Extent>) -> BootTrace {
        BootTrace {
            key: "k".into(),
            disk_size: 1 << 30,
            boots,
            window_ms: 1000,
            poor_boots: 0,
            created_s: 0,
            updated_s: 0,
            extents,
        }
    }

    #[test]
    fn majority_replays_what_two_of_the_last_three_boots_read() {
        let x = vec![
            ext(0, 1, 0, 0b001),
            ext(1, 1, 1, 0b110),
            ext(2, 1, 2, 0b101),
            ext(3, 1, 3, 0b1000),
        ];
        let lines = |v: Vec<Extent>| v.iter().map(|e| e.offset() / LS).collect::<Vec<_>>();
        assert_eq!(lines(replay_set(&trace(5, x.clone()))), [1, 2]);
        assert_eq!(
            lines(replay_set(&trace(2, x))),
            [0, 2],
            "the last boot while fewer than 3"
        );
    }

    #[test]
    fn prefetch_stays_within_its_lead_of_the_guest_and_counts_hits() {
        let r = BootReplay::new(
            vec![ext(0, 2, 0, 1), ext(10, 1, 3000, 1), ext(20, 1, 7000, 1)],
            LS,
            Duration::from_secs(5),
        );
        assert!(
            r.due(0) && r.due(1) && !r.due(2),
            "7 s is more than 5 s ahead of 0"
        );
        r.starting(0);
        r.fetching(0);
        r.note_read(0, 4096); // read while its fetch is in flight: it waited
        r.fetched(0, LS);
        r.fetching(1);
        r.fetched(1, 0); // cached already: not fetched by prefetch
        r.note_read(LS, 4096);
        r.note_read(10 * LS, 4096); // the guest is at 3 s now, before prefetch
        assert!(r.due(2), "the guest reached 3 s: 7 s is within 5 s of it");
        r.fetching(10);
        r.fetched(10, 0); // the guest's own read cached it
        r.fetching(20);
        r.fetched(20, LS);
        r.finish();
        r.note_read(20 * LS, 4096); // after the end: not counted
        let rep = r.report();
        assert_eq!(
            (
                rep.planned_lines,
                rep.fetched_lines,
                rep.used_lines,
                rep.read_lines
            ),
            (4, 2, 1, 3),
            "{rep:?}"
        );
        assert_eq!((rep.precision(), rep.recall()), (0.5, 1.0 / 3.0));
        assert_eq!(
            (
                rep.used_bytes,
                rep.unused_bytes,
                rep.fetched_bytes,
                rep.done
            ),
            (LS, LS, 2 * LS, true),
            "line 0 was used, line 20 read after the end"
        );
    }

    #[test]
    fn two_poor_replays_in_a_row_make_a_trace_stale_and_a_good_one_resets_the_count() {
        let rep = |fetched: u64, used: u64| ReplayReport {
            fetched_lines: fetched,
            used_lines: used,
            read_lines: used,
            ..ReplayReport::default()
        };
        assert_eq!(judge(0, &rep(7, 0)), Verdict::NotJudged, "too few lines");
        assert_eq!(judge(0, &rep(10, 2)), Verdict::Keep { poor_boots: 1 });
        assert_eq!(judge(1, &rep(10, 2)), Verdict::Stale);
        assert_eq!(judge(1, &rep(10, 3)), Verdict::Keep { poor_boots: 0 });
        assert_eq!(judge(1, &rep(7, 0)), Verdict::NotJudged);
        assert_eq!(judge(u8::MAX, &rep(100, 0)), Verdict::Stale, "saturates");
    }
}
