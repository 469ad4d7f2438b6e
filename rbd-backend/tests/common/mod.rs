//! Helpers shared by the integration tests: run a body on every engine (and in
//! direct and buffered mode), make backing files, deterministic random data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rbd_backend::{Backend, FileBackend, IoEngine, OpenOptions, SyncEngine, UringEngine};

/// Every engine this machine can run. io_uring being unavailable is reported
/// loudly (not silently passed), so a sandbox that refuses it is noticed.
pub fn engines() -> Vec<Arc<dyn IoEngine>> {
    let mut v: Vec<Arc<dyn IoEngine>> = vec![Arc::new(SyncEngine::new())];
    match UringEngine::new() {
        Ok(u) => v.push(Arc::new(u)),
        Err(e) => eprintln!("SKIP: io_uring engine unavailable here ({e}); testing sync only"),
    }
    v
}

pub fn for_each_engine(mut f: impl FnMut(Arc<dyn IoEngine>)) {
    for e in engines() {
        f(e);
    }
}

/// One way of opening a file backend: engine × O_DIRECT or buffered.
pub struct Setup {
    pub engine: Arc<dyn IoEngine>,
    pub direct: bool,
}

impl Setup {
    pub fn label(&self) -> String {
        format!(
            "engine={} direct={}",
            self.engine.kind(),
            if self.direct { "yes" } else { "no" }
        )
    }

    pub fn opts(&self) -> OpenOptions {
        OpenOptions {
            read_only: false,
            direct: self.direct,
        }
    }

    pub fn open(&self, path: &Path) -> FileBackend {
        let b = FileBackend::open_with_engine(path, self.opts(), Arc::clone(&self.engine))
            .unwrap_or_else(|e| panic!("open {} ({}): {e}", path.display(), self.label()));
        assert_eq!(b.engine_kind(), self.engine.kind());
        if !self.direct {
            assert!(!b.is_direct());
        } else if b.size().is_multiple_of(4096) && takes_o_direct(path) {
            // Otherwise a silent fallback would leave the O_DIRECT paths untested.
            assert!(b.is_direct(), "expected O_DIRECT on {}", path.display());
        }
        b
    }
}

pub fn for_each_setup(mut f: impl FnMut(&Setup)) {
    for engine in engines() {
        for direct in [true, false] {
            let s = Setup {
                engine: Arc::clone(&engine),
                direct,
            };
            eprintln!("-- {}", s.label());
            f(&s);
        }
    }
}

/// Whether the filesystem holding `path` accepts O_DIRECT at all.
pub fn takes_o_direct(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok();
    if !ok {
        eprintln!(
            "SKIP: {} refuses O_DIRECT; direct-mode tests run buffered",
            path.display()
        );
    }
    ok
}

/// A scratch directory on the build's filesystem (a real disk filesystem, so
/// O_DIRECT is exercised, unlike a tmpfs /tmp might be).
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir")
}

/// Creates `name` in `dir` holding `data`.
pub fn make_file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, data).expect("write backing file");
    p
}

/// xorshift64*: deterministic, dependency-free test randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A recognisable, position-dependent pattern (never all zeroes).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_add(seed) | 1)
        .collect()
}

/// `v` with `extra` bytes in front, returning a slice that starts at an odd address.
pub fn misaligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    v.clear();
    v.resize(len + 1, 0);
    &mut v[1..]
}
