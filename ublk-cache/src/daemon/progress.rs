//! Showing progress of long operations (preload, hydration, write-back) on
//! stderr: a one-line bar on a terminal, JSON lines otherwise (for drivers).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use crate::engine::Progress;

pub struct ProgressView {
    tty: bool,
    started: Instant,
    last: Mutex<Option<Instant>>,
}

impl Default for ProgressView {
    fn default() -> Self {
        Self::new(false)
    }
}

impl ProgressView {
    /// `json` forces JSON lines even on a terminal.
    pub fn new(json: bool) -> Self {
        Self {
            tty: !json && std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: Mutex::new(None),
        }
    }

    pub fn show(&self, p: &Progress) {
        let mut err = std::io::stderr().lock();
        let done = p.done.min(p.total);
        if self.tty {
            let frac = if p.total == 0 {
                1.0
            } else {
                done as f64 / p.total as f64
            };
            let width = 30;
            let fill = (frac * width as f64) as usize;
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let _ = write!(
                err,
                "\r{:<10} [{}{}] {:>5.1}% {}/{} MiB {:.1} MiB/s ",
                p.phase,
                "#".repeat(fill),
                " ".repeat(width - fill),
                frac * 100.0,
                done >> 20,
                p.total >> 20,
                done as f64 / secs / (1 << 20) as f64
            );
            if done >= p.total {
                let _ = writeln!(err);
            }
        } else {
            // Rate-limit JSON lines to one a second, plus the last one.
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if done < p.total && last.is_some_and(|t| t.elapsed().as_millis() < 1000) {
                return;
            }
            *last = Some(Instant::now());
            let _ = writeln!(
                err,
                "{}",
                serde_json::json!({"event": "progress", "phase": p.phase, "done": done, "total": p.total})
            );
        }
    }
}
