//! The io_uring engine: one ring shared by every thread of a backend.
//!
//! Submitters take the SQ lock only to push an SQE and enter the kernel; they then
//! sleep on their own completion slot. One reaper thread waits for CQEs and wakes
//! the owner of each. The submitter's buffer stays borrowed until its slot is
//! filled, which is what makes handing raw pointers to the kernel sound.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::{offset_plus, EngineKind, IoEngine};

/// user_data reserved for the NOP that tells the reaper to exit.
const SHUTDOWN: u64 = u64::MAX;
const DEFAULT_ENTRIES: u32 = 256;
/// Largest single read/write SQE; longer requests are split (SQE lengths are u32,
/// and Linux caps one read/write at just under 2 GiB anyway).
const MAX_CHUNK: usize = 1 << 30;
/// EAGAIN/EINTR from a CQE are retried, but not forever.
const MAX_RETRIES: u32 = 100;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

pub struct UringEngine {
    shared: Arc<Shared>,
    reaper: Option<JoinHandle<()>>,
}

struct Shared {
    ring: IoUring,
    /// The SQ ring is single-producer: every push and the enter that follows it
    /// happen under this lock.
    sq: Mutex<()>,
    pending: Mutex<Pending>,
    /// Signalled when a pending slot frees up (see `Pending::limit`).
    room: Condvar,
}

struct Pending {
    slots: HashMap<u64, Arc<Slot>>,
    next_id: u64,
    /// In-flight requests never exceed the CQ size, so completions cannot overflow.
    limit: usize,
}

#[derive(Default)]
struct Slot {
    result: Mutex<Option<i32>>,
    done: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Our critical sections do not panic; if one ever did, the protected data is
    // still consistent (plain inserts/removes), so carry on rather than cascade.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UringEngine {
    pub fn new() -> io::Result<Self> {
        Self::with_entries(DEFAULT_ENTRIES)
    }

    /// A ring with `entries` SQ slots (rounded up to a power of two). Fails when the
    /// kernel refuses io_uring or lacks an opcode we need.
    pub fn with_entries(entries: u32) -> io::Result<Self> {
        let entries = entries
            .clamp(1, 4096)
            .checked_next_power_of_two()
            .unwrap_or(DEFAULT_ENTRIES);
        let mut ring = IoUring::new(entries)?;
        check_support(&mut ring)?;
        let limit = usize::try_from(ring.params().cq_entries())
            .unwrap_or(1)
            .max(1);
        let shared = Arc::new(Shared {
            ring,
            sq: Mutex::new(()),
            pending: Mutex::new(Pending {
                slots: HashMap::new(),
                next_id: 0,
                limit,
            }),
            room: Condvar::new(),
        });
        let for_reaper = Arc::clone(&shared);
        let reaper = thread::Builder::new()
            .name("uring-reaper".into())
            .spawn(move || reap(&for_reaper))?;
        Ok(Self {
            shared,
            reaper: Some(reaper),
        })
    }

    /// Submits `entry` and blocks until its completion; returns the CQE result.
    ///
    /// # Safety
    /// Every buffer and fd `entry` references must stay valid until this returns.
    /// Borrowing them across the call is enough: we return only after the kernel has
    /// posted this request's CQE, i.e. it has finished with them.
    unsafe fn execute(&self, entry: squeue::Entry) -> i32 {
        let slot = Arc::new(Slot::default());
        let id = self.shared.register(Arc::clone(&slot));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.shared.push_and_submit(&entry.user_data(id)) };
        let mut result = lock(&slot.result);
        loop {
            if let Some(r) = *result {
                return r;
            }
            result = slot
                .done
                .wait(result)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs read or write SQEs built by `build(offset, done, chunk_len)` until `len`
    /// bytes moved, resubmitting the remainder after short transfers. A read stops
    /// early at end of file; a write that makes no progress is an error.
    fn transfer(
        &self,
        len: usize,
        offset: u64,
        mut build: impl FnMut(u64, usize, u32) -> squeue::Entry,
        dir: Dir,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < len {
            let chunk = u32::try_from((len - done).min(MAX_CHUNK)).unwrap_or(u32::MAX);
            let entry = build(offset_plus(offset, done)?, done, chunk);
            // SAFETY: `build` points the SQE into the caller's borrowed buffer and
            // `file`, both of which outlive this call (see `execute`).
            let res = unsafe { self.execute(entry) };
            if res < 0 {
                let errno = -res;
                if (errno == libc::EINTR || errno == libc::EAGAIN) && retries < MAX_RETRIES {
                    retries += 1;
                    continue;
                }
                return Err(io::Error::from_raw_os_error(errno));
            }
            let n = usize::try_from(res).unwrap_or(0).min(len - done);
            if n == 0 {
                if dir == Dir::Write {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("io_uring write made no progress at offset {offset}+{done}"),
                    ));
                }
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn read_upto(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let fd = types::Fd(file.as_raw_fd());
        let base = buf.as_mut_ptr();
        let len = buf.len();
        self.transfer(
            len,
            offset,
            |off, done, chunk| {
                // `done < len`, so this stays inside `buf`; wrapping_add avoids an unsafe
                // pointer offset here, the kernel only sees the address.
                opcode::Read::new(fd, base.wrapping_add(done), chunk)
                    .offset(off)
                    .build()
            },
            Dir::Read,
        )
    }

    fn write_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let base = buf.as_ptr();
        self.transfer(
            buf.len(),
            offset,
            |off, done, chunk| {
                opcode::Write::new(fd, base.wrapping_add(done), chunk)
                    .offset(off)
                    .build()
            },
            Dir::Write,
        )
        .map(|_| ())
    }

    fn fdatasync(&self, file: &File) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let mut retries = 0;
        loop {
            // SAFETY: the SQE references only the fd, kept open by the borrowed `file`.
            let res = unsafe { self.execute(entry.clone()) };
            if res >= 0 {
                return Ok(());
            }
            if -res == libc::EINTR && retries < MAX_RETRIES {
                retries += 1;
                continue;
            }
            return Err(io::Error::from_raw_os_error(-res));
        }
    }
}

impl Shared {
    /// Allocates a user_data id for `slot`, waiting while the ring is at capacity.
    fn register(&self, slot: Arc<Slot>) -> u64 {
        let mut p = lock(&self.pending);
        while p.slots.len() >= p.limit {
            p = self.room.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        let id = loop {
            let id = p.next_id;
            p.next_id = p.next_id.wrapping_add(1);
            if id != SHUTDOWN && !p.slots.contains_key(&id) {
                break id;
            }
        };
        p.slots.insert(id, slot);
        id
    }

    /// Pushes `entry` and makes sure the kernel has consumed it before returning, so
    /// that its CQE will arrive without anyone else having to enter the ring.
    ///
    /// # Safety
    /// As for [`UringEngine::execute`]: `entry`'s memory must outlive its completion.
    unsafe fn push_and_submit(&self, entry: &squeue::Entry) {
        let _producer = lock(&self.sq);
        let mut backoff = Backoff::default();
        loop {
            // SAFETY: holding `sq` makes this the only SubmissionQueue alive; the entry's
            // validity is this function's contract. Dropping the queue publishes the tail.
            let pushed = unsafe { self.ring.submission_shared().push(entry).is_ok() };
            if pushed {
                break;
            }
            // SQ full: hand what is queued to the kernel, then retry the push.
            self.enter_once(&mut backoff);
        }
        loop {
            self.enter_once(&mut backoff);
            // SAFETY: we hold `sq`, so no other SubmissionQueue exists.
            if unsafe { self.ring.submission_shared().is_empty() } {
                return;
            }
        }
    }

    fn enter_once(&self, backoff: &mut Backoff) {
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EAGAIN/EBUSY: the kernel is short of memory or still flushing CQ
                // backlog; both clear up. Anything else should not happen on a ring that
                // passed setup, but the SQE is already published, so giving up would let
                // the kernel use a buffer we no longer own: wait and retry instead.
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                    backoff.log(&e, "io_uring submit failed; retrying");
                }
                backoff.wait();
            }
        }
    }

    fn complete(&self, finished: &mut Vec<(u64, i32)>) {
        let mut woken = Vec::with_capacity(finished.len());
        {
            let mut p = lock(&self.pending);
            for &(id, res) in finished.iter() {
                match p.slots.remove(&id) {
                    Some(slot) => woken.push((slot, res)),
                    None => tracing::error!(user_data = id, "io_uring completion for no request"),
                }
            }
        }
        self.room.notify_all();
        for (slot, res) in woken {
            *lock(&slot.result) = Some(res);
            slot.done.notify_one();
        }
        finished.clear();
    }
}

/// The reaper: the only consumer of the completion queue.
fn reap(shared: &Shared) {
    let mut backoff = Backoff::default();
    let mut finished = Vec::new();
    loop {
        match shared.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                // Drained below; the backlog then flushes on the next enter.
            }
            Err(e) => {
                backoff.log(&e, "io_uring wait failed; retrying");
                backoff.wait();
            }
        }
        let mut stop = false;
        {
            // SAFETY: this thread is the only one that ever creates a CompletionQueue.
            let cq = unsafe { shared.ring.completion_shared() };
            for cqe in cq {
                if cqe.user_data() == SHUTDOWN {
                    stop = true;
                } else {
                    finished.push((cqe.user_data(), cqe.result()));
                }
            }
        }
        if !finished.is_empty() {
            shared.complete(&mut finished);
        }
        if stop {
            return;
        }
    }
}

/// Refuses rings that cannot do what we need, so `open_engine` can fall back early
/// instead of failing on the first I/O.
fn check_support(ring: &mut IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Nop::CODE, "NOP"),
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    // A seccomp filter may allow setup but refuse io_uring_enter: try one round trip.
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring SQ full on a fresh ring"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring NOP produced no completion"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // `&mut self` means no request is in flight, so the reaper only has our NOP left.
        let nop = opcode::Nop::new().build().user_data(SHUTDOWN);
        // SAFETY: a NOP references no memory.
        unsafe { self.shared.push_and_submit(&nop) };
        if let Some(reaper) = self.reaper.take() {
            if reaper.join().is_err() {
                tracing::error!("io_uring reaper thread panicked");
            }
        }
    }
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine")
            .field("sq_entries", &self.shared.ring.params().sq_entries())
            .field("cq_entries", &self.shared.ring.params().cq_entries())
            .finish()
    }
}

/// Retry pacing and log throttling for conditions that should clear by themselves.
#[derive(Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn wait(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
        if self.attempts < 16 {
            thread::yield_now();
        } else {
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn log(&self, e: &io::Error, msg: &str) {
        // Log the 1st, 2nd, 4th, 8th… occurrence: visible, but not a flood.
        let n = self.attempts.saturating_add(1);
        if n.is_power_of_two() {
            tracing::error!(error = %e, attempts = n, "{msg}");
        }
    }
}
