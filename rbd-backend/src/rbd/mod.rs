//! `RbdBackend`: an RBD image (`rbd:POOL/IMAGE[@SNAP]`) opened through librbd,
//! with no krbd mapping on the host.
//!
//! - The connection is made with `rbd_cache=false`: the ublk-cache is the cache.
//! - A writable image's exclusive lock is taken at open (`rbd_lock_acquire`) and
//!   kept until drop: other clients' writes then fail with EROFS instead of
//!   landing behind the cache. An image without the exclusive-lock feature is
//!   refused. A snapshot is opened read-only, without a lock.
//! - Change detection: at clean detach [`ChangeTracking::change_marker`] takes a
//!   snapshot `ublk-cache-…` (after the cache's last flush, while we still hold
//!   the lock) and removes older ones of ours; at the next attach
//!   [`ChangeTracking::changes_since`] diffs that snapshot against HEAD
//!   (`rbd_diff_iterate2`), reports the changed ranges, and removes it.
//! - Image metadata `ublk-cache.owner` and `ublk-cache.generation` record who
//!   attached last and count attaches and clean detaches, for operators and
//!   for telling whether another server attached in between.
//! - A header watch (`rbd_update_watch`) notices resizes; the device size cannot
//!   follow while the server runs, so a resize is logged loudly, and after a
//!   shrink every request reaching past the new end fails with EIO
//!   ([`ResizeWatch::current_size`] lets the engine refuse cached ones too).
//! - Every I/O request waits at most [`RbdOptions::io_timeout`] for the cluster,
//!   then fails with EIO (kind [`ErrorKind::Timeout`]). librbd cannot cancel it:
//!   it stays in flight with a buffer of its own and is discarded when it
//!   completes. Writes that time out are errors, never successes, so the engine
//!   keeps the data dirty (`back`) or returns EIO (other modes).

mod admin;
mod allocation;
mod ffi;
mod handover;
mod spec;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

pub use admin::{RbdAdmin, RbdRawImage};
pub use spec::{RbdOptions, RbdSpec, DEFAULT_IO_TIMEOUT, DEFAULT_LOCK_TIMEOUT};

use crate::allocation::AllocationMap;
use crate::backend::{
    Backend, BackendChanges, BackendIdentity, BlockIo, ChangeTracking, ExclusiveLock, ResizeWatch,
};
use crate::error::{BackendError, ErrorKind, Result};
use ffi::{Cluster, Errno, Image, IoCtx, UpdateWatch};

/// Prefix of the snapshots this backend makes as change markers.
pub const MARKER_SNAP_PREFIX: &str = "ublk-cache-";
/// Image metadata key: who attached last, and whether it detached cleanly.
pub const META_OWNER: &str = "ublk-cache.owner";
/// Image metadata key: bumped at every attach and clean detach.
pub const META_GENERATION: &str = "ublk-cache.generation";
/// The change marker of a cache whose server handed the image over in a live
/// migration: it never matches, so the next attach drops all clean data.
pub const HANDED_OVER_MARKER: &str = "rbd-handed-over";
/// The change marker of a cache served over a read-only open of the image
/// (no lock, so no snapshot of ours can say what others wrote meanwhile): it
/// never matches, so the next attach drops all clean data.
pub const READ_ONLY_MARKER: &str = "rbd-read-only-open";
/// While requests abandoned after their timeout hold this many bytes of buffer,
/// new requests fail at once instead of piling up more (the cluster is not
/// answering anyway); they are accepted again as the old ones complete.
const MAX_ABANDONED_BYTES: u64 = 256 << 20;

pub struct RbdBackend {
    spec: RbdSpec,
    cluster: Arc<Cluster>,
    image: Arc<Image>,
    size: u64,
    image_id: String,
    snap_id: Option<u64>,
    read_only: bool,
    /// Per I/O request; `None` waits forever.
    timeout: Option<Duration>,
    locked: AtomicBool,
    /// Held for good, lent per write (migration source), or to be claimed at
    /// the first write (migration destination); see `handover`.
    lock_state: Mutex<handover::LockState>,
    /// How long to wait for the lock at open and during a handover.
    lock_wait: Option<Duration>,
    /// The generation and owner found in the metadata at open, before our bump.
    found_generation: Option<u64>,
    found_owner: Option<String>,
    /// The generation we last wrote.
    generation: Mutex<u64>,
    /// Image size last seen by the header watch (differs from `size` after a resize).
    seen_size: Arc<AtomicU64>,
    watcher: Mutex<Option<Watcher>>,
}

struct Watcher {
    watch: UpdateWatch,
    thread: JoinHandle<()>,
    /// Ends the thread even if the watch could not be unregistered (its closure,
    /// and so the channel's sender, is then leaked rather than freed).
    stop: Arc<AtomicBool>,
}

fn unavailable(msg: String, e: Errno) -> BackendError {
    BackendError::new(ErrorKind::Unavailable, msg, e.io_error())
}

fn invalid(msg: String) -> BackendError {
    BackendError::new(
        ErrorKind::InvalidRequest,
        msg,
        io::Error::from_raw_os_error(libc::EINVAL),
    )
}

/// Connects to the cluster as `opts` says, with librbd's cache off.
pub(crate) fn connect(opts: &RbdOptions) -> Result<Arc<Cluster>> {
    let id = opts.id.strip_prefix("client.").unwrap_or(&opts.id);
    let cluster = Cluster::create(id)
        .map_err(|e| unavailable(format!("ceph: client.{id}: cannot create a handle"), e))?;
    let conf = opts.conf.as_ref().map(|p| p.to_string_lossy().into_owned());
    if let Some(c) = &opts.conf {
        if !c.exists() {
            return Err(unavailable(
                format!("ceph config {} does not exist", c.display()),
                Errno(libc::ENOENT),
            ));
        }
    }
    cluster.conf_read_file(conf.as_deref()).map_err(|e| {
        unavailable(
            match &conf {
                Some(c) => format!("ceph config {c} cannot be read"),
                None => "no ceph config found ($CEPH_CONF, /etc/ceph/ceph.conf); give --ceph-conf"
                    .into(),
            },
            e,
        )
    })?;
    // A keyring, or a file with the bare key (`rbd --keyfile`, OpenNebula's CEPH_KEY).
    for (option, path, what) in [
        ("keyring", &opts.keyring, "keyring"),
        ("keyfile", &opts.keyfile, "key file"),
    ] {
        let Some(k) = path else { continue };
        if !k.is_file() {
            return Err(unavailable(
                format!("ceph {what} {} does not exist", k.display()),
                Errno(libc::ENOENT),
            ));
        }
        cluster
            .conf_set(option, &k.to_string_lossy())
            .map_err(|e| unavailable(format!("ceph {what} {}: refused", k.display()), e))?;
    }
    let set = |k: &str, v: &str| {
        cluster
            .conf_set(k, v)
            .map_err(|e| unavailable(format!("ceph: cannot set {k}={v}"), e))
    };
    set("rbd_cache", "false")?;
    set(
        "client_mount_timeout",
        &opts.connect_timeout_secs.to_string(),
    )?;
    cluster.connect().map_err(|e| {
        let shown = conf.as_deref().unwrap_or("the default ceph.conf");
        let why = match e.0 {
            libc::EACCES | libc::EPERM => format!(
                "ceph: authentication as client.{id} failed (check --ceph-id and --ceph-keyring)"
            ),
            libc::ENOENT => format!(
                "ceph: no key for client.{id} found (give --ceph-keyring, or name a keyring in {shown})"
            ),
            libc::ETIMEDOUT => format!(
                "ceph: the monitors named in {shown} did not answer within {} s",
                opts.connect_timeout_secs
            ),
            _ => format!("ceph: cannot connect as client.{id} (monitors from {shown})"),
        };
        unavailable(why, e)
    })?;
    Ok(Arc::new(cluster))
}

pub(crate) fn ioctx(cluster: &Arc<Cluster>, spec: &RbdSpec) -> Result<Arc<IoCtx>> {
    cluster
        .ioctx(&spec.pool, spec.namespace.as_deref())
        .map(Arc::new)
        .map_err(|e| match e.0 {
            libc::ENOENT => unavailable(format!("rbd:{spec}: no such pool '{}'", spec.pool), e),
            _ => unavailable(format!("rbd:{spec}: cannot open pool '{}'", spec.pool), e),
        })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RbdBackend {
    /// Connects, opens the image (a snapshot read-only), takes its exclusive
    /// lock, records us as its owner in the image metadata, and starts watching
    /// its header. Errors name the problem: config, auth, pool, image, lock.
    pub fn open(spec: &RbdSpec, opts: &RbdOptions) -> Result<RbdBackend> {
        let cluster = connect(opts)?;
        let io = ioctx(&cluster, spec)?;
        let read_only = spec.snap.is_some() || opts.read_only;
        let image = io
            .open_image(&spec.image, spec.snap.as_deref(), read_only)
            .map_err(|e| match (e.0, &spec.snap) {
                (libc::ENOENT, Some(s)) => match io.open_image(&spec.image, None, true) {
                    Ok(_) => unavailable(
                        format!(
                            "rbd:{spec}: image {} has no snapshot '{s}'",
                            spec.image_path()
                        ),
                        e,
                    ),
                    Err(_) => unavailable(
                        format!("rbd:{spec}: no such image {}", spec.image_path()),
                        e,
                    ),
                },
                (libc::ENOENT, None) => unavailable(
                    format!("rbd:{spec}: no such image {}", spec.image_path()),
                    e,
                ),
                (libc::EACCES | libc::EPERM, _) => unavailable(
                    format!(
                        "rbd:{spec}: permission denied (check client.{}'s caps)",
                        opts.id
                    ),
                    e,
                ),
                _ => unavailable(format!("rbd:{spec}: cannot open the image"), e),
            })?;
        let image = Arc::new(image);
        let ctx = |what: &str, e: Errno| unavailable(format!("rbd:{spec}: {what}"), e);
        let size = image.size().map_err(|e| ctx("cannot read its size", e))?;
        let image_id = image.id().map_err(|e| ctx("cannot read its id", e))?;
        let snap_id = match &spec.snap {
            Some(s) => Some(
                image
                    .snap_id(s)
                    .map_err(|e| ctx("cannot read the snapshot id", e))?,
            ),
            None => None,
        };
        let mut b = RbdBackend {
            spec: spec.clone(),
            cluster,
            image,
            size,
            image_id,
            snap_id,
            read_only,
            timeout: opts.io_timeout.filter(|t| !t.is_zero()),
            locked: AtomicBool::new(false),
            lock_state: Mutex::new(handover::LockState {
                mode: if opts.defer_lock && !read_only {
                    handover::LockMode::Claim
                } else {
                    handover::LockMode::Held
                },
                inflight: 0,
            }),
            lock_wait: opts.lock_timeout.filter(|t| !t.is_zero()),
            found_generation: None,
            found_owner: None,
            generation: Mutex::new(0),
            seen_size: Arc::new(AtomicU64::new(size)),
            watcher: Mutex::new(None),
        };
        if !read_only && opts.defer_lock {
            // A migration destination: the source still writes; the lock (and
            // the owner record) are taken at our first write.
            b.check_lock_feature()?;
            b.read_previous_owner()?;
            b.start_watch();
            tracing::info!(image = %b.spec, "migration destination: the exclusive lock is taken at the first write");
        } else if !read_only {
            b.take_lock(opts.lock_timeout.filter(|t| !t.is_zero()))?;
            b.record_attach()?;
            b.start_watch();
        }
        tracing::info!(image = %b.spec, size, id = %b.image_id, read_only,
            client = b.cluster.instance_id(),
            io_timeout_secs = b.timeout.map_or(0.0, |t| t.as_secs_f64()), "opened rbd image");
        Ok(b)
    }

    /// `rbd_lock_acquire`, waiting at most `timeout` (`None`: forever). librbd
    /// cannot cancel it, so on timeout the attempt goes on in a thread of its
    /// own, which releases the lock at once if it gets it late (and closes its
    /// reference to the image). `None` returned: timed out.
    fn acquire_bounded(&self, timeout: Option<Duration>) -> Option<std::result::Result<(), Errno>> {
        let Some(timeout) = timeout else {
            return Some(self.image.lock_acquire_exclusive());
        };
        let (tx, rx) = mpsc::channel();
        let image = Arc::clone(&self.image);
        let name = self.spec.to_string();
        let spawned = std::thread::Builder::new()
            .name("rbd-lock".into())
            .spawn(move || {
                let r = image.lock_acquire_exclusive();
                if let Err(mpsc::SendError(r)) = tx.send(r) {
                    // Nobody waits any more: give a late lock straight back.
                    if r.is_ok() {
                        let _ = image.lock_release();
                        tracing::info!(image = %name,
                            "got the exclusive lock after giving up waiting for it; released it again");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for the lock; waiting for it without a bound");
            return Some(self.image.lock_acquire_exclusive());
        }
        rx.recv_timeout(timeout).ok()
    }

    fn check_lock_feature(&self) -> Result<()> {
        let spec = &self.spec;
        let features = self
            .image
            .features()
            .map_err(|e| unavailable(format!("rbd:{spec}: cannot read its features"), e))?;
        if features & ffi::FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(BackendError::new(
                ErrorKind::Unavailable,
                format!(
                    "rbd:{spec}: the image lacks the exclusive-lock feature, so nothing would stop another \
                     client from writing behind the cache; enable it with \
                     `rbd feature enable {} exclusive-lock`",
                    spec.image_path()
                ),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        Ok(())
    }

    fn lock_owners_text(&self) -> String {
        self.image
            .lock_owners()
            .map(|o| {
                if o.is_empty() {
                    "unknown".into()
                } else {
                    o.join(", ")
                }
            })
            .unwrap_or_else(|_| "unknown".into())
    }

    fn last_owner_text(&self) -> String {
        self.image
            .metadata_get(META_OWNER)
            .ok()
            .flatten()
            .map(|o| format!("; its metadata names the last ublk-cache owner: {o}"))
            .unwrap_or_default()
    }

    fn take_lock(&self, lock_timeout: Option<Duration>) -> Result<()> {
        self.check_lock_feature()?;
        let held_by = self.image.lock_owners().unwrap_or_default();
        if !held_by.is_empty() {
            tracing::warn!(image = %self.spec, holder = %held_by.join(", "), last_owner = %self.last_owner_text(),
                wait_secs = lock_timeout.map_or(0, |t| t.as_secs()),
                "the image's exclusive lock is held by another client; asking it for the lock. A live \
                 holder refuses at once; a dead one (kill -9, host crash) loses it when its watch \
                 expires on the OSDs (osd_client_watch_timeout, 30 s by default)");
        }
        match self.acquire_bounded(lock_timeout) {
            Some(Ok(())) => {
                self.set_lock_flag();
                Ok(())
            }
            other => Err(self.lock_error(other, lock_timeout.unwrap_or_default(), "")),
        }
    }

    /// The error for a failed lock acquisition (`None`: timed out after `waited`).
    fn lock_error(
        &self,
        r: Option<std::result::Result<(), Errno>>,
        waited: Duration,
        why: &str,
    ) -> BackendError {
        let spec = &self.spec;
        let why = if why.is_empty() {
            String::new()
        } else {
            format!("{why}: ")
        };
        match r {
            Some(Ok(())) => BackendError::new(
                ErrorKind::Io,
                format!("rbd:{spec}: {why}lock state confused"),
                io::Error::from_raw_os_error(libc::EIO),
            ),
            None => {
                let secs = waited.as_secs();
                let path = spec.image_path();
                BackendError::new(
                    ErrorKind::Timeout,
                    format!(
                        "rbd:{spec}: {why}gave up waiting for the image's exclusive lock after {secs} s: another \
                         client holds it (at {}{}). If that client is alive (a ublk-cache, QEMU or rbd \
                         elsewhere), stop it first. If it is dead, the lock is normally broken once its \
                         watch expires (osd_client_watch_timeout, 30 s by default); if not, check `rbd status {path}` (watchers) and \
                         `rbd lock ls {path}`, and remove a dead holder's lock with `rbd lock rm {path} \
                         LOCK-ID LOCKER` (then `ceph osd blocklist add ADDRESS` so it cannot write \
                         again), then start again",
                        self.lock_owners_text(),
                        self.last_owner_text()
                    ),
                    io::Error::from_raw_os_error(libc::ETIMEDOUT),
                )
            }
            Some(Err(e)) => {
                let kind = match e.0 {
                    libc::EROFS | libc::EBUSY | libc::EPERM | libc::EACCES => ErrorKind::ReadOnly,
                    _ => ErrorKind::Unavailable,
                };
                BackendError::new(
                    kind,
                    format!(
                        "rbd:{spec}: {why}the image's exclusive lock is held by another client ({}{}): \
                         another ublk-cache, QEMU or rbd client is using it. Stop that one first \
                         (a clean `ublk-cache stop` hands the lock over)",
                        self.lock_owners_text(),
                        self.last_owner_text()
                    ),
                    e.io_error(),
                )
            }
        }
    }

    fn owns_lock_flag(&self) -> bool {
        self.locked.load(Ordering::Acquire)
    }

    fn set_lock_flag(&self) {
        self.locked.store(true, Ordering::Release);
    }

    /// Clear the flag; returns whether we held the lock.
    fn release_lock_flag(&self) -> bool {
        self.locked.swap(false, Ordering::AcqRel)
    }

    fn owner_text(&self, state: &str) -> String {
        format!(
            "{state} host={} pid={} client=client.{} time={}",
            hostname(),
            std::process::id(),
            self.cluster.instance_id(),
            unix_secs()
        )
    }

    fn meta_err(&self, what: &str, e: Errno) -> BackendError {
        BackendError::from_io(format!("rbd:{}: {what}", self.spec), e.io_error())
    }

    /// Reads the previous owner and generation, then records us.
    fn record_attach(&mut self) -> Result<()> {
        self.read_previous_owner()?;
        let next = self.found_generation.unwrap_or(0) + 1;
        self.set_owner("attached", next)
    }

    /// Reads the previous owner and generation (for logs and the change check).
    fn read_previous_owner(&mut self) -> Result<()> {
        let gen = self
            .image
            .metadata_get(META_GENERATION)
            .map_err(|e| self.meta_err("reading image metadata", e))?;
        self.found_generation = gen.as_deref().and_then(|g| g.trim().parse().ok());
        self.found_owner = self
            .image
            .metadata_get(META_OWNER)
            .map_err(|e| self.meta_err("reading image metadata", e))?;
        if let Some(o) = &self.found_owner {
            if o.starts_with("attached") {
                tracing::warn!(image = %self.spec, previous = %o,
                    "the last ublk-cache that attached this image did not detach cleanly (crash, kill, or still \
                     running elsewhere before its lock was broken)");
            }
        }
        Ok(())
    }

    fn set_owner(&self, state: &str, gen: u64) -> Result<()> {
        self.image
            .metadata_set(META_GENERATION, &gen.to_string())
            .map_err(|e| self.meta_err("writing image metadata", e))?;
        self.image
            .metadata_set(META_OWNER, &self.owner_text(state))
            .map_err(|e| self.meta_err("writing image metadata", e))?;
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = gen;
        Ok(())
    }

    fn start_watch(&self) {
        let (tx, rx) = mpsc::channel::<()>();
        let tx = Mutex::new(tx);
        let watch = match self.image.update_watch(Box::new(move || {
            let _ = tx.lock().map(|t| t.send(()));
        })) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(image = %self.spec, error = %e,
                    "cannot watch the image header; a resize will go unnoticed while serving");
                return;
            }
        };
        let image = Arc::clone(&self.image);
        let seen = Arc::clone(&self.seen_size);
        let opened = self.size;
        let name = self.spec.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("rbd-watch".into())
            .spawn(move || loop {
                match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                    Ok(()) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) if !stopped.load(Ordering::Acquire) => continue,
                    Err(_) => break,
                }
                {
                    while rx.try_recv().is_ok() {}
                    let Ok(now) = image.size() else { continue };
                    let before = seen.swap(now, Ordering::AcqRel);
                    if now == before {
                    } else if now >= opened {
                        tracing::warn!(image = %name, served_size = opened, new_size = now,
                            "the RBD image was resized while served; the resize is NOT reflected: the \
                             device keeps serving {opened} bytes (neither ublk on this kernel nor NBD can \
                             change a live device's size). The cache records the size it was made for, so \
                             after a restart it is refused as belonging to another backend: stop cleanly, \
                             then delete or --format the cache");
                    } else {
                        tracing::error!(image = %name, served_size = opened, new_size = now,
                            "the RBD image was SHRUNK while served: the device keeps its size ({opened} \
                             bytes), but reads and writes from byte {now} on now FAIL with EIO, cached or \
                             not, and dirty data there cannot be written back (it stays in the cache, and a \
                             clean stop waits for it). Grow the image back (rbd resize --size {opened}B) to \
                             use that range again");
                    }
                }
            });
        match thread {
            Ok(thread) => {
                *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(Watcher {
                    watch,
                    thread,
                    stop,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the rbd-watch thread; resizes go unnoticed")
            }
        }
    }

    /// `pool/image[@snap]`.
    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    pub fn image_id(&self) -> &str {
        &self.image_id
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Requests abandoned after the I/O timeout that librbd has not completed
    /// yet, and the bytes of buffer they hold.
    pub fn abandoned_requests(&self) -> (u64, u64) {
        self.image.abandoned()
    }

    /// Whether we still own the exclusive lock (false after someone broke it).
    pub fn owns_lock(&self) -> bool {
        self.locked.load(Ordering::Acquire) && self.image.is_lock_owner().unwrap_or(false)
    }

    /// The generation found in the image metadata at open (before ours).
    pub fn found_generation(&self) -> Option<u64> {
        self.found_generation
    }

    /// Snapshots of this image that we made as change markers.
    pub fn marker_snapshots(&self) -> Result<Vec<String>> {
        Ok(self
            .image
            .snap_list()
            .map_err(|e| self.meta_err("listing snapshots", e))?
            .into_iter()
            .filter(|s| s.name.starts_with(MARKER_SNAP_PREFIX))
            .map(|s| s.name)
            .collect())
    }

    /// In range of the served size, and (after a shrink) of the image's end;
    /// and not while abandoned requests hold too much memory.
    fn check_range(&self, op: &str, offset: u64, len: u64) -> Result<()> {
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.size => end,
            _ => {
                return Err(invalid(format!(
                    "rbd:{}: {op} offset={offset} len={len} reaches beyond size={}",
                    self.spec, self.size
                )))
            }
        };
        let now = self.current_size();
        if end > now {
            return Err(BackendError::new(
                ErrorKind::Io,
                format!(
                    "rbd:{}: {op} offset={offset} len={len} reaches beyond the image's end at {now}: \
                     the image was shrunk from {} bytes while served (grow it back to use this range)",
                    self.spec, self.size
                ),
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let (n, bytes) = self.image.abandoned();
        if bytes >= MAX_ABANDONED_BYTES {
            return Err(BackendError::new(
                ErrorKind::Timeout,
                format!(
                    "rbd:{}: {op} offset={offset} len={len}: refused at once: {n} earlier requests \
                     ({} MiB) timed out and the cluster has still not answered them",
                    self.spec,
                    bytes >> 20
                ),
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.read_only {
            return Err(BackendError::new(
                ErrorKind::ReadOnly,
                format!(
                    "rbd:{}: {op} on a read-only open (a snapshot, or --read-only)",
                    self.spec
                ),
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        Ok(())
    }

    fn io_err(&self, op: &str, offset: u64, len: u64, e: Errno) -> BackendError {
        let base = format!("rbd:{}: {op} offset={offset} len={len}", self.spec);
        match e.0 {
            // Our own deadline (ffi::Image::submit): the guest sees EIO.
            libc::ETIMEDOUT => {
                let secs = self.timeout.map_or(0.0, |t| t.as_secs_f64());
                let (n, _) = self.image.abandoned();
                let msg = format!(
                    "{base}: the cluster did not answer within {secs} s (--backend-timeout; OSD down, \
                     network cut?): failed with EIO. The request stays queued in librbd and is dropped \
                     when it completes ({n} such requests outstanding)"
                );
                tracing::error!("{msg}");
                BackendError::new(
                    ErrorKind::Timeout,
                    msg,
                    io::Error::from_raw_os_error(libc::EIO),
                )
            }
            // A request reaching past the end of a shrunk image (librbd clips or refuses it).
            libc::EINVAL if self.current_size() < self.size => BackendError::new(
                ErrorKind::Io,
                format!(
                    "{base}: refused by librbd; the image was shrunk to {} bytes while served",
                    self.current_size()
                ),
                io::Error::from_raw_os_error(libc::EIO),
            ),
            libc::EROFS => BackendError::new(
                ErrorKind::ReadOnly,
                format!("{base}: refused (the image's lock is not ours: another client took it?)"),
                e.io_error(),
            ),
            // EBLOCKLISTED: another client broke our lock and fenced us off.
            libc::ESHUTDOWN => BackendError::new(
                ErrorKind::ReadOnly,
                format!(
                    "{base}: this client was blocklisted (another client broke the image's lock)"
                ),
                e.io_error(),
            ),
            _ => BackendError::from_io(base, e.io_error()),
        }
    }

    /// Parses our change marker: (snapshot name, snapshot id, generation).
    fn parse_marker(marker: &str) -> Option<(&str, u64, u64)> {
        let rest = marker.strip_prefix("rbd-snap:")?;
        let (name, rest) = rest.split_once(':')?;
        let (id, gen) = rest.split_once(":gen=")?;
        Some((name, id.parse().ok()?, gen.parse().ok()?))
    }

    fn remove_snap_logged(&self, name: &str) {
        match self.image.snap_remove(name) {
            Ok(()) => {
                tracing::debug!(image = %self.spec, snap = name, "removed change-marker snapshot")
            }
            Err(e) => tracing::warn!(image = %self.spec, snap = name, error = %e,
                "cannot remove a change-marker snapshot; remove it by hand (rbd snap rm)"),
        }
    }
}

impl BlockIo for RbdBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.image.read(offset, buf, self.timeout) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(BackendError::new(
                ErrorKind::Io,
                format!(
                    "rbd:{}: read offset={offset} len={len}: short read of {n} bytes",
                    self.spec
                ),
                io::Error::from_raw_os_error(libc::EIO),
            )),
            Err(e) => Err(self.io_err("read", offset, len, e)),
        }
    }

    fn read_async(&self, offset: u64, dst: crate::aio::BufSlice) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            let len = dst.len() as u64;
            self.check_range("read", offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let (n, data) = self
                .image
                .read_owned(offset, dst.len(), self.timeout)
                .await
                .map_err(|e| self.io_err("read", offset, len, e))?;
            if n != dst.len() {
                return Err(BackendError::new(
                    ErrorKind::Io,
                    format!(
                        "rbd:{}: read offset={offset} len={len}: short read of {n} bytes",
                        self.spec
                    ),
                    io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            // SAFETY: the request owns `dst` while it runs (the data-path contract).
            unsafe { dst.request_bytes_mut() }.copy_from_slice(&data);
            Ok(())
        })
    }

    fn write_async(
        &self,
        offset: u64,
        src: crate::aio::BufSlice,
        mode: crate::io::WriteMode,
    ) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            let len = src.len() as u64;
            self.check_writable("write")?;
            self.check_range("write", offset, len)?;
            if len > 0 {
                let _lease = self.lease()?;
                // SAFETY: the request owns `src` while it runs; librbd gets a copy.
                let data = unsafe { src.request_bytes() };
                self.image
                    .write_copy(offset, data, self.timeout)
                    .await
                    .map_err(|e| self.io_err("write", offset, len, e))?;
            }
            if mode == crate::io::WriteMode::Durable {
                self.flush_async().await?;
            }
            Ok(())
        })
    }

    fn flush_async(&self) -> crate::io::IoFut<'_> {
        Box::pin(async move {
            if self.read_only || !self.flush_needed() {
                return Ok(());
            }
            let _lease = self.lease()?;
            self.image
                .flush_async(self.timeout)
                .await
                .map_err(|e| self.io_err("flush", 0, 0, e))
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_writable("write")?;
        self.check_range("write", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _lease = self.lease()?;
        self.image
            .write(offset, buf, self.timeout)
            .map_err(|e| self.io_err("write", offset, len, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || !self.flush_needed() {
            return Ok(());
        }
        let _lease = self.lease()?;
        self.image
            .flush(self.timeout)
            .map_err(|e| self.io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _lease = self.lease()?;
        self.image
            .discard(offset, len, self.timeout)
            .map_err(|e| self.io_err("discard", offset, len, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("write_zeroes")?;
        self.check_range("write_zeroes", offset, len)?;
        // size_t is 64-bit on every target librbd supports; split anyway rather than truncate.
        let max = usize::MAX as u64 & !4095;
        let _lease = self.lease()?;
        let (mut off, mut left) = (offset, len);
        while left > 0 {
            let n = left.min(max);
            self.image
                .write_zeroes(off, n as usize, self.timeout)
                .map_err(|e| self.io_err("write_zeroes", off, n, e))?;
            off += n;
            left -= n;
        }
        Ok(())
    }
}

impl Backend for RbdBackend {
    /// From `rbd_diff_iterate2` against nothing (see `allocation.rs`).
    fn allocation_map(&self) -> Option<&dyn AllocationMap> {
        Some(self)
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: "rbd".into(),
            name: self.spec.to_string(),
            size: self.size,
            fingerprint: match self.snap_id {
                Some(s) => format!("id={},snap_id={s}", self.image_id),
                None => format!("id={}", self.image_id),
            },
        }
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        Some(self)
    }

    fn exclusive_lock(&self) -> Option<&dyn ExclusiveLock> {
        Some(self)
    }

    fn resize_watch(&self) -> Option<&dyn ResizeWatch> {
        Some(self)
    }
}

impl ChangeTracking for RbdBackend {
    /// For a snapshot: its id (snapshots never change). For the image: a new
    /// snapshot `ublk-cache-GEN-CLIENT-TIME` of the current content (the cache has
    /// flushed everything and we hold the lock, so nobody wrote in between); older
    /// marker snapshots are removed, and the metadata records a clean detach.
    fn change_marker(&self) -> Result<Option<String>> {
        if let Some(id) = self.snap_id {
            return Ok(Some(format!("rbd-snapshot:{id}")));
        }
        if self.read_only {
            return Ok(Some(READ_ONLY_MARKER.to_string()));
        }
        if !self.holds_for_good() {
            // Handed over (or never claimed): the image is another server's now,
            // so neither a snapshot nor the owner record is ours to write.
            return Ok(Some(HANDED_OVER_MARKER.to_string()));
        }
        self.flush()?;
        let gen = *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            + 1;
        let name = format!(
            "{MARKER_SNAP_PREFIX}{gen}-{}-{}",
            self.cluster.instance_id(),
            unix_secs()
        );
        self.image.snap_create(&name).map_err(|e| {
            self.meta_err(&format!("creating the change-marker snapshot {name}"), e)
        })?;
        let id = self
            .image
            .snap_id(&name)
            .map_err(|e| self.meta_err(&format!("reading the id of snapshot {name}"), e))?;
        for old in self.marker_snapshots()? {
            if old != name {
                self.remove_snap_logged(&old);
            }
        }
        self.set_owner("detached", gen)?;
        tracing::info!(image = %self.spec, snap = %name, generation = gen, "recorded the change marker");
        Ok(Some(format!("rbd-snap:{name}:{id}:gen={gen}")))
    }

    /// Diffs the marker snapshot against the current image, then removes it (a
    /// snapshot costs copy-on-write on every first write to an object).
    fn changes_since(&self, marker: &str) -> Result<BackendChanges> {
        if let Some(id) = marker.strip_prefix("rbd-snapshot:") {
            return Ok(match self.snap_id {
                Some(s) if id.parse() == Ok(s) => BackendChanges::Unchanged,
                _ => BackendChanges::Unknown,
            });
        }
        if marker == READ_ONLY_MARKER {
            tracing::info!(image = %self.spec,
                "this cache was filled over a read-only open of the image; treating the whole image as changed");
            return Ok(BackendChanges::Unknown);
        }
        if marker == HANDED_OVER_MARKER {
            tracing::info!(image = %self.spec,
                "this cache's server handed the image over in a live migration; treating the whole image as changed");
            return Ok(BackendChanges::Unknown);
        }
        let Some((name, id, gen)) = Self::parse_marker(marker) else {
            tracing::warn!(image = %self.spec, marker, "unrecognised change marker; treating the whole image as changed");
            return Ok(BackendChanges::Unknown);
        };
        if self.found_generation != Some(gen) {
            tracing::info!(image = %self.spec, recorded = gen, found = ?self.found_generation,
                last_owner = ?self.found_owner,
                "another ublk-cache attached this image since this cache detached; its writes show in the snapshot diff");
        }
        let snaps = self
            .image
            .snap_list()
            .map_err(|e| self.meta_err("listing snapshots", e))?;
        if !snaps.iter().any(|s| s.name == name && s.id == id) {
            tracing::warn!(image = %self.spec, snap = name,
                "the change-marker snapshot is gone (removed by hand or by another server's detach); \
                 treating the whole image as changed");
            return Ok(BackendChanges::Unknown);
        }
        let changes = match self.image.diff_since(name, 0, self.size) {
            Ok(mut ranges) => {
                ranges.sort_unstable();
                let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
                for (o, n) in ranges {
                    match merged.last_mut() {
                        Some((lo, ln)) if *lo + *ln >= o => *ln = (*ln).max(o + n - *lo),
                        _ => merged.push((o, n)),
                    }
                }
                let bytes: u64 = merged.iter().map(|r| r.1).sum();
                tracing::info!(image = %self.spec, snap = name, ranges = merged.len(), bytes,
                    "compared the image with the change marker");
                if merged.is_empty() {
                    BackendChanges::Unchanged
                } else {
                    BackendChanges::Ranges(merged)
                }
            }
            Err(e) => {
                tracing::warn!(image = %self.spec, snap = name, error = %e,
                    "cannot diff against the change-marker snapshot; treating the whole image as changed");
                BackendChanges::Unknown
            }
        };
        self.remove_snap_logged(name);
        Ok(changes)
    }
}

impl ExclusiveLock for RbdBackend {
    /// `migrate-out`: lend the lock per write from now on (see `handover`).
    fn release_lock(&self) -> Result<()> {
        self.start_lending()
    }

    /// `migrate-abort` (or a destination taking over for good).
    fn acquire_lock(&self) -> Result<()> {
        self.stop_lending()
    }
}

impl ResizeWatch for RbdBackend {
    /// The image size last reported by the header watch: the size at open until
    /// someone resizes the image.
    fn current_size(&self) -> u64 {
        self.seen_size.load(Ordering::Acquire)
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        let w = self
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = w {
            drop(w.watch);
            w.stop.store(true, Ordering::Release);
            let _ = w.thread.join();
        }
        if self.locked.swap(false, Ordering::AcqRel) {
            match self.image.lock_release() {
                Ok(()) => tracing::info!(image = %self.spec, "released the image's exclusive lock"),
                Err(e) => tracing::warn!(image = %self.spec, error = %e,
                    "releasing the exclusive lock failed; it is freed when this client disconnects"),
            }
        }
    }
}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("image", &self.spec.to_string())
            .field("id", &self.image_id)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip() {
        assert_eq!(
            RbdBackend::parse_marker("rbd-snap:ublk-cache-3-4127-170000:12:gen=3"),
            Some(("ublk-cache-3-4127-170000", 12, 3))
        );
        assert_eq!(RbdBackend::parse_marker("mtime:5"), None);
        assert_eq!(RbdBackend::parse_marker("rbd-snap:x:y:gen=1"), None);
    }
}
