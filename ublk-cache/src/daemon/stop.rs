//! The one stop idiom of a server: a token that says whether, and how, it is
//! to stop, that any thread (a signal thread, the ublk device's thread, a
//! test) may trigger and the server's thread waits on. The first request wins.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::frontend::ublk::StopKind;

#[derive(Debug, Default)]
struct Inner {
    /// 0: running; 1: stop; 2: detach.
    kind: AtomicU8,
    /// Set by any request: what long operations poll (`Engine::preload` takes it).
    cancelled: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Cheap to clone; every clone is the same token.
#[derive(Debug, Clone, Default)]
pub struct StopToken(Arc<Inner>);

impl StopToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Clean stop: finish in-flight I/O, write everything back, remove the device.
    pub fn stop(&self) {
        self.request(1);
    }

    /// Detach: dirty data stays in the cache, a ublk device stays for `recover`.
    pub fn detach(&self) {
        self.request(2);
    }

    pub fn request_kind(&self, kind: StopKind) {
        match kind {
            StopKind::Stop => self.stop(),
            StopKind::Detach => self.detach(),
        }
    }

    fn request(&self, kind: u8) {
        let _ = self
            .0
            .kind
            .compare_exchange(0, kind, Ordering::SeqCst, Ordering::SeqCst);
        self.0.cancelled.store(true, Ordering::Release);
        let _g = self.0.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.0.cv.notify_all();
    }

    pub fn requested(&self) -> Option<StopKind> {
        match self.0.kind.load(Ordering::SeqCst) {
            1 => Some(StopKind::Stop),
            2 => Some(StopKind::Detach),
            _ => None,
        }
    }

    /// Set once anything was requested: for `Engine::preload`'s cancel flag.
    pub fn flag(&self) -> &AtomicBool {
        &self.0.cancelled
    }

    /// Block until `done` (looked at every `every`) or a stop request;
    /// false on a stop.
    pub fn wait_until(&self, every: Duration, mut done: impl FnMut() -> bool) -> bool {
        let mut g = self.0.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.requested().is_some() {
                return false;
            }
            if done() {
                return true;
            }
            g = self
                .0
                .cv
                .wait_timeout(g, every)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Block until a stop is requested.
    pub fn wait(&self) -> StopKind {
        let mut g = self.0.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(k) = self.requested() {
                return k;
            }
            g = self
                .0
                .cv
                .wait_timeout(g, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins_and_wakes_the_waiter() {
        let t = StopToken::new();
        assert_eq!(t.requested(), None);
        assert!(!t.flag().load(Ordering::Acquire));
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait());
        std::thread::sleep(Duration::from_millis(20));
        t.detach();
        t.stop();
        assert_eq!(h.join().unwrap(), StopKind::Detach);
        assert_eq!(t.requested(), Some(StopKind::Detach));
        assert!(t.flag().load(Ordering::Acquire));
    }
}
