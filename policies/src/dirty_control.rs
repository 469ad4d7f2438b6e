//! How fast background write-back should run, from how much of the cache is
//! dirty: a proportional-integral controller on the dirty level, after
//! bcache's (drivers/md/bcache/writeback.c, `__update_writeback_rate`).
//!
//! Below the low watermark write-back trickles at a minimum rate; between
//! the watermarks it runs at a rate that grows with the dirty data above the
//! low one (P: that excess retired in `P_SECONDS`) and with how long it has
//! stayed there (I); at or above the high watermark, or while a guest write
//! waits for room, it runs as fast as the backend and any static limit let
//! it. Once the guest has written nothing for `IDLE_AFTER` the low watermark
//! drops to zero, so an idle disk's dirty data goes out too (in about
//! `P_SECONDS`, not at once: the backend is shared, and a quiet guest says
//! nothing about how busy it is for others; bcache's idle rule, which
//! drains at full speed, looks at the whole cache set of a host instead).
//! Draining slowly while little is dirty leaves the backend to the guests'
//! misses and to other hosts; draining fast when the cache fills keeps
//! guest writes from waiting for room.
//!
//! The controller is soft state: nothing of it is on disk. Time and the
//! dirty level are passed in, so the unit tests run on made-up instants.

use std::time::{Duration, Instant};

use crate::pacing::MIN_BYTES_PER_SEC;

/// The watermarks and the floor the controller works between
/// (`--writeback-low`, `--writeback-high`, `--writeback-min-rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyLevel {
    /// Percent of the cache's lines that may hold dirty data while write-back
    /// runs at `min_rate` only.
    pub low_pct: u8,
    /// Percent of the cache's lines dirty at which write-back runs unpaced.
    pub high_pct: u8,
    /// Backend bytes per second write-back keeps up at least.
    pub min_rate: u64,
}

impl Default for DirtyLevel {
    /// bcache's `writeback_percent` (10) for the low watermark; the high one
    /// leaves room for a burst of versions before guest writes wait.
    fn default() -> Self {
        DirtyLevel {
            low_pct: 10,
            high_pct: 70,
            min_rate: MIN_BYTES_PER_SEC,
        }
    }
}

impl DirtyLevel {
    /// Refuse watermarks that cannot work, saying why (the caller names the
    /// options).
    pub fn check(&self) -> Result<(), String> {
        if self.high_pct == 0 || self.high_pct > 100 {
            return Err(format!(
                "the high watermark {}% is not in 1..=100",
                self.high_pct
            ));
        }
        if self.low_pct >= self.high_pct {
            return Err(format!(
                "the low watermark {}% is not below the high one {}%",
                self.low_pct, self.high_pct
            ));
        }
        if self.min_rate > MAX_MIN_RATE {
            return Err(format!(
                "the minimum write-back rate {} bytes/s is above the highest allowed, 1T",
                self.min_rate
            ));
        }
        if self.min_rate < MIN_BYTES_PER_SEC {
            return Err(format!(
                "the minimum write-back rate {} bytes/s is below the lowest allowed, 1M: slower, \
                 one write-back write would take long enough to look like a stalled backend",
                self.min_rate
            ));
        }
        Ok(())
    }

    fn bytes(pct: u8, capacity: u64) -> u64 {
        (capacity as u128 * pct as u128 / 100) as u64
    }
}

/// The highest minimum rate: far above any backend, and far below the
/// controller's ceiling.
pub const MAX_MIN_RATE: u64 = 1 << 40;
/// The controller's rate at most (keeps the arithmetic finite).
const CEILING: f64 = (1u64 << 50) as f64;

/// The dirty data above the low watermark that the proportional term alone
/// retires in this many seconds (bcache's `writeback_rate_p_term_inverse`).
pub const P_SECONDS: f64 = 40.0;
/// The integral term's divisor, in s² (bcache's `writeback_rate_i_term_inverse`
/// over one-second rounds): an excess held for `I_SECONDS2 / P_SECONDS`
/// seconds adds as much rate as the proportional term gives it.
pub const I_SECONDS2: f64 = 10_000.0;
/// How often the rate is worked out again.
pub const UPDATE_EVERY: Duration = Duration::from_millis(250);
/// A guest that wrote nothing for this long is idle: the low watermark drops
/// to zero.
pub const IDLE_AFTER: Duration = Duration::from_secs(5);
/// The longest time one update integrates over (a flusher that was idle for
/// an hour does not add an hour of error at once).
const MAX_DT: Duration = Duration::from_secs(1);

/// Why the controller chose what it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// Paced to the PI rate (the minimum rate at or below the low watermark).
    Paced,
    /// At or above the high watermark: unpaced.
    AboveHigh,
    /// The guest wrote nothing for `IDLE_AFTER`: paced to the PI rate with
    /// the low watermark at zero.
    GuestIdle,
    /// A guest write waits for room in the cache: unpaced.
    GuestWaits,
}

impl Regime {
    pub const ALL: [Regime; 4] = [
        Regime::Paced,
        Regime::AboveHigh,
        Regime::GuestIdle,
        Regime::GuestWaits,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Regime::Paced => "paced",
            Regime::AboveHigh => "above-high",
            Regime::GuestIdle => "guest-idle",
            Regime::GuestWaits => "guest-waits",
        }
    }
}

/// What the controller decided at its last update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub regime: Regime,
    /// Backend bytes per second for write-back; `None`: unpaced.
    pub rate: Option<u64>,
    /// The integral term's share of the rate (bytes per second).
    pub integral_rate: u64,
    /// The watermarks in bytes of the capacity last seen.
    pub low_bytes: u64,
    pub high_bytes: u64,
}

/// One look at the cache, taken when an update is due.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Bytes of the cache's lines that hold dirty data (whole lines: a line
    /// with one dirty sector cannot be evicted either).
    pub dirty: u64,
    /// The guest's write bytes so far (a counter; only its changes matter).
    pub guest_writes: u64,
    /// Whether a guest write waits for room now.
    pub guest_waits: bool,
    /// Whether the rate held write-back back since the last update (only
    /// then does more rate help, so only then does the integral grow:
    /// anti-windup against a backend that is slower than the rate).
    pub held_back: bool,
}

#[derive(Debug)]
pub struct DirtyController {
    level: DirtyLevel,
    /// Bytes of all the cache's lines (what the watermarks are shares of).
    capacity: u64,
    /// Excess dirty bytes integrated over seconds; never below zero.
    integral: f64,
    last: Option<Instant>,
    guest_writes: u64,
    guest_wrote_at: Option<Instant>,
    decision: Decision,
}

impl DirtyController {
    /// A controller for a cache whose lines hold `capacity` bytes.
    pub fn new(level: DirtyLevel, capacity: u64) -> DirtyController {
        DirtyController {
            level,
            capacity,
            integral: 0.0,
            last: None,
            guest_writes: 0,
            guest_wrote_at: None,
            decision: Decision {
                regime: Regime::Paced,
                rate: Some(level.min_rate),
                integral_rate: 0,
                low_bytes: DirtyLevel::bytes(level.low_pct, capacity),
                high_bytes: DirtyLevel::bytes(level.high_pct, capacity),
            },
        }
    }

    pub fn level(&self) -> DirtyLevel {
        self.level
    }

    /// Whether an update is due at `now` (the first one always is).
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.saturating_duration_since(t) >= UPDATE_EVERY)
    }

    /// The last decision (the minimum rate before the first update).
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// Work the rate out again from `s`, taken at `now`.
    pub fn update(&mut self, now: Instant, s: Sample) -> Decision {
        let dt = self
            .last
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(MAX_DT)
            .as_secs_f64();
        self.last = Some(now);
        if self.guest_wrote_at.is_none() || s.guest_writes != self.guest_writes {
            self.guest_writes = s.guest_writes;
            self.guest_wrote_at = Some(now);
        }
        let idle = self
            .guest_wrote_at
            .is_some_and(|t| now.saturating_duration_since(t) >= IDLE_AFTER);
        let high = DirtyLevel::bytes(self.level.high_pct, self.capacity);
        let regime = if s.guest_waits {
            Regime::GuestWaits
        } else if s.dirty >= high {
            Regime::AboveHigh
        } else if idle {
            Regime::GuestIdle
        } else {
            Regime::Paced
        };
        let low = match regime {
            Regime::GuestIdle => 0,
            _ => DirtyLevel::bytes(self.level.low_pct, self.capacity),
        };
        let paced = matches!(regime, Regime::Paced | Regime::GuestIdle);
        let error = s.dirty as f64 - low as f64;
        // Integrate only while the rate is what limits write-back, and
        // unwind whenever below the low watermark.
        if paced && ((error < 0.0 && self.integral > 0.0) || (error > 0.0 && s.held_back)) {
            // At most as much as would add the rate that retires the whole
            // cache in `P_SECONDS`: a long stretch held back (a slow backend
            // that the held-back test misjudged) cannot wind it up without end.
            let cap = self.capacity as f64 * I_SECONDS2 / P_SECONDS;
            self.integral = (self.integral + error * dt).clamp(0.0, cap);
        }
        let integral_rate = self.integral / I_SECONDS2;
        let pi = error / P_SECONDS + integral_rate;
        let rate = pi.max(self.level.min_rate as f64).min(CEILING) as u64;
        self.decision = Decision {
            regime,
            rate: paced.then_some(rate),
            integral_rate: integral_rate.min(CEILING) as u64,
            low_bytes: low,
            high_bytes: high,
        };
        self.decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn sample(dirty: u64, writes: u64, held_back: bool) -> Sample {
        Sample {
            dirty,
            guest_writes: writes,
            guest_waits: false,
            held_back,
        }
    }

    #[test]
    fn below_the_low_watermark_write_back_trickles_at_the_minimum() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t = Instant::now();
        let d = c.update(t, sample(50 * MIB, 1, true));
        assert_eq!(d.regime, Regime::Paced);
        assert_eq!(d.rate, Some(MIN_BYTES_PER_SEC));
        assert_eq!(d.low_bytes, GIB / 10);
        assert_eq!(d.high_bytes, GIB * 7 / 10);
    }

    #[test]
    fn between_the_watermarks_the_excess_is_retired_in_forty_seconds() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t = Instant::now();
        let low = GIB / 10;
        // 400 MiB over the low watermark, first update: P alone, 10 MiB/s.
        let d = c.update(t, sample(low + 400 * MIB, 1, false));
        assert_eq!(d.rate, Some(10 * MIB));
        assert_eq!(d.integral_rate, 0);
    }

    #[test]
    fn the_integral_grows_only_while_the_rate_holds_write_back_back() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t0 = Instant::now();
        let dirty = GIB / 10 + 400 * MIB;
        c.update(t0, sample(dirty, 1, false));
        // A backend slower than the rate: 100 s of updates, no growth.
        let mut t = t0;
        for i in 0..400 {
            t += UPDATE_EVERY;
            let d = c.update(t, sample(dirty, 2 + i, false));
            assert_eq!(d.integral_rate, 0, "wound up while not held back");
        }
        // Held back by the rate: 100 s at 400 MiB excess adds 4 MiB/s.
        for i in 0..400 {
            t += UPDATE_EVERY;
            c.update(t, sample(dirty, 1000 + i, true));
        }
        let d = c.decision();
        let want = 400.0 * MIB as f64 * 100.0 / I_SECONDS2;
        assert!(
            (d.integral_rate as f64 - want).abs() < want * 0.01,
            "integral {} want {want}",
            d.integral_rate
        );
        assert_eq!(d.rate, Some(10 * MIB + d.integral_rate));
        // Below the low watermark it unwinds to zero and no further.
        for i in 0..10_000 {
            t += UPDATE_EVERY;
            c.update(t, sample(0, 5000 + i, false));
        }
        assert_eq!(c.decision().integral_rate, 0);
        assert_eq!(c.decision().rate, Some(MIN_BYTES_PER_SEC));
    }

    #[test]
    fn at_the_high_watermark_or_when_the_guest_waits_write_back_is_unpaced() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t = Instant::now();
        let d = c.update(t, sample(GIB * 7 / 10, 1, true));
        assert_eq!((d.regime, d.rate), (Regime::AboveHigh, None));
        let d = c.update(
            t + UPDATE_EVERY,
            Sample {
                guest_waits: true,
                ..sample(0, 2, true)
            },
        );
        assert_eq!((d.regime, d.rate), (Regime::GuestWaits, None));
        let d = c.update(t + 2 * UPDATE_EVERY, sample(GIB / 2, 3, true));
        assert_eq!(d.regime, Regime::Paced);
        assert!(d.rate.is_some());
    }

    #[test]
    fn a_guest_that_stopped_writing_gets_its_data_written_back_down_to_zero() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t0 = Instant::now();
        // 80 MiB dirty, below the low watermark (102.4 MiB): the minimum.
        let dirty = 80 * MIB;
        c.update(t0, sample(dirty, 7, false));
        let d = c.update(t0 + IDLE_AFTER - UPDATE_EVERY, sample(dirty, 7, false));
        assert_eq!((d.regime, d.rate), (Regime::Paced, Some(MIN_BYTES_PER_SEC)));
        // Idle: the target is zero, so 80 MiB go in 40 s, 2 MiB/s.
        let d = c.update(t0 + IDLE_AFTER, sample(dirty, 7, false));
        assert_eq!((d.regime, d.rate), (Regime::GuestIdle, Some(2 * MIB)));
        assert_eq!(d.low_bytes, 0);
        // It writes again: the low watermark again.
        let d = c.update(t0 + IDLE_AFTER + UPDATE_EVERY, sample(dirty, 8, false));
        assert_eq!((d.regime, d.rate), (Regime::Paced, Some(MIN_BYTES_PER_SEC)));
    }

    #[test]
    fn a_long_gap_between_updates_integrates_one_second_only() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t0 = Instant::now();
        let dirty = GIB / 10 + 100 * MIB;
        c.update(t0, sample(dirty, 1, true));
        let d = c.update(t0 + Duration::from_secs(3600), sample(dirty, 2, true));
        assert_eq!(d.integral_rate, (100.0 * MIB as f64 / I_SECONDS2) as u64);
    }

    #[test]
    fn before_its_first_update_it_paces_at_the_minimum_between_known_watermarks() {
        let d = DirtyController::new(DirtyLevel::default(), GIB).decision();
        assert_eq!((d.regime, d.rate), (Regime::Paced, Some(MIN_BYTES_PER_SEC)));
        assert_eq!((d.low_bytes, d.high_bytes), (GIB / 10, GIB * 7 / 10));
    }

    #[test]
    fn updates_are_due_every_quarter_second() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let t = Instant::now();
        assert!(c.due(t));
        c.update(t, sample(0, 0, false));
        assert!(!c.due(t + UPDATE_EVERY / 2));
        assert!(c.due(t + UPDATE_EVERY));
    }

    #[test]
    fn watermarks_that_cannot_work_are_refused() {
        let ok = DirtyLevel::default();
        assert!(ok.check().is_ok());
        let e = DirtyLevel {
            low_pct: 70,
            high_pct: 70,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.contains("70% is not below the high one 70%"), "{e}");
        let e = DirtyLevel {
            high_pct: 101,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.contains("101%"), "{e}");
        let e = DirtyLevel {
            min_rate: 4096,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.contains("4096 bytes/s"), "{e}");
        let e = DirtyLevel {
            min_rate: u64::MAX,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.contains("above the highest allowed, 1T"), "{e}");
    }

    #[test]
    fn a_huge_minimum_rate_does_not_panic_the_controller() {
        // Refused by `check`, but an unchecked one must not panic either.
        let mut c = DirtyController::new(
            DirtyLevel {
                min_rate: u64::MAX,
                ..DirtyLevel::default()
            },
            GIB,
        );
        let d = c.update(Instant::now(), sample(0, 0, false));
        assert_eq!(d.rate, Some(1 << 50));
    }

    #[test]
    fn the_integral_is_capped_at_the_rate_that_retires_the_cache_in_forty_seconds() {
        let mut c = DirtyController::new(DirtyLevel::default(), GIB);
        let mut t = Instant::now();
        let dirty = GIB / 2;
        for i in 0..10_000 {
            t += UPDATE_EVERY;
            c.update(t, sample(dirty, i, true));
        }
        let cap = (GIB as f64 / P_SECONDS) as u64;
        let d = c.decision();
        assert!(
            d.integral_rate <= cap && d.integral_rate >= cap - 1,
            "{} vs {cap}",
            d.integral_rate
        );
    }
}
