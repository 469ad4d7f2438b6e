//! Waiting inside the engine: on an event loop without blocking it, or on a
//! plain thread (control operations, tools) by blocking.
//!
//! Every wait follows the same shape, which cannot miss a wake-up: take a
//! listener, check the condition, then wait on the listener (with a timeout as a
//! safety net, never as the mechanism).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use event_listener::{Event, Listener};
use rbd_backend::aio;

/// Wait until `ev` is notified or `timeout` passes (whichever comes first).
pub async fn wait_for(ev: &Event, timeout: Duration, ready: impl Fn() -> bool) {
    let l = ev.listen();
    if ready() {
        return;
    }
    if aio::in_loop() {
        futures_lite::future::or(l, aio::sleep(timeout)).await;
    } else {
        l.wait_timeout(timeout);
    }
}

/// `wait_for`, woken by either of two events.
pub async fn wait_for_either(a: &Event, b: &Event, timeout: Duration, ready: impl Fn() -> bool) {
    let (la, lb) = (a.listen(), b.listen());
    if ready() {
        return;
    }
    if aio::in_loop() {
        futures_lite::future::or(la, futures_lite::future::or(lb, aio::sleep(timeout))).await;
    } else {
        // Off a loop (tools, tests) only `a` wakes it early; `b` waits for
        // the timeout. The flusher, the one caller, always runs on a loop.
        drop(lb);
        la.wait_timeout(timeout);
    }
}

/// Blocking form, for threads that are not event loops.
pub fn wait_blocking(ev: &Event, timeout: Duration, ready: impl Fn() -> bool) {
    let l = ev.listen();
    if ready() {
        return;
    }
    l.wait_timeout(timeout);
}

/// The gate every guest request passes, so that a mode switch can hold new
/// requests for its last step and wait until none is in flight.
#[derive(Default)]
pub struct Gate {
    inflight: AtomicUsize,
    closed: AtomicBool,
    ev: Event,
}

pub struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.closed.load(Ordering::SeqCst)
        {
            self.0.ev.notify(usize::MAX);
        }
    }
}

/// Held by the one who closed the gate; reopens it on drop.
pub struct GateClosed<'a>(&'a Gate);

impl Drop for GateClosed<'_> {
    fn drop(&mut self) {
        self.0.closed.store(false, Ordering::SeqCst);
        self.0.ev.notify(usize::MAX);
    }
}

impl Gate {
    pub async fn enter(&self) -> GateGuard<'_> {
        loop {
            if !self.closed.load(Ordering::SeqCst) {
                self.inflight.fetch_add(1, Ordering::SeqCst);
                if !self.closed.load(Ordering::SeqCst) {
                    return GateGuard(self);
                }
                // Closed meanwhile: step back out and wait with the others.
                drop(GateGuard(self));
            }
            wait_for(&self.ev, Duration::from_secs(1), || {
                !self.closed.load(Ordering::SeqCst)
            })
            .await;
        }
    }

    /// Hold new requests and wait until none is in flight (blocking: control
    /// operations run on their own threads).
    pub fn close(&self) -> GateClosed<'_> {
        self.closed.store(true, Ordering::SeqCst);
        let g = GateClosed(self);
        while self.inflight.load(Ordering::SeqCst) != 0 {
            wait_blocking(&self.ev, Duration::from_millis(100), || {
                self.inflight.load(Ordering::SeqCst) == 0
            });
        }
        g
    }
}

/// A boxed piece of one request (several run at once).
pub type Piece<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Run every piece to completion, concurrently, and return their outputs in
/// order. Never returns before all are done: a piece may still be writing into
/// the request's memory.
pub async fn join_all<T>(mut pieces: Vec<Piece<'_, T>>) -> Vec<T> {
    if pieces.len() == 1 {
        let p = pieces.pop().expect("one piece");
        return vec![p.await];
    }
    let mut out: Vec<Option<T>> = (0..pieces.len()).map(|_| None).collect();
    let mut left = pieces.len();
    std::future::poll_fn(|cx| {
        for (i, p) in pieces.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let std::task::Poll::Ready(v) = p.as_mut().poll(cx) {
                out[i] = Some(v);
                left -= 1;
            }
        }
        if left == 0 {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every piece finished"))
        .collect()
}

/// Run `pieces` with at most `window` in flight at once (a sliding window: a new
/// one starts as soon as one ends). Returns the first error, after every piece
/// that was started has finished.
pub async fn run_window<'a, E>(
    window: usize,
    pieces: impl IntoIterator<Item = Piece<'a, Result<(), E>>>,
) -> Result<(), E> {
    let mut pending = pieces.into_iter();
    let mut running: Vec<Piece<'a, Result<(), E>>> = Vec::new();
    let mut first_err = None;
    let mut exhausted = false;
    std::future::poll_fn(|cx| loop {
        while !exhausted && first_err.is_none() && running.len() < window.max(1) {
            match pending.next() {
                Some(p) => running.push(p),
                None => exhausted = true,
            }
        }
        let mut progressed = false;
        let mut i = 0;
        while i < running.len() {
            if let std::task::Poll::Ready(r) = running[i].as_mut().poll(cx) {
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
                drop(running.swap_remove(i));
                progressed = true;
            } else {
                i += 1;
            }
        }
        if running.is_empty() && (exhausted || first_err.is_some()) {
            return std::task::Poll::Ready(());
        }
        if !progressed {
            return std::task::Poll::Pending;
        }
    })
    .await;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
