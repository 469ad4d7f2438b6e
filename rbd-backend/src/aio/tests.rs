use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::*;

async fn nop() -> i32 {
    // SAFETY: a NOP names no memory.
    let op = unsafe { submit(opcode::Nop::new().build(), ()) }.unwrap();
    op.await.0
}

#[test]
fn ops_timers_and_tasks_complete_on_the_loop() {
    let lp = EventLoop::new().unwrap();
    let r = lp.block_on(async { nop().await }).unwrap();
    assert_eq!(r, 0);
    let t = Instant::now();
    lp.block_on(sleep(Duration::from_millis(20))).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(20));
    let n = Rc::new(std::cell::Cell::new(0));
    let n2 = Rc::clone(&n);
    lp.block_on(async move {
        for _ in 0..10 {
            let n = Rc::clone(&n2);
            spawn(async move {
                sleep(Duration::from_millis(1)).await;
                n.set(n.get() + 1);
            })
            .unwrap()
            .detach();
        }
    })
    .unwrap();
    // block_on waits for the tasks it spawned.
    assert_eq!(n.get(), 10);
}

#[test]
fn a_wake_from_another_thread_ends_the_wait_at_once() {
    let lp = EventLoop::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<std::task::Waker>();
    let flag = Arc::new(AtomicUsize::new(0));
    let f2 = Arc::clone(&flag);
    let th = std::thread::spawn(move || {
        let w = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        f2.store(1, Ordering::SeqCst);
        w.wake();
    });
    let t = Instant::now();
    lp.block_on(std::future::poll_fn(|cx| {
        if flag.load(Ordering::SeqCst) == 1 {
            return std::task::Poll::Ready(());
        }
        let _ = tx.send(cx.waker().clone());
        std::task::Poll::Pending
    }))
    .unwrap();
    th.join().unwrap();
    // Far below any poll timeout: the eventfd ended the wait.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_dropped_future_keeps_its_buffer_until_the_kernel_is_done() {
    let lp = EventLoop::new().unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: plain syscall with a valid out array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let buf = DmaBuf::new(4096);
    let s = buf.slice_all();
    let sqe = opcode::Read::new(types::Fd(fds[0]), s.as_mut_ptr(), 4096).build();
    lp.block_on(async {
        // SAFETY: the read targets `s`, which the request owns.
        let op = unsafe { submit(sqe, s) }.unwrap();
        // Give the kernel the request, then walk away from it.
        futures_lite::future::or(async { op.await.0 }, async {
            sleep(Duration::from_millis(5)).await;
            -1
        })
        .await
    })
    .unwrap();
    let mut buf = buf;
    assert!(buf.bytes_mut().is_none(), "the orphaned read still owns it");
    // SAFETY: writes 5 bytes from a live array into the pipe.
    let n = unsafe { libc::write(fds[1], b"hello".as_ptr().cast(), 5) };
    assert_eq!(n, 5);
    lp.block_on(sleep(Duration::from_millis(5))).unwrap();
    assert_eq!(
        &buf.bytes_mut().expect("released after completion")[..5],
        b"hello"
    );
    // SAFETY: closing our own fds.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn loops_do_not_nest() {
    let lp = EventLoop::new().unwrap();
    let inner = lp
        .block_on(async { block_on(async { 1 }).map_err(|e| e.to_string()) })
        .unwrap();
    assert!(inner.unwrap_err().contains("event loop"));
    assert!(!in_loop());
    assert!(block_on(async { 3 }).unwrap() == 3);
}
