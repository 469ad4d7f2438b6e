//! A watchdog that turns a hang into a loud, named failure: a test that
//! hangs would otherwise run into CI's time limit and say nothing about which
//! test or row it was.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Aborts the whole test process unless dropped within its time.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

/// Start a watchdog for `what` (a test, a test and its row) of `secs` seconds.
pub fn watchdog(what: &str, secs: u64) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let name = what.to_string();
    std::thread::spawn(move || {
        let step = Duration::from_millis(100);
        for _ in 0..secs * 10 {
            if d.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(step);
        }
        // Straight to the stream: the test harness captures `eprintln!`, and
        // what it captured is lost when the process aborts.
        let _ = writeln!(
            std::io::stderr(),
            "FAIL: {name}: still running after {secs} s (a hang?); aborting the test process"
        );
        std::process::abort();
    });
    Watchdog { done }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}
