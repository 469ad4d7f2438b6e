//! ublk frontend: serves a [`BlockTarget`] as `/dev/ublkbN` through the Linux ublk
//! driver (`ublk_drv`), using the `libublk` crate (0.4.x) for the control and queue
//! plumbing.
//!
//! # Threading model
//!
//! * One **queue thread** per ublk hardware queue (`ublk-qN`), with libublk's
//!   io_uring for that queue and one task per tag (see [`queue`]): a request is
//!   fetched, run against the [`AsyncTarget`] on that thread and ring, and
//!   committed. No worker pool, no hand-off.
//! * The thread that calls [`serve`]/[`recover`] does all control commands (libublk's
//!   control ring is thread-local) and waits for a [`StopHandle`] request.
//!
//! # Stop kinds
//!
//! * [`StopHandle::stop`]: `STOP_DEV`. The kernel stops accepting new I/O, waits for the
//!   requests we hold (we keep serving them until it is done), then aborts the queues.
//!   [`serve`] returns [`ServeOutcome::Stopped`]; the device is *not* deleted yet, so
//!   the caller can write back dirty data first and then call [`StoppedDevice::delete`].
//! * [`StopHandle::detach`]: stop taking new requests, finish and commit the ones in
//!   flight, then leave everything else to the kernel. Requests the driver
//!   delivered after that are re-issued to the next daemon (`UBLK_F_USER_RECOVERY_REISSUE`).
//!   The device is **not** deleted. The kernel moves it to `QUIESCED` only after this
//!   process has exited, and asynchronously. Before Linux 6.15 the driver notices a gone
//!   daemon when io_uring tears the dead process's queue rings down and cancels their
//!   commands; each queue's first cancel requeues the requests the daemon held, and a
//!   work item then takes the device mutex and waits, with no limit, until no request is
//!   in flight before it sets `QUIESCED` (6.15+ does all of it in the release of
//!   `/dev/ublkcN`). So detach is followed by process exit, [`wait_settled`] (which
//!   `ublk-cache stop --detach` does) and a [`recover`] in the next process.
//!
//! # Control commands that can wait
//!
//! `GET_DEV_INFO(2)` copies the device's info without taking a lock. Most other
//! commands (`GET_PARAMS`, `START/END_USER_RECOVERY`, `STOP_DEV`, `DEL_DEV`) take the
//! device mutex, which the kernel holds while it quiesces a device after its daemon
//! went away, however long that takes. The driver runs control commands in an io_uring
//! worker, where they can be neither interrupted nor cancelled, and the caller's exit
//! waits for that worker. So read-only queries here ([`device_info`], [`list_devices`],
//! [`wait_settled`]) send `GET_DEV_INFO` only and read the size from sysfs.
//!
//! # Recovery (libublk 0.4.8)
//!
//! [`recover`] builds a `UblkCtrl` with `UblkFlags::UBLK_DEV_F_RECOVER_DEV` and the
//! device's real queue count/depth (read first with `UblkCtrl::new_simple`), calls
//! `UblkCtrl::start_user_recover()` (`UBLK_U_CMD_START_USER_RECOVERY`, retried on
//! `EBUSY` for up to 30 s while the old daemon's references drain), starts the queues
//! and calls `UblkCtrl::start_dev()`, which sends `UBLK_U_CMD_END_USER_RECOVERY` (instead
//! of `START_DEV`) because the device is `QUIESCED` and the control is in recover mode.

mod queue;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use tracing::{error, info, warn};

use crate::frontend::dispatch::{Req, ReqKind};
use crate::target::AsyncTarget;
use queue::{QueueCtl, QueueExit};

const CONTROL_PATH: &str = "/dev/ublk-control";
const TARGET_NAME: &str = "ublk-cache";
const SECTOR: u64 = 512;
/// Largest single DISCARD / WRITE_ZEROES request we let the kernel send (1 GiB).
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;
const DISCARD_GRANULARITY: u32 = 4096;
/// Largest per-request buffer libublk accepts.
const MAX_IO_BYTES_LIMIT: u32 = 32 << 20;
/// How long `recover` waits for the kernel to quiesce a device whose daemon just died.
/// Usually well under a second; a queue whose every request the dead daemon held is
/// only noticed by the kernel's 30 s request timeout on kernels before 6.15.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

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
    /// The daemon is gone but the kernel has not finished taking its queues down.
    #[error(
        "ublk device {id} is still {state} {waited_secs} s after its daemon went away: the kernel \
         has not finished aborting the old daemon's requests (look for hung tasks in `dmesg`); \
         do not send it other control commands until it shows QUIESCED"
    )]
    Unsettled {
        id: u32,
        state: DeviceState,
        waited_secs: u64,
    },
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

/// How to create the device. For [`recover`], only `id` (required) is used: queue
/// count, depth and max I/O size are the existing device's.
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

/// Asks a running [`serve`]/[`recover`] to stop. Cheap to clone; every clone is
/// the same handle, callable from any thread (not from a signal handler: the
/// binary's signal thread stops the server, which stops its exports). The first
/// request wins, and wakes the serving loop at once (it does not poll).
#[derive(Debug, Clone)]
pub struct StopHandle {
    kind: Arc<AtomicU8>,
    /// One message wakes the serving loop, which then reads `kind`: set
    /// first, so a request is never missed.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Default for StopHandle {
    fn default() -> Self {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Self {
            kind: Arc::default(),
            wake_tx,
            wake_rx,
        }
    }
}

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn stop(&self) {
        self.request(1);
    }
    pub fn detach(&self) {
        self.request(2);
    }
    fn request(&self, kind: u8) {
        let _ = self
            .kind
            .compare_exchange(0, kind, Ordering::SeqCst, Ordering::SeqCst);
        // Full: a wakeup is pending already, and it will read `kind`.
        let _ = self.wake_tx.try_send(());
    }
    pub fn requested(&self) -> Option<StopKind> {
        match self.kind.load(Ordering::SeqCst) {
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

/// Size in bytes of `/dev/ublkbN`, from sysfs (the capacity the driver set from our
/// `dev_sectors`). Not `GET_PARAMS`: that takes the device mutex (see the module docs),
/// and the disk exists whenever the device is LIVE or QUIESCED. `None` without a disk.
fn read_size(id: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/block/ublkb{id}/size")).ok()?;
    s.trim().parse::<u64>().ok().map(|sectors| sectors * SECTOR)
}

/// State, daemon pid, size... of one device. Sends `GET_DEV_INFO` only, which never
/// waits on the device mutex, so this cannot queue behind a quiesce in the kernel.
pub fn device_info(id: u32) -> Result<DeviceInfo, UblkError> {
    check_control()?;
    // `new_simple` has already read the info (GET_DEV_INFO2, else GET_DEV_INFO).
    let ctrl = open_existing(id)?;
    let size = read_size(id).unwrap_or(0);
    Ok(device_info_from(&ctrl.dev_info(), size))
}

/// Wait until device `id` has settled after its daemon `old_pid` went away: `QUIESCED`
/// (or `FAIL_IO`, or `DEAD` if it was stopped meanwhile, or `LIVE` under another pid if
/// a successor has already recovered it). Polls `GET_DEV_INFO` only.
///
/// The kernel quiesces asynchronously after the daemon's exit (see the module docs),
/// so a successor or a tool that sends a mutex-taking command too early waits in the
/// kernel, uninterruptibly, for as long as that takes. Call this first, with a limit.
pub fn wait_settled(id: u32, old_pid: i32, limit: Duration) -> Result<DeviceInfo, UblkError> {
    let start = Instant::now();
    loop {
        let info = device_info(id)?;
        if info.state != DeviceState::Live || info.daemon_pid != old_pid {
            return Ok(info);
        }
        if start.elapsed() >= limit {
            return Err(UblkError::Unsettled {
                id,
                state: info.state,
                waited_secs: start.elapsed().as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// All ublk devices (of any daemon), sorted by id. Ids come from `/sys/class/ublk-char`,
/// details from `GET_DEV_INFO` and sysfs (never a command that takes the device mutex).
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
    // Room for every COMMIT_AND_FETCH, the target's own I/O of every tag (a
    // request may have several pieces in flight), promotions, timers and the
    // wake-up read. A full SQ is flushed and retried; the CQ must not overflow.
    dev.tgt.sq_depth = info.queue_depth.saturating_mul(4);
    dev.tgt.cq_depth = info.queue_depth.saturating_mul(16);
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
pub fn serve<T: AsyncTarget + 'static>(
    target: Arc<T>,
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
pub fn recover<T: AsyncTarget + 'static>(
    target: Arc<T>,
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
    let mut info = probe.dev_info();
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
            // Daemon gone but the kernel has not quiesced yet. START_USER_RECOVERY would
            // wait for the device mutex, uninterruptibly, until it has: wait here
            // instead, where we can give up with a clear error.
            info!(id, pid, "waiting for the kernel to quiesce the device");
            let settled = wait_settled(id, pid, SETTLE_LIMIT)?;
            if settled.state == DeviceState::Dead {
                return Err(not("it was stopped (DEAD) while quiescing".into()));
            }
            if settled.state == DeviceState::Live {
                return Err(not(format!(
                    "it was recovered meanwhile by pid {}",
                    settled.daemon_pid
                )));
            }
            let probe = open_existing(id)?;
            info = probe.dev_info();
        }
        _ => {}
    }
    match read_size(id) {
        Some(s) if s == size => {}
        Some(s) => {
            return Err(not(format!(
                "device size {s} differs from target size {size}"
            )))
        }
        None => {
            return Err(not(format!(
                "cannot read its size from /sys/block/ublkb{id}/size"
            )))
        }
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
    ctls: Vec<Arc<QueueCtl>>,
    queue_threads: Vec<JoinHandle<()>>,
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
        for c in &self.ctls {
            c.request_detach();
        }
    }

    /// Join queue threads (they must be on their way out).
    /// `leak_dev`: keep /dev/ublkcN open until process exit, consistent with the
    /// queues that were leaked on detach (see `queue_main`).
    fn finish(mut self, leak_dev: bool) {
        while !self.wait_exited(Duration::from_secs(10)) {
            warn!("still waiting for ublk queue threads to exit");
        }
        for h in self.queue_threads.drain(..) {
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

fn run<T: AsyncTarget + 'static>(
    ctrl: UblkCtrl,
    target: Arc<T>,
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

    let _ = (depth, buf_bytes, opts);
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<QueueEvent>();
    let mut running = Running {
        dev: Arc::clone(&dev),
        ctls: (0..nr_queues).map(|_| Arc::new(QueueCtl::new())).collect(),
        queue_threads: Vec::with_capacity(nr_queues as usize),
        events: ev_rx,
        exited: vec![true; nr_queues as usize], // false once spawned
        first_failure: None,
    };

    let mut spawn_err = None;
    for qid in 0..nr_queues {
        let dev = Arc::clone(&dev);
        let ctl = Arc::clone(&running.ctls[qid as usize]);
        let target = Arc::clone(&target);
        let ev = ev_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("ublk-q{qid}"))
            .spawn(move || {
                let tid = UblkCtrl::init_queue_thread();
                let _ = ev.send(QueueEvent::Started { qid, tid });
                let result = queue::queue_main(qid, &dev, &ctl, target, size);
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
        // Sleeps until a queue reports or a stop is requested (then the
        // loop's top reads which).
        let event = crossbeam_channel::select! {
            recv(running.events) -> ev => Some(ev),
            recv(stop.wake_rx) -> _ => None,
        };
        let Some(event) = event else { continue };
        match event {
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
            Err(crossbeam_channel::RecvError) => {
                running.finish(false);
                return Ok(stopped(ctrl, StopReason::External));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn unsettled_names_the_device_and_state() {
        let e = UblkError::Unsettled {
            id: 3,
            state: DeviceState::Live,
            waited_secs: 90,
        };
        let m = e.to_string();
        assert!(m.contains("ublk device 3 is still LIVE 90 s"), "{m}");
        assert!(m.contains("dmesg"), "{m}");
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
        let t = Arc::new(crate::frontend::dispatch::tests::Mem::new(1 << 20));
        let e = serve(t, &UblkOptions::default(), |_| {}, StopHandle::new()).unwrap_err();
        assert!(matches!(e, UblkError::ControlMissing));
        assert!(e.to_string().contains("modprobe ublk_drv"), "{e}");
        assert!(matches!(list_devices(), Err(UblkError::ControlMissing)));
    }
}
