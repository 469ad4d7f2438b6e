//! The backend factory: every way the engine's slow disk can be opened in a
//! test, as rows a test body runs against ([`for_each_backend`]):
//!
//! - `mem`: [`MemBackend`];
//! - `file`: a [`FileBackend`] on a scratch file, for each I/O engine this
//!   machine runs (io_uring, psync) × O_DIRECT or buffered;
//! - `rbd`: an image on the Ceph test cluster, when `scripts/ceph-cluster.sh
//!   env` is in the environment (else the SKIP rule of [`crate::skip`]).
//!
//! A new backend proves itself by appearing here: every body that runs
//! `for_each_backend` then runs on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rbd_backend::{
    Backend, BlockIo, FileBackend, IoEngine, MemBackend, OpenOptions, SyncEngine, UringEngine,
};

use crate::skip;

/// Every I/O engine this machine can run. io_uring being unavailable is
/// reported loudly (not silently passed), so a sandbox that refuses it is noticed.
pub fn engines() -> Vec<Arc<dyn IoEngine>> {
    let mut v: Vec<Arc<dyn IoEngine>> = vec![Arc::new(SyncEngine::new())];
    match UringEngine::new() {
        Ok(u) => v.push(Arc::new(u)),
        Err(e) => skip::note(&format!(
            "io_uring engine unavailable here ({e}); testing psync only"
        )),
    }
    v
}

pub fn for_each_engine(mut f: impl FnMut(Arc<dyn IoEngine>)) {
    for e in engines() {
        f(e);
    }
}

/// One way of opening a file backend: I/O engine × O_DIRECT or buffered.
pub struct FileSetup {
    pub engine: Arc<dyn IoEngine>,
    pub direct: bool,
}

impl FileSetup {
    pub fn label(&self) -> String {
        format!(
            "file engine={} direct={}",
            self.engine.kind(),
            if self.direct { "yes" } else { "no" }
        )
    }

    pub fn opts(&self) -> OpenOptions {
        OpenOptions {
            direct: self.direct,
            ..OpenOptions::default()
        }
    }

    /// Open `path`, checking that what was asked for is what is in effect.
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

/// Every file setup: each engine, with and without O_DIRECT.
pub fn file_setups() -> Vec<FileSetup> {
    let mut v = Vec::new();
    for engine in engines() {
        for direct in [true, false] {
            v.push(FileSetup {
                engine: Arc::clone(&engine),
                direct,
            });
        }
    }
    v
}

pub fn for_each_file_setup(mut f: impl FnMut(&FileSetup)) {
    for s in file_setups() {
        eprintln!("-- {}", s.label());
        f(&s);
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
        skip::note(&format!(
            "{} refuses O_DIRECT; direct-mode tests run buffered",
            path.display()
        ));
    }
    ok
}

/// A new scratch directory below `base` (see [`crate::scratch_dir!`]).
pub fn scratch_in(base: &Path) -> tempfile::TempDir {
    tempfile::tempdir_in(base).expect("scratch dir")
}

/// Creates `name` in `dir` holding `data`.
pub fn make_file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, data).expect("write backing file");
    p
}

/// `v` with an extra byte in front, returning a slice that starts at an odd address.
pub fn misaligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    v.clear();
    v.resize(len + 1, 0);
    &mut v[1..]
}

/// One row of the backend factory.
pub enum BackendRow {
    Mem,
    File(FileSetup),
    #[cfg(feature = "rbd")]
    Rbd(crate::ceph::TestCluster),
}

impl BackendRow {
    pub fn label(&self) -> String {
        match self {
            BackendRow::Mem => "mem".into(),
            BackendRow::File(s) => s.label(),
            #[cfg(feature = "rbd")]
            BackendRow::Rbd(_) => "rbd".into(),
        }
    }

    /// A backend over the network: tests run fewer cases on it.
    pub fn is_remote(&self) -> bool {
        !matches!(self, BackendRow::Mem | BackendRow::File(_))
    }

    /// A new zeroed disk of `size` bytes on this row; `scratch` holds files.
    pub fn create(&self, scratch: &Path, tag: &str, size: u64) -> TestDisk<'_> {
        let disk = match self {
            BackendRow::Mem => Disk::Mem(Arc::new(MemBackend::new(size as usize))),
            BackendRow::File(setup) => {
                let dir = scratch_in(scratch);
                let path = dir.path().join(format!("{tag}.img"));
                std::fs::File::create(&path)
                    .and_then(|f| f.set_len(size))
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
                Disk::File {
                    setup,
                    path,
                    _dir: dir,
                }
            }
            #[cfg(feature = "rbd")]
            BackendRow::Rbd(c) => Disk::Rbd {
                cluster: c,
                image: c.image(tag, size),
            },
        };
        TestDisk { disk }
    }
}

/// A disk made by a [`BackendRow`]; removed when dropped.
pub struct TestDisk<'r> {
    disk: Disk<'r>,
}

enum Disk<'r> {
    Mem(Arc<MemBackend>),
    File {
        setup: &'r FileSetup,
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    #[cfg(feature = "rbd")]
    Rbd {
        cluster: &'r crate::ceph::TestCluster,
        image: crate::ceph::TestImage<'r>,
    },
}

impl TestDisk<'_> {
    /// Open the disk: a new connection each time (a new file descriptor, a
    /// new librbd client holding the image's lock); the same object for `mem`.
    pub fn open(&self) -> Arc<dyn Backend> {
        match &self.disk {
            Disk::Mem(m) => m.clone(),
            Disk::File { setup, path, .. } => Arc::new(setup.open(path)),
            #[cfg(feature = "rbd")]
            Disk::Rbd { cluster, image } => Arc::new(
                rbd_backend::RbdBackend::open(&image.spec, &cluster.opts())
                    .unwrap_or_else(|e| panic!("open rbd:{}: {e}", image.spec)),
            ),
        }
    }

    /// The whole disk as another client reads it (with no backend of ours open
    /// on it, for the rbd row, whose image is locked by its holder).
    pub fn contents(&self) -> Vec<u8> {
        match &self.disk {
            Disk::Mem(m) => m.snapshot(),
            Disk::File { path, .. } => {
                std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            }
            #[cfg(feature = "rbd")]
            Disk::Rbd { cluster, image } => cluster.read_image(&image.spec),
        }
    }

    /// Checks that hold of the disk after a clean stop, beyond its contents
    /// (an RBD image keeps at most one change-marker snapshot).
    pub fn check_after_clean_stop(&self) -> Result<(), String> {
        match &self.disk {
            #[cfg(feature = "rbd")]
            Disk::Rbd { cluster, image } => {
                let snaps = cluster
                    .admin()
                    .snaps(&image.spec)
                    .map_err(|e| e.to_string())?;
                if snaps.len() > 1 {
                    return Err(format!(
                        "{} change-marker snapshots are left; at most one may be",
                        snaps.len()
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Every row this machine has: mem, each file setup, and rbd when the test
/// cluster is up (the SKIP rule otherwise).
pub fn backend_rows(test: &str) -> Vec<BackendRow> {
    let mut v = vec![BackendRow::Mem];
    v.extend(file_setups().into_iter().map(BackendRow::File));
    #[cfg(feature = "rbd")]
    if let Some(c) = crate::ceph::cluster(test) {
        v.push(BackendRow::Rbd(c));
    }
    #[cfg(not(feature = "rbd"))]
    let _ = test;
    v
}

/// How long one row of a test on a local backend may take before the
/// watchdog calls it a hang: a row takes well under a minute here, and this
/// leaves room for proptest shrinking a real failure, or for more cases
/// (`UBLK_CACHE_ROW_WATCHDOG_SECS` sets it).
const LOCAL_ROW_SECS: u64 = 1200;

/// Run `f` once per backend row, each under a watchdog: `remote_secs` on the
/// Ceph cluster, [`LOCAL_ROW_SECS`] (or `UBLK_CACHE_ROW_WATCHDOG_SECS`) on the
/// others. A hang fails the test
/// process at once, naming the test and the row, instead of running into CI's
/// time limit.
pub fn for_each_backend(test: &str, remote_secs: u64, mut f: impl FnMut(&BackendRow)) {
    for row in backend_rows(test) {
        eprintln!("-- {test}: {}", row.label());
        let secs = if row.is_remote() {
            remote_secs
        } else {
            std::env::var("UBLK_CACHE_ROW_WATCHDOG_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(LOCAL_ROW_SECS)
        };
        let _wd = crate::watchdog::watchdog(&format!("{test} on {}", row.label()), secs);
        f(&row);
    }
}
