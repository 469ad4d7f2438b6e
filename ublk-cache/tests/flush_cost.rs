//! What a guest FLUSH costs the cache device in `back` mode: format v2 makes
//! one 4 KiB write followed by a FLUSH cost one device flush and one metadata
//! block (a log record written together with the data), where format v1 needs
//! two flushes (data, then the metadata block naming it). Counted with the
//! engine's own stats, on a backend that refuses writes so that no write-back
//! round adds flushes of its own, and then with write-back running: each
//! write-back step's watermark rides in the guest's next round instead of
//! costing a device flush of its own.

use std::sync::Arc;

use std::time::Duration;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::{Backend, FaultyBackend, MemBackend, OpKind};
use ublk_cache::format::FormatVersion;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const MIB: usize = 1 << 20;
const ROUNDS: u64 = 100;

struct Cost {
    flushes: u64,
    meta_bytes: u64,
}

/// A `back` engine with 64 KiB lines; a fresh cache gets `format`.
fn back_engine(
    backend: Arc<FaultyBackend<Arc<MemBackend>>>,
    cache: Arc<dyn Backend>,
    format: FormatVersion,
) -> Arc<Engine> {
    engine_in(CacheMode::Back, backend, cache, format)
}

/// `back_engine` in `mode`.
fn engine_in(
    mode: CacheMode,
    backend: Arc<FaultyBackend<Arc<MemBackend>>>,
    cache: Arc<dyn Backend>,
    format: FormatVersion,
) -> Arc<Engine> {
    Engine::open(
        backend as Arc<dyn Backend>,
        Some(cache),
        EngineConfig {
            mode,
            line_size: Some(64 * 1024),
            format_version: format,
            shadow_dir: testkit::rig::shadow_dir(),
            ..EngineConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("attach ({format:?}): {e}"))
}

/// `ROUNDS` times: a 4 KiB write, then a FLUSH.
fn write_flush_rounds(format: FormatVersion) -> Cost {
    let backend = Arc::new(MemBackend::new(64 * MIB));
    let refusing = Arc::new(FaultyBackend::builder(backend).build());
    refusing.set_read_only(true);
    // A 64 MiB cache has a 2 MiB log: 100 one-block records fit without a
    // checkpoint, so every round is the steady-state cost.
    let cache = Arc::new(MemBackend::new(64 * MIB));
    let e = back_engine(refusing, cache, format);
    let before = e.stats();
    for i in 0..ROUNDS {
        // Spread over lines and within them: new lines, overwrites of
        // flushed data (a new version) and of unflushed data all occur.
        let off = (i * 7 % 40) * 64 * 1024 + (i % 16) * 4096;
        e.write(off, &[i as u8 + 1; 4096], false).expect("write");
        e.flush().expect("flush");
    }
    let after = e.stats();
    e.abandon();
    Cost {
        flushes: after.cache_flushes - before.cache_flushes,
        meta_bytes: after.meta_write_bytes - before.meta_write_bytes,
    }
}

#[test]
fn a_flush_after_one_write_costs_one_device_flush_in_format_v2() {
    let v2 = write_flush_rounds(FormatVersion::V2);
    let v1 = write_flush_rounds(FormatVersion::V1);
    eprintln!(
        "per 4 KiB write + FLUSH: v2 {:.2} device flushes, {} metadata bytes; v1 {:.2} flushes, {} bytes",
        v2.flushes as f64 / ROUNDS as f64,
        v2.meta_bytes / ROUNDS,
        v1.flushes as f64 / ROUNDS as f64,
        v1.meta_bytes / ROUNDS
    );
    assert_eq!(v2.flushes, ROUNDS, "format v2: one cache flush per round");
    assert_eq!(
        v2.meta_bytes,
        ROUNDS * 4096,
        "format v2: one 4 KiB log record per round"
    );
    assert!(
        v1.flushes >= 2 * ROUNDS,
        "format v1 flushes data and metadata separately ({} flushes)",
        v1.flushes
    );
}

/// A guest FLUSH with nothing written since the last one costs no device
/// flush in format v2; a FLUSH after a rewrite of data already there (same
/// version, in place) still costs one. Format v1 flushes every time.
#[test]
fn a_flush_with_nothing_new_costs_no_device_flush_in_format_v2() {
    for format in [FormatVersion::V2, FormatVersion::V1] {
        let backend = Arc::new(MemBackend::new(16 * MIB));
        let refusing = Arc::new(FaultyBackend::builder(backend).build());
        refusing.set_read_only(true);
        let cache = Arc::new(MemBackend::new(16 * MIB));
        let e = back_engine(refusing.clone(), cache.clone(), format);
        e.write(0, &[1; 4096], false).expect("write");
        e.flush().expect("flush");
        let before = e.stats();
        for _ in 0..10 {
            e.flush().expect("empty flush");
        }
        let idle = e.stats();
        let idle_flushes = idle.cache_flushes - before.cache_flushes;
        // In place: the same epoch's version (no FLUSH between the writes).
        e.write(8192, &[2; 4096], false).expect("write");
        e.write(8192, &[3; 4096], false).expect("rewrite");
        e.flush().expect("flush after a rewrite");
        let after = e.stats();
        match format {
            FormatVersion::V2 => {
                assert_eq!(idle_flushes, 0, "v2: empty FLUSHes flushed the device");
                assert_eq!(
                    idle.flushes_with_nothing_new - before.flushes_with_nothing_new,
                    10
                );
                assert_eq!(
                    after.cache_flushes - idle.cache_flushes,
                    1,
                    "v2: a FLUSH after writes"
                );
            }
            FormatVersion::V1 => assert!(idle_flushes >= 10, "v1: {idle_flushes} flushes"),
        }
        e.abandon();
        drop(e);
        // What the FLUSHes promised is on the cache alone (it keeps its format).
        let e = back_engine(refusing, cache, FormatVersion::V2);
        let mut buf = vec![0u8; 12288];
        e.read(0, &mut buf).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 1), "{format:?}");
        assert!(buf[8192..].iter().all(|&b| b == 3), "{format:?}");
        e.abandon();
    }
}

/// With write-back running over a backend that takes a millisecond per write
/// and per flush (and a cache device that takes half of one per flush), a QD1 loop of 4 KiB write + FLUSH still costs one cache
/// device flush per FLUSH: every step's watermark is carried by a guest round
/// (before, each step ran a round of its own: about two flushes per FLUSH).
/// A few own rounds are allowed for a stalled machine (a gap between two
/// FLUSHes longer than the flusher's patience), not one per step.
#[test]
fn write_back_running_adds_no_device_flushes_to_a_flush_loop() {
    const N: u64 = 300;
    for order in [WritebackOrder::Ordered, WritebackOrder::Relaxed] {
        let backend = Arc::new(MemBackend::new(64 * MIB));
        let slow = Arc::new(FaultyBackend::builder(backend.clone()).build());
        slow.set_delay(OpKind::Write, Duration::from_millis(1));
        slow.set_delay(OpKind::Flush, Duration::from_millis(1));
        // A cache device flush takes a little, as on a real device, so that
        // steps and guest rounds interleave as they do in a VM.
        let cache = Arc::new(FaultyBackend::builder(Arc::new(MemBackend::new(64 * MIB))).build());
        cache.set_delay(OpKind::Flush, Duration::from_micros(500));
        let e = Engine::open(
            slow as Arc<dyn Backend>,
            Some(cache as Arc<dyn Backend>),
            EngineConfig {
                mode: CacheMode::Back,
                order,
                line_size: Some(64 * 1024),
                format_version: FormatVersion::V2,
                shadow_dir: testkit::rig::shadow_dir(),
                ..EngineConfig::default()
            },
        )
        .unwrap_or_else(|err| panic!("attach ({order}): {err}"));
        let before = e.stats();
        for i in 0..N {
            let off = (i * 7 % 40) * 64 * 1024 + (i % 16) * 4096;
            e.write(off, &[(i % 250) as u8 + 1; 4096], false)
                .expect("write");
            e.flush().expect("flush");
        }
        let after = e.stats();
        let flushes = after.flushes - before.flushes;
        let device = after.cache_flushes - before.cache_flushes;
        let shared = after.watermark_shared_rounds - before.watermark_shared_rounds;
        let own = after.watermark_own_rounds - before.watermark_own_rounds;
        eprintln!(
            "{order}: {flushes} FLUSHes, {device} device flushes ({:.2} per FLUSH), \
             watermarks {shared} shared / {own} own, {} KiB written back",
            device as f64 / flushes as f64,
            (after.writeback_bytes - before.writeback_bytes) / 1024
        );
        assert!(
            after.writeback_bytes > before.writeback_bytes,
            "{order}: write-back did not run during the loop"
        );
        assert!(
            device <= flushes + flushes / 10 && shared > 0,
            "{order}: {device} device flushes for {flushes} FLUSHes ({own} watermark rounds of their own)"
        );
        e.shutdown().expect("shutdown");
        // Everything reached the backend, newest data last.
        let snap = backend.snapshot();
        for i in N - 40..N {
            let off = ((i * 7 % 40) * 64 * 1024 + (i % 16) * 4096) as usize;
            let newest = (i..N)
                .filter(|&j| (j * 7 % 40) * 64 * 1024 + (j % 16) * 4096 == off as u64)
                .max()
                .expect("i itself");
            let want = (newest % 250) as u8 + 1;
            assert!(
                snap[off..off + 4096].iter().all(|&b| b == want),
                "{order}: offset {off} does not hold write {newest}"
            );
        }
    }
}

/// A FUA write in `back` (format v2) takes one pass: its data is written
/// durable, then one log record is written durable, and the cache device is
/// not flushed but once in 65 rounds (counted at the device: before, a FUA
/// write was a data write, a record write and a flush). After a power cut every FUA write is
/// there, read back from the records that no flush followed.
#[test]
fn a_fua_write_costs_two_durable_writes_and_no_device_flush_in_format_v2() {
    let backend = Arc::new(MemBackend::new(64 * MIB));
    let refusing = Arc::new(FaultyBackend::builder(backend).build());
    refusing.set_read_only(true);
    let mem = Arc::new(MemBackend::new(64 * MIB));
    let cache = Arc::new(FaultyBackend::builder(mem.clone()).build());
    let open = |cache: Arc<dyn Backend>| back_engine(refusing.clone(), cache, FormatVersion::V2);
    let e = open(cache.clone());
    let (dev0, st0) = (cache.stats(), e.stats());
    // Each to a line of its own: no version chain grows while write-back
    // cannot run.
    let at = |i: u64| i * 64 * 1024 + (i % 16) * 4096;
    for i in 0..ROUNDS {
        e.write(at(i), &[i as u8 + 1; 4096], true)
            .expect("FUA write");
    }
    let (dev1, st1) = (cache.stats(), e.stats());
    eprintln!(
        "per FUA write: {:.2} device writes, {:.2} device flushes, {} metadata bytes",
        (dev1.writes - dev0.writes) as f64 / ROUNDS as f64,
        (dev1.flushes - dev0.flushes) as f64 / ROUNDS as f64,
        (st1.meta_write_bytes - st0.meta_write_bytes) / ROUNDS
    );
    // One round in 65 flushes anyway, so that recovery never has more than
    // 64 unflushed records to check.
    assert!(
        dev1.flushes - dev0.flushes <= ROUNDS / 64,
        "{} device flushes",
        dev1.flushes - dev0.flushes
    );
    assert_eq!(dev1.writes - dev0.writes, 2 * ROUNDS, "device writes");
    assert_eq!(st1.fua_one_pass - st0.fua_one_pass, ROUNDS);
    assert_eq!(st1.meta_write_bytes - st0.meta_write_bytes, ROUNDS * 4096);
    // A power cut: no shadow, the log alone.
    e.abandon();
    e.forget_crash_shadow();
    drop(e);
    let e = open(mem as Arc<dyn Backend>);
    for i in 0..ROUNDS {
        let mut buf = vec![0u8; 4096];
        e.read(at(i), &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == i as u8 + 1), "FUA write {i} lost");
    }
    e.abandon();
}

/// A FUA write falls back to a round that flushes when another write went in
/// place while it ran: that write may have rewritten a sector of the FUA
/// write (a partial or overlapping write the guest had in flight), and its
/// data is durable only after a flush. Here the other write goes in place over
/// data of the open epoch while the FUA write's data is on its way. Offline
/// mode, so that no write-back closes the epoch in between.
#[test]
fn a_fua_write_with_an_in_place_write_beside_it_is_flushed() {
    let backend = Arc::new(MemBackend::new(16 * MIB));
    let refusing = Arc::new(FaultyBackend::builder(backend).build());
    refusing.set_read_only(true);
    let cache = Arc::new(FaultyBackend::builder(Arc::new(MemBackend::new(64 * MIB))).build());
    let e = engine_in(
        CacheMode::Offline,
        refusing,
        cache.clone(),
        FormatVersion::V2,
    );
    let beside_at = 16 * 64 * 1024;
    e.write(beside_at, &[6; 4096], false).expect("write");
    let before = e.stats();
    cache.set_delay(OpKind::Write, Duration::from_millis(300));
    let in_flight = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cache.stats().writes_in_flight < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} cache writes never in flight"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let fua = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &[7; 4096], true))
    };
    in_flight(1);
    let beside = {
        let e = e.clone();
        std::thread::spawn(move || e.write(beside_at, &[8; 4096], false))
    };
    in_flight(2);
    fua.join().unwrap().expect("FUA write");
    beside.join().unwrap().expect("write");
    cache.set_delay(OpKind::Write, Duration::ZERO);
    let after = e.stats();
    assert_eq!(
        after.fua_one_pass - before.fua_one_pass,
        0,
        "took the one-pass path"
    );
    assert!(
        after.cache_flushes > before.cache_flushes,
        "the FUA write's round did not flush"
    );
    e.abandon();
}
