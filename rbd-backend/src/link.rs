//! A data link of fixed bandwidth shared by every op that moves data through
//! it, as a saturated network path to Ceph or a busy disk: an op of `n` bytes
//! finishes `n / rate` after the one before it on the link. `FaultyBackend`
//! uses it to make a backend that is slow in bandwidth, not only in latency.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The link's rate and when its last reservation ends.
#[derive(Debug, Default)]
pub(crate) struct Link {
    state: Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    /// Bytes per second; 0: unlimited.
    rate: u64,
    /// When the data reserved so far has passed (None: idle since it was set).
    busy_until: Option<Instant>,
}

impl Link {
    pub(crate) fn set_rate(&self, bytes_per_sec: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.rate = bytes_per_sec;
        s.busy_until = None;
    }

    pub(crate) fn rate(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rate
    }

    /// Reserve `bytes` on the link at `now`: returns when they have passed (an
    /// op sleeps until then). An idle link starts at `now`; a busy one queues
    /// the bytes behind what it already carries (no burst credit for idle time).
    pub(crate) fn reserve(&self, now: Instant, bytes: u64) -> Instant {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.rate == 0 || bytes == 0 {
            return now;
        }
        let start = s.busy_until.map_or(now, |b| b.max(now));
        let secs = bytes as f64 / s.rate as f64;
        let end = start + Duration::from_secs_f64(secs);
        s.busy_until = Some(end);
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn an_unlimited_link_never_waits() {
        let l = Link::default();
        let t = Instant::now();
        assert_eq!(l.reserve(t, 100 * MB), t);
    }

    #[test]
    fn ops_queue_behind_each_other_at_the_rate() {
        let l = Link::default();
        l.set_rate(80 * MB);
        let t = Instant::now();
        // 8 MB at 80 MB/s: 100 ms each, the second behind the first.
        assert_eq!(l.reserve(t, 8 * MB), t + Duration::from_millis(100));
        assert_eq!(l.reserve(t, 8 * MB), t + Duration::from_millis(200));
        // Arriving while the link is busy: behind the queue, not at `now`.
        let later = t + Duration::from_millis(50);
        assert_eq!(l.reserve(later, 8 * MB), t + Duration::from_millis(300));
    }

    #[test]
    fn an_idle_link_starts_at_now_without_credit() {
        let l = Link::default();
        l.set_rate(10 * MB);
        let t = Instant::now();
        assert_eq!(l.reserve(t, MB), t + Duration::from_millis(100));
        // Idle for a second: the next op takes its own time from now, not less.
        let later = t + Duration::from_secs(1);
        assert_eq!(l.reserve(later, MB), later + Duration::from_millis(100));
    }

    #[test]
    fn a_new_rate_applies_to_the_next_op() {
        let l = Link::default();
        l.set_rate(MB);
        let t = Instant::now();
        assert_eq!(l.reserve(t, MB), t + Duration::from_secs(1));
        l.set_rate(0);
        assert_eq!(l.reserve(t, MB), t);
        assert_eq!(l.rate(), 0);
    }
}
