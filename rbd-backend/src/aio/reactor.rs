//! The per-thread event loop: an io_uring ring (our own, or one that a ublk queue
//! already owns), the table of requests in flight on it, and the task mailbox.
//!
//! A request's SQE carries a `user_data` with [`OUR_BITS`] set and the request's
//! slot in the table; its completion stores the result there and wakes the task
//! that waits for it. A request whose future is dropped before it completes hands
//! what it owns (buffers) to its table slot, which keeps them until the kernel is
//! done with them: a dropped future never frees memory the kernel still uses.

use std::any::Any;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;

use super::exec::Mailbox;

/// Bits of `user_data` that mark our requests. Bit 63 is libublk's "target I/O"
/// bit (so a ublk queue never takes them for its own commands); bit 62 tells them
/// from libublk's own target futures.
pub const OUR_BITS: u64 = (1 << 63) | (1 << 62);
const KEY_MASK: u64 = (1 << 32) - 1;
/// The armed read of the loop's eventfd.
const EVENTFD_KEY: u64 = KEY_MASK;
/// Cancellations of abandoned requests (their own completions are ignored).
const CANCEL_KEY: u64 = KEY_MASK - 1;

/// The io_uring a loop submits to.
pub trait Ring {
    /// Queue one SQE; false when the submission queue is full.
    fn push(&self, sqe: &squeue::Entry) -> bool;
    /// Hand queued SQEs to the kernel without waiting.
    fn submit(&self) -> io::Result<()>;
}

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
    /// The future went away first; keep its memory until the completion.
    Orphan(#[allow(dead_code)] Box<dyn Any>),
}

pub(crate) struct Reactor {
    ring: Box<dyn Ring>,
    ops: RefCell<Slab<Slot>>,
    pub(crate) mailbox: Arc<Mailbox>,
    efd_buf: Box<UnsafeCell<u64>>,
    efd_armed: Cell<bool>,
    /// Tasks spawned and not finished (the loop runs until this is 0).
    pub(crate) live_tasks: Rc<Cell<usize>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// Why an operation could not be started.
fn no_loop() -> io::Error {
    io::Error::other("no event loop runs on this thread (an async backend call outside a loop)")
}

pub(crate) fn current() -> io::Result<Rc<Reactor>> {
    CURRENT.with(|c| c.borrow().clone()).ok_or_else(no_loop)
}

/// Whether an event loop runs on this thread.
pub fn in_loop() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

impl Reactor {
    pub(crate) fn new(ring: Box<dyn Ring>) -> io::Result<Rc<Reactor>> {
        Ok(Rc::new(Reactor {
            ring,
            ops: RefCell::new(Slab::with_capacity(256)),
            mailbox: Mailbox::new()?,
            efd_buf: Box::new(UnsafeCell::new(0)),
            efd_armed: Cell::new(false),
            live_tasks: Rc::new(Cell::new(0)),
        }))
    }

    /// Make this the thread's loop for as long as the guard lives.
    pub(crate) fn enter(self: &Rc<Self>) -> io::Result<EnterGuard> {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                return Err(io::Error::other(
                    "an event loop already runs on this thread (nested loops are not allowed)",
                ));
            }
            *c = Some(Rc::clone(self));
            Ok(EnterGuard(()))
        })
    }

    fn push_sqe(&self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            if self.ring.push(sqe) {
                return Ok(());
            }
            // Full: let the kernel take what is queued, then retry.
            self.ring.submit()?;
        }
    }

    /// Keep a read of the eventfd armed, so that remote wakes end a wait.
    pub(crate) fn arm_eventfd(&self) -> io::Result<()> {
        if self.efd_armed.get() {
            return Ok(());
        }
        let sqe = opcode::Read::new(
            types::Fd(self.mailbox.efd()),
            self.efd_buf.get().cast::<u8>(),
            8,
        )
        .build()
        .user_data(OUR_BITS | EVENTFD_KEY);
        self.push_sqe(&sqe)?;
        self.efd_armed.set(true);
        Ok(())
    }

    /// Handle one completion if it is ours. Returns false for others' CQEs.
    pub(crate) fn complete(&self, cqe: &cqueue::Entry) -> bool {
        let ud = cqe.user_data();
        if ud & OUR_BITS != OUR_BITS {
            return false;
        }
        let key = ud & KEY_MASK;
        if key == CANCEL_KEY {
            return true;
        }
        if key == EVENTFD_KEY {
            self.efd_armed.set(false);
            self.mailbox.eventfd_consumed();
            return true;
        }
        let mut ops = self.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key as usize) else {
            tracing::error!(key, "completion for an unknown request; ignored");
            return true;
        };
        match std::mem::replace(slot, Slot::Done(cqe.result())) {
            Slot::Waiting(w) => {
                if let Some(w) = w {
                    w.wake();
                }
            }
            Slot::Orphan(keep) => {
                ops.remove(key as usize);
                drop(ops);
                drop(keep);
            }
            Slot::Done(_) => tracing::error!(key, "second completion for a request; ignored"),
        }
        true
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.ops.borrow().len()
    }
}

/// Leaves the loop's thread-local registration on drop.
pub(crate) struct EnterGuard(());

impl Drop for EnterGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// One request on the current loop's ring. Resolves to the CQE's result and
/// gives back what it owned.
pub struct Op<T: 'static> {
    reactor: Rc<Reactor>,
    key: usize,
    owned: Option<T>,
    timer: bool,
}

/// Queue `sqe` on the current loop. `owned` (typically the buffers the SQE names)
/// stays alive until the kernel completes the request, whatever happens to the
/// returned future.
///
/// # Safety
/// Every pointer in `sqe` must point into memory that `owned` keeps alive (or that
/// outlives the loop) and that nothing else accesses until the request completes.
pub unsafe fn submit<T: 'static>(sqe: squeue::Entry, owned: T) -> io::Result<Op<T>> {
    let r = current()?;
    let key = r.ops.borrow_mut().insert(Slot::Waiting(None));
    let sqe = sqe.user_data(OUR_BITS | key as u64);
    if let Err(e) = r.push_sqe(&sqe) {
        r.ops.borrow_mut().remove(key);
        return Err(e);
    }
    Ok(Op {
        reactor: r,
        key,
        owned: Some(owned),
        timer: false,
    })
}

// `owned` is never pinned: it is moved out whole once the request completes.
impl<T: 'static> Unpin for Op<T> {}

impl<T: 'static> Future for Op<T> {
    type Output = (i32, T);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, T)> {
        let this = self.get_mut();
        let key = this.key;
        let done = {
            let mut ops = this.reactor.ops.borrow_mut();
            match ops.get_mut(key) {
                Some(Slot::Done(res)) => {
                    let res = *res;
                    ops.remove(key);
                    Some(res)
                }
                Some(Slot::Waiting(w)) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    None
                }
                _ => Some(-libc::EIO),
            }
        };
        match done {
            Some(res) => {
                let owned = this.owned.take().expect("Op polled after completion");
                Poll::Ready((res, owned))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(owned) = self.owned.take() else {
            return; // completed and returned
        };
        let mut ops = self.reactor.ops.borrow_mut();
        match ops.get_mut(self.key) {
            Some(Slot::Done(_)) => {
                ops.remove(self.key);
            }
            Some(slot @ Slot::Waiting(_)) => {
                *slot = Slot::Orphan(Box::new(owned));
                drop(ops);
                // Ask the kernel to end it early: an abandoned timer would
                // otherwise hold up the loop's shutdown until it fires. What it
                // owns stays alive until its completion arrives either way.
                let target = OUR_BITS | self.key as u64;
                let sqe = if self.timer {
                    opcode::TimeoutRemove::new(target).build()
                } else {
                    opcode::AsyncCancel::new(target).build()
                };
                let _ = self.reactor.push_sqe(&sqe.user_data(OUR_BITS | CANCEL_KEY));
            }
            _ => {}
        }
    }
}

/// Wait `d` on the current loop (an io_uring timeout).
pub async fn sleep(d: Duration) {
    let ts = Box::new(
        types::Timespec::new()
            .sec(d.as_secs())
            .nsec(d.subsec_nanos()),
    );
    let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    // SAFETY: the SQE points at `ts`, which the request owns until it completes.
    match unsafe { submit(sqe, ts) } {
        Ok(mut op) => {
            op.timer = true;
            let _ = op.await;
        }
        Err(e) => {
            tracing::error!("cannot arm a timer: {e}; sleeping on the thread");
            std::thread::sleep(d);
        }
    }
}

/// Run `fut` as a task of the current loop.
pub fn spawn<F>(fut: F) -> io::Result<async_task::Task<F::Output>>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let r = current()?;
    let live = Rc::clone(&r.live_tasks);
    live.set(live.get() + 1);
    struct Done(Rc<Cell<usize>>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }
    let guard = Done(live);
    Ok(r.mailbox.spawn(async move {
        let _g = guard;
        fut.await
    }))
}
