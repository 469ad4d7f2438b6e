//! An event loop on a ring of its own, for every thread that is not a ublk queue
//! (which drives libublk's ring instead): NBD connections, the flusher, tests and
//! tools that call the engine through a blocking wrapper ([`block_on`]).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{squeue, IoUring};

use super::exec::Mailbox;
use super::reactor::{Reactor, Ring};

/// Tasks run per round before the loop looks at completions again.
const RUN_BUDGET: usize = 256;
const DEFAULT_ENTRIES: u32 = 512;

struct OwnRing(Rc<RefCell<IoUring>>);

impl Ring for OwnRing {
    fn push(&self, sqe: &squeue::Entry) -> bool {
        let mut ring = self.0.borrow_mut();
        // SAFETY: the caller of `reactor::submit` guarantees that the SQE's
        // pointers stay valid until completion (the request owns them).
        let pushed = unsafe { ring.submission().push(sqe) };
        pushed.is_ok()
    }

    fn submit(&self) -> io::Result<()> {
        self.0.borrow_mut().submit().map(drop)
    }
}

/// A loop with its own io_uring, driven by [`EventLoop::block_on`].
pub struct EventLoop {
    ring: Rc<RefCell<IoUring>>,
    reactor: Rc<Reactor>,
}

struct MainWaker {
    woken: AtomicBool,
    mailbox: Arc<Mailbox>,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.mailbox.notify();
    }
}

impl EventLoop {
    pub fn new() -> io::Result<EventLoop> {
        Self::with_entries(DEFAULT_ENTRIES)
    }

    pub fn with_entries(entries: u32) -> io::Result<EventLoop> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        let ring = Rc::new(RefCell::new(ring));
        let reactor = Reactor::new(Box::new(OwnRing(Rc::clone(&ring))))?;
        Ok(EventLoop { ring, reactor })
    }

    /// Run `fut` to completion on this thread, together with every task it (or
    /// an earlier call) spawned on this loop: returns once `fut` is done and no
    /// task of the loop is left.
    pub fn block_on<F: Future>(&self, fut: F) -> io::Result<F::Output> {
        let _g = self.reactor.enter()?;
        let mb = Arc::clone(&self.reactor.mailbox);
        let main = Arc::new(MainWaker {
            woken: AtomicBool::new(true),
            mailbox: Arc::clone(&mb),
        });
        let waker = Waker::from(Arc::clone(&main));
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        let mut out = None;
        loop {
            if out.is_none() && main.woken.swap(false, Ordering::SeqCst) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    out = Some(v);
                }
            }
            mb.run_ready(RUN_BUDGET);
            if out.is_some() && self.reactor.live_tasks.get() == 0 && !mb.has_ready() {
                break;
            }
            self.turn(&main)?;
        }
        Ok(out.expect("main future finished"))
    }

    /// Submit, wait for at least one completion unless work is ready, reap.
    fn turn(&self, main: &MainWaker) -> io::Result<()> {
        self.reactor.arm_eventfd()?;
        let mb = &self.reactor.mailbox;
        let may_wait = mb.park() && !main.woken.load(Ordering::SeqCst);
        let r = self
            .ring
            .borrow_mut()
            .submit_and_wait(if may_wait { 1 } else { 0 });
        mb.unpark();
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        self.reap();
        Ok(())
    }

    fn reap(&self) {
        loop {
            // Take the CQEs out before handling them: a wake may run code that
            // submits, which borrows the ring again.
            let batch: Vec<io_uring::cqueue::Entry> =
                self.ring.borrow_mut().completion().take(256).collect();
            if batch.is_empty() {
                break;
            }
            for cqe in &batch {
                if !self.reactor.complete(cqe) {
                    tracing::error!(
                        user_data = cqe.user_data(),
                        "unexpected completion on a private ring"
                    );
                }
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        // The kernel may still write into buffers of requests in flight (whose
        // tasks are gone): wait for every completion before the ring and the
        // buffers go away. The eventfd read is cancelled by closing the ring;
        // its buffer lives in the reactor, which the ring does not outlive.
        let mut spins = 0u32;
        while self.reactor.in_flight() > 0 {
            let r = self.ring.borrow_mut().submit_and_wait(1);
            if r.is_err() {
                spins += 1;
                if spins > 1000 {
                    tracing::error!(
                        in_flight = self.reactor.in_flight(),
                        "event loop dropped with requests in flight; leaking the ring"
                    );
                    std::mem::forget(Rc::clone(&self.ring));
                    std::mem::forget(Rc::clone(&self.reactor));
                    return;
                }
            }
            self.reap();
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<EventLoop>>> = const { RefCell::new(None) };
}

/// Run `fut` on this thread's private event loop (made on first use). For
/// blocking callers: tools, tests, the crash harness, threads that are not loops.
/// Fails if this thread already runs a loop (an event loop must never block).
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    if super::in_loop() {
        return Err(io::Error::other(
            "block_on called on an event loop thread (it would stall every request of the loop)",
        ));
    }
    let lp = LOCAL.with(|l| -> io::Result<Rc<EventLoop>> {
        let mut l = l.borrow_mut();
        if l.is_none() {
            *l = Some(Rc::new(EventLoop::new()?));
        }
        Ok(Rc::clone(l.as_ref().expect("just set")))
    })?;
    lp.block_on(fut)
}
