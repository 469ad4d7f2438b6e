//! Opening what a server serves: the backend and the cache device (created if
//! it is a new file). Each is opened exclusively and holds its own lock for as
//! long as it lives (an flock for files and devices, the image's exclusive
//! lock for RBD), so two servers never share either, and no lock is handed
//! around beside them. A read-only backend (`read-only`) is shared with other
//! read-only servers only: a shared flock, an RBD image opened without its lock.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rbd_backend::{open_engine, Backend, BackendError, BlockIo, FileBackend, OpenOptions};

use super::config::{Access, ServeConfig};
use super::error::{DaemonError, DaemonResult};
use super::spec::BackendSpec;

/// The error of opening `path`, saying so as operators know it when another
/// server holds it (the backend error, with its kind, stays the source).
fn in_use(what: &str, path: &Path, read_only: bool, e: BackendError) -> DaemonError {
    if rbd_backend::file::is_locked_elsewhere(&e) {
        let share = if read_only {
            "a read-write ublk-cache server has it (see `ublk-cache list`); a read-only server shares it \
             only with other read-only ones"
        } else {
            "it is in use by another ublk-cache server (see `ublk-cache list`); refusing to share it \
             (only read-only servers share a backend, with each other)"
        };
        return DaemonError::backend(format!("{what} {}: {share}", path.display()), e);
    }
    DaemonError::backend(format!("{what} {}", path.display()), e)
}

/// An exclusive file backend on the configured I/O engine (`read_only`: a
/// read-only one under a shared flock).
fn open_file(
    cfg: &ServeConfig,
    what: &str,
    path: &Path,
    read_only: bool,
) -> DaemonResult<Arc<dyn Backend>> {
    let engine = open_engine(cfg.io_engine.unwrap_or_default().choice())
        .map_err(|e| DaemonError::backend(format!("{what} {}", path.display()), e))?;
    let opts = OpenOptions {
        exclusive: true,
        read_only,
        ..OpenOptions::default()
    };
    let b = FileBackend::open_with_engine(path, opts, engine)
        .map_err(|e| in_use(what, path, read_only, e))?;
    Ok(Arc::new(b))
}

/// Opens the backend `spec`, holding what keeps a second server off it.
/// `Start::MigrateIn`: an RBD image's lock is taken at the first write, not at
/// open (the migration source still writes until switchover). `Access::ReadOnly`:
/// no exclusive lock (RBD: a read-only open; files and devices: a shared
/// flock), and every write fails.
pub fn open_backend(spec: &BackendSpec, cfg: &ServeConfig) -> DaemonResult<Arc<dyn Backend>> {
    let (path, want_dev) = match spec {
        BackendSpec::File(p) => (p, false),
        BackendSpec::Dev(p) => (p, true),
        #[cfg(feature = "rbd")]
        BackendSpec::Rbd(r) => {
            let opts = rbd_backend::RbdOptions {
                conf: cfg.ceph_conf.clone(),
                id: cfg.ceph_id.clone(),
                keyring: cfg.ceph_keyring.clone(),
                keyfile: cfg.ceph_keyfile.clone(),
                read_only: cfg.access == Access::ReadOnly,
                io_timeout: match cfg.backend_timeout {
                    None => Some(rbd_backend::rbd::DEFAULT_IO_TIMEOUT),
                    Some(0) => None,
                    Some(s) => Some(std::time::Duration::from_secs(s)),
                },
                defer_lock: cfg.start == super::config::Start::MigrateIn,
                ..rbd_backend::RbdOptions::default()
            };
            let b = rbd_backend::RbdBackend::open(r, &opts)
                .map_err(|e| DaemonError::backend(format!("backend {spec}"), e))?;
            return Ok(Arc::new(b));
        }
        BackendSpec::Given(label) => {
            return Err(DaemonError::config(format!(
                "backend {label}: a given backend comes with its devices; it is not opened"
            )))
        }
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| DaemonError::io(format!("backend {spec}: cannot stat"), e))?;
    let is_dev = meta.file_type().is_block_device();
    if want_dev && !is_dev {
        return Err(DaemonError::config(format!(
            "backend {spec}: {} is not a block device (use file: for a file)",
            path.display()
        )));
    }
    if !want_dev && !meta.is_file() {
        return Err(DaemonError::config(format!(
            "backend {spec}: {} is not a regular file (use dev: for a block device)",
            path.display()
        )));
    }
    open_file(cfg, "backend", path, cfg.access == Access::ReadOnly)
}

/// The cache device, and what opening it changed on disk.
pub struct OpenedCache {
    pub dev: Arc<dyn BlockIo>,
    /// Whether the file was created (a new file may be formatted without asking).
    pub created: bool,
    pub undo: CacheUndo,
}

/// What to put back if the start is refused: a cache file the start created
/// is removed, one it grew gets its old length back, so a refused start
/// leaves nothing behind.
#[derive(Debug, Clone)]
pub struct CacheUndo {
    path: PathBuf,
    created: bool,
    grown_from: Option<u64>,
}

impl CacheUndo {
    /// Remove the cache file if this start created it (call once nothing can
    /// be lost by it: a failed start has stopped cleanly). A file that was
    /// there before stays: the engine may have formatted it to its new size.
    pub fn remove_created(&self) {
        if self.created {
            self.undo();
        }
    }

    /// Put the cache file back as it was (call once the engine refused it,
    /// before it wrote anything that the old size would cut).
    pub fn undo(&self) {
        let shown = self.path.display();
        if self.created {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {
                    tracing::info!("removed the cache file {shown} this refused start created")
                }
                Err(e) => tracing::warn!(
                    "could not remove the cache file {shown} this start created: {e}"
                ),
            }
        } else if let Some(len) = self.grown_from {
            let r = FsOpenOptions::new()
                .write(true)
                .open(&self.path)
                .and_then(|f| f.set_len(len));
            match r {
                Ok(()) => {
                    tracing::info!("the cache file {shown} has its old size of {len} bytes again")
                }
                Err(e) => {
                    tracing::warn!("could not give the cache file {shown} its old size back: {e}")
                }
            }
        }
    }
}

/// Open the cache at `path`, creating a file of `size` bytes if nothing is
/// there yet, and growing a regular file that is smaller (sparse).
pub fn open_cache(path: &Path, size: Option<u64>, cfg: &ServeConfig) -> DaemonResult<OpenedCache> {
    let io = |what: &str, e: std::io::Error| {
        DaemonError::io(format!("cache {}: {what}", path.display()), e)
    };
    let created = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(DaemonError::config(format!(
                "cache {}: is a directory",
                path.display()
            )))
        }
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size else {
                return Err(DaemonError::config(format!(
                    "cache {} does not exist; give --cache-size to create it as a file",
                    path.display()
                )));
            };
            let f = FsOpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io("cannot create", e))?;
            f.set_len(size)
                .map_err(|e| io(&format!("cannot size to {size} bytes"), e))?;
            f.sync_all().map_err(|e| io("cannot sync", e))?;
            true
        }
        Err(e) => return Err(io("cannot stat", e)),
    };
    let mut undo = CacheUndo {
        path: path.to_path_buf(),
        created,
        grown_from: None,
    };
    if let (false, Some(size)) = (created, size) {
        // A regular file that is too small is grown (sparse); a device is what
        // it is. Only while nobody else holds it: the flock is tried first.
        let meta = std::fs::metadata(path).map_err(|e| io("cannot stat", e))?;
        if meta.is_file() && meta.len() < size {
            let probe = open_file(cfg, "cache", path, false)?;
            drop(probe);
            let f = FsOpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io("cannot open", e))?;
            f.set_len(size)
                .map_err(|e| io(&format!("cannot grow to {size} bytes"), e))?;
            undo.grown_from = Some(meta.len());
        }
    }
    match open_file(cfg, "cache", path, false) {
        Ok(dev) => Ok(OpenedCache { dev, created, undo }),
        Err(e) => {
            undo.undo();
            Err(e)
        }
    }
}
