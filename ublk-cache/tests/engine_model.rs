//! Property tests: random request sequences against the engine, in every mode,
//! with caches small enough to force eviction and write-back, each step checked
//! against a plain in-memory reference disk.

use std::sync::Arc;

use policies::{CacheMode, WritebackOrder};
use proptest::prelude::*;
use rbd_backend::{Backend, MemBackend};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Read {
        off: u64,
        len: u64,
    },
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
    /// Clean stop and attach again (warm restart).
    Restart,
}

/// Offsets and lengths in 512-byte units, biased towards line boundaries and
/// small sizes, sometimes spanning several lines.
fn extent(disk: u64) -> impl Strategy<Value = (u64, u64)> {
    let sectors = disk / SECTOR;
    (0..sectors, prop_oneof![1u64..=8, 1u64..=64, 1u64..=400]).prop_map(move |(s, n)| {
        let n = n.min(sectors - s).max(1);
        (s * SECTOR, n * SECTOR)
    })
}

fn op(disk: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => extent(disk).prop_map(|(off, len)| Op::Read { off, len }),
        6 => (extent(disk), any::<u8>(), prop::bool::weighted(0.1))
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        1 => Just(Op::Flush),
        1 => extent(disk).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => extent(disk).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        1 => Just(Op::Restart),
    ]
}

fn pattern(off: u64, len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((off + i) as u8).wrapping_mul(31) ^ seed ^ ((off + i) >> 9) as u8)
        .collect()
}

struct Rig {
    backend: Arc<MemBackend>,
    cache: Arc<MemBackend>,
    cfg: EngineConfig,
    engine: Arc<Engine>,
}

impl Rig {
    fn new(mode: CacheMode, order: WritebackOrder, line: u32, lines: u64, disk: u64) -> Self {
        let backend = Arc::new(MemBackend::new(disk as usize));
        // 1 MiB of superblock and metadata, then the data lines.
        let cache = Arc::new(MemBackend::new((1 << 20) + (lines * line as u64) as usize));
        let cfg = EngineConfig {
            mode,
            order,
            line_size: Some(line),
            ..EngineConfig::default()
        };
        let engine = Self::open(&backend, &cache, &cfg);
        Rig {
            backend,
            cache,
            cfg,
            engine,
        }
    }

    fn open(backend: &Arc<MemBackend>, cache: &Arc<MemBackend>, cfg: &EngineConfig) -> Arc<Engine> {
        let b: Arc<dyn Backend> = backend.clone();
        let c: Arc<dyn Backend> = cache.clone();
        Engine::open(b, Some(c), cfg.clone()).expect("engine attaches")
    }

    fn restart(&mut self) {
        self.engine.shutdown().expect("clean shutdown");
        self.engine = Self::open(&self.backend, &self.cache, &self.cfg);
    }
}

fn run(mode: CacheMode, order: WritebackOrder, line: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let lines = 16u64;
    let disk = 8 * lines * line as u64;
    let mut rig = Rig::new(mode, order, line, lines, disk);
    let mut model = vec![0u8; disk as usize];
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                rig.engine
                    .read(off, &mut buf)
                    .map_err(|e| TestCaseError::fail(format!("step {i} read: {e}")))?;
                let want = &model[off as usize..(off + len) as usize];
                if buf != want {
                    let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    return Err(TestCaseError::fail(format!(
                        "step {i}: read {off}+{len} differs from the reference at byte {} (got {:#x}, want {:#x})",
                        off + at as u64, buf[at], want[at]
                    )));
                }
            }
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let data = pattern(off, len, seed);
                rig.engine
                    .write(off, &data, fua)
                    .map_err(|e| TestCaseError::fail(format!("step {i} write: {e}")))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Flush => rig
                .engine
                .flush()
                .map_err(|e| TestCaseError::fail(format!("step {i} flush: {e}")))?,
            Op::WriteZeroes { off, len } => {
                rig.engine
                    .write_zeroes(off, len)
                    .map_err(|e| TestCaseError::fail(format!("step {i} zeroes: {e}")))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                rig.engine
                    .discard(off, len)
                    .map_err(|e| TestCaseError::fail(format!("step {i} discard: {e}")))?;
                // Contents after discard are unspecified; whatever the device
                // returns now must stay stable until the next write.
                let mut buf = vec![0u8; len as usize];
                rig.engine
                    .read(off, &mut buf)
                    .map_err(|e| TestCaseError::fail(format!("step {i} read: {e}")))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            Op::Restart => rig.restart(),
        }
        // The engine's own invariants, and every cached sector equal to the
        // reference (dirty or clean, cached data is what the disk holds).
        if std::env::var_os("MODEL_NO_CHECK").is_some() {
            continue;
        }
        let cached = rig
            .engine
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("step {i} ({op:?}): {e}")))?;
        let image = rig.cache.snapshot();
        for (boff, coff) in cached {
            let (b, c) = (boff as usize, coff as usize);
            if image[c..c + 4096] != model[b..b + 4096] {
                return Err(TestCaseError::fail(format!(
                    "step {i} ({op:?}): cached sector at {boff} (cache {coff}) differs from the reference"
                )));
            }
        }
    }
    // Everything written must read back, and after a clean stop the backend
    // alone must hold exactly the reference disk, in every mode.
    let mut all = vec![0u8; disk as usize];
    rig.engine
        .read(0, &mut all)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let Some(at) = all.iter().zip(&model).position(|(a, b)| a != b) {
        return Err(TestCaseError::fail(format!(
            "full read differs from the reference at byte {at} (got {:#x}, want {:#x})",
            all[at], model[at]
        )));
    }
    rig.engine
        .shutdown()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        rig.backend.snapshot() == model,
        "backend after clean stop differs from the reference"
    );
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        ..ProptestConfig::default()
    }
}

macro_rules! mode_test {
    ($name:ident, $mode:expr, $order:expr) => {
        proptest! {
            #![proptest_config(config())]
            #[test]
            fn $name(
                line_shift in prop::sample::select(vec![12u32, 14, 16]),
                ops in prop::collection::vec(op(8 * 16 * 65536), 1..80),
            ) {
                let line = 1u32 << line_shift;
                let disk = 8 * 16 * line as u64;
                // Re-scale the generated extents onto this line size's disk.
                let ops: Vec<Op> = ops.into_iter().map(|o| rescale(o, disk)).collect();
                run($mode, $order, line, &ops)?;
            }
        }
    };
}

fn rescale(op: Op, disk: u64) -> Op {
    let fit = |off: u64, len: u64| {
        let off = (off % disk) / SECTOR * SECTOR;
        (off, len.min(disk - off))
    };
    match op {
        Op::Read { off, len } => {
            let (off, len) = fit(off, len);
            Op::Read { off, len }
        }
        Op::Write {
            off,
            len,
            seed,
            fua,
        } => {
            let (off, len) = fit(off, len);
            Op::Write {
                off,
                len,
                seed,
                fua,
            }
        }
        Op::Discard { off, len } => {
            let (off, len) = fit(off, len);
            Op::Discard { off, len }
        }
        Op::WriteZeroes { off, len } => {
            let (off, len) = fit(off, len);
            Op::WriteZeroes { off, len }
        }
        other => other,
    }
}

mode_test!(
    mode_none_matches_reference,
    CacheMode::None,
    WritebackOrder::Ordered
);
mode_test!(
    mode_around_matches_reference,
    CacheMode::Around,
    WritebackOrder::Ordered
);
mode_test!(
    mode_through_matches_reference,
    CacheMode::Through,
    WritebackOrder::Ordered
);
mode_test!(
    mode_back_ordered_matches_reference,
    CacheMode::Back,
    WritebackOrder::Ordered
);
mode_test!(
    mode_back_relaxed_matches_reference,
    CacheMode::Back,
    WritebackOrder::Relaxed
);
