//! The model test: one body, run against every backend row of the test kit
//! (mem; file × io_uring/psync × O_DIRECT/buffered; rbd on the Ceph test
//! cluster when it is up) and in every mode, offline included. Random request
//! sequences, with caches small enough to force eviction and write-back, are
//! checked step by step against a plain in-memory reference disk. Among the
//! operations are live mode switches, warm restarts (on the same connection
//! and on a new one) and a daemon crash (the engine abandoned, then attached
//! again from its crash shadow). After a clean stop the backend alone must
//! hold the reference disk.
//!
//! `PROPTEST_CASES` sets the cases per local row (default 48 on mem, 12 on
//! each file row), `RBD_MODEL_CASES` those on the rbd row (default 6).

use std::sync::Arc;

use policies::{CacheMode, WritebackOrder};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rbd_backend::{Backend, MemBackend};
use testkit::backends::{for_each_backend, BackendRow, TestDisk};
use testkit::rig::{cfg_line, try_open};
use ublk_cache::engine::PreloadOptions;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig, EngineErrorKind};

const SECTOR: u64 = 512;
/// Cache lines of the small caches (the disk has 8 times as many lines).
const CACHE_LINES: u64 = 16;
/// The largest line size drawn; extents are drawn for its disk and rescaled.
const MAX_DISK: u64 = 8 * CACHE_LINES * 65536;

#[derive(Debug, Clone)]
enum Op {
    Read {
        off: u64,
        len: u64,
    },
    Write {
        off: u64,
        len: u64,
        seed: u64,
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
    /// Read a range into the cache (refused in the modes that cache nothing).
    Preload {
        off: u64,
        len: u64,
    },
    /// Offline hydration of the whole image (offline mode only; else nothing).
    Hydrate,
    /// A live mode switch (to offline only for a server started offline).
    SetMode(CacheMode),
    /// Clean stop and attach again; `reconnect` opens the backend anew.
    Restart {
        reconnect: bool,
    },
    /// A daemon crash: the engine is abandoned as it stands and attached again.
    Abandon,
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
        24 => extent(disk).prop_map(|(off, len)| Op::Read { off, len }),
        24 => (extent(disk), any::<u64>(), prop::bool::weighted(0.1))
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        4 => Just(Op::Flush),
        4 => extent(disk).prop_map(|(off, len)| Op::Discard { off, len }),
        4 => extent(disk).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        1 => extent(disk).prop_map(|(off, len)| Op::Preload { off, len }),
        1 => Just(Op::Hydrate),
        2 => prop::sample::select(CacheMode::ALL.to_vec()).prop_map(Op::SetMode),
        2 => any::<bool>().prop_map(|reconnect| Op::Restart { reconnect }),
        2 => Just(Op::Abandon),
    ]
}

/// The extents of `op`, drawn for [`MAX_DISK`], moved onto a disk of `disk` bytes.
fn rescale(mut op: Op, disk: u64) -> Op {
    if let Op::Read { off, len }
    | Op::Write { off, len, .. }
    | Op::Discard { off, len }
    | Op::WriteZeroes { off, len }
    | Op::Preload { off, len } = &mut op
    {
        *off = (*off % disk) / SECTOR * SECTOR;
        *len = (*len).min(disk - *off);
    }
    op
}

/// An engine on one disk of a backend row, with a cache in memory.
struct Rig<'r> {
    disk: TestDisk<'r>,
    backend: Option<Arc<dyn Backend>>,
    cache: Arc<MemBackend>,
    cfg: EngineConfig,
    engine: Option<Arc<Engine>>,
}

fn fail(what: String) -> TestCaseError {
    TestCaseError::fail(what)
}

impl<'r> Rig<'r> {
    fn new(disk: TestDisk<'r>, cfg: EngineConfig, cache_bytes: u64) -> Result<Self, TestCaseError> {
        let mut rig = Rig {
            backend: Some(disk.open()),
            disk,
            cache: Arc::new(MemBackend::new(cache_bytes as usize)),
            cfg,
            engine: None,
        };
        rig.attach("attach")?;
        Ok(rig)
    }

    fn attach(&mut self, when: &str) -> Result<(), TestCaseError> {
        let b = Arc::clone(self.backend.as_ref().expect("a backend is open"));
        let e = try_open(b, self.cache.clone(), self.cfg.clone())
            .map_err(|e| fail(format!("{when}: the engine refused to attach: {e}")))?;
        self.engine = Some(e);
        Ok(())
    }

    fn e(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("an engine is attached")
    }

    /// Stop (cleanly, or as a crash leaves it) and attach again.
    fn restart(&mut self, clean: bool, reconnect: bool) -> Result<(), TestCaseError> {
        let e = self.engine.take().expect("an engine is attached");
        if clean {
            e.shutdown()
                .map_err(|err| fail(format!("clean stop: {err}")))?;
        } else {
            e.abandon();
        }
        drop(e);
        if reconnect {
            // The old connection goes first: it may hold the backend's lock.
            self.backend = None;
            self.backend = Some(self.disk.open());
        }
        self.attach(if clean {
            "warm restart"
        } else {
            "attach after a crash"
        })
    }

    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, TestCaseError> {
        let mut buf = vec![0u8; len as usize];
        self.e()
            .read(off, &mut buf)
            .map_err(|err| fail(format!("read {off}+{len}: {err}")))?;
        Ok(buf)
    }
}

/// The one model body: `ops` in `mode` on a new disk of `row`.
fn run(
    row: &BackendRow,
    mode: CacheMode,
    order: WritebackOrder,
    line: u32,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let disk_bytes = 8 * CACHE_LINES * line as u64;
    // 1 MiB of superblocks and metadata, then the data lines; offline mode
    // keeps the whole image, so its cache holds all of it.
    let data_bytes = if mode == CacheMode::Offline {
        disk_bytes + line as u64
    } else {
        CACHE_LINES * line as u64
    };
    let cfg = EngineConfig {
        order,
        ..cfg_line(mode, line)
    };
    let scratch = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let disk = row.create(&scratch, "model", disk_bytes);
    let mut rig = Rig::new(disk, cfg, (1 << 20) + data_bytes)?;
    let mut model = vec![0u8; disk_bytes as usize];
    for (i, op) in ops.iter().enumerate() {
        let step = |what: &str| format!("step {i} ({what})");
        match *op {
            Op::Read { off, len } => {
                let buf = rig
                    .read(off, len)
                    .map_err(|e| fail(format!("{}: {e}", step("read"))))?;
                let want = &model[off as usize..(off + len) as usize];
                if buf != want {
                    let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    return Err(fail(format!(
                        "{}: read {off}+{len} differs from the reference at byte {} (got {:#x}, want {:#x}), mode now {}",
                        step("read"),
                        off + at as u64,
                        buf[at],
                        want[at],
                        rig.e().mode()
                    )));
                }
            }
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let data = testkit::pattern(seed, len as usize);
                rig.e()
                    .write(off, &data, fua)
                    .map_err(|e| fail(format!("{}: {e}", step("write"))))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Flush => rig
                .e()
                .flush()
                .map_err(|e| fail(format!("{}: {e}", step("flush"))))?,
            Op::WriteZeroes { off, len } => {
                rig.e()
                    .write_zeroes(off, len)
                    .map_err(|e| fail(format!("{}: {e}", step("write-zeroes"))))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                rig.e()
                    .discard(off, len)
                    .map_err(|e| fail(format!("{}: {e}", step("discard"))))?;
                // Contents after discard are unspecified (RBD skips partial
                // discards); whatever the device returns now must stay stable
                // until the next write.
                let buf = rig.read(off, len)?;
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            Op::Preload { off, len } => {
                let r = rig
                    .e()
                    .preload(off, len, PreloadOptions::default(), None, None);
                match (rig.e().mode().uses_cache(), r) {
                    (true, Ok(rep)) if !rep.interrupted => {}
                    (true, Ok(_)) => return Err(fail(format!("{}: interrupted", step("preload")))),
                    (true, Err(e)) => return Err(fail(format!("{}: {e}", step("preload")))),
                    (false, Err(e)) if e.kind() == EngineErrorKind::Config => {}
                    (false, r) => {
                        return Err(fail(format!(
                            "{}: mode {} caches nothing, yet the preload gave {r:?}",
                            step("preload"),
                            rig.e().mode()
                        )))
                    }
                }
            }
            Op::Hydrate => {
                if rig.e().mode() == CacheMode::Offline {
                    let rep = rig
                        .e()
                        .hydrate(PreloadOptions::default(), None, None)
                        .map_err(|e| fail(format!("{}: {e}", step("hydrate"))))?;
                    if rep.interrupted || !rig.e().hydration_done() {
                        return Err(fail(format!("{}: not complete: {rep:?}", step("hydrate"))));
                    }
                }
            }
            Op::SetMode(to) => {
                let from = rig.e().mode();
                let r = rig.e().set_mode(to, None);
                // Offline mode holds the whole image, which only a server
                // started offline copies in: any other server refuses it.
                let refused = to == CacheMode::Offline && from != to && mode != CacheMode::Offline;
                match r {
                    Ok(prev) if !refused && prev == from && rig.e().mode() == to => {}
                    Err(e) if refused && e.kind() == EngineErrorKind::Config => {
                        if rig.e().mode() != from {
                            return Err(fail(format!(
                                "{}: a refused switch changed the mode",
                                step("set-mode")
                            )));
                        }
                    }
                    r => {
                        return Err(fail(format!(
                            "{}: {from} -> {to} gave {r:?} (mode now {})",
                            step("set-mode"),
                            rig.e().mode()
                        )))
                    }
                }
            }
            Op::Restart { reconnect } => rig
                .restart(true, reconnect)
                .map_err(|e| fail(format!("{}: {e}", step("restart"))))?,
            Op::Abandon => rig
                .restart(false, false)
                .map_err(|e| fail(format!("{}: {e}", step("abandon"))))?,
        }
        // The engine's own invariants, and every cached sector equal to the
        // reference (dirty or clean, cached data is what the disk holds).
        if std::env::var_os("MODEL_NO_CHECK").is_some() {
            continue;
        }
        let cached = rig
            .e()
            .check_invariants()
            .map_err(|e| fail(format!("{}: {e}", step("invariants"))))?;
        let image = rig.cache.snapshot();
        for (boff, coff) in cached {
            let (b, c) = (boff as usize, coff as usize);
            if image[c..c + 4096] != model[b..b + 4096] {
                return Err(fail(format!(
                    "{}: cached sector at {boff} (cache {coff}) differs from the reference",
                    step("invariants")
                )));
            }
        }
    }
    // Everything written must read back, and after a clean stop the backend
    // alone must hold exactly the reference disk, in every mode.
    let all = rig.read(0, disk_bytes)?;
    if let Some(at) = all.iter().zip(&model).position(|(a, b)| a != b) {
        return Err(fail(format!(
            "full read differs from the reference at byte {at} (got {:#x}, want {:#x})",
            all[at], model[at]
        )));
    }
    let e = rig.engine.take().expect("an engine is attached");
    e.shutdown()
        .map_err(|err| fail(format!("clean stop: {err}")))?;
    drop(e);
    rig.backend = None;
    prop_assert!(
        rig.disk.contents() == model,
        "the backend after a clean stop differs from the reference"
    );
    rig.disk.check_after_clean_stop().map_err(fail)?;
    Ok(())
}

fn env_cases(var: &str) -> Option<u32> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Runs the body for `mode` on every backend row.
fn model_test(name: &str, mode: CacheMode, order: WritebackOrder) {
    for_each_backend(name, 900, |row| {
        let (cases, ops) = match row {
            BackendRow::Mem => (env_cases("PROPTEST_CASES").unwrap_or(48), 1..80usize),
            BackendRow::File(_) => (env_cases("PROPTEST_CASES").unwrap_or(12), 1..80),
            // A few long runs: each case creates an image on the cluster.
            _ => (env_cases("RBD_MODEL_CASES").unwrap_or(6), 60..120),
        };
        let config = Config {
            cases,
            source_file: Some(file!()),
            // Shrinking over the network would take longer than it helps.
            max_shrink_iters: if row.is_remote() {
                0
            } else {
                Config::default().max_shrink_iters
            },
            ..Config::default()
        };
        let strategy = (
            prop::sample::select(vec![12u32, 14, 16]),
            prop::collection::vec(op(MAX_DISK), ops),
        );
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |(line_shift, ops)| {
            let line = 1u32 << line_shift;
            let disk = 8 * CACHE_LINES * line as u64;
            let ops: Vec<Op> = ops.into_iter().map(|o| rescale(o, disk)).collect();
            run(row, mode, order, line, &ops)
        });
        if let Err(e) = result {
            panic!("{name} on {}: {e}", row.label());
        }
    });
}

macro_rules! mode_test {
    ($name:ident, $mode:expr, $order:expr) => {
        #[test]
        fn $name() {
            model_test(stringify!($name), $mode, $order);
        }
    };
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
mode_test!(
    mode_offline_matches_reference,
    CacheMode::Offline,
    WritebackOrder::Ordered
);
