//! A format-v1 cache written by the last v1-only release (4c33a56) and left by
//! `kill -9` (fixture and how it was made: `tests/data/v1-crash/README.md`)
//! attaches under this version: its acknowledged data comes back, it stays
//! format v1 (no in-place conversion), and it keeps working afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{Backend, FileBackend, OpenOptions};
use ublk_cache::format::layout::FormatVersion;
use ublk_cache::format::layout::SB_COPY_OFFSETS;
use ublk_cache::format::superblock::{Superblock, SB_BYTES};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const KIB: usize = 1024;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/v1-crash")
        .join(name)
}

/// Unpacks the fixture's images into `dir` (gzip is part of every Debian).
fn unpack(dir: &Path) -> (PathBuf, PathBuf) {
    let mut out = Vec::new();
    for name in ["backend.img", "cache.img"] {
        let gz = fixture(&format!("{name}.gz"));
        let o = Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .output()
            .expect("run gzip");
        assert!(o.status.success(), "gzip -dc {}: {:?}", gz.display(), o);
        let path = dir.join(name);
        std::fs::write(&path, o.stdout).unwrap();
        out.push(path);
    }
    rehome(&out[0], &out[1]);
    (out[0].clone(), out[1].clone())
}

/// The superblock names the image it caches by path and inode; an unpacked
/// copy has new ones. Rewrite both copies' backend record (and nothing else)
/// so that the cache belongs to the copy, as it belonged to the original.
fn rehome(backend: &Path, cache: &Path) {
    let id = FileBackend::open(backend, OpenOptions::default())
        .unwrap()
        .identity();
    let mut raw = std::fs::read(cache).unwrap();
    for off in SB_COPY_OFFSETS {
        let at = off as usize..off as usize + SB_BYTES;
        let mut sb = Superblock::decode(&raw[at.clone()]).expect("fixture superblock");
        assert_eq!(
            sb.layout.version(),
            FormatVersion::V1,
            "the fixture is format v1"
        );
        sb.backend.name = id.name.clone();
        sb.backend.fingerprint = id.fingerprint.clone();
        raw[at].copy_from_slice(&sb.encode());
    }
    std::fs::write(cache, raw).unwrap();
}

fn open(backend: &Path, cache: &Path, shadows: &Path) -> Arc<Engine> {
    let file = |p: &Path| -> Arc<dyn Backend> {
        Arc::new(FileBackend::open(p, OpenOptions::default()).expect("open image"))
    };
    Engine::open(
        file(backend),
        Some(file(cache)),
        EngineConfig {
            mode: CacheMode::Back,
            shadow_dir: shadows.to_path_buf(),
            ..EngineConfig::default()
        },
    )
    .expect("a v1 cache attaches")
}

fn read(e: &Engine, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(off, &mut buf).expect("read");
    buf
}

fn assert_all(buf: &[u8], byte: u8, what: &str) {
    if let Some(i) = buf.iter().position(|&b| b != byte) {
        panic!("{what}: byte {i} is {:#04x}, want {byte:#04x}", buf[i]);
    }
}

/// The cases share one shadow directory, so they run in one test, one after
/// the other.
#[test]
fn a_v1_cache_left_by_a_crash_of_the_v1_release_attaches_and_keeps_its_data() {
    let shadows = tempfile::tempdir().unwrap();

    // A power cut: the tmpfs shadow is gone. The flushed first write survives;
    // the unflushed second one had been written back before the kill (the
    // fixture's backend image holds it), so it is there too.
    let dir = tempfile::tempdir().unwrap();
    let (backend, cache) = unpack(dir.path());
    let e = open(&backend, &cache, shadows.path());
    assert_eq!(e.stats().format_version, 1, "a v1 cache stays v1");
    assert_all(
        &read(&e, 0, 256 * KIB),
        0xa1,
        "flushed write after a power cut",
    );
    assert_all(
        &read(&e, 256 * KIB as u64, 512 * KIB),
        0xb2,
        "written back before the cut",
    );
    assert_all(&read(&e, 768 * KIB as u64, 256 * KIB), 0, "never written");
    e.shutdown().unwrap();

    // A kill -9: the shadow holds the acknowledged, unflushed second write.
    let dir = tempfile::tempdir().unwrap();
    let (backend, cache) = unpack(dir.path());
    let shadow = "faad4c75c406e4db99e7b5b81f8484ef.shadow";
    std::fs::copy(fixture(shadow), shadows.path().join(shadow)).unwrap();
    let e = open(&backend, &cache, shadows.path());
    assert_eq!(e.stats().format_version, 1);
    assert_all(&read(&e, 0, 256 * KIB), 0xa1, "first write");
    assert_all(
        &read(&e, 256 * KIB as u64, 512 * KIB),
        0xb2,
        "second write, from the shadow",
    );

    // The upgraded server goes on with the v1 cache: a new write, a FLUSH,
    // a clean stop, and a fresh attach sees all of it.
    e.write(768 * KIB as u64, &[0xc3; 64 * KIB], false).unwrap();
    e.flush().unwrap();
    e.shutdown().unwrap();
    let e = open(&backend, &cache, shadows.path());
    assert_eq!(e.stats().format_version, 1);
    assert_all(&read(&e, 0, 256 * KIB), 0xa1, "first write after restart");
    assert_all(
        &read(&e, 256 * KIB as u64, 512 * KIB),
        0xb2,
        "second write after restart",
    );
    assert_all(
        &read(&e, 768 * KIB as u64, 64 * KIB),
        0xc3,
        "write made after the upgrade",
    );
    e.drain().unwrap();
    e.shutdown().unwrap();

    // Written back, the backend alone holds everything.
    let raw = std::fs::read(&backend).unwrap();
    assert_all(&raw[..256 * KIB], 0xa1, "backend, first write");
    assert_all(&raw[256 * KIB..768 * KIB], 0xb2, "backend, second write");
    assert_all(&raw[768 * KIB..832 * KIB], 0xc3, "backend, new write");
}
