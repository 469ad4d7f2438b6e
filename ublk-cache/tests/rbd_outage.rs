//! A backend outage under a `back` workload: the only OSD of the test cluster is
//! frozen (SIGSTOP) while the guest keeps writing and flushing. Writes keep
//! completing from the cache; after SIGCONT the dirty data drains, and `rbd
//! export` of the image equals the reference disk.
//!
//! Format v2 writes an overwrite of data dirty since before a FLUSH as a new
//! version of the line (README: write-back order). Once the frozen backend has
//! let the versions fill the cache (or a line's chain), an ordered write waits
//! up to 2 s, a relaxed one 0.2 s, and then such overwrites go in place until
//! write-back catches up, so the guest keeps going in both orders.
//!
//! Alone in its own test binary: freezing the OSD stalls every client of the
//! cluster, so nothing else may run meanwhile.
#![cfg(feature = "rbd")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::{CacheMode, WritebackOrder};
use rbd_backend::{FaultyBackend, MemBackend, RbdBackend};
use testkit::ceph::{cluster, watchdog, Frozen, TestCluster};
use testkit::pattern;
use testkit::rig::open;
use ublk_cache::target::BlockTarget;
use ublk_cache::EngineConfig;

const LINE: u64 = 65536;

#[test]
fn rbd_back_mode_rides_out_an_osd_outage() {
    let Some(c) = cluster("osd_outage") else {
        return;
    };
    let Some(osd) = c.osd_pid() else {
        panic!("osd_outage: UBLK_CACHE_CEPH_DIR does not lead to the OSD's pid file");
    };
    // RUST_LOG=ublk_cache=debug shows the engine's side of a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let _wd = watchdog("osd_outage", 240);
    for order in [WritebackOrder::Relaxed, WritebackOrder::Ordered] {
        outage(&c, osd, order);
    }
}

fn outage(c: &TestCluster, osd: i32, order: WritebackOrder) {
    let disk = 8u64 << 20;
    let img = c.image("outage", disk);
    let cache = Arc::new(MemBackend::new((1 << 20) + 64 * LINE as usize));
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        order,
        line_size: Some(LINE as u32),
        shadow_dir: testkit::rig::shadow_dir(),
        ..EngineConfig::default()
    };
    let rbd = RbdBackend::open(&img.spec, &c.opts()).expect("open");
    let b = Arc::new(FaultyBackend::new(rbd));
    let e = open(b.clone(), cache, cfg);
    let mut model = vec![0u8; disk as usize];
    let first = pattern(1, 2 << 20);
    e.write(0, &first, false).expect("write");
    e.flush().expect("flush");
    model[..first.len()].copy_from_slice(&first);
    // Let the flusher write that back, so the outage starts with a clean cache.
    let t = Instant::now();
    while e.stats().dirty_lines > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "write-back did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    eprintln!("{order:?}: clean; freezing the OSD");
    let frozen = Frozen::new(osd);
    let t0 = Instant::now();
    let before = b.stats();
    let mut rounds = 0u64;
    let mut worst = Duration::ZERO;
    // Ordered: the first overwrite of older-epoch data waits 2 s for the stalled
    // write-back, then such overwrites go in place.
    let (window, worst_allowed) = match order {
        WritebackOrder::Relaxed => (Duration::from_secs(3), Duration::from_secs(1)),
        WritebackOrder::Ordered => (Duration::from_secs(5), Duration::from_secs(3)),
    };
    while t0.elapsed() < window {
        let seed = 100 + rounds;
        // Anywhere in 32 lines of the 64-line cache, flushing often, so data
        // dirty since an earlier flush is overwritten again and again.
        let line = seed * 7919 % 32;
        let off = line * LINE + (seed % 8) * 4096;
        let len = 4096 * (1 + seed % 8) as usize;
        let data = pattern(seed, len);
        let t = Instant::now();
        if std::env::var_os("OUTAGE_TRACE").is_some() {
            eprintln!("round {rounds}: write {off}+{len}");
        }
        e.write(off, &data, seed.is_multiple_of(5))
            .expect("a write during the outage");
        if rounds % 4 == 3 {
            e.flush().expect("a flush during the outage");
        }
        let mut got = vec![0u8; len];
        e.read(off, &mut got)
            .expect("a cached read during the outage");
        assert!(got == data);
        worst = worst.max(t.elapsed());
        model[off as usize..off as usize + len].copy_from_slice(&data);
        rounds += 1;
    }
    let during = b.stats();
    eprintln!(
        "{order:?}: during the outage: {rounds} write+read rounds in {:?}, worst {worst:?}; backend writes completed: {}",
        t0.elapsed(),
        during.writes - before.writes
    );
    assert!(
        rounds > 50,
        "the guest must keep going while the OSD is frozen ({rounds} rounds)"
    );
    assert!(
        worst < worst_allowed,
        "a write waited for the frozen backend ({worst:?})"
    );
    if order == WritebackOrder::Ordered {
        assert!(
            e.stats().ordered_overwrites_in_place > 0,
            "ordered overwrites went in place during the outage"
        );
    }
    assert!(
        e.stats().dirty_lines > 0,
        "the outage must leave dirty data to drain"
    );
    assert_eq!(
        during.writes, before.writes,
        "no backend write can complete while the OSD is frozen"
    );
    drop(frozen);

    let t1 = Instant::now();
    e.shutdown().expect("drain after the outage");
    eprintln!("{order:?}: drained in {:?} after SIGCONT", t1.elapsed());
    drop(e);
    drop(b);

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("export.img");
    let o = c.rbd(&[
        "export",
        &img.spec.to_string(),
        out.to_str().expect("utf-8 path"),
    ]);
    assert!(
        o.status.success(),
        "rbd export: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let exported = std::fs::read(&out).expect("read export");
    assert!(
        exported == model,
        "{order:?}: rbd export differs from the reference disk"
    );
}
