//! The engine test rig: in-memory devices, configurations, attaching, reading
//! back, refusals, and a backend that holds write-back off. Shared by the
//! engine tests, the RBD engine tests and the benches, so that a set-up is
//! written once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use policies::CacheMode;
use rbd_backend::{Backend, BlockIo, FaultyBackend, MemBackend};
use ublk_cache::format::FormatVersion;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig, EngineError, EngineErrorKind, Remedy};

pub const MIB: u64 = 1 << 20;
/// The line size the rig's configurations use unless told otherwise.
pub const LINE: u32 = 64 * 1024;

/// A zeroed in-memory device of `size` bytes.
pub fn mem(size: u64) -> Arc<MemBackend> {
    Arc::new(MemBackend::new(size as usize))
}

/// A backend and a cache of these sizes in MiB, both in memory.
pub fn mems(backend_mib: u64, cache_mib: u64) -> (Arc<MemBackend>, Arc<MemBackend>) {
    (mem(backend_mib * MIB), mem(cache_mib * MIB))
}

/// `mode` with [`LINE`]-byte lines, everything else as by default.
pub fn cfg(mode: CacheMode) -> EngineConfig {
    cfg_line(mode, LINE)
}

/// `mode` with `line`-byte lines, crash shadows in [`shadow_dir`].
pub fn cfg_line(mode: CacheMode, line: u32) -> EngineConfig {
    EngineConfig {
        mode,
        line_size: Some(line),
        shadow_dir: shadow_dir(),
        ..EngineConfig::default()
    }
}

/// Where test engines (and test servers) keep their crash shadows: a tmpfs
/// like production's where there is one, but not production's directory.
/// Shared by test processes; shadows are named by their cache's uuid.
pub fn shadow_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join("ublk-cache-tests")
}

/// Attach `cache` in front of `backend`.
pub fn try_open(
    backend: Arc<dyn Backend>,
    cache: Arc<dyn BlockIo>,
    cfg: EngineConfig,
) -> Result<Arc<Engine>, EngineError> {
    Engine::open(backend, Some(cache), cfg)
}

/// Attach `cache` in front of `backend`; the test fails if the engine refuses.
pub fn open(backend: Arc<dyn Backend>, cache: Arc<dyn BlockIo>, cfg: EngineConfig) -> Arc<Engine> {
    try_open(backend, cache, cfg).unwrap_or_else(|e| panic!("the engine refused to attach: {e}"))
}

/// `len` bytes at `off`, read through the engine (the test fails on an error).
pub fn read(e: &Engine, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(off, &mut buf)
        .unwrap_or_else(|err| panic!("read {off}+{len}: {err}"));
    buf
}

/// `len` bytes of `byte`.
pub fn fill(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

/// The attach was refused with `kind`, and its message names `needle`.
/// Returns the error for further checks.
pub fn assert_refused(
    r: Result<Arc<Engine>, EngineError>,
    kind: EngineErrorKind,
    needle: &str,
) -> EngineError {
    let Err(err) = r else {
        panic!("the engine attached; expected a {kind:?} refusal naming '{needle}'")
    };
    assert_eq!(err.kind(), kind, "{err}");
    assert!(
        err.to_string().contains(needle),
        "the refusal does not name '{needle}': {err}"
    );
    err
}

/// The attach was refused because the cache holds dirty data over ranges the
/// backend changed, naming both ways forward.
pub fn assert_dirty_conflict_refused(r: Result<Arc<Engine>, EngineError>) -> EngineError {
    let err = assert_refused(r, EngineErrorKind::DirtyData, "for changed ranges");
    assert_eq!(
        err.remedies(),
        [Remedy::AcceptBackendChange, Remedy::DiscardDirty],
        "both ways forward are named: {err}"
    );
    err
}

/// A backend that refuses writes (as after a lost lock), so that data written
/// in `back` mode stays only in the cache, dirty, until the test calls
/// `set_read_only(false)`.
pub type Refusing = Arc<FaultyBackend<Arc<MemBackend>>>;

pub fn refusing(b: &Arc<MemBackend>) -> Refusing {
    let fb = Arc::new(FaultyBackend::builder(b.clone()).build());
    fb.set_read_only(true);
    fb
}

/// A `back` engine over a backend of `backend_mib` MiB that refuses write-back,
/// with a cache of `cache_mib` MiB: (backend, cache, the refusing wrapper, engine).
pub fn back_engine_refusing_write_back(
    backend_mib: u64,
    cache_mib: u64,
) -> (Arc<MemBackend>, Arc<MemBackend>, Refusing, Arc<Engine>) {
    back_engine_refusing_write_back_on(FormatVersion::V2, backend_mib, cache_mib)
}

/// [`back_engine_refusing_write_back`] on a cache formatted in `version`.
pub fn back_engine_refusing_write_back_on(
    version: FormatVersion,
    backend_mib: u64,
    cache_mib: u64,
) -> (Arc<MemBackend>, Arc<MemBackend>, Refusing, Arc<Engine>) {
    let (b, c) = mems(backend_mib, cache_mib);
    let fb = refusing(&b);
    let ecfg = EngineConfig {
        format_version: version,
        ..cfg(CacheMode::Back)
    };
    let e = open(fb.clone(), c.clone(), ecfg);
    (b, c, fb, e)
}

/// Random 4 KiB-aligned writes (and a flush every 16) from `threads` threads
/// while `during` runs; every request must succeed. Returns the reference image.
pub fn writes_during(e: &Arc<Engine>, size: u64, threads: u64, during: impl FnOnce()) -> Vec<u8> {
    let reference = Arc::new(Mutex::new(vec![0u8; size as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..threads {
        let (e, r, s) = (e.clone(), reference.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = crate::Rng::new(t + 1);
            let mut n = 0u64;
            // Each thread owns every `threads`-th 4 KiB block, so the reference
            // order per block is the thread's own order.
            while !s.load(Ordering::Acquire) || n < 64 {
                let blocks = size / 4096 / threads;
                let blk = rng.below(blocks) * threads + t;
                let data = crate::pattern(rng.next_u64(), 4096);
                e.write(blk * 4096, &data, false)
                    .expect("write while the operation runs");
                r.lock().unwrap()[(blk * 4096) as usize..(blk * 4096 + 4096) as usize]
                    .copy_from_slice(&data);
                if n.is_multiple_of(16) {
                    e.flush().expect("flush while the operation runs");
                }
                n += 1;
            }
        }));
    }
    during();
    stop.store(true, Ordering::Release);
    for h in hs {
        h.join().unwrap();
    }
    let r = reference.lock().unwrap().clone();
    r
}
