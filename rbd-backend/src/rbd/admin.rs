//! Image management over the same bindings: create, remove, snapshot, protect,
//! clone, resize, and a plain image handle without our lock. Used by tests and
//! tools (e.g. preparing OpenNebula-style clones); the server never needs it.

use std::io;
use std::sync::Arc;

use super::ffi::{self, Cluster, Errno, Image};
use super::{connect, ioctx, RbdOptions, RbdSpec};
use crate::error::{BackendError, ErrorKind, Result};

/// A cluster connection for managing images.
pub struct RbdAdmin {
    cluster: Arc<Cluster>,
}

fn err(what: String, e: Errno) -> BackendError {
    let kind = match e.0 {
        libc::ENOENT => ErrorKind::Unavailable,
        _ => BackendError::from_io(String::new(), e.io_error()).kind(),
    };
    BackendError::new(kind, what, e.io_error())
}

impl RbdAdmin {
    pub fn connect(opts: &RbdOptions) -> Result<RbdAdmin> {
        Ok(RbdAdmin {
            cluster: connect(opts)?,
        })
    }

    fn image(&self, spec: &RbdSpec, read_only: bool) -> Result<Image> {
        let io = ioctx(&self.cluster, spec)?;
        io.open_image(&spec.image, spec.snap.as_deref(), read_only)
            .map_err(|e| err(format!("rbd:{spec}: cannot open"), e))
    }

    /// Creates `spec`'s image with librbd's default features (layering,
    /// exclusive-lock, object-map, fast-diff, deep-flatten), or `features`.
    pub fn create(&self, spec: &RbdSpec, size: u64, features: Option<u64>) -> Result<()> {
        ioctx(&self.cluster, spec)?
            .create_image(&spec.image, size, features)
            .map_err(|e| err(format!("rbd:{spec}: cannot create"), e))
    }

    /// Features without exclusive-lock (layering only), to test refusals.
    pub const FEATURES_NO_LOCK: u64 = ffi::FEATURE_LAYERING;

    pub fn remove(&self, spec: &RbdSpec) -> Result<()> {
        ioctx(&self.cluster, spec)?
            .remove_image(&spec.image)
            .map_err(|e| err(format!("rbd:{spec}: cannot remove"), e))
    }

    pub fn snap_create(&self, spec: &RbdSpec, snap: &str) -> Result<()> {
        self.image(spec, false)?
            .snap_create(snap)
            .map_err(|e| err(format!("rbd:{spec}: cannot create snapshot {snap}"), e))
    }

    pub fn snap_remove(&self, spec: &RbdSpec, snap: &str) -> Result<()> {
        self.image(spec, false)?
            .snap_remove(snap)
            .map_err(|e| err(format!("rbd:{spec}: cannot remove snapshot {snap}"), e))
    }

    pub fn snap_protect(&self, spec: &RbdSpec, snap: &str) -> Result<()> {
        self.image(spec, false)?
            .snap_protect(snap)
            .map_err(|e| err(format!("rbd:{spec}: cannot protect snapshot {snap}"), e))
    }

    pub fn snap_unprotect(&self, spec: &RbdSpec, snap: &str) -> Result<()> {
        self.image(spec, false)?
            .snap_unprotect(snap)
            .map_err(|e| err(format!("rbd:{spec}: cannot unprotect snapshot {snap}"), e))
    }

    /// Snapshot names of the image.
    pub fn snaps(&self, spec: &RbdSpec) -> Result<Vec<String>> {
        Ok(self
            .image(spec, true)?
            .snap_list()
            .map_err(|e| err(format!("rbd:{spec}: cannot list snapshots"), e))?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    /// Clones the protected snapshot `parent` (which must name one) as `child`.
    pub fn clone_image(&self, parent: &RbdSpec, child: &RbdSpec) -> Result<()> {
        let Some(snap) = &parent.snap else {
            return Err(BackendError::new(
                ErrorKind::InvalidRequest,
                format!("clone of rbd:{parent}: a clone needs a parent snapshot (POOL/IMAGE@SNAP)"),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        let pio = ioctx(&self.cluster, parent)?;
        let cio = ioctx(&self.cluster, child)?;
        let features =
            ffi::FEATURE_LAYERING | ffi::FEATURE_EXCLUSIVE_LOCK | (1 << 3) | (1 << 4) | (1 << 5);
        pio.clone_image(&parent.image, snap, &cio, &child.image, features)
            .map_err(|e| err(format!("rbd:{parent}: cannot clone as {child}"), e))
    }

    pub fn resize(&self, spec: &RbdSpec, size: u64) -> Result<()> {
        self.image(spec, false)?
            .resize(size)
            .map_err(|e| err(format!("rbd:{spec}: cannot resize"), e))
    }

    /// Image metadata value (`rbd image-meta get`).
    pub fn metadata(&self, spec: &RbdSpec, key: &str) -> Result<Option<String>> {
        self.image(spec, true)?
            .metadata_get(key)
            .map_err(|e| err(format!("rbd:{spec}: cannot read metadata {key}"), e))
    }

    /// Who holds the image's exclusive lock (librbd refuses to tell a read-only handle).
    pub fn lock_owners(&self, spec: &RbdSpec) -> Result<Vec<String>> {
        self.image(spec, false)?
            .lock_owners()
            .map_err(|e| err(format!("rbd:{spec}: cannot list lock owners"), e))
    }

    /// A plain handle, as any other librbd client (QEMU) would open the image:
    /// no explicit lock, so its writes go through librbd's cooperative locking.
    pub fn open_raw(&self, spec: &RbdSpec) -> Result<RbdRawImage> {
        Ok(RbdRawImage {
            image: self.image(spec, spec.snap.is_some())?,
            name: spec.to_string(),
        })
    }
}

/// An image handle without ublk-cache's lock or markers.
pub struct RbdRawImage {
    image: Image,
    name: String,
}

impl RbdRawImage {
    pub fn size(&self) -> Result<u64> {
        self.image
            .size()
            .map_err(|e| err(format!("rbd:{}: size", self.name), e))
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.image.read(offset, buf, None) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(err(
                format!("rbd:{}: short read ({n})", self.name),
                Errno(libc::EIO),
            )),
            Err(e) => Err(err(format!("rbd:{}: read at {offset}", self.name), e)),
        }
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.image
            .write(offset, buf, None)
            .map_err(|e| err(format!("rbd:{}: write at {offset}", self.name), e))
    }

    pub fn flush(&self) -> Result<()> {
        self.image
            .flush(None)
            .map_err(|e| err(format!("rbd:{}: flush", self.name), e))
    }

    /// The whole image.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let size = usize::try_from(self.size()?).unwrap_or(usize::MAX);
        let mut v = vec![0u8; size];
        for (i, chunk) in v.chunks_mut(4 << 20).enumerate() {
            self.read((i as u64) << 22, chunk)?;
        }
        Ok(v)
    }
}
