//! `FileBackend`: a regular file (`file:PATH`) or kernel block device (`dev:PATH`)
//! as the backing disk.

mod aio;
mod allocation;
mod direct;
mod open;
mod zero;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::allocation::AllocationMap;
use crate::backend::{
    mtime_marker, Backend, BackendIdentity, BlockIo, ChangeTracking, ExclusiveLock,
};
use crate::error::{BackendError, ErrorKind, Result};
use crate::io_engine::{open_engine, EngineChoice, EngineKind, IoEngine};
use open::Align;

/// How to open a [`FileBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open without write access; every modifying call fails with `ErrorKind::ReadOnly`.
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT), falling back to buffered I/O where refused.
    pub direct: bool,
    /// Hold an exclusive `flock` on the file or device for as long as the
    /// backend lives (refusing to open what another holder has locked), as an
    /// RBD backend holds its image's exclusive lock. `release_lock` and
    /// `acquire_lock` let it go and take it back (a live migration). With
    /// `read_only` the flock is shared: read-only openers share a file with
    /// each other, never with a writer.
    pub exclusive: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: true,
            exclusive: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Device,
}

impl FileKind {
    /// The `BackendIdentity::kind` and spec prefix: "file" or "dev".
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Device => "dev",
        }
    }
}

pub struct FileBackend {
    file: File,
    engine: Arc<dyn IoEngine>,
    path: PathBuf,
    kind: FileKind,
    read_only: bool,
    direct: bool,
    size: u64,
    block_size: u32,
    align: Align,
    fingerprint: String,
    /// Read-modify-write of a partial block must not interleave with any other
    /// change to that block, or it would write back stale bytes: RMW takes this
    /// exclusively, every other modification shares it.
    rmw: RwLock<()>,
    /// We changed the file since the last fsync, so its mtime may not be durable.
    meta_dirty: AtomicBool,
    quirks: Quirks,
    /// We hold (or should hold) an exclusive flock on `file`.
    exclusive: bool,
}

/// Operations the kernel told us it cannot do on this file, so we stop asking.
#[derive(Debug, Default)]
struct Quirks {
    no_discard: AtomicBool,
    no_zero_range: AtomicBool,
    no_punch_hole: AtomicBool,
    no_zeroout: AtomicBool,
}

impl FileBackend {
    /// Opens a regular file or block device (whichever `path` is) with io_uring,
    /// falling back to psync where it is refused.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self> {
        let engine = open_engine(EngineChoice::Auto)?;
        Self::open_with_engine(path, opts, engine)
    }

    /// Opens `file:PATH` or `dev:PATH` with `engine`, insisting that PATH is of that kind.
    pub fn open_spec_with_engine(
        spec: &str,
        opts: OpenOptions,
        engine: Arc<dyn IoEngine>,
    ) -> Result<Self> {
        let (kind, path) = if let Some(p) = spec.strip_prefix("file:") {
            (FileKind::File, p)
        } else if let Some(p) = spec.strip_prefix("dev:") {
            (FileKind::Device, p)
        } else {
            return Err(BackendError::new(
                ErrorKind::Unavailable,
                format!("backend {spec:?}: expected file:PATH or dev:PATH"),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        Self::build(Path::new(path), Some(kind), opts, engine)
    }

    /// Like [`FileBackend::open`] with a given engine (e.g. one ring shared by several
    /// backends, or a specific engine in tests).
    pub fn open_with_engine(
        path: impl AsRef<Path>,
        opts: OpenOptions,
        engine: Arc<dyn IoEngine>,
    ) -> Result<Self> {
        Self::build(path.as_ref(), None, opts, engine)
    }

    fn build(
        path: &Path,
        expect: Option<FileKind>,
        opts: OpenOptions,
        engine: Arc<dyn IoEngine>,
    ) -> Result<Self> {
        let o = open::open(path, expect, opts)?;
        if opts.exclusive {
            lock_exclusive(&o.file, o.kind, &o.path, opts.read_only)?;
        }
        tracing::debug!(path = %o.path.display(), kind = o.kind.as_str(), size = o.size,
            block_size = o.block_size, direct = o.direct, engine = %engine.kind(),
            "opened backend");
        Ok(Self {
            file: o.file,
            engine,
            path: o.path,
            kind: o.kind,
            read_only: opts.read_only,
            direct: o.direct,
            size: o.size,
            block_size: o.block_size,
            align: o.align,
            fingerprint: o.fingerprint,
            rmw: RwLock::new(()),
            meta_dirty: AtomicBool::new(false),
            quirks: Quirks::default(),
            exclusive: opts.exclusive,
        })
    }

    /// Canonical path of the file or device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Whether O_DIRECT is in effect (false after a fallback to buffered I/O).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// The file's current modification time in nanoseconds since the epoch; `None`
    /// for block devices, whose node mtime says nothing about their contents.
    ///
    /// Our own writes move it, so a cache should record it after its final flush at
    /// clean detach and compare at the next attach. `flush` (fdatasync) does not
    /// persist a timestamp-only change; [`FileBackend::modified_ns`] therefore fsyncs
    /// first, while this plain query does not.
    pub fn mtime_ns(&self) -> Result<Option<i64>> {
        if self.kind == FileKind::Device {
            return Ok(None);
        }
        let meta = self
            .file
            .metadata()
            .map_err(|e| self.io_error("stat", 0, 0, e))?;
        Ok(Some(
            meta.mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        ))
    }

    /// fsync: like `flush`, and also persists metadata such as the mtime.
    pub fn sync_all(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| self.io_error("fsync", 0, 0, e))
    }

    fn check_range(&self, op: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "{} {}: {op} offset={offset} len={len} reaches beyond size={}",
                    self.kind.as_str(),
                    self.path.display(),
                    self.size
                ),
                io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.read_only {
            return Err(BackendError::new(
                ErrorKind::ReadOnly,
                format!(
                    "{} {}: {op} on a backend opened read-only",
                    self.kind.as_str(),
                    self.path.display()
                ),
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        Ok(())
    }

    fn io_error(&self, op: &str, offset: u64, len: u64, e: io::Error) -> BackendError {
        BackendError::from_io(
            format!(
                "{} {}: {op} offset={offset} len={len}",
                self.kind.as_str(),
                self.path.display()
            ),
            e,
        )
    }
}

/// Take the exclusive flock of `file` (shared if `read_only`), or say that
/// someone else holds it (`ErrorKind::Unavailable`, errno EWOULDBLOCK).
fn lock_exclusive(file: &File, kind: FileKind, path: &Path, read_only: bool) -> Result<()> {
    let taken = if read_only {
        crate::sys::flock_shared(file)
    } else {
        crate::sys::flock_exclusive(file)
    };
    let Err(e) = taken else {
        return Ok(());
    };
    let what = if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        "is locked by another process"
    } else {
        "cannot be locked"
    };
    Err(BackendError::new(
        ErrorKind::Unavailable,
        format!("{} {} {what}", kind.as_str(), path.display()),
        e,
    ))
}

/// Whether `e` says that another process holds the lock of an exclusive backend.
pub fn is_locked_elsewhere(e: &BackendError) -> bool {
    e.kind() == ErrorKind::Unavailable && e.errno() == libc::EWOULDBLOCK
}

fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

impl BlockIo for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = len64(buf.len());
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.read_io(offset, buf)
            .map_err(|e| self.io_error("read", offset, len, e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = len64(buf.len());
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.meta_dirty.store(true, Ordering::Release);
        self.write_io(offset, buf)
            .map_err(|e| self.io_error("write", offset, len, e))
    }

    fn read_async(&self, offset: u64, dst: crate::aio::BufSlice) -> crate::io::IoFut<'_> {
        Box::pin(self.read_async_impl(offset, dst))
    }

    fn write_async(
        &self,
        offset: u64,
        src: crate::aio::BufSlice,
        mode: crate::io::WriteMode,
    ) -> crate::io::IoFut<'_> {
        Box::pin(self.write_async_impl(offset, src, mode))
    }

    fn flush_async(&self) -> crate::io::IoFut<'_> {
        Box::pin(self.flush_async_impl())
    }

    /// On io_uring a durable write carries `RWF_DSYNC` (a FUA write on a
    /// block device); the psync engine writes and then syncs the file.
    fn durable_writes_are_native(&self) -> bool {
        self.engine.kind() == EngineKind::Uring
    }

    fn flush(&self) -> Result<()> {
        self.engine
            .fdatasync(&self.file)
            .map_err(|e| self.io_error("fdatasync", 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.meta_dirty.store(true, Ordering::Release);
        self.discard_io(offset, len)
            .map_err(|e| self.io_error("discard", offset, len, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("write_zeroes")?;
        self.check_range("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.meta_dirty.store(true, Ordering::Release);
        self.zero_io(offset, len)
            .map_err(|e| self.io_error("write_zeroes", offset, len, e))
    }
}

impl Backend for FileBackend {
    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: self.kind.as_str().to_string(),
            name: self.path.to_string_lossy().into_owned(),
            size: self.size,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// A regular file knows its holes; a block device reports all data.
    fn allocation_map(&self) -> Option<&dyn AllocationMap> {
        match self.kind {
            FileKind::File => Some(self),
            FileKind::Device => None,
        }
    }

    /// A regular file by its mtime; a block device keeps none.
    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        match self.kind {
            FileKind::File => Some(self),
            FileKind::Device => None,
        }
    }

    /// The flock, when this server took it for migration handover (`exclusive`;
    /// shared for a read-only open, which hands it over just the same).
    fn exclusive_lock(&self) -> Option<&dyn ExclusiveLock> {
        self.exclusive.then_some(self as &dyn ExclusiveLock)
    }
}

impl ExclusiveLock for FileBackend {
    /// Let the flock go (a live migration's source): the destination may open
    /// the file now. Writes still work; the lock is advisory.
    fn release_lock(&self) -> Result<()> {
        if !self.exclusive {
            return Ok(());
        }
        crate::sys::flock_release(&self.file).map_err(|e| self.io_error("unlock", 0, 0, e))
    }

    /// Take the flock back (an aborted migration); refused while someone else holds it.
    fn acquire_lock(&self) -> Result<()> {
        if !self.exclusive {
            return Ok(());
        }
        lock_exclusive(&self.file, self.kind, &self.path, self.read_only)
    }
}

impl FileBackend {
    /// The mtime, made durable first (fsync) if we changed the file since the last
    /// time: the value is recorded at clean detach, and a crash must not bring back
    /// an older one (that would look like a change made behind the cache's back).
    pub fn modified_ns(&self) -> Option<u64> {
        if self.kind == FileKind::Device {
            return None;
        }
        if self.meta_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.sync_all() {
                self.meta_dirty.store(true, Ordering::Release);
                tracing::warn!(error = %e, "cannot persist the backend's mtime");
            }
        }
        match self.mtime_ns() {
            // The bit pattern is kept: the value is only ever compared for equality.
            Ok(ns) => ns.map(|ns| ns as u64),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the backend's mtime");
                None
            }
        }
    }
}

impl ChangeTracking for FileBackend {
    fn change_marker(&self) -> Result<Option<String>> {
        Ok(self.modified_ns().map(mtime_marker))
    }
}

impl fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("direct", &self.direct)
            .field("read_only", &self.read_only)
            .field("engine", &self.engine.kind())
            .finish()
    }
}
