//! The engine over a real RBD image (scripts/ceph-cluster.sh): random request
//! sequences in every mode checked against a reference disk (as engine_model.rs
//! does over memory), warm restarts through the RBD change marker, and the
//! coherency rules: writes made behind a detached cache are never served stale.
#![cfg(feature = "rbd")]

use std::sync::Arc;

use policies::{CacheMode, WritebackOrder};
use rbd_backend::rbd::testing::{pattern, rbd_test, TestCluster};
use rbd_backend::{Backend, FaultyBackend, MemBackend, RbdBackend};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig, EngineErrorKind};

const SECTOR: u64 = 512;

/// A small deterministic generator (splitmix64): failures print the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn open_engine(
    backend: Arc<dyn Backend>,
    cache: &Arc<MemBackend>,
    cfg: &EngineConfig,
) -> Arc<Engine> {
    let c: Arc<dyn Backend> = cache.clone();
    Engine::open(backend, Some(c), cfg.clone()).expect("engine attaches")
}

fn open_rbd(c: &TestCluster, spec: &rbd_backend::RbdSpec) -> Arc<RbdBackend> {
    Arc::new(RbdBackend::open(spec, &c.opts()).unwrap_or_else(|e| panic!("open: {e}")))
}

/// One random run: `ops` requests over a 16-line cache on an image of 8× that.
fn run(c: &TestCluster, mode: CacheMode, order: WritebackOrder, line: u32, seed: u64, ops: usize) {
    let lines = 16u64;
    let disk = 8 * lines * line as u64;
    let img = c.image("model", disk);
    let cache = Arc::new(MemBackend::new((1 << 20) + (lines * line as u64) as usize));
    let cfg = EngineConfig {
        mode,
        order,
        line_size: Some(line),
        ..EngineConfig::default()
    };
    let mut backend = open_rbd(c, &img.spec);
    let mut engine = open_engine(backend.clone(), &cache, &cfg);
    let mut model = vec![0u8; disk as usize];
    let mut rng = Rng(seed);
    let ctx = |i: usize| format!("mode={mode} order={order:?} line={line} seed={seed} step={i}");
    for i in 0..ops {
        let sectors = disk / SECTOR;
        let s = rng.below(sectors);
        let n = match rng.below(3) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(64),
            _ => 1 + rng.below(400),
        }
        .min(sectors - s);
        let (off, len) = (s * SECTOR, n * SECTOR);
        let r = off as usize..(off + len) as usize;
        match rng.below(17) {
            0..=5 => {
                let mut buf = vec![0u8; len as usize];
                engine
                    .read(off, &mut buf)
                    .unwrap_or_else(|e| panic!("{}: read: {e}", ctx(i)));
                if buf != model[r.clone()] {
                    let at = buf.iter().zip(&model[r]).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "{}: read {off}+{len} differs from the reference at byte {}",
                        ctx(i),
                        off + at as u64
                    );
                }
            }
            6..=11 => {
                let data = pattern(rng.next(), len as usize);
                let fua = rng.below(10) == 0;
                engine
                    .write(off, &data, fua)
                    .unwrap_or_else(|e| panic!("{}: write: {e}", ctx(i)));
                model[r].copy_from_slice(&data);
            }
            12 => engine
                .flush()
                .unwrap_or_else(|e| panic!("{}: flush: {e}", ctx(i))),
            13 => {
                engine
                    .discard(off, len)
                    .unwrap_or_else(|e| panic!("{}: discard: {e}", ctx(i)));
                // Unspecified contents (RBD skips partial discards), but stable.
                let mut buf = vec![0u8; len as usize];
                engine
                    .read(off, &mut buf)
                    .unwrap_or_else(|e| panic!("{}: read: {e}", ctx(i)));
                model[r].copy_from_slice(&buf);
            }
            14 => {
                engine
                    .write_zeroes(off, len)
                    .unwrap_or_else(|e| panic!("{}: zeroes: {e}", ctx(i)));
                model[r].fill(0);
            }
            15 => {
                // Warm restart on the same connection: marker snapshot, diff, attach.
                engine
                    .shutdown()
                    .unwrap_or_else(|e| panic!("{}: shutdown: {e}", ctx(i)));
                drop(engine);
                engine = open_engine(backend.clone(), &cache, &cfg);
            }
            _ => {
                // Restart with a new connection: the lock goes and comes back.
                engine
                    .shutdown()
                    .unwrap_or_else(|e| panic!("{}: shutdown: {e}", ctx(i)));
                drop(engine);
                drop(backend);
                backend = open_rbd(c, &img.spec);
                engine = open_engine(backend.clone(), &cache, &cfg);
            }
        }
    }
    let mut all = vec![0u8; disk as usize];
    engine.read(0, &mut all).expect("full read");
    assert!(
        all == model,
        "{}: full read differs from the reference",
        ctx(ops)
    );
    engine.shutdown().expect("clean stop");
    drop(engine);
    drop(backend);
    // The image alone, read by another client, holds the reference disk.
    let raw = c.admin().open_raw(&img.spec).expect("raw open");
    let got = raw.read_all().expect("read image");
    assert!(
        got == model,
        "{}: image after clean stop differs from the reference",
        ctx(ops)
    );
    assert!(
        c.admin().snaps(&img.spec).expect("snaps").len() <= 1,
        "at most one change-marker snapshot is left"
    );
}

fn cases() -> u64 {
    std::env::var("RBD_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

macro_rules! mode_test {
    ($name:ident, $mode:expr, $order:expr) => {
        #[test]
        fn $name() {
            let Some((c, _wd)) = rbd_test(stringify!($name), 600) else {
                return;
            };
            for case in 0..cases() {
                for (k, line) in [4096u32, 16384, 65536].into_iter().enumerate() {
                    let seed = 0x5eed_0000 + case * 16 + k as u64 + (($mode).code() as u64) * 1000;
                    run(&c, $mode, $order, line, seed, 120);
                }
            }
        }
    };
}

mode_test!(
    rbd_none_matches_reference,
    CacheMode::None,
    WritebackOrder::Ordered
);
mode_test!(
    rbd_around_matches_reference,
    CacheMode::Around,
    WritebackOrder::Ordered
);
mode_test!(
    rbd_through_matches_reference,
    CacheMode::Through,
    WritebackOrder::Ordered
);
mode_test!(
    rbd_back_ordered_matches_reference,
    CacheMode::Back,
    WritebackOrder::Ordered
);
mode_test!(
    rbd_back_relaxed_matches_reference,
    CacheMode::Back,
    WritebackOrder::Relaxed
);

const LINE: u64 = 65536;

fn back_cfg() -> EngineConfig {
    EngineConfig {
        mode: CacheMode::Back,
        line_size: Some(LINE as u32),
        ..EngineConfig::default()
    }
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
    let err = Engine::open(
        open_rbd(&c, &img.spec),
        Some(cache.clone() as Arc<dyn Backend>),
        back_cfg(),
    )
    .err()
    .expect("dirty data over a changed range must be refused");
    assert_eq!(err.kind(), EngineErrorKind::DirtyData, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("--accept-backend-change") && msg.contains("--discard-dirty"),
        "{msg}"
    );

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
