//! Attach, refusal, crash recovery, backpressure and backend-fault behaviour of
//! the engine, on in-memory and fault-injecting backends.

use std::sync::Arc;
use std::time::Duration;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::{Backend, BlockIo, ChangeTracking, FaultyBackend, MemBackend, OpKind};
use testkit::rig::{
    assert_dirty_conflict_refused, assert_refused, back_engine_refusing_write_back, cfg, fill, mem,
    open, read, try_open, MIB,
};
use ublk_cache::target::BlockTarget;
use ublk_cache::{EngineErrorKind, Remedy};

#[test]
fn warm_restart_serves_from_the_cache() {
    let (b, c) = (mem(8 * MIB), mem(4 * MIB));
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(0xab, 256 * 1024), false).unwrap();
    e.shutdown().unwrap();
    assert!(b.snapshot()[..256 * 1024] == fill(0xab, 256 * 1024)[..]);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    let before = e.stats().backend_read_bytes;
    assert!(read(&e, 0, 256 * 1024) == fill(0xab, 256 * 1024));
    assert_eq!(
        e.stats().backend_read_bytes,
        before,
        "a warm read went to the backend"
    );
    assert!(e.stats().read_hit_bytes >= 256 * 1024);
    e.shutdown().unwrap();
}

/// A write the guest issued before a FLUSH completed, to a sector an earlier
/// write holds in the same (open) epoch, goes in place. If the FLUSH's round
/// logged the earlier write's checksum while the later write was still
/// landing, recovery after a power cut found the sector not matching and
/// dropped it: the data the FLUSH had promised was gone (zeroes from the
/// backend here). The FLUSH waits for such a write to apply first; after the
/// power cut the sector holds one of the two writes.
#[test]
fn a_write_in_flight_across_a_flush_cannot_take_flushed_data_with_it() {
    let (b, mem_cache) = testkit::rig::mems(8, 4);
    let fb = testkit::rig::refusing(&b);
    let cache = Arc::new(FaultyBackend::builder(mem_cache.clone()).build());
    let e = open(fb.clone(), cache.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(1, 4096), false).unwrap();
    cache.set_delay(OpKind::Write, Duration::from_millis(300));
    let later = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &fill(3, 4096), false))
    };
    // The later write has taken its epoch and its data is on the way.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().writes_in_flight == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the later write never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    e.flush().unwrap();
    later.join().unwrap().unwrap();
    cache.set_delay(OpKind::Write, Duration::ZERO);
    e.abandon();
    e.forget_crash_shadow();
    drop(e);
    let e = open(fb, mem_cache, cfg(CacheMode::Back));
    let got = read(&e, 0, 4096);
    assert!(
        got == fill(1, 4096) || got == fill(3, 4096),
        "the flushed sector holds neither write (first byte {})",
        got[0]
    );
    e.abandon();
}

/// While attached, the superblock carries the incompat bits an earlier build
/// does not know (a crash shadow of the staged layout, and in format v2 log
/// records that flushed nothing), so such a build refuses a crashed cache
/// rather than ignore what it cannot read; a clean stop clears them.
#[test]
fn a_crashed_cache_is_marked_for_builds_that_cannot_recover_it() {
    use ublk_cache::engine::store::read_superblock;
    use ublk_cache::format::superblock::{INCOMPAT_STAGED_SHADOW, INCOMPAT_UNFLUSHED_RECORDS};
    for version in [
        ublk_cache::format::FormatVersion::V2,
        ublk_cache::format::FormatVersion::V1,
    ] {
        let (b, c) = testkit::rig::mems(8, 4);
        let ecfg = ublk_cache::EngineConfig {
            format_version: version,
            ..cfg(CacheMode::Back)
        };
        let e = open(b.clone(), c.clone(), ecfg.clone());
        e.write(0, &fill(5, 4096), false).unwrap();
        e.abandon();
        let sb = read_superblock(c.as_ref()).unwrap().unwrap();
        let want = match version {
            ublk_cache::format::FormatVersion::V2 => {
                INCOMPAT_STAGED_SHADOW | INCOMPAT_UNFLUSHED_RECORDS
            }
            ublk_cache::format::FormatVersion::V1 => INCOMPAT_STAGED_SHADOW,
        };
        assert_eq!(sb.incompat & want, want, "{version:?} while attached");
        drop(e);
        // Recovered from the shadow, then stopped cleanly.
        let e = open(b, c.clone(), ecfg);
        assert!(read(&e, 0, 4096) == fill(5, 4096), "{version:?}");
        e.shutdown().unwrap();
        let sb = read_superblock(c.as_ref()).unwrap().unwrap();
        assert_eq!(sb.incompat & want, 0, "{version:?} after a clean stop");
    }
}

/// A metadata round whose device flush fails may still have put its log
/// record on the device, and the round is retried under the same sequence
/// number. When the retry's record (it carries more changes by then) no
/// longer fits at the end of the log, it goes to the log's first block; the
/// failed one, intact, must not then be taken for it at recovery, which would
/// end the log there and lose every write that the retry and later rounds
/// made durable. Where the log's head is depends on how many rounds came
/// before, so the test tries each count up to one whole log.
#[test]
fn a_failed_round_left_on_the_log_is_not_taken_for_its_retry() {
    const LINE: u64 = 64 * 1024;
    for before in 0..72u64 {
        let (b, mc) = (mem(8 * MIB), mem(8 * MIB));
        let fb = testkit::rig::refusing(&b);
        let c = Arc::new(FaultyBackend::builder(mc.clone()).build());
        let e = open(
            fb.clone(),
            c.clone(),
            policies_cfg(CacheMode::Back, WritebackOrder::Relaxed),
        );
        let mut want = vec![0u8; 8 * MIB as usize];
        let mut put = |e: &ublk_cache::Engine, off: u64, data: &[u8]| {
            e.write(off, data, false).unwrap();
            want[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
        for i in 0..before {
            put(&e, 0, &testkit::pattern(i + 1, 4096));
            e.flush().expect("a round before the failure");
        }
        // One small round fails at its flush, after its record was written.
        put(&e, LINE, &testkit::pattern(1000 + before, 4096));
        c.fail_next(OpKind::Flush, 1, libc::EIO);
        assert!(
            e.flush().is_err(),
            "the injected flush failure was not seen"
        );
        // The retry carries 48 more lines: a record of several blocks.
        put(
            &e,
            2 * LINE,
            &testkit::pattern(2000 + before, 48 * LINE as usize),
        );
        e.flush().expect("the retried round");
        e.abandon();
        e.forget_crash_shadow();
        let e = open(
            b.clone(),
            mc.clone(),
            policies_cfg(CacheMode::Back, WritebackOrder::Relaxed),
        );
        let got = read(&e, 0, 50 * LINE as usize);
        if let Some(at) = (0..50 * LINE as usize / 4096)
            .find(|&s| got[s * 4096..s * 4096 + 4096] != want[s * 4096..s * 4096 + 4096])
        {
            panic!(
                "after {before} rounds and a failed one, the flushed write at {} was lost",
                at * 4096
            );
        }
        e.abandon();
        e.forget_crash_shadow();
    }
}

fn policies_cfg(mode: CacheMode, order: WritebackOrder) -> ublk_cache::EngineConfig {
    ublk_cache::EngineConfig { order, ..cfg(mode) }
}
#[test]
fn flushed_writes_survive_a_power_cut_and_dirty_data_is_written_back_after() {
    let (b, c, _fb, e) = back_engine_refusing_write_back(8, 4);
    e.write(MIB, &fill(1, 128 * 1024), false).unwrap();
    e.flush().unwrap();
    e.write(2 * MIB, &fill(2, 4096), true).unwrap();
    e.write(3 * MIB, &fill(3, 4096), false).unwrap();
    e.abandon();
    // A power cut also loses the tmpfs crash shadow.
    e.forget_crash_shadow();
    assert!(
        b.snapshot()[MIB as usize..].iter().all(|&x| x == 0),
        "data reached the backend"
    );
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    assert!(
        read(&e, MIB, 128 * 1024) == fill(1, 128 * 1024),
        "flushed write lost"
    );
    assert!(read(&e, 2 * MIB, 4096) == fill(2, 4096), "FUA write lost");
    let unflushed = read(&e, 3 * MIB, 4096);
    assert!(
        unflushed == fill(3, 4096) || unflushed == fill(0, 4096),
        "unflushed sector holds garbage"
    );
    e.shutdown().unwrap();
    assert!(b.snapshot()[MIB as usize..MIB as usize + 128 * 1024] == fill(1, 128 * 1024)[..]);
    assert!(b.snapshot()[2 * MIB as usize..2 * MIB as usize + 4096] == fill(2, 4096)[..]);
}

/// An 8 MiB backend and a 4 MiB cache formatted for it in `back`, cleanly
/// detached: what the refusal tests then damage or attach to another backend.
fn detached_cache() -> (Arc<MemBackend>, Arc<MemBackend>) {
    let (b, c) = (mem(8 * MIB), mem(4 * MIB));
    open(b.clone(), c.clone(), cfg(CacheMode::Back))
        .shutdown()
        .unwrap();
    (b, c)
}

#[test]
fn a_cache_of_another_backend_is_refused() {
    let (_, c) = detached_cache();
    let other = mem(16 * MIB);
    assert_refused(
        try_open(other.clone(), c.clone(), cfg(CacheMode::Back)),
        EngineErrorKind::Mismatch,
        "backend size was",
    );
}

#[test]
fn geometry_mismatch_is_refused_by_name() {
    let (b, c) = detached_cache();
    let mut other = cfg(CacheMode::Back);
    other.line_size = Some(128 * 1024);
    assert_refused(
        try_open(b.clone(), c.clone(), other),
        EngineErrorKind::Mismatch,
        "65536-byte lines",
    );
}

#[test]
fn corrupt_superblock_and_metadata_are_refused_not_served() {
    let (b, c) = detached_cache();
    // Both superblock copies damaged.
    let mut raw = c.snapshot();
    raw[100] ^= 0xff;
    raw[4096 + 100] ^= 0xff;
    let c2 = Arc::new(MemBackend::builder().data(raw).build());
    assert_refused(
        try_open(b.clone(), c2.clone(), cfg(CacheMode::Back)),
        EngineErrorKind::Corrupt,
        "superblock",
    );
    // One metadata entry damaged.
    let mut raw = c.snapshot();
    raw[64 * 1024 + 40] ^= 0x01;
    let c3 = Arc::new(MemBackend::builder().data(raw).build());
    assert_refused(
        try_open(b.clone(), c3.clone(), cfg(CacheMode::Back)),
        EngineErrorKind::Corrupt,
        "line entry 1",
    );
}

#[test]
fn one_torn_superblock_copy_is_survived() {
    let (b, c) = (mem(8 * MIB), mem(4 * MIB));
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(7, 4096), false).unwrap();
    e.shutdown().unwrap();
    let mut raw = c.snapshot();
    // Whichever copy is newest, damaging one leaves the other.
    raw[200] ^= 0xff;
    let c2 = Arc::new(MemBackend::builder().data(raw).build());
    let e = open(b.clone(), c2.clone(), cfg(CacheMode::Back));
    assert!(read(&e, 0, 4096) == fill(7, 4096));
}

#[test]
fn a_device_holding_other_data_is_not_formatted_without_asking() {
    let b = mem(8 * MIB);
    let mut raw = vec![0u8; 4 * MIB as usize];
    raw[1024..1028].copy_from_slice(b"\x53\xef\x01\x00");
    let c = Arc::new(MemBackend::builder().data(raw).build());
    let err = assert_refused(
        try_open(b.clone(), c.clone(), cfg(CacheMode::Back)),
        EngineErrorKind::NotEmpty,
        "first MiB is not empty",
    );
    assert_eq!(err.remedies(), [Remedy::Format], "{err}");
    let mut f = cfg(CacheMode::Back);
    f.format = true;
    open(b.clone(), c.clone(), f).shutdown().unwrap();
}

#[test]
fn offline_mode_refuses_a_cache_smaller_than_the_image() {
    let (b, c) = (mem(8 * MIB), mem(4 * MIB));
    let err = assert_refused(
        try_open(b.clone(), c.clone(), cfg(CacheMode::Offline)),
        EngineErrorKind::Config,
        "image",
    );
    assert!(!err.to_string().contains("  "), "stray spaces: {err}");
}

#[test]
fn backend_changed_behind_a_clean_cache_drops_clean_data() {
    let dir = tempfile::tempdir().unwrap();
    let bpath = dir.path().join("backend.img");
    std::fs::write(&bpath, vec![0u8; 4 * MIB as usize]).unwrap();
    let c = mem(2 * MIB);
    let open_file = || -> Arc<dyn Backend> {
        Arc::new(
            rbd_backend::FileBackend::open(&bpath, rbd_backend::OpenOptions::default()).unwrap(),
        )
    };
    let e = open(open_file(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(5, 65536), false).unwrap();
    assert!(read(&e, 0, 65536) == fill(5, 65536));
    e.shutdown().unwrap();
    // Someone else writes the image while we are detached.
    std::thread::sleep(Duration::from_millis(20));
    let mut raw = std::fs::read(&bpath).unwrap();
    raw[..65536].fill(9);
    std::fs::write(&bpath, raw).unwrap();
    let e = open(open_file(), c.clone(), cfg(CacheMode::Back));
    assert!(
        read(&e, 0, 65536) == fill(9, 65536),
        "stale cached data was served"
    );
    e.shutdown().unwrap();
}

#[test]
fn backend_changed_with_dirty_data_is_refused_naming_both_ways_forward() {
    let dir = tempfile::tempdir().unwrap();
    let bpath = dir.path().join("backend.img");
    std::fs::write(&bpath, vec![0u8; 4 * MIB as usize]).unwrap();
    let c = mem(2 * MIB);
    let open_file = || -> Arc<dyn Backend> {
        Arc::new(
            rbd_backend::FileBackend::open(&bpath, rbd_backend::OpenOptions::default()).unwrap(),
        )
    };
    // The backend refuses writes while attached, so the data is certainly still
    // dirty at detach (the flusher would otherwise race the test and clean it).
    let refusing = Arc::new(FaultyBackend::builder(open_file()).build());
    refusing.set_read_only(true);
    let e = open(refusing.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(5, 65536), false).unwrap();
    e.detach_keep_dirty().unwrap();
    assert_eq!(e.stats().dirty_lines, 1);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&bpath, vec![1u8; 4 * MIB as usize]).unwrap();
    assert_dirty_conflict_refused(try_open(open_file(), c.clone(), cfg(CacheMode::Back)));
    let mut accept = cfg(CacheMode::Back);
    accept.accept_backend_change = true;
    let e = open(open_file(), c.clone(), accept);
    assert!(read(&e, 0, 65536) == fill(5, 65536));
    e.shutdown().unwrap();
    assert!(std::fs::read(&bpath).unwrap()[..65536] == fill(5, 65536)[..]);
}

#[test]
fn full_cache_of_dirty_data_applies_backpressure_instead_of_failing() {
    let b = mem(32 * MIB);
    let slow = Arc::new(
        FaultyBackend::builder(b.clone())
            .write_delay(Duration::from_millis(2))
            .build(),
    );
    // 16 lines of 64 KiB: 1 MiB of cache for a 32 MiB disk.
    let c = mem(2 * MIB);
    let e = open(slow, c, cfg(CacheMode::Back));
    let chunk = 256 * 1024;
    for i in 0..16u64 {
        e.write(i * chunk as u64, &fill(i as u8 + 1, chunk), false)
            .unwrap();
    }
    e.shutdown().unwrap();
    let snap = b.snapshot();
    for i in 0..16usize {
        assert!(
            snap[i * chunk..(i + 1) * chunk]
                .iter()
                .all(|&x| x == i as u8 + 1),
            "chunk {i}"
        );
    }
}

#[test]
fn write_back_keeps_data_dirty_while_the_backend_refuses_and_resumes_after() {
    let b = mem(8 * MIB);
    let fb = Arc::new(FaultyBackend::builder(b.clone()).build());
    fb.set_read_only(true);
    let c = mem(4 * MIB);
    let e = open(fb.clone(), c, cfg(CacheMode::Back));
    e.write(0, &fill(4, 65536), false).unwrap();
    e.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(e.stats().backend_errors > 0, "the flusher never tried");
    assert_eq!(
        e.stats().dirty_lines,
        1,
        "dirty data dropped after a refused write-back"
    );
    assert!(read(&e, 0, 65536) == fill(4, 65536));
    fb.set_read_only(false);
    e.shutdown().unwrap();
    assert!(b.snapshot()[..65536] == fill(4, 65536)[..]);
}

#[test]
fn through_mode_reports_backend_errors_to_the_guest() {
    let b = mem(8 * MIB);
    let fb = Arc::new(FaultyBackend::builder(b.clone()).build());
    let c = mem(4 * MIB);
    let e = open(fb.clone(), c, cfg(CacheMode::Through));
    e.write(0, &fill(1, 8192), false).unwrap();
    fb.fail_next(OpKind::Write, 1, libc::EIO);
    let err = e.write(0, &fill(2, 8192), false).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    // The failed range was dropped from the cache: reads show what the backend holds.
    assert!(read(&e, 0, 8192) == b.snapshot()[..8192].to_vec());
}

#[test]
fn concurrent_writers_and_readers_on_disjoint_ranges() {
    for mode in [CacheMode::Back, CacheMode::Through, CacheMode::Around] {
        let b = mem(16 * MIB);
        let c = mem(3 * MIB);
        let e = open(b.clone(), c.clone(), cfg(mode));
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let e = &e;
                s.spawn(move || {
                    let base = t * 2 * MIB;
                    for round in 0..40u64 {
                        let off = base + (round * 37 % 64) * 16384;
                        let data = fill((t * 40 + round) as u8, 12288);
                        e.write(off, &data, round % 9 == 0).unwrap();
                        if round % 5 == 0 {
                            e.flush().unwrap();
                        }
                        assert!(read(e, off, 12288) == data, "mode {mode} thread {t}");
                    }
                });
            }
        });
        e.shutdown().unwrap();
        let e = open(b.clone(), c.clone(), cfg(mode));
        for t in 0..6u64 {
            let off = t * 2 * MIB + (39 * 37 % 64) * 16384;
            assert!(
                read(&e, off, 12288) == fill((t * 40 + 39) as u8, 12288),
                "mode {mode}"
            );
        }
        e.shutdown().unwrap();
    }
}

#[test]
fn relaxed_and_ordered_orders_both_reach_the_same_final_state() {
    for order in [WritebackOrder::Ordered, WritebackOrder::Relaxed] {
        let (b, c) = (mem(4 * MIB), mem(2 * MIB));
        let mut conf = cfg(CacheMode::Back);
        conf.order = order;
        let e = open(b.clone(), c.clone(), conf);
        for i in 0..50u8 {
            e.write((i as u64 % 7) * 65536, &fill(i, 65536), false)
                .unwrap();
            e.flush().unwrap();
        }
        e.shutdown().unwrap();
        for k in 0..7u64 {
            let last = (0..50u8).filter(|i| *i as u64 % 7 == k).max().unwrap();
            assert_eq!(b.snapshot()[(k * 65536) as usize], last, "{order}");
        }
    }
}

/// A backend that reports precise changed ranges, as an RBD snapshot diff does.
struct RangeReporting {
    inner: Arc<MemBackend>,
    changed: std::sync::Mutex<Option<Vec<(u64, u64)>>>,
}

impl BlockIo for RangeReporting {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, o: u64, b: &mut [u8]) -> rbd_backend::Result<()> {
        self.inner.read_at(o, b)
    }

    fn write_at(&self, o: u64, b: &[u8]) -> rbd_backend::Result<()> {
        self.inner.write_at(o, b)
    }

    fn flush(&self) -> rbd_backend::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, o: u64, n: u64) -> rbd_backend::Result<()> {
        self.inner.discard(o, n)
    }

    fn write_zeroes(&self, o: u64, n: u64) -> rbd_backend::Result<()> {
        self.inner.write_zeroes(o, n)
    }
}

impl Backend for RangeReporting {
    fn identity(&self) -> rbd_backend::BackendIdentity {
        self.inner.identity()
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        Some(self)
    }
}

impl ChangeTracking for RangeReporting {
    fn change_marker(&self) -> rbd_backend::Result<Option<String>> {
        Ok(Some("snap-1".into()))
    }

    fn changes_since(&self, marker: &str) -> rbd_backend::Result<rbd_backend::BackendChanges> {
        assert_eq!(
            marker, "snap-1",
            "the marker recorded at detach is handed back"
        );
        Ok(match self.changed.lock().unwrap().clone() {
            Some(r) => rbd_backend::BackendChanges::Ranges(r),
            None => rbd_backend::BackendChanges::Unchanged,
        })
    }
}

#[test]
fn changed_ranges_reported_by_the_backend_drop_only_those_lines() {
    let inner = mem(8 * MIB);
    let rb = Arc::new(RangeReporting {
        inner: inner.clone(),
        changed: std::sync::Mutex::new(None),
    });
    let c = mem(4 * MIB);
    let e = open(rb.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(1, 65536), false).unwrap();
    e.write(MIB, &fill(2, 65536), false).unwrap();
    e.shutdown().unwrap();
    // Someone rewrites both lines behind us, but the backend reports only the first.
    inner.write_at(0, &fill(8, 65536)).unwrap();
    inner.write_at(MIB, &fill(9, 65536)).unwrap();
    *rb.changed.lock().unwrap() = Some(vec![(4096, 100)]);
    let e = open(rb.clone(), c, cfg(CacheMode::Back));
    assert!(
        read(&e, 0, 65536) == fill(8, 65536),
        "a reported range was served from the cache"
    );
    // The unreported line is still cached (this proves only the reported range was dropped).
    assert!(read(&e, MIB, 65536) == fill(2, 65536));
    e.shutdown().unwrap();
}

#[test]
fn a_daemon_crash_keeps_every_acknowledged_write_and_the_warm_cache() {
    let (b, c, fb, e) = back_engine_refusing_write_back(8, 4);
    // Written and acknowledged, never flushed: only the shadow knows.
    e.write(MIB, &fill(1, 128 * 1024), false).unwrap();
    e.write(2 * MIB + 512, &fill(2, 1024), false).unwrap();
    e.abandon();
    fb.set_read_only(false);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    let before = e.stats().backend_read_bytes;
    assert!(
        read(&e, MIB, 128 * 1024) == fill(1, 128 * 1024),
        "acknowledged write lost in a daemon crash"
    );
    assert!(read(&e, 2 * MIB + 512, 1024) == fill(2, 1024));
    assert_eq!(
        e.stats().backend_read_bytes,
        before,
        "recovered lines were not served from the cache"
    );
    e.shutdown().unwrap();
    assert!(b.snapshot()[MIB as usize..MIB as usize + 128 * 1024] == fill(1, 128 * 1024)[..]);
}

#[test]
fn a_shadow_left_by_another_attach_is_not_trusted() {
    let (b, c) = (mem(8 * MIB), mem(4 * MIB));
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(1, 4096), false).unwrap();
    e.flush().unwrap();
    e.abandon();
    // A second crash of a later attach whose shadow is gone: the first shadow
    // must not come back to life.
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &fill(2, 4096), false).unwrap();
    e.flush().unwrap();
    e.abandon();
    e.forget_crash_shadow();
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    assert!(
        read(&e, 0, 4096) == fill(2, 4096),
        "old shadow or stale table used"
    );
    e.shutdown().unwrap();
}
