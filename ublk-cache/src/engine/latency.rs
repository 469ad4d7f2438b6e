//! Per-operation latency histograms, cheap enough for every request: a fixed
//! set of log-linear buckets (4 per power of two, from 1 µs to about 2 minutes)
//! of atomic counters. Percentiles are read off a snapshot, so the request path
//! never takes a lock for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The request kinds that get their own histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    /// Discard and write-zeroes.
    Discard,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Flush, Op::Discard];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
        }
    }
}

const SUB: u32 = 4;
/// Powers of two covered above 1 µs: 2^27 µs is about 134 s.
const OCTAVES: u32 = 27;
const BUCKETS: usize = (OCTAVES * SUB) as usize + 1;

/// Bucket index of a latency in microseconds.
fn bucket(us: u64) -> usize {
    if us < 1 {
        return 0;
    }
    let octave = 63 - us.leading_zeros();
    // The two bits below the leading one pick the quarter of the octave.
    let frac = if octave >= 2 {
        ((us >> (octave - 2)) & 3) as u32
    } else {
        ((us << (2 - octave)) & 3) as u32
    };
    ((octave * SUB + frac) as usize + 1).min(BUCKETS - 1)
}

/// Upper edge of bucket `i`, in microseconds (what a percentile reports).
/// Every fourth edge is a power of two: exporters can re-bucket exactly there.
pub fn bucket_upper_us(i: usize) -> u64 {
    if i == 0 {
        return 1;
    }
    let k = (i - 1) as u32;
    let (octave, frac) = (k / SUB, k % SUB);
    let base = 1u64 << octave;
    base + (base * (frac as u64 + 1)) / SUB as u64
}

struct Histogram {
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
pub struct Latencies {
    per_op: [Histogram; 4],
}

/// Percentiles of one operation's latency since start, in microseconds
/// (bucket upper bounds: at most 19% above the true value).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LatencySnapshot {
    pub op: String,
    pub count: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_bucket_us: u64,
    /// The count of each bucket (upper edges from [`bucket_upper_us`]), for
    /// exporters of histograms; not part of the stats JSON.
    #[serde(skip)]
    pub buckets: Vec<u64>,
}

impl Latencies {
    pub fn record(&self, op: Op, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let h = &self.per_op[op as usize];
        h.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        h.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<LatencySnapshot> {
        Op::ALL
            .iter()
            .map(|&op| {
                let h = &self.per_op[op as usize];
                let counts: Vec<u64> = h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                let count: u64 = counts.iter().sum();
                let pct = |p: f64| -> u64 {
                    if count == 0 {
                        return 0;
                    }
                    let want = ((count as f64) * p).ceil().max(1.0) as u64;
                    let mut seen = 0;
                    for (i, c) in counts.iter().enumerate() {
                        seen += c;
                        if seen >= want {
                            return bucket_upper_us(i);
                        }
                    }
                    bucket_upper_us(BUCKETS - 1)
                };
                let max_bucket_us = counts
                    .iter()
                    .rposition(|&c| c > 0)
                    .map_or(0, bucket_upper_us);
                LatencySnapshot {
                    op: op.as_str().to_string(),
                    count,
                    mean_us: h
                        .sum_us
                        .load(Ordering::Relaxed)
                        .checked_div(count)
                        .unwrap_or(0),
                    p50_us: pct(0.50),
                    p90_us: pct(0.90),
                    p99_us: pct(0.99),
                    p999_us: pct(0.999),
                    max_bucket_us,
                    buckets: counts,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_latency_falls_in_a_bucket_whose_upper_edge_is_close_above_it() {
        for us in [0u64, 1, 2, 3, 5, 7, 100, 1000, 1234, 65_536, 10_000_000] {
            let b = bucket(us);
            let up = bucket_upper_us(b);
            assert!(up >= us.max(1), "{us} µs: bucket {b} ends at {up}");
            assert!(
                up as f64 <= (us.max(1) as f64) * 1.26 + 1.0,
                "{us} µs: {up}"
            );
            if b > 0 {
                assert!(bucket_upper_us(b - 1) <= us.max(1), "{us}: previous bucket");
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_follow_the_recorded_distribution() {
        let l = Latencies::default();
        for _ in 0..900 {
            l.record(Op::Read, Duration::from_micros(100));
        }
        for _ in 0..100 {
            l.record(Op::Read, Duration::from_millis(10));
        }
        let s = &l.snapshot()[0];
        assert_eq!(s.op, "read");
        assert_eq!(s.count, 1000);
        assert!((100..=126).contains(&s.p50_us), "{s:?}");
        assert!((100..=126).contains(&s.p90_us), "{s:?}");
        assert!((10_000..=12_600).contains(&s.p99_us), "{s:?}");
        assert_eq!(l.snapshot()[1].count, 0);
        assert_eq!(l.snapshot()[1].p99_us, 0);
    }
}
