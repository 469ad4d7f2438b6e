//! ublk frontend: serves a [`BlockTarget`] as `/dev/ublkbN` through the Linux ublk
//! driver (`ublk_drv`), using the `libublk` crate (0.4.x) for the control and queue
//! plumbing.
//!
//! # Threading model
//!
//! * One **queue thread** per ublk hardware queue (`ublk-qN`). It owns that queue's
//!   io_uring (libublk keeps it thread-local), receives requests from the driver
//!   (`FETCH` / `COMMIT_AND_FETCH` uring_cmds), decodes and bounds-checks them and
//!   hands them to the worker pool. It never calls the target itself, so a slow
//!   engine never stalls a queue: up to `depth` requests per queue can be in flight.
//! * A shared **worker pool** (`ublk-wN`) fed by one crossbeam channel. Workers do the
//!   blocking [`BlockTarget`] calls, push `(tag, result)` onto the owning queue's
//!   completion channel and then write that queue's **eventfd**.
//! * Each queue thread keeps one io_uring `READ` armed on its eventfd, so a worker's
//!   completion wakes the queue thread out of `io_uring_enter`; it then drains the
//!   completion channel and commits every finished tag with `COMMIT_AND_FETCH`.
//! * The thread that calls [`serve`]/[`recover`] does all control commands (libublk's
//!   control ring is thread-local) and waits for a [`StopHandle`] request.
//!
//! Data buffers are one per tag (`max_io_bytes` each), owned by [`QueueShared`] so they
//! outlive the queue thread and any worker still holding a tag.
//!
//! # Stop kinds
//!
//! * [`StopHandle::stop`]: `STOP_DEV`. The kernel stops accepting new I/O, waits for the
//!   requests we hold (we keep serving them until it is done), then aborts the queues.
//!   [`serve`] returns [`ServeOutcome::Stopped`]; the device is *not* deleted yet, so
//!   the caller can write back dirty data first and then call [`StoppedDevice::delete`].
//! * [`StopHandle::detach`]: stop taking new requests, finish and commit the ones the
//!   workers hold, then leave everything else to the kernel. Requests the driver
//!   delivered after that are re-issued to the next daemon (`UBLK_F_USER_RECOVERY_REISSUE`).
//!   The device is **not** deleted. The kernel moves it to `QUIESCED` once this
//!   process's references to `/dev/ublkcN` are gone, i.e. **when the process exits**:
//!   detach is meant to be followed by process exit and a [`recover`] in the next process.
//!
//! # Recovery (libublk 0.4.8)
//!
//! [`recover`] builds a `UblkCtrl` with `UblkFlags::UBLK_DEV_F_RECOVER_DEV` and the
//! device's real queue count/depth (read first with `UblkCtrl::new_simple`), calls
//! `UblkCtrl::start_user_recover()` (`UBLK_U_CMD_START_USER_RECOVERY`, retried on
//! `EBUSY` for up to 30 s while the old daemon's references drain), starts the queues
//! and calls `UblkCtrl::start_dev()`, which sends `UBLK_U_CMD_END_USER_RECOVERY` (instead
//! of `START_DEV`) because the device is `QUIESCED` and the control is in recover mode.
// TODO(lead): the lead is rewriting this file; document its `unsafe` blocks
// with `// SAFETY:` comments and drop this allow (its eventfd call lacks a SAFETY comment)
#![allow(clippy::undocumented_unsafe_blocks)]

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, BufDescList, UblkDev, UblkQueue};
use libublk::{sys, UblkFlags, UblkIORes, UblkUringData};
use tracing::{debug, error, info, warn};

use crate::target::{BlockTarget, TargetError};

const CONTROL_PATH: &str = "/dev/ublk-control";
const TARGET_NAME: &str = "ublk-cache";
const SECTOR: u64 = 512;
/// Largest single DISCARD / WRITE_ZEROES request we let the kernel send (1 GiB).
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;
const DISCARD_GRANULARITY: u32 = 4096;
/// user_data of the eventfd READ in a queue's io_uring (Target bit: not a ublk command).
const EVENTFD_USER_DATA: u64 = UblkUringData::Target as u64 | 0xEFD0_0000;
/// Largest per-request buffer libublk accepts.
const MAX_IO_BYTES_LIMIT: u32 = 32 << 20;

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

/// Errors of the ublk frontend. Messages name the problem and, where possible, the fix.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error(
        "{CONTROL_PATH} does not exist: the ublk driver is not loaded \
         (run `modprobe ublk_drv`; needs a kernel >= 6.0 built with CONFIG_BLK_DEV_UBLK)"
    )]
    ControlMissing,
    #[error("cannot open {CONTROL_PATH}: permission denied (run as root / with CAP_SYS_ADMIN)")]
    PermissionDenied,
    #[error("cannot open {CONTROL_PATH}: {0}")]
    ControlOpen(#[source] std::io::Error),
    #[error("invalid ublk options: {0}")]
    InvalidConfig(String),
    #[error("ublk device id {0} is already in use")]
    IdInUse(i32),
    #[error("ublk device {0} does not exist")]
    NoSuchDevice(u32),
    #[error("ublk device {id} cannot be recovered: {reason}")]
    NotRecoverable { id: u32, reason: String },
    #[error("ublk {op} failed: {detail}")]
    Ctrl {
        op: &'static str,
        detail: String,
        errno: Option<i32>,
    },
    #[error("ublk queue {qid} failed: {detail} (device left in place for `recover`)")]
    QueueFailed { qid: u16, detail: String },
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl UblkError {
    fn ctrl(op: &'static str, e: libublk::UblkError) -> Self {
        let errno = lib_errno(&e);
        let detail = match errno {
            Some(n) => format!(
                "{} ({})",
                std::io::Error::from_raw_os_error(n),
                errno_name(n)
            ),
            None => format!("{e:?}"),
        };
        UblkError::Ctrl { op, detail, errno }
    }

    /// Positive errno behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            UblkError::Ctrl { errno, .. } => *errno,
            UblkError::ControlMissing => Some(libc::ENOENT),
            UblkError::PermissionDenied => Some(libc::EACCES),
            UblkError::IdInUse(_) => Some(libc::EEXIST),
            UblkError::NoSuchDevice(_) => Some(libc::ENODEV),
            UblkError::Os { source, .. } | UblkError::ControlOpen(source) => source.raw_os_error(),
            _ => None,
        }
    }
}

fn lib_errno(e: &libublk::UblkError) -> Option<i32> {
    match e {
        libublk::UblkError::UringIOError(n) | libublk::UblkError::OtherError(n) => Some(n.abs()),
        libublk::UblkError::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

fn errno_name(n: i32) -> &'static str {
    match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "errno",
    }
}

// ---------------------------------------------------------------------------------
// Public API types
// ---------------------------------------------------------------------------------

/// How to create the device. For [`recover`], only `id` (required) and `workers` are
/// used: queue count, depth and max I/O size are the existing device's.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Explicit device id (`/dev/ublkbN`); `None` lets the kernel pick one.
    pub id: Option<i32>,
    /// Hardware queues (default `min(nr_cpus, 4)`).
    pub queues: u16,
    /// Requests in flight per queue (default 128).
    pub depth: u16,
    /// Largest request in bytes; one buffer this big per tag (default 512 KiB).
    pub max_io_bytes: u32,
    /// Threads calling the target; 0 = `min(queues * depth, 64)`.
    pub workers: usize,
}

impl Default for UblkOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Self {
            id: None,
            queues: cpus.clamp(1, 4) as u16,
            depth: 128,
            max_io_bytes: 512 << 10,
            workers: 0,
        }
    }
}

/// Kernel state of a ublk device (`ublksrv_ctrl_dev_info.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Stopped (or never started): no block device, cannot be recovered.
    Dead,
    /// Served by a daemon.
    Live,
    /// Daemon gone, I/O is queued until a daemon recovers it.
    Quiesced,
    /// Daemon gone, I/O fails until a daemon recovers it (`UBLK_F_USER_RECOVERY_FAIL_IO`).
    FailIo,
    Unknown(u16),
}

impl DeviceState {
    fn from_raw(s: u16) -> Self {
        match s as u32 {
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Unknown(s),
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Dead => f.write_str("DEAD"),
            DeviceState::Live => f.write_str("LIVE"),
            DeviceState::Quiesced => f.write_str("QUIESCED"),
            DeviceState::FailIo => f.write_str("FAIL_IO"),
            DeviceState::Unknown(s) => write!(f, "UNKNOWN({s})"),
        }
    }
}

/// What the kernel says about one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: u32,
    /// `/dev/ublkbN`
    pub bdev: PathBuf,
    /// `/dev/ublkcN`
    pub cdev: PathBuf,
    pub state: DeviceState,
    /// Pid of the daemon that started/recovered the device (may be dead).
    pub daemon_pid: i32,
    /// Whether `daemon_pid` is a live process right now.
    pub daemon_alive: bool,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// Size in bytes (from the device parameters; 0 if unavailable).
    pub size: u64,
    /// `UBLK_F_*` flags of the device.
    pub flags: u64,
    /// Whether a daemon can take over after a crash (`UBLK_F_USER_RECOVERY`).
    pub recoverable: bool,
}

fn device_info_from(info: &sys::ublksrv_ctrl_dev_info, size: u64) -> DeviceInfo {
    let pid = info.ublksrv_pid;
    DeviceInfo {
        id: info.dev_id,
        bdev: PathBuf::from(format!("/dev/ublkb{}", info.dev_id)),
        cdev: PathBuf::from(format!("/dev/ublkc{}", info.dev_id)),
        state: DeviceState::from_raw(info.state),
        daemon_pid: pid,
        // SAFETY: kill with signal 0 only checks that the process exists.
        daemon_alive: pid > 0 && unsafe { libc::kill(pid, 0) } == 0,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io_bytes: info.max_io_buf_bytes,
        size,
        flags: info.flags,
        recoverable: info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0,
    }
}

/// Which stop was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Clean stop: finish in-flight I/O, stop the device (delete it later).
    Stop,
    /// Leave the device for a successor daemon ([`recover`]).
    Detach,
}

/// Asks a running [`serve`]/[`recover`] to stop. Cheap to clone; `stop`/`detach` only
/// store an atomic, so they may be called from any thread, even a signal handler.
/// The first request wins. [`serve`] notices it within ~50 ms.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicU8>);

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn stop(&self) {
        let _ = self
            .0
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }
    pub fn detach(&self) {
        let _ = self
            .0
            .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
    }
    pub fn requested(&self) -> Option<StopKind> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopKind::Stop),
            2 => Some(StopKind::Detach),
            _ => None,
        }
    }
}

/// Why the serving loop ended with the device stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// [`StopHandle::stop`].
    Requested,
    /// Someone else stopped or deleted the device (e.g. `ublk del`).
    External,
}

/// How [`serve`]/[`recover`] ended.
#[derive(Debug)]
pub enum ServeOutcome {
    /// The device is stopped (`DEAD`, `/dev/ublkbN` gone, no I/O in flight) but still
    /// exists; write back, then call [`StoppedDevice::delete`] (dropping it deletes too).
    Stopped {
        device: StoppedDevice,
        reason: StopReason,
    },
    /// The device was left in place; exit the process, then [`recover`] it.
    Detached { id: u32 },
}

/// A stopped, not yet deleted device.
pub struct StoppedDevice {
    id: u32,
    ctrl: Option<Box<UblkCtrl>>,
}

impl std::fmt::Debug for StoppedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppedDevice")
            .field("id", &self.id)
            .field("deleted", &self.ctrl.is_none())
            .finish()
    }
}

impl StoppedDevice {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `DEL_DEV`: removes `/dev/ublkcN` and the device id. A device that is already gone
    /// counts as deleted.
    pub fn delete(mut self) -> Result<(), UblkError> {
        self.delete_inner()
    }

    fn delete_inner(&mut self) -> Result<(), UblkError> {
        let Some(ctrl) = self.ctrl.take() else {
            return Ok(());
        };
        ensure_ctrl_ring()?;
        let res = match ctrl.del_dev() {
            Ok(_) => Ok(()),
            Err(e) if matches!(lib_errno(&e), Some(libc::ENODEV) | Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(UblkError::ctrl("DEL_DEV", e)),
        };
        // Dropping a for-add control deletes again (no-op once marked deleted); make
        // sure a failed delete does not run again from Drop on some other thread.
        ctrl.disown();
        drop(ctrl);
        if res.is_ok() {
            info!(id = self.id, "ublk device deleted");
        }
        res
    }
}

impl Drop for StoppedDevice {
    fn drop(&mut self) {
        if self.ctrl.is_some() {
            if let Err(e) = self.delete_inner() {
                error!(id = self.id, "deleting stopped ublk device failed: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Control helpers
// ---------------------------------------------------------------------------------

/// libublk's control commands go through a thread-local io_uring; make sure the calling
/// thread has one (the constructors create it only on the thread that built the ctrl).
fn ensure_ctrl_ring() -> Result<(), UblkError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| UblkError::ctrl("control ring setup", e))
}

/// Fail early, with a useful message, when the driver is missing or not usable.
pub fn check_control() -> Result<(), UblkError> {
    if !Path::new(CONTROL_PATH).exists() {
        return Err(UblkError::ControlMissing);
    }
    match OpenOptions::new().read(true).write(true).open(CONTROL_PATH) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(UblkError::PermissionDenied)
        }
        Err(e) => Err(UblkError::ControlOpen(e)),
    }
}

fn open_existing(id: u32) -> Result<UblkCtrl, UblkError> {
    ensure_ctrl_ring()?;
    UblkCtrl::new_simple(id as i32).map_err(|e| match lib_errno(&e) {
        Some(libc::ENODEV) | Some(libc::ENOENT) => UblkError::NoSuchDevice(id),
        _ => UblkError::ctrl("GET_DEV_INFO", e),
    })
}

fn read_size(ctrl: &UblkCtrl) -> Option<u64> {
    let mut p = sys::ublk_params::default();
    ctrl.get_params(&mut p).ok()?;
    Some(p.basic.dev_sectors << 9)
}

/// State, daemon pid, size... of one device.
pub fn device_info(id: u32) -> Result<DeviceInfo, UblkError> {
    check_control()?;
    let ctrl = open_existing(id)?;
    ctrl.read_dev_info()
        .map_err(|e| UblkError::ctrl("GET_DEV_INFO", e))?;
    let size = read_size(&ctrl).unwrap_or(0);
    Ok(device_info_from(&ctrl.dev_info(), size))
}

/// All ublk devices (of any daemon), sorted by id. Ids come from `/sys/class/ublk-char`,
/// details from `GET_DEV_INFO` / `GET_PARAMS`.
pub fn list_devices() -> Result<Vec<DeviceInfo>, UblkError> {
    check_control()?;
    let mut ids = Vec::new();
    match std::fs::read_dir("/sys/class/ublk-char") {
        Ok(rd) => {
            for ent in rd.flatten() {
                let name = ent.file_name();
                if let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("ublkc"))
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    ids.push(id);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(UblkError::Os {
                op: "reading /sys/class/ublk-char",
                source: e,
            })
        }
    }
    ids.sort_unstable();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match device_info(id) {
            Ok(i) => out.push(i),
            // Deleted between readdir and query.
            Err(UblkError::NoSuchDevice(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// `DEL_DEV` on any device (stops it first if live; queued I/O of a quiesced device fails).
pub fn delete_device(id: u32) -> Result<(), UblkError> {
    check_control()?;
    let ctrl = open_existing(id)?;
    match ctrl.del_dev() {
        Ok(_) => Ok(()),
        Err(e) if matches!(lib_errno(&e), Some(libc::ENODEV) | Some(libc::ENOENT)) => Ok(()),
        Err(e) => Err(UblkError::ctrl("DEL_DEV", e)),
    }
}

// ---------------------------------------------------------------------------------
// Request decoding (pure, unit-tested)
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Req {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
}

/// Turn a ublk io descriptor into a request, or the `-errno` to complete it with.
pub(crate) fn decode(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    dev_size: u64,
    buf_len: usize,
) -> Result<Req, i32> {
    let op = op_flags & 0xff;
    let kind = match op {
        sys::UBLK_IO_OP_READ => ReqKind::Read,
        sys::UBLK_IO_OP_WRITE => ReqKind::Write {
            fua: op_flags & sys::UBLK_IO_F_FUA != 0,
        },
        sys::UBLK_IO_OP_FLUSH => ReqKind::Flush,
        sys::UBLK_IO_OP_DISCARD => ReqKind::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => ReqKind::WriteZeroes,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if kind == ReqKind::Flush {
        return Ok(Req {
            kind,
            offset: 0,
            len: 0,
        });
    }
    let offset = start_sector.checked_mul(SECTOR).ok_or(-libc::EINVAL)?;
    let len = nr_sectors as u64 * SECTOR;
    let end = offset.checked_add(len).ok_or(-libc::EINVAL)?;
    if end > dev_size {
        return Err(-libc::EINVAL);
    }
    if matches!(kind, ReqKind::Read | ReqKind::Write { .. }) && len > buf_len as u64 {
        return Err(-libc::EINVAL);
    }
    Ok(Req { kind, offset, len })
}

/// `-errno` for the ublk edge; never 0 or positive for an error.
pub(crate) fn neg_errno(e: &TargetError) -> i32 {
    let n = e.errno();
    if n > 0 && n < 4096 {
        -n
    } else {
        -libc::EIO
    }
}

/// Run one request against the target. Returns bytes (READ/WRITE) or 0, or `-errno`.
/// `buf` is the tag's buffer, at least `req.len` long for READ/WRITE.
pub(crate) fn execute(target: &dyn BlockTarget, req: &Req, buf: &mut [u8]) -> i32 {
    let len = req.len as usize;
    let r = match req.kind {
        ReqKind::Read => target.read(req.offset, &mut buf[..len]).map(|_| len as i32),
        ReqKind::Write { fua } => target
            .write(req.offset, &buf[..len], fua)
            .map(|_| len as i32),
        ReqKind::Flush => target.flush().map(|_| 0),
        ReqKind::Discard => target.discard(req.offset, req.len).map(|_| 0),
        ReqKind::WriteZeroes => target.write_zeroes(req.offset, req.len).map(|_| 0),
    };
    match r {
        Ok(v) => v,
        Err(e) => {
            warn!(?req, "target error: {e}");
            neg_errno(&e)
        }
    }
}

// ---------------------------------------------------------------------------------
// Per-queue shared state, workers
// ---------------------------------------------------------------------------------

/// What a queue thread shares with the workers and with the controlling thread.
pub(crate) struct QueueShared {
    qid: u16,
    /// Written (8 bytes) by workers after pushing a completion, and by the controller
    /// to deliver a detach request.
    efd: OwnedFd,
    /// Target of the armed io_uring READ on `efd`. Lives as long as this struct, which
    /// outlives the queue thread's io_uring.
    efd_buf: Box<std::cell::UnsafeCell<u64>>,
    done_tx: Sender<(u16, i32)>,
    done_rx: Receiver<(u16, i32)>,
    /// Requests handed to workers whose completion the queue thread has not taken yet.
    pending: AtomicUsize,
    detach: AtomicBool,
    /// One buffer per tag; the kernel copies WRITE data in / READ data out of it.
    bufs: Vec<IoBuf<u8>>,
}

// SAFETY: efd_buf is only written by the kernel (through io_uring) and never read or
// written by Rust code; everything else is Sync.
unsafe impl Sync for QueueShared {}

impl QueueShared {
    pub(crate) fn new(qid: u16, depth: u16, buf_bytes: usize) -> Result<Self, UblkError> {
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(UblkError::Os {
                op: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Ok(Self {
            qid,
            // SAFETY: fd is a fresh, valid eventfd that nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            efd_buf: Box::new(std::cell::UnsafeCell::new(0)),
            done_tx,
            done_rx,
            pending: AtomicUsize::new(0),
            detach: AtomicBool::new(false),
            bufs: (0..depth).map(|_| IoBuf::<u8>::new(buf_bytes)).collect(),
        })
    }

    pub(crate) fn kick(&self) {
        let one: u64 = 1;
        // EAGAIN only if the counter is about to overflow, i.e. a wakeup is pending anyway.
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const _, 8) };
    }

    fn buf_ptr(&self, tag: u16) -> *mut u8 {
        self.bufs[tag as usize].as_mut_ptr()
    }
}

pub(crate) struct Job {
    pub q: Arc<QueueShared>,
    pub tag: u16,
    pub req: Req,
}

pub(crate) fn worker_loop(rx: Receiver<Job>, target: Arc<dyn BlockTarget>) {
    while let Ok(job) = rx.recv() {
        let q = &job.q;
        let res = catch_unwind(AssertUnwindSafe(|| {
            let len = match job.req.kind {
                ReqKind::Read | ReqKind::Write { .. } => job.req.len as usize,
                _ => 0,
            };
            // SAFETY: from dispatch until the queue thread takes this completion, the tag
            // (and so its buffer) belongs to this worker alone: the queue thread does not
            // touch it and the kernel does not reuse it before COMMIT. `len` was checked
            // against the buffer size in `decode`.
            let buf = unsafe { std::slice::from_raw_parts_mut(q.buf_ptr(job.tag), len) };
            execute(&*target, &job.req, buf)
        }))
        .unwrap_or_else(|_| {
            error!(qid = q.qid, tag = job.tag, req = ?job.req, "target panicked; failing request with EIO");
            -libc::EIO
        });
        // Order matters: completion first, then `pending`, then the wakeup, so the queue
        // thread never sees pending == 0 with a completion still to come.
        let _ = q.done_tx.send((job.tag, res));
        q.pending.fetch_sub(1, Ordering::AcqRel);
        q.kick();
    }
}

// ---------------------------------------------------------------------------------
// Queue thread
// ---------------------------------------------------------------------------------

enum QueueExit {
    /// The driver aborted the queue (device stopped or deleted).
    Down,
    /// Detach finished; the UblkQueue was leaked on purpose.
    Detached,
}

fn arm_eventfd(q: &UblkQueue, shared: &QueueShared) -> Result<(), libublk::UblkError> {
    let sqe = io_uring::opcode::Read::new(
        io_uring::types::Fd(shared.efd.as_raw_fd()),
        shared.efd_buf.get() as *mut u8,
        8,
    )
    .build()
    .user_data(EVENTFD_USER_DATA);
    q.ublk_submit_sqe_sync(sqe)?;
    // Submit now: libublk's wait treats a non-empty SQ after the queue was aborted as
    // "more to wait for", which would delay shutdown by its 20 s idle timeout.
    libublk::io::with_task_io_ring_mut(|r| r.submit()).map_err(libublk::UblkError::IOError)?;
    Ok(())
}

fn commit(q: &UblkQueue, shared: &QueueShared, tag: u16, res: i32) {
    let buf = shared.bufs[tag as usize].as_slice();
    if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
    {
        error!(
            qid = shared.qid,
            tag, "COMMIT_AND_FETCH failed to queue: {e:?}"
        );
    }
}

fn queue_main(
    qid: u16,
    dev: &UblkDev,
    shared: &Arc<QueueShared>,
    dev_size: u64,
    jobs: &Sender<Job>,
) -> Result<QueueExit, String> {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            // Unblocks start_dev(), which waits for every queue's buffer registration.
            dev.notify_buffer_registration_complete(true);
            return Err(format!("creating queue: {e:?}"));
        }
    };
    // Registers the per-tag buffers (that is what start_dev waits for) and queues one
    // FETCH per tag; they reach the kernel with the first io_uring_enter below.
    let q = q
        .submit_fetch_commands_unified(BufDescList::Slices(Some(&shared.bufs)))
        .map_err(|e| format!("queueing FETCH commands: {e:?}"))?;
    arm_eventfd(&q, shared).map_err(|e| format!("arming eventfd: {e:?}"))?;

    let depth = dev.dev_info.queue_depth;
    let buf_len = dev.dev_info.max_io_buf_bytes as usize;
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(depth as usize + 1);
    let mut detaching = false;
    let mut deferred = 0usize; // requests left to the next daemon while detaching

    let exit = loop {
        cqes.clear();
        let r = q.flush_and_wake_io_tasks(
            |user_data, cqe, _last| cqes.push((user_data, cqe.result())),
            1,
        );

        let mut kicked = false;
        for &(ud, res) in &cqes {
            if ud == EVENTFD_USER_DATA {
                kicked = true;
                if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                    warn!(qid, "eventfd read failed: {res}");
                }
                continue;
            }
            if ud & UblkUringData::Target as u64 != 0 {
                continue;
            }
            let tag = (ud & 0xffff) as u16;
            if res == sys::UBLK_IO_RES_ABORT {
                continue; // queue is going down; libublk tracks that
            }
            if res != sys::UBLK_IO_RES_OK as i32 {
                error!(qid, tag, "ublk io command failed: {res}");
                continue;
            }
            if tag >= depth {
                error!(qid, tag, "ublk driver sent tag beyond queue depth");
                continue;
            }
            if detaching {
                // Leave it un-completed: the kernel re-issues it to the next daemon.
                deferred += 1;
                continue;
            }
            let iod = q.get_iod(tag);
            match decode(
                iod.op_flags,
                iod.start_sector,
                iod.nr_sectors,
                dev_size,
                buf_len,
            ) {
                Err(e) => commit(&q, shared, tag, e),
                Ok(req) => {
                    shared.pending.fetch_add(1, Ordering::AcqRel);
                    if let Err(err) = jobs.send(Job {
                        q: Arc::clone(shared),
                        tag,
                        req,
                    }) {
                        drop(err);
                        shared.pending.fetch_sub(1, Ordering::AcqRel);
                        commit(&q, shared, tag, -libc::EIO);
                    }
                }
            }
        }

        // Commit whatever the workers finished (also when only a stray wakeup came).
        for (tag, res) in shared.done_rx.try_iter() {
            commit(&q, shared, tag, res);
        }
        if kicked {
            if let Err(e) = arm_eventfd(&q, shared) {
                break Err(format!("re-arming eventfd: {e:?}"));
            }
        }

        match r {
            Ok(_) => {}
            Err(libublk::UblkError::QueueIsDown) => break Ok(QueueExit::Down),
            Err(e) => break Err(format!("io_uring wait: {e:?}")),
        }

        if !detaching && shared.detach.load(Ordering::Acquire) {
            detaching = true;
            debug!(qid, "detaching: no new requests, finishing in-flight ones");
        }
        if detaching && shared.pending.load(Ordering::Acquire) == 0 && shared.done_rx.is_empty() {
            // Push the last commits to the kernel before we go.
            let _ = libublk::io::with_task_io_ring_mut(|r| r.submit());
            break Ok(QueueExit::Detached);
        }
    };

    // Never leave while a worker still owns one of our tags: whatever happens to the
    // device, the buffers must stay valid (they do: `shared` owns them) and the final
    // completions must be accounted for.
    let mut waited = Instant::now();
    while shared.pending.load(Ordering::Acquire) != 0 {
        std::thread::sleep(Duration::from_millis(1));
        if waited.elapsed() > Duration::from_secs(10) {
            warn!(
                qid,
                pending = shared.pending.load(Ordering::Acquire),
                "still waiting for target requests"
            );
            waited = Instant::now();
        }
    }
    let late: Vec<_> = shared.done_rx.try_iter().collect();
    if !late.is_empty() {
        if !q.is_stopping() {
            for (tag, res) in late {
                commit(&q, shared, tag, res);
            }
            let _ = libublk::io::with_task_io_ring_mut(|r| r.submit());
        } else {
            debug!(qid, n = late.len(), "completions after queue abort dropped");
        }
    }

    match exit {
        Ok(QueueExit::Detached) | Err(_) => {
            if deferred > 0 {
                info!(qid, deferred, "requests left for the next daemon");
            }
            // Dropping the queue would unregister io_uring files while FETCH commands are
            // still pending (older kernels wait for them forever) and unmap the
            // descriptors. Leak it instead: the kernel cleans up at thread / process
            // exit, exactly as after a crash, and re-issues what we did not complete.
            std::mem::forget(q);
            exit
        }
        Ok(QueueExit::Down) => Ok(QueueExit::Down),
    }
}

// ---------------------------------------------------------------------------------
// serve / recover
// ---------------------------------------------------------------------------------

fn validate(opts: &UblkOptions, size: u64) -> Result<(), UblkError> {
    let bad = |m: String| Err(UblkError::InvalidConfig(m));
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return bad(format!(
            "target size {size} is not a positive multiple of 512"
        ));
    }
    if opts.queues == 0 || opts.queues as u32 > sys::UBLK_MAX_NR_QUEUES {
        return bad(format!(
            "queues {} not in 1..={}",
            opts.queues,
            sys::UBLK_MAX_NR_QUEUES
        ));
    }
    if opts.depth == 0 || opts.depth as u32 > sys::UBLK_MAX_QUEUE_DEPTH {
        return bad(format!(
            "depth {} not in 1..={}",
            opts.depth,
            sys::UBLK_MAX_QUEUE_DEPTH
        ));
    }
    if opts.max_io_bytes < 4096
        || !opts.max_io_bytes.is_multiple_of(4096)
        || opts.max_io_bytes > MAX_IO_BYTES_LIMIT
    {
        return bad(format!(
            "max_io_bytes {} must be a multiple of 4096 in 4096..={MAX_IO_BYTES_LIMIT}",
            opts.max_io_bytes
        ));
    }
    if let Some(id) = opts.id {
        if id < 0 {
            return bad(format!("device id {id} is negative"));
        }
    }
    Ok(())
}

fn set_params(dev: &mut UblkDev, size: u64) {
    let info = dev.dev_info;
    dev.tgt.dev_size = size;
    // Room for every COMMIT_AND_FETCH plus the eventfd read.
    dev.tgt.sq_depth = info.queue_depth.saturating_mul(2);
    dev.tgt.cq_depth = info.queue_depth.saturating_mul(2);
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: info.max_io_buf_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: DISCARD_GRANULARITY,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    };
}

/// Create a new device for `target` and serve it until `stop` asks otherwise (or the
/// device is stopped from outside). `on_live` runs once `/dev/ublkbN` exists.
pub fn serve(
    target: Arc<dyn BlockTarget>,
    opts: &UblkOptions,
    on_live: impl FnOnce(&DeviceInfo),
    stop: StopHandle,
) -> Result<ServeOutcome, UblkError> {
    check_control()?;
    let size = target.size();
    validate(opts, size)?;
    ensure_ctrl_ring()?;

    let mut flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    if let Some(f) = UblkCtrl::get_features() {
        flags |= f & sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
    }
    let id = opts.id.unwrap_or(-1);
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| match lib_errno(&e) {
            Some(libc::EEXIST) => UblkError::IdInUse(id),
            _ => UblkError::ctrl("ADD_DEV", e),
        })?;
    let info = ctrl.dev_info();
    if info.flags & sys::UBLK_F_USER_RECOVERY_REISSUE as u64 == 0 {
        warn!(
            id = info.dev_id,
            flags = info.flags,
            "driver did not accept UBLK_F_USER_RECOVERY_REISSUE; in-flight I/O fails if the daemon dies"
        );
    }
    info!(
        id = info.dev_id,
        queues = info.nr_hw_queues,
        depth = info.queue_depth,
        "ublk device added"
    );
    run(ctrl, target, opts, on_live, stop, false)
}

/// Take over device `opts.id` after its daemon died (or detached): the device keeps its
/// `/dev/ublkbN`, and the requests that were queued or in flight are served by `target`.
pub fn recover(
    target: Arc<dyn BlockTarget>,
    opts: &UblkOptions,
    on_live: impl FnOnce(&DeviceInfo),
    stop: StopHandle,
) -> Result<ServeOutcome, UblkError> {
    check_control()?;
    let id = match opts.id {
        Some(id) if id >= 0 => id as u32,
        _ => return Err(UblkError::InvalidConfig("recover needs a device id".into())),
    };
    let size = target.size();

    // Look first: queue count/depth/buffer size must be the device's, not ours.
    let probe = open_existing(id)?;
    let info = probe.dev_info();
    let dev_size = read_size(&probe);
    drop(probe);
    let not = |reason: String| UblkError::NotRecoverable { id, reason };
    if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(not("it was created without UBLK_F_USER_RECOVERY".into()));
    }
    match DeviceState::from_raw(info.state) {
        DeviceState::Dead => {
            return Err(not(
                "it is DEAD (stopped); delete it and create a new one".into()
            ))
        }
        DeviceState::Live => {
            let pid = info.ublksrv_pid;
            // SAFETY: kill with signal 0 only checks that the process exists.
            if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && pid != std::process::id() as i32 {
                return Err(not(format!("it is LIVE and served by running pid {pid}")));
            }
            // Daemon gone but the kernel has not quiesced yet: start_user_recover waits.
        }
        _ => {}
    }
    match dev_size {
        Some(s) if s == size => {}
        Some(s) => {
            return Err(not(format!(
                "device size {s} differs from target size {size}"
            )))
        }
        None => return Err(not("cannot read its parameters".into())),
    }
    let mut o = opts.clone();
    o.queues = info.nr_hw_queues;
    o.depth = info.queue_depth;
    o.max_io_bytes = info.max_io_buf_bytes;

    ensure_ctrl_ring()?;
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| UblkError::ctrl("GET_DEV_INFO (recover)", e))?;
    // START_USER_RECOVERY; libublk retries EBUSY (old daemon still releasing) for 30 s.
    match ctrl.start_user_recover() {
        Ok(r) if r >= 0 => {}
        Ok(r) => {
            return Err(UblkError::Ctrl {
                op: "START_USER_RECOVERY",
                detail: format!(
                    "still {} after 30 s (old daemon not gone?)",
                    std::io::Error::from_raw_os_error(-r)
                ),
                errno: Some(-r),
            })
        }
        Err(e) => return Err(UblkError::ctrl("START_USER_RECOVERY", e)),
    }
    info!(id, "ublk user recovery started");
    run(ctrl, target, &o, on_live, stop, true)
}

enum QueueEvent {
    Started {
        qid: u16,
        tid: i32,
    },
    Exited {
        qid: u16,
        result: Result<QueueExit, String>,
    },
}

/// Everything `run` started, so every exit path can take it down in order.
struct Running {
    dev: Arc<UblkDev>,
    shared: Vec<Arc<QueueShared>>,
    queue_threads: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    jobs: Option<Sender<Job>>,
    events: Receiver<QueueEvent>,
    exited: Vec<bool>,
    first_failure: Option<(u16, String)>,
}

impl Running {
    /// Record a queue event; for an exit, returns `(qid, failed)`.
    fn note(&mut self, ev: QueueEvent) -> Option<(u16, bool)> {
        let QueueEvent::Exited { qid, result } = ev else {
            return None;
        };
        self.exited[qid as usize] = true;
        match result {
            Err(m) => {
                error!(qid, "queue thread failed: {m}");
                if self.first_failure.is_none() {
                    self.first_failure = Some((qid, m));
                }
                Some((qid, true))
            }
            Ok(_) => Some((qid, false)),
        }
    }

    fn all_exited(&self) -> bool {
        self.exited.iter().all(|&e| e)
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.note(ev);
        }
    }

    /// Wait up to `limit` for every queue thread to report its exit.
    fn wait_exited(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.all_exited() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .events
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(ev) => {
                    self.note(ev);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
        true
    }

    fn request_detach(&self) {
        for s in &self.shared {
            s.detach.store(true, Ordering::Release);
            s.kick();
        }
    }

    /// Join queue threads (they must be on their way out), then the workers.
    /// `leak_dev`: keep /dev/ublkcN open until process exit, consistent with the
    /// queues that were leaked on detach (see `queue_main`).
    fn finish(mut self, leak_dev: bool) {
        while !self.wait_exited(Duration::from_secs(10)) {
            warn!("still waiting for ublk queue threads to exit");
        }
        for h in self.queue_threads.drain(..) {
            let _ = h.join();
        }
        self.jobs = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        if leak_dev {
            std::mem::forget(Arc::clone(&self.dev));
        }
    }

    /// Take down a device that never went live. A new device is stopped (STOP_DEV also
    /// cancels pending FETCHes, so the queues exit cleanly and release /dev/ublkcN) and
    /// deleted when `ctrl` drops; a device being recovered is left quiesced.
    fn abort_before_live(mut self, ctrl: UblkCtrl, recovering: bool) {
        if !recovering {
            let stopped = ctrl.kill_dev().is_ok();
            if stopped && self.wait_exited(Duration::from_secs(5)) && self.first_failure.is_none() {
                self.finish(false);
                drop(ctrl); // DEL_DEV
                return;
            }
            error!(
                id = ctrl.dev_info().dev_id,
                "could not tear down the new ublk device cleanly; it is left behind \
                 (delete it after this process exits)"
            );
        }
        self.request_detach();
        self.finish(true);
        ctrl.disown();
    }
}

fn run(
    ctrl: UblkCtrl,
    target: Arc<dyn BlockTarget>,
    opts: &UblkOptions,
    on_live: impl FnOnce(&DeviceInfo),
    stop: StopHandle,
    recovering: bool,
) -> Result<ServeOutcome, UblkError> {
    let size = target.size();
    let info = ctrl.dev_info();
    let id = info.dev_id;
    let nr_queues = info.nr_hw_queues;
    let depth = info.queue_depth;
    let buf_bytes = info.max_io_buf_bytes as usize;

    // Opens /dev/ublkcN. On error `ctrl` drops here: a new device is deleted.
    let dev = UblkDev::new(
        TARGET_NAME.to_string(),
        |d| {
            set_params(d, size);
            Ok(())
        },
        &ctrl,
    )
    .map_err(|e| UblkError::ctrl("opening /dev/ublkcN", e))?;
    let dev = Arc::new(dev);

    let mut shared = Vec::with_capacity(nr_queues as usize);
    for qid in 0..nr_queues {
        shared.push(Arc::new(QueueShared::new(qid, depth, buf_bytes)?));
    }

    let nr_workers = if opts.workers == 0 {
        (nr_queues as usize * depth as usize).clamp(1, 64)
    } else {
        opts.workers
    };
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<QueueEvent>();
    let mut running = Running {
        dev: Arc::clone(&dev),
        shared,
        queue_threads: Vec::with_capacity(nr_queues as usize),
        workers: Vec::with_capacity(nr_workers),
        jobs: Some(job_tx),
        events: ev_rx,
        exited: vec![true; nr_queues as usize], // false once spawned
        first_failure: None,
    };

    let mut spawn_err = None;
    for i in 0..nr_workers {
        let rx = job_rx.clone();
        let t = Arc::clone(&target);
        match std::thread::Builder::new()
            .name(format!("ublk-w{i}"))
            .spawn(move || worker_loop(rx, t))
        {
            Ok(h) => running.workers.push(h),
            Err(e) => {
                spawn_err = Some(e);
                break;
            }
        }
    }
    drop(job_rx);
    if spawn_err.is_none() {
        for qid in 0..nr_queues {
            let dev = Arc::clone(&dev);
            let sh = Arc::clone(&running.shared[qid as usize]);
            let jobs = running.jobs.clone().expect("job sender");
            let ev = ev_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("ublk-q{qid}"))
                .spawn(move || {
                    let tid = UblkCtrl::init_queue_thread();
                    let _ = ev.send(QueueEvent::Started { qid, tid });
                    let result = queue_main(qid, &dev, &sh, size, &jobs);
                    drop(jobs);
                    let _ = ev.send(QueueEvent::Exited { qid, result });
                });
            match h {
                Ok(h) => {
                    running.queue_threads.push(h);
                    running.exited[qid as usize] = false;
                }
                Err(e) => {
                    spawn_err = Some(e);
                    break;
                }
            }
        }
    }
    drop(ev_tx);
    if let Some(e) = spawn_err {
        drop(dev);
        running.abort_before_live(ctrl, recovering);
        return Err(UblkError::Os {
            op: "spawning ublk threads",
            source: e,
        });
    }

    // Affinity + libublk's json export (/run/ublksrvd/N.json), from this thread.
    let mut started = 0;
    let mut early = Vec::new();
    while started < nr_queues {
        match running.events.recv() {
            Ok(QueueEvent::Started { qid, tid }) => {
                ctrl.set_thread_affinity(qid, tid);
                if let Err(e) = ctrl.configure_queue(&dev, qid, tid) {
                    warn!(qid, "configure_queue: {e:?}");
                }
                started += 1;
            }
            Ok(ev) => early.push(ev),
            Err(_) => break,
        }
    }
    for ev in early {
        running.note(ev);
    }

    // START_DEV, or END_USER_RECOVERY for a recovering device. Waits for every queue's
    // buffer registration, and in the kernel for every queue's FETCH commands.
    let start_res = if running.first_failure.is_none() {
        ctrl.start_dev(&dev).map(|_| ())
    } else {
        Err(libublk::UblkError::OtherError(-libc::EIO))
    };
    drop(dev);
    if let Err(e) = start_res {
        running.drain_events();
        let err = match running.first_failure.clone() {
            Some((qid, detail)) => UblkError::QueueFailed { qid, detail },
            None => UblkError::ctrl(
                if recovering {
                    "END_USER_RECOVERY"
                } else {
                    "START_DEV"
                },
                e,
            ),
        };
        running.abort_before_live(ctrl, recovering);
        return Err(err);
    }
    let _ = ctrl.read_dev_info();
    let live = device_info_from(&ctrl.dev_info(), size);
    info!(
        id,
        state = %live.state,
        pid = live.daemon_pid,
        recovered = recovering,
        "ublk device live: {}",
        live.bdev.display()
    );
    on_live(&live);

    let stopped = |ctrl: UblkCtrl, reason| ServeOutcome::Stopped {
        device: StoppedDevice {
            id,
            ctrl: Some(Box::new(ctrl)),
        },
        reason,
    };

    // Serve until asked to stop, or until the queues go away on their own.
    loop {
        match stop.requested() {
            Some(StopKind::Stop) => {
                info!(id, "stopping ublk device (in-flight I/O completes first)");
                // STOP_DEV returns once the disk is gone, i.e. after the kernel has
                // drained the requests our queues keep serving meanwhile; then it aborts
                // the queues and they exit.
                if let Err(e) = ctrl.kill_dev() {
                    error!(id, "STOP_DEV failed: {e:?}; detaching instead");
                    running.request_detach();
                    running.finish(true);
                    ctrl.disown();
                    return Err(UblkError::ctrl("STOP_DEV", e));
                }
                running.finish(false);
                info!(id, "ublk device stopped");
                return Ok(stopped(ctrl, StopReason::Requested));
            }
            Some(StopKind::Detach) => {
                info!(id, "detaching from ublk device (left for recovery)");
                running.request_detach();
                running.finish(true);
                ctrl.disown();
                return Ok(ServeOutcome::Detached { id });
            }
            None => {}
        }
        match running.events.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => {
                let Some((qid, failed)) = running.note(ev) else {
                    continue;
                };
                if failed {
                    // A dead queue's requests would hang forever; leave the device to a
                    // successor daemon instead of failing I/O.
                    running.request_detach();
                    let (q, detail) = running
                        .first_failure
                        .clone()
                        .unwrap_or((qid, "unknown".into()));
                    running.finish(true);
                    ctrl.disown();
                    return Err(UblkError::QueueFailed { qid: q, detail });
                }
                warn!(
                    id,
                    qid, "ublk queue aborted by the driver: device stopped from outside"
                );
                if !running.wait_exited(Duration::from_secs(10)) {
                    // Not all queues were aborted: odd. Their /dev/ublkcN references
                    // stay until process exit, so do not try DEL_DEV (it would wait).
                    error!(
                        id,
                        "some ublk queues were not aborted; leaving the device as is"
                    );
                    running.request_detach();
                    running.finish(true);
                    ctrl.disown();
                    return Ok(ServeOutcome::Stopped {
                        device: StoppedDevice { id, ctrl: None },
                        reason: StopReason::External,
                    });
                }
                running.finish(false);
                return Ok(stopped(ctrl, StopReason::External));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                running.finish(false);
                return Ok(stopped(ctrl, StopReason::External));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::TargetResult;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    #[test]
    fn decode_ops_and_bounds() {
        let size = 4 * MIB;
        let buf = 512 << 10;
        let r = decode(sys::UBLK_IO_OP_READ, 8, 8, size, buf).unwrap();
        assert_eq!(
            r,
            Req {
                kind: ReqKind::Read,
                offset: 4096,
                len: 4096
            }
        );
        let w = decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 0, 1, size, buf).unwrap();
        assert_eq!(w.kind, ReqKind::Write { fua: true });
        let w = decode(sys::UBLK_IO_OP_WRITE, 0, 1, size, buf).unwrap();
        assert_eq!(w.kind, ReqKind::Write { fua: false });
        assert_eq!(
            decode(sys::UBLK_IO_OP_FLUSH, 12345, 0, size, buf)
                .unwrap()
                .kind,
            ReqKind::Flush
        );
        // last sector ok, one past is not
        assert!(decode(sys::UBLK_IO_OP_READ, size / 512 - 1, 1, size, buf).is_ok());
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, size / 512, 1, size, buf),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE, size / 512 - 1, 2, size, buf),
            Err(-libc::EINVAL)
        );
        // overflow
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, u64::MAX / 2, 8, size, buf),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, u64::MAX / 512, 8, u64::MAX, buf),
            Err(-libc::EINVAL)
        );
        // larger than the tag buffer
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, 0, 1025, size, buf),
            Err(-libc::EINVAL)
        );
        // discard / write zeroes may exceed the buffer but not the device
        assert_eq!(
            decode(sys::UBLK_IO_OP_DISCARD, 0, (size / 512) as u32, size, buf).unwrap(),
            Req {
                kind: ReqKind::Discard,
                offset: 0,
                len: size
            }
        );
        assert_eq!(
            decode(
                sys::UBLK_IO_OP_WRITE_ZEROES,
                1,
                (size / 512) as u32,
                size,
                buf
            ),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE_ZEROES, 8, 8, size, buf)
                .unwrap()
                .kind,
            ReqKind::WriteZeroes
        );
        // unknown / unsupported ops
        for op in [
            sys::UBLK_IO_OP_WRITE_SAME,
            sys::UBLK_IO_OP_ZONE_APPEND,
            sys::UBLK_IO_OP_REPORT_ZONES,
            0xff,
        ] {
            assert_eq!(decode(op, 0, 1, size, buf), Err(-libc::EOPNOTSUPP));
        }
    }

    struct Mem {
        data: Mutex<Vec<u8>>,
        log: Mutex<Vec<String>>,
        fail_errno: Option<i32>,
        panic_on_read: bool,
    }
    impl Mem {
        fn new(n: usize) -> Self {
            Self {
                data: Mutex::new(vec![0; n]),
                log: Mutex::default(),
                fail_errno: None,
                panic_on_read: false,
            }
        }
    }
    impl BlockTarget for Mem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> TargetResult<()> {
            if self.panic_on_read {
                panic!("boom");
            }
            if let Some(e) = self.fail_errno {
                return Err(TargetError::new(e, "injected"));
            }
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, off: u64, buf: &[u8], fua: bool) -> TargetResult<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("write {off} {} fua={fua}", buf.len()));
            self.data.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> TargetResult<()> {
            self.log.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn discard(&self, off: u64, len: u64) -> TargetResult<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("discard {off} {len}"));
            Ok(())
        }
        fn write_zeroes(&self, off: u64, len: u64) -> TargetResult<()> {
            self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }
    }

    #[test]
    fn execute_results_and_errno() {
        let t = Mem::new(1 << 16);
        let mut buf = vec![7u8; 4096];
        let w = Req {
            kind: ReqKind::Write { fua: true },
            offset: 4096,
            len: 4096,
        };
        assert_eq!(execute(&t, &w, &mut buf), 4096);
        let mut out = vec![0u8; 4096];
        let r = Req {
            kind: ReqKind::Read,
            offset: 4096,
            len: 4096,
        };
        assert_eq!(execute(&t, &r, &mut out), 4096);
        assert_eq!(out, buf);
        assert_eq!(
            execute(
                &t,
                &Req {
                    kind: ReqKind::Flush,
                    offset: 0,
                    len: 0
                },
                &mut []
            ),
            0
        );
        assert_eq!(
            execute(
                &t,
                &Req {
                    kind: ReqKind::Discard,
                    offset: 0,
                    len: 8192
                },
                &mut []
            ),
            0
        );
        assert_eq!(
            execute(
                &t,
                &Req {
                    kind: ReqKind::WriteZeroes,
                    offset: 4096,
                    len: 4096
                },
                &mut []
            ),
            0
        );
        assert_eq!(execute(&t, &r, &mut out), 4096);
        assert!(out.iter().all(|&b| b == 0));
        assert_eq!(t.log.lock().unwrap()[0], "write 4096 4096 fua=true");

        let mut bad = Mem::new(4096);
        bad.fail_errno = Some(libc::ENOSPC);
        assert_eq!(
            execute(
                &bad,
                &Req {
                    kind: ReqKind::Read,
                    offset: 0,
                    len: 512
                },
                &mut out
            ),
            -libc::ENOSPC
        );
        bad.fail_errno = Some(0);
        assert_eq!(
            execute(
                &bad,
                &Req {
                    kind: ReqKind::Read,
                    offset: 0,
                    len: 512
                },
                &mut out
            ),
            -libc::EIO
        );
        bad.fail_errno = Some(-5);
        assert_eq!(
            execute(
                &bad,
                &Req {
                    kind: ReqKind::Read,
                    offset: 0,
                    len: 512
                },
                &mut out
            ),
            -libc::EIO
        );
    }

    fn read_eventfd(q: &QueueShared) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own.
        let n = unsafe { libc::read(q.efd.as_raw_fd(), &mut v as *mut u64 as *mut _, 8) };
        assert_eq!(n, 8);
        v
    }

    #[test]
    fn workers_complete_through_channel_and_eventfd() {
        let t: Arc<dyn BlockTarget> = Arc::new(Mem::new(1 << 20));
        let q = Arc::new(QueueShared::new(0, 4, 8192).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (rx, t) = (rx.clone(), t.clone());
                std::thread::spawn(move || worker_loop(rx, t))
            })
            .collect();
        // tag 1: write pattern through its buffer
        // SAFETY: tag 1's buffer is at least 8192 bytes and no other thread uses it in this test.
        unsafe { std::ptr::write_bytes(q.buf_ptr(1), 0xab, 8192) };
        for (tag, req) in [
            (
                1u16,
                Req {
                    kind: ReqKind::Write { fua: false },
                    offset: 8192,
                    len: 8192,
                },
            ),
            (
                2,
                Req {
                    kind: ReqKind::Flush,
                    offset: 0,
                    len: 0,
                },
            ),
            (
                3,
                Req {
                    kind: ReqKind::Discard,
                    offset: 0,
                    len: 1 << 20,
                },
            ),
        ] {
            q.pending.fetch_add(1, Ordering::AcqRel);
            tx.send(Job {
                q: q.clone(),
                tag,
                req,
            })
            .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 3 {
            let _ = read_eventfd(&q); // blocks until a worker kicks
            got.extend(q.done_rx.try_iter());
        }
        got.sort();
        assert_eq!(got, vec![(1, 8192), (2, 0), (3, 0)]);
        assert_eq!(q.pending.load(Ordering::Acquire), 0);
        // read it back via tag 0
        q.pending.fetch_add(1, Ordering::AcqRel);
        tx.send(Job {
            q: q.clone(),
            tag: 0,
            req: Req {
                kind: ReqKind::Read,
                offset: 8192,
                len: 8192,
            },
        })
        .unwrap();
        let _ = read_eventfd(&q);
        assert_eq!(q.done_rx.recv().unwrap(), (0, 8192));
        // SAFETY: tag 0's buffer is at least 8192 bytes and no other thread uses it in this test.
        let b0 = unsafe { std::slice::from_raw_parts(q.buf_ptr(0), 8192) };
        assert!(b0.iter().all(|&b| b == 0xab));
        drop(tx);
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn worker_survives_target_panic() {
        let mut m = Mem::new(4096);
        m.panic_on_read = true;
        let t: Arc<dyn BlockTarget> = Arc::new(m);
        let q = Arc::new(QueueShared::new(0, 1, 4096).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let h = std::thread::spawn(move || worker_loop(rx, t));
        for _ in 0..2 {
            q.pending.fetch_add(1, Ordering::AcqRel);
            tx.send(Job {
                q: q.clone(),
                tag: 0,
                req: Req {
                    kind: ReqKind::Read,
                    offset: 0,
                    len: 512,
                },
            })
            .unwrap();
            let _ = read_eventfd(&q);
            assert_eq!(q.done_rx.recv().unwrap(), (0, -libc::EIO));
        }
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn stop_handle_first_request_wins() {
        let s = StopHandle::new();
        assert_eq!(s.requested(), None);
        let c = s.clone();
        c.detach();
        s.stop();
        assert_eq!(s.requested(), Some(StopKind::Detach));
    }

    #[test]
    fn options_validation() {
        let o = UblkOptions::default();
        assert!(o.queues >= 1 && o.queues <= 4);
        assert_eq!(o.depth, 128);
        assert!(o.max_io_bytes >= 512 << 10);
        assert!(validate(&o, 256 * MIB).is_ok());
        assert!(validate(&o, 0).is_err());
        assert!(validate(&o, 1000).is_err());
        assert!(validate(
            &UblkOptions {
                depth: 0,
                ..o.clone()
            },
            MIB
        )
        .is_err());
        assert!(validate(
            &UblkOptions {
                max_io_bytes: 1000,
                ..o.clone()
            },
            MIB
        )
        .is_err());
        assert!(validate(
            &UblkOptions {
                id: Some(-2),
                ..o.clone()
            },
            MIB
        )
        .is_err());
    }

    #[test]
    fn missing_driver_is_named() {
        if Path::new(CONTROL_PATH).exists() {
            return; // only meaningful without the driver
        }
        let t: Arc<dyn BlockTarget> = Arc::new(Mem::new(1 << 20));
        let e = serve(t, &UblkOptions::default(), |_| {}, StopHandle::new()).unwrap_err();
        assert!(matches!(e, UblkError::ControlMissing));
        assert!(e.to_string().contains("modprobe ublk_drv"), "{e}");
        assert!(matches!(list_devices(), Err(UblkError::ControlMissing)));
    }
}
