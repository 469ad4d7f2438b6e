//! Live operations on a serving engine: mode switches under concurrent writes,
//! preload, offline hydration and its resumption, invalidation, and the
//! migration handover, each checked against a plain reference of what was written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use policies::{BackendPriority, CacheMode, DirtyLevel, WritebackLimit};
use rbd_backend::{Backend, FaultyBackend, MemBackend};
use testkit::rig::{
    assert_refused, back_engine_refusing_write_back, back_engine_refusing_write_back_on, cfg, mems,
    open, read, refusing, try_open, writes_during, MIB,
};
use ublk_cache::engine::PreloadOptions;
use ublk_cache::format::layout::FormatVersion;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig, EngineErrorKind, Remedy};

#[test]
fn switching_from_back_drains_with_writes_going_on_and_loses_nothing() {
    let size = 8 * MIB;
    let (b, c) = mems(8, 4);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    let progress = Mutex::new(Vec::new());
    let reference = writes_during(&e, size, 2, || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let prev = e
            .set_mode(
                CacheMode::Through,
                Some(&|p| progress.lock().unwrap().push(p.clone())),
            )
            .expect("switch to through");
        assert_eq!(prev, CacheMode::Back);
        // From here every write goes through, so nothing new is dirty.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(e.stats().dirty_bytes, 0);
    });
    assert_eq!(e.mode(), CacheMode::Through);
    assert_eq!(
        e.stats().dirty_bytes,
        0,
        "write-through leaves nothing dirty"
    );
    let p = progress.lock().unwrap();
    assert!(
        !p.is_empty()
            && p.iter()
                .all(|x| x.phase == "write-back" && x.done <= x.total)
    );
    assert_eq!(b.snapshot(), reference, "the backend holds every write");
    assert_eq!(read(&e, 0, size as usize), reference);
    // none drops the cache; back again starts from the backend.
    e.set_mode(CacheMode::None, None).unwrap();
    assert_eq!(
        e.stats().valid_bytes,
        0,
        "pass-through keeps no cached copy to go stale"
    );
    e.write(0, &[7u8; 4096], false).unwrap();
    e.set_mode(CacheMode::Back, None).unwrap();
    assert_eq!(read(&e, 0, 4096), vec![7u8; 4096]);
    e.write(4096, &[9u8; 4096], false).unwrap();
    // Written to the cache (dirty, or already written back by the flusher).
    assert!(e.stats().write_bytes >= 8192);
    e.shutdown().unwrap();
    let snap = b.snapshot();
    assert_eq!(&snap[..4096], &[7u8; 4096][..]);
    assert_eq!(&snap[4096..8192], &[9u8; 4096][..]);
}

#[test]
fn a_switch_to_offline_or_without_a_cache_is_refused_by_name() {
    let (b, c) = mems(4, 4);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Through));
    let err = e.set_mode(CacheMode::Offline, None).unwrap_err();
    assert!(err.to_string().contains("offline"), "{err}");
    assert_eq!(e.mode(), CacheMode::Through);
    let none = Engine::open(b.clone(), None, cfg(CacheMode::None)).unwrap();
    let err = none.set_mode(CacheMode::Back, None).unwrap_err();
    assert_eq!(err.kind(), EngineErrorKind::Config);
    assert!(err.to_string().contains("cache device"), "{err}");
}

#[test]
fn preload_fetches_each_line_once_and_guest_reads_then_hit() {
    let size = 8 * MIB;
    let b = Arc::new(
        MemBackend::builder()
            .data((0..size).map(|i| (i / 4096) as u8).collect())
            .build(),
    );
    let c = Arc::new(MemBackend::new(4 * MIB as usize));
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    // A guest read of part of the range first: the preload must not fetch it again.
    assert_eq!(read(&e, 0, 65536), b.snapshot()[..65536].to_vec());
    let rep = e
        .preload(0, MIB, PreloadOptions::default(), None, None)
        .unwrap();
    assert_eq!(rep.total, MIB);
    assert_eq!(
        rep.fetched,
        MIB - 65536,
        "already-cached data is not fetched twice"
    );
    let s = e.stats();
    assert_eq!(s.preload_bytes, MIB - 65536);
    let before = (s.read_hits, s.read_misses, s.backend_read_bytes);
    assert_eq!(
        read(&e, 0, MIB as usize),
        b.snapshot()[..MIB as usize].to_vec()
    );
    let s = e.stats();
    assert_eq!(
        (s.read_hits, s.read_misses, s.backend_read_bytes),
        (before.0 + 1, before.1, before.2)
    );
    // Past the end is clipped; a cancelled preload stops.
    let rep = e
        .preload(size - 4096, MIB, PreloadOptions::default(), None, None)
        .unwrap();
    assert_eq!(rep.total, 4096);
    let cancel = AtomicBool::new(true);
    let rep = e
        .preload(MIB, MIB, PreloadOptions::default(), Some(&cancel), None)
        .unwrap();
    assert!(rep.interrupted && rep.fetched == 0);
    e.shutdown().unwrap();
}

#[test]
fn offline_hydrates_keeps_writes_local_resumes_and_writes_back_only_dirty_data() {
    let size = 4 * MIB;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mem = Arc::new(MemBackend::builder().data(data.clone()).build());
    let c = Arc::new(MemBackend::new(8 * MIB as usize));
    // Hydration stops part way (the cancel flag), as at a daemon stop. A slow
    // backend makes sure that happens before the end.
    let slow = Arc::new(
        FaultyBackend::builder(mem.clone())
            .read_delay(std::time::Duration::from_millis(50))
            .build(),
    );
    let e = open(slow as Arc<dyn Backend>, c.clone(), cfg(CacheMode::Offline));
    let cancel = AtomicBool::new(false);
    let seen = Mutex::new(0u64);
    let rep = e
        .hydrate(
            PreloadOptions::default(),
            Some(&cancel),
            Some(&|p| {
                // The first report comes after half a second, long before the
                // end (64 lines at 50 ms each): stop there.
                *seen.lock().unwrap() = p.done;
                cancel.store(true, Ordering::Release);
            }),
        )
        .unwrap();
    let first = rep.fetched;
    assert!(rep.interrupted && first > 0 && first < size, "{rep:?}");
    assert!(*seen.lock().unwrap() >= first);
    // Inside line 0, which the first run copied in (it fetched something).
    e.write(4096, &[0xeeu8; 8192], false).unwrap();
    e.flush().unwrap();
    e.detach_keep_dirty().unwrap();
    drop(e);
    assert_eq!(
        mem.snapshot(),
        data,
        "offline mode writes nothing back while running"
    );
    // Restart: hydration continues with what is missing, and only that.
    let fb = Arc::new(FaultyBackend::builder(mem.clone()).build());
    let e = open(fb.clone(), c.clone(), cfg(CacheMode::Offline));
    let rep = e.hydrate(PreloadOptions::default(), None, None).unwrap();
    assert!(!rep.interrupted);
    assert_eq!(
        rep.fetched + first,
        size,
        "the second run fetched exactly what the first did not"
    );
    assert!(e.hydration_done());
    assert_eq!(
        e.stats().valid_bytes,
        size,
        "the whole image is in the cache"
    );
    let mut expect = data.clone();
    expect[4096..4096 + 8192].fill(0xee);
    assert_eq!(read(&e, 0, size as usize), expect);
    let reads_before = fb.stats().bytes_read;
    assert_eq!(read(&e, 0, size as usize), expect);
    assert_eq!(
        fb.stats().bytes_read,
        reads_before,
        "served from the cache alone"
    );
    // Stop: only the dirty extent is written back.
    e.shutdown().unwrap();
    assert_eq!(fb.stats().bytes_written, 8192);
    assert_eq!(mem.snapshot(), expect);
}

#[test]
fn offline_refuses_a_cache_smaller_than_the_image() {
    let (b, c) = mems(8, 4);
    assert_refused(
        try_open(b, c, cfg(CacheMode::Offline)),
        EngineErrorKind::Config,
        "offline mode keeps the whole image",
    );
}

#[test]
fn invalidate_refuses_while_dirty_and_drops_clean_data_after_a_flush() {
    let (b, _c, fb, e) = back_engine_refusing_write_back(4, 4);
    e.write(0, &[1u8; 65536], false).unwrap();
    let err = e.invalidate_clean().unwrap_err();
    assert_eq!(err.kind(), EngineErrorKind::DirtyData);
    assert_eq!(err.remedies(), [Remedy::WriteBackFirst], "{err}");
    fb.set_read_only(false);
    e.flush_to_backend(None).unwrap();
    assert_eq!(&b.snapshot()[..65536], &[1u8; 65536][..]);
    assert_eq!(e.invalidate_clean().unwrap(), 65536);
    assert_eq!(e.stats().valid_bytes, 0);
    assert_eq!(read(&e, 0, 65536), vec![1u8; 65536]);
    e.shutdown().unwrap();
}

#[test]
fn migrate_out_leaves_nothing_dirty_and_abort_returns_to_the_old_mode() {
    let (b, c) = mems(4, 4);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &[5u8; 65536], false).unwrap();
    let prev = e.migrate_out(None).unwrap();
    assert_eq!(prev, CacheMode::Back);
    assert_eq!(e.mode(), CacheMode::Through);
    assert_eq!(e.stats().dirty_bytes, 0);
    assert_eq!(&b.snapshot()[..65536], &[5u8; 65536][..]);
    // While migrated out, writes reach the backend before they are acknowledged.
    e.write(65536, &[6u8; 4096], false).unwrap();
    assert_eq!(&b.snapshot()[65536..69632], &[6u8; 4096][..]);
    e.migrate_abort(prev).unwrap();
    assert_eq!(e.mode(), CacheMode::Back);
    e.shutdown().unwrap();
}

#[test]
fn a_migration_destination_starts_cold_and_refuses_dirty_data() {
    let (b, c) = mems(4, 4);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    e.write(0, &[1u8; 65536], false).unwrap();
    e.shutdown().unwrap();
    // The cache still holds line 0 (clean). Behind its back the disk changes
    // (the other host), in a way no change marker of a MemBackend shows.
    // The backend refuses write-back this time, so the write is certainly
    // still dirty at detach (the flusher would otherwise race the test).
    let e = open(
        refusing(&b),
        c.clone(),
        EngineConfig {
            cold_start: true,
            ..cfg(CacheMode::Back)
        },
    );
    assert_eq!(e.stats().valid_bytes, 0, "nothing cached before is trusted");
    e.write(0, &[2u8; 4096], false).unwrap();
    e.detach_keep_dirty().unwrap();
    assert_eq!(e.stats().dirty_bytes, 4096);
    let err = assert_refused(
        try_open(
            b.clone(),
            c.clone(),
            EngineConfig {
                cold_start: true,
                ..cfg(CacheMode::Back)
            },
        ),
        EngineErrorKind::DirtyData,
        "a migration destination",
    );
    assert_eq!(err.remedies(), [Remedy::DiscardDirty], "{err}");
}

#[test]
fn stats_count_hits_misses_partial_hits_and_latency() {
    let (b, c) = mems(4, 4);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Through));
    read(&e, 0, 65536); // miss, promoted
    read(&e, 0, 65536); // hit
    read(&e, 0, 131072); // partial
    e.write(0, &[1u8; 4096], false).unwrap(); // hit
    e.write(MIB, &[1u8; 4096], false).unwrap(); // miss
    e.flush().unwrap();
    let s = e.stats();
    assert_eq!((s.read_hits, s.read_misses, s.read_partial), (1, 1, 1));
    assert_eq!((s.write_hits, s.write_misses, s.write_partial), (1, 1, 0));
    assert_eq!(s.mode, "through");
    let lat: Vec<(String, u64)> = s.latency.iter().map(|l| (l.op.clone(), l.count)).collect();
    assert_eq!(lat[0], ("read".into(), 3));
    assert_eq!(lat[1], ("write".into(), 2));
    assert_eq!(lat[2], ("flush".into(), 1));
    assert!(s.latency[0].p50_us > 0);
    assert!(s.cache_write_bytes > 0 && s.cache_read_bytes > 0);
    e.shutdown().unwrap();
}

#[test]
fn an_offline_server_returns_to_offline_after_an_aborted_migration() {
    let (b, c) = mems(4, 8);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Offline));
    e.write(0, &[3u8; 8192], false).unwrap();
    assert_eq!(e.migrate_out(None).unwrap(), CacheMode::Offline);
    assert_eq!(&b.snapshot()[..8192], &[3u8; 8192][..]);
    e.migrate_abort(CacheMode::Offline).unwrap();
    assert_eq!(e.mode(), CacheMode::Offline);
    e.write(0, &[4u8; 4096], false).unwrap();
    assert_eq!(
        &b.snapshot()[..4096],
        &[3u8; 4096][..],
        "offline again: writes stay local"
    );
    e.shutdown().unwrap();
    assert_eq!(&b.snapshot()[..4096], &[4u8; 4096][..]);
}

/// In offline mode nothing writes back while serving, so an overwrite of data
/// dirty since before a FLUSH must not wait for write-back (it would wait
/// forever): it goes in place.
#[test]
fn offline_overwrites_after_a_flush_do_not_wait_for_write_back() {
    let (b, c) = mems(4, 8);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Offline));
    finishes_within(
        20,
        "an overwrite after a flush hung in offline mode",
        &e,
        |e| {
            for round in 1..=5u8 {
                e.write(0, &[round; 65536], false).unwrap();
                e.flush().unwrap();
            }
        },
    );
    assert_eq!(read(&e, 0, 65536), vec![5u8; 65536]);
    assert_eq!(&b.snapshot()[..65536], &[0u8; 65536][..]);
    e.shutdown().unwrap();
    assert_eq!(&b.snapshot()[..65536], &[5u8; 65536][..]);
}

/// While the backend refuses write-back, ordered overwrites of data dirty
/// since before a FLUSH keep completing from the cache, and once the backend
/// is back everything drains. Format v2 writes such an overwrite as a new
/// version of the line (nothing goes in place, the order holds); format v1
/// waits for write-back first and, once that has failed long enough, goes in
/// place (counted, warned). The 30 s limit only catches a hang.
#[test]
fn ordered_overwrites_keep_completing_while_write_back_fails() {
    for version in [FormatVersion::V2, FormatVersion::V1] {
        let (b, _c, fb, e) = back_engine_refusing_write_back_on(version, 4, 4);
        e.write(0, &[1u8; 65536], false).unwrap();
        e.flush().unwrap();
        let what = format!("{version:?}: an ordered overwrite hung behind a failing backend");
        finishes_within(30, &what, &e, |e| {
            e.write(0, &[2u8; 4096], false).unwrap();
            e.flush().unwrap();
            e.write(4096, &[3u8; 4096], false).unwrap();
        });
        let in_place = e.stats().ordered_overwrites_in_place;
        match version {
            FormatVersion::V2 => assert_eq!(in_place, 0, "v2: an overwrite went in place"),
            FormatVersion::V1 => assert!(in_place >= 2, "v1: {in_place} overwrites in place"),
        }
        let mut expect = vec![1u8; 65536];
        expect[..4096].fill(2);
        expect[4096..8192].fill(3);
        assert_eq!(read(&e, 0, 65536), expect, "{version:?}");
        fb.set_read_only(false);
        e.shutdown().unwrap();
        assert_eq!(&b.snapshot()[..65536], &expect[..], "{version:?}: drained");
    }
}

/// Relaxed write-back in format v2 keeps a line rewritten between FLUSHes (a
/// journal) to a few versions, even while the backend refuses write-back: an
/// older version whose data a durable newer one holds is dropped unwritten,
/// nothing goes in place, and neither a daemon crash nor the final drain loses
/// or reorders a byte. (Before, the line gained a version per FLUSH and each
/// rewrite past the 16th waited for the backend.) The 30 s limit only catches
/// a hang.
#[test]
fn relaxed_rewrites_between_flushes_drop_superseded_versions() {
    let (b, c, fb, conf) = v2_back_refusing_write_back(policies::WritebackOrder::Relaxed);
    let e = open(fb.clone(), c.clone(), conf.clone());
    // Sector 1 is written once, before the rewrites of sector 0 start: a
    // newer version that does not hold it must not drop it.
    e.write(4096, &[0xEE; 4096], false).unwrap();
    let what = "relaxed rewrites hung behind a backend that refuses write-back";
    finishes_within(30, what, &e, |e| {
        for round in 1..=200u32 {
            e.write(0, &[round as u8; 4096], false).unwrap();
            e.flush().unwrap();
        }
    });
    let s = e.stats();
    assert!(
        s.versions_superseded >= 150,
        "{} superseded versions dropped",
        s.versions_superseded
    );
    assert_eq!(s.order_broken_since, 0, "a rewrite went in place");
    let mut expect = vec![0u8; 65536];
    expect[..4096].fill(200);
    expect[4096..8192].fill(0xEE);
    assert_eq!(read(&e, 0, 65536), expect);
    // A crash, then the cache alone is attached again.
    e.abandon();
    drop(e);
    let e = open(fb.clone(), c.clone(), conf);
    assert_eq!(read(&e, 0, 65536), expect, "after a crash");
    fb.set_read_only(false);
    e.shutdown().unwrap();
    assert_eq!(&b.snapshot()[..65536], &expect[..], "drained");
}

/// After write-back, a 4 KiB rewrite of a cached 64 KiB line does not cost the
/// cache the other 60 KiB (format v2, either order). The rewrite comes while the
/// line's data is still dirty (the backend refuses write-back), so it is a new
/// version; once both are written back, the newer one is merged into the
/// older, which stays the line's only version, clean and whole. The 10 s
/// limit only catches a hang.
#[test]
fn write_back_keeps_the_rest_of_a_partly_rewritten_line_cached() {
    for order in BOTH_ORDERS {
        let (b, c, fb, conf) = v2_back_refusing_write_back(order);
        let e = open(fb.clone(), c.clone(), conf.clone());
        e.write(0, &[1u8; 65536], false).unwrap();
        e.flush().unwrap();
        e.write(8192, &[2u8; 4096], false).unwrap();
        e.flush().unwrap();
        fb.set_read_only(false);
        let t0 = std::time::Instant::now();
        while e.stats().dirty_bytes > 0 || e.stats().versions_merged < 1 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "{order}: write-back did not merge the versions: {:?}",
                e.stats()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let s = e.stats();
        assert_eq!(
            s.valid_bytes, 65536,
            "{order}: the line's other sectors left the cache"
        );
        assert_eq!(s.cached_lines, 1, "{order}");
        let mut expect = vec![1u8; 65536];
        expect[8192..12288].fill(2);
        let misses = s.read_misses + s.read_partial;
        assert_eq!(read(&e, 0, 65536), expect, "{order}");
        let s = e.stats();
        assert_eq!(
            s.read_misses + s.read_partial,
            misses,
            "{order}: a miss after the merge"
        );
        assert_eq!(&b.snapshot()[..65536], &expect[..], "{order}: backend");
        // A daemon crash, then the same again from the shadow.
        e.abandon();
        drop(e);
        let e = open(fb.clone(), c.clone(), conf);
        assert_eq!(read(&e, 0, 65536), expect, "{order}: after a crash");
        e.shutdown().unwrap();
    }
}

/// Three versions of a line written back epoch by epoch (or in one relaxed
/// step): every read returns the newest data while that runs, whatever is kept,
/// freed or merged; and afterwards nothing of the line has left the cache. The
/// middle version holds sectors only it holds, so it stays while the newest is
/// dirty, and the clean versions are merged into the oldest. (Freeing it
/// instead would have had to free the oldest too, whose copy of its sectors is
/// stale: the line kept only its newest 4 KiB, and random writes emptied a
/// third of a warm cache that way.) The 10 s limits only catch a hang.
#[test]
fn write_back_never_exposes_an_older_version_under_a_freed_one() {
    for order in BOTH_ORDERS {
        let (b, c, fb, conf) = v2_back_refusing_write_back(order);
        let e = open(fb.clone(), c.clone(), conf);
        let mut expect = vec![1u8; 65536];
        e.write(0, &expect, false).unwrap();
        e.flush().unwrap();
        e.write(8192, &[2u8; 4096], false).unwrap();
        expect[8192..12288].fill(2);
        e.flush().unwrap();
        e.write(16384, &[3u8; 4096], false).unwrap();
        expect[16384..20480].fill(3);
        e.flush().unwrap();
        let before = e.stats();
        let misses = before.read_misses + before.read_partial;
        fb.set_read_only(false);
        let t0 = std::time::Instant::now();
        loop {
            same(
                &read(&e, 0, 65536),
                &expect,
                &format!("{order}: while writing back"),
            );
            if e.stats().dirty_bytes == 0 {
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "{order}: write-back did not finish: {:?}",
                e.stats()
            );
        }
        // The last step's merge runs after the data is clean.
        let t0 = std::time::Instant::now();
        while e.stats().valid_bytes != 65536 || e.stats().versions_merged < 1 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "{order}: the line's versions were not merged whole: {:?}",
                e.stats()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(e.stats().cached_lines, 1, "{order}");
        same(
            &read(&e, 0, 65536),
            &expect,
            &format!("{order}: after write-back"),
        );
        let s = e.stats();
        assert_eq!(
            s.read_misses + s.read_partial,
            misses,
            "{order}: a read missed during or after the write-back"
        );
        e.shutdown().unwrap();
        same(
            &b.snapshot()[..65536],
            &expect,
            &format!("{order}: backend"),
        );
    }
}

/// `got == want`, or a failure naming the first byte that differs (not two
/// 64 KiB dumps).
fn same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: byte {at} is {} where {} was written",
            got[at], want[at]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

const BOTH_ORDERS: [policies::WritebackOrder; 2] = [
    policies::WritebackOrder::Ordered,
    policies::WritebackOrder::Relaxed,
];

/// 4 MiB backend (refusing write-back until told) and cache, and a format v2
/// `back` config in `order`: (backend, cache, the refusing wrapper, config).
fn v2_back_refusing_write_back(
    order: policies::WritebackOrder,
) -> (
    Arc<MemBackend>,
    Arc<MemBackend>,
    testkit::rig::Refusing,
    EngineConfig,
) {
    let (b, c) = mems(4, 4);
    let fb = refusing(&b);
    let conf = EngineConfig {
        format_version: FormatVersion::V2,
        order,
        ..cfg(CacheMode::Back)
    };
    (b, c, fb, conf)
}

/// An offline cache holds the image and about one line more. Overwrites after
/// a FLUSH must not use that spare room up for versions of lines nothing
/// writes back until stop: a later write to a line not yet copied in needs a
/// slot, and waited for one forever (the model test hung on it). Now the
/// versions are written back and reclaimed, and the write goes on.
#[test]
fn offline_versions_never_starve_a_line_not_yet_copied_in() {
    let line = 65536u64;
    let lines = 16u64;
    let b = testkit::rig::mem(lines * line);
    let c = testkit::rig::mem(MIB + (lines + 1) * line);
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Offline));
    let what = "a write to a line not yet copied in hung in offline mode";
    finishes_within(20, what, &e, move |e| {
        for round in 1..=3u8 {
            e.write(0, &[round; 4096], false).unwrap();
            e.flush().unwrap();
        }
        for l in 1..lines {
            e.write(l * line, &[l as u8; 4096], false).unwrap();
        }
    });
    assert!(
        e.stats().offline_writebacks_for_space >= 1,
        "the versions were reclaimed by a write-back before stop"
    );
    let mut want = vec![0u8; (lines * line) as usize];
    want[..4096].fill(3);
    for l in 1..lines {
        let o = (l * line) as usize;
        want[o..o + 4096].fill(l as u8);
    }
    assert_eq!(read(&e, 0, want.len()), want);
    e.shutdown().unwrap();
    let img = b.snapshot();
    assert_eq!(&img[..4096], &[3u8; 4096][..]);
    for l in 1..lines {
        let o = (l * line) as usize;
        assert_eq!(&img[o..o + 4096], &[l as u8; 4096][..], "line {l}");
    }
}

/// Run `work` on `e` on a thread of its own and fail with `what` unless it
/// is done within `secs` (the limit only catches a hang; a panic in `work`
/// fails at once).
fn finishes_within(
    secs: u64,
    what: &str,
    e: &Arc<Engine>,
    work: impl FnOnce(&Engine) + Send + 'static,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let e = Arc::clone(e);
    std::thread::spawn(move || {
        work(&e);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|err| panic!("{what} ({err})"));
}

/// Wait (up to `secs`, which only catches a hang) until `ready` holds.
fn eventually(secs: u64, what: &str, ready: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !ready() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(secs),
            "not within {secs} s: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A `back` engine on in-memory devices (a cache of `cache_mib`) whose
/// write-back is paced to the given bytes and writes per second.
fn paced_back_engine(
    cache_mib: u64,
    bytes: Option<u64>,
    writes: Option<u64>,
) -> (Arc<MemBackend>, Arc<Engine>) {
    let (b, c) = mems(8, cache_mib);
    let limit = WritebackLimit {
        bytes_per_sec: bytes,
        writes_per_sec: writes,
    };
    let e = open(
        b.clone(),
        c,
        EngineConfig {
            writeback_limit: limit,
            ..cfg(CacheMode::Back)
        },
    );
    assert_eq!(e.writeback_limit(), limit);
    (b, e)
}

/// Dirty 64 KiB lines with a clean line between each two (so that write-back
/// sends one backend write per line, not one merged extent).
fn dirty_every_other_line(e: &Engine, lines: u64) -> Vec<u8> {
    let mut want = vec![0u8; (2 * lines * 65536) as usize];
    for l in 0..lines {
        let off = 2 * l * 65536;
        let data = testkit::pattern(l + 1, 65536);
        e.write(off, &data, false).unwrap();
        want[off as usize..off as usize + 65536].copy_from_slice(&data);
    }
    want
}

/// Background write-back keeps to `--writeback-rate`: at 64 KiB/s, 32 lines
/// of 64 KiB take half a minute, so after the flusher has waited for the limit
/// for a few seconds most of them are still dirty. A clean stop drains the rest unpaced (paced,
/// it would take about 30 s more; the limit below only catches that).
#[test]
fn write_back_keeps_to_its_rate_and_a_stop_drains_unpaced() {
    let (b, e) = paced_back_engine(8, Some(65536), None);
    let started = std::time::Instant::now();
    let want = dirty_every_other_line(&e, 32);
    e.flush().unwrap();
    // Each 64 KiB write waits a second more than the one before it.
    eventually(20, "write-back waits for its limit", || {
        e.stats().writeback_paced_ms >= 2500
    });
    let dirty = e.stats().dirty_bytes;
    // Writes in flight together wait together, and count once: never more
    // than the time since.
    let paced = e.stats().writeback_paced_ms;
    assert!(
        paced <= started.elapsed().as_millis() as u64,
        "{paced} ms paced in {:?}",
        started.elapsed()
    );
    assert!(
        dirty >= MIB,
        "only {dirty} bytes still dirty: write-back ran past its limit"
    );
    let t = std::time::Instant::now();
    e.shutdown().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "the stop's drain was paced ({:?})",
        t.elapsed()
    );
    assert_eq!(&b.snapshot()[..want.len()], &want[..]);
}

/// A new limit applies while serving, and ends a wait for the old one: at
/// 1 KiB/s write-back would need an hour; lifted, it finishes at once.
#[test]
fn a_new_write_back_limit_applies_at_once() {
    let (b, e) = paced_back_engine(8, Some(1024), Some(1));
    let want = dirty_every_other_line(&e, 4);
    e.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        e.stats().dirty_bytes > 0,
        "write-back ran past its limit of 1 KiB/s"
    );
    e.set_writeback_limit(WritebackLimit::default());
    assert!(e.writeback_limit().is_unlimited());
    eventually(20, "write-back finishes once the limit is lifted", || {
        e.stats().dirty_bytes == 0
    });
    assert_eq!(&b.snapshot()[..want.len()], &want[..]);
    e.shutdown().unwrap();
}

/// A `back` engine on in-memory devices whose write-back the dirty-level
/// controller paces between `low` and `high` percent, at 1 MiB/s at least.
fn controlled_back_engine(
    backend_mib: u64,
    cache_mib: u64,
    low: u8,
    high: u8,
) -> (Arc<MemBackend>, Arc<Engine>) {
    let (b, c) = mems(backend_mib, cache_mib);
    let e = open(
        b.clone(),
        c,
        EngineConfig {
            dirty_level: Some(DirtyLevel {
                low_pct: low,
                high_pct: high,
                min_rate: MIB,
            }),
            ..cfg(CacheMode::Back)
        },
    );
    (b, e)
}

/// Below the low watermark the controller holds write-back to its minimum
/// rate (8 MiB dirty at 1 MiB/s takes 8 s), and says so in the stats; the
/// guest writes nothing more, so after 5 s the controller's low watermark is
/// zero (its state says so at the end), and the backend gets every write
/// without a drain being asked for. (At this size the idle rule's rate,
/// dirty/40 s, is below the minimum: the unit tests check its rate.)
#[test]
fn the_dirty_level_controller_trickles_below_low_and_drains_an_idle_guest() {
    let (b, e) = controlled_back_engine(32, 32, 50, 90);
    let want = dirty_every_other_line(&e, 128);
    e.flush().unwrap();
    eventually(10, "the controller paces write-back", || {
        let s = e.stats();
        s.writeback_control == "paced" && s.writeback_paced_ms > 0
    });
    let s = e.stats();
    assert_eq!(s.writeback_control_rate, MIB, "below low: the minimum rate");
    assert_eq!((s.writeback_low_pct, s.writeback_high_pct), (50, 90));
    assert!(
        s.dirty_bytes > 2 * MIB,
        "only {} bytes still dirty: write-back ran past the controller's rate",
        s.dirty_bytes
    );
    eventually(30, "an idle guest's dirty data is written back", || {
        e.stats().dirty_bytes == 0
    });
    assert_eq!(e.stats().writeback_control, "guest-idle");
    assert_eq!(&b.snapshot()[..want.len()], &want[..]);
    e.shutdown().unwrap();
}

/// A guest write that needs room waits for write-back, so a cache full of
/// dirty lines (at its high watermark) or a guest write waiting for a slot
/// ends the pacing at once: 24 MiB through an 8 MiB cache. Paced at the
/// controller's rate (about 1 MiB/s, the cache being just over its low
/// watermark) they would take over 15 s; unpaced, well under a second on
/// memory devices.
#[test]
fn a_guest_write_that_needs_room_is_not_held_by_the_controller() {
    let (b, e) = controlled_back_engine(32, 8, 80, 100);
    let t = std::time::Instant::now();
    let mut want = vec![0u8; (24 * MIB) as usize];
    for i in 0..24u64 {
        let data = testkit::pattern(i + 7, MIB as usize);
        e.write(i * MIB, &data, false).unwrap();
        want[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&data);
    }
    e.flush().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "the guest's writes waited for the controller's rate ({:?})",
        t.elapsed()
    );
    e.shutdown().unwrap();
    assert_eq!(&b.snapshot()[..want.len()], &want[..]);
}

/// While the guest reads from the backend, write-back keeps one write in
/// flight, so a read queues behind at most one write-back write; with equal
/// priority (the comparison) it keeps its whole window. Four readers keep a
/// read at the backend all the time (30 ms each, started 7 ms apart, so that
/// the short gaps between one reader's reads, when a thread may be held up
/// on a busy machine, fall inside the others' reads), each on lines never
/// cached; 64 dirty lines, none adjacent to another, are 64 writes of 20 ms.
/// Counted at the backend: the most writes in flight that a read found.
#[test]
fn write_back_makes_way_for_the_guests_backend_reads() {
    for priority in [BackendPriority::GuestReads, BackendPriority::Equal] {
        let (mem_b, c) = mems(64, 16);
        let b = Arc::new(
            FaultyBackend::builder(mem_b.clone())
                .read_delay(std::time::Duration::from_millis(30))
                .write_delay(std::time::Duration::from_millis(20))
                .build(),
        );
        let e = open(
            b.clone(),
            c,
            EngineConfig {
                backend_priority: priority,
                ..cfg(CacheMode::Back)
            },
        );
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4u64)
            .map(|i| {
                let (e, stop) = (e.clone(), stop.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(7 * i));
                    let mut k = 0u64;
                    while !stop.load(Ordering::Acquire) && k < 190 {
                        read(&e, 16 * MIB + (k * 4 + i) * 65536, 4096);
                        k += 1;
                    }
                })
            })
            .collect();
        eventually(10, "the readers are at the backend", || {
            b.stats().reads >= 4
        });
        let want = dirty_every_other_line(&e, 64);
        e.flush().unwrap();
        eventually(60, "write-back ends", || e.stats().dirty_bytes == 0);
        stop.store(true, Ordering::Release);
        for r in readers {
            r.join().unwrap();
        }
        let ahead = b.stats().max_writes_ahead_of_a_read;
        match priority {
            BackendPriority::GuestReads => assert!(
                ahead <= 1,
                "a guest read found {ahead} write-back writes at the backend"
            ),
            BackendPriority::Equal => assert!(
                ahead > 1,
                "with equal priority a read found only {ahead} writes ahead: the count \
                 does not see the window"
            ),
        }
        e.shutdown().unwrap();
        assert_eq!(&mem_b.snapshot()[..want.len()], &want[..]);
    }
}

/// A paced write-back is slow, not stalled: an ordered overwrite that waits
/// for it longer than the 2 s after which a stalled write-back counts as an
/// outage keeps waiting (the order holds) instead of going in place. While
/// the backend holds write-back, the cache fills with dirty lines of one
/// epoch; then 3 MiB go at 1 MiB/s, in writes of at most a tenth of a second each,
/// and none of those lines is clean (or can give its slot) before the end.
/// Line 0 is an epoch of its own, held at the backend while the others are
/// written: the first overwrite takes its slot once the hold ends; the second
/// has to wait.
#[test]
fn a_paced_write_back_is_not_an_outage() {
    let (mem_b, c) = mems(8, 4);
    let b = Arc::new(FaultyBackend::builder(mem_b.clone()).build());
    let e = open(
        b.clone(),
        c,
        EngineConfig {
            writeback_limit: WritebackLimit {
                bytes_per_sec: Some(MIB),
                writes_per_sec: None,
            },
            ..cfg(CacheMode::Back)
        },
    );
    let lines = e.stats().cache_lines;
    assert!(lines >= 40, "{lines} lines");
    b.stall();
    let mut want = vec![0u8; (lines * 65536) as usize];
    for l in 0..lines {
        let data = testkit::pattern(l + 1, 65536);
        e.write(l * 65536, &data, false).unwrap();
        want[(l * 65536) as usize..((l + 1) * 65536) as usize].copy_from_slice(&data);
        if l == 0 {
            e.flush().unwrap();
            assert!(
                b.wait_for_stalled(1, std::time::Duration::from_secs(10)),
                "the write-back of line 0 never reached the backend"
            );
        }
    }
    e.flush().unwrap();
    b.release();
    let mut waited = std::time::Duration::ZERO;
    for l in [lines - 1, lines - 2] {
        let off = (l * 65536) as usize;
        let t = std::time::Instant::now();
        e.write(off as u64, &[0xa5; 4096], false).unwrap();
        want[off..off + 4096].fill(0xa5);
        waited = t.elapsed();
    }
    let s = e.stats();
    assert_eq!(
        (s.ordered_overwrites_in_place, s.order_broken_since),
        (0, 0),
        "a paced write-back counted as an outage (the overwrite waited {waited:?})"
    );
    assert!(
        waited > std::time::Duration::from_secs(2),
        "the overwrite found a free slot after {waited:?}: the cache was not full"
    );
    assert_eq!(read(&e, 0, want.len()), want);
    e.shutdown().unwrap();
    assert_eq!(&mem_b.snapshot()[..want.len()], &want[..]);
}

/// A metadata round that fails while write-back runs (the cache device
/// refuses some flushes, now and then) does not wedge write-back: the
/// watermark is made durable by a later round that succeeds, the flusher goes
/// on, and a drain completes with every write on the backend. (The flusher once
/// waited for one particular round to succeed, so one failure stopped it.)
#[test]
fn failed_metadata_rounds_during_write_back_are_retried() {
    use rbd_backend::OpKind;
    for order in [
        policies::WritebackOrder::Ordered,
        policies::WritebackOrder::Relaxed,
    ] {
        let (mem_b, mem_c) = mems(8, 8);
        let b = Arc::new(FaultyBackend::builder(mem_b.clone()).build());
        b.set_delay(OpKind::Write, std::time::Duration::from_millis(1));
        b.set_delay(OpKind::Flush, std::time::Duration::from_millis(1));
        let c = Arc::new(FaultyBackend::builder(mem_c).build());
        let e = open(
            b.clone(),
            c.clone(),
            EngineConfig {
                order,
                ..cfg(CacheMode::Back)
            },
        );
        let mut want = vec![0u8; 40 * 65536];
        let mut failed = 0;
        for i in 0..200u64 {
            let off = (i * 7 % 40) * 65536 + (i % 16) * 4096;
            let data = testkit::pattern(i + 1, 4096);
            e.write(off, &data, false).unwrap();
            want[off as usize..off as usize + 4096].copy_from_slice(&data);
            if i % 25 == 10 {
                // The next flush of the cache device fails: a guest round
                // (its FLUSH fails, as the guest would see) or the flusher's.
                c.fail_next(OpKind::Flush, 1, libc::EIO);
            }
            if e.flush().is_err() {
                failed += 1;
                e.flush().expect("a FLUSH after a failed one");
            }
        }
        let s = e.stats();
        eprintln!(
            "{order}: {failed} guest FLUSHes failed; watermarks {} shared / {} own",
            s.watermark_shared_rounds, s.watermark_own_rounds
        );
        finishes_within(120, "a drain after failed metadata rounds", &e, |e| {
            e.drain().expect("drain")
        });
        assert_eq!(e.stats().dirty_bytes, 0, "{order}: dirty data left");
        e.shutdown().unwrap();
        assert_eq!(&mem_b.snapshot()[..want.len()], &want[..], "{order}");
    }
}

/// The same, deterministically: the first metadata round after a write-back
/// step (the one that would carry its watermark) fails. Write-back must make
/// the watermark durable in a later round and finish; waiting for that one
/// round to succeed would wait forever.
#[test]
fn a_failed_watermark_round_is_retried() {
    use rbd_backend::OpKind;
    let (mem_b, mem_c) = mems(8, 8);
    let b = Arc::new(FaultyBackend::builder(mem_b.clone()).build());
    let c = Arc::new(FaultyBackend::builder(mem_c).build());
    let e = open(b.clone(), c.clone(), cfg(CacheMode::Back));
    let data = testkit::pattern(7, 65536);
    b.stall();
    e.write(0, &data, false).unwrap();
    e.flush().unwrap();
    assert!(
        b.wait_for_stalled(1, std::time::Duration::from_secs(10)),
        "write-back never reached the backend"
    );
    // The step is held at the backend; the next cache flush (the round that
    // would make its watermark durable) fails.
    c.fail_next(OpKind::Flush, 1, libc::EIO);
    b.release();
    finishes_within(60, "write-back after a failed watermark round", &e, |e| {
        e.drain().expect("drain")
    });
    assert_eq!(
        c.stats().injected_failures,
        1,
        "no metadata round failed: the test did not test anything"
    );
    assert_eq!(e.stats().dirty_bytes, 0, "dirty data left");
    e.shutdown().unwrap();
    assert_eq!(&mem_b.snapshot()[..data.len()], &data[..]);
}
