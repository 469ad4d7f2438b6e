//! Opening what a server serves: the backend, the cache device (created if it is
//! a new file), and exclusive locks so two servers never share either.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rbd_backend::{Backend, FileBackend, OpenOptions};

use crate::cli::CephArgs;
use crate::spec::BackendSpec;

/// An advisory exclusive lock held for the life of the server.
pub struct PathLock {
    _file: File,
    path: std::path::PathBuf,
}

impl PathLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Lock `path` exclusively, or say who is in the way.
pub fn lock_path(path: &Path, what: &str) -> Result<PathLock> {
    flock_path(path, what, false)
}

/// Lock `path` exclusively, or shared (read-only servers share a backend with
/// each other, never with a writer).
fn flock_path(path: &Path, what: &str, shared: bool) -> Result<PathLock> {
    let file = File::open(path)
        .with_context(|| format!("{what} {}: cannot open to lock it", path.display()))?;
    let how = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let share = if shared {
                "a read-write ublk-cache server has it (see `ublk-cache list`); a read-only server shares it only with other read-only ones"
            } else {
                "it is in use by another ublk-cache server (see `ublk-cache list`); refusing to share it \
                 (only --read-only servers share a backend, with each other)"
            };
            bail!("{what} {}: {share}", path.display());
        }
        return Err(err).with_context(|| format!("{what} {}: lock failed", path.display()));
    }
    Ok(PathLock {
        _file: file,
        path: path.to_path_buf(),
    })
}

/// Opens the backend and takes what keeps a second server off it: an flock on a
/// file or device, the image's exclusive lock for RBD (held by the backend
/// itself, so no `PathLock`).
/// `migrate_in`: an RBD image's lock is taken at the first write, not at open
/// (the migration source still writes until switchover). `read_only`: no
/// exclusive lock (RBD: a read-only open; files and devices: a shared flock),
/// and every write fails.
pub fn open_backend(
    spec: &BackendSpec,
    ceph: &CephArgs,
    migrate_in: bool,
    read_only: bool,
) -> Result<(Arc<dyn Backend>, Option<PathLock>)> {
    let (path, want_dev) = match spec {
        BackendSpec::File(p) => (p, false),
        BackendSpec::Dev(p) => (p, true),
        #[cfg(feature = "rbd")]
        BackendSpec::Rbd(r) => {
            let opts = rbd_backend::RbdOptions {
                conf: ceph.ceph_conf.clone(),
                id: ceph.ceph_id.clone(),
                keyring: ceph.ceph_keyring.clone(),
                keyfile: ceph.ceph_keyfile.clone(),
                read_only,
                io_timeout: match ceph.backend_timeout {
                    None => Some(rbd_backend::rbd::DEFAULT_IO_TIMEOUT),
                    Some(0) => None,
                    Some(s) => Some(std::time::Duration::from_secs(s)),
                },
                defer_lock: migrate_in,
                ..rbd_backend::RbdOptions::default()
            };
            let b = rbd_backend::RbdBackend::open(r, &opts)
                .with_context(|| format!("backend {spec}"))?;
            return Ok((Arc::new(b), None));
        }
    };
    let _ = migrate_in; // a file or device is flock'ed; migrate-out releases that
    if ceph.ceph_conf.is_some() || ceph.ceph_keyring.is_some() || ceph.ceph_keyfile.is_some() {
        bail!(
            "backend {spec}: --ceph-conf, --ceph-keyring and --ceph-keyfile apply to rbd: backends only"
        );
    }
    if ceph.backend_timeout.is_some() {
        bail!(
            "backend {spec}: --backend-timeout applies to rbd: backends only (a file or kernel \
             block device has the kernel's own timeouts, e.g. iSCSI's replacement_timeout)"
        );
    }
    let meta = std::fs::metadata(path).with_context(|| format!("backend {spec}: cannot stat"))?;
    let is_dev = meta.file_type().is_block_device();
    if want_dev && !is_dev {
        bail!(
            "backend {spec}: {} is not a block device (use file: for a file)",
            path.display()
        );
    }
    if !want_dev && !meta.is_file() {
        bail!(
            "backend {spec}: {} is not a regular file (use dev: for a block device)",
            path.display()
        );
    }
    let lock = flock_path(path, "backend", read_only)?;
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    let b = FileBackend::open(path, opts).with_context(|| format!("backend {spec}"))?;
    Ok((Arc::new(b), Some(lock)))
}

/// `--read-only` serves only modes that send every write to the backend (where
/// it fails): `back` and `offline` would acknowledge writes from the cache that
/// could never be written back.
pub fn check_read_only(read_only: bool, mode: policies::CacheMode) -> Result<()> {
    use policies::CacheMode;
    if read_only && matches!(mode, CacheMode::Back | CacheMode::Offline) {
        bail!(
            "--read-only cannot serve --mode {mode}: it would keep guest writes in the cache that can never \
             reach the read-only backend; use --mode none, around or through"
        );
    }
    Ok(())
}

/// Open the cache, creating a file of `size` bytes if nothing is there yet.
/// Returns whether it was created (a new file may be formatted without asking).
pub fn open_cache(path: &Path, size: Option<u64>) -> Result<(Arc<dyn Backend>, PathLock, bool)> {
    let created = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("cache {}: is a directory", path.display()),
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size else {
                bail!(
                    "cache {} does not exist; give --cache-size to create it as a file",
                    path.display()
                );
            };
            let f = FsOpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("cache {}: cannot create", path.display()))?;
            f.set_len(size).with_context(|| {
                format!("cache {}: cannot size to {size} bytes", path.display())
            })?;
            f.sync_all()?;
            true
        }
        Err(e) => return Err(e).with_context(|| format!("cache {}: cannot stat", path.display())),
    };
    let lock = lock_path(path, "cache")?;
    if let (false, Some(size)) = (created, size) {
        // A regular file that is too small is grown (sparse); a device is what it is.
        let meta = std::fs::metadata(path)?;
        if meta.is_file() && meta.len() < size {
            let f = FsOpenOptions::new().write(true).open(path)?;
            f.set_len(size).with_context(|| {
                format!("cache {}: cannot grow to {size} bytes", path.display())
            })?;
        }
    }
    let c = FileBackend::open(path, OpenOptions::default())
        .with_context(|| format!("cache {}", path.display()))?;
    Ok((Arc::new(c), lock, created))
}
