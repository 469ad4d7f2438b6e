//! Our own bindings to librados and librbd (Ceph 16.2, librbd 1.16), written
//! by hand from `rados/librados.h` and `rbd/librbd.h`: the few dozen functions
//! the RBD backend needs, and small owning wrappers around them.
//!
//! Every `unsafe` of the RBD backend lives in this module. Outside it, the
//! wrappers are safe to use: handles are closed exactly once (in `Drop`), a
//! handle keeps what it was made from alive (`Image` holds its `IoCtx`, which
//! holds its `Cluster`), and an asynchronous request either is waited for before
//! the caller's buffer it uses can go away, or owns its buffer (see below).
//!
//! Asynchronous I/O: each request gets a small completion slot (a mutex and a
//! condition variable). librbd calls [`on_complete`] on one of its own threads
//! when the request is done; it stores the result and wakes the waiting caller.
//! No thread is made per request.
//!
//! A request may be waited for with a timeout. librbd has no way to cancel a
//! request, so one that times out is abandoned, not stopped: it must not use the
//! caller's memory. Such requests read into (or write from) a buffer of their own
//! that their slot owns; the slot is kept alive by the completion callback's
//! reference, and when librbd finally completes the request the callback drops
//! it, buffer and all.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

type rados_t = *mut c_void;
type rados_ioctx_t = *mut c_void;
type rbd_image_t = *mut c_void;
type rbd_completion_t = *mut c_void;
type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);
type rbd_update_callback_t = extern "C" fn(*mut c_void);
type diff_callback_t = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type progress_fn_t = Option<extern "C" fn(u64, u64, *mut c_void) -> c_int>;

/// `rbd_snap_info_t`.
#[repr(C)]
struct rbd_snap_info_t {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_lock_mode_t`.
const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_SNAP_CREATE_SKIP_QUIESCE`: do not ask watchers (rbd-nbd and the like) to quiesce.
const RBD_SNAP_CREATE_SKIP_QUIESCE: u32 = 1;

/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_LAYERING`.
pub const FEATURE_LAYERING: u64 = 1;

#[link(name = "rados")]
extern "C" {
    fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_get_instance_id(cluster: rados_t) -> u64;
    fn rados_ioctx_create(cluster: rados_t, pool: *const c_char, io: *mut rados_ioctx_t) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_create2(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_clone(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        features: u64,
        c_order: *mut c_int,
    ) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int;
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;

    fn rbd_lock_acquire(image: rbd_image_t, lock_mode: c_int) -> c_int;
    fn rbd_lock_release(image: rbd_image_t) -> c_int;
    fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut c_int,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut usize,
    ) -> c_int;
    fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: usize);

    fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        val_len: *mut usize,
    ) -> c_int;
    fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;

    fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    fn rbd_snap_create2(
        image: rbd_image_t,
        snap_name: *const c_char,
        flags: u32,
        cb: progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    fn rbd_snap_remove(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    fn rbd_snap_protect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    fn rbd_snap_get_id(image: rbd_image_t, snap_name: *const c_char, snap_id: *mut u64) -> c_int;

    fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: diff_callback_t,
        arg: *mut c_void,
    ) -> c_int;

    fn rbd_update_watch(
        image: rbd_image_t,
        handle: *mut u64,
        watch_cb: rbd_update_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;

    fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    fn rbd_aio_release(c: rbd_completion_t);
    fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

/// A positive errno from librados/librbd (which return `-errno`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn check(rc: c_int) -> Result<c_int, Errno> {
        if rc < 0 {
            Err(Errno(-rc))
        } else {
            Ok(rc)
        }
    }

    pub fn io_error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.io_error())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.io_error())
    }
}

/// A string for C, refusing an interior NUL (which C would silently cut at).
fn cstr(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

// ---------------------------------------------------------------------------
// Cluster

/// A connection to a Ceph cluster (`rados_t`).
pub struct Cluster {
    h: rados_t,
}

// SAFETY: a connected rados_t is documented as thread-safe; we never mutate the
// handle itself, only pass it to librados, which does its own locking.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// `rados_create` for client `id` (without the `client.` prefix).
    pub fn create(id: &str) -> Result<Cluster, Errno> {
        let id = cstr(id)?;
        let mut h: rados_t = std::ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; `id` is a NUL-terminated string that
        // outlives the call (librados copies it).
        Errno::check(unsafe { rados_create(&mut h, id.as_ptr()) })?;
        Ok(Cluster { h })
    }

    /// Reads a ceph.conf; `None` searches the default places ($CEPH_CONF, /etc/ceph).
    pub fn conf_read_file(&self, path: Option<&str>) -> Result<(), Errno> {
        let p = path.map(cstr).transpose()?;
        // SAFETY: `self.h` is a live handle; the path is NULL or a valid C string.
        Errno::check(unsafe { rados_conf_read_file(self.h, opt_ptr(&p)) }).map(drop)
    }

    pub fn conf_set(&self, option: &str, value: &str) -> Result<(), Errno> {
        let (o, v) = (cstr(option)?, cstr(value)?);
        // SAFETY: live handle, two valid C strings that librados copies.
        Errno::check(unsafe { rados_conf_set(self.h, o.as_ptr(), v.as_ptr()) }).map(drop)
    }

    pub fn connect(&self) -> Result<(), Errno> {
        // SAFETY: live handle, not yet connected (only `open` calls this, once).
        Errno::check(unsafe { rados_connect(self.h) }).map(drop)
    }

    /// This client's instance id (the N of client.N in lock owner names).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: live, connected handle.
        unsafe { rados_get_instance_id(self.h) }
    }

    /// An I/O context on `pool`, optionally in a RADOS namespace.
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<IoCtx, Errno> {
        let p = cstr(pool)?;
        let ns = namespace.map(cstr).transpose()?;
        let mut io: rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: live connected handle, valid C string, valid out-pointer.
        Errno::check(unsafe { rados_ioctx_create(self.h, p.as_ptr(), &mut io) })?;
        if let Some(ns) = &ns {
            // SAFETY: `io` was just created; librados copies the namespace.
            unsafe { rados_ioctx_set_namespace(io, ns.as_ptr()) };
        }
        Ok(IoCtx {
            h: io,
            _cluster: Arc::clone(self),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once; every IoCtx (and so every
        // Image) holds an Arc to us, so none is left using it.
        unsafe { rados_shutdown(self.h) };
    }
}

// ---------------------------------------------------------------------------
// IoCtx

/// A pool (and namespace) to work in (`rados_ioctx_t`).
pub struct IoCtx {
    h: rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: ioctx handles are thread-safe in librados for the calls we make
// (opening images, creating and removing them); we keep the cluster alive.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Creates an image; `features` None takes the cluster's default features.
    pub fn create_image(&self, name: &str, size: u64, features: Option<u64>) -> Result<(), Errno> {
        let n = cstr(name)?;
        let mut order: c_int = 0;
        // rbd_create2 needs explicit features; the default set is librbd's
        // RBD_FEATURES_DEFAULT (layering, exclusive-lock, object-map, fast-diff, deep-flatten).
        let f = features.unwrap_or(0b11_1101);
        // SAFETY: live ioctx, valid C string, valid out-pointer for the order (0 = default).
        Errno::check(unsafe { rbd_create2(self.h, n.as_ptr(), size, f, &mut order) }).map(drop)
    }

    pub fn remove_image(&self, name: &str) -> Result<(), Errno> {
        let n = cstr(name)?;
        // SAFETY: live ioctx, valid C string.
        Errno::check(unsafe { rbd_remove(self.h, n.as_ptr()) }).map(drop)
    }

    /// Clones `parent@snap` (a protected snapshot in this pool) as `child` in `dest`.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        dest: &IoCtx,
        child: &str,
        features: u64,
    ) -> Result<(), Errno> {
        let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let mut order: c_int = 0;
        // SAFETY: both ioctxs are live; all strings are valid C strings; `order`
        // is a valid out-pointer.
        Errno::check(unsafe {
            rbd_clone(
                self.h,
                p.as_ptr(),
                s.as_ptr(),
                dest.h,
                c.as_ptr(),
                features,
                &mut order,
            )
        })
        .map(drop)
    }

    /// Opens `name` (at `snap`, if given). `read_only` opens without a header
    /// watch and refuses writes; snapshots are always read-only.
    pub fn open_image(
        self: &Arc<Self>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Image, Errno> {
        let n = cstr(name)?;
        let s = snap.map(cstr).transpose()?;
        let mut h: rbd_image_t = std::ptr::null_mut();
        // SAFETY: live ioctx, valid strings (snap may be NULL), valid out-pointer.
        let rc = unsafe {
            if read_only {
                rbd_open_read_only(self.h, n.as_ptr(), &mut h, opt_ptr(&s))
            } else {
                rbd_open(self.h, n.as_ptr(), &mut h, opt_ptr(&s))
            }
        };
        Errno::check(rc)?;
        Ok(Image {
            h,
            _io: Arc::clone(self),
            abandoned: Arc::default(),
        })
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: live handle, destroyed once; images hold an Arc to us.
        unsafe { rados_ioctx_destroy(self.h) };
    }
}

// ---------------------------------------------------------------------------
// Image

/// An open RBD image (`rbd_image_t`).
pub struct Image {
    h: rbd_image_t,
    _io: Arc<IoCtx>,
    abandoned: Arc<Abandoned>,
}

// SAFETY: librbd's image handle serialises its own state internally; concurrent
// AIO submission and the metadata calls below from several threads are supported.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// One snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: String,
}

impl Image {
    pub fn size(&self) -> Result<u64, Errno> {
        let mut s = 0u64;
        // SAFETY: live image, valid out-pointer.
        Errno::check(unsafe { rbd_get_size(self.h, &mut s) })?;
        Ok(s)
    }

    pub fn features(&self) -> Result<u64, Errno> {
        let mut f = 0u64;
        // SAFETY: live image, valid out-pointer.
        Errno::check(unsafe { rbd_get_features(self.h, &mut f) })?;
        Ok(f)
    }

    /// The image's id: unique in its pool, kept across renames, new if the image
    /// is deleted and made again.
    pub fn id(&self) -> Result<String, Errno> {
        let mut len = 64usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: `buf` has `len` writable bytes; librbd writes a NUL-terminated
            // id or fails with ERANGE without writing past `len`.
            let rc = unsafe { rbd_get_id(self.h, buf.as_mut_ptr().cast(), len) };
            match Errno::check(rc) {
                Ok(_) => return Ok(from_nul_terminated(&buf)),
                Err(Errno(libc::ERANGE)) if len < 65536 => len *= 4,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn resize(&self, size: u64) -> Result<(), Errno> {
        // SAFETY: live image.
        Errno::check(unsafe { rbd_resize(self.h, size) }).map(drop)
    }

    /// Takes the exclusive lock and keeps it: librbd then refuses other clients'
    /// requests for it, so their writes fail (EROFS) until we release it.
    pub fn lock_acquire_exclusive(&self) -> Result<(), Errno> {
        // SAFETY: live image.
        Errno::check(unsafe { rbd_lock_acquire(self.h, RBD_LOCK_MODE_EXCLUSIVE) }).map(drop)
    }

    pub fn lock_release(&self) -> Result<(), Errno> {
        // SAFETY: live image.
        Errno::check(unsafe { rbd_lock_release(self.h) }).map(drop)
    }

    pub fn is_lock_owner(&self) -> Result<bool, Errno> {
        let mut owner: c_int = 0;
        // SAFETY: live image, valid out-pointer.
        Errno::check(unsafe { rbd_is_exclusive_lock_owner(self.h, &mut owner) })?;
        Ok(owner != 0)
    }

    /// Who holds the image's lock (e.g. "client.4123 ..."), empty if nobody.
    pub fn lock_owners(&self) -> Result<Vec<String>, Errno> {
        let mut max = 4usize;
        loop {
            let mut mode: c_int = 0;
            let mut owners: Vec<*mut c_char> = vec![std::ptr::null_mut(); max];
            let mut n = max;
            // SAFETY: `owners` has room for `n` pointers; librbd fills at most `n`
            // (or fails with ERANGE and sets `n` to what it needs).
            let rc = unsafe { rbd_lock_get_owners(self.h, &mut mode, owners.as_mut_ptr(), &mut n) };
            match Errno::check(rc) {
                Ok(_) => {
                    let count = n.min(max);
                    let out = owners[..count]
                        .iter()
                        .filter(|p| !p.is_null())
                        // SAFETY: librbd filled these with NUL-terminated strings.
                        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                        .collect();
                    // SAFETY: frees exactly the `count` strings librbd allocated above.
                    unsafe { rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
                    return Ok(out);
                }
                Err(Errno(libc::ENOENT)) => return Ok(Vec::new()),
                Err(Errno(libc::ERANGE)) if max < 1024 => max = n.max(max * 2),
                Err(e) => return Err(e),
            }
        }
    }

    /// An image metadata value, `None` if the key is not set.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, Errno> {
        let k = cstr(key)?;
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            // SAFETY: `buf` has `n` writable bytes; on ERANGE librbd writes nothing
            // and sets `n` to the length it needs.
            let rc =
                unsafe { rbd_metadata_get(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), &mut n) };
            match Errno::check(rc) {
                Ok(_) => return Ok(Some(from_nul_terminated(&buf[..n.min(len)]))),
                Err(Errno(libc::ENOENT)) => return Ok(None),
                Err(Errno(libc::ERANGE)) if len < (1 << 20) => len = n.max(len * 2),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), Errno> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: live image, valid C strings.
        Errno::check(unsafe { rbd_metadata_set(self.h, k.as_ptr(), v.as_ptr()) }).map(drop)
    }

    pub fn snap_list(&self) -> Result<Vec<SnapInfo>, Errno> {
        let mut max: c_int = 16;
        loop {
            let cap = usize::try_from(max).unwrap_or(16).max(1);
            let mut snaps: Vec<rbd_snap_info_t> = (0..cap)
                .map(|_| rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: std::ptr::null(),
                })
                .collect();
            let mut n = c_int::try_from(cap).unwrap_or(c_int::MAX);
            // SAFETY: `snaps` has room for `n` entries. On success librbd fills
            // the returned count plus a zeroed terminator entry (so we give it one
            // spare), on ERANGE it sets `n` to what it needs and fills nothing.
            let rc = unsafe { rbd_snap_list(self.h, snaps.as_mut_ptr(), &mut n) };
            match Errno::check(rc) {
                Ok(count) => {
                    let count = usize::try_from(count).unwrap_or(0).min(cap);
                    let out = snaps[..count]
                        .iter()
                        .map(|s| SnapInfo {
                            id: s.id,
                            size: s.size,
                            name: if s.name.is_null() {
                                String::new()
                            } else {
                                // SAFETY: librbd filled a NUL-terminated name.
                                unsafe { CStr::from_ptr(s.name) }
                                    .to_string_lossy()
                                    .into_owned()
                            },
                        })
                        .collect();
                    // SAFETY: frees the names librbd allocated in this array; it
                    // stops at the zeroed terminator entry.
                    unsafe { rbd_snap_list_end(snaps.as_mut_ptr()) };
                    return Ok(out);
                }
                Err(Errno(libc::ERANGE)) if max < 65536 => max = n.max(max * 2) + 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates a snapshot without asking watchers to quiesce first.
    pub fn snap_create(&self, name: &str) -> Result<(), Errno> {
        let n = cstr(name)?;
        // SAFETY: live image, valid C string, no progress callback.
        Errno::check(unsafe {
            rbd_snap_create2(
                self.h,
                n.as_ptr(),
                RBD_SNAP_CREATE_SKIP_QUIESCE,
                None,
                std::ptr::null_mut(),
            )
        })
        .map(drop)
    }

    pub fn snap_remove(&self, name: &str) -> Result<(), Errno> {
        let n = cstr(name)?;
        // SAFETY: live image, valid C string.
        Errno::check(unsafe { rbd_snap_remove(self.h, n.as_ptr()) }).map(drop)
    }

    pub fn snap_protect(&self, name: &str) -> Result<(), Errno> {
        let n = cstr(name)?;
        // SAFETY: live image, valid C string.
        Errno::check(unsafe { rbd_snap_protect(self.h, n.as_ptr()) }).map(drop)
    }

    pub fn snap_unprotect(&self, name: &str) -> Result<(), Errno> {
        let n = cstr(name)?;
        // SAFETY: live image, valid C string.
        Errno::check(unsafe { rbd_snap_unprotect(self.h, n.as_ptr()) }).map(drop)
    }

    pub fn snap_id(&self, name: &str) -> Result<u64, Errno> {
        let n = cstr(name)?;
        let mut id = 0u64;
        // SAFETY: live image, valid C string, valid out-pointer.
        Errno::check(unsafe { rbd_snap_get_id(self.h, n.as_ptr(), &mut id) })?;
        Ok(id)
    }

    /// The extents `(offset, length)` that differ between snapshot `from` and
    /// the image's current state (what is opened: HEAD or a snapshot), within
    /// `[ofs, ofs+len)`. Includes changes inherited from a clone's parent.
    pub fn diff_since(&self, from: &str, ofs: u64, len: u64) -> Result<Vec<(u64, u64)>, Errno> {
        let f = cstr(from)?;
        self.diff_iterate(f.as_ptr(), ofs, len)
    }

    /// The extents `(offset, length)` that hold data in `[ofs, ofs+len)`: the
    /// diff against nothing (`fromsnapname` NULL), including what a clone
    /// inherits from its parent. Everything else reads as zeroes.
    pub fn allocated(&self, ofs: u64, len: u64) -> Result<Vec<(u64, u64)>, Errno> {
        self.diff_iterate(std::ptr::null(), ofs, len)
    }

    /// `rbd_diff_iterate2` from `from` (a C string, or NULL for "from nothing").
    fn diff_iterate(
        &self,
        from: *const c_char,
        ofs: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, Errno> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        // SAFETY: live image; `from` is NULL or a C string the caller keeps alive
        // across the call; `out` outlives the call, which runs the callback only
        // synchronously, on this thread or while we wait.
        Errno::check(unsafe {
            rbd_diff_iterate2(
                self.h,
                from,
                ofs,
                len,
                1,
                0,
                on_diff_extent,
                (&mut out as *mut Vec<(u64, u64)>).cast(),
            )
        })?;
        Ok(out)
    }

    /// Calls `f` (on a librbd thread) whenever the image header changes: resize,
    /// snapshots, metadata, lock changes. Keep `f` short; it must not call back
    /// into this image. Stops when the returned watch is dropped or unwatched.
    pub fn update_watch(
        self: &Arc<Self>,
        f: Box<dyn Fn() + Send + Sync>,
    ) -> Result<UpdateWatch, Errno> {
        let arg: *mut WatchFn = Box::into_raw(Box::new(f));
        let mut handle = 0u64;
        // SAFETY: live image; `arg` stays valid until after `rbd_update_unwatch`
        // returns (UpdateWatch::drop frees it only then).
        let rc = unsafe { rbd_update_watch(self.h, &mut handle, on_update, arg.cast()) };
        if let Err(e) = Errno::check(rc) {
            // SAFETY: registration failed, so librbd holds no copy of `arg`.
            drop(unsafe { Box::from_raw(arg) });
            return Err(e);
        }
        Ok(UpdateWatch {
            image: Arc::clone(self),
            handle,
            arg,
        })
    }

    /// Reads `buf.len()` bytes at `off`; returns the count librbd reports.
    ///
    /// With a `timeout`, librbd reads into a buffer owned by the request and the
    /// data is copied into `buf` once it completes; if it does not complete in
    /// time, the request is abandoned (it keeps its own buffer until librbd
    /// completes it) and this returns [`Errno`] `ETIMEDOUT`. Without a timeout,
    /// librbd reads straight into `buf` and this waits as long as it takes.
    pub fn read(
        &self,
        off: u64,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, Errno> {
        let len = buf.len();
        if timeout.is_some() {
            let own = OwnedBuf::zeroed(len);
            let ptr = own.ptr;
            let (rv, own) = self.submit(timeout, Some(own), |c| {
                // SAFETY: `ptr` is the request's own buffer of `len` bytes, kept
                // alive by its slot until librbd has completed the request, and
                // touched by nobody else until then.
                unsafe { rbd_aio_read(self.h, off, len, ptr.cast(), c) }
            })?;
            if let Some(own) = own {
                let n = rv.min(len);
                buf[..n].copy_from_slice(&own.as_slice()[..n]);
            }
            return Ok(rv);
        }
        let ptr = buf.as_mut_ptr();
        // SAFETY: `buf` is borrowed mutably for this whole call, and without a
        // timeout `submit` returns only after librbd has completed the request, so
        // librbd writes into live, exclusively borrowed memory of `len` bytes.
        self.submit(None, None, |c| unsafe {
            rbd_aio_read(self.h, off, len, ptr.cast(), c)
        })
        .map(|(rv, _)| rv)
    }

    /// Writes all of `buf` at `off` (librbd reports 0, not a count, on success).
    /// With a `timeout`, the data is first copied into a buffer the request owns
    /// (see [`Image::read`]); a write that does not complete in time fails with
    /// `ETIMEDOUT` (it may still land later, before any request submitted after it
    /// to the same object).
    pub fn write(&self, off: u64, buf: &[u8], timeout: Option<Duration>) -> Result<(), Errno> {
        let len = buf.len();
        if timeout.is_some() {
            let own = OwnedBuf::copy_of(buf);
            let ptr = own.ptr;
            // SAFETY: `ptr` is the request's own buffer of `len` bytes, alive until
            // librbd completes the request (the slot owns it), never written meanwhile.
            return self
                .submit(timeout, Some(own), |c| unsafe {
                    rbd_aio_write(self.h, off, len, ptr.cast_const().cast(), c)
                })
                .map(drop);
        }
        let ptr = buf.as_ptr();
        // SAFETY: `buf` is borrowed for the whole call and, without a timeout,
        // `submit` waits for the completion, so librbd only reads live memory.
        self.submit(None, None, |c| unsafe {
            rbd_aio_write(self.h, off, len, ptr.cast(), c)
        })
        .map(drop)
    }

    pub fn flush(&self, timeout: Option<Duration>) -> Result<(), Errno> {
        // SAFETY: live image; no buffer involved.
        self.submit(timeout, None, |c| unsafe { rbd_aio_flush(self.h, c) })
            .map(drop)
    }

    pub fn discard(&self, off: u64, len: u64, timeout: Option<Duration>) -> Result<(), Errno> {
        // SAFETY: live image; no buffer involved.
        self.submit(timeout, None, |c| unsafe {
            rbd_aio_discard(self.h, off, len, c)
        })
        .map(drop)
    }

    pub fn write_zeroes(
        &self,
        off: u64,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        // SAFETY: live image; no buffer involved.
        self.submit(timeout, None, |c| unsafe {
            rbd_aio_write_zeroes(self.h, off, len, c, 0, 0)
        })
        .map(drop)
    }

    /// Requests given up on after their timeout whose completion librbd has not
    /// delivered yet, and the bytes of buffer they hold.
    pub fn abandoned(&self) -> (u64, u64) {
        (
            self.abandoned.count.load(Ordering::Acquire),
            self.abandoned.bytes.load(Ordering::Acquire),
        )
    }

    /// Makes a completion, lets `start` submit the request with it, and waits for
    /// librbd to complete it (at most `timeout`, if given). Returns the request's
    /// non-negative return value and its own buffer, or `ETIMEDOUT` when the
    /// request was abandoned: it then stays in flight in librbd, and its slot
    /// (with `buf`) is freed by the completion callback whenever that comes.
    ///
    /// A request that uses a buffer of the caller's must pass no timeout.
    fn submit(
        &self,
        timeout: Option<Duration>,
        buf: Option<OwnedBuf>,
        start: impl FnOnce(rbd_completion_t) -> c_int,
    ) -> Result<(usize, Option<OwnedBuf>), Errno> {
        let slot = self.start_request(buf, start)?;
        let rv = slot.wait(timeout).ok_or(Errno(libc::ETIMEDOUT))?;
        Self::finish(&slot, rv)
    }

    fn finish(slot: &Slot, rv: i64) -> Result<(usize, Option<OwnedBuf>), Errno> {
        if rv < 0 {
            Err(Errno(i32::try_from(-rv).unwrap_or(libc::EIO)))
        } else {
            let own = slot
                .buf
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            Ok((usize::try_from(rv).unwrap_or(usize::MAX), own))
        }
    }

    /// Like `submit`, for a task on an event loop: the wait does not block the
    /// loop. Requests always use a buffer of their own here, so a request given
    /// up on (timeout, or the future dropped) never touches the caller's memory.
    async fn submit_async(
        &self,
        timeout: Option<Duration>,
        buf: Option<OwnedBuf>,
        start: impl FnOnce(rbd_completion_t) -> c_int,
    ) -> Result<(usize, Option<OwnedBuf>), Errno> {
        let slot = self.start_request(buf, start)?;
        let wait = std::future::poll_fn(|cx| {
            let st = slot.st.lock().unwrap_or_else(PoisonError::into_inner);
            if let SlotState::Done(rv) = *st {
                return std::task::Poll::Ready(rv);
            }
            *slot.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            std::task::Poll::Pending
        });
        let abandon = AbandonOnDrop(&slot);
        let rv = match timeout {
            None => wait.await,
            Some(t) => {
                let timed_out = async {
                    crate::aio::sleep(t).await;
                    i64::MIN
                };
                futures_lite::future::or(wait, timed_out).await
            }
        };
        if rv == i64::MIN {
            return Err(Errno(libc::ETIMEDOUT)); // `abandon` marks it abandoned
        }
        std::mem::forget(abandon);
        Self::finish(&slot, rv)
    }

    fn start_request(
        &self,
        buf: Option<OwnedBuf>,
        start: impl FnOnce(rbd_completion_t) -> c_int,
    ) -> Result<Arc<Slot>, Errno> {
        let slot = Arc::new(Slot {
            st: Mutex::new(SlotState::Pending),
            cv: Condvar::new(),
            waker: Mutex::new(None),
            buf: Mutex::new(buf),
            abandoned: Arc::clone(&self.abandoned),
        });
        let arg = Arc::into_raw(Arc::clone(&slot)) as *mut c_void;
        let mut c: rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` is a leaked Arc<Slot> that `on_complete` takes back exactly
        // once; `c` is a valid out-pointer.
        let rc = unsafe { rbd_aio_create_completion(arg, on_complete, &mut c) };
        if let Err(e) = Errno::check(rc) {
            // SAFETY: no completion exists, so nothing else will take `arg` back.
            drop(unsafe { Arc::from_raw(arg as *const Slot) });
            return Err(e);
        }
        if let Err(e) = Errno::check(start(c)) {
            // Not submitted: librbd will never call back. Take our reference back
            // and free the completion ourselves.
            // SAFETY: `c` is ours and unused; `arg` is the reference leaked above.
            unsafe {
                rbd_aio_release(c);
                drop(Arc::from_raw(arg as *const Slot));
            }
            return Err(e);
        }
        Ok(slot)
    }

    /// Reads `len` bytes at `off` into a buffer of the request's own, on an
    /// event loop; returns them.
    pub async fn read_owned(
        &self,
        off: u64,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<(usize, Vec<u8>), Errno> {
        let own = OwnedBuf::zeroed(len);
        let ptr = own.ptr;
        let (rv, own) = self
            .submit_async(timeout, Some(own), |c| {
                // SAFETY: `ptr` is the request's own buffer of `len` bytes, kept
                // alive by its slot until librbd has completed the request.
                unsafe { rbd_aio_read(self.h, off, len, ptr.cast(), c) }
            })
            .await?;
        Ok((rv, own.map(|b| b.as_slice().to_vec()).unwrap_or_default()))
    }

    /// Writes a copy of `data` at `off`, on an event loop.
    pub async fn write_copy(
        &self,
        off: u64,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        let len = data.len();
        let own = OwnedBuf::copy_of(data);
        let ptr = own.ptr;
        self.submit_async(timeout, Some(own), |c| {
            // SAFETY: the request's own copy, alive until librbd completes it.
            unsafe { rbd_aio_write(self.h, off, len, ptr.cast_const().cast(), c) }
        })
        .await
        .map(drop)
    }

    pub async fn flush_async(&self, timeout: Option<Duration>) -> Result<(), Errno> {
        // SAFETY: live image; no buffer involved.
        self.submit_async(timeout, None, |c| unsafe { rbd_aio_flush(self.h, c) })
            .await
            .map(drop)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let (n, bytes) = self.abandoned();
        if n > 0 {
            // rbd_close waits for librbd's requests in flight; the abandoned ones
            // complete (and free their buffers) once the cluster answers.
            tracing::warn!(
                requests = n,
                bytes,
                "closing the image while requests abandoned after the backend timeout are still \
                 in flight; librbd waits for the cluster to answer them"
            );
        }
        // SAFETY: live image, closed once. Requests with a caller's buffer were all
        // waited for; abandoned ones own their buffers and slots (the callback
        // frees them), and UpdateWatch holds an Arc, so none is registered.
        let rc = unsafe { rbd_close(self.h) };
        if rc < 0 {
            tracing::warn!(error = %Errno(-rc), "rbd_close failed");
        }
    }
}

fn from_nul_terminated(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

// ---------------------------------------------------------------------------
// Completions and callbacks

/// A heap buffer owned by one request, handed to librbd as a raw pointer. It is
/// not a `Box`/`Vec` while librbd may use it, so no Rust reference to it exists
/// until the request has completed.
struct OwnedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain heap allocation; which thread frees it does not matter.
unsafe impl Send for OwnedBuf {}

impl OwnedBuf {
    fn zeroed(len: usize) -> OwnedBuf {
        Self::from_box(vec![0u8; len].into_boxed_slice())
    }

    fn copy_of(data: &[u8]) -> OwnedBuf {
        Self::from_box(data.to_vec().into_boxed_slice())
    }

    fn from_box(b: Box<[u8]>) -> OwnedBuf {
        let len = b.len();
        OwnedBuf {
            ptr: Box::into_raw(b).cast::<u8>(),
            len,
        }
    }

    /// Only after the request that used it has completed.
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr`/`len` come from a live boxed slice; librbd no longer
        // touches it (the completion was observed under the slot's mutex).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for OwnedBuf {
    fn drop(&mut self) {
        // SAFETY: made by `Box::into_raw` of a slice of `len` bytes, freed once;
        // dropped only when librbd is done with it (after completion).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// Marks a request abandoned if its waiter goes away before the completion
/// (a timeout, or the task dropped): the callback then frees its slot.
struct AbandonOnDrop<'a>(&'a Slot);

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        let slot = self.0;
        let mut st = slot.st.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*st, SlotState::Pending) {
            *st = SlotState::Abandoned;
            slot.abandoned.count.fetch_add(1, Ordering::AcqRel);
            slot.abandoned
                .bytes
                .fetch_add(slot.buf_len(), Ordering::AcqRel);
        }
    }
}

/// Per image: requests abandoned after their timeout and not yet completed.
#[derive(Default)]
struct Abandoned {
    count: AtomicU64,
    bytes: AtomicU64,
}

enum SlotState {
    Pending,
    Done(i64),
    /// The waiter gave up; the callback frees the slot and its buffer.
    Abandoned,
}

/// Where librbd's callback leaves a request's return value for its waiter.
struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
    /// The task waiting on an event loop, if the request was made there.
    waker: Mutex<Option<std::task::Waker>>,
    /// The request's own buffer (requests with a timeout), or none.
    buf: Mutex<Option<OwnedBuf>>,
    abandoned: Arc<Abandoned>,
}

impl Slot {
    fn buf_len(&self) -> u64 {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |b| b.len as u64)
    }

    fn complete(&self, rv: i64) {
        let mut st = self.st.lock().unwrap_or_else(PoisonError::into_inner);
        match *st {
            SlotState::Abandoned => {
                self.abandoned.count.fetch_sub(1, Ordering::AcqRel);
                self.abandoned
                    .bytes
                    .fetch_sub(self.buf_len(), Ordering::AcqRel);
                let left = self.abandoned.count.load(Ordering::Acquire);
                tracing::info!(result = rv, still_abandoned = left,
                    "a backend request given up on after its timeout completed late; its result is discarded");
            }
            _ => {
                *st = SlotState::Done(rv);
                self.cv.notify_one();
                drop(st);
                // A wake is a message to the waiting task's loop (never runs it here).
                if let Some(w) = self
                    .waker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                {
                    w.wake();
                }
            }
        }
    }

    /// Waits for the completion, at most `timeout` if given. `None`: timed out;
    /// the slot is then marked abandoned (the callback will free it).
    fn wait(&self, timeout: Option<Duration>) -> Option<i64> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.st.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let SlotState::Done(rv) = *g {
                return Some(rv);
            }
            match deadline {
                None => g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        *g = SlotState::Abandoned;
                        self.abandoned.count.fetch_add(1, Ordering::AcqRel);
                        self.abandoned
                            .bytes
                            .fetch_add(self.buf_len(), Ordering::AcqRel);
                        return None;
                    }
                    g = self
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

/// librbd's completion callback (runs on a librbd thread).
extern "C" fn on_complete(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Arc<Slot> leaked in `Image::submit` for this completion;
    // librbd calls back exactly once per submitted request, so it is taken back once.
    let slot = unsafe { Arc::from_raw(arg as *const Slot) };
    // SAFETY: `c` is the live completion of this request; reading its value and
    // then releasing it (our only reference) is the documented pattern.
    let rv = unsafe {
        let rv = rbd_aio_get_return_value(c);
        rbd_aio_release(c);
        rv
    };
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.complete(rv as i64)));
    // Dropping `slot` here frees an abandoned request's slot and buffer: librbd
    // has completed it, so it no longer uses the buffer.
}

/// `rbd_diff_iterate2` callback: collects `(offset, length)`.
extern "C" fn on_diff_extent(off: u64, len: usize, _exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&mut Vec` passed by `Image::diff_since`, alive and not
    // otherwise used while librbd runs this callback (synchronously).
    let out = unsafe { &mut *(arg as *mut Vec<(u64, u64)>) };
    out.push((off, len as u64));
    0
}

type WatchFn = Box<dyn Fn() + Send + Sync>;

extern "C" fn on_update(arg: *mut c_void) {
    // SAFETY: `arg` is the boxed closure registered in `update_watch`, freed only
    // after `rbd_update_unwatch` has returned (no callback runs after that).
    let f = unsafe { &*(arg as *const WatchFn) };
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

/// A registered header watch; unregistered on drop.
pub struct UpdateWatch {
    image: Arc<Image>,
    handle: u64,
    arg: *mut WatchFn,
}

// SAFETY: `arg` points to a `Send + Sync` closure only freed in Drop; the image is Sync.
unsafe impl Send for UpdateWatch {}
// SAFETY: as above.
unsafe impl Sync for UpdateWatch {}

impl Drop for UpdateWatch {
    fn drop(&mut self) {
        // SAFETY: the handle was registered on this live image; after unwatch
        // returns librbd calls `on_update` with `arg` no more, so it can be freed.
        unsafe {
            let rc = rbd_update_unwatch(self.image.h, self.handle);
            if rc < 0 {
                // Leak the closure rather than risk a callback into freed memory.
                tracing::warn!(error = %Errno(-rc), "rbd_update_unwatch failed; leaking the watch callback");
                return;
            }
            drop(Box::from_raw(self.arg));
        }
    }
}
