//! The engine over a real RBD image (scripts/ceph-cluster.sh): the coherency
//! rules (writes made behind a detached cache are never served stale, dirty
//! data over a changed range is refused) and a resize under a running engine.
//! The model test (random request sequences in every mode against a reference
//! disk, with warm restarts through the RBD change marker) runs on RBD as the
//! rbd row of engine_model.rs.
#![cfg(feature = "rbd")]

use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{Backend, BlockIo, FaultyBackend, MemBackend, RbdBackend, ResizeWatch};
use testkit::ceph::{rbd_test, TestCluster};
use testkit::pattern;
use testkit::rig::{self, open};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

fn open_engine(
    backend: Arc<dyn Backend>,
    cache: &Arc<MemBackend>,
    cfg: &EngineConfig,
) -> Arc<Engine> {
    open(backend, cache.clone(), cfg.clone())
}

fn open_rbd(c: &TestCluster, spec: &rbd_backend::RbdSpec) -> Arc<RbdBackend> {
    Arc::new(RbdBackend::open(spec, &c.opts()).unwrap_or_else(|e| panic!("open: {e}")))
}

const LINE: u64 = rig::LINE as u64;

fn back_cfg() -> EngineConfig {
    rig::cfg(CacheMode::Back)
}

/// Attach, write, clean detach; `rbd bench` writes the first 8 KiB behind our
/// back; attach again: exactly the changed line is dropped and re-read from the
/// image, everything else is still served from the cache.
#[test]
fn rbd_writes_behind_a_detached_cache_are_never_served_stale() {
    let Some((c, _wd)) = rbd_test("coherency", 300) else {
        return;
    };
    let disk = 4 << 20;
    let img = c.image("coherent", disk);
    let cache = Arc::new(MemBackend::new((1 << 20) + 32 * LINE as usize));
    let ours = pattern(77, 8 * LINE as usize);
    {
        let b = open_rbd(&c, &img.spec);
        let e = open_engine(b, &cache, &back_cfg());
        e.write(0, &ours, false).expect("write");
        e.shutdown().expect("clean stop");
    }
    let out = c.bench_write(&img.spec, 8192);
    assert!(
        out.status.success(),
        "rbd bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = c.read_image(&img.spec);
    assert!(
        truth[..8192] != ours[..8192],
        "rbd bench wrote something else"
    );
    assert!(
        truth[8192..8 * LINE as usize] == ours[8192..],
        "rbd bench wrote only 8 KiB"
    );

    let b = Arc::new(FaultyBackend::new(open_rbd(&c, &img.spec)));
    let e = open_engine(b.clone(), &cache, &back_cfg());
    b.reset_stats();
    let mut got = vec![0u8; 8 * LINE as usize];
    e.read(0, &mut got).expect("read");
    assert!(
        got[..] == truth[..8 * LINE as usize],
        "stale data served after a write behind the cache"
    );
    let s = b.stats();
    assert_eq!(
        s.bytes_read, LINE,
        "exactly the changed line is re-read from the image; the other 7 stay cached ({s:?})"
    );
    e.shutdown().expect("clean stop");
}

/// A cache with dirty data for a range someone else changed is refused, and
/// the two ways forward work.
#[test]
fn rbd_dirty_data_over_a_changed_range_is_refused() {
    let Some((c, _wd)) = rbd_test("dirty_conflict", 300) else {
        return;
    };
    let img = c.image("dirtyconf", 4 << 20);
    let cache = Arc::new(MemBackend::new((1 << 20) + 32 * LINE as usize));
    let ours = pattern(5, LINE as usize);
    {
        // The image refuses our writes while attached, so the data is certainly
        // still dirty at detach (the flusher would otherwise race the test).
        let b = Arc::new(FaultyBackend::new(open_rbd(&c, &img.spec)));
        b.set_read_only(true);
        let e = open_engine(b, &cache, &back_cfg());
        e.write(0, &ours, false).expect("write");
        e.flush().expect("flush");
        e.detach_keep_dirty().expect("detach keeping dirty data");
        assert_eq!(e.stats().dirty_lines, 1);
    }
    {
        let raw = c.admin().open_raw(&img.spec).expect("raw");
        raw.write(4096, &pattern(6, 4096)).expect("write behind");
        raw.flush().expect("flush");
    }
    rig::assert_dirty_conflict_refused(rig::try_open(
        open_rbd(&c, &img.spec),
        cache.clone(),
        back_cfg(),
    ));

    // Writing the dirty data back over the change (the snapshot was consumed by
    // the refused attach, so this attach sees "unknown" and keeps only dirty data).
    let cfg = EngineConfig {
        accept_backend_change: true,
        ..back_cfg()
    };
    let e = open_engine(open_rbd(&c, &img.spec), &cache, &cfg);
    let mut got = vec![0u8; LINE as usize];
    e.read(0, &mut got).expect("read");
    assert!(got == ours, "the accepted dirty data wins");
    e.shutdown().expect("clean stop");
    drop(e);
    let truth = c.read_image(&img.spec);
    assert!(
        truth[..LINE as usize] == ours[..],
        "written back over the change"
    );
}

/// Waits until the backend's header watch has seen `size`.
fn wait_for_size(b: &RbdBackend, size: u64) {
    let t0 = std::time::Instant::now();
    while b.current_size() != size {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the resize to {size} was not noticed (still {})",
            b.current_size()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The image is resized under a running server. Neither ublk (on kernel 6.12)
/// nor NBD can change a live device's size, so the device keeps its size. A
/// grow changes nothing else. After a shrink every request reaching past the
/// new end fails with EIO, whether the data is cached or not; requests below it
/// work. Growing the image back makes the range usable again.
#[test]
fn rbd_resize_under_a_running_engine() {
    let Some((c, _wd)) = rbd_test("resize_engine", 300) else {
        return;
    };
    let lines = 32u64;
    let disk = lines * LINE;
    let img = c.image("resize", disk);
    let cache = Arc::new(MemBackend::new((1 << 20) + (16 * LINE) as usize));
    let rbd = open_rbd(&c, &img.spec);
    let e = open_engine(rbd.clone(), &cache, &back_cfg());
    let mut model = pattern(31, disk as usize);
    e.write(0, &model, false).expect("fill");
    e.flush().expect("flush");
    e.drain().expect("write back");
    // Cache the last line (clean).
    let last = (lines - 1) * LINE;
    let mut got = vec![0u8; LINE as usize];
    e.read(last, &mut got).expect("read the last line");
    assert!(got[..] == model[last as usize..]);

    // Grow: nothing changes for the device.
    c.admin().resize(&img.spec, disk + 8 * LINE).expect("grow");
    wait_for_size(&rbd, disk + 8 * LINE);
    assert_eq!(e.size(), disk, "the device keeps its size");
    e.read(last, &mut got).expect("read after the grow");
    assert!(got[..] == model[last as usize..]);
    let err = e.read(disk, &mut got).expect_err("past the device's end");
    assert_eq!(err.errno, libc::EINVAL, "{}", err.message);
    let data = pattern(32, 8192);
    e.write(last + 4096, &data, true)
        .expect("write after the grow");
    model[(last + 4096) as usize..(last + 4096) as usize + data.len()].copy_from_slice(&data);

    // Shrink below the last 4 lines: they fail with EIO, cached (the last line)
    // or not, reads and writes alike; below the new end all works.
    e.drain().expect("write back before the shrink");
    let end = disk - 4 * LINE;
    c.admin().resize(&img.spec, end).expect("shrink");
    wait_for_size(&rbd, end);
    assert_eq!(e.size(), disk, "the device keeps its size");
    for (off, len) in [(last, LINE), (end, 4096), (end - 4096, 8192)] {
        let mut buf = vec![0u8; len as usize];
        let err = e.read(off, &mut buf).expect_err("a read past the new end");
        assert_eq!(err.errno, libc::EIO, "read {off}+{len}: {}", err.message);
        assert!(err.message.contains("shrunk"), "{}", err.message);
        let err = e
            .write(off, &buf, false)
            .expect_err("a write past the new end");
        assert_eq!(err.errno, libc::EIO, "write {off}+{len}: {}", err.message);
        let err = e
            .write_zeroes(off, len)
            .expect_err("write-zeroes past the new end");
        assert_eq!(
            err.errno,
            libc::EIO,
            "write_zeroes {off}+{len}: {}",
            err.message
        );
        let err = e.discard(off, len).expect_err("discard past the new end");
        assert_eq!(err.errno, libc::EIO, "discard {off}+{len}: {}", err.message);
    }
    // The backend refuses too (for callers other than the engine).
    let mut buf = vec![0u8; 4096];
    let err = rbd
        .read_at(end, &mut buf)
        .expect_err("backend read past the new end");
    assert_eq!(err.errno(), libc::EIO, "{err}");
    let err = rbd
        .write_at(end - 4096, &[0u8; 8192])
        .expect_err("backend write past the new end");
    assert_eq!(err.errno(), libc::EIO, "{err}");
    // Below the new end everything works.
    let data = pattern(33, 3 * LINE as usize);
    let off = end - 3 * LINE;
    e.write(off, &data, false).expect("write below the new end");
    e.flush().expect("flush");
    model[off as usize..(off as usize + data.len())].copy_from_slice(&data);
    let mut buf = vec![0u8; end as usize];
    e.read(0, &mut buf).expect("read below the new end");
    assert!(buf[..] == model[..end as usize], "data below the new end");

    // Grow back: the range is usable again (what lies there is what the
    // cache still holds, else the zeroes of the grown image).
    e.drain().expect("write back");
    c.admin().resize(&img.spec, disk).expect("grow back");
    wait_for_size(&rbd, disk);
    let data = pattern(34, (disk - end) as usize);
    e.write(end, &data, false)
        .expect("write after growing back");
    model[end as usize..].copy_from_slice(&data);
    e.shutdown().expect("clean stop");
    drop(e);
    drop(rbd);
    assert!(
        c.read_image(&img.spec) == model,
        "the image after the resizes"
    );
}
