//! The task executor of one event loop.
//!
//! Tasks are `!Send` futures that run on the loop's thread only. Waking one is a
//! message in the loop's mailbox (a lock-free queue) plus, when the loop sleeps in
//! `io_uring_enter`, one write to its eventfd: the loop keeps a read of that eventfd
//! armed on its ring, so a wake from a librbd callback, another queue's thread or
//! the flusher ends the wait at once. That is the only way work crosses threads;
//! nothing else ever pokes another loop.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_task::{Runnable, Task};
use concurrent_queue::ConcurrentQueue;

/// The mailbox of one loop, shared with every waker of its tasks.
pub(crate) struct Mailbox {
    queue: ConcurrentQueue<Runnable>,
    /// The loop is about to wait, or waits, in the kernel.
    parked: AtomicBool,
    /// An eventfd write is outstanding (not yet read by the loop).
    notified: AtomicBool,
    efd: OwnedFd,
    /// Wakes from other threads (for stats and tests).
    pub(crate) remote_wakes: AtomicU64,
    owner: std::thread::ThreadId,
}

impl Mailbox {
    pub(crate) fn new() -> io::Result<Arc<Mailbox>> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Mailbox {
            queue: ConcurrentQueue::unbounded(),
            parked: AtomicBool::new(false),
            notified: AtomicBool::new(false),
            // SAFETY: a fresh eventfd that nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            remote_wakes: AtomicU64::new(0),
            owner: std::thread::current().id(),
        }))
    }

    pub(crate) fn efd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn schedule(&self, r: Runnable) {
        // The queue is unbounded and never closed while a waker can exist.
        let _ = self.queue.push(r);
        if std::thread::current().id() != self.owner {
            self.remote_wakes.fetch_add(1, Ordering::Relaxed);
        }
        self.notify();
    }

    /// End the loop's wait in the kernel, if it waits (or is about to).
    pub(crate) fn notify(&self) {
        if self.parked.load(Ordering::SeqCst) && !self.notified.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. EAGAIN only if the
            // counter would overflow, i.e. a wakeup is pending anyway.
            let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Runs up to `budget` ready tasks; returns how many ran.
    pub(crate) fn run_ready(&self, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            match self.queue.pop() {
                Ok(r) => {
                    r.run();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Before waiting in the kernel: returns whether the loop may wait (nothing is
    /// ready). A wake that comes after this writes the eventfd.
    pub(crate) fn park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        self.queue.is_empty()
    }

    pub(crate) fn unpark(&self) {
        self.parked.store(false, Ordering::SeqCst);
    }

    /// The loop read the eventfd: later wakes may write it again.
    pub(crate) fn eventfd_consumed(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    /// Spawns a task of this loop. Must be called on the loop's thread.
    pub(crate) fn spawn<F>(self: &Arc<Self>, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let mb = Arc::clone(self);
        let (runnable, task) = async_task::spawn_local(fut, move |r| mb.schedule(r));
        runnable.schedule();
        task
    }
}
