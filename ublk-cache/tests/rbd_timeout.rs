//! The backend timeout (`--backend-timeout`, `RbdOptions::io_timeout`) against
//! the real test cluster: while its only OSD is frozen (SIGSTOP), an uncached
//! read in `back` fails with EIO after the timeout instead of hanging, a cached
//! read and a `back` write still complete at once, and a backend write and flush
//! that time out are errors, never successes. After SIGCONT reads work again,
//! every abandoned request is completed and released, the dirty data drains, and
//! the image holds what was written.
//!
//! Alone in its own test binary: freezing the OSD stalls every client of the
//! cluster, so nothing else may run meanwhile.
#![cfg(feature = "rbd")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::{CacheMode, WritebackOrder};
use rbd_backend::{BlockIo, ErrorKind, MemBackend, RbdBackend, RbdOptions};
use testkit::ceph::{cluster, watchdog, Frozen};
use testkit::pattern;
use testkit::rig::open;
use ublk_cache::target::BlockTarget;
use ublk_cache::EngineConfig;

const LINE: usize = 65536;
const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn rbd_requests_time_out_during_an_osd_outage() {
    let Some(c) = cluster("rbd_timeout") else {
        return;
    };
    let Some(osd) = c.osd_pid() else {
        panic!("rbd_timeout: UBLK_CACHE_CEPH_DIR does not lead to the OSD's pid file");
    };
    let _wd = watchdog("rbd_timeout", 180);
    let disk = 64 * LINE;
    let img = c.image("timeout", disk as u64);
    let opts = RbdOptions {
        io_timeout: Some(TIMEOUT),
        ..c.opts()
    };
    let rbd = Arc::new(RbdBackend::open(&img.spec, &opts).expect("open"));
    let mut model = pattern(7, disk);
    rbd.write_at(0, &model).expect("fill the image");
    rbd.flush().expect("flush");

    let cache = Arc::new(MemBackend::new((1 << 20) + 64 * LINE));
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        order: WritebackOrder::Ordered,
        line_size: Some(LINE as u32),
        shadow_dir: testkit::rig::shadow_dir(),
        ..EngineConfig::default()
    };
    let e = open(rbd.clone(), cache, cfg);
    // Line 0 is cached (clean); line 40 is not.
    let mut got = vec![0u8; LINE];
    e.read(0, &mut got).expect("warm line 0");
    assert!(got == model[..LINE]);

    let frozen = Frozen::new(osd);
    let t0 = Instant::now();
    let new_data = pattern(9, 4096);
    let (read, write, flush) = std::thread::scope(|s| {
        let read = s.spawn(|| {
            let mut buf = vec![0u8; LINE];
            let t = Instant::now();
            (e.read(40 * LINE as u64, &mut buf), t.elapsed())
        });
        let write = s.spawn(|| {
            let t = Instant::now();
            let r = rbd.write_at(50 * LINE as u64, &model[50 * LINE..51 * LINE]);
            (r, t.elapsed())
        });
        let flush = s.spawn(|| {
            // After the write is in flight: a flush with nothing in flight is a
            // no-op that librbd answers at once, even now.
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            (rbd.flush(), t.elapsed())
        });
        // Meanwhile the cache keeps serving: a cached read and a `back` write.
        let t = Instant::now();
        let mut got = vec![0u8; LINE];
        e.read(0, &mut got)
            .expect("a cached read during the outage");
        assert!(got == model[..LINE], "cached read during the outage");
        e.write(2 * LINE as u64, &new_data, false)
            .expect("a back-mode write during the outage");
        let cached = t.elapsed();
        assert!(
            cached < TIMEOUT,
            "a cached read and a back write waited for the frozen OSD ({cached:?})"
        );
        (
            read.join().expect("read thread"),
            write.join().expect("write thread"),
            flush.join().expect("flush thread"),
        )
    });
    model[2 * LINE..2 * LINE + 4096].copy_from_slice(&new_data);
    let abandoned = rbd.abandoned_requests();
    eprintln!(
        "during the outage ({:?}): read {:?} after {:?}; write {:?} after {:?}; flush {:?} after {:?}; \
         abandoned requests {abandoned:?}",
        t0.elapsed(),
        read.0.as_ref().err(),
        read.1,
        write.0.as_ref().err().map(|e| e.to_string()),
        write.1,
        flush.0.as_ref().err().map(|e| e.to_string()),
        flush.1,
    );
    // The frozen OSD is thawed after 10 s by Frozen's dead man's switch: an
    // answer before 8 s can only come from the timeout.
    let in_time =
        |d: Duration| d >= TIMEOUT - Duration::from_millis(50) && d < Duration::from_secs(8);
    let err = read
        .0
        .expect_err("an uncached read must fail while the OSD is frozen");
    assert_eq!(err.errno, libc::EIO, "uncached read: {}", err.message);
    assert!(
        err.message.contains("did not answer within 2 s"),
        "the error names the timeout: {}",
        err.message
    );
    assert!(
        in_time(read.1),
        "the uncached read failed after {:?}",
        read.1
    );
    let err = write
        .0
        .expect_err("a write must not succeed while the OSD is frozen");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(in_time(write.1), "the write failed after {:?}", write.1);
    let err = flush
        .0
        .expect_err("a flush must not succeed while the OSD is frozen");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(in_time(flush.1), "the flush failed after {:?}", flush.1);
    assert!(
        abandoned.0 >= 3,
        "the timed-out read, write and flush are still in flight in librbd: {abandoned:?}"
    );
    assert!(
        e.stats().dirty_lines > 0,
        "the back-mode write stays dirty while the OSD is frozen"
    );
    drop(frozen);

    // Reads work again (the OSD may take a moment to serve after SIGCONT).
    let t1 = Instant::now();
    let mut got = vec![0u8; LINE];
    loop {
        match e.read(40 * LINE as u64, &mut got) {
            Ok(()) => break,
            Err(err) if t1.elapsed() < Duration::from_secs(60) => {
                eprintln!("read after SIGCONT failed, retrying: {}", err.message);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(err) => panic!("reads do not work again after SIGCONT: {}", err.message),
        }
    }
    assert!(got == model[40 * LINE..41 * LINE], "read after the outage");
    eprintln!("reads work again {:?} after SIGCONT", t1.elapsed());
    // Every abandoned request completes and is released.
    while rbd.abandoned_requests().0 > 0 {
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "abandoned requests never completed: {:?}",
            rbd.abandoned_requests()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    e.shutdown().expect("drain after the outage");
    drop(e);
    drop(rbd);
    assert!(
        c.read_image(&img.spec) == model,
        "the image differs from what was written"
    );
}
