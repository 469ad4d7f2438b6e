//! Write-back pacing: a limit on the bytes and the writes per second that the
//! flusher sends to the backend, which it shares with the guest's misses and
//! with other hosts.
//!
//! The pacer is a virtual-clock scheduler (the generic cell rate algorithm of
//! ATM, the shape of a token bucket without a refill timer): every write moves
//! a theoretical time forward by what it costs at the limit, and a write may
//! start once that time is no more than one burst ahead of now. Time is passed
//! in, so the unit tests run on made-up instants.

use std::time::{Duration, Instant};

/// Who goes first at the backend when the guest's reads and background
/// write-back both need it. The server cannot reorder the backend's own
/// queue, but it can keep write-back's part of it short while a guest read
/// waits behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendPriority {
    /// While guest reads are at the backend, background write-back keeps at
    /// most [`READS_FIRST_WINDOW`] writes in flight (a drain asked for, and
    /// a guest write waiting for room, keep the full window).
    #[default]
    GuestReads,
    /// Write-back keeps its full window whatever the guest does (the
    /// comparison arm of the benchmarks).
    Equal,
}

/// Background write-back writes in flight while guest reads wait at the
/// backend: one, so that a read waits for at most one write-back write
/// besides its own turn, and write-back still moves (a write of up to
/// 4 MiB keeps a link busy for most of its round trip).
pub const READS_FIRST_WINDOW: u32 = 1;

/// How long after the guest's last backend read write-back still counts the
/// guest as reading. A guest reading at queue depth 1 has no read at the
/// backend between one read's end and its next; without this, write-back
/// would refill its whole window in that gap and the next read would wait
/// behind all of it.
pub const READS_LINGER: Duration = Duration::from_millis(10);

/// The limit: either part may be absent (no limit of that kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct WritebackLimit {
    /// Backend bytes per second at most.
    pub bytes_per_sec: Option<u64>,
    /// Backend writes per second at most.
    pub writes_per_sec: Option<u64>,
}

impl WritebackLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.writes_per_sec.is_none()
    }

    /// The largest write-back write to merge at this limit, at most `max`:
    /// one that costs at most [`MAX_WRITE_COST`] at the byte rate (never
    /// below 64 KiB). A write that costs more than one burst would go out as a
    /// lump, and the others sharing the backend would wait behind it: paced
    /// write-back is smooth over any tenth of a second. Short writes also
    /// finish often, so a paced write-back never looks stalled (a stalled
    /// write-back is an outage).
    ///
    /// With a write limit as well, a write is never cut below what costs as
    /// much at the byte rate as one write does at the write rate: a shorter
    /// one would cost a whole write's time for fewer bytes.
    pub fn max_write(&self, max: u64) -> u64 {
        match self.bytes_per_sec {
            Some(r) => {
                let by_cost = (r as f64 * MAX_WRITE_COST.as_secs_f64()) as u64;
                let by_writes = self.writes_per_sec.map_or(0, |w| r / w.max(1));
                by_cost.max(by_writes).clamp(64 << 10, max.max(64 << 10))
            }
            None => max,
        }
    }

    /// What one write of `bytes` costs at this limit: the longer of the two.
    pub fn cost(&self, bytes: u64) -> Duration {
        let by_bytes = self.bytes_per_sec.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(bytes as f64 / r.max(1) as f64)
        });
        let by_writes = self.writes_per_sec.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(1.0 / r.max(1) as f64)
        });
        by_bytes.max(by_writes)
    }
}

/// What one merged write-back write may cost at the byte rate: one burst
/// (see [`WritebackLimit::max_write`]).
pub const MAX_WRITE_COST: Duration = BURST;

/// The lowest byte rate a server may be given (`--writeback-rate`): at it a
/// 64 KiB write, the smallest merged one, costs 62.5 ms, and a line of the
/// largest size (1 MiB) one second, well inside the 2 s after which a
/// write-back that finishes nothing counts as stalled.
pub const MIN_BYTES_PER_SEC: u64 = 1 << 20;

/// Refuse a byte rate below [`MIN_BYTES_PER_SEC`] (0, no limit, is fine),
/// saying why; the caller names the option.
pub fn check_rate(bytes_per_sec: u64) -> Result<(), String> {
    if bytes_per_sec == 0 || bytes_per_sec >= MIN_BYTES_PER_SEC {
        return Ok(());
    }
    Err(format!(
        "{bytes_per_sec} bytes/s is below the lowest allowed, 1M: slower, one write-back write \
         would take long enough to look like a stalled backend (give 0 for no limit)"
    ))
}

/// How far ahead of the average the flusher may run after an idle spell:
/// enough for a write-back step's writes to go out together, short enough
/// that the backend sees the limit over any second.
pub const BURST: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Pacer {
    /// The static limit (`--writeback-rate`, `--writeback-iops`, `ctl`).
    limit: WritebackLimit,
    /// The dirty-level controller's byte rate, if it paces now (see
    /// `crate::dirty_control`); the tighter of it and the static limit applies.
    controlled: Option<u64>,
    /// When the writes admitted so far would have finished at the limit.
    tat: Option<Instant>,
}

impl Pacer {
    pub fn new(limit: WritebackLimit) -> Pacer {
        Pacer {
            limit,
            controlled: None,
            tat: None,
        }
    }

    /// The static limit.
    pub fn limit(&self) -> WritebackLimit {
        self.limit
    }

    /// The limit in effect: the static one, its byte rate lowered to the
    /// controller's where that is tighter.
    pub fn effective(&self) -> WritebackLimit {
        let bytes_per_sec = match (self.limit.bytes_per_sec, self.controlled) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        WritebackLimit {
            bytes_per_sec,
            writes_per_sec: self.limit.writes_per_sec,
        }
    }

    /// A new static limit applies from the next write admitted on; writes
    /// admitted already keep their places (so changing it often, or to the
    /// same value, neither stalls write-back nor lets a burst through).
    pub fn set_limit(&mut self, limit: WritebackLimit) {
        self.limit = limit;
    }

    /// The controller's byte rate (`None`: it does not pace), from the next
    /// write admitted on, as `set_limit`.
    pub fn set_controlled_rate(&mut self, rate: Option<u64>) {
        self.controlled = rate;
    }

    /// Whether the controller's rate, not the static limit, sets what a write
    /// of `bytes` costs.
    pub fn controller_binds(&self, bytes: u64) -> bool {
        self.controlled.is_some_and(|r| {
            Duration::from_secs_f64(bytes as f64 / r.max(1) as f64) >= self.limit.cost(bytes)
        })
    }

    /// Admit one write of `bytes` at `now`, or say how long to wait before
    /// asking again. A write is admitted once the writes before it are no more
    /// than one burst ahead of `now` at the limit, and only then counted: a
    /// write that waits holds no place, so a limit changed meanwhile (the
    /// controller's, every quarter second) applies to it at once.
    pub fn try_admit(&mut self, now: Instant, bytes: u64) -> Result<(), Duration> {
        let cost = self.effective().cost(bytes);
        if cost.is_zero() {
            return Ok(());
        }
        // An idle spell earns no more than one burst of credit.
        let tat = self.tat.map_or(now, |t| t.max(now));
        let start = tat.checked_sub(BURST).map_or(now, |s| s.max(now));
        if start > now {
            return Err(start - now);
        }
        self.tat = Some(tat + cost);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limit(bytes: Option<u64>, writes: Option<u64>) -> WritebackLimit {
        WritebackLimit {
            bytes_per_sec: bytes,
            writes_per_sec: writes,
        }
    }

    /// Admit one write at `now`, asking again when told: when it went.
    fn admit(p: &mut Pacer, mut now: Instant, bytes: u64) -> Instant {
        while let Err(wait) = p.try_admit(now, bytes) {
            assert!(!wait.is_zero(), "a wait of zero would spin");
            now += wait;
        }
        now
    }

    /// Admit `n` writes of `bytes`, each sent when told; returns when the last went.
    fn run(p: &mut Pacer, t0: Instant, n: usize, bytes: u64) -> Duration {
        let mut now = t0;
        for _ in 0..n {
            now = admit(p, now, bytes);
        }
        now - t0
    }

    #[test]
    fn no_limit_never_waits() {
        let mut p = Pacer::new(WritebackLimit::default());
        assert!(p.limit().is_unlimited());
        assert_eq!(run(&mut p, Instant::now(), 1000, 4 * MIB), Duration::ZERO);
    }

    #[test]
    fn a_byte_rate_spreads_writes_to_the_rate_after_one_burst() {
        // 10 MiB/s, 1 MiB writes: 100 ms each. After the first (the burst
        // lets two go at once), each waits for the one before.
        let mut p = Pacer::new(limit(Some(10 * MIB), None));
        let took = run(&mut p, Instant::now(), 21, MIB);
        assert_eq!(took, Duration::from_millis(1900));
    }

    #[test]
    fn a_write_rate_counts_writes_whatever_their_size() {
        let mut p = Pacer::new(limit(None, Some(100)));
        let took = run(&mut p, Instant::now(), 101, 4096);
        // 10 ms a write; the burst lets the first 11 go at once.
        assert_eq!(took, Duration::from_millis(900));
    }

    #[test]
    fn paced_writes_are_merged_only_up_to_one_burst_of_the_rate() {
        let max = 4 * MIB;
        assert_eq!(WritebackLimit::default().max_write(max), max);
        assert_eq!(limit(Some(100 * MIB), None).max_write(max), max);
        assert_eq!(limit(Some(10 * MIB), None).max_write(max), MIB);
        assert_eq!(limit(Some(1024), None).max_write(max), 64 << 10);
        assert_eq!(limit(None, Some(10)).max_write(max), max);
        // 10 MiB/s and 4 writes/s: a write costs 250 ms anyway, so it may
        // carry 2.5 MiB, not the 1 MiB one burst holds.
        assert_eq!(limit(Some(10 * MIB), Some(4)).max_write(max), 10 * MIB / 4);
    }

    #[test]
    fn the_tighter_of_both_limits_applies() {
        let l = limit(Some(MIB), Some(1000));
        assert_eq!(l.cost(MIB), Duration::from_secs(1));
        assert_eq!(l.cost(64), Duration::from_millis(1));
    }

    #[test]
    fn an_idle_spell_earns_one_burst_only() {
        let t0 = Instant::now();
        let mut p = Pacer::new(limit(Some(10 * MIB), None));
        run(&mut p, t0, 5, MIB);
        // An hour later: one burst (two writes) at once, then the rate again.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(admit(&mut p, later, MIB), later);
        assert_eq!(admit(&mut p, later, MIB), later);
        assert_eq!(p.try_admit(later, MIB), Err(Duration::from_millis(100)));
    }

    #[test]
    fn a_new_limit_applies_to_the_next_write_and_keeps_the_schedule() {
        let t0 = Instant::now();
        let mut p = Pacer::new(limit(Some(MIB), None));
        // Ten seconds' worth admitted at 1 MiB/s, the last at 8.9 s.
        assert_eq!(run(&mut p, t0, 10, MIB), Duration::from_millis(8900));
        let t = t0 + Duration::from_millis(8900);
        let wait = p.try_admit(t, MIB).unwrap_err();
        p.set_limit(limit(Some(MIB), None));
        assert_eq!(
            p.try_admit(t, MIB),
            Err(wait),
            "the same limit changes nothing"
        );
        // No limit: at once, and nothing counted.
        p.set_limit(WritebackLimit::default());
        assert_eq!(p.try_admit(t, MIB), Ok(()));
        // Back to the limit: the earlier writes still hold their places.
        p.set_limit(limit(Some(MIB), None));
        assert_eq!(p.try_admit(t, MIB), Err(wait));
    }

    #[test]
    fn the_controller_lowers_the_byte_rate_and_never_raises_it() {
        let t0 = Instant::now();
        let mut p = Pacer::new(limit(Some(10 * MIB), Some(1000)));
        p.set_controlled_rate(Some(MIB));
        assert_eq!(p.effective(), limit(Some(MIB), Some(1000)));
        assert_eq!(run(&mut p, t0, 3, MIB), Duration::from_millis(1900));
        p.set_controlled_rate(Some(100 * MIB));
        assert_eq!(p.effective(), limit(Some(10 * MIB), Some(1000)));
        p.set_controlled_rate(None);
        assert_eq!(p.effective(), limit(Some(10 * MIB), Some(1000)));
        let mut p = Pacer::new(WritebackLimit::default());
        p.set_controlled_rate(Some(2 * MIB));
        assert_eq!(p.effective(), limit(Some(2 * MIB), None));
    }

    #[test]
    fn the_controller_binds_only_where_it_is_the_tighter_limit() {
        let mut p = Pacer::new(limit(Some(10 * MIB), Some(100)));
        assert!(!p.controller_binds(MIB), "no controller rate");
        p.set_controlled_rate(Some(MIB));
        assert!(p.controller_binds(MIB));
        // 4 KiB at 1 MiB/s is 4 ms, the 100 writes/s limit 10 ms: the static one.
        assert!(!p.controller_binds(4096));
        p.set_controlled_rate(Some(100 * MIB));
        assert!(!p.controller_binds(MIB));
        // A rate of zero (never configured so) costs like 1 byte/s, no panic.
        p.set_controlled_rate(Some(0));
        assert!(p.controller_binds(MIB));
    }
}
