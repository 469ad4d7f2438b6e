//! Cache hits that span lines: how many cache-device reads a request costs (one
//! for lines that lie side by side on the cache device), and that what those
//! reads return is the data written, also where a line's newest version lies
//! in another slot.

use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{FaultyBackend, MemBackend};
use testkit::rig::{cfg, mem, open, read, refusing, MIB};
use testkit::rng::pattern;
use ublk_cache::target::BlockTarget;

const LINE: usize = 64 * 1024;

/// An engine over an 8 MiB backend whose 4 MiB cache counts its reads.
fn counted(mode: CacheMode) -> (Arc<ublk_cache::Engine>, Arc<FaultyBackend<Arc<MemBackend>>>) {
    let cache = Arc::new(FaultyBackend::new(mem(4 * MIB)));
    let e = open(mem(8 * MIB), cache.clone(), cfg(mode));
    (e, cache)
}

#[test]
fn a_hit_across_lines_side_by_side_in_the_cache_is_one_cache_read() {
    // Through: every write lands in the cache too, and nothing is written back
    // (write-back would read the cache device behind the count).
    let (e, cache) = counted(CacheMode::Through);
    let data = pattern(1, 4 * LINE);
    e.write(0, &data, false).unwrap();
    // From the middle of line 0 to the middle of line 3.
    let (off, len) = (8192, 3 * LINE);
    let before = cache.stats().reads;
    assert_eq!(read(&e, off as u64, len), data[off..off + len]);
    let reads = cache.stats().reads - before;
    assert_eq!(
        reads, 1,
        "four lines written in one request lie side by side: one cache read"
    );
}

#[test]
fn a_hit_across_lines_reads_each_line_from_its_newest_version() {
    // The backend refuses write-back, so line 1's first version stays dirty
    // and its rewrite in a newer epoch goes to another slot: the run of
    // side-by-side lines breaks there.
    let b = mem(8 * MIB);
    let e = open(refusing(&b), mem(4 * MIB), cfg(CacheMode::Back));
    let mut reference = pattern(1, 4 * LINE);
    e.write(0, &reference, false).unwrap();
    e.flush().unwrap();
    let newer = pattern(100, LINE);
    e.write(LINE as u64, &newer, false).unwrap();
    reference[LINE..2 * LINE].copy_from_slice(&newer);
    assert_eq!(
        read(&e, 4096, 4 * LINE - 8192),
        reference[4096..4 * LINE - 4096]
    );
    e.flush().unwrap();
    assert_eq!(read(&e, 0, 4 * LINE), reference);
}

#[test]
fn boot_prefetch_of_adjacent_lines_is_one_backend_read_that_later_reads_need_not_repeat() {
    use rbd_backend::BlockIo;
    let b = mem(8 * MIB);
    let data = pattern(7, 8 * LINE);
    b.write_at(0, &data).unwrap();
    let backend = Arc::new(FaultyBackend::new(b));
    let e = open(backend.clone(), mem(4 * MIB), cfg(CacheMode::Back));
    let reads = || backend.stats().reads;
    // Lines 0-3, none cached: one read of all four.
    let r0 = reads();
    let l = LINE as u64;
    assert_eq!(e.prefetch_lines(0, 4 * l).unwrap(), vec![l; 4]);
    assert_eq!(reads() - r0, 1, "adjacent missing lines: one backend read");
    assert_eq!(
        read(&e, 0, 4 * LINE),
        data[..4 * LINE],
        "a hit, no backend read"
    );
    assert_eq!(
        e.prefetch_lines(0, 4 * l).unwrap(),
        vec![0; 4],
        "cached now"
    );
    assert_eq!(reads() - r0, 1);
    // Lines 4-7 with 4 KiB of line 5 read by the guest first: per line, what
    // was missing; the cached piece splits the backend read in two.
    assert_eq!(read(&e, 5 * l, 4096), data[5 * LINE..5 * LINE + 4096]);
    let r1 = reads();
    assert_eq!(
        e.prefetch_lines(4 * l, 4 * l).unwrap(),
        vec![l, l - 4096, l, l]
    );
    assert_eq!(reads() - r1, 2);
    assert_eq!(read(&e, 0, 8 * LINE), data);
    assert_eq!(reads() - r1, 2, "all of it cached");
}
