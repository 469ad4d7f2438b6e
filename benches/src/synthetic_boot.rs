//! A deterministic synthetic boot, as an io-trace (the format of
//! `ublk-cache serve --io-trace`), for the boot-prefetch benchmark
//! (`benches/boot-prefetch.py`, issue 13; the shape is beyond.md §A.4's):
//!
//! - the read set is `read_pct` (6.5) % of the disk, the share of an image a
//!   system reads at start in the published measurements (Slacker, DADI,
//!   AWS Lambda);
//! - 70 % of it in runs of 4–256 KiB scattered over the first half of the
//!   disk (libraries, configuration, metadata), 30 % in files of 1–8 MiB
//!   anywhere on it, read front to back;
//! - reads of at most 128 KiB (the kernel's default readahead), on
//!   `streams` (4) parallel streams (systemd starts services in parallel),
//!   each request issued a think time after the stream's previous one
//!   completed;
//! - a few 4 KiB writes to a log area at the end of the disk, and a flush
//!   every 32 of them.
//!
//! Think times are an assumed mix (70 % 20–300 µs, 25 % 1–5 ms, 5 % 10–40
//! ms of CPU work), not drawn from a recording: the recorded Debian boot of
//! the issue is not made yet. Completion times are those of a device with
//! `read_latency` per request plus 200 MB/s, which is what the replay's
//! dependencies and think times are measured from.
//!
//! `drift_pct` makes another boot of the same system: that share of each
//! kind's runs replaced by others (a different seed picks them), and the
//! runs in another order with other think times, as when a package update
//! or another service order changes what a boot reads.

use std::collections::BTreeMap;
use std::time::Duration;

use testkit::Rng;
use ublk_cache::io_trace::{TraceOp, TraceRecord};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const MAX_REQUEST: u64 = 128 * KIB;
const LOG_AREA: u64 = 64 * MIB;

#[derive(Debug, Clone)]
pub struct BootShape {
    pub disk: u64,
    /// Percent of the disk the boot reads.
    pub read_pct: f64,
    pub streams: usize,
    /// The recording device's time per request (before its bandwidth).
    pub read_latency: Duration,
    pub seed: u64,
    /// Percent of the runs that another boot reads instead (0: this boot).
    pub drift_pct: u64,
    pub drift_seed: u64,
}

impl Default for BootShape {
    fn default() -> Self {
        Self {
            disk: 2 << 30,
            read_pct: 6.5,
            streams: 4,
            read_latency: Duration::from_millis(5),
            seed: 1,
            drift_pct: 0,
            drift_seed: 2,
        }
    }
}

/// A run: (offset, length), read front to back.
type Run = (u64, u64);

/// Runs that do not overlap, totalling about `bytes`, each of a length from
/// `len` and inside `0..area`.
fn runs(
    rng: &mut Rng,
    taken: &mut BTreeMap<u64, u64>,
    bytes: u64,
    area: u64,
    len: impl Fn(&mut Rng) -> u64,
) -> Vec<Run> {
    let mut out = Vec::new();
    let mut got = 0;
    let mut tries = 0;
    while got < bytes && tries < 1_000_000 {
        tries += 1;
        let n = len(rng);
        if n >= area {
            continue;
        }
        let off = rng.below((area - n) / (4 * KIB)) * 4 * KIB;
        let before = taken.range(..off + n).next_back();
        if before.is_some_and(|(&s, &l)| s + l > off) {
            continue;
        }
        taken.insert(off, n);
        out.push((off, n));
        got += n;
    }
    out
}

/// The runs a boot of `seed` reads: scattered ones, and files.
fn boot_runs(shape: &BootShape, seed: u64, taken: &mut BTreeMap<u64, u64>) -> [Vec<Run>; 2] {
    let mut rng = Rng::new(seed);
    let set = (shape.disk as f64 * shape.read_pct / 100.0) as u64;
    let data = shape.disk.saturating_sub(LOG_AREA);
    let scattered = runs(&mut rng, taken, set * 7 / 10, data / 2, |r| {
        (1 + r.below(64)) * 4 * KIB
    });
    let files = runs(&mut rng, taken, set * 3 / 10, data, |r| {
        (1 + r.below(8)) * MIB
    });
    [scattered, files]
}

/// `v` in a random order (Fisher-Yates).
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn think(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..70 => 20 + rng.below(280),
        70..95 => 1000 + rng.below(4000),
        _ => 10_000 + rng.below(30_000),
    }
}

/// The boot's requests, in completion order (as a server writes them).
pub fn generate(shape: &BootShape) -> Vec<TraceRecord> {
    let mut taken = BTreeMap::new();
    let mut kinds = boot_runs(shape, shape.seed, &mut taken);
    let mut order = Rng::new(shape.seed ^ 0x5eed);
    if shape.drift_pct > 0 {
        // Others of the same kinds in place of `drift_pct` % of each kind's
        // runs (so the read set keeps its size), and another order.
        let others = boot_runs(
            &BootShape {
                read_pct: shape.read_pct * shape.drift_pct as f64 / 100.0,
                ..shape.clone()
            },
            shape.drift_seed,
            &mut taken,
        );
        let mut pick = Rng::new(shape.drift_seed);
        for (runs, others) in kinds.iter_mut().zip(others) {
            let k = (runs.len() as u64 * shape.drift_pct).div_ceil(100) as usize;
            // Which runs are replaced: the first k of a shuffled order (no
            // run twice).
            let mut at: Vec<usize> = (0..runs.len()).collect();
            shuffle(&mut at, &mut pick);
            for (&i, r) in at.iter().zip(others).take(k) {
                runs[i] = r;
            }
        }
        order = Rng::new(shape.drift_seed ^ 0x5eed);
    }
    let [mut runs, files] = kinds;
    runs.extend(files);
    shuffle(&mut runs, &mut order);
    let mut rng = order;
    let streams = shape.streams.max(1);
    let latency = |len: u64| shape.read_latency.as_micros() as u64 + len * 1_000_000 / (200 * MIB);
    let mut out = Vec::new();
    let mut writes = 0u64;
    for s in 0..streams {
        let mut t = rng.below(2000);
        for &(off, len) in runs.iter().skip(s).step_by(streams) {
            let mut at = off;
            while at < off + len {
                let n = MAX_REQUEST.min(off + len - at);
                let done = t + latency(n);
                out.push(TraceRecord {
                    submit_us: t,
                    complete_us: done,
                    op: TraceOp::Read,
                    offset: at,
                    len: n,
                    result: 0,
                });
                t = done + think(&mut rng);
                at += n;
                if rng.chance(3) {
                    let w = shape.disk - LOG_AREA + rng.below(LOG_AREA / (4 * KIB)) * 4 * KIB;
                    let done = t + latency(4 * KIB);
                    out.push(TraceRecord {
                        submit_us: t,
                        complete_us: done,
                        op: TraceOp::Write,
                        offset: w,
                        len: 4 * KIB,
                        result: 0,
                    });
                    t = done + think(&mut rng);
                    writes += 1;
                    if writes.is_multiple_of(32) {
                        let done = t + shape.read_latency.as_micros() as u64;
                        out.push(TraceRecord {
                            submit_us: t,
                            complete_us: done,
                            op: TraceOp::Flush,
                            offset: 0,
                            len: 0,
                            result: 0,
                        });
                        t = done + think(&mut rng);
                    }
                }
            }
        }
    }
    out.sort_by_key(|r| (r.complete_us, r.submit_us));
    out
}

/// `records` as an io-trace file.
pub fn render(records: &[TraceRecord]) -> String {
    let mut s =
        String::from("# ublk-cache io-trace 1\n# submit_us complete_us op offset len result\n");
    for r in records {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    s.push_str("# dropped 0\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use ublk_cache::io_trace::Trace;

    fn read_lines(t: &[TraceRecord]) -> HashSet<u64> {
        t.iter()
            .filter(|r| r.op == TraceOp::Read)
            .flat_map(|r| r.offset / (64 * KIB)..(r.offset + r.len).div_ceil(64 * KIB))
            .collect()
    }

    #[test]
    fn the_boot_has_its_shape_and_is_the_same_every_time() {
        let shape = BootShape::default();
        let t = generate(&shape);
        assert_eq!(t, generate(&shape), "deterministic");
        let reads: Vec<&TraceRecord> = t.iter().filter(|r| r.op == TraceOp::Read).collect();
        let bytes: u64 = reads.iter().map(|r| r.len).sum();
        let want = shape.disk as f64 * 0.065;
        assert!(
            (bytes as f64) > want * 0.99 && (bytes as f64) < want * 1.05,
            "{bytes} bytes read, not 6.5 % of the disk"
        );
        assert!(reads
            .iter()
            .all(|r| r.len <= MAX_REQUEST && r.offset + r.len <= shape.disk));
        let mut seen = HashSet::new();
        assert!(
            reads.iter().all(|r| seen.insert(r.offset)),
            "no offset read twice"
        );
        assert!(
            t.iter().any(|r| r.op == TraceOp::Write) && t.iter().any(|r| r.op == TraceOp::Flush)
        );
        // At most `streams` requests in flight at any time.
        let mut ev: Vec<(u64, i32)> = t
            .iter()
            .flat_map(|r| [(r.submit_us, 1), (r.complete_us, -1)])
            .collect();
        ev.sort_by_key(|&(at, d)| (at, d));
        let mut depth = 0;
        let max = ev.iter().map(|&(_, d)| {
            depth += d;
            depth
        });
        assert_eq!(max.max(), Some(shape.streams as i32));
        let text = render(&t);
        let back = Trace::parse(&text, std::path::Path::new("synthetic")).unwrap();
        assert_eq!(back.records, t, "it parses as an io-trace");
    }

    fn read_bytes(t: &[TraceRecord]) -> u64 {
        t.iter()
            .filter(|r| r.op == TraceOp::Read)
            .map(|r| r.len)
            .sum()
    }

    #[test]
    fn a_drifted_boot_reads_mostly_the_same_lines_and_about_as_much() {
        let (a, b) = (
            generate(&BootShape::default()),
            generate(&BootShape {
                drift_pct: 10,
                ..BootShape::default()
            }),
        );
        let ratio = read_bytes(&b) as f64 / read_bytes(&a) as f64;
        assert!((0.9..1.1).contains(&ratio), "{ratio:.3} as many bytes");
        let (base, other) = (read_lines(&a), read_lines(&b));
        let common = base.intersection(&other).count() as f64;
        let share = common / base.len() as f64;
        assert!(
            (0.8..0.97).contains(&share),
            "{share:.3} of the lines in common"
        );
    }
}
