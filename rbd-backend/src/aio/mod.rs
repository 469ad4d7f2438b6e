//! Asynchronous I/O on per-thread event loops.
//!
//! Each thread that serves requests runs one loop: one io_uring ring, the table
//! of requests in flight on it, and an executor of `!Send` tasks. Backends and the
//! cache device submit their I/O as SQEs on the ring of the thread that asks
//! ([`submit`]), so a request never changes threads on its way. Work that cannot
//! run on a ring (librbd's completions, another loop's lock release) wakes the
//! waiting task, which is a message in its loop's mailbox plus an eventfd write
//! (see [`exec`]).
//!
//! - [`EventLoop`] / [`block_on`]: a loop with a ring of its own.
//! - [`ExternalLoop`]: the same on a ring that someone else drives (a ublk queue:
//!   libublk owns the ring and its commands share it with ours).
//! - [`DmaBuf`] / [`BufSlice`]: memory that in-flight requests own.

mod buf;
mod driver;
mod exec;
mod reactor;

pub use buf::{BufSlice, DmaBuf, ForeignMem, DMA_ALIGN};
pub use driver::{block_on, EventLoop};
pub use reactor::{in_loop, sleep, spawn, submit, Op, Ring, OUR_BITS};

use std::io;
use std::rc::Rc;

use io_uring::cqueue;

/// A loop on a ring that its owner submits to, waits on and reaps (a ublk queue
/// thread). The owner calls, in its own loop: [`ExternalLoop::run_ready`],
/// [`ExternalLoop::prepare_wait`] before waiting in the kernel (wait only if it
/// returns true), [`ExternalLoop::after_wait`], and [`ExternalLoop::complete`] for
/// every CQE (it returns false for CQEs that are not ours).
pub struct ExternalLoop {
    reactor: Rc<reactor::Reactor>,
    _enter: reactor::EnterGuard,
}

impl ExternalLoop {
    /// Make a loop on `ring` the current thread's loop (until dropped).
    pub fn enter(ring: Box<dyn Ring>) -> io::Result<ExternalLoop> {
        let reactor = reactor::Reactor::new(ring)?;
        let enter = reactor.enter()?;
        Ok(ExternalLoop {
            reactor,
            _enter: enter,
        })
    }

    /// Run up to `budget` ready tasks; returns how many ran.
    pub fn run_ready(&self, budget: usize) -> usize {
        self.reactor.mailbox.run_ready(budget)
    }

    /// Arm the wake-up read and say whether the owner may block in the kernel now.
    pub fn prepare_wait(&self) -> io::Result<bool> {
        self.reactor.arm_eventfd()?;
        Ok(self.reactor.mailbox.park())
    }

    pub fn after_wait(&self) {
        self.reactor.mailbox.unpark();
    }

    /// Handle a CQE if it belongs to one of our requests.
    pub fn complete(&self, cqe: &cqueue::Entry) -> bool {
        self.reactor.complete(cqe)
    }

    /// Tasks spawned on this loop that have not finished.
    pub fn live_tasks(&self) -> usize {
        self.reactor.live_tasks.get()
    }

    /// Requests of ours in flight on the ring (the eventfd read excluded).
    pub fn in_flight(&self) -> usize {
        self.reactor.in_flight()
    }

    pub fn has_ready(&self) -> bool {
        self.reactor.mailbox.has_ready()
    }

    /// A handle that other threads use to end this loop's wait (to make it look
    /// at a flag they set, for example).
    pub fn notifier(&self) -> Notifier {
        Notifier(std::sync::Arc::clone(&self.reactor.mailbox))
    }
}

/// Ends a loop's wait in the kernel, from any thread.
#[derive(Clone)]
pub struct Notifier(std::sync::Arc<exec::Mailbox>);

impl Notifier {
    pub fn notify(&self) {
        self.0.notify();
    }
}

#[cfg(test)]
mod tests;
