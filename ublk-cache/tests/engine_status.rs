//! Block status through the engine: the backend's allocation map joined with
//! the cache's dirty data, answered without reading data from the backend.

use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{Backend, BlockIo, FaultyBackend, FileBackend, MemBackend, OpenOptions};
use ublk_cache::target::{BlockTarget, Extent};
use ublk_cache::{Engine, EngineConfig};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn cfg(mode: CacheMode) -> EngineConfig {
    EngineConfig {
        mode,
        line_size: Some(64 * 1024),
        shadow_dir: testkit::rig::shadow_dir(),
        ..EngineConfig::default()
    }
}

/// `(offset, len, hole)` triples from consecutive extents starting at `start`.
fn spans(start: u64, ext: &[Extent]) -> Vec<(u64, u64, bool)> {
    let mut pos = start;
    ext.iter()
        .map(|e| {
            let s = (pos, e.len, e.hole);
            pos += e.len;
            s
        })
        .collect()
}

/// Ask until `[0, size)` is covered, checking that answers are consecutive.
fn full_map(t: &dyn BlockTarget, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let ext = t.block_status(pos, size - pos).expect("block status");
        assert!(!ext.is_empty(), "at least one extent");
        for s in spans(pos, &ext) {
            assert!(s.1 > 0 && s.0 % 512 == 0 && s.1 % 512 == 0, "{s:?}");
            match out.last_mut() {
                Some(l) if l.2 == s.2 && l.0 + l.1 == s.0 => l.1 += s.1,
                _ => out.push(s),
            }
            pos = s.0 + s.1;
        }
    }
    assert_eq!(pos, size, "no extent reaches past the end");
    out
}

#[test]
fn dirty_data_over_a_backend_hole_is_data() {
    let backend = Arc::new(MemBackend::new((4 * MIB) as usize));
    backend.write_at(MIB, &[1u8; 4096]).unwrap();
    // Write-back is refused, so what the engine writes stays dirty in the cache.
    let fb = Arc::new(FaultyBackend::builder(backend.clone()).build());
    fb.set_read_only(true);
    let cache = Arc::new(MemBackend::new((4 * MIB) as usize));
    let e = Engine::open(
        fb.clone() as Arc<dyn Backend>,
        Some(cache as Arc<dyn Backend>),
        cfg(CacheMode::Back),
    )
    .unwrap();
    e.write(2 * MIB + 8 * KIB, &[2u8; 8192], false).unwrap();
    let before = e.stats().backend_read_bytes;
    assert_eq!(
        full_map(&*e, 4 * MIB),
        vec![
            (0, MIB, true),
            (MIB, 4 * KIB, false),
            (MIB + 4 * KIB, MIB - 4 * KIB + 8 * KIB, true),
            (2 * MIB + 8 * KIB, 8 * KIB, false),
            (2 * MIB + 16 * KIB, 2 * MIB - 16 * KIB, true),
        ]
    );
    assert_eq!(
        e.stats().backend_read_bytes,
        before,
        "block status reads no data from the backend"
    );
    // Past the end, and a shut-down engine: clean errors.
    assert_eq!(
        e.block_status(4 * MIB, 512).unwrap_err().errno(),
        libc::EINVAL
    );
    fb.set_read_only(false);
    e.shutdown().unwrap();
    assert!(e.block_status(0, 512).is_err());
    // After the clean stop the data is on the backend, and still data there.
    let m = backend
        .allocation_map()
        .unwrap()
        .allocation(0, 4 * MIB)
        .unwrap();
    assert_eq!(m.data, vec![(MIB, 4 * KIB), (2 * MIB + 8 * KIB, 8 * KIB)]);
}

#[test]
fn a_sparse_file_backend_reports_its_holes_in_every_mode() {
    for mode in [CacheMode::None, CacheMode::Through, CacheMode::Back] {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * MIB).unwrap();
        drop(f);
        let backend = Arc::new(FileBackend::open(&path, OpenOptions::default()).unwrap());
        backend.write_at(16 * MIB, &[7u8; 65536]).unwrap();
        backend.flush().unwrap();
        let cache = Arc::new(MemBackend::new((8 * MIB) as usize));
        let e = Engine::open(
            backend.clone() as Arc<dyn Backend>,
            Some(cache as Arc<dyn Backend>),
            cfg(mode),
        )
        .unwrap();
        e.write(40 * MIB, &[9u8; 131072], false).unwrap();
        let map = full_map(&*e, 64 * MIB);
        let data: Vec<(u64, u64)> = map.iter().filter(|s| !s.2).map(|s| (s.0, s.1)).collect();
        // Filesystems allocate in blocks of up to 64 KiB here; the written
        // ranges are data, and almost everything else is a hole.
        for (o, n) in [(16 * MIB, 65536), (40 * MIB, 131072)] {
            assert!(
                data.iter().any(|&(a, l)| a <= o && o + n <= a + l),
                "{mode}: {o}+{n} reported as data in {map:?}"
            );
        }
        let data_bytes: u64 = data.iter().map(|d| d.1).sum();
        assert!(
            data_bytes <= 2 * MIB,
            "{mode}: {data_bytes} bytes of data in {map:?}"
        );
        e.shutdown().unwrap();
    }
}
