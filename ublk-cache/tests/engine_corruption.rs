//! Fuzzing the attach path: random byte damage to a cache's superblocks and
//! metadata must end in a clean load or a clean refusal. Never a panic, never a
//! hang, and a cache that loads must still serve reads.

use std::sync::Arc;

use policies::CacheMode;
use proptest::prelude::*;
use rbd_backend::{Backend, MemBackend};
use testkit::rig::{cfg_line, open};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig, EngineErrorKind};

const MIB: usize = 1 << 20;

fn cfg() -> EngineConfig {
    cfg_line(CacheMode::Back, 16384)
}

/// A detached cache with data in it (clean and dirty lines), as raw bytes.
fn sample_cache(backend: &Arc<MemBackend>) -> Vec<u8> {
    let cache = Arc::new(MemBackend::new(MIB + 64 * 16384));
    let e = open(backend.clone(), cache.clone(), cfg());
    for i in 0..40u64 {
        e.write(i * 12288, &vec![i as u8 + 1; 8192], false).unwrap();
    }
    e.flush().unwrap();
    e.detach_keep_dirty().unwrap();
    cache.snapshot()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn damaged_metadata_loads_or_is_refused_cleanly(
        hits in prop::collection::vec((0usize..(64 * 1024 + 4096), any::<u8>()), 1..12),
        in_superblock in any::<bool>(),
    ) {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut raw = sample_cache(&backend);
        for (at, x) in &hits {
            // Superblock copies live in the first 8 KiB; entries from 64 KiB.
            let at = if in_superblock { at % 8192 } else { 64 * 1024 + at % 4096 };
            raw[at] ^= x | 1;
        }
        let damaged = Arc::new(MemBackend::builder().data(raw).build());
        match Engine::open(backend.clone(), Some(damaged as Arc<dyn Backend>), cfg()) {
            Ok(e) => {
                let mut buf = vec![0u8; 4 * MIB];
                let read = e.read(0, &mut buf);
                e.abandon();
                e.forget_crash_shadow();
                prop_assert!(read.is_ok());
            }
            Err(err) => prop_assert!(
                matches!(err.kind(), EngineErrorKind::Corrupt | EngineErrorKind::Mismatch | EngineErrorKind::NotEmpty),
                "unexpected refusal kind {:?}: {err}", err.kind()
            ),
        }
    }
}

#[test]
fn a_zeroed_metadata_block_is_refused_not_read_as_empty() {
    let backend = Arc::new(MemBackend::new(4 * MIB));
    let mut raw = sample_cache(&backend);
    raw[64 * 1024..64 * 1024 + 4096].fill(0);
    let damaged = Arc::new(MemBackend::builder().data(raw).build());
    let err = Engine::open(backend, Some(damaged as Arc<dyn Backend>), cfg())
        .err()
        .expect("a lost metadata block must not load as an empty cache");
    assert_eq!(err.kind(), EngineErrorKind::Corrupt);
}
