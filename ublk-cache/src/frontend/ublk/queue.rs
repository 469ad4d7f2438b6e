//! One ublk hardware queue: one thread, libublk's io_uring for that queue, and one
//! task per tag.
//!
//! A tag's task fetches a request (`FETCH`), runs it against the target on this
//! thread, and commits the result while fetching the next (`COMMIT_AND_FETCH`).
//! The target's own I/O (cache device reads, backend reads) goes on the same ring:
//! a cache hit is one read between the fetch and the commit, with no thread
//! hand-off. The loop below reaps every completion of the ring and hands each to
//! its owner: ours to the event loop (`rbd_backend::aio`), ublk commands to
//! libublk's futures. Work from other threads (librbd completions, another
//! queue's lock release, a detach request) wakes the loop through its eventfd.
//!
//! Tag buffers are libublk `IoBuf`s (it registers them with the driver); the
//! target sees each as a `DmaBuf` over the same memory.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use io_uring::{squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use parking_lot::Mutex;
use rbd_backend::aio::{DmaBuf, ExternalLoop, ForeignMem, Notifier, Ring};
use tracing::{debug, error, info};

use super::decode;
use crate::frontend::dispatch::execute;
use crate::target::AsyncTarget;

/// How long the queue waits in the kernel with nothing happening before it
/// looks around (libublk uses the idle time to release resources).
const IDLE: Duration = Duration::from_secs(20);
/// Ready tasks run per round before the ring is looked at again.
const RUN_BUDGET: usize = 256;

/// What the controlling thread shares with a queue thread.
pub(crate) struct QueueCtl {
    detach: AtomicBool,
    notifier: Mutex<Option<Notifier>>,
}

impl QueueCtl {
    pub fn new() -> Self {
        Self {
            detach: AtomicBool::new(false),
            notifier: Mutex::new(None),
        }
    }

    /// Stop taking new requests, finish the ones in flight, then leave.
    pub fn request_detach(&self) {
        self.detach.store(true, Ordering::SeqCst);
        if let Some(n) = self.notifier.lock().as_ref() {
            n.notify();
        }
    }

    fn detaching(&self) -> bool {
        self.detach.load(Ordering::SeqCst)
    }
}

pub(crate) enum QueueExit {
    /// The driver aborted the queue (device stopped or deleted).
    Down,
    /// Detach finished; the queue was leaked on purpose.
    Detached,
}

/// The queue's ring is libublk's thread-local one; our requests share it.
struct LibublkRing;

impl Ring for LibublkRing {
    fn push(&self, sqe: &squeue::Entry) -> bool {
        libublk::io::with_task_io_ring_mut(|r| {
            // SAFETY: `rbd_backend::aio::submit`'s caller guarantees that the SQE's
            // memory stays valid until it completes.
            let pushed = unsafe { r.submission().push(sqe) };
            pushed.is_ok()
        })
    }

    fn submit(&self) -> io::Result<()> {
        libublk::io::with_task_io_ring_mut(|r| r.submit()).map(drop)
    }
}

/// A tag's buffer: the driver copies request data into and out of it.
struct TagBuf(IoBuf<u8>);

// SAFETY: IoBuf is a 4096-aligned allocation of `len()` bytes that lives as long
// as this object; the driver touches it only between a commit and the next
// fetch of its tag, when no request of ours runs on it.
unsafe impl ForeignMem for TagBuf {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

struct MainWaker {
    woken: AtomicBool,
    notifier: Notifier,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.notifier.notify();
    }
}

/// `PR_SET_IO_FLUSHER` (linux/prctl.h; not in the libc crate's list).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Reclaim must not wait on writeback to our own device while we serve it.
fn set_io_flusher() {
    // SAFETY: plain prctl; failure (no CAP_SYS_RESOURCE) only loses the hint.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        debug!("PR_SET_IO_FLUSHER not set: {}", io::Error::last_os_error());
    }
}

/// Serve queue `qid` until the driver aborts it or a detach is requested.
pub(crate) fn queue_main<T: AsyncTarget + 'static>(
    qid: u16,
    dev: &UblkDev,
    ctl: &QueueCtl,
    target: Arc<T>,
    dev_size: u64,
) -> Result<QueueExit, String> {
    set_io_flusher();
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            // Unblocks start_dev(), which waits for every queue's buffer registration.
            dev.notify_buffer_registration_complete(true);
            return Err(format!("creating queue: {e:?}"));
        }
    };
    // Everything the driver or the kernel may still use after a detach is kept
    // in `ManuallyDrop`: on that path it is leaked, never freed (see the end).
    let q = ManuallyDrop::new(q);
    let lp = match ExternalLoop::enter(Box::new(LibublkRing)) {
        Ok(l) => ManuallyDrop::new(l),
        Err(e) => {
            dev.notify_buffer_registration_complete(true);
            return Err(format!("event loop: {e}"));
        }
    };
    *ctl.notifier.lock() = Some(lp.notifier());
    let depth = dev.dev_info.queue_depth;
    let buf_len = dev.dev_info.max_io_buf_bytes as usize;
    let bufs: ManuallyDrop<Vec<Arc<TagBuf>>> = ManuallyDrop::new(
        (0..depth)
            .map(|_| Arc::new(TagBuf(IoBuf::new(buf_len))))
            .collect(),
    );
    let busy = Cell::new(0usize);
    let deferred = Cell::new(0usize);

    let mut tasks = ManuallyDrop::new(FuturesUnordered::new());
    for tag in 0..depth {
        let (q, buf, target, busy, deferred) =
            (&*q, &bufs[tag as usize], &*target, &busy, &deferred);
        tasks.push(async move {
            let mem: Arc<dyn ForeignMem> = Arc::clone(buf) as Arc<dyn ForeignMem>;
            let dma = DmaBuf::foreign(mem);
            let mut next = q
                .submit_io_prep_cmd(tag, BufDesc::Slice(buf.0.as_slice()), -1, Some(&buf.0))
                .await;
            loop {
                match next {
                    Ok(_) => {}
                    Err(libublk::UblkError::QueueIsDown) => return Ok(()),
                    Err(e) => return Err(format!("tag {tag}: {e:?}")),
                }
                if ctl.detaching() {
                    // Leave it uncommitted: the kernel re-issues it to the next daemon.
                    deferred.set(deferred.get() + 1);
                    std::future::pending::<()>().await;
                }
                busy.set(busy.get() + 1);
                let iod = q.get_iod(tag);
                let res = match decode(
                    iod.op_flags,
                    iod.start_sector,
                    iod.nr_sectors,
                    dev_size,
                    buf_len,
                ) {
                    Err(e) => e,
                    Ok(req) => {
                        let r = execute(target, &req, &dma).await;
                        if dma.bytes().is_none() {
                            // Cannot happen: every request ends only after its I/O.
                            error!(
                                qid,
                                tag, "tag buffer still in use after its request; failing it"
                            );
                            -libc::EIO
                        } else {
                            r
                        }
                    }
                };
                busy.set(busy.get() - 1);
                next = q
                    .submit_io_commit_cmd(tag, BufDesc::Slice(buf.0.as_slice()), res)
                    .await;
            }
        });
    }
    let tasks_ref = &mut *tasks;
    let mut all_tags = ManuallyDrop::new(Box::pin(async move {
        let mut first_err = None;
        while let Some(r) = tasks_ref.next().await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err
    }));
    let main = Arc::new(MainWaker {
        woken: AtomicBool::new(true),
        notifier: lp.notifier(),
    });
    let waker = Waker::from(Arc::clone(&main));
    let mut cx = Context::from_waker(&waker);
    let mut tags_done: Option<Option<String>> = None;
    let mut exit = None;
    while exit.is_none() {
        if tags_done.is_none() && main.woken.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(r) = all_tags.as_mut().poll(&mut cx) {
                tags_done = Some(r);
            }
        }
        lp.run_ready(RUN_BUDGET);
        let quiet = lp.live_tasks() == 0 && lp.in_flight() == 0;
        if let Some(r) = &tags_done {
            // Every tag is done (the queue is down); background work (promotions)
            // must end before the buffers and the ring go away.
            if quiet {
                exit = Some(match r {
                    Some(e) => Err(e.clone()),
                    None => Ok(QueueExit::Down),
                });
                continue;
            }
        }
        if ctl.detaching() && busy.get() == 0 && quiet {
            // Push the last commits to the kernel before we go.
            let _ = libublk::io::with_task_io_ring_mut(|r| r.submit());
            exit = Some(Ok(QueueExit::Detached));
            continue;
        }
        let may_wait = match lp.prepare_wait() {
            Ok(w) => w && !main.woken.load(Ordering::SeqCst) && !ctl.detaching(),
            Err(e) => {
                exit = Some(Err(format!("arming the wake-up read: {e}")));
                continue;
            }
        };
        let timed_out = libublk::io::with_task_io_ring_mut(|r| {
            let res = if may_wait {
                let ts = types::Timespec::new().sec(IDLE.as_secs());
                let args = types::SubmitArgs::new().timespec(&ts);
                r.submitter().submit_with_args(1, &args)
            } else {
                r.submit()
            };
            match res {
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(false),
                Err(e) => Err(e),
                Ok(_) => Ok(false),
            }
        });
        lp.after_wait();
        let timed_out = match timed_out {
            Ok(t) => t,
            Err(e) => {
                exit = Some(Err(format!("io_uring wait: {e}")));
                continue;
            }
        };
        let reaped = ublk_reap_io_events_with_update_queue(&q, timed_out, None, |cqe| {
            if !lp.complete(cqe) {
                ublk_wake_task(cqe.user_data(), cqe);
            }
        });
        if let Err(e) = reaped {
            exit = Some(Err(format!("reaping completions: {e:?}")));
        }
    }
    let exit = exit.expect("loop ends with an exit");
    match exit {
        Ok(QueueExit::Down) => {
            // Nothing is in flight and the driver has let go: free it all, in order.
            drop(ManuallyDrop::into_inner(all_tags));
            drop(ManuallyDrop::into_inner(tasks));
            drop(ManuallyDrop::into_inner(bufs));
            drop(ManuallyDrop::into_inner(lp));
            drop(ManuallyDrop::into_inner(q));
            Ok(QueueExit::Down)
        }
        other => {
            if deferred.get() > 0 {
                info!(
                    qid,
                    deferred = deferred.get(),
                    "requests left for the next daemon"
                );
            }
            // Dropping the queue would unregister io_uring files while FETCH commands
            // are still pending (older kernels wait for them forever) and unmap the
            // descriptors, and the pending FETCHes still name the tag buffers. So
            // everything in `ManuallyDrop` is leaked: the kernel cleans up at thread
            // / process exit, exactly as after a crash, and re-issues what we did not
            // complete.
            other
        }
    }
}
